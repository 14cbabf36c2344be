"""Compactor (Chari & Van Durme, "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate
Leverage Scores", arXiv 2507.08143), as kvpress' CompactorPress runs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvzoo.cache.base import PrefillOnlyMethod, ScoredSelection
from kvzoo.cache.budgets import Budget, check_budget, check_choice, resolve_budget
from kvzoo.cache.scoring import COMPACTOR_BLOCK, compactor_scores, pool_by_position, zscore
from kvzoo.cache.selection import recent_mask, sink_mask
from kvzoo.cache.slots import LayerSlots
from kvzoo.errors import KvzooError

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk
    from kvzoo.config import ModelConfig


SINKS = 8  # the first tokens always kept (attention sinks), as the official code
# A document's rank is max-pooled over SPAN positions (not Compactor's): each token takes the largest score of the
# LEAD_IN tokens after it and of the SPAN - 1 - LEAD_IN before it, so a token kept for its score keeps the phrase
# that leads to it and the tokens after it. A question asked later copies a span: its digits follow one another
# (at a few percent kept the score picked a code's last digits alone; tools/RESULTS.md, "Session 36"), and it is
# found through the words before it: the question is read over the compressed document, and a code kept whole in
# every layer is not answered without its lead-in (seed 35 instance 4 at 20% kept writes " a passkey that is
# passed to"; with " The secret passkey is" kept in every layer, or the sentence in layers 15-29 alone, it writes
# the code; "Session 40"). On seeds 33-36 (96 needles asked after compression, the full cache 71, equal memory)
# ZSMerge 25 / 41 / 56 at 5 / 10 / 20% kept against 26 / 35 / 51 with the centred 5, ZigZagKV 16 / 37 / 53
# against 18 / 33 / 49, KVMerger level; it costs a code's digits where lead-ins take their slots, and the demo's
# first fact (RESULTS).
SPAN = 9
LEAD_IN = 6


def dropped_fraction(kept: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1] the fraction of each prompt not kept, from slots kept [B] and prompt lengths [B]: Compactor's
    default leverage weight (the smaller the budget, the more a token's uniqueness counts)."""
    return (1.0 - kept.float() / prompt_len.clamp(min=1).float()).clamp(min=0.0)[:, None, None]


def sinks_then_compactor(chunk: "PrefillChunk", kept: torch.Tensor, prompt_len: torch.Tensor,
                         span: int = SPAN, lead_in: int | None = LEAD_IN) -> torch.Tensor:
    """[B, Hkv, S] a query-agnostic rank of the candidates: the first `SINKS` positions first (+inf), then
    Compactor's score blended by the fraction of each prompt not kept (`dropped_fraction` of kept [B] and
    prompt_len [B]), max-pooled over the `span` positions from span - 1 - `lead_in` before each of the chunk's
    tokens to `lead_in` after it (`SPAN`, `LEAD_IN`; span 1: none; lead_in None: centred).
    Candidates before the chunk (slots in use) keep their stored score and lend it to no neighbour. What ZSMerge,
    KVMerger and ZigZagKV rank a document stored for later questions by."""
    rank = compactor_scores(chunk, dropped_fraction(kept, prompt_len), span=span, ahead=lead_in)
    return rank.masked_fill(sink_mask(chunk, SINKS), float("inf"))


# A surprising token lends its surprisal to the SURPRISE_LEND tokens after it: what a document says that the model
# could not guess (a name, a label) and the words that follow it (the fact's value).
SURPRISE_LEND = 8
# How the lent surprisal is pooled over a token and the SURPRISE_LEND before it (`lent_surprisal`): "max", the
# largest (a surprising word lends itself to what follows); "max+mean", that plus their mean, each z-scored, so a
# phrase surprising throughout (a fact stated for the first time: "The secret passkey is 78311", each word 2-12
# nats) outranks a lone odd word in ordinary prose (" descriptor", 15 nats, after 1-nat words); "max+mean+run"
# adds the z-scored run lend: the least surprisal of the most surprising run of RUN tokens through a position (a
# min-pool, then a max-pool). A code's digits are not surprising one by one (2-3 nats each, a prose token's mean),
# but none of them can be guessed, while a run of prose holds a guessable word ("the", "key" after " pass"): the
# run ranks a fact's value (a code, a number, an identifier) by itself, and so a fact stated in the form of an
# earlier one (a table, a list of settings), whose repeated words lend it little, still keeps its value
# (tools/RESULTS.md, "Session 46"). RUN 4: shorter than the eval's 5-digit codes; with 3 a probe of one
# multi-key haystack ranked its later codes lower (prose has more unguessable 3-token runs). Not tuned further.
SURPRISAL_LENDS = ("max", "max+mean", "max+mean+run")
RUN = 4


def lent_surprisal(surprisal: torch.Tensor, prompt_len: torch.Tensor, lend: str = "max") -> torch.Tensor:
    """[B, n_pos] what each position is lent (`SURPRISAL_LENDS`): "max", the largest surprisal among itself and
    the SURPRISE_LEND positions before it, z-scored over each sequence's prompt; "max+mean" adds the z-scored
    mean of the same positions; "max+mean+run" also the z-scored largest, over the runs of RUN positions that
    hold it, of a run's least surprisal (surprisal [B, n_pos] by position, prompt_len [B])."""
    b, n_pos = surprisal.shape
    pos = torch.arange(n_pos, device=surprisal.device).expand(b, n_pos)
    valid = pos < prompt_len[:, None]

    def pooled(values: torch.Tensor, kernel: int, mode: str, ahead: int) -> torch.Tensor:  # [B, n_pos]
        return pool_by_position(values[:, None], pos[:, None], valid[:, None], kernel, mode, ahead)[:, 0]

    def z(values: torch.Tensor) -> torch.Tensor:
        return zscore(values[:, None], valid[:, None])[:, 0]

    def window(mode: str) -> torch.Tensor:  # over a position and the SURPRISE_LEND before it
        return z(pooled(surprisal, SURPRISE_LEND + 1, mode, 0))

    terms = lend.split("+")
    total = window("max")
    if "mean" in terms:
        total = total + window("avg")
    if "run" in terms:
        least_of_run = -pooled(-surprisal, RUN, "max", 0)  # the least of the run ending at each position
        total = total + z(pooled(least_of_run, RUN, "max", RUN - 1))  # the best run through it
    return total


def unpooled_compactor(chunk: "PrefillChunk", kept: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, S] Compactor's score as `sinks_then_compactor` blends it, neither pooled nor with the sinks: what
    `sinks_then_compactor_and_surprisal` adds the prompt's surprisal to once the whole prompt is in."""
    return compactor_scores(chunk, dropped_fraction(kept, prompt_len))


def check_surprisal_settings(config: object, owner: str) -> None:
    """Refuse a `config.stored_surprisal` weight that is not a finite number >= 0, or a
    `config.stored_surprisal_lend` not in SURPRISAL_LENDS, naming the method `owner`."""
    weight = getattr(config, "stored_surprisal")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise KvzooError(f"{owner}: stored_surprisal must be a number >= 0 (0: off), got {weight!r}")
    check_choice(config, owner, "stored_surprisal_lend", SURPRISAL_LENDS)


def sinks_then_compactor_and_surprisal(own: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
                                       surprisal: torch.Tensor, prompt_len: torch.Tensor, weight: float,
                                       lend: str = "max") -> torch.Tensor:
    """[B, Hkv, S] the stored rank with the prompt's surprisal: own (Compactor's unpooled score of the candidates
    at positions pos [B, Hkv, S], valid where a candidate is a prompt token) + weight * `lent_surprisal` (pooled
    by `lend`), then max-pooled over SPAN with LEAD_IN as `sinks_then_compactor`, the first SINKS positions
    first (+inf)."""
    lent = lent_surprisal(surprisal, prompt_len, lend)  # [B, n_pos]
    at = lent[:, None, :].expand(-1, pos.shape[1], -1).gather(-1, pos.clamp(min=0, max=lent.shape[-1] - 1))
    rank = pool_by_position((own + weight * at).masked_fill(~valid, float("-inf")), pos, valid, SPAN, "max",
                            LEAD_IN)
    return rank.masked_fill(valid & (pos < SINKS), float("inf"))


def held_rank_with_surprisal(own: torch.Tensor, slots: LayerSlots, surprisal: torch.Tensor | None,
                             weight: float, lend: str = "max") -> torch.Tensor:
    """[B, Hkv, C] `sinks_then_compactor_and_surprisal` of a layer holding the whole prompt at end_prefill: own
    [B, Hkv, C] Compactor's unpooled score of its slots, surprisal `KVCache.prompt_surprisal`."""
    assert surprisal is not None  # the model computes it for a method that reads it (reads_prompt_surprisal)
    return sinks_then_compactor_and_surprisal(own, slots.pos, slots.filled & (slots.pos >= 0), surprisal,
                                              slots.state["prompt_len"], weight, lend)


@dataclass
class Compactor(ScoredSelection, PrefillOnlyMethod):
    """Prefill-only selection by a query-agnostic score: what the text around a token reads from it, plus how
    unlike every other key it is (`scoring.compactor_scores`):

        score = zscore(non-causal attention within `block`-position blocks * |v|, avg-pooled over `kernel_size`)
                + blend * zscore(leverage of the pre-RoPE keys)

    The attention logits are q.k * `scale` (1.0: unscaled, as the official code and kvpress; sharper than the
    model's 1/sqrt(D)), `blend` defaults to the fraction of the prompt dropped (kvpress' heuristic: the
    smaller the budget, the more a token's uniqueness counts), and the first `sinks` and last `recent`
    tokens are always kept. Leverage is exact (ridge) rather than kvpress' Gaussian sketch. Nothing reads the
    question, so a document compressed once serves any later question (`kvzoo.conversation`).
    Budget rule (`budgets.resolve_budget`): at least `sinks + recent` slots, at most the prompt; decode appends
    up to `decode_cap` generated tokens (None: all).
    """

    budget: Budget = 0.2
    sinks: int = SINKS
    recent: int = 4
    block: int = COMPACTOR_BLOCK
    scale: float = 1.0
    blend: float | None = None
    kernel_size: int = 3
    decode_cap: int | None = None

    def __post_init__(self) -> None:
        check_budget(self.budget, "Compactor")
        for name, least in (("sinks", 0), ("recent", 0), ("block", 1), ("kernel_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise KvzooError(f"Compactor: {name} must be an integer >= {least}, got {value!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or self.scale <= 0:
            raise KvzooError(f"Compactor: scale must be a number > 0, got {self.scale!r}")
        if self.blend is not None and (isinstance(self.blend, bool) or not isinstance(self.blend, (int, float))
                                       or self.blend < 0):
            raise KvzooError(f"Compactor: blend must be None or a number >= 0, got {self.blend!r}")
        self.check_decode_cap()

    def prefill_budgets(self, cfg: "ModelConfig", prompt_lens: list[int]) -> list[list[int]]:
        minimum = max(1, self.sinks + self.recent)
        return [[resolve_budget(self.budget, n, minimum=minimum, cap_at_prompt=True) for n in prompt_lens]] \
            * cfg.num_layers

    def _blend(self, slots: LayerSlots) -> torch.Tensor | float:
        """The leverage weight: `blend`, or the fraction of each sequence's prompt that is dropped [B, 1, 1]."""
        if self.blend is not None:
            return float(self.blend)
        return dropped_fraction(slots.state["prefill_budget"], slots.state["prompt_len"])

    def prefill_scores(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor:
        return compactor_scores(chunk, self._blend(slots), self.block, float(self.scale), self.kernel_size)

    def protected(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor:
        return recent_mask(chunk, self.recent) | sink_mask(chunk, self.sinks)

    def prefill_keep(self, slots: LayerSlots) -> torch.Tensor:
        return slots.state["prefill_budget"]
