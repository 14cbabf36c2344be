"""The main job on a real model: a long document with planted facts, compressed once per method, saved, and
asked every question from the saved caches. One screen shows each method's KV bytes, its one prefill, how many
answers it got right, and the time to first token from the stored cache vs prefilling the document again."""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# (what is asked about, the planted value). Invented, so the model cannot know them beforehand.
FACTS = [
    ("the password of the Harbour Archive", "amber-falcon-42"),
    ("the year the Vellmar bridge was finished", "1887"),
    ("the colour of Captain Oduya's boat", "turquoise"),
    ("the number of steps up Ketterby tower", "413"),
    ("the name of the baker in Lindholm", "Rosalind"),
    ("the city where the glass museum stands", "Tarnowice"),
]

_SUBJECTS = ["The river", "An old farmer", "The village council", "A travelling merchant", "The school",
             "The library", "A young painter", "The mountain road", "The harbour", "A quiet scholar"]
_VERBS = ["described", "remembered", "visited", "rebuilt", "noticed", "painted", "measured", "discussed"]
_OBJECTS = ["the autumn market", "the stone walls near the mill", "a long winter", "the northern fields",
            "the lantern festival", "the new railway line", "the orchard behind the church", "the spring floods"]
_TAILS = ["before the first snow.", "while the bells rang.", "with great care.", "as the evening fell.",
          "for the third time that year.", "without telling anyone.", "under a grey sky.", "in the late morning."]


def build_document(target_tokens: int, count_tokens, n_facts: int, seed: int = 0) -> str:  # noqa: ANN001
    """Filler prose of about `target_tokens` tokens with `n_facts` facts planted at evenly spaced depths."""
    rng = random.Random(seed)
    sentences: list[str] = []
    # About 12 tokens per filler sentence; measure exactly at the end.
    while len(sentences) * 12 < target_tokens:
        sentences.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}")
    for i, (subject, value) in enumerate(FACTS[:n_facts]):
        depth = int(len(sentences) * (i + 0.5) / n_facts)
        sentences.insert(depth, f"Remember this: {subject} is {value}.")
    text = " ".join(sentences)
    while count_tokens(text) > target_tokens and len(sentences) > n_facts:
        sentences.pop(-2)
        text = " ".join(sentences)
    return text


QUESTION = "According to the text above, what is {subject}? Answer with the value only."
DEFAULT_METHODS = ("full", "zsmerge:budget=0.8", "zsmerge:budget=0.5", "tova:budget=0.5", "streamingllm:budget=0.5",
                   "snapkv:budget=0.5")


@dataclass(frozen=True)
class MethodResult:
    spec: str
    cache_bytes: int
    prefill_seconds: float
    answers: list[str]
    correct: list[bool]
    ttft_from_cache: float  # median over the questions
    ttft_re_prefill: float  # the first question, prefilling document + question in one prompt


def run_demo(model: str | None = None, dtype: str | None = None, methods: tuple[str, ...] = DEFAULT_METHODS,
             questions: int = len(FACTS), doc_tokens: int = 1000, max_new_tokens: int = 16) -> list[MethodResult]:
    import kvzoo
    from kvzoo.cache.registry import parse_compression
    from kvzoo.conversation import DocumentPrompt
    from kvzoo.default_model import ensure_default_model
    from kvzoo.generate import generate_ids, store_document

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log("loading the model ...")
    m = kvzoo.load(model if model is not None else ensure_default_model(progress=True), dtype=dtype)
    tok = m.require_tokenizer()
    facts = FACTS[:max(1, min(questions, len(FACTS)))]
    doc = build_document(doc_tokens, lambda t: len(tok.encode(t, add_special_tokens=False)), len(facts))
    prompt = DocumentPrompt.render(tok, doc)
    doc_ids = tok.encode(prompt.prefix, add_special_tokens=False)
    asks = [tok.encode(prompt.question(QUESTION.format(subject=s)), add_special_tokens=False) for s, _ in facts]
    print(f"A {len(doc_ids)}-token document with {len(facts)} planted facts, {type(m).__name__} with "
          f"{sum(p.numel() for p in m.parameters()) / 1e6:.0f}M parameters. Each method prefills the document "
          "once,\nsaves the compressed cache to disk, and answers every question from the saved file.\n", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="kvzoo-demo-") as tmp:
        for i, spec in enumerate(methods):
            method = parse_compression(spec)
            log(f"{spec}: prefilling the document once ...")
            path = Path(tmp) / f"method{i}.kvc"
            prefill_s, nbytes = store_document(m, doc_ids, path, method)
            stored = kvzoo.load_cache(path, m)
            answers, ttfts = [], []
            for ids in asks:
                out = generate_ids(m, ids, max_new_tokens=max_new_tokens, cache=stored)
                answers.append(tok.decode(out.token_ids[0]).strip())
                ttfts.append(out.first_token_seconds)
            log(f"{spec}: the first question again, re-prefilling the document with it ...")
            again = generate_ids(m, doc_ids + asks[0], max_new_tokens=1, compression=method)
            correct = [value.lower() in a.lower() for (_, value), a in zip(facts, answers)]
            results.append(MethodResult(spec, nbytes, prefill_s, answers, correct, statistics.median(ttfts),
                                        again.first_token_seconds))
    _print_results(facts, results)
    return results


def _print_results(facts: list[tuple[str, str]], results: list[MethodResult]) -> None:
    width = max(len("method"), *(len(r.spec) for r in results)) + 2
    marks = max(len(facts), len("answers"))
    print(f"{'method':<{width}}{'KV cache':>12}{'prefill s':>11}  {'answers':<{marks}}{'correct':>8}"
          f"{'first token s: from cache':>27}{'re-prefill':>12}")
    for r in results:
        answers = "".join("✓" if ok else "✗" for ok in r.correct)
        print(f"{r.spec:<{width}}{r.cache_bytes / 2**20:>8.2f} MiB{r.prefill_seconds:>11.1f}  {answers:<{marks}}"
              f"{sum(r.correct):>5}/{len(r.correct):<2}{r.ttft_from_cache:>27.2f}{r.ttft_re_prefill:>12.2f}")
    print(f"\nanswers: one mark per question, ✓ when the answer contains the planted value; in order: "
          f"{', '.join(value for _, value in facts)}")
    full = next((r for r in results if r.spec == "full"), None)
    if full is not None:
        print("Answers with the full cache:")
        for (subject, _), answer in zip(facts, full.answers):
            print(f"  {subject}? {answer!r}")
