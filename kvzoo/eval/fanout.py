"""One prefill, many compressed caches: an evaluation shortcut that is exact, not an approximation.

A prompt fed in one shot is attended exactly whatever the method (compression only decides what is *kept*
for later tokens), so every method sees the same per-layer keys, values and queries. `fanout_prefill` runs
the model once and hands each layer's chunk to every method, each into its own cache: the caches are
identical to those of separate prefills (tested), for a fraction of the time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvzoo.cache.base import CompressionMethod
from kvzoo.cache.observe import ForwardingObserver, observe_prefill
from kvzoo.cache.slots import KVCache, LayerSlots
from kvzoo.generate import _check_request, _pad_id, left_pad

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk
    from kvzoo.models.base import CausalLM


class _Fanout(ForwardingObserver):
    """Forwards every layer's prompt chunk to each (method, cache) pair."""

    def compress_prefill(self, layer_idx: int, slots: LayerSlots, chunk: "PrefillChunk") -> None:
        for method, cache in self.targets:
            method.compress_prefill(layer_idx, cache.layers[layer_idx], chunk)


@torch.inference_mode()
def fanout_prefill(
    model: "CausalLM", prompt_ids: list[list[int]], methods: list[CompressionMethod], headroom: int
) -> tuple[list[KVCache], torch.Tensor]:
    """Caches of every method for the left-padded prompts (one shot), each with room for `headroom` decode
    steps, and the next-token logits [B, V] (the same for all: the prompt is attended exactly)."""
    _check_request(model, prompt_ids, headroom, None)
    param = next(model.parameters())
    cfg = model.config
    lens = [len(p) for p in prompt_ids]
    caches = [m.make_cache(cfg, lens, headroom, param.dtype, param.device) for m in methods]
    ids, positions = left_pad(prompt_ids, _pad_id(model), param.device)
    logits, tokens_seen = observe_prefill(model, ids, positions, _Fanout(list(zip(methods, caches))))
    for method, cache in zip(methods, caches):
        cache.tokens_seen = tokens_seen
        cache.lengths = list(lens)  # as `generate.prefill` records them: each sequence's next position
        cache.end_prefill()
    return caches, logits
