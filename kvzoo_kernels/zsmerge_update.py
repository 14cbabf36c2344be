"""The fused ZSMerge decode update (kvzoo/cache/METHODS.md 1.2 decode, paper semantics A3/A4), per (sequence, KV head):

1. decay the scores of filled slots and add this step's attention (group mean over the query heads);
2. the new token takes the proximity-ring slot of the oldest proximity token, which leaves the ring;
3. the leaving token moves into a free context slot; if there is none, the lowest-scored of
   context ∪ {leaving} is merged (count-weighted mean, log-count bias) into the first empty residual slot,
   or else into the residual slot whose key is most similar (dot product or L2), and the leaving token takes
   the merged token's context slot unless it was the one merged. An optional eviction bias per slot counts
   for the context slots in that "lowest-scored" comparison and nowhere else (ZSMerge's lapsing standing).

Slot layout: [residual R: residual[b] slots | context | ring: proximity[b] slots ending at budget[b]].

- `zsmerge_update_reference`: the torch specification, and the CPU path `ZSMerge.decode_step` runs.
- The Triton version runs one program per (sequence, KV head): the slot row's counts, scores and positions
  live in registers; keys are read only for the ring slot, the weakest context slot and the residual slots.
  Each row is stored once, and the (at most three, distinct) rewritten slots' keys and values after it.
  One tile holds a whole slot row (C up to a few thousand: ZSMerge keeps a few percent of the prompt); a
  much larger store would want the row tiled.
- `zsmerge_update`: the dispatcher (kvzoo_kernels.dispatch).
All updates are in place on the slot tensors; no host synchronisation, static shapes.
"""

from __future__ import annotations

from typing import Any

import torch

from kvzoo_kernels.dispatch import block_size, check_launchable, triton_kernel, use_triton

tl: Any = None  # triton.language, bound on the first Triton launch (kvzoo_kernels.dispatch.triton_kernel)

NEG_INF = float("-inf")


def most_similar(queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, metric: str) -> torch.Tensor:
    """For each query key [B, Hkv, N, D], the index [B, Hkv, N] of the closest allowed key [B, Hkv, C, D]
    (largest dot product, or smallest L2 distance); allowed: [B, Hkv, C]. None allowed: index 0."""
    qf, kf = queries.float(), keys.float()
    sim = qf @ kf.transpose(-1, -2) if metric == "dot" else -torch.cdist(qf, kf)
    return sim.masked_fill(~allowed[..., None, :], NEG_INF).argmax(-1)


def _rows(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.where with a per-(sequence, head) mask [B, Hkv] broadcast over the trailing dims of a, b."""
    return torch.where(mask.reshape(mask.shape + (1,) * (a.dim() - mask.dim())), a, b)


def _read(slots: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Contents of one slot per (sequence, head) of slots = (k, v, logw, score, pos); index [B, Hkv]."""
    idx = index[..., None]
    return tuple(
        t.gather(2, idx[..., None].expand(*idx.shape, t.shape[-1]))[:, :, 0] if t.dim() == 4
        else t.gather(2, idx)[..., 0]
        for t in slots
    )


def _write(slots: tuple[torch.Tensor, ...], writes: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]) -> None:
    """Overwrite slots of slots = (k, v, logw, score, pos) in place: `writes` holds (index [B, Hkv], values of
    the five fields) pairs whose indices are distinct per (sequence, head); one `index_put_` per field.

    `index_put_`, not `scatter_`: under torch.compile inductor re-inplaces it into the graph input, where a
    scatter_ is functionalized into a copy of the whole store (see kvzoo/compile.py)."""
    index = torch.stack([i for i, _ in writes], dim=-1)  # [B, Hkv, N]
    b, hkv, _ = index.shape
    rows = (torch.arange(b, device=index.device)[:, None, None], torch.arange(hkv, device=index.device)[None, :, None],
            index)
    for field, t in enumerate(slots):
        t.index_put_(rows, torch.stack([values[field].to(t.dtype) for _, values in writes], dim=2))


def zsmerge_update_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    logw: torch.Tensor,
    score: torch.Tensor,
    pos: torch.Tensor,
    budget: torch.Tensor,
    residual: torch.Tensor,
    proximity: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    pos_new: torch.Tensor,
    probs: torch.Tensor,
    decay: float,
    metric: str,
    score_update: str,
    eviction_bias: torch.Tensor | None = None,
) -> None:
    """One ZSMerge decode step on a layer's slots, in place.

    k, v: [B, Hkv, C, D]; logw, score: [B, Hkv, C] fp32; pos: [B, Hkv, C] int64; budget, residual,
    proximity: [B] int64 (slots per KV head of each region); k_new, v_new: [B, Hkv, D]; pos_new: [B];
    probs: [B, Hq, C + 1] this step's attention (last column: the new token); metric "dot" | "l2";
    score_update "max" | "sum" (a merged slot's score); eviction_bias: None or [B, Hkv, C] fp32, added to the
    context slots' updated scores where the step chooses what to merge (the weakest context slot, which the
    token leaving the ring meets with its score alone) and nowhere else: the residual and ring entries are
    never read, and no stored score includes it.
    """
    b, hkv, c = logw.shape
    slots = (k, v, logw, score, pos)
    per_kv = probs.reshape(b, hkv, probs.shape[1] // hkv, c + 1).mean(2)  # group mean over query heads
    slot_p, new_p = per_kv[..., :-1], per_kv[..., -1]
    score.copy_(torch.where(torch.isfinite(logw), decay * score + slot_p, 0.0))
    rank = score if eviction_bias is None else score + eviction_bias  # what the eviction compares

    ring_start = budget - proximity
    ring_slot = (ring_start + pos_new % proximity)[:, None].expand(b, hkv)
    leaving = _read(slots, ring_slot)  # the oldest proximity token (may be an empty slot)
    # Every read below is of the residual or context region, so the three writes (ring, residual, context
    # slot: distinct regions) wait until the end and go in as one.
    new_token = (k_new, v_new, torch.zeros(b, hkv, device=k.device), new_p, pos_new[:, None].expand(b, hkv))
    leaving_valid = torch.isfinite(leaving[2])

    idx = torch.arange(c, device=k.device)[None, None, :]
    is_residual = idx < residual[:, None, None]
    context = ~is_residual & (idx < ring_start[:, None, None])
    filled = torch.isfinite(logw)
    free = context & ~filled
    has_free, first_free = free.any(-1), free.to(torch.int8).argmax(-1)
    weakest = rank.masked_fill(~(context & filled), float("inf")).argmin(-1)
    weakest_tok = _read(slots, weakest)
    leaving_is_weakest = leaving[3] <= rank.gather(2, weakest[..., None])[..., 0]

    # Merge (cache full): the lowest-scored of context ∪ {leaving} goes into a residual slot.
    do_merge = leaving_valid & ~has_free
    src_k, src_v, src_logw, src_score, src_pos = (_rows(leaving_is_weakest, a, w) for a, w in zip(leaving, weakest_tok))
    empty_residual = is_residual & ~filled
    has_empty, first_empty = empty_residual.any(-1), empty_residual.to(torch.int8).argmax(-1)
    similar = most_similar(src_k[:, :, None], k, is_residual & filled, metric)[..., 0]
    r = torch.where(has_empty, first_empty, similar)
    k_r, v_r, logw_r, score_r, pos_r = _read(slots, r)
    w_r = torch.where(torch.isfinite(logw_r), logw_r, NEG_INF).exp()
    w_s = src_logw.exp()
    w = w_r + w_s
    frac_r, frac_s = (w_r / w)[..., None], (w_s / w)[..., None]
    merged_k = (frac_r * k_r.float() + frac_s * src_k.float()).to(k_r.dtype)
    merged_v = (frac_r * v_r.float() + frac_s * src_v.float()).to(v_r.dtype)
    if score_update == "max":
        merged_score = torch.where(torch.isfinite(logw_r), torch.maximum(score_r, src_score), src_score)
    else:
        merged_score = score_r + src_score
    merged = (merged_k, merged_v, w.log(), merged_score, torch.maximum(pos_r, src_pos))
    residual_slot = tuple(_rows(do_merge, new, old) for new, old in zip(merged, (k_r, v_r, logw_r, score_r, pos_r)))

    # Place the leaving token: a free context slot, or the slot of the weakest token just merged.
    do_place = leaving_valid & (has_free | ~leaving_is_weakest)
    place_at = torch.where(has_free, first_free, weakest)
    current = _read(slots, place_at)
    context_slot = tuple(_rows(do_place, new, old) for new, old in zip(leaving, current))
    _write(slots, [(ring_slot, new_token), (r, residual_slot), (place_at, context_slot)])


def zsmerge_update(
    k: torch.Tensor,
    v: torch.Tensor,
    logw: torch.Tensor,
    score: torch.Tensor,
    pos: torch.Tensor,
    budget: torch.Tensor,
    residual: torch.Tensor,
    proximity: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    pos_new: torch.Tensor,
    probs: torch.Tensor,
    decay: float,
    metric: str,
    score_update: str,
    eviction_bias: torch.Tensor | None = None,
) -> None:
    """`zsmerge_update_reference`'s contract; Triton on CUDA tensors (see kvzoo_kernels.dispatch)."""
    args = (k, v, logw, score, pos, budget, residual, proximity, k_new, v_new, pos_new, probs)
    if use_triton(k):
        zsmerge_update_triton(*args, decay, metric, score_update, eviction_bias=eviction_bias)
    else:
        zsmerge_update_reference(*args, decay, metric, score_update, eviction_bias)


# --- Triton ---------------------------------------------------------------------------------------------

BLOCK_R = 64  # residual slots per similarity tile on a GPU


def zsmerge_update_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    logw: torch.Tensor,
    score: torch.Tensor,
    pos: torch.Tensor,
    budget: torch.Tensor,
    residual: torch.Tensor,
    proximity: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    pos_new: torch.Tensor,
    probs: torch.Tensor,
    decay: float,
    metric: str,
    score_update: str,
    eviction_bias: torch.Tensor | None = None,
    block_r: int | None = None,
) -> None:
    """The Triton path (a torch custom op that mutates the slot tensors). `block_r` (residual slots per
    similarity tile, a power of two) defaults to a GPU-sized value; tests pass small ones."""
    if metric not in ("dot", "l2") or score_update not in ("max", "sum"):
        raise ValueError(f"zsmerge_update: metric {metric!r} must be 'dot' or 'l2' and score_update "
                         f"{score_update!r} 'max' or 'sum'")
    block_r = block_r or block_size(int(k.shape[2]), minimum=1, maximum=BLOCK_R)
    if block_r & (block_r - 1):
        raise ValueError(f"zsmerge_update_triton: block_r={block_r} must be a power of two")
    torch.ops.kvzoo.zsmerge_update(k, v, logw, score, pos, budget, residual, proximity, k_new, v_new, pos_new,
                                   probs, eviction_bias, float(decay), metric == "dot", score_update == "max", block_r)


@torch.library.custom_op("kvzoo::zsmerge_update", mutates_args=("k", "v", "logw", "score", "pos"))
def _zsmerge_update_op(
    k: torch.Tensor,
    v: torch.Tensor,
    logw: torch.Tensor,
    score: torch.Tensor,
    pos: torch.Tensor,
    budget: torch.Tensor,
    residual: torch.Tensor,
    proximity: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    pos_new: torch.Tensor,
    probs: torch.Tensor,
    eviction_bias: torch.Tensor | None,
    decay: float,
    dot: bool,
    score_max: bool,
    block_r: int,
) -> None:
    check_launchable(k, v, logw, score, pos, k_new, v_new, probs)
    # Without a bias the kernel never reads its pointer (HAS_BIAS=False): any fp32 tensor stands in.
    bias = logw if eviction_bias is None else eviction_bias.float().contiguous()
    slots = (k, v, logw, score, pos)
    work = tuple(t if t.is_contiguous() else t.contiguous() for t in slots)  # the kernel writes in place
    b, hkv, c, d = k.shape
    groups = probs.shape[1] // hkv
    k_new, v_new = k_new.contiguous(), v_new.contiguous()
    budget, residual, proximity, pos_new = (x.to(torch.int64).contiguous() for x in (budget, residual, proximity,
                                                                                    pos_new))
    _zsmerge_update_kernel[(b * hkv,)](
        *work, budget, residual, proximity, k_new, v_new, pos_new, probs.float().contiguous(), bias,
        b, c, d, hkv, groups, decay,
        DOT=dot, SCORE_MAX=score_max, HAS_BIAS=eviction_bias is not None,
        BLOCK_C=block_size(c), BLOCK_D=block_size(d), BLOCK_G=block_size(groups, minimum=1), BLOCK_R=block_r,
    )
    for t, w in zip(slots, work):
        if t is not w:
            t.copy_(w)


@_zsmerge_update_op.register_fake
def _(k, v, logw, score, pos, budget, residual, proximity, k_new, v_new, pos_new, probs, eviction_bias, decay, dot,
      score_max, block_r):  # noqa: ANN001, ANN202
    return None


@triton_kernel
def _zsmerge_update_kernel(
    k, v, logw, score, pos, budget, residual, proximity, k_new, v_new, pos_new, probs, bias,
    B, C, D, HKV, G, decay,
    DOT: tl.constexpr, SCORE_MAX: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (sequence * KV head). Row vectors hold the slot statistics after each step of the
    reference; the rewritten slots (ring, merge target, placement) are distinct, so stores do not race."""
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    b_ok = b < B  # always true (one program per sequence and head): every access is masked all the same
    c = tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D)
    g = tl.arange(0, BLOCK_G)
    c_ok = c < C
    d_ok = d < D
    row = bh * C  # [B, Hkv, C] tensors are contiguous
    kv_row = bh * C * D

    # 1. Decay: s <- decay * s + (group mean of this step's attention) on filled slots.
    heads = h * G + g
    p_tile = tl.load(probs + (b * HKV * G + heads[:, None]) * (C + 1) + c[None, :],
                     mask=(g < G)[:, None] & c_ok[None, :], other=0.0)
    slot_p = tl.sum(p_tile, axis=0) / G
    new_p = tl.sum(tl.load(probs + (b * HKV * G + heads) * (C + 1) + C, mask=g < G, other=0.0), axis=0) / G
    lw = tl.load(logw + row + c, mask=c_ok, other=float("-inf"))
    sc = tl.load(score + row + c, mask=c_ok, other=0.0)
    ps = tl.load(pos + row + c, mask=c_ok, other=-1)
    sc = tl.where(lw > float("-inf"), decay * sc + slot_p, 0.0)
    rank = sc  # what the eviction compares for a context slot: its score plus the eviction bias, stored nowhere
    if HAS_BIAS:
        rank = sc + tl.load(bias + row + c, mask=c_ok, other=0.0)

    # 2. The new token takes the ring slot of the oldest proximity token.
    proximity_b = tl.load(proximity + b, mask=b_ok, other=1).to(tl.int32)
    ring_start = tl.load(budget + b, mask=b_ok, other=1).to(tl.int32) - proximity_b
    pn = tl.load(pos_new + b, mask=b_ok, other=0)
    ring = ring_start + ((pn % proximity_b + proximity_b) % proximity_b).to(tl.int32)
    at_ring = c == ring
    leave_lw = tl.max(tl.where(at_ring, lw, float("-inf")), axis=0)
    leave_sc = tl.sum(tl.where(at_ring, sc, 0.0), axis=0)
    leave_pos = tl.sum(tl.where(at_ring, ps, 0), axis=0)
    ring_d_ok = d_ok & (ring >= 0) & (ring < C)
    k_leave = tl.load(k + kv_row + ring * D + d, mask=ring_d_ok, other=0.0)
    v_leave = tl.load(v + kv_row + ring * D + d, mask=ring_d_ok, other=0.0)
    leave_valid = leave_lw > float("-inf")
    lw = tl.where(at_ring, 0.0, lw)
    sc = tl.where(at_ring, new_p, sc)
    ps = tl.where(at_ring, pn, ps)

    # 3. A free context slot, else the weakest context token (first index among equal scores).
    residual_b = tl.load(residual + b, mask=b_ok, other=0).to(tl.int32)
    filled = lw > float("-inf")
    context = (c >= residual_b) & (c < ring_start) & c_ok
    free = context & ~filled
    has_free = tl.max(free.to(tl.int32), axis=0) > 0
    first_free = tl.where(has_free, tl.min(tl.where(free, c, BLOCK_C), axis=0), 0)
    ranked = tl.where(context & filled, rank, float("inf"))
    weakest = tl.min(tl.where(ranked == tl.min(ranked, axis=0), c, BLOCK_C), axis=0)
    at_weakest = c == weakest
    weak_rank = tl.sum(tl.where(at_weakest, rank, 0.0), axis=0)
    weak_lw = tl.max(tl.where(at_weakest, lw, float("-inf")), axis=0)
    weak_sc = tl.sum(tl.where(at_weakest, sc, 0.0), axis=0)
    weak_pos = tl.sum(tl.where(at_weakest, ps, 0), axis=0)
    leaving_is_weakest = leave_sc <= weak_rank
    do_merge = leave_valid & ~has_free
    src_lw = tl.where(leaving_is_weakest, leave_lw, weak_lw)
    src_sc = tl.where(leaving_is_weakest, leave_sc, weak_sc)
    src_pos = tl.where(leaving_is_weakest, leave_pos, weak_pos)
    weak_d_ok = d_ok & (weakest < C)
    k_weak = tl.load(k + kv_row + weakest * D + d, mask=weak_d_ok, other=0.0)
    v_weak = tl.load(v + kv_row + weakest * D + d, mask=weak_d_ok, other=0.0)
    src_k = tl.where(leaving_is_weakest, k_leave, k_weak)
    src_v = tl.where(leaving_is_weakest, v_leave, v_weak)

    # 4. Merge target: the first empty residual slot, else the most similar filled one.
    empty_residual = (c < residual_b) & c_ok & ~filled
    has_empty = tl.max(empty_residual.to(tl.int32), axis=0) > 0
    first_empty = tl.where(has_empty, tl.min(tl.where(empty_residual, c, BLOCK_C), axis=0), 0)
    src_kf = src_k.to(tl.float32)
    best_sim = tl.full([], float("-inf"), tl.float32)
    best = tl.full([], 0, tl.int32)
    for start in range(0, residual_b, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        r_ok = (r < residual_b) & (r < C)
        allowed = tl.load(logw + row + r, mask=r_ok, other=float("-inf")) > float("-inf")
        k_tile = tl.load(k + kv_row + r[:, None] * D + d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                         other=0.0).to(tl.float32)
        if DOT:
            sim = tl.sum(k_tile * src_kf[None, :], axis=1)
        else:
            diff = tl.where(d_ok[None, :], k_tile - src_kf[None, :], 0.0)
            sim = -tl.sqrt(tl.sum(diff * diff, axis=1))
        sim = tl.where(allowed & r_ok, sim, float("-inf"))
        tile_best = tl.max(sim, axis=0)
        tile_idx = tl.min(tl.where(sim == tile_best, r, 2147483647), axis=0)
        better = tile_best > best_sim  # strict: the earlier tile keeps ties (first index, like argmax)
        best = tl.where(better, tile_idx, best)
        best_sim = tl.where(better, tile_best, best_sim)
    target = tl.where(has_empty, first_empty, best)

    # 5. Count-weighted merge of the source into the target.
    at_target = c == target
    target_lw = tl.max(tl.where(at_target, lw, float("-inf")), axis=0)
    target_sc = tl.sum(tl.where(at_target, sc, 0.0), axis=0)
    target_pos = tl.sum(tl.where(at_target, ps, 0), axis=0)
    target_d_ok = d_ok & (target < C)
    k_target = tl.load(k + kv_row + target * D + d, mask=target_d_ok, other=0.0).to(tl.float32)
    v_target = tl.load(v + kv_row + target * D + d, mask=target_d_ok, other=0.0).to(tl.float32)
    w_target = tl.exp(target_lw)
    w_src = tl.exp(src_lw)
    w = w_target + w_src
    w = tl.where(w > 0.0, w, 1.0)  # 0 only when nothing is merged (and nothing is stored): no 0 / 0
    frac_target = w_target / w
    frac_src = w_src / w
    merged_k = frac_target * k_target + frac_src * src_kf
    merged_v = frac_target * v_target + frac_src * src_v.to(tl.float32)
    if SCORE_MAX:
        merged_sc = tl.where(target_lw > float("-inf"), tl.maximum(target_sc, src_sc), src_sc)
    else:
        merged_sc = target_sc + src_sc
    merged_pos = tl.maximum(target_pos, src_pos)

    # 6. Placement of the leaving token, then one store per row and per rewritten slot.
    do_place = leave_valid & (has_free | ~leaving_is_weakest)
    place_at = tl.where(has_free, first_free, weakest)
    # Scalar flags meet vectors through tl.where: under the interpreter `scalar_bool & vector` fails when the
    # scalar came from a float reduction.
    merge_here = tl.where(do_merge, at_target, False)
    place_here = tl.where(do_place, c == place_at, False)
    lw = tl.where(place_here, leave_lw, tl.where(merge_here, tl.log(w), lw))
    sc = tl.where(place_here, leave_sc, tl.where(merge_here, merged_sc, sc))
    ps = tl.where(place_here, leave_pos, tl.where(merge_here, merged_pos, ps))
    tl.store(logw + row + c, lw, mask=c_ok)
    tl.store(score + row + c, sc, mask=c_ok)
    tl.store(pos + row + c, ps, mask=c_ok)
    kn = tl.load(k_new + bh * D + d, mask=d_ok, other=0.0)
    vn = tl.load(v_new + bh * D + d, mask=d_ok, other=0.0)
    tl.store(k + kv_row + ring * D + d, kn, mask=ring_d_ok)
    tl.store(v + kv_row + ring * D + d, vn, mask=ring_d_ok)
    merge_d_ok = tl.where(do_merge, target_d_ok, False)
    tl.store(k + kv_row + target * D + d, merged_k, mask=merge_d_ok)
    tl.store(v + kv_row + target * D + d, merged_v, mask=merge_d_ok)
    place_d_ok = tl.where(do_place, d_ok & (place_at < C), False)
    tl.store(k + kv_row + place_at * D + d, k_leave, mask=place_d_ok)
    tl.store(v + kv_row + place_at * D + d, v_leave, mask=place_d_ok)
