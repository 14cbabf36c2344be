"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469),
and the observation-window selection it shares with PyramidKV and ZigZagKV."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvzoo.cache.base import PrefillOnlyMethod, ScoredSelection
from kvzoo.cache.budgets import Budget, check_budget, check_counts, check_pooling, resolve_budget
from kvzoo.cache.scoring import window_scores
from kvzoo.cache.selection import recent_mask
from kvzoo.cache.slots import LayerSlots

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk
    from kvzoo.config import ModelConfig


@dataclass
class WindowSelection(ScoredSelection, PrefillOnlyMethod):
    """Prefill-only selection by observation-window attention: the last `window_size` queries score every
    earlier token (pooled with `kernel_size`), the window itself is always kept, and the top tokens fill the
    rest of the layer's budget. Decode appends up to `decode_cap` generated tokens (None: all of them).
    Budget rule (`budgets.resolve_budget`): at least `window_size` slots, at most the prompt (a prompt no
    longer than the budget is kept whole)."""

    budget: Budget = 0.2
    window_size: int = 32
    kernel_size: int = 5
    pooling: str = "avg"
    pool_ahead: int | None = None  # of the kernel_size pooled positions, how many follow a token (None: centred)
    decode_cap: int | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_budget(self.budget, name)
        check_counts(self, name, ("window_size", "kernel_size"))
        check_pooling(self, name)
        self.check_decode_cap()

    def sequence_budget(self, prompt_len: int) -> int:
        """Slots kept from a prompt (on average over the layers): the budget rule with the window as minimum."""
        return resolve_budget(self.budget, prompt_len, minimum=self.window_size, cap_at_prompt=True)

    def prefill_budgets(self, cfg: "ModelConfig", prompt_lens: list[int]) -> list[list[int]]:
        return [[self.sequence_budget(n) for n in prompt_lens]] * cfg.num_layers

    def prefill_scores(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor:
        return window_scores(chunk, self.window_size, kernel=self.kernel_size, pooling=self.pooling,
                             ahead=self.pool_ahead)

    def protected(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor:
        return recent_mask(chunk, self.window_size)

    def prefill_tiebreak(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor:
        """Among equal pooled scores, the larger own (unpooled) score first: a peak before its neighbours."""
        return window_scores(chunk, self.window_size)

    def prefill_keep(self, slots: LayerSlots) -> torch.Tensor:
        return slots.state["prefill_budget"]


@dataclass
class SnapKV(WindowSelection):
    """SnapKV: uniform per-layer budget. Defaults from the official `init_snapkv`: window 32, avg-pool 5.
    Budget rule: at least `window_size` slots, at most the prompt (shorter prompts are kept whole)."""
