"""Slot bookkeeping shared by the methods: keep the top candidates at prefill, and pick a slot at decode.

Decode helpers are tensor-only (no host syncs, static shapes): they run inside the compiled decode step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvzoo.cache.scoring import share_of
from kvzoo.cache.slots import NEG_INF, LayerSlots

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk


def keep_top(
    slots: LayerSlots,
    chunk: "PrefillChunk",
    rank: torch.Tensor,
    keep: torch.Tensor,
    stored_score: torch.Tensor | None = None,
    tie: torch.Tensor | None = None,
) -> None:
    """Keep, per (sequence, head), the `keep[b]` highest-`rank` candidates of [slots in use ; chunk tokens].

    rank: [B, Hkv, S] (use +inf to force a candidate in); keep: [B] slots to fill; stored_score: [B, Hkv, S]
    statistic saved with each kept slot (default: the candidates' current score); tie: [B, Hkv, S] order
    among equal ranks (see `rank_order`). Empty candidates (padding, empty slots) are never kept. Every
    later slot is emptied.
    """
    valid = torch.isfinite(chunk.key_logw)
    rank = rank.masked_fill(~valid, NEG_INF)
    n = min(slots.capacity, rank.shape[-1])
    idx = rank_order(rank, chunk.key_pos, tie)[..., :n]  # [B, Hkv, n]
    slot_no = torch.arange(n, device=idx.device)
    kept = (slot_no[None, None, :] < keep[:, None, None]) & valid.gather(-1, idx)
    gather_d = idx[..., None].expand(*idx.shape, chunk.keys.shape[-1])
    score = chunk.key_score if stored_score is None else stored_score
    slots.replace_all(
        chunk.keys.gather(2, gather_d),
        chunk.values.gather(2, gather_d),
        torch.where(kept, chunk.key_logw.gather(-1, idx), NEG_INF),
        torch.where(kept, score.gather(-1, idx), 0.0),
        torch.where(kept, chunk.key_pos.gather(-1, idx), -1),
    )


def rank_order(rank: torch.Tensor, key_pos: torch.Tensor, tie: torch.Tensor | None = None) -> torch.Tensor:
    """Candidate indices [B, Hkv, S] by descending rank; equal ranks go to the larger `tie` [B, Hkv, S] first
    (e.g. the unpooled score: max-pooling gives a peak's neighbours the peak's own score, and the peak must
    not lose to them), then to the newer position (zero scores outside a sliding window), so the choice never
    depends on where a candidate sits (left padding, slot order)."""
    order = key_pos.argsort(dim=-1, descending=True, stable=True)
    for key in (tie, rank):  # stable sorts: the last key sorted is the primary one
        if key is not None:
            order = order.gather(-1, key.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
    return order


def top_mask(rank: torch.Tensor, key_pos: torch.Tensor, n: torch.Tensor | int,
             tie: torch.Tensor | None = None) -> torch.Tensor:
    """[B, Hkv, S] bool: per row, the `n` (int or [B, 1, 1]) highest-`rank` candidates in `rank_order`,
    never one ranked -inf."""
    order = rank_order(rank, key_pos, tie)
    nth = torch.arange(rank.shape[-1], device=rank.device)[None, None, :]
    chosen = (nth < torch.as_tensor(n, device=rank.device)) & (rank.gather(-1, order) > float("-inf"))
    return torch.zeros_like(chosen).scatter(-1, order, chosen)


def recent_mask(chunk: "PrefillChunk", recent: torch.Tensor | int) -> torch.Tensor:
    """[B, Hkv, S] candidates among the `recent` most recent tokens of their sequence (by position)."""
    last = chunk.q_pos.max(dim=1).values  # [B]: position of the newest token
    recent_t = torch.as_tensor(recent, device=last.device)
    if recent_t.dim() == 1:
        recent_t = recent_t[:, None, None]
    return (chunk.key_pos >= 0) & (chunk.key_pos > last[:, None, None] - recent_t)


def sink_mask(chunk: "PrefillChunk", sinks: int) -> torch.Tensor:
    """[B, Hkv, S] candidates among the first `sinks` positions of their sequence (attention sinks)."""
    return (chunk.key_pos >= 0) & (chunk.key_pos < sinks)


def slot_index(slots: LayerSlots) -> torch.Tensor:
    """[C] slot numbers, for masks."""
    return torch.arange(slots.capacity, device=slots.logw.device)


def free_slot(slots: LayerSlots) -> tuple[torch.Tensor, torch.Tensor]:
    """(has_free [B, Hkv], first free slot within the sequence's budget [B, Hkv])."""
    usable = ~slots.filled & (slot_index(slots)[None, None, :] < slots.budget[:, None, None])
    return usable.any(-1), usable.to(torch.int8).argmax(-1)


def where_rows(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.where with a per-(batch, head) mask [B, Hkv] broadcast over any trailing dims of a and b
    (for choosing between whole slot contents: keys [B, Hkv, D], counts [B, Hkv], ...)."""
    return torch.where(mask.reshape(mask.shape + (1,) * (a.dim() - mask.dim())), a, b)


def argmin_where(values: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Index of the smallest value among allowed entries, along the last axis."""
    return values.masked_fill(~allowed, float("inf")).argmin(-1)


def kv_probs(probs: torch.Tensor, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode probabilities [B, Hq, C + 1] -> (per-slot [B, Hkv, C], new token's own [B, Hkv]), group mean."""
    b, hq, c1 = probs.shape
    per_kv = probs.reshape(b, num_kv_heads, hq // num_kv_heads, c1).mean(2)
    return per_kv[..., :-1], per_kv[..., -1]


def place_or_evict(
    slots: LayerSlots,
    evict: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    pos_new: torch.Tensor,
    score_new: torch.Tensor,
) -> None:
    """Write the new token into the first free slot within budget, or else over slot `evict` [B, Hkv]."""
    has_free, free = free_slot(slots)
    target = torch.where(has_free, free, evict)
    b, hkv = target.shape
    slots.write(target, k_new, v_new, torch.zeros(b, hkv, device=target.device),
                score_new, pos_new[:, None].expand(b, hkv))


def append_decode_step(
    slots: LayerSlots, k_new: torch.Tensor, v_new: torch.Tensor, pos_new: torch.Tensor
) -> None:
    """Decode step of prefill-only methods: append; once the decode cap is reached, the new token replaces
    the oldest generated token (a sliding window over generated tokens; the compressed prompt stays)."""
    generated = slots.pos >= slots.state["prompt_len"][:, None, None]
    oldest_generated = argmin_where(slots.pos.float(), generated & slots.filled)
    place_or_evict(slots, oldest_generated, k_new, v_new, pos_new, torch.zeros_like(k_new[..., 0]))


def keep_every_candidate(slots: LayerSlots, chunk: "PrefillChunk") -> None:
    """Keep every candidate of [slots in use ; chunk tokens], in position order (the store must have room)."""
    keep_top(slots, chunk, -chunk.key_pos.float(), slots.budget)


def slot_candidates(slots: LayerSlots) -> "PrefillChunk":
    """A layer's own slots seen as selection candidates (for `keep_top` / `recent_mask` after prefill): no
    queries; the newest position is the prompt's last one."""
    from kvzoo.cache.chunk import PrefillChunk

    no_tokens = slots.k[:, :, :0]
    last_pos = (slots.state["prompt_len"] - 1)[:, None]  # [B, 1]
    return PrefillChunk(q=no_tokens, k=no_tokens, v=no_tokens, q_pos=last_pos, keys=slots.k, values=slots.v,
                        key_pos=slots.pos, key_logw=slots.logw, key_score=slots.score, window=None, alpha=0.0)


def shrink_slots(slots: LayerSlots, rank: torch.Tensor, keep: torch.Tensor,
                 tie: torch.Tensor | None = None) -> LayerSlots:
    """A new, smaller store holding, per (sequence, head), the `keep[b]` highest-`rank` filled slots of
    `slots` (equal ranks ordered by `tie`, see `rank_order`), with capacity max(keep) + the decode headroom
    the old store had; `budget` and
    `state["prefill_budget"]` are updated, the rest of `state` is carried over. The old tensors are
    released once the caller drops `slots`."""
    headroom = slots.budget - slots.state["prefill_budget"]  # [B]
    keep = keep.to(device=slots.pos.device, dtype=torch.int64)
    b, hkv, _, d = slots.k.shape
    capacity = int(keep.max()) + int(headroom.max())
    new = LayerSlots.empty(b, hkv, capacity, d, keep + headroom, slots.k.dtype, slots.k.device)
    new.state = {**slots.state, "prefill_budget": keep}
    keep_top(new, slot_candidates(slots), rank, keep, tie=tie)
    return new


def score_shares(slots: LayerSlots, score: torch.Tensor | None = None) -> torch.Tensor:
    """[B, Hkv, C] each filled slot's score (or `score` [B, Hkv, C] >= 0) as a share of its head's total (0 for
    empty slots)."""
    score = slots.score if score is None else score
    return share_of(score.masked_fill(~slots.filled, 0.0), slots.filled)


def widest_shares(layers: list[LayerSlots], heads: list[torch.Tensor] | None = None,
                  scores: list[torch.Tensor] | None = None) -> torch.Tensor:
    """[B, P] for every prompt position, the largest `score_shares` any head of any layer gives its token;
    with `heads` (one [B, Hkv] bool mask per layer), any of those heads; with `scores` (one [B, Hkv, C] per
    layer), the shares of those instead of the slots' scores."""
    n_pos = int(layers[0].state["prompt_len"].max())  # positions are below it: one host read, not one per layer
    widest = None
    for layer_idx, slots in enumerate(layers):
        b, hkv, _ = slots.pos.shape
        spill = torch.where(slots.filled, slots.pos, n_pos)  # empty slots land in a dropped column
        shares = score_shares(slots, None if scores is None else scores[layer_idx])
        if heads is not None:
            shares = shares.masked_fill(~heads[layer_idx][..., None], 0.0)
        per_head = torch.zeros(b, hkv, n_pos + 1, device=slots.pos.device).scatter_reduce(
            -1, spill, shares, "amax")
        layer_max = per_head[..., :n_pos].amax(1)
        widest = layer_max if widest is None else torch.maximum(widest, layer_max)
    assert widest is not None
    return widest


def cross_layer_rank(slots: LayerSlots, widest: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, C] max(each slot's `score_shares`, the `widest_shares` [B, P] of its token)."""
    at_slot = widest[:, None, :].expand(-1, slots.pos.shape[1], -1).gather(-1, slots.pos.clamp(min=0))
    return torch.maximum(score_shares(slots), at_slot)
