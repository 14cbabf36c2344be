"""PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", arXiv 2406.02069)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvzoo.cache.budgets import pyramid_budgets
from kvzoo.cache.snapkv import WindowSelection
from kvzoo.errors import KvzooError

if TYPE_CHECKING:
    from kvzoo.config import ModelConfig


@dataclass
class PyramidKV(WindowSelection):
    """SnapKV selection with per-layer budgets decreasing arithmetically from layer 0 (METHODS.md 4.4):
    the average over layers is the budget; `beta` sets how steep the pyramid is.
    Defaults from the KVCache-Factory LongBench runs: window 8, max-pool 7, beta 20.
    Budget rule: the average is at least `window_size` slots and at most the prompt (a prompt no longer
    than it is kept whole in every layer)."""

    window_size: int = 8
    kernel_size: int = 7
    pooling: str = "max"
    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.beta, (int, float)) or self.beta < 1:
            raise KvzooError(f"PyramidKV: beta must be a number >= 1, got {self.beta!r}")

    def prefill_budgets(self, cfg: "ModelConfig", prompt_lens: list[int]) -> list[list[int]]:
        per_sequence = []
        for n in prompt_lens:
            avg = self.sequence_budget(n)
            if avg >= n:  # nothing to compress
                per_sequence.append([n] * cfg.num_layers)
            else:
                budgets = pyramid_budgets(avg, min(self.window_size, n), n, cfg.num_layers, self.beta)
                per_sequence.append([min(b, n) for b in budgets])
        return [list(layer) for layer in zip(*per_sequence)]
