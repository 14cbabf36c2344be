"""Importance statistics shared by the methods: observation-window attention (SnapKV, PyramidKV, ZigZagKV,
ZSMerge), accumulated attention over all prompt queries (H2O, KVMerger), and their GQA reduction.

None of these materialises a full [T, T] attention matrix: the window is a few queries, and accumulated
scores are summed block by block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvzoo_kernels.attention import attention_probs, weighted_column_sums

if TYPE_CHECKING:
    from kvzoo.attention import PrefillChunk


def group_mean(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hq, ...] -> [B, Hkv, ...]: mean over the G query heads that share a KV head."""
    b, hq = x.shape[:2]
    return x.reshape(b, num_kv_heads, hq // num_kv_heads, *x.shape[2:]).mean(dim=2)


def pool_scores(scores: torch.Tensor, kernel: int | None, mode: str) -> torch.Tensor:
    """1-D pooling along the key axis (stride 1, same padding) so neighbours of important tokens survive."""
    if not kernel or kernel <= 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if mode == "max":
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    elif mode == "avg":
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    else:
        raise ValueError(f"pooling must be 'max' or 'avg', got {mode!r}")
    return pooled[..., : shape[-1]].reshape(shape)


def window_scores(
    chunk: "PrefillChunk", window: int, decay: float = 1.0, kernel: int | None = None, pooling: str = "max"
) -> torch.Tensor:
    """Attention of the chunk's last `window` queries to every candidate key, summed with weights
    decay^(age) (age 0 = the last query), pooled, reduced per KV head. Returns [B, Hkv, S] fp32.
    Padding queries contribute nothing."""
    w = min(window, chunk.q.shape[2])
    q_pos = chunk.q_pos[:, -w:]
    probs = attention_probs(chunk.q[:, :, -w:], chunk.keys, q_pos, chunk.key_pos, chunk.key_bias, chunk.window)
    ages = torch.arange(w - 1, -1, -1, device=probs.device, dtype=torch.float32)
    weights = (decay**ages)[None] * (q_pos >= 0)  # [B, w]
    scores = torch.einsum("bhts,bt->bhs", probs, weights)
    return group_mean(pool_scores(scores, kernel, pooling), chunk.keys.shape[1])


def accumulated_scores(chunk: "PrefillChunk", decay: float = 1.0, normalise: bool = False) -> torch.Tensor:
    """Column sums of the chunk's attention over all its queries (decay^(age)-weighted), per KV head [B, Hkv, S].

    `normalise=True` divides each key's sum by the number of queries that could see it (kvpress' observed
    attention), removing the bias towards early tokens."""
    t = chunk.q.shape[2]
    ages = torch.arange(t - 1, -1, -1, device=chunk.q.device, dtype=torch.float32)
    valid = (chunk.q_pos >= 0).float()
    weights = (decay**ages)[None] * valid
    sums = weighted_column_sums(
        chunk.q, chunk.keys, chunk.q_pos, chunk.key_pos, chunk.key_bias, chunk.window, weights
    )
    scores = group_mean(sums, chunk.keys.shape[1])
    if normalise:
        # A chunk's valid queries have consecutive positions, so the queries that see key j number
        # last_pos - pos_j + 1, at most the count of valid queries.
        last_pos = chunk.q_pos.max(dim=1).values[:, None, None]  # [B, 1, 1]
        n_valid = valid.sum(1)[:, None, None]
        seen_by = torch.minimum((last_pos - chunk.key_pos + 1).float(), n_valid).clamp(min=1)
        scores = scores / seen_by
    return scores
