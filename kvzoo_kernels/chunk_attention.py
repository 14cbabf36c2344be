"""Chunked-prefill attention: the T queries of a prompt chunk over [n_slots biased cache slots ; the chunk].

    logits[i, j] = q_i · k_j / sqrt(D) + key_bias[j]   if key j is visible to query i, else -inf

with the visibility rule of `kvzoo_kernels.attention` (positions, sliding window, -inf bias = empty slot or
padding). The candidates are the ones the compression methods receive anyway (`PrefillChunk.keys`: slots in
use, then the chunk's own keys), so the kernel reads them in place. The first `n_slots` candidates are
slots, seen through their bias; the rest is the chunk, seen causally.

- `chunk_attention_reference`: the torch specification and the CPU path: exactly
  `kvzoo_kernels.attention.prefill_attention` over the candidates (`n_slots` is only a hint for the kernel).
- The Triton version is flash-attention forward: one program per (sequence, query head, block of queries)
  streams the slots and then the chunk up to the block's last query (chunk keys past it are later tokens,
  since positions increase along a chunk), with an online softmax. A query that sees no key at all (a
  padding query) gets the reference's plain softmax over every candidate, in one more loop taken only by
  blocks that hold such a query.
- `chunk_attention`: the dispatcher (kvzoo_kernels.dispatch).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kvzoo_kernels.attention import prefill_attention
from kvzoo_kernels.dispatch import block_size, check_launchable, triton_kernel, use_triton, window_arg

tl: Any = None  # triton.language, bound on the first Triton launch (kvzoo_kernels.dispatch.triton_kernel)


def chunk_attention_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    q_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_bias: torch.Tensor,
    window: int | None,
    n_slots: int,
) -> torch.Tensor:
    """[B, Hq, T, D] attention of the chunk's queries over the candidates.

    q: [B, Hq, T, D]; keys, values: [B, Hkv, n_slots + T, D]; q_pos: [B, T] (-1 at padding); key_pos,
    key_bias: [B, Hkv, n_slots + T] (bias: alpha * log w for slots, 0 for chunk tokens, -inf when empty).
    """
    return prefill_attention(q, keys, values, q_pos, key_pos, key_bias, window)


def chunk_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    q_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_bias: torch.Tensor,
    window: int | None,
    n_slots: int,
) -> torch.Tensor:
    """`chunk_attention_reference`'s contract; Triton on CUDA tensors (see kvzoo_kernels.dispatch)."""
    if use_triton(q):
        return chunk_attention_triton(q, keys, values, q_pos, key_pos, key_bias, window, n_slots)
    return chunk_attention_reference(q, keys, values, q_pos, key_pos, key_bias, window, n_slots)


# --- Triton ---------------------------------------------------------------------------------------------

BLOCK_T = 64  # queries per tile on a GPU
BLOCK_S = 64  # keys per tile on a GPU


def chunk_attention_triton(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    q_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_bias: torch.Tensor,
    window: int | None,
    n_slots: int,
    block_t: int | None = None,
    block_s: int | None = None,
) -> torch.Tensor:
    """The Triton path (a torch custom op). Tile sizes (powers of two >= 16) default to GPU-sized values;
    tests pass small ones to exercise several tiles on tiny shapes."""
    t, s = q.shape[2], keys.shape[2]
    if s != n_slots + t:
        raise ValueError(f"chunk_attention: {s} candidates for {n_slots} slots and a {t}-token chunk; "
                         f"expected n_slots + T = {n_slots + t}")
    block_t = block_t or block_size(t, maximum=BLOCK_T)
    block_s = block_s or block_size(s, maximum=BLOCK_S)
    for name, value in (("block_t", block_t), ("block_s", block_s)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"chunk_attention_triton: {name}={value} must be a power of two >= 16")
    return torch.ops.kvzoo.chunk_attention(
        q, keys, values, q_pos, key_pos, key_bias, window_arg(window), n_slots, block_t, block_s
    )


@torch.library.custom_op("kvzoo::chunk_attention", mutates_args=())
def _chunk_attention_op(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    q_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_bias: torch.Tensor,
    window: int,
    n_slots: int,
    block_t: int,
    block_s: int,
) -> torch.Tensor:
    check_launchable(q, keys, values, q_pos, key_pos, key_bias)
    q, keys, values = (x.contiguous() for x in (q, keys, values))
    q_pos = q_pos.to(torch.int64).contiguous()
    key_pos = key_pos.to(torch.int64).contiguous()
    key_bias = key_bias.float().contiguous()
    b, hq, t, d = q.shape
    hkv, s = keys.shape[1], keys.shape[2]
    out = torch.empty(b, hq, t, d, dtype=values.dtype, device=q.device)
    _chunk_attention_kernel[(b * hq, max(1, -(-t // block_t)))](
        q, keys, values, q_pos, key_pos, key_bias, out,
        t, s, d, hq, hq // hkv, n_slots, window, 1.0 / math.sqrt(d),
        FP32=q.dtype == torch.float32, BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=block_size(d),
    )
    return out


@_chunk_attention_op.register_fake
def _(q, keys, values, q_pos, key_pos, key_bias, window, n_slots, block_t, block_s):  # noqa: ANN001, ANN202
    return q.new_empty(q.shape, dtype=values.dtype)


@triton_kernel
def _chunk_attention_kernel(
    q, keys, values, q_pos, key_pos, key_bias, out,
    T, S, D, HQ, G, n_slots, window, scale,
    FP32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (sequence * query head, block of queries): online softmax over slots, then the chunk."""
    bh = tl.program_id(0)
    b = bh // HQ
    kv_head = b * (HQ // G) + (bh % HQ) // G
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < T
    d_ok = d < D
    q_tile = tl.load(q + (bh * T + t[:, None]) * D + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    qp = tl.load(q_pos + b * T + t, mask=t_ok, other=-1)
    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    # Candidates past the block's last query are later chunk tokens: invisible, never loaded.
    end = tl.minimum(S, n_slots + (tl.program_id(1) + 1) * BLOCK_T)
    for start in range(0, end, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        s_ok = s < end
        kv_mask = s_ok[:, None] & d_ok[None, :]
        k_tile = tl.load(keys + (kv_head * S + s[:, None]) * D + d[None, :], mask=kv_mask, other=0.0)
        kp = tl.load(key_pos + kv_head * S + s, mask=s_ok, other=-1)
        kb = tl.load(key_bias + kv_head * S + s, mask=s_ok, other=float("-inf"))
        visible = (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None]) & (qp[:, None] - kp[None, :] < window)
        visible = visible & (kb[None, :] > float("-inf"))
        if FP32:
            qk = tl.dot(q_tile, tl.trans(k_tile), input_precision="ieee")
        else:  # fp16 / bf16: tensor-core product with fp32 accumulation
            qk = tl.dot(q_tile, tl.trans(k_tile))
        logits = tl.where(visible, qk * scale + kb[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(logits - m_safe[:, None])
        rescale = tl.exp(m_i - m_safe)
        l_i = l_i * rescale + tl.sum(p, axis=1)
        v_tile = tl.load(values + (kv_head * S + s[:, None]) * D + d[None, :], mask=kv_mask, other=0.0)
        if FP32:
            pv = tl.dot(p, v_tile, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v_tile.dtype), v_tile)
        acc = acc * rescale[:, None] + pv
        m_i = m_new
    sees_nothing = t_ok & (m_i == float("-inf"))
    if tl.sum(sees_nothing.to(tl.int32), axis=0) > 0:  # padding queries: plain softmax over all S candidates
        m_raw = tl.full([BLOCK_T], float("-inf"), tl.float32)
        l_raw = tl.zeros([BLOCK_T], tl.float32)
        acc_raw = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for start in range(0, S, BLOCK_S):
            s = start + tl.arange(0, BLOCK_S)
            s_ok = s < S
            kv_mask = s_ok[:, None] & d_ok[None, :]
            k_tile = tl.load(keys + (kv_head * S + s[:, None]) * D + d[None, :], mask=kv_mask, other=0.0)
            if FP32:
                raw = tl.dot(q_tile, tl.trans(k_tile), input_precision="ieee") * scale
            else:
                raw = tl.dot(q_tile, tl.trans(k_tile)) * scale
            raw = tl.where(s_ok[None, :], raw, float("-inf"))
            m_new = tl.maximum(m_raw, tl.max(raw, axis=1))
            p = tl.exp(raw - m_new[:, None])
            rescale = tl.exp(m_raw - m_new)
            l_raw = l_raw * rescale + tl.sum(p, axis=1)
            v_tile = tl.load(values + (kv_head * S + s[:, None]) * D + d[None, :], mask=kv_mask, other=0.0)
            acc_raw = acc_raw * rescale[:, None] + tl.dot(p, v_tile.to(tl.float32), input_precision="ieee")
            m_raw = m_new
        acc = tl.where(sees_nothing[:, None], acc_raw, acc)
        l_i = tl.where(sees_nothing, l_raw, l_i)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # tile rows past T only
    tl.store(out + (bh * T + t[:, None]) * D + d[None, :], acc / l_i[:, None], mask=t_ok[:, None] & d_ok[None, :])
