"""kvzoo eval: metrics on hand-computed cases, instance builders, the fan-out prefill, result files and errors."""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import replace

import pytest
import torch

import kvzoo
from kvzoo.default_model import ensure_default_model
from kvzoo.errors import KvzooError
from kvzoo.eval import longbench, metrics, report, tasks
from kvzoo.eval.fanout import fanout_prefill
from kvzoo.eval.runner import EvalConfig, Runner, method_cases
from kvzoo.eval.texts import builtin_corpus, read_source
from kvzoo.likelihood import prefill_cache


# --- metrics: hand-computed --------------------------------------------------------------------------------
def test_leading_match_counts_characters_before_the_first_wrong_one():
    assert metrics.leading_match("48213", "48213") == 1.0
    assert metrics.leading_match("48299", "48213") == pytest.approx(0.6)
    assert metrics.leading_match("", "48213") == 0.0
    assert metrics.leading_match("9", "48213") == 0.0
    assert metrics.first_number(" is 48213. Remember") == "48213"
    assert metrics.first_number("no digits") == ""


def test_token_f1_on_a_worked_case():
    # normalised: pred "cat sat on mat" (4 words), gold "cat is on mat" (4): common cat, on, mat = 3
    # precision 3/4, recall 3/4 -> F1 0.75
    assert metrics.token_f1("The cat sat on the mat!", "a cat is on the mat") == pytest.approx(0.75)
    assert metrics.token_f1("dog", "cat") == 0.0


def test_rouge_l_on_a_worked_case():
    # LCS of "a b c d e" and "a c e f" is "a c e" (3): P = 3/5, R = 3/4 -> F = 2 * 0.6 * 0.75 / 1.35
    assert metrics.rouge_l("a b c d e", "a c e f") == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert metrics.rouge_l("x", "y") == 0.0


def test_classification_and_edit_similarity():
    classes = ["Location", "Person", "Number"]
    assert metrics.classification_score("Type: Person", "Person", classes) == 1.0
    assert metrics.classification_score("Person or Number", "Person", classes) == 0.5
    assert metrics.classification_score("Location", "Person", classes) == 0.0
    # "kitten" -> "sitting": Levenshtein distance 3, longer length 7
    assert metrics.edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert metrics.edit_similarity("# comment\nx = 1", "x = 1") == 1.0


# --- instances -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return kvzoo.load(ensure_default_model(progress=False))


@pytest.fixture(scope="module")
def corpus(model):
    return model.require_tokenizer().encode(builtin_corpus()[:60000], add_special_tokens=False)


def test_builtin_corpus_is_long_prose():
    text = builtin_corpus()
    assert len(text) > 200_000 and "    " not in text[:10_000]  # code blocks dropped


def test_text_instances_are_seeded_windows_of_the_corpus():
    corpus = list(range(1000))
    a = tasks.text_instances(corpus, 4, 100, 20, seed=3)
    assert a == tasks.text_instances(corpus, 4, 100, 20, seed=3)
    assert a != tasks.text_instances(corpus, 4, 100, 20, seed=4)
    for x in a:
        assert x.context == corpus[x.offset:x.offset + 100] and x.continuation == corpus[x.offset + 100:x.offset + 120]
    assert len({x.offset for x in a}) == 4 and all(x.offset % 120 == 0 for x in a)  # disjoint windows


@pytest.mark.parametrize("kind", tasks.NEEDLE_KINDS)
def test_needles_have_the_stated_length_and_depth(model, corpus, kind):
    tok = model.require_tokenizer()
    depths = [0.0, 0.25, 0.5, 1.0]
    made = tasks.needle_instances(tok, corpus, [300, 700], depths, (kind,), seed=1)
    assert made == tasks.needle_instances(tok, corpus, [300, 700], depths, (kind,), seed=1)
    for x in made:
        assert len(x.prompt) == x.length
        end = "is the passkey." if kind == "passkey" else f"door is {x.answer}."
        # The needle's extent, found from the decoded text: the fewest tokens from needle_start that hold it.
        m = next(m for m in range(1, 40) if end in tok.decode(x.haystack[x.needle_start:x.needle_start + m]))
        assert x.answer in tok.decode(x.haystack[x.needle_start:x.needle_start + m])
        asked = tok.decode(x.question)
        if kind == "passkey":
            # depth = the fraction of the filler (the haystack without the needle) before the needle
            assert x.needle_start == round(x.depth * (len(x.haystack) - m))
            assert "passkey" in asked
        else:
            others = len(x.haystack) - m - (len(x.haystack) - 4 * m)  # up to 3 other needles of similar size
            assert abs(x.needle_start - x.depth * len(x.haystack)) <= others + m + 1
            door = tok.decode(x.haystack[x.needle_start:x.needle_start + m]).split(" door")[0].split()[-1]
            assert f"the {door} door" in asked  # the question asks for the needle at `depth`


@pytest.mark.parametrize("kind", tasks.NEEDLE_KINDS)
def test_sentence_placement_starts_each_needle_a_sentence(model, corpus, kind):
    tok = model.require_tokenizer()
    depths = [0.0, 0.3, 0.55, 0.8]
    by_token = tasks.needle_instances(tok, corpus, [400], depths, (kind,), seed=5)
    by_sentence = tasks.needle_instances(tok, corpus, [400], depths, (kind,), seed=5, placement="sentence")
    starts = [" The secret passkey is"] if kind == "passkey" else [" The passkey for the"]
    moved = 0
    for t, x in zip(by_token, by_sentence):
        # the same filler, needles, code and question: only the cuts move
        assert (x.answer, x.question, sorted(x.haystack)) == (t.answer, t.question, sorted(t.haystack))
        assert tok.decode(x.haystack[x.needle_start:x.needle_start + 20]).startswith(starts[0] + (
            f" {x.answer}" if kind == "passkey" else ""))
        text = tok.decode(x.haystack)
        for needle_at in [i for i in range(len(text)) if text.startswith(starts[0], i)]:
            assert needle_at == 0 or text[:needle_at].rstrip(" ").endswith((".", "!", "?", "\n")), text[:needle_at]
        moved += x.needle_start != t.needle_start
    assert moved >= len(depths) // 2  # token placement cuts mid-sentence, which these seeds' depths do


def test_unknown_needle_placement_is_named(model, corpus):
    with pytest.raises(KvzooError, match="needle placement 'word' is not known: give one of token, sentence"):
        tasks.needle_instances(model.require_tokenizer(), corpus, [400], [0.5], ("passkey",), seed=5,
                               placement="word")


def test_needle_codes_differ_between_seeds(model, corpus):
    tok = model.require_tokenizer()
    a = tasks.needle_instances(tok, corpus, [300], [0.5], ("passkey",), seed=1)[0]
    b = tasks.needle_instances(tok, corpus, [300], [0.5], ("passkey",), seed=2)[0]
    assert a.answer != b.answer and len(a.answer) == tasks.CODE_DIGITS


# --- the fan-out prefill is exact --------------------------------------------------------------------------------
def test_fanout_caches_equal_separate_prefills(tiny_checkpoint):
    model = kvzoo.load(tiny_checkpoint("llama-gqa")[1])
    prompts = [list(range(3, 103)), list(range(20, 100))]
    cases = method_cases(["streamingllm", "h2o", "tova", "snapkv", "pyramidkv", "zsmerge", "kvmerger", "zigzag",
                          "compactor"],
                         [0.5])
    # documents stored for later questions: each reads the prompt's surprisal (`stored_surprisal`)
    stored = [m(budget=0.5).for_stored_document() for m in (kvzoo.ZSMerge, kvzoo.KVMerger, kvzoo.ZigZagKV)]
    assert all(m.reads_prompt_surprisal for m in stored)
    methods = [c.method for c in cases] + stored
    caches, logits = fanout_prefill(model, prompts, methods, headroom=3)
    assert all(cache.prompt_surprisal is not None for cache in caches[-3:])
    labels = [c.label for c in cases] + ["stored zsmerge", "stored kvmerger", "stored zigzag"]
    for method, label, cache in zip(methods, labels, caches):
        alone, alone_logits = prefill_cache(model, prompts, method, headroom=3)
        torch.testing.assert_close(logits, alone_logits)
        for a, b in zip(alone.layers, cache.layers):
            for x, y in zip(a.tensors(), b.tensors()):
                assert torch.equal(x, y), label


# --- the runner and its files --------------------------------------------------------------------------------
def test_eval_command_writes_results_with_provenance(model, tmp_path, monkeypatch, capsys):
    from kvzoo.cli import main

    source = tmp_path / "text.txt"
    source.write_text(builtin_corpus()[:20000])
    out = tmp_path / "out"
    argv = ["eval", "--methods", "streamingllm", "--budgets", "0.25", "--n", "2", "--context-len", "96",
            "--continuation-len", "8", "--agreement-tokens", "6", "--needle-lengths", "160", "--needle-depths",
            "0.5", "--needle-repeats", "1", "--source", str(source), "--out", str(out), "--quiet", "--plot"]
    assert main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["schema"] == 1 and result["kind"] == "eval"
    assert {"commit", "command", "versions", "cpu", "threads", "dtype"} <= set(result["provenance"])
    cells = {(r["task"], r["method"], r["budget"]) for r in result["summary"]}
    for task in ("nll", "agreement", "needle-aware", "needle-agnostic"):
        assert (task, "full", None) in cells and (task, "streamingllm", 0.25) in cells
    full_agreement = next(r for r in result["summary"] if r["task"] == "agreement" and r["method"] == "full")
    assert full_agreement["agreement"] == 1.0
    nll = {r["method"]: r for r in result["summary"] if r["task"] == "nll"}
    assert nll["streamingllm"]["nll_vs_full"] == pytest.approx(nll["streamingllm"]["nll"] - nll["full"]["nll"])
    assert 0.2 < nll["streamingllm"]["kept"] < 0.3
    assert "| streamingllm |" in (out / "results.md").read_text()
    assert "| streamingllm | passkey |" in (out / "results.md").read_text()  # needles by kind
    assert (out / "nll-nll_vs_full.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # `kvzoo compare` reads what eval wrote; the same run given twice pools to itself (no instance twice).
    capsys.readouterr()
    assert main(["compare", str(out), str(out), "--tasks", "nll,needle"]) == 0
    shown, warned = capsys.readouterr()
    assert f"| streamingllm | {nll['streamingllm']['nll_vs_full']:+.3f} [2] |" in shown and "warning" not in warned
    aware = next(r for r in result["summary"] if r["task"] == "needle-aware" and r["method"] == "streamingllm")
    assert f"| streamingllm | {aware['exact'] * aware['n']:.0f}/{aware['n']} |" in shown


def test_nll_of_the_full_cache_matches_score(model, corpus):
    config = EvalConfig(methods=[], budgets=[0.5], tasks=["nll"], n=1, context_len=64, continuation_len=6)
    record = Runner(model, config, corpus, progress=False).run()[0]
    x = tasks.text_instances(corpus, 1, 64, 6, seed=0)[0]
    expected = -model.score(x.context, x.continuation).mean()
    assert record.values["nll"] == pytest.approx(float(expected), abs=1e-5)


def test_matched_memory_ends_every_method_with_the_same_cache(model, corpus):
    """--memory matched: decode-time methods hold budget + the generated tokens' slots, which is exactly what
    a prefill-only method holds after appending them, so the cache at the end is the same for both kinds."""
    config = EvalConfig(methods=["snapkv:window_size=4", "zsmerge", "h2o"], budgets=[0.25], tasks=["nll"], n=1,
                        context_len=96, continuation_len=17, memory="matched")
    kept_end = {r.label: r.info["kept_end"] for r in Runner(model, config, corpus, progress=False).run()}
    assert kept_end["snapkv:window_size=4"] == pytest.approx(0.25 + 16 / 96)
    assert kept_end["zsmerge"] == pytest.approx(kept_end["snapkv:window_size=4"])
    assert kept_end["h2o"] == pytest.approx(kept_end["snapkv:window_size=4"])
    budget = EvalConfig(methods=["zsmerge"], budgets=[0.25], tasks=["nll"], n=1, context_len=96, continuation_len=17)
    assert Runner(model, budget, corpus, progress=False).run()[1].info["kept_end"] == pytest.approx(0.25)


@pytest.mark.parametrize("kwargs, message", [
    (dict(memory="equal"), "memory must be one of budget, matched"),
    (dict(tasks=["perplexity"]), "unknown task 'perplexity'"),
    (dict(budgets=[1.5]), "budget 1.5 is out of range"),
    (dict(n=0), "n must be an integer >= 1"),
    (dict(needle_layouts=["aware", "after"]), "needle layout 'after' is not known: give any of aware, agnostic"),
    (dict(needle_layouts=[]), "needle layout 'none' is not known"),
    (dict(needle_placement="mid"), "needle placement 'mid' is not known: give one of token, sentence"),
])
def test_bad_eval_config_is_named(kwargs, message):
    with pytest.raises(KvzooError, match=message):
        EvalConfig(**kwargs)


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(KvzooError, match="no such file or directory"):
        read_source(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(KvzooError, match="the text is empty"):
        read_source(empty)
    with pytest.raises(KvzooError, match="no .txt, .md or .html file"):
        read_source(_empty_dir(tmp_path))
    with pytest.raises(KvzooError, match="unknown compression method 'nosuch'"):
        method_cases(["nosuch"], [0.1])
    with pytest.raises(KvzooError, match=r"'zsmerge:budget=0.1,alpha=1' sets budget, but eval runs every method "
                                         r"at each of --budgets \(0.05, 0.2\)"):
        method_cases(["zsmerge:budget=0.1,alpha=1"], [0.05, 0.2])
    with pytest.raises(KvzooError, match="'zsmerge:budget=2' sets budget"):  # before the value's own check
        method_cases(["zsmerge:budget=2"], [0.05])
    with pytest.raises(KvzooError, match="unknown compression method 'nosuch'"):
        method_cases(["nosuch:budget=0.1"], [0.05])
    assert [c.method.budget for c in method_cases(["zsmerge:alpha=1"], [0.05, 0.2])[1:]] == [0.05, 0.2]


def test_an_html_source_is_read_as_its_prose(tmp_path):
    page = tmp_path / "book" / "print.html"
    page.parent.mkdir()
    page.write_text("<html><head><title>Book</title><style>p {color: red}</style></head><body>"
                    "<nav><a href='#'>Contents</a></nav><h1>Chapter&nbsp;1</h1>"
                    "<p>The <code>main</code>\n   function &amp; its\nbody.</p><pre><code>fn main() {}</code></pre>"
                    "<ul><li>first item</li><li>second</li></ul><script>var x = 1;</script>"
                    "<p>Last <em>words</em>.<br>After a break.</p></body></html>", encoding="utf-8")
    expected = ("Chapter 1\n\nThe main function & its body.\n\nfirst item\n\nsecond\n\n"
                "Last words.\n\nAfter a break.")
    assert read_source(page) == expected
    notes = page.parent / "notes.txt"  # a directory reads both kinds, in sorted order
    notes.write_text("Plain <p>text</p> is read as it is.", encoding="utf-8")
    assert read_source(page.parent) == "Plain <p>text</p> is read as it is.\n\n" + expected


def _empty_dir(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    return d


# --- LongBench format ---------------------------------------------------------------------------------------
def test_longbench_reader_and_scoring(tmp_path):
    rows = [
        {"input": "Who wrote it?", "context": "A long text.", "answers": ["Jane Austen"], "all_classes": None},
        {"input": "When?", "context": "Another text.", "answers": ["1813", "in 1813"], "all_classes": None},
    ]
    (tmp_path / "narrativeqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "trec.jsonl").write_text(json.dumps(
        {"input": "q", "context": "c", "answers": ["Person"], "all_classes": ["Person", "Location"]}) + "\n")
    data = longbench.read_tasks(tmp_path)
    assert sorted(data) == ["narrativeqa", "trec"] and len(data["narrativeqa"]) == 2
    first = data["narrativeqa"][0]
    assert first.prompt.startswith("A long text.") and first.prompt.endswith("Question: Who wrote it?\nAnswer:")
    assert longbench.score_prediction(first, "jane austen wrote it") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert longbench.score_prediction(data["narrativeqa"][1], "In 1813.") == 1.0  # best of the answers
    assert longbench.score_prediction(data["trec"][0], "Location") == 0.0
    assert longbench.truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]


def test_longbench_bad_files_are_named(tmp_path):
    with pytest.raises(KvzooError, match="no such directory"):
        longbench.read_tasks(tmp_path / "nope")
    with pytest.raises(KvzooError, match="no LongBench file"):
        longbench.read_tasks(tmp_path)
    (tmp_path / "qasper.jsonl").write_text('{"input": "q"}\n')
    with pytest.raises(KvzooError, match=r"qasper.jsonl:1: not a LongBench record"):
        longbench.read_tasks(tmp_path)
    with pytest.raises(KvzooError, match="'vcsum' is not supported"):
        longbench.read_tasks(tmp_path, only=["vcsum"])


def test_questions_asked_after_compression_are_asked_of_a_stored_document(model, corpus, monkeypatch):
    """The agnostic needle layout compresses the haystack as `prefill_cache` would (`for_stored_document`),
    the aware layout as a prompt to continue."""
    runner = Runner(model, EvalConfig(methods=["zsmerge", "h2o"], budgets=[0.25], tasks=["needle"]), corpus,
                    progress=False)
    prompts = [corpus[:64]]
    for stored in (False, True):
        methods = [(case.method, cache.method) for case, cache, _ in runner.prefilled(prompts, 4, stored=stored)]
        assert [got for _, got in methods] == [m.for_stored_document() if stored else m for m, _ in methods]
    assert any(m.for_stored_document() != m for m, _ in methods)  # ZSMerge's copy heads

    layouts = []
    prefilled = Runner.prefilled

    def spy(self, prompts, headroom, stored=False):
        layouts.append(stored)
        yield from prefilled(self, prompts, headroom, stored)

    monkeypatch.setattr(Runner, "prefilled", spy)
    config = EvalConfig(methods=["zsmerge"], budgets=[0.5], tasks=["needle"], needle_lengths=[160],
                        needle_depths=[0.5], needle_repeats=1)
    Runner(model, config, corpus, progress=False).run()
    assert layouts and layouts == [False, True] * (len(layouts) // 2)


def test_a_question_asked_after_compression_is_asked_as_generate_asks_a_stored_cache(model, corpus):
    """The agnostic needle layout answers what `generate_ids(question, cache=prefill_cache(haystack))` answers:
    the question is a later prompt chunk of the stored document's cache, which a decode-time method compresses
    as any chunk (not what decode steps would do with it) and a prefill-only method appends, in the room
    `generate` gives it (a decode cap shorter than the question bounds only the answer)."""
    from kvzoo.eval.runner import ANSWER_TOKENS
    from kvzoo.generate import generate_ids
    from kvzoo.generate import prefill_cache as store

    # At 10% of 200 tokens the decode-step feed answers otherwise for H2O and StreamingLLM (checked by the
    # eval-asks-through-decode-steps mutant of tools/mutants.py).
    config = EvalConfig(methods=["zsmerge", "h2o", "streamingllm", "snapkv", "snapkv:decode_cap=4"], budgets=[0.1],
                        tasks=["needle"], needle_layouts=["agnostic"],
                        needle_lengths=[200], needle_depths=[0.5], needle_repeats=1, batch_size=1)
    runner = Runner(model, config, corpus, progress=False)
    needles = runner.needles()
    methods = {(case.label, case.budget): case.method for case in runner.cases}
    records = runner.run()
    asked_after = [r for r in records if r.task == "needle-agnostic"]
    assert len(asked_after) == len(records) == len(needles) * len(methods)  # only the layout asked for
    tok = model.require_tokenizer()
    for record in asked_after:
        x = needles[record.instance]
        cache = store(model, x.haystack, compression=methods[(record.label, record.budget)])
        out = generate_ids(model, x.question, max_new_tokens=ANSWER_TOKENS, eos_token_ids=[], compile=False,
                           cache=cache)
        assert tok.decode(out.token_ids[0]) == record.info["output"], record.label


def test_needles_by_kind_count_each_kind_beside_the_full_cache_on_its_instances():
    from kvzoo.eval.runner import Record

    def needle(label: str, budget: float | None, instance: int, kind: str, exact: float) -> Record:
        return Record("needle-agnostic", label, budget, instance, {"exact": exact, "partial": exact}, {"kind": kind})

    # Instances 0-1 passkeys, 2-4 multikeys; the full cache answers 0, 1 and 2; the method at 0.1 answers 0 and 3
    # (one the full cache misses), at 0.2 answers 0, 1 and 2.
    records = [needle("full", None, i, kind, float(i < 3)) for i, kind in enumerate("ppmmm")]
    records += [needle("m", 0.1, i, kind, float(i in (0, 3))) for i, kind in enumerate("ppmmm")]
    records += [needle("m", 0.2, i, kind, float(i < 3)) for i, kind in enumerate("ppmmm")]
    records = [replace(r, info={"kind": {"p": "passkey", "m": "multikey"}[r.info["kind"]]}) for r in records]
    lines = report.needle_kinds_table(records).splitlines()
    assert "| method | kind | full cache | 0.1 | 0.2 |" in lines
    assert "| m | passkey | 2/2 | 1/2 | 2/2 |" in lines
    assert "| m | multikey | 1/3 | 1/3 | 1/3 |" in lines
    assert not any(line.startswith("| full |") for line in lines)
    assert report.needle_kinds_table([r for r in records if r.label == "full"]) == ""  # nothing to compare
    assert report.needle_kinds_table([Record("nll", "m", 0.1, 0, {"nll": 1.0})]) == ""


def test_sigterm_interrupts_a_run_only_while_it_runs():
    """`kvzoo eval` / `bench` turn SIGTERM into KeyboardInterrupt so a killed run writes what finished; a program
    that calls `kvzoo.cli.main` gets its own handler back, and a call from another thread (which cannot set one)
    runs as it is."""
    before = signal.getsignal(signal.SIGTERM)
    with report.sigterm_interrupts():
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler) and handler is not before
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGTERM, None)
    assert signal.getsignal(signal.SIGTERM) is before

    errors: list[BaseException] = []

    def in_a_thread() -> None:
        try:
            with report.sigterm_interrupts():
                pass
        except BaseException as e:  # noqa: BLE001 - anything raised is the failure reported below
            errors.append(e)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert errors == [] and signal.getsignal(signal.SIGTERM) is before
