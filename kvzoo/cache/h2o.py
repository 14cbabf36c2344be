"""H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference", arXiv 2306.14048)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvzoo.cache.base import ScoredSelection
from kvzoo.cache.budgets import Budget, check_budget, resolve_budget
from kvzoo.cache.scoring import accumulated_scores
from kvzoo.cache.selection import argmin_where, kv_probs, place_or_evict, recent_mask
from kvzoo.cache.slots import LayerSlots
from kvzoo.errors import KvzooError

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk
    from kvzoo.config import ModelConfig


@dataclass
class H2O(ScoredSelection):
    """Keep heavy hitters (largest accumulated attention) plus the most recent tokens; evict one token per
    decode step, so memory stays constant.

    Score: column sums of the prompt's causal attention over all its queries, then += each decode step's
    attention row (per KV head: mean over its query heads, the GQA resolution of METHODS.md 4.2).
    `recent_ratio` of the budget is the recent window (paper: 20% budget = 10% heavy + 10% recent).
    `normalise=True` divides prompt scores by the number of queries that saw each token (kvpress'
    observed attention); the default is the original sum.
    Budget rule (`budgets.resolve_budget`): at least 1 slot; a constant-size layout even for a shorter
    prompt, filled while decoding, then one eviction per step.
    """

    decode_step_rowwise = True

    budget: Budget = 0.2
    recent_ratio: float = 0.5
    normalise: bool = False

    def __post_init__(self) -> None:
        check_budget(self.budget, "H2O")
        if not isinstance(self.recent_ratio, (int, float)) or not 0 <= self.recent_ratio <= 1:
            raise KvzooError(f"H2O: recent_ratio must be in [0, 1], got {self.recent_ratio!r}")

    def prefill_budgets(self, cfg: "ModelConfig", prompt_lens: list[int]) -> list[list[int]]:
        return [[resolve_budget(self.budget, n) for n in prompt_lens]] * cfg.num_layers

    def _recent(self, slots: LayerSlots) -> torch.Tensor:
        return (slots.budget.float() * self.recent_ratio).long()  # [B]

    def prefill_scores(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor:
        return chunk.key_score + accumulated_scores(chunk, normalise=self.normalise)

    def protected(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor:
        return recent_mask(chunk, self._recent(slots))

    def decode_step(self, layer_idx: int, slots: LayerSlots, k_new: torch.Tensor, v_new: torch.Tensor,
                    pos_new: torch.Tensor, probs: torch.Tensor) -> None:
        slot_p, new_p = kv_probs(probs, k_new.shape[1])
        slots.score.add_(slot_p)
        self.place_evicting_lowest(slots, k_new, v_new, pos_new, new_p)

    def place_evicting_lowest(self, slots: LayerSlots, k_new: torch.Tensor, v_new: torch.Tensor,
                              pos_new: torch.Tensor, new_score: torch.Tensor) -> None:
        """Place the new token (score new_score [B, Hkv]) in a free slot, or over the lowest-scored slot older
        than the recent window."""
        recent = slots.pos > (pos_new - self._recent(slots))[:, None, None]
        evict = argmin_where(slots.score, slots.filled & ~recent)
        place_or_evict(slots, evict, k_new, v_new, pos_new, new_score)
