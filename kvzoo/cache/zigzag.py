"""ZigZagKV (Zhong et al., "ZigZagKV: Dynamic KV Cache Compression for Long-context Modeling based on Layer
Uncertainty", arXiv 2412.09036, COLING 2025). Specification: METHODS.md section 3.

SnapKV selection (observation window + top tokens by pooled window attention), with per-layer budgets from
each layer's *uncertainty*: a layer whose attention is diffuse needs more tokens to keep most of its
attention mass, so it gets more of the total.

- MBA_{l,h}: the fewest keys holding `tau` of query head h's observation-window attention mass
  (`budgets.min_budget_attention`); LMBA_l: its mean over the layer's query heads. The default replaces
  it by LMBO_l, the same mean of the fewest keys that keep head h's window output within 1 - tau
  (`uncertainty`, `budgets.min_budget_output`).
- B_l = B_bound + (B_avg - B_bound) * L * LMBA_l / sum_k LMBA_k (`budgets.zigzag_budgets`), so the layers
  share exactly L * B_avg slots per KV head and none gets fewer than B_bound = bound_ratio * B_avg.

The allocation needs every layer's uncertainty, so compression waits for the end of prefill: `make_cache` gives
every layer room for the whole prompt (plus decode headroom), `compress_prefill` keeps the whole prompt and
records the layer's window scores and uncertainty, and `end_prefill` allocates, selects, and reallocates each
layer's tensors down to its own capacity (max over the batch of B_l, plus headroom), so `cache.nbytes()` is
the compressed size. Deferring is exact: selection changes no prefill activation (METHODS.md 3.2). The cost
is peak memory: the full prompt's cache exists until the end of prefill. For the same reason
`supports_chunked_prefill = False` (generation with `prefill_chunk` is refused); a prompt fed in several
chunks anyway raises in `compress_prefill`. A later prompt to an allocated cache (`generate(..., cache=)`) is
appended whole, as every prefill-only method's (`CompressionMethod.take_prefill_chunk`).

Ambiguities (METHODS.md 3.6) resolved as recommended:
- LMBA is computed online, per input and per sequence of the batch, from the same observation window used
  for selection (window attention summed over its queries, per query head, unpooled); allocation is deferred
  to the end of prefill.
- B_bound = floor(bound_ratio * B_avg) (kvpress port's second version: 0.2). A layer's budget is clamped to
  [window, prompt length]; when the window exceeds B_bound the formula's floor is raised to the window, and
  the surplus of layers clamped at the prompt length is redistributed with the same formula over the other
  layers, until none is clamped. Integers by largest remainder: sum_l B_l = L * B_avg exactly.
- LMBO, which the paper only analyses, is the default allocation rule (`uncertainty`, below); LMBA the paper's.
- B_avg = budget (ratio of each sequence's own prompt, or tokens), at least the window; B_avg >= prompt
  length keeps the whole prompt. Budgets are per sequence of the batch; every KV head of a layer keeps the
  same number of tokens (selection itself is per KV head, GQA scores = mean over the group).
- Observation window and pooling "as SnapKV" (METHODS.md 3.3 leaves both open): SnapKV's own code's window
  of 32 queries, average-pooled over 5 positions (the paper's LongBench runs, via KVCache-Factory, used 8
  queries and max-pool 7: `ZigZagKV.paper()`).
Defaults: budget 0.2 (the paper's "~20% of the full KV"), tau 0.9, bound_ratio 0.2 (kvpress port); window
32, avg-pool 5 (SnapKV's) over a token and the 4 before it (`pool_ahead=0`; SnapKV's is centred), so a token
the window reads lends its score to the tokens after it, where a question's answer is (session 20; see
ZSMerge's "Measured effect"): seeds 5 and 6 (48 needles), asked with the context 6 / 9 / 20 at 5 / 10 / 20%
kept against 7 / 6 / 11 centred (SnapKV 6 / 7 / 12), asked after 7 / 7 / 7 against 8 / 7 / 7; Rust book
(seeds 1 and 2) 11 / 11 / 23 against 8 / 8 / 14 (SnapKV 8 / 9 / 11), after 7 / 8 / 11 against 8 / 8 / 10;
continuation NLL level to lower (seed 9: -0.002 +- 0.012 / -0.004 +- 0.011 / -0.007 +- 0.005; Rust
book seed 1: -0.011 +- 0.007 / -0.013 +- 0.008 / -0.006 +- 0.004). Decode appends like SnapKV.
Not the paper's (`ZigZagKV.paper()` has none of them): the pooling over the tokens before a read one (above);
a layer's uncertainty is the budget that keeps its window's attention *output* within 1 - tau (the paper's
LMBO, `uncertainty="output"`), not the one that keeps tau of its attention mass (LMBA); a layer ranks
its tokens by the larger of their share of the accumulated and of the window's attention
(`rank="attention_shares"`), not by the window's alone, and by a third share, of the attention of a
question's last 8 queries, max-pooled over a token and the 6 before it, as KVMerger reads it (ZSMerge: the 8
before it)
(`question_window`; the observation window's 32 queries still set the allocation and the tokens always
kept); and a document stored for later questions ranks them by Compactor's query-agnostic score
(`stored_rank`). See the fields' comments for why and what each
measured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from kvzoo.cache.budgets import Budget, check_choice, check_counts, check_pooling, zigzag_budgets
from kvzoo.cache.compactor import (check_surprisal_settings, held_rank_with_surprisal, sinks_then_compactor,
                                   unpooled_compactor)
from kvzoo.cache.layer_uncertainty import BOUND_RATIO, TAU, WINDOW, attention_uncertainty, output_uncertainty
from kvzoo.cache.scoring import accumulated_scores, attention_shares, share_of, window_scores
from kvzoo.cache.selection import (cross_layer_rank, keep_top, recent_mask, shrink_slots, slot_candidates,
                                   widest_shares)
from kvzoo.cache.slots import KVCache, LayerSlots
from kvzoo.cache.snapkv import WindowSelection
from kvzoo.errors import KvzooError

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk
    from kvzoo.config import ModelConfig


RANKS = ("window", "attention_shares", "compactor")  # see ZigZagKV.rank
UNCERTAINTIES = ("attention", "output")  # see ZigZagKV.uncertainty


@dataclass
class ZigZagKV(WindowSelection):
    """Observation-window selection with layer budgets from layer uncertainty (LMBO, or the paper's LMBA);
    see the module doc.
    Budget rule: B_avg is at least `window_size` slots and at most the prompt (a prompt no longer than it is
    kept whole in every layer)."""

    budget: Budget = 0.2  # B_avg: average slots per KV head over the layers
    # SnapKV's own observation window: its 32 queries average out what one sentence reads, which the paper's
    # LongBench runs' 8 (max-pool 7, `ZigZagKV.paper()`) do not (see `rank`).
    window_size: int = WINDOW
    kernel_size: int = 5
    pooling: str = "avg"
    pool_ahead: int | None = 0  # SnapKV's: None, centred (see the module doc)
    tau: float = TAU  # attention mass MBA must retain
    bound_ratio: float = BOUND_RATIO  # B_bound = bound_ratio * B_avg (1.0: every layer B_avg, uniform)
    # Rank each layer's tokens by the larger of their share of that head's (pooled) window attention and the
    # largest share any head of any layer gives them: a token one layer's retrieval head reads is kept in
    # every layer, since an answer copied from the context is read through all of them (the question finds
    # it in a few late layers only). Not the paper's, and not the default: with uniform budgets
    # (bound_ratio=1.0) it retrieved 7 / 9 of 12 development needles at 10 / 20% kept (3 / 7 without) for
    # +0.004 / +0.011 NLL, but on 24 held-out ones 8 / 29 / 54% at 5 / 10 / 20% against 17 / 42 / 50%
    # without (12 / 21 / 25% against 17 / 12 / 17% asked after compression); with the uncertainty
    # allocation it loses needles (4 / 4 / 17%): the layers held near the bound spend their few slots on
    # what other layers read most (tools/RESULTS.md, "Session 7").
    cross_layer: bool = False
    # What ranks a layer's tokens within its budget: "window" (the paper's, SnapKV's selection: the pooled
    # attention of the observation window) or "attention_shares" (`scoring.attention_shares`: the largest of a
    # token's shares of the attention accumulated over every prompt query, of the pooled window's and of a
    # question's, `question_window`), so a token the whole prompt reads (what a continuation
    # reads next) competes with what the last queries (a question) read, without a weight between them, or
    # "compactor" (`compactor.
    # sinks_then_compactor`: the first tokens, then Compactor's query-agnostic score, blended by the fraction
    # of the prompt the average budget drops), for a document whose questions come later. The allocation is
    # unchanged.
    # The default, with SnapKV's window (32 queries, avg-pool 5) and the output uncertainty (tools/RESULTS.md,
    # "Session 15"; SmolLM2-135M, equal memory, 16 contexts and 24 needles per set), against SnapKV at 5 / 10 /
    # 20% kept: continuation NLL -0.024 +- 0.014 / -0.037 +- 0.030 at 5 / 20% (development set), -0.031 +-
    # 0.014 / -0.029 +- 0.023 / -0.031 +- 0.032 (held out, seed 3), -0.001 +- 0.007 / +0.002 +- 0.009 / +0.008
    # +- 0.012 (held out, seed 5), -0.014 +- 0.012 / -0.012 +- 0.020 / -0.012 +- 0.029 (held out, seed 6,
    # "Session 16"); query-aware needles 3 / 3 / 4 against 3 / 3 / 4 (seed 3), 4 / 3 / 6 against 3 / 3 / 3
    # (seed 5) and 3 / 3 / 5 against 3 / 4 / 9 (seed 6), asked after compression 4 / 4 / 4 against 4 / 4 / 3,
    # 4 / 3 / 3 against 4 / 3 / 3 and 4 / 4 / 4 against 4 / 4 / 4. The paper's rank and window
    # (`ZigZagKV.paper()` scoring, 8 queries, max-pool 7) retrieve more query-aware needles (3 / 8 / 10 on
    # seed 5: the 8 queries are the question's) at +0.08 / +0.06 / +0.03 NLL against SnapKV; the window's
    # length, not the pooling, is what costs it (32 queries with max-pool 7: +0.007 / +0.002 / +0.009 NLL
    # against SnapKV on seed 5).
    rank: str = "attention_shares"  # paper: "window"
    # What a layer's uncertainty counts: "output" (the default, not the paper's allocation rule: the paper's
    # LMBO, which it only analyses, as a budget rule: the fewest keys, taken in the layer's own selection
    # order, that keep the observation window's attention output within relative error 1 - tau of the full
    # one, `budgets.min_budget_output`) or "attention" (the paper's LMBA: the fewest keys holding `tau` of
    # the window's attention mass; `ZigZagKV.paper()`). Attention mass ignores the values: layer 0, which
    # spreads its attention over its neighbourhood, needs half the prompt for 90% of the mass and got all of
    # it (2048 of 30 x 410 slots at 20% kept), but its output is kept to 10% by a quarter; the output rule
    # allocates flatter. Measured (tools/RESULTS.md, "Session 14"; SmolLM2-135M): continuation NLL -0.021 +-
    # 0.005 / -0.025 +- 0.013 at 5 / 20% kept against "attention" (16 development contexts), -0.033 / -0.040 /
    # -0.015 at 5 / 10 / 20% (8 held-out ones); query-aware needles 3 / 8 / 10 against 0 / 6 / 9 of the first
    # 12 held-out ones at 5 / 10 / 20%. It costs prefill time, with the accumulated attention the share rank
    # reads: prefill of 4 x 2048 tokens took 31.3 / 31.9 s against 20.8 s for `ZigZagKV.paper()` and 20.5 s
    # for SnapKV (`kvzoo bench --batch 4 --contexts 2048`, one process, nothing else running;
    # tools/RESULTS.md, "Session 16").
    uncertainty: str = "output"
    # A document stored for questions asked later (`for_stored_document`: `prefill_cache`, `model.prefill`, the
    # eval's needles asked after compression) has no question in its observation window, whose queries are the
    # document's last sentences: its layers rank their tokens by this rank instead (None: `rank`); the
    # allocation and the window are unchanged. Not the paper's. Measured (tools/RESULTS.md, "Session 25"; seeds
    # 12-14 and 16, 96 needles asked after compression, the full cache 68): 17 / 20 / 35 at 5 / 10 / 20% kept
    # against SnapKV's 16 / 16 / 16 (seeds 12-14 alone: 13 / 16 / 25 of 72 against the prompt rank's 11 / 11 /
    # 12); `make demo`'s stored document 4 / 4 of 6 facts at 50 / 20% kept against 2 / 0. Since session 36
    # Compactor's rank keeps spans (each token's score max-pooled over the 5 around it, `compactor.SPAN`): on
    # fresh seeds 29-30 (48, the full cache 38) 9 / 15 / 25 against 8 / 11 / 17 (SnapKV 8 / 8 / 9); and their
    # lead-ins since session 40 (each token's score lent to the 6 before it, `compactor.LEAD_IN`): on seeds 33-36
    # (96, the full cache 71) 16 / 37 / 53 against the centred span's 18 / 33 / 49 (SnapKV 15 / 15 / 14).
    stored_rank: str | None = "compactor"
    # With Compactor's rank (a stored document's), each token's rank adds this weight times the z-scored
    # surprisal it is lent, as ZSMerge's `stored_surprisal` (see there; 0: off): at end_prefill, where the model
    # has given the whole document's surprisal. The layers' budgets are allocated from Compactor's rank alone
    # (their need is measured while each layer is read). Measured: see tools/RESULTS.md, "Session 41".
    stored_surprisal: float = 1.0
    # How the surprisal is lent (`compactor.SURPRISAL_LENDS`; see ZSMerge's `stored_surprisal_lend`, which adds
    # the run lend since session 46: here on the fresh seeds 43-44, 16 / 30 / 34 of the full cache's 38 against
    # 21 / 31 / 34, not adopted): "max+mean" since session 44, "max" (the largest surprisal alone) before.
    # Measured (tools/RESULTS.md, "Session 44"; needles asked after compression, equal memory): seeds 33-36 (96,
    # the full cache 71) 40 / 62 / 71 at 5 / 10 / 20% kept against 29 / 52 / 65 with "max"; a fresh seed (40, 24,
    # the full cache 15) 10 / 15 / 15 against 7 / 12 / 14.
    stored_surprisal_lend: str = "max+mean"
    # rank="attention_shares" also keeps a token for its share of a question's attention: the attention of
    # the last `question_window` queries, max-pooled over a token and the 6 before it (`question_kernel_size`,
    # `question_pooling`, `question_pool_ahead`), as KVMerger's share rank reads it (ZSMerge's pools over the 8
    # before it since session 35). A token is
    # kept for the largest of three shares: what every prompt query read (a continuation reads it next), what
    # the observation window read, and what the last 8 queries read (a question at the end of the prompt:
    # the 32-query window averages it with the document's last sentences, and its average-pool spreads its
    # peak over the phrase before the answer). None: the first two (the rank before session 26). The
    # observation window still sets the allocation and the tokens every layer keeps. Not the paper's.
    # Measured (tools/RESULTS.md, "Session 26"; seeds 12, 13, 14 and 16, 96 query-aware needles, the full cache
    # 68): 48 / 67 / 69 at 5 / 10 / 20% kept against 16 / 20 / 45 without it (SnapKV 16 / 16 / 16);
    # continuation NLL 0.003-0.005 higher (seed 15) and 0.007-0.013 (seed 12), still below SnapKV's. In place
    # of the observation window's share (not adopted) it kept 58 / 70 / 69 for 0.01-0.02 nats. Held out, the
    # Rust book (seed 3, 24 needles, the full cache 19): 15 / 17 / 17 against 5 / 4 / 9 (SnapKV 4 / 5 / 7), NLL
    # +0.019 +- 0.010 / +0.007 +- 0.004 / -0.002 +- 0.006 (-0.029 / -0.070 / -0.053 against SnapKV).
    question_window: int | None = 8
    question_kernel_size: int = 7
    question_pooling: str = "max"
    question_pool_ahead: int | None = 0

    supports_chunked_prefill = False  # allocation needs every layer's uncertainty over the whole prompt

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0 < self.tau <= 1:
            raise KvzooError(f"ZigZagKV: tau must be in (0, 1], got {self.tau!r}")
        ratio = self.bound_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise KvzooError(f"ZigZagKV: bound_ratio must be in [0, 1], got {ratio!r}")
        if not isinstance(self.cross_layer, bool):
            raise KvzooError(f"ZigZagKV: cross_layer must be True or False, got {self.cross_layer!r}")
        check_choice(self, "ZigZagKV", "uncertainty", UNCERTAINTIES)
        check_choice(self, "ZigZagKV", "rank", RANKS)
        check_choice(self, "ZigZagKV", "stored_rank", RANKS, optional=True)
        check_surprisal_settings(self, "ZigZagKV")
        check_counts(self, "ZigZagKV", ("question_window",), optional=True)
        check_counts(self, "ZigZagKV", ("question_kernel_size",))
        check_pooling(self, "ZigZagKV", prefix="question_")
        if self.cross_layer and self.rank == "compactor":
            raise KvzooError("ZigZagKV: cross_layer compares attention shares across layers, which rank='compactor' "
                             "does not give; use one of them")

    @classmethod
    def paper(cls, **overrides: object) -> "ZigZagKV":
        """The paper's settings: budgets from LMBA (attention mass, not the output: `uncertainty`), tokens
        ranked by the observation window's attention alone, with the window and pooling of its LongBench runs
        (KVCache-Factory: 8 queries, max-pool 7, centred)."""
        paper = {"uncertainty": "attention", "rank": "window", "window_size": 8, "kernel_size": 7, "pooling": "max",
                 "pool_ahead": None, "stored_rank": None, "stored_surprisal": 0.0}
        return cls(**{**paper, **overrides})  # type: ignore[arg-type]

    def for_stored_document(self, chunked: bool = False) -> "ZigZagKV":
        """This ZigZagKV ranking its tokens by `stored_rank`; itself without one, or with a cross-layer rank
        (which compares the layers' attention shares)."""
        if self.stored_rank is None or self.cross_layer:
            return self
        return replace(self, rank=self.stored_rank)

    @property
    def reads_prompt_surprisal(self) -> bool:  # type: ignore[override]
        """Compactor's rank with `stored_surprisal`: end_prefill adds the prompt's surprisal."""
        return self.rank == "compactor" and self.stored_surprisal > 0

    def prefill_budgets(self, cfg: "ModelConfig", prompt_lens: list[int]) -> list[list[int]]:
        for n in prompt_lens:
            self.sequence_budget(n)  # checks the budget covers the window, before any work is done
        return [list(prompt_lens)] * cfg.num_layers  # the whole prompt, until end_prefill

    def compressed_budgets(self, cfg: "ModelConfig", prompt_lens: list[int]) -> list[list[int]]:
        return super().prefill_budgets(cfg, prompt_lens)  # the average layer's: the layers share L times it

    def compress_prefill(self, layer_idx: int, slots: LayerSlots, chunk: "PrefillChunk") -> None:
        # A second chunk of the same prompt (a later prompt is appended by take_prefill_chunk, never here).
        if chunk.slots_before:
            raise KvzooError(
                "ZigZagKV allocates from every layer's attention over the whole prompt, so it cannot "
                "compress a prompt fed in chunks; generate without prefill_chunk"
            )
        scores = self.prefill_scores(slots, chunk)
        # Keeps every token, in rank order with pooled ties broken by the own score (`prefill_tiebreak`), so
        # that the slot order is the tie-break `end_prefill` needs; with the surprisal, each slot stores
        # Compactor's unpooled score, which end_prefill adds it to.
        stored = scores
        if self.reads_prompt_surprisal:
            stored = unpooled_compactor(chunk, self._kept(slots, chunk), slots.state["prompt_len"])
        keep_top(slots, chunk, scores, slots.state["prefill_budget"], stored_score=stored,
                 tie=self.prefill_tiebreak(slots, chunk))
        slots.state["lmba"] = self._uncertainty(chunk, scores)

    def prefill_scores(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor:
        """[B, Hkv, S] the rank of the candidates (`rank`)."""
        if self.rank == "compactor":
            return sinks_then_compactor(chunk, self._kept(slots, chunk), slots.state["prompt_len"])
        window = super().prefill_scores(slots, chunk)
        if self.rank == "window":
            return window
        valid = torch.isfinite(chunk.key_logw)
        shares = attention_shares(accumulated_scores(chunk), window, valid)
        if self.question_window is None:
            return shares
        question = window_scores(chunk, self.question_window, kernel=self.question_kernel_size,
                                 pooling=self.question_pooling, ahead=self.question_pool_ahead)
        return torch.maximum(shares, share_of(question, valid))

    def _kept(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor:
        """[B] each sequence's average layer budget (what Compactor's blend reads as kept)."""
        kept = [self.sequence_budget(n) for n in slots.state["prompt_len"].tolist()]
        return torch.tensor(kept, device=chunk.k.device)

    def _uncertainty(self, chunk: "PrefillChunk", rank: torch.Tensor) -> torch.Tensor:
        """[B] fp32: the layer's uncertainty, the mean over query heads of MBA(tau) of the observation window's
        summed attention, or (uncertainty="output") of the keys, in `rank` [B, Hkv, S] order after the window
        (end_prefill keeps it), that keep the window's attention output within 1 - tau."""
        if self.uncertainty == "attention":
            return attention_uncertainty(chunk, self.window_size, self.tau)
        return output_uncertainty(chunk, rank, self.window_size, self.window_size, self.tau)

    def layer_budgets(self, lmba: list[float], prompt_len: int) -> list[int]:
        """Per-layer budgets of one sequence from its layers' uncertainty (LMBO or LMBA)."""
        avg = self.sequence_budget(prompt_len)
        return zigzag_budgets(lmba, avg, int(self.bound_ratio * avg), min(self.window_size, prompt_len), prompt_len)

    def end_prefill(self, cache: KVCache) -> None:
        if "lmba" not in cache.layers[0].state:
            return  # a prompt continuing an allocated cache: nothing left to allocate
        lmba = torch.stack([layer.state.pop("lmba") for layer in cache.layers]).T.tolist()  # [B][L]
        prompt_lens = cache.layers[0].state["prompt_len"].tolist()
        per_sequence = [self.layer_budgets(x, n) for x, n in zip(lmba, prompt_lens)]
        widest = widest_shares(cache.layers) if self.cross_layer else None
        for layer_idx, slots in enumerate(cache.layers):
            keep = torch.tensor([b[layer_idx] for b in per_sequence], device=slots.pos.device)
            rank = slots.score if widest is None else cross_layer_rank(slots, widest)
            if self.reads_prompt_surprisal:  # Compactor's unpooled score (compress_prefill) with the surprisal
                rank = held_rank_with_surprisal(rank, slots, cache.prompt_surprisal, self.stored_surprisal,
                                                self.stored_surprisal_lend)
            rank = rank.masked_fill(recent_mask(slot_candidates(slots), self.window_size), float("inf"))
            # Equal pooled scores: the earlier slot first (compress_prefill stored them peak before neighbours).
            earlier = -torch.arange(slots.capacity, device=rank.device, dtype=rank.dtype).expand_as(rank)
            cache.layers[layer_idx] = shrink_slots(slots, rank, keep, tie=earlier)

