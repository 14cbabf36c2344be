"""Budgets: turning a user's `budget` into slots, and the per-layer allocation rules (uniform, pyramid,
ZigZagKV's layer uncertainty)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch

from kvzoo.errors import KvzooError

Budget = float | int


def check_counts(config: object, method: str, names: Sequence[str], least: int = 1, optional: bool = False) -> None:
    """Each of `config`'s fields `names` is an integer >= `least` (a window length, a pooling kernel), or None
    when `optional` (a cap that may be absent)."""
    for name in names:
        value = getattr(config, name)
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            expected = f"None or an integer >= {least}" if optional else f"an integer >= {least}"
            raise KvzooError(f"{method}: {name} must be {expected}, got {value!r}")


def check_choice(config: object, method: str, name: str, choices: Sequence[object], optional: bool = False) -> None:
    """`config`'s field `name` is one of `choices`, or None when `optional`; the error lists them."""
    value = getattr(config, name)
    if (optional and value is None) or value in choices:
        return
    expected = ("None or one of " if optional else "one of ") + ", ".join(map(repr, choices))
    raise KvzooError(f"{method}: {name} must be {expected}, got {value!r}")


def check_pooling(config: object, method: str, prefix: str = "") -> None:
    """`config.pooling` is one of the window scores' poolings over positions (`scoring.pool_by_position`) and
    `config.pool_ahead` None (centred) or how many of the `config.kernel_size` pooled positions follow a token
    (with `prefix`, the fields `{prefix}pooling`, `{prefix}pool_ahead` and `{prefix}kernel_size`)."""
    pooling = getattr(config, f"{prefix}pooling")
    if pooling not in ("max", "avg"):
        raise KvzooError(f"{method}: {prefix}pooling must be 'max' or 'avg', got {pooling!r}")
    ahead, kernel = getattr(config, f"{prefix}pool_ahead"), getattr(config, f"{prefix}kernel_size")
    if ahead is not None and (isinstance(ahead, bool) or not isinstance(ahead, int) or not 0 <= ahead < kernel):
        raise KvzooError(f"{method}: {prefix}pool_ahead must be None (centred) or an integer in 0 .. "
                         f"{prefix}kernel_size - 1 = {kernel - 1}, got {ahead!r}")


def check_budget(budget: Budget, method: str, name: str = "budget") -> None:
    """A float in (0, 1) is a ratio of the prompt length; an int >= 1 is a number of tokens per KV head."""
    if isinstance(budget, bool):
        raise KvzooError(f"{method}: {name} must be a float in (0, 1) or an int >= 1, got {budget!r}")
    if isinstance(budget, float):
        if not 0 < budget < 1:
            raise KvzooError(
                f"{method}: {name}={budget!r} is not a ratio in (0, 1); "
                "give a float in (0, 1) for a fraction of the prompt or an int >= 1 for tokens per KV head"
            )
    elif isinstance(budget, int):
        if budget < 1:
            raise KvzooError(f"{method}: {name}={budget!r} must be >= 1 token per KV head")
    else:
        raise KvzooError(f"{method}: {name} must be a float in (0, 1) or an int >= 1, got {budget!r}")


def budget_tokens(budget: Budget, prompt_len: int) -> int:
    """Slots per KV head for one sequence (a ratio is taken of its own prompt length, at least 1)."""
    if isinstance(budget, float):
        return max(1, int(budget * prompt_len))
    return budget


def resolve_budget(budget: Budget, prompt_len: int, minimum: int = 1, cap_at_prompt: bool = False) -> int:
    """Slots per KV head for one sequence: THE budget rule, the same for every method.

    1. a ratio budget is taken of the sequence's own prompt length (at least 1 slot); an integer is used as is;
    2. the result is raised to the method's `minimum` layout (the fixed parts it cannot work without: the
       observation window, sinks + 1, ZSMerge's proximity + residual + 1 context slot, ...);
    3. prefill-only methods (`cap_at_prompt=True`) never keep more than the prompt: a budget covering the
       whole prompt keeps all of it. Methods that compress while decoding keep this constant size even for a
       shorter prompt: the cache fills up during decoding and eviction starts once prompt + generated tokens
       exceed it.
    So no valid budget fails on any prompt length; `KVCache.budgets()` shows the slots each sequence got.
    """
    slots = max(budget_tokens(budget, prompt_len), minimum)
    return min(slots, prompt_len) if cap_at_prompt else slots


def part_tokens(part: Budget, whole: int) -> int:
    """A sub-budget (e.g. ZSMerge's proximity part): a float is a fraction of `whole`, an int is absolute."""
    return int(part * whole) if isinstance(part, float) else part


def pyramid_budgets(avg_capacity: int, window: int, prompt_len: int, num_layers: int, beta: float) -> list[int]:
    """PyramidKV: per-layer token budgets (window included), largest at layer 0, arithmetic decrease.

    With c = avg_capacity - window selectable tokens on average: min = c / beta, max = 2c - min, capped at
    the prompt's selectable length (then min = 2c - max). The mean over layers stays avg_capacity
    (up to integer rounding).
    """
    if avg_capacity >= prompt_len:
        return [prompt_len] * num_layers
    c = avg_capacity - window
    if c <= 0 or num_layers == 1:
        return [avg_capacity] * num_layers
    low = c / beta
    high = 2 * c - low
    if high >= prompt_len - window:
        high = prompt_len - window
        low = 2 * c - high
    steps = [high - layer * (high - low) / (num_layers - 1) for layer in range(num_layers)]
    return [int(round(s)) + window for s in steps]


def min_budget_attention(attn: torch.Tensor, tau: float) -> torch.Tensor:
    """ZigZagKV's MBA: the fewest keys whose attention mass reaches `tau` of the total, per row.

    attn: [..., S] non-negative attention (e.g. an observation window's column sums for one query head).
    Returns [...] int64 in [1, S]: the smallest k such that the k largest entries sum to >= tau * total.
    Uniform attention gives ceil(tau * S), one-hot gives 1. Sums are taken in float64 with a 1e-9
    relative slack, so that a mass of exactly tau * total is not missed by rounding.
    """
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    mass = attn.double().sort(dim=-1, descending=True).values.cumsum(dim=-1)  # [..., S]
    total = mass[..., -1:]
    short = mass < tau * total - 1e-9 * total  # prefixes still below the target
    return (short.sum(dim=-1) + 1).clamp(max=attn.shape[-1])


def min_budget_output(probs: torch.Tensor, values: torch.Tensor, order: torch.Tensor, eps: float,
                      query_valid: torch.Tensor | None = None, block: int = 64) -> torch.Tensor:
    """The fewest keys, taken in `order`, whose attention output stays within relative error `eps` of the
    full one (ZigZagKV's LMBO, METHODS.md 3.1, as a budget rule), per row.

    probs: [B, Hq, W, S] attention of W queries of each query head (each row sums to 1 over its valid keys);
    values: [B, Hkv, S, D] and order: [B, Hkv, S] per KV head (Hq a multiple of Hkv: the query heads of a
    group share their KV head's values and order), order listing the keys as a selection keeps them (first:
    kept first). With the k first keys kept, a query's output is its attention renormalised over them times
    their values, and e_k = mean over the W queries (those `query_valid` [B, W] marks, default all) of
    ||o_k - o|| / ||o||. Returns [B, Hq] int64: 1 + the largest k with e_k > eps (so every larger budget keeps
    the error within eps, e_S = 0), at least 1. A query with no attention on the k keys outputs 0 there.

    How, without materialising the W x S x D prefix outputs: with s_k = sum_{j<=k} p_j v_j and m_k its mass,
    ||s_k / m_k - o||^2 = ||s_k||^2 / m_k^2 - 2 <s_k, o> / m_k + ||o||^2, where <s_k, o> is a cumulative
    sum of scalars and ||s_k||^2 = ||s_{k-1}||^2 + p_k (2 <s_{k-1}, v_k> + p_k ||v_k||^2); over a block of
    `block` keys, <s_{k-1}, v_k> is the carried sum's dot product plus the block's strictly-upper Gram
    matrix weighted by p (matrix products). Float64 throughout, so the expansion's cancellation (e^2 ~ eps^2
    from terms ~ ||s_k / m_k||^2 / ||o||^2, about 1 unless the output is orders of magnitude shorter than the
    values) stays near 1e-14; memory is O(W * (D + block)) per query head for any S.
    """
    if not 0 <= eps < 1:
        raise ValueError(f"eps must be in [0, 1), got {eps!r}")
    b, hq, w, s = probs.shape
    hkv, d = values.shape[1], values.shape[-1]
    rows = hq // hkv * w  # a KV head's query rows: its group's W queries each; gathers and Gram matrices once
    if query_valid is None:
        query_valid = torch.ones(b, w, dtype=torch.bool, device=probs.device)
    weight = (query_valid.double() / query_valid.sum(-1, keepdim=True).clamp(min=1))[:, None, None, :, None]
    p = probs.double().nan_to_num(0.0).reshape(b, hkv, rows, s)  # [B, Hkv, R, S]
    p = p.gather(-1, order[:, :, None, :].expand(b, hkv, rows, s))
    v = values.double().gather(2, order[..., None].expand(b, hkv, s, d))  # [B, Hkv, S, D]
    full = p @ v  # [B, Hkv, R, D]
    full_sq = (full * full).sum(-1, keepdim=True).clamp(min=1e-300)  # [B, Hkv, R, 1]
    carried = torch.zeros_like(full)  # [B, Hkv, R, D]: s_k at the end of the blocks so far
    # [B, Hkv, R, 1] each: m_k, ||s_k||^2 and <s_k, o> at the end of the blocks so far
    mass, sq, cross = (torch.zeros(b, hkv, rows, 1, dtype=torch.float64, device=probs.device) for _ in range(3))
    last_over = torch.zeros(b, hq, dtype=torch.int64, device=probs.device)
    for start in range(0, s, block):
        stop = min(start + block, s)
        pb = p[..., start:stop]  # [B, Hkv, R, n]
        vb_t = v[:, :, start:stop].transpose(-1, -2)  # [B, Hkv, D, n]
        gram = vb_t.transpose(-1, -2) @ vb_t  # [B, Hkv, n, n]
        before = carried @ vb_t + pb @ gram.triu(1)  # [B, Hkv, R, n]: <s_{k-1}, v_k>
        sqs = sq + (pb * (2 * before + pb * gram.diagonal(dim1=-2, dim2=-1)[:, :, None])).cumsum(dim=-1)
        crosses = cross + (pb * (full @ vb_t)).cumsum(dim=-1)  # [B, Hkv, R, n]: <s_k, o>
        masses = mass + pb.cumsum(dim=-1)  # [B, Hkv, R, n]
        inverse = torch.where(masses > 0, 1 / masses, 0.0)  # no mass: the output is 0, e = 1
        err = ((sqs * inverse - 2 * crosses) * inverse / full_sq + 1).clamp(min=0).sqrt()
        mean_err = (err.view(b, hkv, hq // hkv, w, -1) * weight).sum(dim=3).view(b, hq, -1)  # [B, Hq, n]: e_k
        k = torch.arange(start + 1, stop + 1, device=probs.device)
        last_over = torch.maximum(last_over, torch.where(mean_err > eps, k, 0).max(dim=-1).values)
        carried = carried + pb @ vb_t.transpose(-1, -2)
        mass, sq, cross = masses[..., -1:], sqs[..., -1:], crosses[..., -1:]
    return (last_over + 1).clamp(max=s)


def zigzag_budgets(lmba: Sequence[float], avg_budget: int, bound: int, low: int, high: int) -> list[int]:
    """ZigZagKV's layer budgets (Eq. 6 as reconstructed in METHODS.md 3.1, clamped and rounded, 3.2 step 3).

    lmba: LMBA_l of every layer (>= 0); avg_budget: B_avg (slots per KV head on average, low <= B_avg <= high);
    bound: B_bound (0 <= bound <= B_avg); low / high: the smallest / largest budget a layer may get (the
    observation window / the prompt length). With u_l = LMBA_l / sum_k LMBA_k and f = max(bound, low):

        B_l = f + (B_avg - f) * L * u_l,     so  sum_l B_l = L * B_avg  and  B_l >= f.

    (f = B_bound as in the paper whenever the window fits under the bound; otherwise the floor is raised to
    the window so no layer needs raising afterwards.) Layers above `high` are clamped to it and the surplus
    is shared by the others with the same formula over the remaining layers and the remaining total,
    repeated until nothing exceeds `high`. Exact rational arithmetic, then largest-remainder rounding
    (ties to the lower layer index): the result sums to exactly L * B_avg, every entry lies in
    [max(bound, low), high], equal LMBAs give B_avg everywhere, and a layer with a larger LMBA never gets
    a smaller budget than one with a smaller LMBA.
    """
    n = len(lmba)
    if n == 0:
        raise ValueError("zigzag_budgets needs at least one layer")
    if not low <= avg_budget <= high:
        raise ValueError(f"need low <= avg_budget <= high, got {low}, {avg_budget}, {high}")
    if not 0 <= bound <= avg_budget:
        raise ValueError(f"need 0 <= bound <= avg_budget, got bound={bound}, avg_budget={avg_budget}")
    if any(not math.isfinite(x) or x < 0 for x in lmba):
        raise ValueError(f"LMBA values must be finite and >= 0, got {list(lmba)}")
    weight = [Fraction(x) for x in lmba]
    floor_ = max(bound, low)
    total = n * avg_budget
    free = list(range(n))
    value: dict[int, Fraction] = {}
    while True:
        remaining = total - high * (n - len(free))
        mean = Fraction(remaining, len(free))
        mass = sum(weight[i] for i in free)
        for i in free:
            share = weight[i] / mass if mass > 0 else Fraction(1, len(free))
            value[i] = floor_ + (mean - floor_) * len(free) * share
        over = [i for i in free if value[i] > high]
        if not over:
            break
        for i in over:
            value[i] = Fraction(high)
        free = [i for i in free if i not in over]
    budgets = [math.floor(value[i]) for i in range(n)]
    by_remainder = sorted(range(n), key=lambda i: (-(value[i] - budgets[i]), i))
    for i in by_remainder[: total - sum(budgets)]:
        budgets[i] += 1
    return budgets


def level_budgets(budgets: Sequence[int], order: Sequence[int], levels: int) -> list[int]:
    """Per-layer budgets of one sequence evened out into `levels` runs of layers, so that its layers take at
    most levels + 1 distinct sizes (stores of one size share an allocation, and a row-wise decode update then
    runs once per size: `allocate_stores`).

    `order` lists the layers by need, neediest first; it is cut into `levels` consecutive runs of near-equal
    length. In each run every layer gets the floor of the run's mean budget, and what the floors leave over,
    summed over the runs, goes to the neediest layer, so the total is kept and no layer falls below the
    smallest budget of its run.
    """
    n = len(order)
    if sorted(order) != list(range(n)) or len(budgets) != n:
        raise ValueError(f"order must list each of the {len(budgets)} layers once, got {list(order)}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    cuts = [round(i * n / min(levels, n)) for i in range(min(levels, n) + 1)]
    even = list(budgets)
    left = 0
    for run in (order[a:b] for a, b in zip(cuts, cuts[1:])):
        total = sum(budgets[i] for i in run)
        for i in run:
            even[i] = total // len(run)
        left += total % len(run)
    even[order[0]] += left
    return even
