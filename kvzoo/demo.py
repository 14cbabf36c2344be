"""The main job on a real model: questions about facts planted in a long document (~6k tokens, built offline),
answered with the full cache and with a compressed cache, side by side."""

from __future__ import annotations

import random
import sys
import time

from kvzoo.generate import GenerationOutput

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


def _answer(model, prompt: str, compression, max_new_tokens: int) -> tuple[str, GenerationOutput]:  # noqa: ANN001
    from kvzoo.generate import generate_ids

    tok = model.require_tokenizer()
    out = generate_ids(model, tok.encode(prompt, add_special_tokens=False), max_new_tokens=max_new_tokens,
                       compression=compression)
    return tok.decode(out.token_ids[0]).strip(), out


def run_demo(model: str | None = None, dtype: str | None = None, compression: str = "zsmerge:budget=0.05",
             questions: int = 4, doc_tokens: int = 6000, max_new_tokens: int = 24) -> None:
    import kvzoo
    from kvzoo.cache.registry import parse_compression
    from kvzoo.default_model import ensure_default_model

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log("loading the model ...")
    m = kvzoo.load(model if model is not None else ensure_default_model(progress=True), dtype=dtype)
    tok = m.require_tokenizer()
    questions = max(1, min(questions, len(FACTS)))
    doc = build_document(doc_tokens, lambda t: len(tok.encode(t, add_special_tokens=False)), questions)
    methods = [("full cache", kvzoo.FullCache()), (compression, parse_compression(compression))]
    print(f"A {len(tok.encode(doc, add_special_tokens=False))}-token document with {questions} planted facts; "
          f"{type(m).__name__} with {sum(p.numel() for p in m.parameters()) / 1e6:.0f}M parameters.\n", flush=True)
    totals = {name: [0, 0.0, 0.0, 0] for name, _ in methods}  # correct, prefill s, decode tok/s, cache bytes
    for q, (subject, value) in enumerate(FACTS[:questions]):
        user = f"{doc}\n\nAccording to the text above, what is {subject}? Answer with the value only."
        prompt = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
        print(f"Q{q + 1}: what is {subject}?   (planted: {value})", flush=True)
        for name, method in methods:
            answer, out = _answer(m, prompt, method, max_new_tokens)
            correct = value.lower() in answer.lower()
            stats = totals[name]
            stats[0] += correct
            stats[1] += out.prefill_seconds
            stats[2] += out.decode_tokens_per_second
            stats[3] = max(stats[3], out.cache.nbytes())
            print(f"   {'✓' if correct else '✗'} {name:<24} {answer!r}", flush=True)
    print(f"\n{'':<26}{'KV cache':>12}{'correct':>9}{'prefill s':>11}{'decode tok/s':>14}")
    for name, (correct, prefill, tps, nbytes) in totals.items():
        print(f"{name:<26}{nbytes / 2**20:>8.2f} MiB{correct:>6}/{questions}{prefill / questions:>11.1f}"
              f"{tps / questions:>14.1f}")
