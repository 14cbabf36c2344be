"""Evaluation instances built from a token stream of natural text: continuation NLL, needle retrieval
(passkey and labelled multi-key, at stated lengths and depths) and greedy agreement with the full cache.

Everything is seeded: the same corpus, arguments and seed give the same instances.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvzoo.errors import KvzooError

if TYPE_CHECKING:
    from kvzoo.tokenizer import Tokenizer

TASKS = ("nll", "needle", "agreement", "attn_error")
NEEDLE_KINDS = ("passkey", "multikey")
# "token": a needle goes in at its depth's exact token, mid-sentence or mid-word, as passkey benchmarks plant it;
# "sentence": the cut moves back to the end of the sentence it falls in, so the needle reads as a sentence of
# the text (no seam: its first token is not made surprising by the text it interrupts).
NEEDLE_PLACEMENTS = ("token", "sentence")
SENTENCE_LOOKBACK = 256  # tokens searched before a cut for a sentence end (then after it; else the cut stays)
CODE_DIGITS = 5
_LABELS = ("red", "blue", "green", "yellow", "silver", "golden", "black", "white", "orange", "purple")


@dataclass(frozen=True)
class TextInstance:
    """A context and what follows it in the corpus (nll: teacher-forced; agreement: the context only)."""

    context: list[int]
    continuation: list[int]
    offset: int  # token offset of the context in the corpus


@dataclass(frozen=True)
class NeedleInstance:
    """A haystack of `length` tokens (question included) with the answer planted at `depth`."""

    kind: str  # "passkey" | "multikey"
    length: int  # tokens of haystack + question
    depth: float  # where the asked-for needle starts, as a fraction of the haystack
    haystack: list[int]  # context tokens, needle(s) included
    question: list[int]  # asked after the haystack
    answer: str  # the code to retrieve
    needle_start: int  # token index of the asked-for needle in the haystack

    @property
    def prompt(self) -> list[int]:
        """The query-aware layout: the question is part of the compressed prompt."""
        return self.haystack + self.question


def text_offsets(corpus_len: int, n: int, context_len: int, continuation_len: int, seed: int) -> list[int]:
    """Where the n windows of context_len + continuation_len tokens start in a corpus of corpus_len tokens, at
    seeded offsets: disjoint while the corpus has room for n disjoint windows, else drawn independently.
    Different seeds draw from the same grid of disjoint windows, so their instances can coincide (a short
    corpus has few windows: `kvzoo compare` pools runs by offset)."""
    span = context_len + continuation_len
    if corpus_len < span:
        raise KvzooError(
            f"the text has {corpus_len} tokens, fewer than one instance needs ({context_len} context + "
            f"{continuation_len} continuation); give a longer --source or a shorter --context-len"
        )
    rng = random.Random(seed)
    slots = corpus_len // span
    if slots >= n:
        return [i * span for i in sorted(rng.sample(range(slots), n))]
    return [rng.randrange(corpus_len - span + 1) for _ in range(n)]


def text_instances(corpus: list[int], n: int, context_len: int, continuation_len: int, seed: int) -> list[TextInstance]:
    """The n seeded windows of `text_offsets`, split into context and continuation."""
    span = context_len + continuation_len
    return [TextInstance(corpus[o:o + context_len], corpus[o + context_len:o + span], o)
            for o in text_offsets(len(corpus), n, context_len, continuation_len, seed)]


def needle_instances(
    tok: "Tokenizer", corpus: list[int], lengths: list[int], depths: list[float], kinds: tuple[str, ...],
    seed: int, keys: int = 4, placement: str = "token",
) -> list[NeedleInstance]:
    """One instance per (kind, length, depth): filler from the corpus at a seeded offset, the needle at
    `depth` of the haystack (moved to a sentence end with `placement` "sentence", `NEEDLE_PLACEMENTS`), a fresh
    random code per instance. multikey plants `keys` labelled codes (the asked one at `depth`, the others at
    seeded depths) and asks for one label. The placement changes only the cuts: the same seed draws the same
    filler, codes and labels."""
    if placement not in NEEDLE_PLACEMENTS:
        raise KvzooError(f"needle placement {placement!r} is not known: give one of {', '.join(NEEDLE_PLACEMENTS)}")
    rng = random.Random(seed)
    out = []
    for kind in kinds:
        if kind not in NEEDLE_KINDS:
            raise KvzooError(f"unknown needle kind {kind!r}; choose from {', '.join(NEEDLE_KINDS)}")
        for length in lengths:
            for depth in depths:
                if not 0 <= depth <= 1:
                    raise KvzooError(f"needle depth {depth!r} is not in [0, 1]")
                out.append(_needle(tok, corpus, kind, length, depth, rng, keys, placement))
    return out


def _code(rng: random.Random) -> str:
    return str(rng.randrange(10 ** (CODE_DIGITS - 1), 10**CODE_DIGITS))


def _ends_sentence(piece: str) -> bool:
    """Whether a decoded token ends a sentence or a line (what a needle can follow without a seam)."""
    return "\n" in piece or piece.rstrip().endswith((".", "!", "?"))


def sentence_cut(tok: "Tokenizer", filler: list[int], cut: int) -> int:
    """The filler index nearest before `cut` (else after it, within SENTENCE_LOOKBACK tokens each way) that
    follows a sentence end, so an insertion there starts a sentence; `cut` itself when none is near."""
    if cut == 0 or _ends_sentence(tok.decode([filler[cut - 1]])):
        return cut
    for c in range(cut - 1, max(0, cut - SENTENCE_LOOKBACK) - 1, -1):
        if c == 0 or _ends_sentence(tok.decode([filler[c - 1]])):
            return c
    for c in range(cut + 1, min(len(filler), cut + SENTENCE_LOOKBACK) + 1):
        if _ends_sentence(tok.decode([filler[c - 1]])):
            return c
    return cut


def _needle(tok: "Tokenizer", corpus: list[int], kind: str, length: int, depth: float, rng: random.Random,
            keys: int, placement: str) -> NeedleInstance:
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    if kind == "passkey":
        answer = _code(rng)
        planted = [(depth, encode(f" The secret passkey is {answer}. Remember it, {answer} is the passkey."))]
        question = encode("\n\nWhat is the secret passkey mentioned in the text above? The secret passkey is")
    else:
        labels = rng.sample(_LABELS, keys)
        codes = [_code(rng) for _ in labels]
        answer, asked = codes[0], labels[0]
        other_depths = [rng.random() for _ in labels[1:]]
        planted = [(depth, encode(f" The passkey for the {asked} door is {answer}."))] + [
            (d, encode(f" The passkey for the {label} door is {code}."))
            for d, label, code in zip(other_depths, labels[1:], codes[1:])
        ]
        question = encode(f"\n\nWhat is the passkey for the {asked} door? The passkey for the {asked} door is")
    filler_len = length - len(question) - sum(len(ids) for _, ids in planted)
    if filler_len < 1:
        raise KvzooError(f"needle length {length} is too short for the needle and the question")
    if len(corpus) < filler_len:
        raise KvzooError(f"the text has {len(corpus)} tokens, fewer than a {length}-token haystack needs")
    start = rng.randrange(len(corpus) - filler_len + 1)
    filler = corpus[start:start + filler_len]
    # Insert from the deepest needle up, so each cut point refers to the filler before the insertions.
    haystack, asked_start = list(filler), 0
    at = (lambda c: sentence_cut(tok, filler, c)) if placement == "sentence" else (lambda c: c)  # noqa: E731
    cuts = sorted(((at(round(d * filler_len)), i, ids) for i, (d, ids) in enumerate(planted)), reverse=True)
    for cut, i, ids in cuts:
        haystack[cut:cut] = ids
    for cut, i, ids in sorted(cuts):  # the asked needle's final index: shifted by the needles before it
        if i == 0:
            asked_start += cut
            break
        asked_start += len(ids)
    return NeedleInstance(kind, length, depth, haystack, question, answer, asked_start)
