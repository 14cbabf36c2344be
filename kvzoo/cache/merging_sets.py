"""KVMerger's merging sets and Gaussian-kernel merging (Wang et al., "Model Tells You Where to Merge", arXiv
2407.08454; METHODS.md section 2) as tensor functions without state: which adjacent tokens form a set
(Algorithm 1, at a fixed epsilon or at the epsilon a budget needs), which tokens are protected from merging
(the recent window and the heavy hitters), which sets are evicted past a budget, and how a set becomes one
slot (its pivot, the Gaussian weights, the merged key and value, what the slot counts for). The policy that
calls them per layer is `kvmerger.KVMerger`.

Tokens are along the last axis (keys: the one before), in position order; any leading batch axes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvzoo.cache.slots import NEG_INF

# --- merging sets (Algorithm 1) ----------------------------------------------------------------------


def adjacent_cosine(keys: torch.Tensor) -> torch.Tensor:
    """[..., T, D] -> [..., T-1] fp32: cosine similarity of each key with the next one."""
    k = keys.float()
    return F.cosine_similarity(k[..., 1:, :], k[..., :-1, :], dim=-1)


def _mergeable_links(protected: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(free [..., T]: valid unprotected tokens, link [..., T-1]: both neighbours free)."""
    free = ~protected if valid is None else valid & ~protected
    return free, free[..., 1:] & free[..., :-1]


def set_ids(boundary: torch.Tensor) -> torch.Tensor:
    """[..., T-1] bool (a new set starts at token t+1) -> [..., T] int64 set numbers 0, 1, ... in order."""
    return F.pad(boundary.long(), (1, 0)).cumsum(dim=-1)


def merging_sets(
    keys: torch.Tensor, protected: torch.Tensor, threshold: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Algorithm 1 with a fixed epsilon: set numbers [..., T] for keys [..., T, D], protected [..., T] bool.

    Adjacent tokens share a set iff both are unprotected (and valid) and their keys' cosine similarity is
    >= threshold. The paper scans from the last token backwards, extending the current set while the rule
    holds; since the rule only looks at adjacent pairs, that gives the same sets as this one-pass cumsum.
    Sets are runs of consecutive tokens; protected and invalid tokens are singletons.
    """
    _, link = _mergeable_links(protected, valid)
    return set_ids(~link | (adjacent_cosine(keys) < threshold))


def budget_merging_sets(
    keys: torch.Tensor, protected: torch.Tensor, budget: torch.Tensor | int, valid: torch.Tensor | None = None,
    min_similarity: float | None = None,
) -> torch.Tensor:
    """Sets for exactly min(budget, #valid) entries (protected singletons included), per row.

    Cuts the least similar links between adjacent unprotected tokens (ties: the earlier link) until
    #protected + #sets = budget; i.e. Algorithm 1 with the epsilon a bisection on the budget converges to.
    If budget < #protected + #runs of unprotected tokens, every run becomes one set (the fewest possible).
    With `min_similarity`, every link less similar than it is cut as well, so epsilon never falls below it
    and there may be more entries than the budget (`evict_lowest_sets` drops the excess).
    budget: int or [...] tensor.
    """
    free, link = _mergeable_links(protected, valid)
    kept = protected if valid is None else protected & valid
    runs = (free & ~F.pad(free[..., :-1], (1, 0))).sum(-1)
    budget = torch.as_tensor(budget, device=keys.device).expand(runs.shape)
    cuts = (budget - kept.sum(-1) - runs).clamp(min=0).minimum(link.sum(-1))
    similarity = adjacent_cosine(keys).masked_fill(~link, float("inf"))
    cut = link & (_ranks(similarity) < cuts[..., None])
    if min_similarity is not None:
        cut |= link & (similarity < min_similarity)
    return set_ids(~link | cut)


def per_set(x: torch.Tensor, sets: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """[..., T] -> [..., T] by set number: x reduced ("sum", "amax", ...) over each set's members (`sets`:
    [..., T] set numbers); 0 where a number has no member."""
    return torch.zeros_like(x).scatter_reduce(-1, sets, x, reduce, include_self=False)


def evict_lowest_sets(
    sets: torch.Tensor, protected: torch.Tensor, score: torch.Tensor, budget: torch.Tensor | int,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the sets with the lowest total score (ties: the earlier set) that hold no protected token, until
    at most `budget` sets of valid tokens remain, per row (budget: int or [...]).

    sets: [..., T] set numbers in order (`set_ids`); protected, valid: [..., T] bool; score: [..., T].
    Returns (sets renumbered 0, 1, ... over the kept sets, in order, with every other token in set T - 1;
    kept [..., T]: the valid tokens of the kept sets). Set T - 1 is never a kept set (at most budget < T are
    kept whenever one is dropped), so a caller storing the sets treats tokens outside `kept` as empty."""
    t = sets.shape[-1]
    valid = torch.ones_like(protected) if valid is None else valid
    filled = per_set(valid.long(), sets, "amax").bool()  # [..., T] by set number
    droppable = filled & ~per_set((protected & valid).long(), sets, "amax").bool()
    excess = (filled.sum(-1) - torch.as_tensor(budget, device=sets.device).expand(filled.shape[:-1])).clamp(min=0)
    lowest_first = _ranks(per_set(score.float(), sets).masked_fill(~droppable, float("inf")))
    kept_set = filled & ~(droppable & (lowest_first < excess[..., None]))
    renumbered = torch.where(kept_set, kept_set.long().cumsum(-1) - 1, t - 1)
    return renumbered.gather(-1, sets), valid & kept_set.gather(-1, sets)


def _ranks(x: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """Rank of each entry along the last axis (0 = first in sort order; ties: earlier index first)."""
    order = x.argsort(dim=-1, descending=descending, stable=True)
    index = torch.arange(x.shape[-1], device=x.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, index)


def protected_tokens(
    score: torch.Tensor,
    recent: torch.Tensor,
    heavy: torch.Tensor | int,
    budget: torch.Tensor | int | None = None,
    valid: torch.Tensor | None = None,
    newer_first: bool = False,
) -> torch.Tensor:
    """[..., T] bool: the recent tokens plus up to `heavy` older tokens with the largest score (equal scores: the
    earlier token first, or the newer with `newer_first`).

    recent: [..., T] bool (the recent window); heavy, budget: int or [...]. With a budget, heavy hitters are
    only taken (in score order) while #protected + #runs of unprotected tokens <= budget,
    the fewest entries merging can reach, so `budget_merging_sets` can hit the budget exactly (needs
    #recent < budget whenever there are older tokens). Protecting one more token adds 2 to that count if
    both its neighbours are still unprotected, 1 if one is, 0 if neither (a run of one disappears).
    """
    valid = torch.ones_like(recent) if valid is None else valid
    recent = recent & valid
    older = valid & ~recent
    score = score.float().masked_fill(~older, NEG_INF)  # older tokens first
    rank = _ranks(score.flip(-1), descending=True).flip(-1) if newer_first else _ranks(score, descending=True)
    n_older = older.sum(-1)
    heavy = torch.as_tensor(heavy, device=score.device).expand(n_older.shape).minimum(n_older)
    if budget is not None:
        before_left = ~older[..., :-1] | (rank[..., :-1] < rank[..., 1:])  # left neighbour protected first
        before_right = ~older[..., 1:] | (rank[..., 1:] < rank[..., :-1])
        added = 2 - F.pad(before_left, (1, 0), value=True).long() - F.pad(before_right, (0, 1), value=True).long()
        by_rank = torch.zeros_like(rank).scatter_(-1, rank, torch.where(older, added, 0))
        reach = (recent.sum(-1) + (n_older > 0).long())[..., None] + by_rank.cumsum(-1)  # [..., h-1]: h taken
        budget = torch.as_tensor(budget, device=score.device).expand(n_older.shape)
        count = torch.arange(1, rank.shape[-1] + 1, device=rank.device)
        heavy = ((reach <= budget[..., None]) & (count <= heavy[..., None])).sum(-1)
    return recent | (older & (rank < heavy[..., None]))


# --- Gaussian-kernel merging ---------------------------------------------------------------------------


def set_pivots(score: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """[..., T]: index of the pivot (largest score in the set; ties: earliest) of each token's set."""
    t = score.shape[-1]
    score = score.float()
    best = torch.full_like(score, NEG_INF).scatter_reduce(-1, sets, score, "amax")
    index = torch.arange(t, device=score.device).expand_as(sets)
    is_best = score >= best.gather(-1, sets)
    first = torch.full_like(sets, t).scatter_reduce(-1, sets, torch.where(is_best, index, t), "amin")
    return first.gather(-1, sets)


def gaussian_merge_weights(
    keys: torch.Tensor, sets: torch.Tensor, pivots: torch.Tensor, sigma: float,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """[..., T] weight of each token within its set: g_t = exp(-|k_p - k_t|^2 / (2 sigma^2)) (p: the set's
    pivot, so g_p = 1 is the largest), times the token count n_t of an already merged member, normalised
    to sum to 1 over the set. sigma = inf: uniform; sigma -> 0: all weight on the pivot (and keys equal
    to it)."""
    k = keys.float()
    d2 = (k - k.gather(-2, pivots[..., None].expand_as(k))).square().sum(-1)
    g = torch.where(d2 == 0, 1.0, torch.exp(-d2 / (2.0 * sigma * sigma)))  # d2 = 0 stays 1 as sigma -> 0
    if counts is not None:
        g = g * counts
    return g / torch.zeros_like(g).scatter_add(-1, sets, g).gather(-1, sets)


def merge_sets(
    keys: torch.Tensor, values: torch.Tensor, sets: torch.Tensor, weights: torch.Tensor,
    counts: torch.Tensor | None = None, value_scale: str = "set_size",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged (k*, v*) [..., T, D] fp32 in set order (rows past the last set are 0).

    k* = sum_t w_t k_t; v* = sum_t w_t v_t, times |S| = sum_t n_t for value_scale="set_size" (members that
    already stand for n_t tokens enter with v_t / n_t, undoing their own scaling)."""
    counts = torch.ones_like(weights) if counts is None else counts
    v = values.float()
    if value_scale == "set_size":
        v = v / counts[..., None]
    k = keys.float()
    k_star = torch.zeros_like(k).scatter_add(-2, sets[..., None].expand_as(k), weights[..., None] * k)
    v_star = torch.zeros_like(v).scatter_add(-2, sets[..., None].expand_as(v), weights[..., None] * v)
    if value_scale == "set_size":
        v_star = v_star * torch.zeros_like(counts).scatter_add(-1, sets, counts)[..., None]
    return k_star, v_star


def attention_counts(score: torch.Tensor, counts: torch.Tensor, sets: torch.Tensor, pivots: torch.Tensor,
                     members: torch.Tensor) -> torch.Tensor:
    """[..., T] by set number: what each set's merged slot counts for, n_p * sum_t A_t / A_p (A: `score`,
    [..., T], the members' accumulated attention; p: the set's pivot, its largest; n_p: the pivot's own count
    `counts`, 1 for a token), at most the tokens the set holds (`members`, by set number) and at least the
    pivot's count. The slot's key is the members' Gaussian-weighted mean, which its pivot dominates, so a prompt
    query gives it about the attention of the pivot: counted as n copies, it draws what its members drew
    (members read as much as their pivot give n = |S|, the members count). A set whose scores are all 0
    counts its members."""
    score = score.float()
    pivot_score, pivot_count = score.gather(-1, pivots), counts.gather(-1, pivots)  # [..., T] per token
    total = per_set(score, sets)  # by set number
    first, own = per_set(pivot_score, sets, "amax"), per_set(pivot_count, sets, "amax")  # a set's members share p
    by_mass = own * total / first.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(first > 0, by_mass.clamp(min=own).minimum(members), members)
