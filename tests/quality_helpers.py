"""Quality of a compressed cache on a real model: how far its next-token distributions drift from the full
cache's over a teacher-forced continuation.

The prompt's forward pass is exact for every method (compression only decides what is *kept* once a
layer's exact attention is done), so it is run once: a recording FullCache keeps each layer's prompt chunk,
and every (method, budget) replays those chunks through the method's own `compress_prefill` /
`end_prefill`. The budgets of one method are then decoded together as one batch: each budget's cache is a
batch of one, and the caches are stacked along the batch axis (decode reads every per-sequence quantity,
budget included, from the cache, so one method instance serves every budget of that method).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvzoo.cache.base import CompressionMethod
from kvzoo.cache.full import FullCache
from kvzoo.cache.slots import NEG_INF, KVCache, LayerSlots, pad_slot_state

if TYPE_CHECKING:
    from kvzoo.attention import PrefillChunk
    from kvzoo.models.base import CausalLM


@dataclass
class RecordingFullCache(FullCache):
    """FullCache that also keeps every layer's prompt chunk (queries, keys, values, positions)."""

    chunks: dict[int, "PrefillChunk"] = field(default_factory=dict)

    def compress_prefill(self, layer_idx: int, slots: LayerSlots, chunk: "PrefillChunk") -> None:
        self.chunks[layer_idx] = chunk
        super().compress_prefill(layer_idx, slots, chunk)


@dataclass
class Prefilled:
    """One exact prompt forward: the recorded chunks, the full cache, and the last position's logits."""

    model: "CausalLM"
    prompt_len: int
    steps: int
    recorder: RecordingFullCache
    full_cache: KVCache
    logits: torch.Tensor  # [1, V]


def prefill_once(model: "CausalLM", prompt: list[int], steps: int) -> Prefilled:
    recorder = RecordingFullCache()
    cache = recorder.make_cache(model.config, [len(prompt)], steps, torch.float32, "cpu")
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache=cache, last_only=True)[:, -1]
    return Prefilled(model, len(prompt), steps, recorder, cache, logits)


def replay_prefill(pre: Prefilled, method: CompressionMethod) -> KVCache:
    """The cache `method` would hold after prefilling the recorded prompt in one shot."""
    cache = method.make_cache(pre.model.config, [pre.prompt_len], pre.steps, torch.float32, "cpu")
    with torch.inference_mode():
        for layer_idx, chunk in sorted(pre.recorder.chunks.items()):
            chunk.alpha = method.attention_alpha  # prompt tokens all have log w = 0: alpha changes nothing
            method.compress_prefill(layer_idx, cache.layers[layer_idx], chunk)
        cache.tokens_seen = pre.prompt_len
        cache.end_prefill()
    return cache


def _pad_capacity(slots: LayerSlots, capacity: int) -> list[torch.Tensor]:
    extra = capacity - slots.capacity
    pad_d, pad = (0, 0, 0, extra), (0, extra)
    f = torch.nn.functional.pad
    return [f(slots.k, pad_d), f(slots.v, pad_d), f(slots.logw, pad, value=NEG_INF), f(slots.score, pad),
            f(slots.pos, pad, value=-1)]


def stack_caches(caches: list[KVCache]) -> KVCache:
    """Caches of one sequence each (same method, same model) -> one batched cache; shorter capacities are
    padded with empty slots (log w = -inf, pos = -1), which attention and every method ignore."""
    layers = []
    for per_layer in zip(*(c.layers for c in caches)):
        capacity = max(s.capacity for s in per_layer)
        parts = [_pad_capacity(s, capacity) for s in per_layer]
        k, v, logw, score, pos = (torch.cat(xs) for xs in zip(*parts))
        state = {}
        for key, first in per_layer[0].state.items():
            state[key] = torch.cat([pad_slot_state(s.state[key], capacity) for s in per_layer]) \
                if first.dim() else first
        layers.append(LayerSlots(k, v, logw, score, pos, torch.cat([s.budget for s in per_layer]), state))
    return KVCache(layers=layers, method=caches[0].method, tokens_seen=caches[0].tokens_seen)


def decode_logits(pre: Prefilled, cache: KVCache, continuation: list[int]) -> torch.Tensor:
    """Teacher-forced decode of `continuation` (the same tokens for every sequence of the cache):
    [B, len(continuation), V] log-probabilities, entry i predicting the token after continuation[i]."""
    batch = cache.layers[0].k.shape[0]
    out = []
    with torch.inference_mode():
        for i, token in enumerate(continuation):
            ids = torch.full((batch, 1), token)
            pos = torch.full((batch, 1), pre.prompt_len + i)
            out.append(pre.model(ids, pos, cache=cache, decode=True)[:, -1].float().log_softmax(-1))
    return torch.stack(out, dim=1)


def mean_kl(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(reference || other) for log-probabilities [..., T, V] -> [...] (nats)."""
    return (reference.exp() * (reference - other)).sum(-1).mean(-1)
