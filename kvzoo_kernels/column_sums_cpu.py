"""Weighted column sums of a causal prompt's attention on the CPU from two fused attention passes.

The statistic (see `window_scores.weighted_column_sums_reference`, the specification) is

    colsum[h, j] = sum_i w_i * p[h, i, j],    p[h, i, j] = exp(s_ij - lse_i) for j <= i,   s_ij = q_i . k_j / sqrt(D)

where lse_i is query i's log partition function. Materialising p block by block costs a dozen passes over
[queries x keys] in memory. Instead, for a fresh prompt (keys = the prompt's own tokens, no padding, no
sliding window, no slot bias):

1. lse_i comes from one causal flash-attention pass (the CPU kernel returns each row's logsumexp), or from
   the model's own attention over the same prompt, which is that pass (`row_lse`);
2. the column sum is itself a logsumexp, of key j's "row" over the queries that see it:
   log colsum[j] = logsumexp_{i >= j} (k_j . q_i / sqrt(D) + log w_i - lse_i). That is a flash-attention
   pass with keys as queries and queries as keys; the per-query term log w_i - lse_i rides in an extra
   head dimension (key side: its value * sqrt(D); query side: 1), and reversing both sequences turns
   "i >= j" into the causal mask the kernel has.

Both passes are O(T^2) compute with O(T) memory, fused. Only the logsumexp output is read, so the values fed
to the kernel are any contiguous tensor of the right shape (each pass's own keys): a broadcast (stride-0) zero
tensor, the obvious choice, made each pass 2-3x slower on torch 2.13's CPU kernel (1024 tokens, 9 heads).
Measured ~3x faster than the block reference at 2k and 8k tokens with the zero values (H2O, KVMerger
prefill; tools/RESULTS.md), about twice that since.

`causal_band_column_sums` sums only the queries within a band after each key (ZSMerge's distant rate is the
whole sum less that band): with lse_i known it is a [keys x (keys + band)] product per block of keys, a
fraction of a full pass when the band is short.
"""

from __future__ import annotations

import math

import torch

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_NO_WEIGHT = -1.0e4  # log-weight of a query with weight 0: exp(-1e4) underflows to 0 without a NaN


def fits_causal_fast_path(
    q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, key_pos: torch.Tensor, key_bias: torch.Tensor,
    window: int | None, query_weights: torch.Tensor,
) -> bool:
    """Whether `causal_column_sums` computes the same statistic: CPU tensors, keys = the queries' own tokens
    at the same positions (no cache slots, no padding), no sliding window, no slot bias, weights >= 0.
    Host-side checks: prefill only, never inside a compiled step."""
    if q.device.type != "cpu" or window is not None or q.shape[2] != k.shape[2]:
        return False
    if bool((q_pos < 0).any()) or not torch.equal(key_pos, q_pos[:, None, :].expand_as(key_pos)):
        return False
    return bool((key_bias == 0).all()) and bool((query_weights >= 0).all())


def causal_column_sums(q: torch.Tensor, k: torch.Tensor, query_weights: torch.Tensor,
                       row_lse: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_i * softmax(causal q k^T / sqrt(D))[i, j] -> [B, Hq, T] fp32, for q [B, Hq, T, D],
    k [B, Hkv, T, D] (GQA: Hq a multiple of Hkv), w [B, T]; computed in fp32 like the reference.

    `row_lse` [B, Hq, T]: the queries' log partition functions if the caller has them (the model's own causal
    attention returns them, kvzoo_kernels.attention.causal_attention), which saves pass 1. Read only for fp32
    q, where it is the same computation; lower-precision inputs are upcast and pass 1 runs in fp32."""
    b, hq, t, d = q.shape
    scale = 1.0 / math.sqrt(d)
    reuse_lse = row_lse is not None and q.dtype == torch.float32
    q = q.float()
    k = k.float().repeat_interleave(hq // k.shape[1], dim=1)  # [B, Hq, T, D]
    if reuse_lse:
        lse = row_lse.float()
    else:
        _, lse = _flash(q, k, k, is_causal=True, scale=scale)  # [B, Hq, T]; the output (values = k) is unused
    log_w = torch.where(query_weights > 0, query_weights.clamp(min=1e-38).log(), _NO_WEIGHT)[:, None, :].float()
    offset = (log_w - lse) / scale  # [B, Hq, T], times sqrt(D) so that the kernel's scale gives it back
    rows = torch.cat([k, torch.ones_like(k[..., :1])], dim=-1).flip(2)  # keys act as queries, last first
    cols = torch.cat([q, offset[..., None]], dim=-1).flip(2)
    _, log_sums = _flash(rows, cols, cols, is_causal=True, scale=scale)
    return log_sums.flip(2).exp()


KEY_BLOCK = 256  # keys per block of the band sums: memory [B, Hq, KEY_BLOCK, KEY_BLOCK + band - 1]


def causal_band_column_sums(q: torch.Tensor, k: torch.Tensor, query_weights: torch.Tensor, within: int,
                            row_lse: torch.Tensor | None = None) -> torch.Tensor:
    """sum_{j <= i < j + within} w_i * softmax(causal q k^T / sqrt(D))[i, j] -> [B, Hq, T] fp32: the part of
    `causal_column_sums` from the queries fewer than `within` positions after each key (same shapes and
    `row_lse` rule). Block by block of keys: each block's probabilities to the queries of its band only."""
    b, hq, t, d = q.shape
    scale = 1.0 / math.sqrt(d)
    q = q.float()
    k = k.float().repeat_interleave(hq // k.shape[1], dim=1)  # [B, Hq, T, D]
    if row_lse is not None and row_lse.dtype == torch.float32:
        lse = row_lse
    else:
        _, lse = _flash(q, k, k, is_causal=True, scale=scale)  # [B, Hq, T]
    weights = query_weights.float()
    out = torch.empty(b, hq, t, dtype=torch.float32, device=q.device)
    for start in range(0, t, KEY_BLOCK):
        stop = min(t, start + KEY_BLOCK)
        reach = min(t, stop + within - 1)  # the band's last query (exclusive)
        logits = k[:, :, start:stop] @ q[:, :, start:reach].transpose(-1, -2) * scale  # [B, Hq, keys, queries]
        distance = torch.arange(start, reach, device=q.device)[None, :] - torch.arange(start, stop, device=q.device)[:, None]
        in_band = (distance >= 0) & (distance < within)  # [keys, queries]
        probs = torch.exp(logits - lse[:, :, None, start:reach]).masked_fill(~in_band, 0.0)
        out[:, :, start:stop] = (probs * weights[:, None, None, start:reach]).sum(-1)
    return out
