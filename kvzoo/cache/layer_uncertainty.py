"""A layer's uncertainty (ZigZagKV, METHODS.md 3.1): how many of its keys it needs, measured on the attention of
the prompt's last queries, so that the layers can share one budget by need (`budgets.zigzag_budgets`).
ZigZagKV allocates with it; ZSMerge and KVMerger with `layer_budgets="uncertainty"` (`shares_by_need`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvzoo.cache.budgets import min_budget_attention, min_budget_output, zigzag_budgets
from kvzoo.cache.selection import recent_mask
from kvzoo_kernels.attention import attention_probs

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk

# ZigZagKV's defaults, which ZSMerge's allocation shares: SnapKV's observation window of 32 queries, the output
# kept within 1 - 0.9, and no layer below a fifth of the average budget (the kvpress port's bound).
WINDOW = 32
TAU = 0.9
BOUND_RATIO = 0.2


def window_attention(chunk: "PrefillChunk", window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs [B, Hq, w, S], q_pos [B, w]): the attention of the chunk's last w = min(window, T) queries over
    its candidates, and their positions (-1 at padding)."""
    w = min(window, chunk.q.shape[2])
    q_pos = chunk.q_pos[:, -w:]
    return attention_probs(chunk.q[:, :, -w:], chunk.keys, q_pos, chunk.key_pos, chunk.key_bias, chunk.window), q_pos


def attention_uncertainty(chunk: "PrefillChunk", window: int, tau: float) -> torch.Tensor:
    """[B] fp32 the paper's LMBA: the mean over query heads of the fewest keys holding `tau` of the window's
    summed attention (`budgets.min_budget_attention`)."""
    probs, q_pos = window_attention(chunk, window)
    per_head = torch.einsum("bhts,bt->bhs", probs, (q_pos >= 0).float())  # [B, Hq, S]
    return min_budget_attention(per_head, tau).float().mean(dim=1)


def output_uncertainty(chunk: "PrefillChunk", rank: torch.Tensor, recent: torch.Tensor | int, window: int,
                       tau: float) -> torch.Tensor:
    """[B] fp32 LMBO: the mean over query heads of the fewest keys, taken as the method keeps them (its `recent`
    newest tokens first, [B] or an int, then by `rank` [B, Hkv, S]), that keep the window's attention output
    within relative error 1 - tau of the full one (`budgets.min_budget_output`)."""
    probs, q_pos = window_attention(chunk, window)
    # Padding and empty slots are no keys: last, whatever their rank (a real token ranked 0 must not follow them).
    first = rank.masked_fill(recent_mask(chunk, recent), float("inf")).masked_fill(~torch.isfinite(chunk.key_logw),
                                                                                   float("-inf"))
    order = first.argsort(dim=-1, descending=True, stable=True)  # [B, Hkv, S]
    return min_budget_output(probs, chunk.values, order, 1.0 - tau, q_pos >= 0).float().mean(dim=1)


def shares_by_need(need: torch.Tensor, averages: list[int], prompt_lens: list[int],
                   smallest: int = 1) -> list[list[int]]:
    """Per sequence, its layers' budgets: ZigZagKV's shares of L times its average budget `averages[b]` by its
    layers' needs (`need` [L, B], e.g. `output_uncertainty` of each layer), none below a fifth of the average nor
    below `smallest`, none above the prompt (`budgets.zigzag_budgets`); every layer the average when that covers
    the prompt (nothing to share)."""
    return [[avg] * len(layer_needs) if avg >= n else
            zigzag_budgets(layer_needs, avg, max(smallest, int(BOUND_RATIO * avg)), smallest, n)
            for layer_needs, n, avg in zip(need.T.tolist(), prompt_lens, averages)]
