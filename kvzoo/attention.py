"""The attention step every family shares: exact attention for prompt chunks, slot attention for decode,
and the hand-off to the compression method that owns the cache.

Model files project q/k/v and apply RoPE; from there on all families run this code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from kvzoo.cache.chunk import PrefillChunk, make_prefill_chunk
from kvzoo.cache.slots import KVCache
from kvzoo_kernels.attention import causal_attention, decode_attention
from kvzoo_kernels.decode_attention import store_attention
from kvzoo_kernels.chunk_attention import chunk_attention


@dataclass
class DeferredUpdates:
    """A decode step's per-layer updates waiting for the last layer (`ForwardContext.deferred`), and the stores
    they go into: groups of layers whose stores are one allocation (`KVCache.stacked_groups`), a layer alone
    otherwise."""

    groups: list[tuple[tuple[int, ...], LayerSlots]]  # layer ids, and their store ([L' * B, ...] rows)
    k_new: list[torch.Tensor] = field(default_factory=list)  # per layer [B, Hkv, D]
    v_new: list[torch.Tensor] = field(default_factory=list)
    probs: list[torch.Tensor | None] = field(default_factory=list)  # per layer [B, Hq, C + 1] or None


@dataclass
class ForwardContext:
    """Per-forward inputs shared by all layers, plus the store of the layer being run (`for_layer`)."""

    positions: torch.Tensor  # [B, T] int64, -1 at padding
    cos: torch.Tensor  # [B, 1, T, D] rotary tables for these positions
    sin: torch.Tensor
    cache: KVCache | None  # None: a plain causal forward that keeps nothing
    decode: bool  # True: single-token decode step (static shapes, compilable)
    window: int | None  # sliding window (Mistral) or None
    has_padding: bool  # host-side flag: some position is -1 (only read in prefill)
    # The running layer's slot store (set per layer by `for_layer`). The decode step reads the store from
    # here, never by layer number, so one compiled decoder block serves every layer (see kvzoo/compile.py).
    slots: LayerSlots | None = None
    # Eager decode of a row-wise method (`CompressionMethod.decode_step_rowwise`) over stacked stores: each
    # layer leaves its update here and the model applies them all at once after the last layer
    # (`apply_deferred_updates`). None: each layer updates its own store.
    deferred: DeferredUpdates | None = None

    def for_layer(self, layer_idx: int) -> "ForwardContext":
        """This context with layer `layer_idx`'s store (itself when there is no cache)."""
        if self.cache is None:
            return self
        return replace(self, slots=self.cache.layers[layer_idx])


def attend(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """Attention output [B, Hq, T, D] for post-RoPE q [B, Hq, T, D], k/v [B, Hkv, T, D]; updates the cache."""
    cache, slots = ctx.cache, ctx.slots
    if cache is not None:
        if slots is None:  # a context not made by `for_layer` (direct callers): look the store up
            slots = cache.layers[layer_idx]
        if ctx.decode:
            return _decode(layer_idx, q, k, v, ctx, cache, slots)
    used = 0 if cache is None else cache.method.slots_in_use(slots.capacity, cache.tokens_seen)
    t = q.shape[2]
    # The plain causal kernel suffices for a fresh, unpadded prompt that fits in any sliding window.
    needs_mask = used > 0 or ctx.has_padding or (ctx.window is not None and ctx.window < t)
    chunk = _prefill_chunk(q, k, v, ctx, slots, used) if (cache is not None or needs_mask) else None
    if needs_mask:
        assert chunk is not None
        out = chunk_attention(q, chunk.keys, chunk.values, chunk.q_pos, chunk.key_pos, chunk.key_bias, ctx.window,
                              n_slots=used)
    else:
        out, lse = causal_attention(q, k, v)
        if chunk is not None:
            chunk.row_lse = lse
    if cache is not None:
        assert chunk is not None
        cache.method.take_prefill_chunk(layer_idx, slots, chunk)
    return out


def _prefill_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext,
                   slots: LayerSlots | None, used: int) -> PrefillChunk:
    cache = ctx.cache
    alpha = cache.method.attention_alpha if cache is not None else 0.0
    return make_prefill_chunk(q, k, v, ctx.positions, slots if used > 0 else None, used, alpha, ctx.window,
                              rope=None if ctx.cos is None else (ctx.cos, ctx.sin))


def _decode(
    layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, cache: KVCache,
    slots: LayerSlots,
) -> torch.Tensor:
    """The decode step of one layer. `layer_idx` is only handed on to the method (unread there, so the
    compiled block does not specialise on it)."""
    method = cache.method
    pos = ctx.positions[:, 0]  # [B]
    k_new, v_new = k[:, :, 0], v[:, :, 0]  # [B, Hkv, D]
    if method.decode_writes_first:  # the new token takes a free slot: attend over the store alone
        method.decode_step(layer_idx, slots, k_new, v_new, pos, None)
    bias = _decode_bias(slots, method.attention_alpha, pos, ctx.window)  # [B, Hkv, C] (after a write-first)
    if method.decode_writes_first:
        return store_attention(q[:, :, 0], slots.k, slots.v, bias)[:, :, None]
    out, probs = decode_attention(q[:, :, 0], slots.k, slots.v, bias, k_new, v_new,
                                  with_probs=method.reads_decode_probs)
    if ctx.deferred is not None:
        ctx.deferred.k_new.append(k_new)
        ctx.deferred.v_new.append(v_new)
        ctx.deferred.probs.append(probs)
    else:
        method.decode_step(layer_idx, slots, k_new, v_new, pos, probs)
    return out[:, :, None]


def defer_decode_updates(cache: KVCache) -> DeferredUpdates | None:
    """Where to collect a decode step's updates when the cache's method can run them for several layers at once
    (row-wise, after attending, on stacked stores), else None."""
    method = cache.method
    if not method.decode_step_rowwise or method.decode_writes_first:
        return None
    groups = cache.stacked_groups(method.decode_slot_state)
    return None if groups is None else DeferredUpdates(groups)


def apply_deferred_updates(cache: KVCache, positions: torch.Tensor, deferred: DeferredUpdates) -> None:
    """Run the method's decode step once per group of layers, over the group's store with its layers' updates
    in layer order (row i * B + b: sequence b of the group's i-th layer; a layer alone is a group of one);
    positions [B, 1]."""
    assert len(deferred.k_new) == len(cache.layers)
    probs = deferred.probs
    for layer_ids, target in deferred.groups:  # a row-wise step never reads the layer number: one call per group
        cache.method.decode_step(
            -1, target, torch.cat([deferred.k_new[i] for i in layer_ids]),
            torch.cat([deferred.v_new[i] for i in layer_ids]), positions[:, 0].repeat(len(layer_ids)),
            None if probs[0] is None else torch.cat([probs[i] for i in layer_ids]))  # type: ignore[misc]


def _decode_bias(slots: LayerSlots, alpha: float, pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, Hkv, C] slot bias of a decode step at positions pos [B]: alpha * log w, -inf for empty slots and
    (sliding window) for slots the window has passed."""
    bias = slots.slot_bias(alpha)
    if window is not None:
        bias = bias.masked_fill(pos[:, None, None] - slots.pos >= window, float("-inf"))
    return bias
