"""Importance statistics shared by the methods: observation-window attention (SnapKV, PyramidKV, ZigZagKV,
ZSMerge), accumulated attention over all prompt queries (H2O, KVMerger), their GQA reduction, and the
query-agnostic leverage and non-causal block attention (Compactor, ZSMerge).

None of these materialises a full [T, T] attention matrix: the window is a few queries, and accumulated
scores are summed block by block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvzoo.layers import apply_rope
from kvzoo_kernels.window_scores import weighted_column_sums

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk


COMPACTOR_BLOCK = 256  # positions whose queries score each other's keys, non-causally (Compactor's official code)


def group_mean(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hq, ...] -> [B, Hkv, ...]: mean over the G query heads that share a KV head."""
    b, hq = x.shape[:2]
    return x.reshape(b, num_kv_heads, hq // num_kv_heads, *x.shape[2:]).mean(dim=2)


def pool_by_position(
    scores: torch.Tensor, key_pos: torch.Tensor, poolable: torch.Tensor, kernel: int | None, mode: str,
    ahead: int | None = None,
) -> torch.Tensor:
    """1-D pooling (stride 1, same padding) over each sequence's own tokens in position order, so that
    neighbours of important tokens survive. A token pools the `kernel` positions from kernel - 1 - `ahead`
    before it to `ahead` after it (None: centred, kernel // 2 before it).

    Candidates are not in position order (cache slots come first, in any order; batches are left-padded), so
    scores are scattered by position into a [B, H, P] buffer, pooled there over the `poolable` tokens only
    (padding, empty slots and the observation window neither contribute nor receive), and gathered back.
    scores, key_pos, poolable: [B, H, S]. Non-poolable candidates keep their own score.
    """
    if not kernel or kernel <= 1:
        return scores
    if mode not in ("max", "avg"):
        raise ValueError(f"pooling must be 'max' or 'avg', got {mode!r}")
    b, h, _ = scores.shape
    n_pos = int(key_pos.max().clamp(min=0)) + 1
    slot = torch.where(poolable, key_pos, n_pos)  # non-poolable candidates land in a dummy column
    shape = (b * h, 1, n_pos + 1)
    behind = kernel // 2 if ahead is None else kernel - 1 - ahead
    if not 0 <= behind < kernel:
        raise ValueError(f"pooling: ahead must be in 0 .. {kernel - 1} (kernel {kernel}), got {ahead}")
    pad = (behind, kernel - 1 - behind)  # positions before, after
    if mode == "max":
        buf = torch.full((b, h, n_pos + 1), float("-inf"), device=scores.device).scatter(-1, slot, scores)
        buf[..., n_pos] = float("-inf")
        pooled = F.max_pool1d(F.pad(buf.reshape(shape), pad, value=float("-inf")), kernel, stride=1)
    else:
        buf = torch.zeros(b, h, n_pos + 1, device=scores.device).scatter(-1, slot, scores)
        count = torch.zeros_like(buf).scatter(-1, slot, torch.ones_like(scores))
        buf[..., n_pos], count[..., n_pos] = 0.0, 0.0
        sums = F.avg_pool1d(F.pad(buf.reshape(shape), pad), kernel, stride=1)
        counts = F.avg_pool1d(F.pad(count.reshape(shape), pad), kernel, stride=1)
        pooled = sums / counts.clamp(min=1e-9)
    pooled = pooled[..., : n_pos + 1].reshape(b, h, n_pos + 1)
    return torch.where(poolable, pooled.gather(-1, slot.clamp(max=n_pos)), scores)


def _column_sums(chunk: "PrefillChunk", key: tuple, q: torch.Tensor, q_pos: torch.Tensor,
                 weights: torch.Tensor, row_lse: torch.Tensor | None = None, within: int | None = None,
                 ) -> torch.Tensor:
    """weighted_column_sums of these queries over the chunk's candidates [B, Hq, S], once per chunk and key
    (`row_lse`: these queries' log partition functions, when known)."""
    if key not in chunk.memo:
        chunk.memo[key] = weighted_column_sums(q, chunk.keys, q_pos, chunk.key_pos, chunk.key_bias, chunk.window,
                                               weights, row_lse, within)
    return chunk.memo[key]


def window_scores(
    chunk: "PrefillChunk", window: int, decay: float = 1.0, kernel: int | None = None, pooling: str = "max",
    ahead: int | None = None,
) -> torch.Tensor:
    """Attention of the chunk's last `window` queries to every candidate key, summed with weights
    decay^(age) (age 0 = the last query), pooled over the tokens before the window in position order
    (SnapKV pools the first T - w keys only), reduced per KV head. Returns [B, Hkv, S] fp32.
    Padding queries contribute nothing."""
    w = min(window, chunk.q.shape[2])
    q_pos = chunk.q_pos[:, -w:]
    ages = torch.arange(w - 1, -1, -1, device=q_pos.device, dtype=torch.float32)
    weights = (decay**ages)[None] * (q_pos >= 0)  # [B, w]
    scores = _column_sums(chunk, ("window", w, decay), chunk.q[:, :, -w:], q_pos, weights)  # [B, Hq, S]
    hkv = chunk.keys.shape[1]
    if kernel and kernel > 1:
        groups = scores.shape[1] // hkv
        last = chunk.q_pos.max(dim=1).values[:, None, None]
        # The window is each sequence's own last (up to) w tokens: left padding must not widen it.
        real_w = (q_pos >= 0).sum(dim=1)[:, None, None]
        poolable = torch.isfinite(chunk.key_logw) & (chunk.key_pos <= last - real_w)
        scores = pool_by_position(scores, chunk.key_pos.repeat_interleave(groups, dim=1),
                                  poolable.repeat_interleave(groups, dim=1), kernel, pooling, ahead)
    return group_mean(scores, hkv)


def accumulated_scores(chunk: "PrefillChunk", decay: float = 1.0, normalise: bool = False,
                       within: int | None = None) -> torch.Tensor:
    """Column sums of the chunk's attention over all its queries (decay^(age)-weighted), per KV head [B, Hkv, S].

    `normalise=True` divides each key's sum by the number of queries that could see it (kvpress' observed
    attention), removing the bias towards early tokens. `within`: only the queries fewer than that many
    positions after the key (the attention it got from that near; `distant_attention_rate`)."""
    t = chunk.q.shape[2]
    ages = torch.arange(t - 1, -1, -1, device=chunk.q.device, dtype=torch.float32)
    valid = (chunk.q_pos >= 0).float()
    weights = (decay**ages)[None] * valid
    key = ("all", decay) if within is None else ("all", decay, within)
    sums = _column_sums(chunk, key, chunk.q, chunk.q_pos, weights, chunk.row_lse, within)
    scores = group_mean(sums, chunk.keys.shape[1])
    if normalise:
        scores = scores / queries_that_saw(chunk, within_chunk=True)
    return scores


def queries_that_saw(chunk: "PrefillChunk", within_chunk: bool) -> torch.Tensor:
    """[B, Hkv, S] fp32 how many queries have seen each candidate, at least 1: positions are consecutive, so
    those from its position to the chunk's last, last_pos - pos_j + 1; only the chunk's own queries with
    `within_chunk` (for a statistic of this chunk's attention alone); at most the sliding window."""
    last_pos = chunk.q_pos.max(dim=1).values[:, None, None]  # [B, 1, 1]
    seen_by = (last_pos - chunk.key_pos + 1).float()
    if within_chunk:
        seen_by = torch.minimum(seen_by, (chunk.q_pos >= 0).sum(1)[:, None, None].float())
    if chunk.window is not None:  # under a sliding window at most `window` queries see a key
        seen_by = seen_by.clamp(max=chunk.window)
    return seen_by.clamp(min=1)


def attention_rate(accumulated: torch.Tensor, chunk: "PrefillChunk") -> torch.Tensor:
    """[B, Hkv, S] each candidate's attention per query that could see it: `accumulated` (its attention summed
    over every query of the prompt so far, earlier chunks included) over the queries from its own position
    to the chunk's last (at most the sliding window). A sum favours a token for how long it has been seen;
    the rate is what one more query pays it, if the text goes on as it went."""
    return accumulated / queries_that_saw(chunk, within_chunk=False)


def distant_attention_rate(standing: torch.Tensor, chunk: "PrefillChunk", horizon: torch.Tensor,
                           decay: float = 1.0) -> torch.Tensor:
    """[B, Hkv, S] each candidate's attention per query at least `horizon` [B] positions after it (per
    sequence): what a query that far ahead paid it, as the rate (`attention_rate`) is per query of any
    distance. A token's nearest queries read it for local reasons (the next words lean on the last ones),
    which a query `horizon` or more positions later, past a ring of that many recent tokens, no longer
    does; the rate divides that local part by the few queries that have seen a recent token, so it favours
    the tokens just outside the ring. `standing` [B, Hkv, S]: the attention accumulated over every query of
    the prompt so far (earlier chunks included; `decay` as it was summed with); this chunk's part from
    nearer queries is taken out of it. A slot kept from an earlier chunk keeps all of its earlier attention
    (where it came from is no longer known). 0 where no query is that far (the ring's own tokens)."""
    near = None
    for h in horizon.unique().tolist():  # one band per distinct ring size (host sync: prefill only)
        part = accumulated_scores(chunk, decay, within=int(h))
        near = part if near is None else torch.where((horizon == h)[:, None, None], part, near)
    assert near is not None
    far_queries = (queries_that_saw(chunk, within_chunk=False) - horizon[:, None, None]).clamp(min=0)
    return torch.where(far_queries > 0, (standing - near).clamp(min=0) / far_queries.clamp(min=1), 0.0)


def attention_shares(accumulated: torch.Tensor, window: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, S] each candidate's larger share of attention, max(accumulated / its sum, window / its sum),
    the sums over the `valid` candidates: large when every query or the last ones (the window, e.g. a
    question) give the token a large part of their attention. Both are distributions over the same tokens, so
    no weight is needed, and a head whose window attention is diffuse spends few slots on it."""
    return torch.maximum(share_of(accumulated, valid), share_of(window, valid))


def share_of(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, S] each candidate's share of the scores' sum over the `valid` candidates (scores >= 0)."""
    return scores / (scores * valid).sum(-1, keepdim=True).clamp(min=1e-30)


def hat_diagonal(x: torch.Tensor, valid: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Ridge leverage [B, H, S] of every valid row of x [B, H, S, D] among the valid rows:
    h_j = x_j^T (X^T X + eps tr(X^T X)/D I)^-1 x_j on rows centred by their mean (0 for invalid rows)."""
    x = x.float() * valid[..., None]
    count = valid.sum(-1, keepdim=True).clamp(min=1)[..., None]  # [B, H, 1, 1]
    centred = (x - x.sum(2, keepdim=True) / count) * valid[..., None]
    gram = centred.transpose(-1, -2) @ centred  # [B, H, D, D]
    d = gram.shape[-1]
    ridge = eps * gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=1e-12) / d  # [B, H]
    gram = gram + ridge[..., None, None] * torch.eye(d, device=gram.device)
    solved = torch.linalg.solve(gram, centred.transpose(-1, -2)).transpose(-1, -2)  # [B, H, S, D]
    return (centred * solved).sum(-1).masked_fill(~valid, 0.0)


def leverage_scores(chunk: "PrefillChunk", kernel: int | None = None, eps: float = 1e-4,
                    of: str = "keys") -> torch.Tensor:
    """Statistical leverage of every candidate's key among the candidates' keys, per KV head [B, Hkv, S] fp32
    (`hat_diagonal`; keys are centred because a shift common to all keys moves every logit of a query equally,
    so attention never sees it). h_j is near 1 for a key no combination of the others reproduces and near 0
    for a key in a crowded direction: what merging cannot stand in for, whatever the queries will be
    (Compactor's query-agnostic signal). Empty candidates score 0; `kernel` max-pools by position like the
    window scores, so a unique token's neighbours (the rest of a number) come with it. `of="values"` measures
    the values instead (what a merged slot's average loses)."""
    valid = torch.isfinite(chunk.key_logw)  # [B, Hkv, S]
    lev = hat_diagonal(chunk.keys if of == "keys" else chunk.values, valid, eps)
    return pool_by_position(lev, chunk.key_pos, valid, kernel, "max")


def pre_rope_keys(chunk: "PrefillChunk") -> torch.Tensor:
    """The chunk's own keys [B, Hkv, T, D] before the rotary embedding (rotated back by their angles; RoPE is
    a rotation, so -sin undoes it), or as they are when the chunk carries no tables."""
    if chunk.rope is None:
        return chunk.k
    cos, sin = chunk.rope
    return apply_rope(chunk.k, cos, -sin)


def own_key_leverage(chunk: "PrefillChunk") -> torch.Tensor:
    """[B, Hkv, T] fp32: the ridge leverage (`hat_diagonal`) of each of the chunk's own tokens among the chunk's
    pre-RoPE keys (Compactor's query-agnostic signal: near 1 for a key no combination of the others
    reproduces); 0 at padding. Pre-RoPE, because the rotation makes a repeated key look new at every
    position."""
    valid = chunk.key_pos[..., -chunk.k.shape[2]:] >= 0
    return hat_diagonal(pre_rope_keys(chunk), valid)


def noncausal_block_scores(chunk: "PrefillChunk", block: int, scale: float) -> torch.Tensor:
    """[B, Hkv, T] fp32: the attention each of the chunk's tokens receives from every query of its position
    block (position // block), earlier and later ones alike, with logits q.k * scale; summed over the
    queries, mean over a KV head's query heads. Unlike causal column sums, a token is not favoured for being
    early (seen by more queries): each is judged by the text around it. Padding neither gives nor receives.

    Queries are taken `block` at a time against the keys at most `block` indices away (a block is `block`
    consecutive positions, and a row's positions are consecutive), so the cost is 3 T block dot products."""
    q, k = chunk.q.float(), chunk.k.float()
    b, hq, t, _ = q.shape
    hkv = k.shape[1]
    k = k.repeat_interleave(hq // hkv, dim=1)  # [B, Hq, T, D]
    valid = chunk.q_pos >= 0  # [B, T]
    block_of = torch.where(valid, chunk.q_pos.div(block, rounding_mode="floor"), -1)
    sums = torch.zeros(b, hq, t, device=q.device)
    for start in range(0, t, block):
        stop = min(start + block, t)
        lo, hi = max(0, start - block + 1), min(t, stop + block - 1)
        logits = q[:, :, start:stop] @ k[:, :, lo:hi].transpose(-1, -2) * scale  # [B, Hq, s, n]
        # Padding is block -1: no valid query reaches it, and padding queries are masked out.
        same = (block_of[:, start:stop, None] == block_of[:, None, lo:hi]) & valid[:, start:stop, None]
        probs = torch.softmax(logits.masked_fill(~same[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
        sums[..., lo:hi] += probs.sum(2)
    return group_mean(sums, hkv)


def block_attention(chunk: "PrefillChunk", block: int = COMPACTOR_BLOCK, scale: float = 1.0, kernel: int = 3,
                    ) -> torch.Tensor:
    """[B, Hkv, T] fp32: Compactor's query-agnostic attention of the chunk's own tokens, what the text around a
    token reads from it: the attention it receives from every query of its `block`-position block, earlier
    and later ones (`noncausal_block_scores`, logits q.k * `scale`), times its value norm, average-pooled over
    `kernel` positions; 0 at padding."""
    own_pos = chunk.key_pos[..., -chunk.k.shape[2]:]  # [B, Hkv, T]
    attention = noncausal_block_scores(chunk, block, scale) * chunk.v.float().norm(dim=-1)
    return pool_by_position(attention, own_pos, own_pos >= 0, kernel, "avg")


def compactor_scores(chunk: "PrefillChunk", blend: torch.Tensor | float, block: int = COMPACTOR_BLOCK,
                     scale: float = 1.0, kernel: int = 3, span: int = 1, ahead: int | None = None) -> torch.Tensor:
    """Compactor's query-agnostic importance (Chari & Van Durme, arXiv 2507.08143) of the chunk's tokens:
    zscore(non-causal block attention * |v|, average-pooled over `kernel` positions) + blend *
    zscore(leverage of the pre-RoPE keys), standardised per (sequence, KV head); blend [B, 1, 1] or a float;
    then max-pooled over the `span` positions up to `ahead` after each token (`pool_by_position`; span 1: not, as
    Compactor; ahead None: centred). Candidates before the chunk (slots in use) keep their stored score and lend
    it to no neighbour. Returns [B, Hkv, S] fp32, -inf at padding."""
    t = chunk.k.shape[2]
    own_pos = chunk.key_pos[..., -t:]
    valid = own_pos >= 0  # [B, Hkv, T]
    attention = block_attention(chunk, block, scale, kernel)
    leverage = own_key_leverage(chunk)
    own = (zscore(attention, valid) + blend * zscore(leverage, valid)).masked_fill(~valid, float("-inf"))
    own = pool_by_position(own, own_pos, valid, span, "max", ahead)
    return torch.cat([chunk.key_score[..., :-t], own], dim=-1)


def row_mean_std(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation [B, H, 1] of the valid entries of each row of x [B, H, S]."""
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = (x * valid).sum(-1, keepdim=True) / n
    return mean, ((((x - mean) * valid) ** 2).sum(-1, keepdim=True) / n).sqrt()


def zscore(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x [B, H, S] standardised over the valid entries of each (sequence, head) row (0 elsewhere)."""
    mean, std = row_mean_std(x, valid)
    return torch.where(valid, (x - mean) / std.clamp(min=1e-12), 0.0)


def on_the_scale_of(base: torch.Tensor, signal: torch.Tensor, valid: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """weight * std(base) * zscore(signal) over the valid entries [B, H, S] (0 elsewhere): added to `base`, it
    ranks like zscore(base) + weight * zscore(signal) while the sum stays on base's scale (e.g. the attention
    scale that decode steps keep adding to)."""
    return weight * row_mean_std(base, valid)[1] * zscore(signal, valid)
