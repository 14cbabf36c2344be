"""KVMerger (kvzoo/cache/METHODS.md 2.4) and ZigZagKV (3.4): invariants of the library's own set, merge and budget
functions under hypothesis, then end to end on tiny random models (full-cache parity when the budget covers
everything, exact cache sizes, memory, errors)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvzoo
from kvzoo.cache import KVMerger, SnapKV, ZigZagKV
from kvzoo.cache.budgets import min_budget_attention, min_budget_output, zigzag_budgets
from kvzoo.cache.merging_sets import (
    adjacent_cosine,
    budget_merging_sets,
    evict_lowest_sets,
    gaussian_merge_weights,
    merge_sets,
    merging_sets,
    protected_tokens,
    set_pivots,
)
from kvzoo.errors import KvzooError
from kvzoo_kernels.attention import decode_attention

from conftest import build_hf_model
from tests.method_helpers import reference_min_budget_output

MODELS = ["llama-gqa", "mistral-window", "falcon-7b-style"]
NUM_LAYERS = 4  # so that KVMerger's default skip_layers (0, 1, -1) leaves a layer to compress
SETTINGS = settings(max_examples=60, deadline=None)


# --- strategies -----------------------------------------------------------------------------------------


@st.composite
def token_rows(draw, max_len: int = 24):
    """(keys [T, D], score [T], protected [T]) with runs of similar keys (a random walk) and exact repeats."""
    t = draw(st.integers(1, max_len))
    d = draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    step = draw(st.sampled_from([0.05, 0.3, 1.0, 3.0]))
    keys = torch.randn(1, d, generator=gen) * 3 + (torch.randn(t, d, generator=gen) * step).cumsum(0)
    repeat = torch.rand(t, generator=gen) < 0.2  # some exact duplicates of the previous key
    for i in range(1, t):
        if repeat[i]:
            keys[i] = keys[i - 1]
    score = torch.rand(t, generator=gen)
    protected = torch.rand(t, generator=gen) < draw(st.sampled_from([0.0, 0.2, 0.5]))
    return keys, score, protected


def _check_partition(sets: torch.Tensor, protected: torch.Tensor) -> None:
    """Set numbers start at 0 and step by 0 or 1: disjoint runs of consecutive tokens covering every token;
    protected tokens are alone in their set."""
    assert sets[0] == 0
    steps = sets[1:] - sets[:-1]
    assert ((steps == 0) | (steps == 1)).all()
    sizes = torch.bincount(sets)
    assert (sizes[sets[protected]] == 1).all()


# --- KVMerger: merging sets -----------------------------------------------------------------------------


@SETTINGS
@given(token_rows(), st.floats(-1.0, 1.2))
def test_merging_sets_partition_and_rule(row, threshold):
    keys, _, protected = row
    sets = merging_sets(keys, protected, threshold)
    _check_partition(sets, protected)
    # Algorithm 1: neighbours share a set iff both are unprotected and similar enough.
    cos = adjacent_cosine(keys)
    together = ~protected[1:] & ~protected[:-1] & (cos >= threshold)
    assert torch.equal(sets[1:] == sets[:-1], together)


@SETTINGS
@given(token_rows(), st.floats(-1.0, 1.0), st.floats(-1.0, 1.0))
def test_more_threshold_never_fewer_sets(row, a, b):
    keys, _, protected = row
    low, high = min(a, b), max(a, b)
    assert merging_sets(keys, protected, low).max() <= merging_sets(keys, protected, high).max()


@SETTINGS
@given(token_rows())
def test_threshold_above_one_merges_nothing(row):
    keys, score, protected = row
    values = torch.randn_like(keys)
    sets = merging_sets(keys, protected, 1.01)
    assert torch.equal(sets, torch.arange(len(keys)))
    weights = gaussian_merge_weights(keys, sets, set_pivots(score, sets), 5.0)
    k_star, v_star = merge_sets(keys, values, sets, weights)
    assert torch.equal(k_star, keys) and torch.equal(v_star, values)  # bit-identical to the uncompressed cache


@SETTINGS
@given(token_rows(), st.data())
def test_budget_gives_exactly_the_budget(row, data):
    keys, score, _ = row
    t = len(keys)
    budget = data.draw(st.integers(1, t + 3))
    recent_n = data.draw(st.integers(0, max(0, min(budget - 1, t))))
    heavy = data.draw(st.integers(0, t))
    recent = torch.arange(t) >= t - recent_n
    protected = protected_tokens(score, recent, heavy, budget)
    assert (protected[recent]).all()
    heavy_kept = protected & ~recent
    assert heavy_kept.sum() <= heavy
    if heavy_kept.any() and not protected.all():  # the heavy hitters are the best-scored older tokens
        assert score[heavy_kept].min() >= score[~protected].max()
    sets = budget_merging_sets(keys, protected, budget)
    _check_partition(sets, protected)
    assert int(sets.max()) + 1 == min(budget, t)


@SETTINGS
@given(token_rows(), st.data())
def test_budget_sets_are_algorithm_1_at_some_epsilon(row, data):
    """Cutting the least similar links is what Algorithm 1 does at the epsilon a bisection would find
    (when similarities tie at the cut, no epsilon separates them and the earlier link is cut)."""
    keys, _, protected = row
    cos = adjacent_cosine(keys)
    budget = data.draw(st.integers(1, len(keys)))
    sets = budget_merging_sets(keys, protected, budget)
    link = ~protected[1:] & ~protected[:-1]
    merged, cut = link & (sets[1:] == sets[:-1]), link & (sets[1:] != sets[:-1])
    if merged.any() and cut.any():
        assert cos[merged].min() >= cos[cut].max()
    if not (merged.any() and cut.any()) or cos[merged].min() > cos[cut].max():
        epsilon = float(cos[merged].min()) if merged.any() else 1.5
        assert torch.equal(merging_sets(keys, protected, epsilon), sets)


@SETTINGS
@given(token_rows(), st.data())
def test_a_similarity_floor_cuts_every_less_similar_link_and_eviction_keeps_the_budget(row, data):
    """min_similarity: no set joins two adjacent keys less similar than it, whatever the budget; the sets
    beyond the budget are then evicted, lowest summed score first, never one holding a protected token, and
    the kept sets are numbered in order. Without a floor (or with one below every similarity) nothing changes."""
    keys, score, protected = row
    t = len(keys)
    budget = data.draw(st.integers(max(1, int(protected.sum())), t + 2))
    floor = data.draw(st.floats(-0.5, 1.0))
    cos = adjacent_cosine(keys)
    sets = budget_merging_sets(keys, protected, budget, min_similarity=floor)
    _check_partition(sets, protected)
    assert not (sets[1:] == sets[:-1])[cos < floor].any()
    assert torch.equal(budget_merging_sets(keys, protected, budget, min_similarity=-1.01),
                       budget_merging_sets(keys, protected, budget))

    renumbered, kept = evict_lowest_sets(sets, protected, score, budget)
    entries = int(sets.max()) + 1
    assert int(renumbered[kept].max()) + 1 == min(budget, entries)
    assert kept[protected].all()
    _check_partition(renumbered[kept], protected[kept])  # the kept sets, in order, numbered 0, 1, ...
    if entries > budget:
        set_score = torch.zeros(entries).scatter_add(0, sets, score)
        dropped = sets[~kept].unique()
        held = sets[kept & ~torch.isin(sets, sets[protected])].unique()  # kept sets that could have gone
        if len(held):
            assert set_score[dropped].max() <= set_score[held].min()
        assert torch.equal(renumbered[~kept], torch.full_like(renumbered[~kept], t - 1))
    else:
        assert kept.all() and torch.equal(renumbered, sets)


def test_eviction_drops_the_lowest_scored_unprotected_set():
    """Three sets [0, 1] [2] [3, 4] (token 2 protected), budget 2: the set of lower summed score goes."""
    sets = torch.tensor([0, 0, 1, 2, 2])
    protected = torch.tensor([False, False, True, False, False])
    score = torch.tensor([0.3, 0.3, 0.0, 0.1, 0.4])  # sums 0.6, 0.0 (protected), 0.5
    renumbered, kept = evict_lowest_sets(sets, protected, score, 2)
    assert kept.tolist() == [True, True, True, False, False]
    assert renumbered.tolist() == [0, 0, 1, 4, 4]
    _, kept = evict_lowest_sets(sets, protected, score, 1)  # the protected set always stays
    assert kept.tolist() == [False, False, True, False, False]


def test_protected_heavy_hitters_of_equal_score_go_to_the_earlier_or_newer_token():
    """A max-pooled span ties a peak with its neighbours: of equal scores the earlier tokens are protected first,
    or the newer with `newer_first` (a stored document's Compactor rank lends a score to the tokens before it)."""
    score = torch.tensor([0.1, 0.7, 0.7, 0.7, 0.7, 0.2])
    no_recent = torch.zeros(6, dtype=torch.bool)
    assert protected_tokens(score, no_recent, 2).nonzero().flatten().tolist() == [1, 2]
    assert protected_tokens(score, no_recent, 2, newer_first=True).nonzero().flatten().tolist() == [3, 4]
    assert protected_tokens(score, no_recent, 5, newer_first=True).nonzero().flatten().tolist() == [1, 2, 3, 4, 5]


def test_protected_heavy_hitters_are_dropped_only_as_needed():
    """6 older tokens, heavy hitters by score: 2, 4, 5. The fewest entries: 1 run = 1; protecting 2 splits
    the run (+2: 3 entries); then 4 splits [3..5] (+2: 5); then 5, now a run of one, costs nothing (5)."""
    score = torch.tensor([0.1, 0.2, 0.9, 0.3, 0.8, 0.4])
    no_recent = torch.zeros(6, dtype=torch.bool)
    assert protected_tokens(score, no_recent, 3).nonzero().flatten().tolist() == [2, 4, 5]
    assert protected_tokens(score, no_recent, 3, budget=2).nonzero().flatten().tolist() == []
    assert protected_tokens(score, no_recent, 3, budget=4).nonzero().flatten().tolist() == [2]
    assert protected_tokens(score, no_recent, 3, budget=5).nonzero().flatten().tolist() == [2, 4, 5]
    assert protected_tokens(score, no_recent, 2, budget=5).nonzero().flatten().tolist() == [2, 4]
    keys = torch.randn(6, 2)
    for budget in range(1, 7):
        protected = protected_tokens(score, no_recent, 3, budget)
        assert int(budget_merging_sets(keys, protected, budget).max()) + 1 == budget


# --- KVMerger: Gaussian merging -------------------------------------------------------------------------


@SETTINGS
@given(token_rows(), st.floats(-1.0, 1.0), st.floats(0.01, 100.0))
def test_merge_weights_convex_pivot_largest_hull(row, threshold, sigma):
    keys, score, protected = row
    values = torch.randn_like(keys)
    sets = merging_sets(keys, protected, threshold)
    pivots = set_pivots(score, sets)
    weights = gaussian_merge_weights(keys, sets, pivots, sigma)
    n = int(sets.max()) + 1
    assert (weights >= 0).all() and (weights[pivots] > 0).all()  # others may underflow for far keys
    torch.testing.assert_close(torch.zeros(n).scatter_add(0, sets, weights), torch.ones(n))
    assert (weights <= weights[pivots] + 1e-7).all()  # the pivot has the largest weight of its set
    assert (score <= score[pivots]).all()  # ... and the largest aggregated attention
    k_star, v_star = merge_sets(keys, values, sets, weights, value_scale="none")
    for s in range(n):
        members = keys[sets == s]
        assert (k_star[s] >= members.min(0).values - 1e-4).all() and (k_star[s] <= members.max(0).values + 1e-4).all()
    torch.testing.assert_close(k_star[:n], torch.zeros(n, keys.shape[1]).index_add(0, sets, weights[:, None] * keys))
    # value_scale="set_size": the same mean, times the set size.
    _, v_scaled = merge_sets(keys, values, sets, weights, value_scale="set_size")
    torch.testing.assert_close(v_scaled[:n], v_star[:n] * torch.bincount(sets)[:, None].float())


@SETTINGS
@given(st.integers(2, 10), st.integers(1, 4), st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_identical_keys_merge_to_that_key(t, d, sigma, seed):
    gen = torch.Generator().manual_seed(seed)
    key = torch.randn(d, generator=gen) * 5
    keys = key.expand(t, d).clone()
    sets = torch.zeros(t, dtype=torch.long)
    weights = gaussian_merge_weights(keys, sets, set_pivots(torch.rand(t, generator=gen), sets), sigma)
    k_star, _ = merge_sets(keys, torch.randn(t, d, generator=gen), sets, weights)
    torch.testing.assert_close(k_star[0], key)


@SETTINGS
@given(st.integers(2, 10), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_sigma_limits(t, d, seed):
    gen = torch.Generator().manual_seed(seed)
    keys, score = torch.randn(t, d, generator=gen), torch.rand(t, generator=gen)
    sets = torch.zeros(t, dtype=torch.long)
    pivots = set_pivots(score, sets)
    uniform = gaussian_merge_weights(keys, sets, pivots, math.inf)
    torch.testing.assert_close(uniform, torch.full((t,), 1.0 / t))
    k_star, _ = merge_sets(keys, keys, sets, gaussian_merge_weights(keys, sets, pivots, 1e-6))
    torch.testing.assert_close(k_star[0], keys[int(score.argmax())])


def test_merged_members_count_as_their_tokens():
    """Chunked prefill re-merges slots standing for n tokens: weight n g, values un-scaled by n first."""
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    values = torch.tensor([[6.0], [1.0]])  # member 0: 3 tokens of mean value 2, already scaled by 3
    counts = torch.tensor([3.0, 1.0])
    sets = torch.zeros(2, dtype=torch.long)
    weights = gaussian_merge_weights(keys, sets, torch.zeros(2, dtype=torch.long), 5.0, counts)
    torch.testing.assert_close(weights, torch.tensor([0.75, 0.25]))
    _, v_star = merge_sets(keys, values, sets, weights, counts, "set_size")
    torch.testing.assert_close(v_star[0], torch.tensor([4 * (0.75 * 2 + 0.25 * 1)]))


def test_alpha_one_without_value_scaling_is_lossless_for_identical_tokens():
    """The optional compensated variant: a slot of n identical tokens with bias log n attends exactly as
    the n tokens did (the paper's |S| value scaling is not lossless, METHODS.md 2.4 note 7)."""
    gen = torch.Generator().manual_seed(0)
    k, v, other_k, other_v = (torch.randn(4, generator=gen) for _ in range(4))
    q, k_new, v_new = torch.randn(1, 1, 4, generator=gen), torch.randn(1, 1, 4, generator=gen), torch.zeros(1, 1, 4)
    keys, values = torch.stack([other_k, k, k, k]), torch.stack([other_v, v, v, v])
    sets = torch.tensor([0, 1, 1, 1])
    weights = gaussian_merge_weights(keys, sets, set_pivots(torch.rand(4, generator=gen), sets), 5.0)
    k_star, v_star = merge_sets(keys, values, sets, weights, value_scale="none")
    full, _ = decode_attention(q, keys[None, None], values[None, None], torch.zeros(1, 1, 4), k_new, v_new)
    bias = torch.tensor([[[0.0, math.log(3)]]])
    merged, _ = decode_attention(q, k_star[None, None, :2], v_star[None, None, :2], bias, k_new, v_new)
    torch.testing.assert_close(merged, full)


# --- ZigZagKV: budget functions -------------------------------------------------------------------------


@st.composite
def zigzag_cases(draw):
    n_layers = draw(st.integers(1, 12))
    high = draw(st.integers(1, 300))
    low = draw(st.integers(1, high))
    avg = draw(st.integers(low, high))
    bound = int(draw(st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0])) * avg)
    lmba = draw(st.lists(st.floats(0.0, 400.0), min_size=n_layers, max_size=n_layers))
    return lmba, avg, bound, low, high


@SETTINGS
@given(zigzag_cases())
def test_zigzag_budgets_sum_and_bounds(case):
    lmba, avg, bound, low, high = case
    budgets = zigzag_budgets(lmba, avg, bound, low, high)
    assert sum(budgets) == len(lmba) * avg
    assert all(max(bound, low) <= b <= high for b in budgets)
    for i in range(len(lmba)):  # a more uncertain layer never gets less
        for j in range(len(lmba)):
            if lmba[i] > lmba[j]:
                assert budgets[i] >= budgets[j]


@SETTINGS
@given(zigzag_cases(), st.floats(0.0, 400.0))
def test_zigzag_equal_lmba_is_uniform(case, value):
    lmba, avg, bound, low, high = case
    assert zigzag_budgets([value] * len(lmba), avg, bound, low, high) == [avg] * len(lmba)


@SETTINGS
@given(zigzag_cases(), st.data())
def test_zigzag_more_uncertainty_never_less_budget(case, data):
    lmba, avg, bound, low, high = case
    layer = data.draw(st.integers(0, len(lmba) - 1))
    raised = list(lmba)
    raised[layer] += data.draw(st.floats(0.0, 400.0))
    assert zigzag_budgets(raised, avg, bound, low, high)[layer] >= zigzag_budgets(lmba, avg, bound, low, high)[layer]


def test_zigzag_budgets_follow_eq6_and_redistribute():
    # No clamping: B_l = 20 + (100 - 20) * 2 * u_l with u = (1/4, 3/4).
    assert zigzag_budgets([1.0, 3.0], 100, 20, 8, 1000) == [60, 140]
    # Layer 1 would get 140 > 120: clamped, its surplus goes to layer 0.
    assert zigzag_budgets([1.0, 3.0], 100, 20, 8, 120) == [80, 120]
    # The window (30) above B_bound (20) becomes the floor: 30 + 70 * 2 * u.
    assert zigzag_budgets([0.0, 1.0], 100, 20, 30, 1000) == [30, 170]


@SETTINGS
@given(st.integers(1, 64), st.integers(0, 2**31 - 1), st.floats(0.01, 1.0), st.floats(0.01, 1.0))
def test_mba_monotone_in_tau_and_definition(s, seed, a, b):
    attn = torch.rand(3, s, generator=torch.Generator().manual_seed(seed)) ** 4
    lo, hi = min(a, b), max(a, b)
    mba_lo, mba_hi = min_budget_attention(attn, lo), min_budget_attention(attn, hi)
    assert (mba_lo <= mba_hi).all() and (mba_hi >= 1).all() and (min_budget_attention(attn, 1.0) <= s).all()
    top = attn.double().sort(-1, descending=True).values.cumsum(-1)
    total = top[:, -1]
    for row, k in enumerate(mba_hi.tolist()):  # the top-k hold tau of the mass; the top-(k-1) do not
        assert top[row, k - 1] >= hi * total[row] * (1 - 1e-8)
        assert k == 1 or top[row, k - 2] < hi * total[row]


@SETTINGS
@given(st.integers(1, 200), st.integers(1, 100))
def test_mba_uniform_and_one_hot(s, tau_percent):
    tau = tau_percent / 100
    assert int(min_budget_attention(torch.full((s,), 1.0 / s), tau)) == math.ceil(tau * s - 1e-9)
    one_hot = torch.zeros(s)
    one_hot[s // 2] = 1.0
    assert int(min_budget_attention(one_hot, tau)) == 1


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 30), st.integers(1, 4), st.integers(0, 2**16), st.sampled_from([0.02, 0.1, 0.3]))
def test_min_budget_output_against_its_definition(s, w, seed, eps):
    """ZigZagKV's output budget (uncertainty="output") is 1 + the largest k whose first k keys in the given
    order leave the window's attention output more than eps off, computed here one k at a time."""
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(2, 3, w, s, generator=g, dtype=torch.float64) * 2).softmax(-1)
    values = torch.randn(2, 3, s, 4, generator=g, dtype=torch.float64)
    order = torch.stack([torch.randperm(s, generator=g) for _ in range(6)]).view(2, 3, s)
    got = min_budget_output(probs, values, order, eps)
    assert torch.equal(min_budget_output(probs, values, order, eps, block=3), got), "blocks of 3 keys"
    for b in range(2):
        for h in range(3):
            expected = reference_min_budget_output(probs[b, h], values[b, h], order[b, h].tolist(), eps)
            assert int(got[b, h]) == expected, f"sequence {b} head {h}"
    # One KV head shared by the three query heads (GQA): each query head against that head's values and order.
    grouped = min_budget_output(probs, values[:, :1], order[:, :1], eps, block=3)
    for b in range(2):
        for h in range(3):
            expected = reference_min_budget_output(probs[b, h], values[b, 0], order[b, 0].tolist(), eps)
            assert int(grouped[b, h]) == expected, f"grouped: sequence {b} query head {h}"


def test_min_budget_output_ignores_padded_queries_and_needs_one_key_for_equal_values():
    """Equal values: any one key with mass reproduces the output. A padded query (all-zero, or NaN, row)
    does not count in the mean: the budget is the valid queries' alone."""
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]], dtype=torch.float64)[None, None]  # [1, 1, 2, 3]
    order = torch.tensor([[[1, 2, 0]]])
    same = torch.ones(1, 1, 3, 2, dtype=torch.float64)
    assert int(min_budget_output(probs, same, order, 0.01)) == 1
    values = torch.eye(3, dtype=torch.float64)[None, None]
    alone = int(min_budget_output(probs[:, :, 1:], values, order, 0.1))
    padded = probs.clone()
    padded[0, 0, 0] = float("nan")
    assert int(min_budget_output(padded, values, order, 0.1, torch.tensor([[False, True]]))) == alone == 3


# --- end to end on tiny models ----------------------------------------------------------------------------


NEW = 10  # tokens generated per sequence (eos disabled, so every sequence generates all of them)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    models = {}
    for name in MODELS:
        path = tmp_path_factory.mktemp(name)
        build_hf_model(name, num_hidden_layers=NUM_LAYERS).save_pretrained(path, safe_serialization=True)
        models[name] = kvzoo.load(path)
    return models


@pytest.fixture(scope="module")
def run(tiny_models):
    """(model name, prompt seed, prompt lengths, method or None, prefill_chunk) -> GenerationOutput of NEW
    tokens; full-cache runs are shared between tests."""
    full_runs = {}

    def go(name, seed=0, lens=(37, 22), method=None, prefill_chunk=None):
        gen = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in lens]
        if method is None and (name, seed, lens) in full_runs:
            return full_runs[name, seed, lens]
        out = tiny_models[name].generate_ids(prompts, max_new_tokens=NEW, eos_token_ids=[], compression=method,
                                             prefill_chunk=prefill_chunk)
        if method is None:
            full_runs[name, seed, lens] = out
        return out

    return go


@pytest.mark.parametrize("name", MODELS)
def test_fixed_epsilon_above_one_matches_full_cache(run, name):
    """2.4 invariant 2 (the budget-mode parity of every method is in tests/test_method_cases.py)."""
    method = KVMerger(budget=None, threshold=1.01, skip_layers=())
    assert run(name, method=method).token_ids == run(name).token_ids


def _sorted_contents(slots, b, h):
    filled = slots.filled[b, h]
    order = slots.pos[b, h][filled].argsort()
    return [x[b, h][filled][order] for x in (slots.pos, slots.k, slots.v)]


def test_fixed_epsilon_above_one_keeps_the_full_cache_contents(run):
    full = run("llama-gqa").cache
    out = run("llama-gqa", method=KVMerger(budget=None, threshold=1.01, skip_layers=())).cache
    for a, b in zip(full.layers, out.layers):
        for bi, h in itertools.product(range(2), range(a.k.shape[1])):
            for x, y in zip(_sorted_contents(a, bi, h), _sorted_contents(b, bi, h)):
                assert torch.equal(x, y)


@pytest.mark.parametrize("name", MODELS)
def test_kvmerger_sizes_are_exact_and_memory_shrinks(run, name):
    lens = (41, 26)
    for method in (KVMerger(), KVMerger(min_similarity=None), KVMerger(min_similarity=None, merged_count="attention"),
                   KVMerger.paper(budget=0.3, skip_layers=(-1,))):
        out = run(name, 1, lens, method)
        cache, skipped = out.cache, method.skipped(NUM_LAYERS)
        filled = cache.filled_slots()  # [L, B, Hkv]: the compressed prompt + NEW - 1 appended tokens
        merging = [layer for layer in range(NUM_LAYERS) if layer not in skipped]
        for b, n in enumerate(lens):  # the merging layers share their budgets by need (or keep one each: paper)
            budgets = [int(cache.layers[layer].state["prefill_budget"][b]) for layer in merging]
            assert sum(budgets) == len(merging) * int(method.budget * n), budgets
            if method.layer_budgets == "uniform":
                assert set(budgets) == {int(method.budget * n)}
        for layer, (b, n) in itertools.product(range(NUM_LAYERS), enumerate(lens)):
            expected = n if layer in skipped else int(cache.layers[layer].state["prefill_budget"][b])
            assert (filled[layer, b] == expected + NEW - 1).all(), (layer, b)
            tokens = cache.layers[layer].logw[b].exp().sum(-1)
            if method.min_similarity is None and method.merged_count == "members":  # every token counted once
                torch.testing.assert_close(tokens, torch.full_like(tokens, float(n + NEW - 1)))
            else:  # dissimilar keys (random weights) were evicted rather than merged, or a merged slot counts
                # its members' attention relative to its pivot's: between 1 and |S| each
                assert (tokens <= n + NEW - 1 + 1e-4).all() and (tokens >= expected + NEW - 1 - 1e-4).all()
        assert cache.nbytes() < run(name, 1, lens).cache.nbytes()


def test_kvmerger_with_a_floor_of_one_evicts_instead_of_merging(run):
    """min_similarity=1: no two (position-rotated, random) keys are similar enough to merge, so every kept
    slot is one prompt token, verbatim: the budget is met by eviction alone. (The generated tokens' keys
    differ from the full cache's: they were computed over the compressed cache.)"""
    full = run("llama-gqa").cache
    out = run("llama-gqa", method=KVMerger(budget=0.4, skip_layers=(), min_similarity=1.0)).cache
    assert ((out.budgets() - NEW).sum(0) == len(out.layers) * torch.tensor([int(0.4 * 37), int(0.4 * 22)])).all()
    for a, b in zip(full.layers, out.layers):
        assert (b.logw[b.filled] == 0).all()
        for bi, h in itertools.product(range(2), range(a.k.shape[1])):
            pos, k, v = _sorted_contents(b, bi, h)
            prompt = pos < int(b.state["prompt_len"][bi])
            pos, k, v = pos[prompt], k[prompt], v[prompt]
            assert len(pos) == int(b.state["prefill_budget"][bi])  # the layer's share of L x 40% by need
            full_pos, full_k, full_v = _sorted_contents(a, bi, h)
            at = torch.searchsorted(full_pos, pos)
            assert torch.equal(full_pos[at], pos) and torch.equal(full_k[at], k) and torch.equal(full_v[at], v)


def test_kvmerger_chunked_prefill(run):
    full = run("mistral-window", 2)
    assert run("mistral-window", 2, method=KVMerger(budget=64, skip_layers=()), prefill_chunk=6).token_ids == (
        full.token_ids)
    for floor, count in ((None, "members"), (0.5, "members"), (None, "attention")):
        method = KVMerger(budget=0.4, skip_layers=(), min_similarity=floor, merged_count=count)
        cache = run("mistral-window", 2, method=method, prefill_chunk=6).cache
        for layer, (b, n) in itertools.product(cache.layers, enumerate((37, 22))):
            kept = int(0.4 * n) + NEW - 1
            assert (layer.filled[b].sum(-1) == kept).all()
            tokens = layer.logw[b].exp().sum(-1)
            if floor is None and count == "members":  # every token is accounted for once
                torch.testing.assert_close(tokens, torch.full_like(tokens, float(n + NEW - 1)))
            else:  # each slot counts for at least 1 and at most the tokens it merged
                assert (tokens >= kept - 1e-4).all() and (tokens <= n + NEW - 1 + 1e-4).all()
                assert (layer.logw[b][layer.filled[b]] >= -1e-6).all()
            assert torch.isfinite(layer.k[b]).all() and torch.isfinite(layer.v[b]).all()


def test_attention_counts_of_already_merged_members():
    """n_p * sum_t A_t / A_p, between the pivot's own count and the tokens the set holds: sets {0, 1} and {2};
    token 0 is a merged slot standing for 3 tokens with A = 4 (the pivot), token 1 a token with A = 1: 3 * 5 / 4
    = 3.75 (at most 3 + 1 = 4 members); the singleton {2} (a merged slot of 2, A = 0) keeps its 2 members."""
    from kvzoo.cache.merging_sets import attention_counts, per_set, set_pivots

    score, counts = torch.tensor([[4.0, 1.0, 0.0]]), torch.tensor([[3.0, 1.0, 2.0]])
    sets = torch.tensor([[0, 0, 1]])
    got = attention_counts(score, counts, sets, set_pivots(score, sets), per_set(counts, sets))
    torch.testing.assert_close(got[0, :2], torch.tensor([3.75, 2.0]))
    capped = attention_counts(torch.tensor([[4.0, 4.0]]), torch.tensor([[3.0, 1.0]]), torch.tensor([[0, 0]]),
                              torch.tensor([[0, 0]]), torch.tensor([[4.0, 0.0]]))
    assert float(capped[0, 0]) == 4.0  # 3 * 8 / 4 = 6 counts for no more than the 4 tokens it holds


def test_a_set_size_scaled_kvmerger_stores_a_document_counted_by_members():
    method = KVMerger(value_scale="set_size", alpha=0.0)
    assert method.for_stored_document().merged_count == "members"
    assert KVMerger().for_stored_document().merged_count == "attention"


def test_kvmerger_fixed_epsilon_shrinks_to_the_data(run):
    method = KVMerger(budget=None, threshold=-1.0, skip_layers=(), decode_cap=4)  # merge every run
    cache = run("falcon-7b-style", 3, method=method).cache
    for layer in cache.layers:  # capacity: the largest head's prompt part + decode headroom min(NEW, 4)
        prompt_part = (layer.filled & (layer.pos < layer.state["prompt_len"][:, None, None])).sum(-1)
        assert layer.capacity == int(prompt_part.max()) + 4
        assert torch.equal(layer.budget, prompt_part.max(-1).values + 4)
    assert cache.nbytes() < run("falcon-7b-style", 3).cache.nbytes()


@pytest.mark.parametrize("name", MODELS)
def test_zigzag_budgets_in_the_cache(run, name):
    lens = (61, 33)
    cache = run(name, 4, lens, ZigZagKV(budget=0.3, window_size=4, tau=0.5)).cache
    filled = cache.filled_slots() - (NEW - 1)  # [L, B, Hkv]: the prompt part
    for b, n in enumerate(lens):
        per_layer = filled[:, b, 0]
        assert (filled[:, b] == per_layer[:, None]).all()  # same count for every head of a layer
        assert int(per_layer.sum()) == NUM_LAYERS * int(0.3 * n)
        assert (per_layer >= max(int(0.2 * int(0.3 * n)), 4)).all()
        for layer in cache.layers:  # the observation window is always kept
            kept = layer.pos[b][layer.filled[b]].view(layer.k.shape[1], -1)
            assert (((kept >= n - 4) & (kept < n)).sum(-1) == 4).all()
    for layer in cache.layers:
        assert layer.capacity == int(layer.state["prefill_budget"].max()) + NEW
        assert torch.equal(layer.budget, layer.state["prefill_budget"] + NEW)
        assert "lmba" not in layer.state
    assert cache.nbytes() < run(name, 4, lens).cache.nbytes()


def test_zigzag_with_bound_equal_to_average_is_snapkv(run):
    """bound_ratio = 1: every layer gets B_avg, so the selection is SnapKV's with the same window/pooling
    (average pooling: max-pooling makes ties, which the two break in different candidate orders)."""
    kwargs = dict(budget=0.4, window_size=8, kernel_size=5, pooling="avg", pool_ahead=0)
    zig = run("llama-gqa", 5, method=ZigZagKV(bound_ratio=1.0, rank="window", **kwargs))
    snap = run("llama-gqa", 5, method=SnapKV(**kwargs))
    assert zig.token_ids == snap.token_ids
    for a, b in zip(zig.cache.layers, snap.cache.layers):
        for bi, h in itertools.product(range(2), range(a.k.shape[1])):
            assert torch.equal(_sorted_contents(a, bi, h)[0], _sorted_contents(b, bi, h)[0])


def test_zigzag_refuses_chunked_prefill(run):
    with pytest.raises(KvzooError, match="prefill_chunk"):
        run("llama-gqa", method=ZigZagKV(), prefill_chunk=8)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: KVMerger(budget=1.5), "ratio in"),
        (lambda: KVMerger(budget=0), ">= 1 token"),
        (lambda: KVMerger(threshold="high"), "threshold"),
        (lambda: KVMerger(sigma=0.0), "sigma must be a number > 0"),
        (lambda: KVMerger(merged_count="x"), "merged_count must be one of 'attention', 'members', got 'x'"),
        (lambda: KVMerger(stored_merged_count="x"), "stored_merged_count must be None or one of .*, got 'x'"),
        (lambda: KVMerger.paper(merged_count="attention"), "value_scale='set_size' .* needs merged_count='members'"),
        (lambda: KVMerger(recent_ratio=1.2), "recent_ratio must be in"),
        (lambda: KVMerger(heavy_ratio=-0.1), "heavy_ratio must be in"),
        (lambda: KVMerger(skip_layers=(0.5,)), "skip_layers must be a tuple"),
        (lambda: KVMerger(value_scale="mean"), "value_scale must be one of"),
        (lambda: KVMerger(decode_cap=0), "decode_cap"),
        (lambda: KVMerger(min_similarity=1.5), "min_similarity must be None or a cosine similarity in"),
        (lambda: KVMerger(min_similarity="0.5"), "min_similarity must be None or a cosine similarity in"),
        (lambda: KVMerger(stored_verbatim=1.5), r"stored_verbatim must be a share of the budget in \[recent_ratio "
                                                 r"\(0.34\), 1\], got 1.5"),
        (lambda: KVMerger(stored_verbatim=0.2), r"stored_verbatim must be .*, got 0.2"),
        (lambda: ZigZagKV(tau=0.0), "tau must be in"),
        (lambda: ZigZagKV(tau=1.5), "tau must be in"),
        (lambda: ZigZagKV(bound_ratio=2.0), "bound_ratio must be in"),
        (lambda: ZigZagKV(rank="shares"), "rank must be one of 'window', 'attention_shares', 'compactor', got 'shares'"),
        (lambda: ZigZagKV(rank="compactor", cross_layer=True), "cross_layer compares attention shares"),
        (lambda: KVMerger(recent_tokens=-1), "recent_tokens must be None or an integer >= 0, got -1"),
        (lambda: KVMerger(stored_recent=2.5), "stored_recent must be None or an integer >= 0, got 2.5"),
        (lambda: KVMerger(rank="compactor"), "rank='compactor' blends .* use layer_budgets='uniform' with it"),
        (lambda: ZigZagKV(stored_rank="shares"), "stored_rank must be None or one of 'window', "),
        (lambda: ZigZagKV(window_size=0), "window_size"),
        (lambda: ZigZagKV(pool_ahead=5), r"ZigZagKV: pool_ahead must be .* 0 \.\. kernel_size - 1 = 4, got 5"),
        (lambda: KVMerger(pool_ahead=-1), r"KVMerger: pool_ahead must be .*, got -1"),
        (lambda: ZigZagKV(cross_layer=1), "cross_layer must be True or False"),
        (lambda: ZigZagKV(question_window=0), "ZigZagKV: question_window must be None or an integer >= 1, got 0"),
        (lambda: ZigZagKV(question_kernel_size=0), "ZigZagKV: question_kernel_size must be an integer >= 1, got 0"),
        (lambda: ZigZagKV(question_pooling="mean"), "ZigZagKV: question_pooling must be 'max' or 'avg', got 'mean'"),
        (lambda: ZigZagKV(question_pool_ahead=7),
         r"ZigZagKV: question_pool_ahead must be .* 0 \.\. question_kernel_size - 1 = 6, got 7"),
    ],
)
def test_invalid_hyperparameters(make, message):
    with pytest.raises(KvzooError, match=message):
        make()


def test_invalid_settings_for_the_model(run):
    with pytest.raises(KvzooError, match=r"skip_layers \[4\] out of range for a model with 4 layers"):
        run("llama-gqa", method=KVMerger(skip_layers=(4,)))
    assert ZigZagKV(budget=5).sequence_budget(40) == 32  # raised to the window (the budget rule)
