"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvzoo.cache.base import ScoredSelection
from kvzoo.cache.budgets import Budget, check_budget, resolve_budget
from kvzoo.cache.selection import argmin_where, place_or_evict, sink_mask
from kvzoo.cache.slots import LayerSlots
from kvzoo.errors import KvzooError

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk
    from kvzoo.config import ModelConfig


@dataclass
class StreamingLLM(ScoredSelection):
    """Keep `sinks` initial tokens and the most recent `budget - sinks` tokens; evict the oldest non-sink
    token at every decode step. Content never depends on attention.

    Keys keep their original positions (post-RoPE), the "simplified" mode of kvpress / KVCache-Factory;
    the paper's pos-shift mode (re-rotating keys to cache positions) is not implemented.
    Defaults: `sinks=4` (`start_size`), budget 4 + 512 (`recent_size=512`) as in the official code.
    Budget rule (`budgets.resolve_budget`): at least sinks + 1 slots (a window of one); a constant-size layout
    even for a shorter prompt, filled while decoding.
    """

    budget: Budget = 516
    sinks: int = 4
    reads_decode_probs = False  # eviction by position only
    decode_step_rowwise = True

    def __post_init__(self) -> None:
        check_budget(self.budget, "StreamingLLM")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise KvzooError(f"StreamingLLM: sinks must be an integer >= 0, got {self.sinks!r}")

    def prefill_budgets(self, cfg: "ModelConfig", prompt_lens: list[int]) -> list[list[int]]:
        return [[resolve_budget(self.budget, n, minimum=self.sinks + 1) for n in prompt_lens]] * cfg.num_layers

    def prefill_scores(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor:
        return chunk.key_pos.float()  # newer before older

    def protected(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor:
        return sink_mask(chunk, self.sinks)

    def decode_step(self, layer_idx: int, slots: LayerSlots, k_new: torch.Tensor, v_new: torch.Tensor,
                    pos_new: torch.Tensor, probs: torch.Tensor | None) -> None:
        oldest = argmin_where(slots.pos.float(), slots.filled & (slots.pos >= self.sinks))
        place_or_evict(slots, oldest, k_new, v_new, pos_new, torch.zeros_like(k_new[..., 0]))
