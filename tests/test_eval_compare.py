"""`kvzoo compare`: pooling eval runs by instance and pairing methods, on hand-written results files."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from kvzoo.cli import main
from kvzoo.errors import KvzooError, KvzooWarning
from kvzoo.eval.compare import compare_markdown, paired, pool_runs, run_compare_command

CONFIG = {"seed": 5, "n": 3, "context_len": 2048, "continuation_len": 128, "agreement_tokens": 64,
          "needle_lengths": [2048], "needle_depths": [0.5], "needle_repeats": 1, "memory": "matched"}
# Room for exactly three 2176-token windows: every seed draws all three, in corpus order (tasks.text_offsets).
CORPUS_TOKENS = 3 * (2048 + 128)


def write_run(path, records, model="default", **config):
    """A results.json as `kvzoo eval --out` writes it (only the fields compare reads)."""
    path.mkdir()
    payload = {"schema": 1, "kind": "eval", "model": model, "provenance": {"dtype": "float32"},
               "config": {**CONFIG, **config}, "source": "builtin:pydoc-topics",
               "corpus_tokens": CORPUS_TOKENS, "interrupted": False, "records": records}
    (path / "results.json").write_text(json.dumps(payload))
    return path


def nll(label, budget, values):
    return [{"task": "nll", "label": label, "budget": budget, "instance": i, "values": {"nll": v}, "info": {}}
            for i, v in enumerate(values)]


FULL = [2.0, 3.0, 1.0]


def test_paired_difference_is_the_mean_and_standard_error_of_per_instance_differences():
    a = {("x", 0): 1.1, ("x", 1): 2.3, ("x", 2): 0.7, ("y", 0): 9.0}
    b = {("x", 0): 1.0, ("x", 1): 2.0, ("x", 2): 0.5}
    d = paired(a, b)
    # differences 0.1, 0.3, 0.2: mean 0.2, sample variance 0.01, se sqrt(0.01 / 3)
    assert d.n == 3 and d.mean == pytest.approx(0.2) and d.se == pytest.approx(math.sqrt(0.01 / 3))
    assert paired(a, {("z", 0): 1.0}) is None
    assert math.isnan(paired({("x", 0): 1.0}, {("x", 0): 0.5}).se)


def test_runs_pool_by_instance_and_other_windows_only_add_instances(tmp_path):
    # One set of windows split over two runs (one with zsmerge, one with h2o); 1024-token windows are others.
    a = write_run(tmp_path / "a", nll("full", None, FULL) + nll("zsmerge", 0.05, [2.1, 3.3, 1.2]))
    b = write_run(tmp_path / "b", nll("full", None, FULL) + nll("h2o", 0.05, [2.0, 3.0, 1.0]))
    c = write_run(tmp_path / "c", nll("full", None, [1.0, 1.0, 1.0]) + nll("zsmerge", 0.05, [1.5, 1.5, 1.5]),
                  context_len=1024)
    table = compare_markdown(pool_runs([a, b, c]), against="h2o")
    # zsmerge's increase over the full cache over six instances: (0.1 + 0.3 + 0.2 + 3 * 0.5) / 6 = 0.35; against
    # h2o only the first windows pair: differences 0.1, 0.3, 0.2.
    assert f"| zsmerge | +0.350 [6] (+0.200 ± {math.sqrt(0.01 / 3):.3f}, 3) |" in table
    assert "| h2o | +0.000 [3] |" in table
    assert "full cache 1.500 over 6 instances" in table  # the shared full cache counted once


def test_seeds_that_draw_the_same_windows_count_them_once(tmp_path, recwarn):
    """A short corpus has few windows, and seeds share them: the same window is one instance, not two."""
    a = write_run(tmp_path / "a", nll("full", None, FULL) + nll("zsmerge", 0.05, [2.5, 3.5, 1.5]))
    b = write_run(tmp_path / "b", nll("full", None, FULL) + nll("zsmerge", 0.05, [2.5, 3.5, 1.5]), seed=6)
    assert "| zsmerge | +0.500 [3] |" in compare_markdown(pool_runs([a, b]))
    assert not recwarn.list and not pool_runs([a, b]).conflicts


def test_memory_modes_and_budgets_are_kept_apart(tmp_path):
    a = write_run(tmp_path / "a", nll("full", None, FULL) + nll("zsmerge", 0.05, [2.5, 3.5, 1.5])
                  + nll("zsmerge", 0.2, [2.1, 3.1, 1.1]))
    b = write_run(tmp_path / "b", nll("full", None, FULL) + nll("zsmerge", 0.05, [3.0, 4.0, 2.0]), memory="budget")
    table = compare_markdown(pool_runs([a, b]))
    matched, budget = table.split("**nll, memory matched**")[1], table.split("**nll, memory budget**")[1]
    assert "| zsmerge | +1.000 [3] |" in budget.split("**")[0]
    assert "| zsmerge | +0.500 [3] | +0.100 [3] |" in matched


def test_needles_are_counted(tmp_path):
    def needle(label, budget, exact):
        return [{"task": "needle-aware", "label": label, "budget": budget, "instance": i,
                 "values": {"exact": float(e), "partial": 0.0}, "info": {}} for i, e in enumerate(exact)]

    run = write_run(tmp_path / "a", needle("full", None, [1, 1, 1]) + needle("zsmerge", 0.1, [1, 1, 0])
                    + needle("snapkv", 0.1, [0, 1, 0]))
    table = compare_markdown(pool_runs([run]), against="snapkv", tasks=["needle"])
    assert "| zsmerge | 2/3 (+1 of 3) |" in table and "| snapkv | 1/3 |" in table
    assert "full cache 3/3" in table


def test_needles_by_kind_pool_apart_with_the_full_cache_of_their_kind(tmp_path, capsys):
    def needle(label, budget, exact, kinds="ppm"):
        kind = {"p": "passkey", "m": "multikey"}
        return [{"task": "needle-agnostic", "label": label, "budget": budget, "instance": i,
                 "values": {"exact": float(e), "partial": 0.0}, "info": {"kind": kind[k]}}
                for i, (e, k) in enumerate(zip(exact, kinds))]

    # Two seeds, instances 0-1 passkeys and 2 a multikey: the full cache answers 5 of 6, zsmerge 3, snapkv 1.
    a = write_run(tmp_path / "a", needle("full", None, [1, 1, 1]) + needle("zsmerge", 0.2, [1, 1, 0])
                  + needle("snapkv", 0.2, [0, 1, 0]))
    b = write_run(tmp_path / "b", needle("full", None, [1, 0, 1]) + needle("zsmerge", 0.2, [1, 0, 0])
                  + needle("snapkv", 0.2, [0, 0, 0]), seed=6)
    table = compare_markdown(pool_runs([a, b], by_kind=True), against="snapkv")
    passkey = table.split("**needle-agnostic:passkey, memory matched**")[1].split("**")[0]
    multikey = table.split("**needle-agnostic:multikey, memory matched**")[1]
    assert "full cache 3/4" in passkey and "| zsmerge | 3/4 (+2 of 4) |" in passkey and "| snapkv | 1/4 |" in passkey
    assert "full cache 2/2" in multikey and "| zsmerge | 0/2 (+0 of 2) |" in multikey
    assert "| zsmerge | 3/6 (+2 of 6) |" in compare_markdown(pool_runs([a, b]), against="snapkv")  # pooled kinds
    assert main(["compare", str(a), "--by-kind", "--tasks", "needle-agnostic"]) == 0
    assert "**needle-agnostic:multikey, memory matched**" in capsys.readouterr().out
    records = json.loads((a / "results.json").read_text())["records"]
    records[0]["info"] = {}
    c = write_run(tmp_path / "c", records)
    with pytest.raises(KvzooError, match="a needle record without its kind"):
        pool_runs([c], by_kind=True)


def test_a_record_that_differs_between_runs_is_reported_and_the_first_kept(tmp_path, capsys):
    a = write_run(tmp_path / "a", nll("full", None, FULL) + nll("zsmerge", 0.05, [2.5, 3.5, 1.5]))
    b = write_run(tmp_path / "b", nll("full", None, [2.0, 3.0, 1.25]))
    assert main(["compare", str(a), str(b)]) == 0
    out, err = capsys.readouterr()
    assert f"kvzoo: warning: full (nll): 1 instance differ between {a} and {b}" in err
    assert "| zsmerge | +0.500 [3] |" in out  # against a's full cache
    with pytest.warns(KvzooWarning, match="largest difference 0.25"):
        run_compare_command(argparse.Namespace(runs=[a, b], against=None, tasks=None, rename=[], by_kind=False))


def test_a_method_recorded_under_another_label_pools_when_renamed(tmp_path, capsys):
    # Run a wrote today's default out as its spec; run b (another seed, here other windows) as "zigzag".
    spec = "zigzag:window_size=32,pooling=avg"
    a = write_run(tmp_path / "a", nll("full", None, FULL) + nll(spec, 0.05, [2.5, 3.5, 1.5]))
    b = write_run(tmp_path / "b", nll("full", None, FULL) + nll("zigzag", 0.05, [2.0, 3.0, 1.0]), context_len=1024)
    assert main(["compare", str(a), str(b)]) == 0
    assert "| zigzag | +0.000 [3] |" in capsys.readouterr().out  # two rows without the rename
    assert main(["compare", str(a), str(b), "--rename", spec, "zigzag"]) == 0
    out = capsys.readouterr().out
    assert "| zigzag | +0.250 [6] |" in out and spec not in out
    assert main(["compare", str(a), "--rename", "zigzag:pooling=max", "zigzag"]) == 2
    assert "--rename: no run holds a method labelled 'zigzag:pooling=max'" in capsys.readouterr().err


def test_bad_runs_and_arguments_are_named(tmp_path, capsys):
    with pytest.raises(KvzooError, match=f"{tmp_path / 'nothing'}: no such results file"):
        pool_runs([tmp_path / "nothing"])
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "results.json").write_text(json.dumps({"kind": "bench", "rows": []}))
    with pytest.raises(KvzooError, match=r"results.json: not the results of `kvzoo eval` \(kind 'bench'"):
        pool_runs([bench])
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(KvzooError, match="broken.json: not a readable results.json"):
        pool_runs([broken])
    run = write_run(tmp_path / "a", nll("full", None, FULL) + nll("zsmerge", 0.05, [2.5, 3.5, 1.5]))
    assert main(["compare", str(run), "--against", "h2o"]) == 2
    assert "--against 'h2o': no records of that method in the runs; they have zsmerge" in capsys.readouterr().err
    assert main(["compare", str(run), "--tasks", "agreement"]) == 2
    assert "no compressed-method records to compare for tasks agreement; the runs have nll" in capsys.readouterr().err


def test_needles_placed_by_sentence_are_other_instances(tmp_path):
    def needle(label, budget, exact):
        return [{"task": "needle-agnostic", "label": label, "budget": budget, "instance": i,
                 "values": {"exact": float(e)}, "info": {}} for i, e in enumerate(exact)]

    # the same seed's instance numbers: by token (a run from before the choice, no key) and by sentence
    token = write_run(tmp_path / "token", needle("full", None, [1, 1]) + needle("zsmerge", 0.1, [1, 0]))
    sentence = write_run(tmp_path / "sentence", needle("full", None, [1, 0]) + needle("zsmerge", 0.1, [0, 0]),
                         needle_placement="sentence")
    table = compare_markdown(pool_runs([token, sentence]), tasks=["needle"])
    assert "| zsmerge | 1/4 |" in table and "full cache 3/4" in table


def test_needles_pool_across_repeat_counts_and_malformed_records_are_named(tmp_path):
    def needle(label, budget, exact):
        return [{"task": "needle-aware", "label": label, "budget": budget, "instance": i,
                 "values": {"exact": float(e)}, "info": {}} for i, e in enumerate(exact)]

    one = write_run(tmp_path / "one", needle("full", None, [1, 0]) + needle("snapkv", 0.1, [1, 0]))
    two = write_run(tmp_path / "two", needle("full", None, [1, 0, 1, 1]) + needle("h2o", 0.1, [0, 0, 1, 1]),
                    needle_repeats=2)  # its first two instances are run one's (repeats append instances)
    table = compare_markdown(pool_runs([one, two]), against="h2o")
    assert "| snapkv | 1/2 (+1 of 2) |" in table and "full cache 3/4" in table
    bad = write_run(tmp_path / "bad", [{"task": "nll", "label": "h2o", "budget": "5%", "instance": 0,
                                        "values": {"nll": 1.0}}])
    with pytest.raises(KvzooError, match=r"bad/results.json: a malformed record .* \(budget must be a number"):
        pool_runs([bad])
    empty = write_run(tmp_path / "empty", [{"task": "nll", "label": "h2o", "budget": 0.1, "instance": 0,
                                            "values": {}}])
    with pytest.raises(KvzooError, match=r"empty/results.json: a malformed record .* \(no number 'nll'"):
        pool_runs([empty])


def test_runs_of_different_models_are_refused_and_full_is_not_a_method(tmp_path):
    a = write_run(tmp_path / "a", nll("full", None, FULL) + nll("zsmerge", 0.05, [2.5, 3.5, 1.5]))
    b = write_run(tmp_path / "b", nll("full", None, FULL), model="other/model")
    with pytest.raises(KvzooError, match=r"ran other/model in float32, .*a default in float32: compare runs of one"):
        pool_runs([a, b])
    with pytest.raises(KvzooError, match="--against full: the full cache is already every table's reference"):
        compare_markdown(pool_runs([a]), against="full")


def test_the_instance_fields_compare_reads_are_eval_config_fields():
    """A renamed EvalConfig field would read as None on both sides and pair different instances."""
    import dataclasses

    from kvzoo.eval.runner import EvalConfig

    names = {f.name for f in dataclasses.fields(EvalConfig)}
    assert set(CONFIG) <= names
