"""The attention step every family shares: exact attention for prompt chunks, slot attention for decode,
and the hand-off to the compression method that owns the cache.

Model files project q/k/v and apply RoPE; from there on all families run this code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvzoo.cache.chunk import PrefillChunk, make_prefill_chunk
from kvzoo.cache.slots import KVCache
from kvzoo_kernels.attention import causal_attention, decode_attention
from kvzoo_kernels.chunk_attention import chunk_attention


@dataclass
class ForwardContext:
    """Per-forward inputs shared by all layers."""

    positions: torch.Tensor  # [B, T] int64, -1 at padding
    cos: torch.Tensor  # [B, 1, T, D] rotary tables for these positions
    sin: torch.Tensor
    cache: KVCache | None  # None: a plain causal forward that keeps nothing
    decode: bool  # True: single-token decode step (static shapes, compilable)
    window: int | None  # sliding window (Mistral) or None
    has_padding: bool  # host-side flag: some position is -1 (only read in prefill)


def attend(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """Attention output [B, Hq, T, D] for post-RoPE q [B, Hq, T, D], k/v [B, Hkv, T, D]; updates the cache."""
    cache = ctx.cache
    if cache is not None and ctx.decode:
        return _decode(layer_idx, q, k, v, ctx, cache)
    used = 0 if cache is None else cache.method.slots_in_use(cache.layers[layer_idx].capacity, cache.tokens_seen)
    t = q.shape[2]
    # The plain causal kernel suffices for a fresh, unpadded prompt that fits in any sliding window.
    needs_mask = used > 0 or ctx.has_padding or (ctx.window is not None and ctx.window < t)
    chunk = _prefill_chunk(layer_idx, q, k, v, ctx, used) if (cache is not None or needs_mask) else None
    if needs_mask:
        assert chunk is not None
        out = chunk_attention(q, chunk.keys, chunk.values, chunk.q_pos, chunk.key_pos, chunk.key_bias, ctx.window,
                              n_slots=chunk.keys.shape[2] - t)
    else:
        out = causal_attention(q, k, v)
    if cache is not None:
        assert chunk is not None
        cache.method.compress_prefill(layer_idx, cache.layers[layer_idx], chunk)
    return out


def _prefill_chunk(
    layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, used: int
) -> PrefillChunk:
    cache = ctx.cache
    slots = cache.layers[layer_idx] if cache is not None and used > 0 else None
    alpha = cache.method.attention_alpha if cache is not None else 0.0
    return make_prefill_chunk(q, k, v, ctx.positions, slots, used, alpha, ctx.window)


def _decode(
    layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, cache: KVCache
) -> torch.Tensor:
    slots = cache.layers[layer_idx]
    bias = slots.slot_bias(cache.method.attention_alpha)  # [B, Hkv, C]
    pos = ctx.positions[:, 0]  # [B]
    if ctx.window is not None:
        bias = bias.masked_fill(pos[:, None, None] - slots.pos >= ctx.window, float("-inf"))
    out, probs = decode_attention(q[:, :, 0], slots.k, slots.v, bias, k[:, :, 0], v[:, :, 0])
    cache.method.decode_step(layer_idx, slots, k[:, :, 0], v[:, :, 0], pos, probs)
    return out[:, :, None]
