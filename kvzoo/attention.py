"""The attention step every family shares: exact attention for prompt chunks, slot attention for decode,
and the hand-off to the compression method that owns the cache.

Model files project q/k/v and apply RoPE; from there on all families run this code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvzoo.cache.slots import KVCache, LayerSlots, attention_bias
from kvzoo_kernels.attention import causal_attention, decode_attention, prefill_attention


@dataclass
class PrefillChunk:
    """What a compression method sees after one layer's exact attention over a prompt chunk."""

    q: torch.Tensor  # [B, Hq, T, D] post-RoPE queries of the chunk
    k: torch.Tensor  # [B, Hkv, T, D] post-RoPE keys of the chunk
    v: torch.Tensor  # [B, Hkv, T, D]
    q_pos: torch.Tensor  # [B, T] positions of the chunk's tokens, -1 at padding
    # Candidates = [slots already in use ; chunk tokens], the keys this chunk's queries attended to.
    keys: torch.Tensor  # [B, Hkv, S, D]
    values: torch.Tensor  # [B, Hkv, S, D]
    key_pos: torch.Tensor  # [B, Hkv, S]
    key_logw: torch.Tensor  # [B, Hkv, S] (-inf: empty slot or padding)
    key_score: torch.Tensor  # [B, Hkv, S] the slots' scores so far (0 for chunk tokens)
    window: int | None  # sliding window of the model (Mistral), else None
    alpha: float  # logw bias scale used for this attention

    @property
    def key_bias(self) -> torch.Tensor:
        return attention_bias(self.key_logw, self.alpha)


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
        out = prefill_attention(q, chunk.keys, chunk.values, chunk.q_pos, chunk.key_pos, chunk.key_bias, ctx.window)
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


def make_prefill_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    slots: LayerSlots | None,
    used: int,
    alpha: float,
    window: int | None,
) -> PrefillChunk:
    """The candidates a chunk's queries attend to: the first `used` slots, then the chunk's own tokens."""
    b, hkv, t, _ = k.shape
    chunk_pos = positions[:, None, :].expand(b, hkv, t)
    chunk_logw = torch.where(chunk_pos >= 0, 0.0, float("-inf"))
    chunk_score = torch.zeros_like(chunk_logw)
    if slots is None or used == 0:
        return PrefillChunk(q, k, v, positions, k, v, chunk_pos, chunk_logw, chunk_score, window, alpha)
    return PrefillChunk(
        q, k, v, positions,
        keys=torch.cat([slots.k[:, :, :used], k], dim=2),
        values=torch.cat([slots.v[:, :, :used], v], dim=2),
        key_pos=torch.cat([slots.pos[:, :, :used], chunk_pos], dim=2),
        key_logw=torch.cat([slots.logw[:, :, :used], chunk_logw], dim=2),
        key_score=torch.cat([slots.score[:, :, :used], chunk_score], dim=2),
        window=window,
        alpha=alpha,
    )


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
