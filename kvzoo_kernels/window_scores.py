"""Column scores of attention: sum_i weight_i * probs[i, j] per key j, without a [T, S] matrix.

This is the statistic the methods rank keys by at prefill: over an observation window (SnapKV, PyramidKV,
ZSMerge: the last w queries, decay-weighted) or over every prompt query (H2O, KVMerger: accumulated
attention). `probs` is the attention of `kvzoo_kernels.attention.attention_probs`: positions, the sliding
window and the per-key bias decide visibility; a query that sees no key at all (padding) gets the plain
softmax of q·k/sqrt(D) over all S keys, which callers weight by 0.

- `weighted_column_sums_reference`: the torch specification, and the CPU path (query blocks of
  QUERY_BLOCK rows, so memory stays [block, S]).
- The Triton version runs two passes: per (sequence, query head, block of queries) the row max and sum of
  exp over all keys; then per (sequence, query head, block of keys) the weighted column sum of
  exp(logit - max) / sum over all queries, recomputing the logits. Queries that see nothing take one more
  loop over the keys, only in the blocks that hold such a query.
- `weighted_column_sums`: the dispatcher (kvzoo_kernels.dispatch).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kvzoo_kernels.attention import QUERY_BLOCK, attention_probs
from kvzoo_kernels.column_sums_cpu import causal_band_column_sums, causal_column_sums, fits_causal_fast_path
from kvzoo_kernels.dispatch import block_size, check_launchable, kernels_setting, triton_kernel, use_triton, window_arg

tl: Any = None  # triton.language, bound on the first Triton launch (kvzoo_kernels.dispatch.triton_kernel)


def weighted_column_sums_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_bias: torch.Tensor,
    window: int | None,
    query_weights: torch.Tensor,
    within: int | None = None,
) -> torch.Tensor:
    """sum_i query_weights[b, i] * probs[b, h, i, j] -> [B, Hq, S] in fp32, computed block by block.

    With all-ones weights this is H2O's accumulated attention; with geometric weights lambda^(T-1-i) over
    the last w queries it is ZSMerge's decayed contribution score. q: [B, Hq, T, D]; k: [B, Hkv, S, D];
    q_pos, query_weights: [B, T]; key_pos, key_bias: [B, Hkv, S].

    `within` sums only the queries fewer than that many positions after the key (query position - key
    position < within: the key's own query and the within - 1 after it); the probabilities stay those of the
    whole softmax (each query's attention over every key it sees), so the sum is the part of the key's
    attention that came from that near, and the whole sum less it the part from further away.
    """
    t = q.shape[2]
    # [B, Hq, 1, S] each query head's key positions, once (the band's distances are q_pos - these)
    head_key_pos = key_pos.repeat_interleave(q.shape[1] // k.shape[1], dim=1)[:, :, None, :]
    total = None
    for start in range(0, t, QUERY_BLOCK):
        stop = min(t, start + QUERY_BLOCK)
        probs = attention_probs(q[:, :, start:stop], k, q_pos[:, start:stop], key_pos, key_bias, window)
        if within is not None:
            probs = probs * (q_pos[:, None, start:stop, None] - head_key_pos < within)  # [B, Hq, block, S]
        part = torch.einsum("bhts,bt->bhs", probs, query_weights[:, start:stop].float())
        total = part if total is None else total + part
    assert total is not None
    return total


def weighted_column_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_bias: torch.Tensor,
    window: int | None,
    query_weights: torch.Tensor,
    row_lse: torch.Tensor | None = None,
    within: int | None = None,
) -> torch.Tensor:
    """`weighted_column_sums_reference`'s contract; Triton on CUDA tensors (see kvzoo_kernels.dispatch); on
    the CPU, a fresh causal prompt takes two fused attention passes (kvzoo_kernels.column_sums_cpu), one if
    the queries' log partition functions `row_lse` [B, Hq, T] are given, unless KVZOO_KERNELS=torch asks for
    the reference."""
    if within is not None and within < 1:
        raise ValueError(f"weighted_column_sums: within must be None or >= 1, got {within}")
    if use_triton(q):
        return weighted_column_sums_triton(q, k, q_pos, key_pos, key_bias, window, query_weights, within=within)
    if kernels_setting() != "torch" and fits_causal_fast_path(q, k, q_pos, key_pos, key_bias, window, query_weights):
        if within is None:
            return causal_column_sums(q, k, query_weights, row_lse)
        return causal_band_column_sums(q, k, query_weights, within, row_lse)
    return weighted_column_sums_reference(q, k, q_pos, key_pos, key_bias, window, query_weights, within)


# --- Triton ---------------------------------------------------------------------------------------------

BLOCK_T = 64  # queries per tile on a GPU
BLOCK_S = 64  # keys per tile on a GPU


def weighted_column_sums_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_bias: torch.Tensor,
    window: int | None,
    query_weights: torch.Tensor,
    block_t: int | None = None,
    block_s: int | None = None,
    within: int | None = None,
) -> torch.Tensor:
    """The Triton path (a torch custom op). Tile sizes (powers of two >= 16) default to GPU-sized values;
    tests pass small ones to exercise several tiles on tiny shapes."""
    block_t = block_t or block_size(q.shape[2], maximum=BLOCK_T)
    block_s = block_s or block_size(k.shape[2], maximum=BLOCK_S)
    for name, value in (("block_t", block_t), ("block_s", block_s)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"weighted_column_sums_triton: {name}={value} must be a power of two >= 16")
    return torch.ops.kvzoo.weighted_column_sums(
        q, k, q_pos, key_pos, key_bias, window_arg(window), query_weights, block_t, block_s,
        window_arg(within)
    )


@torch.library.custom_op("kvzoo::weighted_column_sums", mutates_args=())
def _weighted_column_sums_op(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_bias: torch.Tensor,
    window: int,
    query_weights: torch.Tensor,
    block_t: int,
    block_s: int,
    within: int,
) -> torch.Tensor:
    check_launchable(q, k, q_pos, key_pos, key_bias, query_weights)
    q, k = (t.contiguous() for t in (q, k))
    q_pos = q_pos.to(torch.int64).contiguous()
    key_pos = key_pos.to(torch.int64).contiguous()
    key_bias = key_bias.float().contiguous()
    query_weights = query_weights.float().contiguous()
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    row_max = torch.empty(b, hq, t, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    row_masked = torch.empty(b, hq, t, dtype=torch.int8, device=q.device)  # 0: the query sees no key
    out = torch.empty(b, hq, s, dtype=torch.float32, device=q.device)
    block_d = block_size(d)
    sqrt_d = math.sqrt(d)
    _row_stats_kernel[(b * hq, max(1, -(-t // block_t)))](
        q, k, q_pos, key_pos, key_bias, row_max, row_sum, row_masked,
        t, s, d, hq, hq // hkv, window, sqrt_d,
        BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=block_d,
    )
    _column_kernel[(b * hq, max(1, -(-s // block_s)))](
        q, k, q_pos, key_pos, key_bias, row_max, row_sum, row_masked, query_weights, out,
        t, s, d, hq, hq // hkv, window, within, sqrt_d,
        BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=block_d,
    )
    return out


@_weighted_column_sums_op.register_fake
def _(q, k, q_pos, key_pos, key_bias, window, query_weights, block_t, block_s, within):  # noqa: ANN001, ANN202
    return q.new_empty(q.shape[0], q.shape[1], k.shape[2], dtype=torch.float32)


@triton_kernel
def _row_stats_kernel(
    q, k, q_pos, key_pos, key_bias, row_max, row_sum, row_masked,
    T, S, D, HQ, G, window, sqrt_d,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (sequence * query head, block of queries): max and sum of exp of each query's visible logits."""
    bh = tl.program_id(0)
    b = bh // HQ
    h = (bh % HQ) // G  # the KV head
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < T
    d_ok = d < D
    q_tile = tl.load(q + (bh * T + t[:, None]) * D + d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
    qp = tl.load(q_pos + b * T + t, mask=t_ok, other=-1)
    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    kv_head = b * (HQ // G) + h
    for start in range(0, S, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        s_ok = s < S
        k_tile = tl.load(k + (kv_head * S + s[:, None]) * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                         other=0.0).to(tl.float32)
        kp = tl.load(key_pos + kv_head * S + s, mask=s_ok, other=-1)
        kb = tl.load(key_bias + kv_head * S + s, mask=s_ok, other=float("-inf"))
        visible = (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None]) & (qp[:, None] - kp[None, :] < window)
        visible = visible & (kb[None, :] > float("-inf"))
        logits = tl.dot(q_tile, tl.trans(k_tile), input_precision="ieee") / sqrt_d + kb[None, :]
        logits = tl.where(visible, logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
        m_i = m_new
    sees_nothing = t_ok & (m_i == float("-inf"))
    if tl.sum(sees_nothing.to(tl.int32), axis=0) > 0:  # padding queries: plain softmax over all S keys
        m_raw = tl.full([BLOCK_T], float("-inf"), tl.float32)
        l_raw = tl.zeros([BLOCK_T], tl.float32)
        for start in range(0, S, BLOCK_S):
            s = start + tl.arange(0, BLOCK_S)
            s_ok = s < S
            k_tile = tl.load(k + (kv_head * S + s[:, None]) * D + d[None, :],
                             mask=s_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            raw = tl.dot(q_tile, tl.trans(k_tile), input_precision="ieee") / sqrt_d
            raw = tl.where(s_ok[None, :], raw, float("-inf"))
            m_new = tl.maximum(m_raw, tl.max(raw, axis=1))
            l_raw = l_raw * tl.exp(m_raw - m_new) + tl.sum(tl.exp(raw - m_new[:, None]), axis=1)
            m_raw = m_new
        m_i = tl.where(sees_nothing, m_raw, m_i)
        l_i = tl.where(sees_nothing, l_raw, l_i)
    tl.store(row_max + bh * T + t, m_i, mask=t_ok)
    tl.store(row_sum + bh * T + t, l_i, mask=t_ok)
    tl.store(row_masked + bh * T + t, (~sees_nothing).to(tl.int8), mask=t_ok)


@triton_kernel
def _column_kernel(
    q, k, q_pos, key_pos, key_bias, row_max, row_sum, row_masked, query_weights, out,
    T, S, D, HQ, G, window, within, sqrt_d,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (sequence * query head, block of keys): sum over the queries fewer than `within` positions
    after each key of weight * probability (the probabilities of the whole softmax, pass 1's row stats)."""
    bh = tl.program_id(0)
    b = bh // HQ
    h = (bh % HQ) // G
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < S
    d_ok = d < D
    kv_head = b * (HQ // G) + h
    k_tile = tl.load(k + (kv_head * S + s[:, None]) * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
    kp = tl.load(key_pos + kv_head * S + s, mask=s_ok, other=-1)
    kb = tl.load(key_bias + kv_head * S + s, mask=s_ok, other=float("-inf"))
    column = tl.zeros([BLOCK_S], tl.float32)
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        t_ok = t < T
        q_tile = tl.load(q + (bh * T + t[:, None]) * D + d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                         other=0.0).to(tl.float32)
        qp = tl.load(q_pos + b * T + t, mask=t_ok, other=-1)
        m = tl.load(row_max + bh * T + t, mask=t_ok, other=float("-inf"))
        total = tl.load(row_sum + bh * T + t, mask=t_ok, other=1.0)
        weight = tl.load(query_weights + b * T + t, mask=t_ok, other=0.0)
        visible = (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None]) & (qp[:, None] - kp[None, :] < window)
        visible = visible & (kb[None, :] > float("-inf"))
        masked = tl.load(row_masked + bh * T + t, mask=t_ok, other=1) != 0
        raw = tl.dot(q_tile, tl.trans(k_tile), input_precision="ieee") / sqrt_d
        # Rows that see nothing use the unbiased logits over all S keys (their stats came from pass 1).
        logits = tl.where(masked[:, None], raw + kb[None, :], raw)
        visible = tl.where(masked[:, None], visible, s_ok[None, :])
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # only tile rows past T: no inf - inf
        p = tl.where(visible, tl.exp(logits - m_safe[:, None]) / total[:, None], 0.0)
        near = (qp[:, None] - kp[None, :]) < within  # every pair without a band (within = 2**62)
        column += tl.sum(tl.where(near, p, 0.0) * weight[:, None], axis=0)
    tl.store(out + bh * S + s, column, mask=s_ok)
