"""ZSMerge's prefill merge (METHODS.md section 1): the tokens a prompt's ring and context do not keep verbatim are
averaged into the residual slots, each slot a running count-weighted mean of its members (its weight w read
as the attention bias alpha * log w). One job: given where each candidate goes, build the slots. Which tokens
are kept (the ranking) stays in `zsmerge.py`; a decode step's merge is the fused `kvzoo_kernels.zsmerge_update`.

Shapes: B sequences, Hkv KV heads, S candidates (the slots already held, then the chunk's tokens), D head dim,
C slots; every fresh slot tensor has one extra slot, C (the "dummy"), that swallows whatever is not kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvzoo.cache.slots import NEG_INF
from kvzoo_kernels.zsmerge_update import most_similar

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk

SCORE_UPDATES = ("max", "sum")  # a merged slot's score: the max of its members' (METHODS.md A5) or their sum


@dataclass(frozen=True)
class ResidualMerge:
    """Where a prefill's leftover tokens went (`merge_groups`): leftover [B, Hkv, S] bool, target [B, Hkv, S]
    residual slot (C, the dummy, for the rest), merged / was_filled [B, Hkv, C+1] the slots that took members /
    held tokens before."""

    leftover: torch.Tensor
    target: torch.Tensor
    merged: torch.Tensor
    was_filled: torch.Tensor


def scatter_slots(chunk: "PrefillChunk", score: torch.Tensor, target: torch.Tensor, dummy: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh [B, Hkv, C+1(, D)] slot tensors (keys, values, log w, score, position) with every verbatim
    candidate written at its `target` [B, Hkv, S] slot (`dummy` = C for the rest)."""
    b, hkv, s, d = chunk.keys.shape
    dev = chunk.keys.device
    shape = (b, hkv, dummy + 1)
    tgt_d = target[..., None].expand(b, hkv, s, d)
    k = torch.zeros(*shape, d, dtype=chunk.keys.dtype, device=dev).scatter(2, tgt_d, chunk.keys)
    v = torch.zeros(*shape, d, dtype=chunk.values.dtype, device=dev).scatter(2, tgt_d, chunk.values)
    logw = torch.full(shape, NEG_INF, device=dev).scatter(-1, target, chunk.key_logw)
    sc = torch.zeros(shape, device=dev).scatter(-1, target, score)
    pos = torch.full(shape, -1, dtype=torch.int64, device=dev).scatter(-1, target, chunk.key_pos)
    logw[..., dummy] = NEG_INF
    return k, v, logw, sc, pos


def residual_groups(chunk: "PrefillChunk", leftover: torch.Tensor, residual_slot: torch.Tensor,
                    residual: torch.Tensor, metric: str) -> torch.Tensor:
    """Residual slot [B, Hkv, S] each leftover token merges into.

    Empty residual slots (the usual first prefill): leftovers, in position order, are cut into `residual`
    [B, 1, 1] contiguous groups of near-equal size (the reference code's "group-based merging by spatial
    arrangement"). Residual slots already holding tokens (later prompt chunks): the first leftovers take the
    remaining empty residual slots, one each, as in decode; the rest go to the residual key most similar by
    `metric` (Eq. 6). `residual_slot` [B, Hkv, S] marks the candidates that are residual slots (the first)."""
    order = chunk.key_pos.masked_fill(~leftover, torch.iinfo(torch.int64).max).argsort(dim=-1)
    n = leftover.sum(-1, keepdim=True)  # [B, Hkv, 1]
    ranks = torch.arange(order.shape[-1], device=order.device).expand_as(order).contiguous()
    rho = torch.empty_like(order).scatter_(-1, order, ranks)  # rank of each leftover by position
    m, r = torch.div(n, residual, rounding_mode="floor"), n % residual
    big = r * (m + 1)  # leftovers in the first r groups of size m + 1
    contiguous = torch.where(rho < big, rho // (m + 1).clamp(min=1), r + (rho - big) // m.clamp(min=1))
    contiguous = contiguous.clamp(min=0)
    held = residual_slot & torch.isfinite(chunk.key_logw)
    if not bool(held.any()):
        return contiguous
    n_residual = int(residual.max())  # residual slots are the first candidates
    similar = most_similar(chunk.keys, chunk.keys[:, :, :n_residual], held[..., :n_residual], metric)
    empty = residual_slot & ~held
    nth_empty = (~empty).to(torch.int8).argsort(dim=-1, stable=True)  # empty residual slots first
    into_empty = nth_empty.gather(-1, rho.clamp(max=order.shape[-1] - 1))
    partial = torch.where(rho < empty.sum(-1, keepdim=True), into_empty, similar)
    return torch.where(held.any(-1, keepdim=True), partial, contiguous)


def merge_groups(chunk: "PrefillChunk", leftover: torch.Tensor, group: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, logw: torch.Tensor, pos: torch.Tensor) -> ResidualMerge:
    """Count-weighted merge of the `leftover` [B, Hkv, S] tokens into their `group` residual slots, in place on
    the fresh slot tensors (`scatter_slots`); a merged slot's position is its newest member's. Returns where
    each went, for `merge_scores`."""
    b, hkv, s, d = chunk.keys.shape
    dummy = k.shape[2] - 1
    tgt = torch.where(leftover, group, dummy)
    tgt_d = tgt[..., None].expand(b, hkv, s, d)
    w_old = logw.exp()  # 0 for empty slots
    sum_k = (k.float() * w_old[..., None]).scatter_add(2, tgt_d, chunk.keys.float())
    sum_v = (v.float() * w_old[..., None]).scatter_add(2, tgt_d, chunk.values.float())
    w = w_old.scatter_add(-1, tgt, leftover.float())
    merged = (w > 0) & (w != w_old)
    safe_w = w.clamp(min=1e-30)[..., None]
    k.copy_(torch.where(merged[..., None], (sum_k / safe_w).to(k.dtype), k))
    v.copy_(torch.where(merged[..., None], (sum_v / safe_w).to(v.dtype), v))
    logw.copy_(torch.where(merged, w.log(), logw))
    newest = pos.scatter_reduce(-1, tgt, chunk.key_pos.masked_fill(~leftover, -1), "amax")
    pos.copy_(torch.where(merged, newest, pos))
    return ResidualMerge(leftover, tgt, merged, w_old > 0)


def merge_scores(sc: torch.Tensor, score: torch.Tensor, merge: ResidualMerge, score_update: str) -> None:
    """A merged residual slot's score [B, Hkv, C+1] from its members' `score` [B, Hkv, S] (`score_update`, one
    of SCORE_UPDATES: the max of the old and the members', or their sum), in place."""
    member_score = score.masked_fill(~merge.leftover, NEG_INF)
    if score_update == "max":
        best = torch.full_like(sc, NEG_INF).scatter_reduce(-1, merge.target, member_score, "amax")
        old = torch.where(merge.was_filled, sc, NEG_INF)
        sc.copy_(torch.where(merge.merged, torch.maximum(best, old), sc))
    else:
        sc.copy_(torch.where(merge.merged, sc.scatter_add(-1, merge.target, score * merge.leftover), sc))
