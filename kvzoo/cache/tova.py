"""TOVA (Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvzoo.cache.base import ScoredSelection
from kvzoo.cache.budgets import Budget, check_budget, resolve_budget
from kvzoo.cache.scoring import window_scores
from kvzoo.cache.selection import argmin_where, free_slot, where_rows
from kvzoo.cache.slots import LayerSlots

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk
    from kvzoo.config import ModelConfig


@dataclass
class TOVA(ScoredSelection):
    """Token Omission Via Attention: keep the tokens the *current* query attends to most, averaged over all
    heads of the layer, so every head of a layer keeps the same token set. When full, the lowest-scored of
    [cache ; new token] is dropped (possibly the new token itself) — one eviction per decode step.
    Budget rule (`budgets.resolve_budget`): at least 1 slot; a constant-size layout even for a shorter
    prompt, filled while decoding."""

    decode_step_rowwise = True

    budget: Budget = 0.2

    def __post_init__(self) -> None:
        check_budget(self.budget, "TOVA")

    def prefill_budgets(self, cfg: "ModelConfig", prompt_lens: list[int]) -> list[list[int]]:
        return [[resolve_budget(self.budget, n) for n in prompt_lens]] * cfg.num_layers

    def prefill_scores(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor:
        # The last query's attention, averaged over all heads of the layer, shared by every KV head.
        return window_scores(chunk, window=1).mean(dim=1, keepdim=True).expand_as(chunk.key_logw)

    def protected(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor:
        # The newest token is kept unconditionally (it is the query that produced the scores).
        return chunk.key_pos == chunk.q_pos.max(dim=1).values[:, None, None]

    def decode_step(self, layer_idx: int, slots: LayerSlots, k_new: torch.Tensor, v_new: torch.Tensor,
                    pos_new: torch.Tensor, probs: torch.Tensor) -> None:
        b, hkv = k_new.shape[:2]
        layer_p = probs.mean(dim=1)  # [B, C + 1]: all query heads of the layer
        slot_p, new_p = layer_p[:, None, :-1].expand(b, hkv, -1), layer_p[:, None, -1].expand(b, hkv)
        slots.score.copy_(torch.where(slots.filled, slot_p, 0.0))
        has_free, free = free_slot(slots)
        lowest = argmin_where(slots.score, slots.filled)
        lowest_score = slots.score.gather(-1, lowest[..., None])[..., 0]
        target = torch.where(has_free, free, lowest)
        # If the new token is the least attended and the cache is full, it is the one omitted:
        # the target slot is rewritten with its own contents.
        drop_new = ~has_free & (new_p < lowest_score)
        new = (k_new, v_new, torch.zeros_like(new_p), new_p, pos_new[:, None].expand(b, hkv))
        old = slots.read(target)
        slots.write(target, *(where_rows(drop_new, o, n) for n, o in zip(new, old)))
