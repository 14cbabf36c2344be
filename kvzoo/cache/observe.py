"""A forward that hands every layer's prompt chunk to an observer and keeps nothing: how the evaluation's
fan-out, its attention-error study and the copy-head probe read a model's attention."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvzoo.cache.base import CompressionMethod
from kvzoo.cache.slots import KVCache, LayerSlots

if TYPE_CHECKING:
    from kvzoo.models.base import CausalLM


class PrefillObserver(CompressionMethod):
    """A stand-in method that sees every layer's prompt chunk of a one-shot prefill and keeps nothing itself."""

    def slots_in_use(self, capacity: int, tokens_seen: int) -> int:
        return 0  # one-shot prefill only: nothing cached before the prompt

    def after_prefill(self, driver: KVCache) -> None:
        """Called by `observe_prefill` after the forward over `driver`, the stand-in cache the model filled."""


class ForwardingObserver(PrefillObserver):
    """An observer that fills (method, cache) targets: what the model learns of itself before a prompt chunk
    (`before_prefill`) reaches each target's method."""

    def __init__(self, targets: list[tuple[CompressionMethod, KVCache]]) -> None:
        self.targets = targets

    def before_prefill(self, model: "CausalLM", cache: KVCache) -> None:
        for method, target in self.targets:
            method.before_prefill(model, target)

    @property
    def reads_prompt_surprisal(self) -> bool:
        return any(method.reads_prompt_surprisal for method, _ in self.targets)

    def after_prefill(self, driver: KVCache) -> None:
        for _, target in self.targets:  # what the model's head said of the prompt (None unless a method reads it)
            target.prompt_surprisal = driver.prompt_surprisal


def observe_prefill(model: "CausalLM", ids: torch.Tensor, positions: torch.Tensor,
                    observer: PrefillObserver) -> tuple[torch.Tensor, int]:
    """One forward over ids [B, T] that hands each layer's chunk to `observer`; returns the next-token
    logits [B, V] and the prompt positions fed (for the caches the observer filled)."""
    param = next(model.parameters())
    cfg = model.config
    b = ids.shape[0]
    no_slots = [LayerSlots.empty(b, cfg.num_kv_heads, 0, cfg.head_dim, torch.zeros(b), param.dtype, param.device)
                for _ in range(cfg.num_layers)]
    driver = KVCache(layers=no_slots, method=observer)
    logits = model(ids, positions, cache=driver, last_only=True)[:, -1]
    observer.after_prefill(driver)
    return logits, driver.tokens_seen
