"""Attention over a slot cache: the torch reference implementations (the specification of the kernels).

Every key carries an explicit position and an additive bias, so one function serves the plain causal
forward, chunked prefill over [cache slots ; chunk] and the decode step:

    logits[i, j] = q_i · k_j / sqrt(d) + key_bias[j]      if key j is visible to query i
                 = -inf                                  otherwise

key j is visible to query i when  key_pos[j] >= 0  and  key_pos[j] <= q_pos[i]
and (with a sliding window W)     q_pos[i] - key_pos[j] < W.

`key_bias` is `alpha * log w` for cache slots (0 for exact tokens, -inf for empty slots), which is how merged
slots stand for several tokens (ZSMerge's compensated attention). Shapes use B batch, Hq query heads,
Hkv key/value heads (G = Hq / Hkv query heads share one), T queries, S keys, D head dim.

Each Triton kernel has its own module beside this one, holding its torch reference, the kernel and the
dispatcher: decode_attention.py, chunk_attention.py (over `prefill_attention`), window_scores.py
(`weighted_column_sums`), zsmerge_update.py; dispatch.py says which runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Re-exported: the dispatcher (torch reference on CPU, Triton on CUDA) lives with its kernel.
from kvzoo_kernels.decode_attention import decode_attention  # noqa: F401

_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # what SDPA runs on the CPU

# Queries per block in prefill: bounds the [B, Hq, block, S] logits/mask memory for long prompts.
QUERY_BLOCK = 256


def visibility_bias(
    q_pos: torch.Tensor, key_pos: torch.Tensor, key_bias: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Additive bias [B, Hkv, T, S] from positions.

    q_pos: [B, T]; key_pos, key_bias: [B, Hkv, S]. A query row that sees no key at all (a padding query)
    gets a zero row instead of all -inf, so softmax stays finite; its output is never used.
    """
    qp = q_pos[:, None, :, None]  # [B, 1, T, 1]
    kp = key_pos[:, :, None, :]  # [B, Hkv, 1, S]
    visible = (kp >= 0) & (kp <= qp)
    if window is not None:
        visible &= (qp - kp) < window
    bias = key_bias[:, :, None, :].expand(visible.shape)
    visible &= torch.isfinite(bias)
    out = torch.where(visible, bias, torch.full((), float("-inf"), dtype=bias.dtype, device=bias.device))
    sees_nothing = ~visible.any(dim=-1, keepdim=True)
    return out.masked_fill(sees_nothing, 0.0)


def _fold_groups(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hq, T, D] -> [B, Hkv, G*T, D]: a group's query heads become extra query rows of its KV head."""
    b, hq, t, d = q.shape
    return q.reshape(b, num_kv_heads, (hq // num_kv_heads) * t, d)


def _unfold_groups(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, hkv, gt, d = x.shape
    return x.reshape(b, num_heads, gt * hkv // num_heads, d)


def _expand_bias_to_groups(bias: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, T, S] -> [B, Hkv, G*T, S] matching `_fold_groups`."""
    b, hkv, t, s = bias.shape
    return bias[:, :, None].expand(b, hkv, groups, t, s).reshape(b, hkv, groups * t, s)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_bias: torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    """Exact attention of T queries over S keys; returns [B, Hq, T, D].

    q: [B, Hq, T, D]; k, v: [B, Hkv, S, D]; q_pos: [B, T]; key_pos, key_bias: [B, Hkv, S].
    Queries are processed in blocks of QUERY_BLOCK so no [T, S] matrix is ever materialised whole.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    groups = hq // hkv
    outs = []
    for start in range(0, t, QUERY_BLOCK):
        stop = min(t, start + QUERY_BLOCK)
        bias = visibility_bias(q_pos[:, start:stop], key_pos, key_bias, window).to(q.dtype)
        qb = _fold_groups(q[:, :, start:stop], hkv)
        ob = F.scaled_dot_product_attention(qb, k, v, attn_mask=_expand_bias_to_groups(bias, groups))
        outs.append(_unfold_groups(ob, hq))
    return torch.cat(outs, dim=2)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fast path for a whole unpadded prompt with no cache and no window: plain causal attention.

    Returns the output [B, Hq, T, D] and, on the CPU, each query's log partition function lse [B, Hq, T] fp32
    (log sum_j exp(q_i . k_j / sqrt(D)) over the keys it sees), which the flash kernel computes anyway and
    the accumulated-attention statistic needs (kvzoo_kernels/column_sums_cpu.py); None elsewhere."""
    if q.device.type == "cpu":
        out, lse = _cpu_flash(q, k, v, is_causal=True, scale=1.0 / math.sqrt(q.shape[-1]))  # GQA: Hq % Hkv == 0
        return out, lse
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]), None


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_bias: torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    """Softmax attention probabilities [B, Hq, T, S] in fp32 (for a few queries, e.g. an observation window)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    bias = visibility_bias(q_pos, key_pos, key_bias, window)  # [B, Hkv, T, S] fp32
    logits = torch.einsum("bhgtd,bhsd->bhgts", q.reshape(b, hkv, hq // hkv, t, d).float(), k.float())
    logits = logits / math.sqrt(d) + bias[:, :, None]
    return logits.softmax(dim=-1).reshape(b, hq, t, -1)
