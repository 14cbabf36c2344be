"""The baselines StreamingLLM, H2O, SnapKV, PyramidKV and TOVA against kvzoo/cache/METHODS.md sections 4 and 5, with
FullCache as the oracle, driven through the library's own prefill and decode code paths: real tiny models
(tests/conftest.py) and random q/k/v fed to `kvzoo.attention.attend` (tests/method_helpers.py).

1. (full-budget parity, batch == alone and memory for every method: tests/test_method_cases.py)
2. the section 4 invariants as properties (hypothesis), the selections checked against scores computed
   here from the definitions; batch results equal per-sample results, chunked prefill equals one-shot
   while nothing has been dropped;
3. budget validation;
4. memory: decode caps of the prefill-only methods, constant bytes of the constant-memory ones.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from kvzoo import H2O, TOVA, PyramidKV, SnapKV, StreamingLLM
from kvzoo.cache.budgets import pyramid_budgets
from kvzoo.errors import KvzooError
from kvzoo_kernels.attention import attention_probs
from tests.method_helpers import (
    FakeConfig,
    check_slot_invariants,
    drive_model,
    drive_synthetic,
    pool_1d,
    random_prompt,
    random_qkv,
    ratio_or_tokens,
    reference_probs,
)

MODELS = ["llama-gqa", "mistral-window", "falcon-7b-style"]
METHODS = {"StreamingLLM": StreamingLLM, "H2O": H2O, "SnapKV": SnapKV, "PyramidKV": PyramidKV, "TOVA": TOVA}
CONSTANT_MEMORY = ("StreamingLLM", "H2O", "TOVA")
PREFILL_ONLY = ("SnapKV", "PyramidKV")
TOL = 1e-5  # fp32 logits and scores: same math, different summation order (observed ~1e-7)
SLACK = 1e-6  # score comparisons of a top-k selection (ties in fp32 round differently)

pytestmark = pytest.mark.usefixtures("one_thread")


def kept_set(snap, layer: int, b: int, h: int) -> set[int]:
    return set(snap.kept(layer, b, h))


# --- 1. a budget covering everything is exact: tests/test_method_cases.py (every method, every layout) ------

# --- 2. invariants through the real models ------------------------------------------------------------------

def expected_prefill_budgets(method_name: str, method, lens: list[int], num_layers: int) -> list[list[int]]:
    """[L][B] slots kept from each prompt: the budget resolution of budgets.py's docstrings; SnapKV never
    keeps more than the prompt; PyramidKV's per-layer split is `pyramid_budgets` (tested on its own below)."""
    per_seq = [ratio_or_tokens(method.budget, n) for n in lens]
    if method_name in CONSTANT_MEMORY:
        return [per_seq] * num_layers
    per_seq = [min(b, n) for b, n in zip(per_seq, lens)]
    if method_name == "SnapKV":
        return [per_seq] * num_layers
    columns = []
    for b, n in zip(per_seq, lens):
        if b >= n:
            columns.append([n] * num_layers)
        else:
            columns.append(pyramid_budgets(b, min(method.window_size, n), n, num_layers, method.beta))
    return [list(row) for row in zip(*columns)]


def budget_strategy():
    return st.one_of(st.integers(1, 30), st.floats(0.05, 0.95))


@st.composite
def method_cases(draw, names=tuple(METHODS), max_len: int = 24):
    """(method name, method, prompt lengths) with a valid configuration for every prompt."""
    name = draw(st.sampled_from(names))
    lens = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=3))
    budget = draw(budget_strategy())
    smallest = min(ratio_or_tokens(budget, n) for n in lens)
    if name == "StreamingLLM":
        method = StreamingLLM(budget=budget, sinks=draw(st.integers(0, min(4, smallest - 1))))
    elif name == "H2O":
        method = H2O(budget=budget, recent_ratio=draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])))
    elif name == "TOVA":
        method = TOVA(budget=budget)
    else:
        method = METHODS[name](budget=budget, window_size=draw(st.integers(1, max(1, min(8, smallest)))),
                               kernel_size=draw(st.sampled_from([1, 3, 5, 7])),
                               pooling=draw(st.sampled_from(["avg", "max"])))
    return name, method, lens


def check_streaming_sets(snaps, budgets: list[list[int]], sinks: int) -> None:
    """4.1: kept = {0..sinks-1} ∪ {the last budget - sinks positions}, at every step, in every head."""
    for si, snap in enumerate(snaps):
        for layer, row in enumerate(budgets):
            for b, (budget, seen) in enumerate(zip(row, snap.seen)):
                expected = set(range(seen)) if seen <= budget else (
                    set(range(sinks)) | set(range(seen - (budget - sinks), seen)))
                for h in range(snap.layers[layer]["pos"].shape[1]):
                    assert kept_set(snap, layer, b, h) == expected, f"snapshot {si}, layer {layer}, seq {b}, head {h}"


def check_heads_agree(snaps) -> None:
    """4.5: TOVA keeps the same positions in every KV head of a layer."""
    for si, snap in enumerate(snaps):
        for layer, s in enumerate(snap.layers):
            for b in range(s["pos"].shape[0]):
                first = kept_set(snap, layer, b, 0)
                for h in range(1, s["pos"].shape[1]):
                    assert kept_set(snap, layer, b, h) == first, f"snapshot {si}, layer {layer}, seq {b}, head {h}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(MODELS), method_cases(), st.integers(0, 10), st.sampled_from([None, None, 3, 8]),
       st.integers(0, 100))
def test_model_slot_invariants(models, model_name, case, steps, chunk, seed):
    """Through the real models, left-padded batches, optionally chunked prefill, at every step: filled slots
    per (layer, sequence, KV head) never exceed the budget; constant-memory methods hold exactly
    min(seen, budget); SnapKV/PyramidKV hold exactly their prefill budget + the tokens generated; filled
    slots hold distinct real positions (never padding, never beyond prompt + generated); StreamingLLM holds
    exactly the sinks and the most recent positions; TOVA's heads agree."""
    name, method, lens = case
    model = models(model_name)
    prompts = [random_prompt(n, seed + i) for i, n in enumerate(lens)]
    trace = drive_model(model, prompts, method, steps, prefill_chunk=chunk)
    layers = model.config.num_layers
    prefill = expected_prefill_budgets(name, method, lens, layers)
    if name in CONSTANT_MEMORY:
        check_slot_invariants(trace.snapshots, prefill, constant=True)
    else:
        check_slot_invariants(trace.snapshots, [[p + steps for p in row] for row in prefill])
        for si, snap in enumerate(trace.snapshots):
            for layer in range(layers):
                expected = torch.tensor(prefill[layer])[:, None] + si
                assert (snap.filled_counts(layer) == expected).all(), f"snapshot {si}, layer {layer}"
    if name == "StreamingLLM":
        check_streaming_sets(trace.snapshots, prefill, method.sinks)
    if name == "TOVA":
        check_heads_agree(trace.snapshots)


# --- 2. invariants on random q/k/v through the attention step, against the definitions ----------------------

@st.composite
def synth_cases(draw, max_len: int = 30, max_steps: int = 12, windows=(None, None, 4, 7), max_batch: int = 3):
    """(prompt lengths, decode steps, random q/k/v, sliding window)."""
    lens = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=max_batch))
    steps = draw(st.integers(0, max_steps))
    kv_heads, groups = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    window = draw(st.sampled_from(windows))
    qkv = random_qkv(len(lens), 1, kv_heads, groups, max(lens) + steps, seed=draw(st.integers(0, 2**16)))
    return lens, steps, qkv, window


@settings(max_examples=40, deadline=None)
@given(synth_cases(), budget_strategy(), st.integers(0, 4), st.sampled_from([None, 5]))
def test_streaming_llm_keeps_sinks_and_recent(case, budget, sinks, chunk):
    """4.1: exactly {0..sinks-1} ∪ the last (budget - sinks) positions after prefill (one shot or chunked)
    and after every decode step; constant size; each slot holds its token's own key and value."""
    lens, steps, qkv, window = case
    sinks = min(sinks, min(ratio_or_tokens(budget, n) for n in lens) - 1)
    trace = drive_synthetic(StreamingLLM(budget=budget, sinks=sinks), qkv, lens, steps, window, chunk)
    budgets = [[ratio_or_tokens(budget, n) for n in lens]]
    check_slot_invariants(trace.snapshots, budgets, constant=True, qkv=qkv)
    check_streaming_sets(trace.snapshots, budgets, sinks)


def group_mean(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[Hq, ...] -> [Hkv, ...] mean over each KV head's query heads (METHODS.md 0.2, GQA)."""
    return x.reshape(x.shape[0] // groups, groups, *x.shape[1:]).mean(1)


def prompt_column_sums(qkv, b: int, n: int, window: int | None) -> torch.Tensor:
    """H2O's accumulated attention of sequence b's own n prompt tokens (no padding): the column sums of the
    causal attention of all its queries, per KV head [Hkv, n] (kvzoo_kernels' attention_probs)."""
    pos = torch.arange(n)
    kv_heads = qkv.k[0].shape[1]
    probs = attention_probs(qkv.q[0][b:b + 1, :, :n], qkv.k[0][b:b + 1, :, :n], pos[None],
                            pos.expand(1, kv_heads, n), torch.zeros(1, kv_heads, n), window)[0]  # [Hq, n, n]
    return group_mean(probs.sum(1), qkv.groups)


def step_probs(qkv, b: int, h: int, old: list[int], p_new: int, window: int | None) -> torch.Tensor:
    """Attention of the query at p_new (each query head of KV head h) over the kept positions `old` and the
    new token itself: [G, len(old) + 1]."""
    g = qkv.groups
    keys = qkv.k[0][b, h, old + [p_new]]
    q = qkv.q[0][b, h * g:(h + 1) * g, p_new][:, None]  # [G, 1, D]
    return reference_probs(q, keys, [p_new], old + [p_new], window)[:, 0]


def assert_top_k(kept: set[int], candidates: list[int], score: dict[int, float], where: str) -> None:
    """Every kept candidate scores at least as high as every dropped one (tie-robust top-k)."""
    chosen = [score[p] for p in candidates if p in kept]
    dropped = [score[p] for p in candidates if p not in kept]
    if chosen and dropped:
        assert min(chosen) >= max(dropped) - SLACK, (
            f"{where}: kept {sorted(p for p in candidates if p in kept)} but a dropped token scores "
            f"{max(dropped):.6f} > {min(chosen):.6f}")


@pytest.mark.parametrize("normalise", [False, True])
@settings(max_examples=30, deadline=None)
@given(synth_cases(), budget_strategy(), st.sampled_from([0.0, 0.3, 0.5, 1.0]))
@example(case=([5], 0, random_qkv(1, 1, 1, 1, 5, seed=0), 4), budget=2, recent_ratio=0.0)
def test_h2o_keeps_recent_and_heavy_hitters(normalise, case, budget, recent_ratio):
    """4.2 at prefill: the last r = int(budget * recent_ratio) positions are kept, and the rest of the budget
    is the top of the accumulated attention A (column sums over all prompt queries, GQA mean; with
    `normalise`, divided by the number of queries that can see the token, at most W of them under a sliding
    window W), recomputed here with attention_probs over the whole prompt; the stored scores are A. At decode,
    A += each step's attention (computed here over the kept tokens), the recent window stays, and the evicted
    token has the smallest A among the older ones."""
    lens, steps, qkv, window = case
    trace = drive_synthetic(H2O(budget=budget, recent_ratio=recent_ratio, normalise=normalise), qkv, lens, steps,
                            window)
    budgets = [ratio_or_tokens(budget, n) for n in lens]
    check_slot_invariants(trace.snapshots, [budgets], constant=True, qkv=qkv)
    first = trace.snapshots[0]
    for b, (n, bud) in enumerate(zip(lens, budgets)):
        recent = int(bud * recent_ratio)
        col = prompt_column_sums(qkv, b, n, window)  # [Hkv, n]
        if normalise:
            i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
            sees = (i >= j) & ((i - j < window) if window is not None else True)
            col = col / sees.sum(0)
        for h in range(col.shape[0]):
            where = f"seq {b} head {h} prefill"
            a = {p: col[h, p].item() for p in range(n)}
            kept = kept_set(first, 0, b, h)
            assert set(range(max(0, n - recent), n)) <= kept, f"{where}: recent window dropped"
            assert_top_k(kept, list(range(n - recent)), a, where)
            for p, s in zip(first.layers[0]["pos"][b, h].tolist(), first.layers[0]["score"][b, h].tolist()):
                if p >= 0:
                    assert abs(s - a[p]) <= TOL, f"{where}: stored score of {p} is {s}, expected {a[p]}"
            for s in range(steps):
                old, new = trace.snapshots[s].kept(0, b, h), kept_set(trace.snapshots[s + 1], 0, b, h)
                p_new, where = n + s, f"seq {b} head {h} decode step {s}"
                probs = step_probs(qkv, b, h, old, p_new, window).mean(0)
                for p, pr in zip(old + [p_new], probs.tolist()):
                    a[p] = a.get(p, 0.0) + pr
                if len(old) < bud:
                    assert new == set(old) | {p_new}, f"{where}: a token was evicted from a cache with room"
                    continue
                evicted = (set(old) | {p_new}) - new
                assert len(evicted) == 1 and p_new in new, f"{where}: evicted {evicted}"
                (e,) = evicted
                older = [p for p in old if p <= p_new - recent]
                assert e in older, f"{where}: evicted {e} from the recent window (r = {recent})"
                assert a[e] <= min(a[p] for p in older) + SLACK, f"{where}: evicted {e} is not the lightest"
            last = trace.snapshots[-1].layers[0]
            for p, sc in zip(last["pos"][b, h].tolist(), last["score"][b, h].tolist()):
                if p >= 0:
                    assert abs(sc - a[p]) <= TOL, f"seq {b} head {h}: accumulated score of {p} is {sc}, not {a[p]}"


@settings(max_examples=40, deadline=None)
@given(synth_cases(), budget_strategy())
def test_tova_keeps_the_last_querys_favourites(case, budget):
    """4.5: after prefill the newest token plus the top of the last query's attention averaged over all
    query heads of the layer (computed here); at every decode step, once full, the one token dropped from
    [cache ; new token] is the least attended by the current query (head-averaged); the same positions in
    every KV head; size == min(seen, budget)."""
    lens, steps, qkv, window = case
    trace = drive_synthetic(TOVA(budget=budget), qkv, lens, steps, window)
    budgets = [ratio_or_tokens(budget, n) for n in lens]
    check_slot_invariants(trace.snapshots, [budgets], constant=True, qkv=qkv)
    check_heads_agree(trace.snapshots)
    kv_heads, g = qkv.k[0].shape[1], qkv.groups
    for b, (n, bud) in enumerate(zip(lens, budgets)):
        probs = torch.cat([reference_probs(qkv.q[0][b, h * g:(h + 1) * g, n - 1][:, None], qkv.k[0][b, h, :n],
                                           [n - 1], list(range(n)), window)[:, 0] for h in range(kv_heads)])
        score = dict(enumerate(probs.mean(0).tolist()))
        kept = kept_set(trace.snapshots[0], 0, b, 0)
        assert n - 1 in kept, f"seq {b}: the newest prompt token was dropped"
        assert_top_k(kept, list(range(n - 1)), score, f"seq {b} prefill")
        for s in range(steps):
            old, new = trace.snapshots[s].kept(0, b, 0), kept_set(trace.snapshots[s + 1], 0, b, 0)
            p_new, where = n + s, f"seq {b} decode step {s}"
            if len(old) < bud:
                assert new == set(old) | {p_new}, f"{where}: a token was dropped from a cache with room"
                continue
            probs = torch.cat([step_probs(qkv, b, h, old, p_new, window) for h in range(kv_heads)]).mean(0)
            score = dict(zip(old + [p_new], probs.tolist()))
            dropped = (set(old) | {p_new}) - new
            assert len(dropped) == 1 and new <= set(old) | {p_new}, f"{where}: dropped {dropped}"
            assert score[dropped.pop()] <= min(score.values()) + SLACK, f"{where}: dropped one not the least attended"


def snap_reference_scores(qkv, b: int, n: int, window_size: int, kernel: int, pooling: str,
                          window: int | None) -> torch.Tensor:
    """4.3 for sequence b's own n tokens: the last w queries' attention summed, over the first n - w keys only,
    pooled over those keys, GQA mean -> [Hkv, n - w]."""
    w = min(window_size, n)
    kv_heads, g = qkv.k[0].shape[1], qkv.groups
    sums = torch.cat([
        reference_probs(qkv.q[0][b, h * g:(h + 1) * g, n - w:n], qkv.k[0][b, h, :n], list(range(n - w, n)),
                        list(range(n)), window).sum(1)[:, : n - w]
        for h in range(kv_heads)])  # [Hq, n - w]
    return group_mean(pool_1d(sums, kernel, pooling), g)


@st.composite
def window_methods(draw, lens: list[int], name: str | None = None):
    name = name or draw(st.sampled_from(PREFILL_ONLY))
    budget = draw(budget_strategy())
    smallest = min(ratio_or_tokens(budget, n) for n in lens)
    extra = {"beta": draw(st.sampled_from([1.0, 2.0, 20.0]))} if name == "PyramidKV" else {}
    return METHODS[name](budget=budget, window_size=draw(st.integers(1, max(1, min(8, smallest)))),
                         kernel_size=draw(st.sampled_from([1, 3, 5, 7])), pooling=draw(st.sampled_from(["avg", "max"])),
                         **extra)


@settings(max_examples=40, deadline=None)
@given(synth_cases(), st.data())
def test_snapkv_window_budget_and_append(case, data):
    """4.3: the observation window (the last min(w, T) positions) is always kept; exactly min(budget, T)
    slots after prefill, so T <= budget keeps the prompt unchanged; decode appends every generated token and
    never touches the prompt's slots."""
    lens, steps, qkv, window = case
    method = data.draw(window_methods(lens, "SnapKV"))
    trace = drive_synthetic(method, qkv, lens, steps, window)
    prefill = [min(ratio_or_tokens(method.budget, n), n) for n in lens]
    check_slot_invariants(trace.snapshots, [[p + steps for p in prefill]], qkv=qkv)
    first = trace.snapshots[0]
    for b, (n, bud) in enumerate(zip(lens, prefill)):
        for h in range(qkv.k[0].shape[1]):
            kept = kept_set(first, 0, b, h)
            assert len(kept) == bud, f"seq {b} head {h}: {len(kept)} slots, budget {bud}"
            assert set(range(n - min(method.window_size, n), n)) <= kept, f"seq {b} head {h}: window dropped"
            if bud >= n:
                assert kept == set(range(n))
            for s in range(1, steps + 1):
                assert kept_set(trace.snapshots[s], 0, b, h) == kept | set(range(n, n + s)), f"decode step {s}"
        prompt_slots = first.layers[0]["pos"][b] >= 0
        last = trace.snapshots[-1].layers[0]
        for name in ("k", "v", "pos", "logw"):
            assert torch.equal(last[name][b][prompt_slots], first.layers[0][name][b][prompt_slots]), name


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 30), st.integers(1, 2), st.integers(1, 3), st.integers(0, 2**16), st.integers(1, 8),
       st.integers(1, 8), st.sampled_from([3, 5, 7]), st.sampled_from(["avg", "max"]))
@example(n=4, kv_heads=1, groups=1, seed=0, budget=3, window_size=1, kernel=3, pooling="avg")
def test_snapkv_selects_the_top_of_pooled_window_attention(n, kv_heads, groups, seed, budget, window_size, kernel,
                                                           pooling):
    """4.3 selection, one unpadded sequence of n tokens: outside the window, the kept tokens are the top of
    score_t = sum over the window's queries of their attention to t, taken over the first T - w keys,
    1-D pooled over those keys only (same padding; at the edges avg-pooling averages the keys that exist,
    the library's choice), GQA mean — computed here from the definition. The explicit example: T = 4,
    w = 1, keep 2 of tokens 0-2, kernel 3."""
    assume(window_size <= budget < n)
    qkv = random_qkv(1, 1, kv_heads, groups, n, seed=seed)
    method = SnapKV(budget=budget, window_size=window_size, kernel_size=kernel, pooling=pooling)
    trace = drive_synthetic(method, qkv, [n], 0)
    w = min(window_size, n)
    ref = snap_reference_scores(qkv, 0, n, window_size, kernel, pooling, None)
    for h in range(ref.shape[0]):
        assert_top_k(kept_set(trace.snapshots[0], 0, 0, h), list(range(n - w)), dict(enumerate(ref[h].tolist())),
                     f"head {h} (T={n}, w={w}, budget {budget}, kernel {kernel} {pooling})")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(4, 30), min_size=1, max_size=3), st.integers(2, 6), st.integers(0, 2**16), st.data())
def test_pyramidkv_layer_budgets(lens, layers, seed, data):
    """4.4 through PyramidKV's own prefill: per sequence, the slots kept per layer are non-increasing from
    layer 0, their mean is the average budget min(budget, T) within rounding, each layer keeps its
    observation window and stays within [window, T]; T <= budget keeps every layer unchanged."""
    method = data.draw(window_methods(lens, "PyramidKV"))
    qkv = random_qkv(len(lens), layers, 2, 2, max(lens), seed=seed)
    trace = drive_synthetic(method, qkv, lens, 0)
    snap = trace.snapshots[0]
    for b, n in enumerate(lens):
        avg = min(ratio_or_tokens(method.budget, n), n)
        w = min(method.window_size, n)
        for h in range(2):
            sizes = [len(snap.kept(layer, b, h)) for layer in range(layers)]
            assert sizes == sorted(sizes, reverse=True), f"seq {b}: layer budgets {sizes} increase"
            assert abs(sum(sizes) / layers - avg) <= 0.5, f"seq {b}: layer budgets {sizes}, average {avg}"
            assert all(w <= s <= n for s in sizes), f"seq {b}: layer budgets {sizes} outside [{w}, {n}]"
            if avg < n:  # the 4.4 arithmetic split (pyramid_budgets is checked against the formula below)
                assert sizes == [min(x, n) for x in pyramid_budgets(avg, w, n, layers, method.beta)], sizes
            for layer in range(layers):
                assert set(range(n - w, n)) <= kept_set(snap, layer, b, h), f"seq {b} layer {layer}: window dropped"
                if avg >= n:
                    assert kept_set(snap, layer, b, h) == set(range(n))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(0, 300), st.integers(1, 40), st.floats(1.0, 1000.0), st.data())
def test_pyramid_budgets_direct(window, prompt_len, layers, beta, data):
    """4.4, `pyramid_budgets` itself, for window <= avg_capacity <= prompt_len: non-increasing from layer 0,
    within [window, prompt_len], mean == avg_capacity within rounding (<= 0.5); avg_capacity == window (no
    selectable part: the pyramid is infeasible) falls back to the uniform window, as does a single layer."""
    assume(prompt_len >= window)
    avg = data.draw(st.integers(window, prompt_len))
    budgets = pyramid_budgets(avg, window, prompt_len, layers, beta)
    assert len(budgets) == layers
    assert budgets == sorted(budgets, reverse=True), budgets
    assert all(window <= x <= prompt_len for x in budgets), budgets
    assert abs(sum(budgets) / layers - avg) <= 0.5, budgets
    if avg == window or layers == 1:
        assert budgets == [avg] * layers


def test_pyramid_budgets_examples():
    """Worked from the 4.4 formula: c = 40 - 8 = 32, min = 32/20 = 1.6, max = 64 - 1.6 = 62.4 (< 92), so
    layers step linearly from 62.4 to 1.6, + the window; capped at T - w = 40 when T = 48: min = 64 - 40 = 24.
    beta -> infinity goes linearly to ~0 above the window at the top layer."""
    assert pyramid_budgets(40, 8, 100, 5, 20.0) == [8 + 62, 8 + 47, 8 + 32, 8 + 17, 8 + 2]
    assert pyramid_budgets(40, 8, 48, 3, 20.0) == [48, 8 + 32, 8 + 24]
    assert pyramid_budgets(40, 8, 1000, 3, 1e9)[-1] == 8


def test_pyramid_budgets_when_the_average_covers_the_prompt():
    """When the average capacity is the whole prompt or more there is nothing to allocate: no layer may get
    more than the prompt (the pyramid must not invert into an increasing staircase past T)."""
    for avg in (20, 21, 30):
        budgets = pyramid_budgets(avg, 4, 20, 4, 20.0)
        assert budgets == sorted(budgets, reverse=True), f"avg {avg}: {budgets} increase with depth"
        assert max(budgets) <= 20, f"avg {avg}: {budgets} exceed the 20-token prompt"


def test_pyramidkv_falls_back_when_infeasible():
    """PyramidKV's allocation: a budget equal to the window leaves nothing to distribute (every layer keeps the
    window: SnapKV); a budget >= the prompt compresses nothing; otherwise the mean is the budget."""
    cfg = FakeConfig(num_layers=6, num_kv_heads=1, head_dim=4)
    assert PyramidKV(budget=8, window_size=8).prefill_budgets(cfg, [50]) == [[8]] * 6
    assert PyramidKV(budget=60, window_size=8).prefill_budgets(cfg, [50]) == [[50]] * 6
    budgets = [row[0] for row in PyramidKV(budget=20, window_size=8).prefill_budgets(cfg, [50])]
    assert budgets == sorted(budgets, reverse=True) and abs(sum(budgets) / 6 - 20) <= 0.5 and budgets[0] > budgets[-1]


# --- batch == each sequence alone ------------------------------------------------------------------------

def assert_batch_equals_alone(batch, alone: list, layers: int, label: str = "in the batch") -> None:
    """Sequence b of `batch` keeps the same positions as `alone[b]` (a batch of one) at every snapshot."""
    for b, single in enumerate(alone):
        for si, (snap_b, snap_1) in enumerate(zip(batch.snapshots, single.snapshots)):
            for layer in range(layers):
                for h in range(snap_b.layers[layer]["pos"].shape[1]):
                    got, want = kept_set(snap_b, layer, b, h), kept_set(snap_1, layer, 0, h)
                    assert got == want, (f"sequence {b}, snapshot {si}, layer {layer}, head {h}: {label} "
                                         f"{sorted(got - want)} replace {sorted(want - got)}")


# Batch == alone through the real models, and the memory tests: tests/test_method_cases.py.


@settings(max_examples=25, deadline=None)
@given(synth_cases(max_steps=8, windows=(None,)), st.sampled_from(list(METHODS)), budget_strategy())
def test_batch_equals_alone_without_ties(case, method_name, budget):
    """Section 5 on random q/k/v (scores are continuous, so no selection hinges on a tie; no pooling): a
    left-padded batch keeps the same positions as each sequence alone at every step."""
    lens, steps, qkv, _ = case
    smallest = min(ratio_or_tokens(budget, n) for n in lens)
    if method_name == "StreamingLLM":
        kwargs = {"sinks": min(4, smallest - 1)}
    elif method_name in PREFILL_ONLY:
        kwargs = {"window_size": max(1, min(4, smallest)), "kernel_size": 1}
    else:
        kwargs = {}
    make = lambda: METHODS[method_name](budget=budget, **kwargs)  # noqa: E731
    batch = drive_synthetic(make(), qkv, lens, steps)
    alone = [drive_synthetic(make(), qkv.select(b), [n], steps) for b, n in enumerate(lens)]
    assert_batch_equals_alone(batch, alone, 1)


@pytest.mark.parametrize("method_name", list(METHODS))
# PyramidKV's pyramid rarely leaves every layer room for all chunks but the last: most draws are filtered.
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.integers(6, 30), st.integers(2, 29), st.integers(0, 2**16), st.integers(1, 4), st.sampled_from([1, 3, 5, 7]),
       st.integers(0, 10), st.integers(0, 4))
@example(n=6, chunk=2, seed=0, window_size=1, kernel=3, extra=1, steps=0)
def test_chunked_prefill_equals_one_shot_while_nothing_is_dropped(method_name, n, chunk, seed, window_size, kernel,
                                                                   extra, steps):
    """Chunked prefill (ARCHITECTURE.md) compresses after each chunk. While every chunk before the last fits
    in each layer's budget nothing has been dropped yet, and the last chunk holds the whole observation window,
    so the result must equal one-shot prefill: pooling (SnapKV/PyramidKV) must pool positional neighbours,
    whatever order the slots hold them in. The explicit example: 6 tokens in chunks of 2, budget 5, window 1,
    kernel 3."""
    last_start = chunk * ((n - 1) // chunk)
    budget = max(last_start, window_size) + extra
    assume(chunk < n and budget < n and n - last_start >= window_size)
    if method_name in PREFILL_ONLY:
        kwargs = {"window_size": window_size, "kernel_size": kernel, "pooling": "avg"}  # avg: no exact ties
    else:
        kwargs = {"sinks": min(4, budget - 1)} if method_name == "StreamingLLM" else {}
    make = lambda: METHODS[method_name](budget=budget, **kwargs)  # noqa: E731
    assume(min(row[0] for row in make().prefill_budgets(FakeConfig(2, 2, 8), [n])) >= last_start)
    qkv = random_qkv(1, 2, 2, 2, n + steps, seed=seed)
    one_shot = drive_synthetic(make(), qkv, [n], steps)
    chunked = drive_synthetic(make(), qkv, [n], steps, prefill_chunk=chunk)
    assert_batch_equals_alone(chunked, [one_shot], 2, label="chunked,")


def test_avg_pooling_ignores_left_padding():
    """SnapKV's avg pooling over a left-padded batch: the first tokens' pooled scores must average their own
    sequence's neighbours only, not the padding before them (no ties here: continuous random scores)."""
    lens = [12, 30]
    qkv = random_qkv(2, 1, 1, 1, 30, seed=3, scale=3.0)
    make = lambda: SnapKV(budget=4, window_size=2, kernel_size=5, pooling="avg")  # noqa: E731
    batch = drive_synthetic(make(), qkv, lens, 0)
    alone = [drive_synthetic(make(), qkv.select(b), [n], 0) for b, n in enumerate(lens)]
    assert_batch_equals_alone(batch, alone, 1)


def test_selection_ties_do_not_depend_on_padding():
    """With Mistral's sliding window the last query cannot see most of the prompt, so TOVA's score of those
    tokens is exactly 0 and the budget is filled among ties: which of them are kept must not depend on how
    much left padding the batch puts before the sequence."""
    lens = [16, 30]
    qkv = random_qkv(2, 1, 1, 1, 30, seed=4)
    batch = drive_synthetic(TOVA(budget=8), qkv, lens, 0, window=4)
    alone = [drive_synthetic(TOVA(budget=8), qkv.select(b), [n], 0, window=4) for b, n in enumerate(lens)]
    assert_batch_equals_alone(batch, alone, 1)


# --- 3. budget validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method_name", list(METHODS))
@pytest.mark.parametrize("bad, message", [
    (0, "must be >= 1 token per KV head"),
    (-3, "must be >= 1 token per KV head"),
    (1.0, "is not a ratio in (0, 1)"),
    (1.5, "is not a ratio in (0, 1)"),
    (0.0, "is not a ratio in (0, 1)"),
    ("half", "must be a float in (0, 1) or an int >= 1"),
    (None, "must be a float in (0, 1) or an int >= 1"),
    (True, "must be a float in (0, 1) or an int >= 1"),
])
def test_invalid_budget_is_rejected(method_name, bad, message):
    with pytest.raises(KvzooError) as err:
        METHODS[method_name](budget=bad)
    text = str(err.value)
    assert message in text and text.startswith(method_name) and repr(bad) in text, text


def test_budget_below_the_fixed_parts(models):
    """StreamingLLM needs room beyond its sinks; SnapKV/PyramidKV need room for the observation window. A
    budget that resolves below that is raised to it (the budget rule), and prefill-only methods keep at most
    the prompt."""
    cfg = FakeConfig(num_layers=2, num_kv_heads=1, head_dim=4)
    cache = StreamingLLM(budget=0.1).make_cache(cfg, [20], 4, torch.float32, "cpu")
    assert cache.budgets().tolist() == [[5], [5]]  # 2 slots raised to sinks + 1
    assert StreamingLLM(budget=2).make_cache(cfg, [3], 4, torch.float32, "cpu").budgets().tolist() == [[5], [5]]
    for cls in (SnapKV, PyramidKV):
        cache = cls(budget=6, window_size=8).make_cache(cfg, [40, 3], 0, torch.float32, "cpu")
        assert cache.budgets().tolist() == [[8, 3]] * 2
    cache = SnapKV(budget=0.2, window_size=8).make_cache(cfg, [40, 30, 5], 0, torch.float32, "cpu")
    assert cache.budgets().tolist() == [[8, 8, 5]] * 2  # 8 = 0.2 * 40; 6 raised to the window; 5: the prompt


# --- 4. memory --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_name", ["llama-gqa", "mistral-window"])
@pytest.mark.parametrize("method_name", PREFILL_ONLY)
def test_decode_cap_bounds_prefill_only_methods(models, method_name, model_name):
    """SnapKV/PyramidKV with decode_cap=N: each layer's capacity is its largest prefill budget + N (and each
    sequence's budget its own + N); past the cap the compressed prompt slots are untouched (bitwise) and
    the generated tokens are a sliding window of the last N; memory is constant over decode steps."""
    model = models(model_name)
    cap, steps = 3, 9
    prompts = [random_prompt(n, 70 + i) for i, n in enumerate((24, 15))]
    method = METHODS[method_name](budget=0.5, window_size=4, decode_cap=cap)
    trace = drive_model(model, prompts, method, steps)
    lens = [24, 15]
    prefill = expected_prefill_budgets(method_name, method, lens, model.config.num_layers)
    for layer, slots in enumerate(trace.cache.layers):
        assert slots.capacity == max(prefill[layer]) + cap
        assert slots.budget.tolist() == [p + cap for p in prefill[layer]]
    first = trace.snapshots[0]
    assert all(s.nbytes == first.nbytes for s in trace.snapshots)
    check_slot_invariants(trace.snapshots, [[p + cap for p in row] for row in prefill])
    for s, snap in enumerate(trace.snapshots):
        for layer in range(model.config.num_layers):
            for b, n in enumerate(lens):
                prompt_slots = first.layers[layer]["pos"][b] >= 0  # [Hkv, C]
                for name in ("k", "v", "pos", "logw"):
                    assert torch.equal(snap.layers[layer][name][b][prompt_slots],
                                       first.layers[layer][name][b][prompt_slots]), f"step {s}: prompt slots changed"
                for h in range(model.config.num_kv_heads):
                    generated = {p for p in snap.kept(layer, b, h) if p >= n}
                    assert generated == set(range(n + max(0, s - cap), n + s)), f"step {s}, layer {layer}, seq {b}"
