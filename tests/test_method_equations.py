"""Each method's decisions against small references computed here from the equations of kvzoo/cache/METHODS.md (the H2O
tests of test_methods_baselines.py are the model): random post-RoPE q/k/v are fed through the library's
own attention step (tests/method_helpers.drive_synthetic), and the slots it keeps are compared with what the
definition says they must be. Plus the compensation bias `alpha * log w` observed through a real model's
outputs. These are the tests that kill the mutants of tools/mutants.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvzoo
from kvzoo.cache import TOVA, KVMerger, SnapKV, ZigZagKV, ZSMerge
from kvzoo.cache.budgets import zigzag_budgets
from kvzoo.cache.full import FullCache
from kvzoo.cache.slots import KVCache, LayerSlots
from tests.method_helpers import (QKV, drive_synthetic, pool_1d, random_qkv, reference_min_budget_output,
                                  reference_probs)

TOL = 1e-5  # fp32 keys/values from the same inputs, different summation order
SLACK = 1e-6  # score comparisons at a top-k boundary


def group_mean(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[Hq, ...] -> [Hkv, ...] mean over each KV head's query heads (METHODS.md 0.2)."""
    return x.reshape(x.shape[0] // groups, groups, *x.shape[1:]).mean(1)


def window_attention(qkv: QKV, layer: int, n: int, window: int, decay: float = 1.0,
                     sliding: int | None = None) -> torch.Tensor:
    """Sum over the last `window` queries i of decay^(n-1-i) * softmax attention of i over keys 0..n-1
    (within the model's sliding window, if any), per query head [Hq, n] (sequence 0, no padding)."""
    w = min(window, n)
    g = qkv.groups
    rows = []
    for h in range(qkv.k[layer].shape[1]):
        q = qkv.q[layer][0, h * g:(h + 1) * g, n - w:n]  # [G, w, D]
        probs = reference_probs(q, qkv.k[layer][0, h, :n], list(range(n - w, n)), list(range(n)), sliding)
        weights = torch.tensor([decay ** (w - 1 - i) for i in range(w)], dtype=torch.float64)
        rows.append(torch.einsum("gqk,q->gk", probs, weights))
    return torch.cat(rows)


def pooled_window_scores(qkv: QKV, layer: int, n: int, window: int, kernel: int, pooling: str,
                         decay: float = 1.0, sliding: int | None = None, ahead: int | None = None) -> torch.Tensor:
    """SnapKV-style scores [Hkv, n]: window attention, pooled over the first n - w keys only (METHODS.md
    4.3; `ahead` of the kernel's positions after each token, None centred), GQA mean. The window's own tokens
    keep their unpooled score."""
    w = min(window, n)
    sums = window_attention(qkv, layer, n, window, decay, sliding)
    pooled = torch.cat([pool_1d(sums[:, : n - w], kernel, pooling, ahead), sums[:, n - w:]], dim=1)
    return group_mean(pooled, qkv.groups)


def assert_top_k(kept: set[int], candidates: list[int], score: dict[int, float], where: str) -> None:
    chosen = [score[p] for p in candidates if p in kept]
    dropped = [score[p] for p in candidates if p not in kept]
    if chosen and dropped:
        assert min(chosen) >= max(dropped) - SLACK, (
            f"{where}: kept {sorted(p for p in candidates if p in kept)}, but a dropped token scores "
            f"{max(dropped):.6f} > {min(chosen):.6f}")


def filled_slots(snap, layer: int, h: int) -> list[tuple[int, torch.Tensor, torch.Tensor, float]]:
    """(position, key, value, count) of the filled slots of sequence 0, KV head h."""
    s = snap.layers[layer]
    out = []
    for i in torch.isfinite(s["logw"][0, h]).nonzero().flatten().tolist():
        out.append((int(s["pos"][0, h, i]), s["k"][0, h, i], s["v"][0, h, i], float(s["logw"][0, h, i].exp())))
    return out


# --- the compensation bias, through a real model ----------------------------------------------------------

@dataclass
class CompensatedFullCache(FullCache):
    """FullCache whose slots are attended with bias alpha * log w (FullCache itself never merges)."""

    alpha: float = 1.0
    # The tests below lay slots out by hand (copies of a slot where slot = position would put the new token),
    # so the new token's slot is not free: attend first, then write, as a method that evicts does.
    decode_writes_first = False

    @property
    def attention_alpha(self) -> float:
        return self.alpha


def _with_slot(cache: KVCache, method, edit) -> KVCache:  # noqa: ANN001
    """A copy of every layer's slots, changed by `edit(k, v, logw, pos) -> (k, v, logw, pos)`."""
    layers = []
    for s in cache.layers:
        k, v, logw, pos = edit(s.k.clone(), s.v.clone(), s.logw.clone(), s.pos.clone())
        budget = torch.full_like(s.budget, k.shape[2])
        layers.append(LayerSlots(k, v, logw, torch.zeros_like(logw), pos, budget, dict(s.state)))
    return KVCache(layers, method, cache.tokens_seen)


@pytest.mark.parametrize("model_name", ["llama-gqa", "falcon-40b-style"])
def test_merged_slot_of_count_w_attends_like_w_copies(tiny_checkpoint, model_name):
    """Eq. 8 through the model: a slot standing for w = 4 tokens with log w = log 4 gives, at alpha = 1, the
    same next-token logits as 4 identical copies of that slot (w e^{q.k} v = sum of the copies' terms);
    alpha = 0 and a doubled bias both give different logits."""
    model = kvzoo.load(tiny_checkpoint(model_name)[1])
    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    full = FullCache().make_cache(model.config, [12], 1, torch.float32, "cpu")
    with torch.inference_mode():
        model(prompt, cache=full)
    j, w = 5, 4

    def copies(k, v, logw, pos):  # noqa: ANN001, ANN202 - slot j three more times, then room for the new token
        extra = lambda x: x[:, :, j:j + 1].expand(*x.shape[:2], w - 1, *x.shape[3:])  # noqa: E731
        room = lambda x, fill: torch.full_like(x[:, :, :1], fill)  # noqa: E731
        return (torch.cat([k[:, :, :12], extra(k), room(k, 0.0)], 2), torch.cat([v[:, :, :12], extra(v), room(v, 0.0)], 2),
                torch.cat([logw[:, :, :12], extra(logw), room(logw, float("-inf"))], 2),
                torch.cat([pos[:, :, :12], extra(pos), room(pos, -1)], 2))

    def merged(k, v, logw, pos):  # noqa: ANN001, ANN202
        logw[:, :, j] = math.log(w)
        return k, v, logw, pos

    def step(cache: KVCache) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor([[7]]), torch.tensor([[12]]), cache=cache, decode=True)[0, -1]

    reference = step(_with_slot(full, CompensatedFullCache(alpha=1.0), copies))
    compensated = step(_with_slot(full, CompensatedFullCache(alpha=1.0), merged))
    torch.testing.assert_close(compensated, reference, atol=TOL, rtol=TOL)
    for alpha in (0.0, 0.5):
        other = step(_with_slot(full, CompensatedFullCache(alpha=alpha), merged))
        assert (other - reference).abs().max() > 1e-3, f"alpha={alpha} should not equal {w} copies"


# --- selection ties ------------------------------------------------------------------------------------------

def test_tied_scores_keep_the_newest_tokens():
    """rank_order's documented tie rule, seen through TOVA: under a sliding window of 4 the last query of a
    30-token prompt sees positions 26-29 only, so every older token scores exactly 0; a budget of 8 keeps the
    4 visible ones and, among the ties, the newest: 22-25."""
    qkv = random_qkv(1, 1, 1, 1, 30, seed=4)
    trace = drive_synthetic(TOVA(budget=8), qkv, [30], 0, window=4)
    assert set(trace.snapshots[0].kept(0, 0, 0)) == set(range(22, 30))


# --- ZSMerge -------------------------------------------------------------------------------------------------

@st.composite
def zsmerge_prefill_cases(draw):
    budget = draw(st.integers(6, 16))
    proximity = draw(st.integers(2, 4))
    residual = draw(st.integers(1, 3))
    if budget <= proximity + residual:
        budget = proximity + residual + 1
    n = draw(st.integers(budget + 1, 40))
    kv_heads, groups = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    return (ZSMerge(budget=budget, proximity=proximity, residual=residual, rank="window",
                    decay=draw(st.sampled_from([0.5, 0.9])),
                    window_size=draw(st.integers(2, 6)), kernel_size=draw(st.sampled_from([1, 3, 5])),
                    pool_ahead=draw(st.sampled_from([None, 0])),
                    prefill_scale=draw(st.sampled_from(["window", "steady"]))),
            n, random_qkv(1, 1, kv_heads, groups, n, seed=draw(st.integers(0, 2**16))),
            draw(st.sampled_from([None, 5])))


@settings(max_examples=40, deadline=None)
@given(zsmerge_prefill_cases())
def test_zsmerge_prefill_regions_against_the_definition(case):
    """METHODS.md 1.2 prefill (window variant), one prompt of n > B tokens, per KV head:
    score s_t = sum over the last W queries i of decay^(n-1-i) A_i(t), max-pooled over the tokens before the
    window, GQA mean; proximity P = the last B_p tokens; context C = the top (B - B_p - B_r) of the older
    tokens by s; the leftovers, in position order, are cut into B_r contiguous groups (the first r of size
    m + 1, with m, r = divmod(leftovers, B_r)), and residual slot i holds group i: count = its size, key and
    value = the plain means of its members. A context slot stores s, or s / (1 - decay^W) with
    prefill_scale="steady" (the decode steady state of s <- decay s + a for a constant attention a = the
    window's weighted mean). Also under Mistral's sliding window (5 < n): attention, and so the scores, only
    reach the last 5 positions of each query (many older tokens tie at 0)."""
    method, n, qkv, sliding = case
    trace = drive_synthetic(method, qkv, [n], 0, window=sliding)
    snap = trace.snapshots[0]
    b, bp, br = method.budget, method.proximity, method.residual
    scores = pooled_window_scores(qkv, 0, n, method.window_size, method.kernel_size, "max", method.decay, sliding,
                                  method.pool_ahead)
    for h in range(scores.shape[0]):
        where = f"head {h} (n={n}, B={b}, B_p={bp}, B_r={br})"
        pos = snap.layers[0]["pos"][0, h].tolist()  # slots: [residual | context | proximity ring]
        context, in_ring = set(pos[br:b - bp]), set(pos[b - bp:b])
        assert in_ring == set(range(n - bp, n)), f"{where}: proximity holds {sorted(in_ring)}"
        older = list(range(n - bp))
        assert len(context) == b - bp - br, f"{where}: {len(context)} context slots"
        assert_top_k(context, older, dict(enumerate(scores[h].tolist())), f"{where}: context")
        scale = 1 / (1 - method.decay ** method.window_size) if method.prefill_scale == "steady" else 1.0
        stored = snap.layers[0]["score"][0, h, br:b - bp]
        torch.testing.assert_close(stored, scores[h][pos[br:b - bp]].float() * scale, atol=TOL, rtol=TOL)
        leftovers = [p for p in older if p not in context]
        m, r = divmod(len(leftovers), br)
        sizes = [m + 1] * r + [m] * (br - r)
        starts = [sum(sizes[:i]) for i in range(br)]
        s = snap.layers[0]
        for i, (start, size) in enumerate(zip(starts, sizes)):
            members = leftovers[start:start + size]
            count = float(s["logw"][0, h, i].exp())
            assert count == pytest.approx(size), f"{where}: residual slot {i} counts {count}, expected {size}"
            torch.testing.assert_close(s["k"][0, h, i], qkv.k[0][0, h, members].mean(0), atol=TOL, rtol=TOL)
            torch.testing.assert_close(s["v"][0, h, i], qkv.v[0][0, h, members].mean(0), atol=TOL, rtol=TOL)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 2), st.integers(1, 2), st.sampled_from([None, 4]))
def test_zsmerge_decode_merges_into_the_most_similar_residual_slot(seed, kv_heads, groups, sliding):
    """METHODS.md 1.2 decode, Eq. 6-7, with two residual slots that already stand for several tokens: at every
    decode step the token leaving the exact slots (context or proximity) goes into the residual slot r with the
    largest k_r . k_e, which becomes (w_r k_r + k_e) / (w_r + 1) with count w_r + 1 (also under a sliding
    window of 4, which hides most slots from the query but not from merging)."""
    n, steps = 30, 12
    qkv = random_qkv(1, 1, kv_heads, groups, n + steps, seed=seed)
    method = ZSMerge(budget=10, proximity=3, residual=2)
    trace = drive_synthetic(method, qkv, [n], steps, window=sliding)
    merges = 0
    for s in range(steps):
        before, after = trace.snapshots[s], trace.snapshots[s + 1]
        for h in range(kv_heads):
            res_before = [filled_slots(before, 0, h)[i] for i in range(2)]
            exact_before = {p for p, _, _, c in filled_slots(before, 0, h)[2:]} | {n + s}
            exact_after = {p for p, _, _, c in filled_slots(after, 0, h)[2:]}
            (gone,) = exact_before - exact_after
            k_e = qkv.k[0][0, h, gone]
            target = max(range(2), key=lambda i: float(res_before[i][1] @ k_e))
            _, k_r, _, w_r = res_before[target]
            _, k_new, _, w_new = filled_slots(after, 0, h)[target]
            assert w_new == pytest.approx(w_r + 1), f"step {s} head {h}: slot {target} count {w_new}, not {w_r + 1}"
            torch.testing.assert_close(k_new, (w_r * k_r + k_e) / (w_r + 1), atol=TOL, rtol=TOL)
            assert filled_slots(after, 0, h)[1 - target][3] == pytest.approx(res_before[1 - target][3])
            merges += 1
    assert merges == steps * kv_heads


# --- KVMerger ------------------------------------------------------------------------------------------------

def similar_run_qkv(n: int, kv_heads: int, groups: int, seed: int) -> QKV:
    """Random q/v and keys that drift slowly (a random walk around a random offset), so adjacent keys are
    often similar enough to merge."""
    qkv = random_qkv(1, 1, kv_heads, groups, n, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    d = qkv.k[0].shape[-1]
    walk = torch.randn(1, kv_heads, 1, d, generator=gen) * 2 + (torch.randn(1, kv_heads, n, d, generator=gen) * 0.4).cumsum(2)
    return QKV(qkv.q, [walk], qkv.v, seed)


@settings(max_examples=30, deadline=None)
@given(st.integers(10, 36), st.integers(0, 2**16), st.integers(1, 2), st.integers(1, 2),
       st.sampled_from([0.8, 0.9, 0.95]), st.sampled_from([0.5, 2.0]),
       st.sampled_from([("none", "members"), ("set_size", "members"), ("none", "attention")]), st.sampled_from([None, 6]))
def test_kvmerger_prefill_against_the_definition(n, seed, kv_heads, groups, epsilon, sigma, scale_and_count, sliding):
    """METHODS.md 2.2 with a fixed epsilon (budget=None), one layer compressed: A_t = column sums of the
    prompt's causal attention (GQA mean); protected = the int(0.17 n) newest tokens + the int(0.12 n) older
    ones with the largest A_t; sets = runs of adjacent unprotected tokens with cos(k_t, k_t+1) >= epsilon;
    each set becomes one slot at its pivot p = argmax A_t, with key sum_t w_t k_t, w_t = g_t / sum g,
    g_t = exp(-|k_p - k_t|^2 / (2 sigma^2)) (sigma = 0.5 and 2: finite, not huge), value the same weighted
    mean (times |S| with value_scale="set_size") and count |S| (merged_count="members") or sum_t A_t / A_p
    ("attention"). Also under Mistral's sliding window of 6."""
    value_scale, merged_count = scale_and_count
    qkv = similar_run_qkv(n, kv_heads, groups, seed)
    method = KVMerger.paper(budget=None, threshold=epsilon, sigma=sigma, skip_layers=(), value_scale=value_scale,
                            merged_count=merged_count)
    snap = drive_synthetic(method, qkv, [n], 0, window=sliding).snapshots[0]
    g = qkv.groups
    for h in range(kv_heads):
        q = qkv.q[0][0, h * g:(h + 1) * g, :n]
        keys, values = qkv.k[0][0, h, :n].double(), qkv.v[0][0, h, :n].double()
        a = reference_probs(q, qkv.k[0][0, h, :n], list(range(n)), list(range(n)), sliding).sum(1).mean(0)  # [n]
        recent = int(n * 0.17)
        older = list(range(n - recent))
        heavy = sorted(older, key=lambda t: -float(a[t]))[: int(n * 0.12)]
        protected = set(range(n - recent, n)) | set(heavy)
        k32 = qkv.k[0][0, h, :n]  # cosines in fp32 as stored, so a pair at epsilon is judged the same way
        cos = torch.nn.functional.cosine_similarity(k32[1:], k32[:-1], dim=-1)
        sets: list[list[int]] = [[0]]
        for t in range(1, n):
            joined = t - 1 not in protected and t not in protected and float(cos[t - 1]) >= epsilon
            sets[-1].append(t) if joined else sets.append([t])
        expected = {}
        for members in sets:
            pivot = max(members, key=lambda t: float(a[t]))
            gw = torch.exp(-(keys[members] - keys[pivot]).square().sum(-1) / (2 * sigma**2))
            wts = gw / gw.sum()
            scale = len(members) if value_scale == "set_size" else 1
            count = len(members) if merged_count == "members" else float(a[members].sum() / a[pivot])
            expected[pivot] = (wts @ keys[members], scale * (wts @ values[members]), count)
        got = {p: (k, v, c) for p, k, v, c in filled_slots(snap, 0, h)}
        assert sorted(got) == sorted(expected), f"head {h}: slots at {sorted(got)}, expected pivots {sorted(expected)}"
        for p, (k, v, c) in expected.items():
            assert got[p][2] == pytest.approx(c, rel=1e-5), f"head {h}, pivot {p}: count"
            torch.testing.assert_close(got[p][0].double(), k, atol=1e-4, rtol=1e-4, msg=f"head {h}, pivot {p}: key")
            torch.testing.assert_close(got[p][1].double(), v, atol=1e-4, rtol=1e-4, msg=f"head {h}, pivot {p}: value")


@pytest.mark.parametrize("ratio_of, recent", [("budget", 10), ("prompt", 19)])
def test_kvmerger_recent_share_of_budget_or_prompt(ratio_of, recent):
    """recent_ratio is a share of the budget (default) or of the prompt (paper), capped at budget - 1: 41
    tokens, budget 20, recent_ratio 0.5 keep the last 10 or 19 tokens verbatim. All keys are identical, so every
    link between older tokens ties and the earliest are cut (2.2 step 5): the older tokens become singletons
    {0}, ..., {m - 2} and one set of the rest, m = budget - recent, pivoted at its first token."""
    n, budget = 41, 20
    qkv = random_qkv(1, 1, 1, 1, n, seed=3)
    qkv.k[0][:] = qkv.k[0][:, :, :1]
    method = KVMerger(budget=budget, recent_ratio=0.5, heavy_ratio=0.0, ratio_of=ratio_of)
    snap = drive_synthetic(method, qkv, [n], 0).snapshots[0]
    m = budget - recent
    expected = [(p, 1.0) for p in range(m - 1)] + [(m - 1, n - recent - (m - 1))] + [(p, 1.0) for p in range(n - recent, n)]
    got = sorted((p, c) for p, _, _, c in filled_slots(snap, 0, 0))
    assert got == [(p, pytest.approx(c)) for p, c in expected]


# --- ZigZagKV ------------------------------------------------------------------------------------------------

def reference_mba(attn: torch.Tensor, tau: float) -> int:
    """The fewest largest entries of attn [n] holding tau of its mass (METHODS.md 3.1)."""
    mass = attn.sort(descending=True).values.cumsum(0)
    return int((mass < tau * mass[-1] - 1e-9 * mass[-1]).sum()) + 1


@settings(max_examples=20, deadline=None)
@given(st.integers(24, 48), st.integers(0, 2**16), st.sampled_from([0.3, 0.6]))
def test_zigzag_budgets_and_selection_against_the_definition(n, seed, tau):
    """ZigZagKV.paper(), METHODS.md 3.1-3.2 over 3 layers with attention of different sharpness: LMBA_l = mean
    over query heads of MBA(tau) of the observation window's summed attention; layer budgets B_l from Eq. 6 with
    B_avg = int(0.25 n), B_bound = int(0.2 B_avg), clamped to [window, n] (zigzag_budgets, tested on its own);
    each layer keeps B_l tokens per KV head: the window plus the top of the avg-pooled window scores."""
    layers, window = 3, 4
    qkvs = [random_qkv(1, 1, 2, 2, n, seed=seed + i, scale=s) for i, s in enumerate((0.4, 1.5, 3.0))]
    qkv = QKV([x.q[0] for x in qkvs], [x.k[0] for x in qkvs], [x.v[0] for x in qkvs], seed)
    method = ZigZagKV.paper(budget=0.25, window_size=window, kernel_size=3, pooling="avg", tau=tau)
    snap = drive_synthetic(method, qkv, [n], 0).snapshots[0]
    lmba = [sum(reference_mba(row, tau) for row in window_attention(qkv, layer, n, window)) / 4
            for layer in range(layers)]
    avg = int(0.25 * n)
    budgets = zigzag_budgets(lmba, avg, int(0.2 * avg), window, n)
    for layer in range(layers):
        scores = pooled_window_scores(qkv, layer, n, window, 3, "avg")
        for h in range(2):
            kept = set(snap.kept(layer, 0, h))
            where = f"layer {layer} head {h} (LMBA {lmba}, budgets {budgets})"
            assert len(kept) == budgets[layer], f"{where}: keeps {len(kept)}"
            assert set(range(n - window, n)) <= kept, f"{where}: window dropped"
            assert_top_k(kept, list(range(n - window)), dict(enumerate(scores[h].tolist())), where)


@settings(max_examples=10, deadline=None)
@given(st.integers(24, 40), st.integers(0, 2**16))
def test_zigzag_output_uncertainty_against_the_definition(n, seed):
    """The default uncertainty="output": LMBO_l = mean over query heads of the fewest keys, taken as the layer
    keeps them (the window in position order, then by pooled window score), whose attention renormalised over them keeps
    the window queries' mean relative output error within 1 - tau (computed here one budget at a time); the
    layer budgets are Eq. 6 of those, and each layer keeps its budget: the window plus the top scores."""
    layers, window, tau = 3, 4, 0.8
    qkvs = [random_qkv(1, 1, 2, 2, n, seed=seed + i, scale=s) for i, s in enumerate((0.4, 1.5, 3.0))]
    qkv = QKV([x.q[0] for x in qkvs], [x.k[0] for x in qkvs], [x.v[0] for x in qkvs], seed)
    # The default uncertainty, with the paper's rank (the window alone, which this reference computes).
    method = ZigZagKV(budget=0.25, window_size=window, kernel_size=3, pooling="avg", tau=tau, rank="window")
    snap = drive_synthetic(method, qkv, [n], 0).snapshots[0]
    lmbo, all_scores = [], []
    for layer in range(layers):
        scores = pooled_window_scores(qkv, layer, n, window, 3, "avg", ahead=method.pool_ahead)
        all_scores.append(scores)
        mbo = []
        for hq in range(4):
            h = hq // qkv.groups
            order = list(range(n - window, n)) + sorted(range(n - window), key=lambda p: -float(scores[h, p]))
            q = qkv.q[layer][0, hq:hq + 1, n - window:n]
            probs = reference_probs(q, qkv.k[layer][0, h, :n], list(range(n - window, n)), list(range(n)), None)[0]
            mbo.append(reference_min_budget_output(probs, qkv.v[layer][0, h, :n].double(), order, 1 - tau))
        lmbo.append(sum(mbo) / 4)
    avg = int(0.25 * n)
    budgets = zigzag_budgets(lmbo, avg, int(0.2 * avg), window, n)
    for layer in range(layers):
        for h in range(2):
            kept = set(snap.kept(layer, 0, h))
            where = f"layer {layer} head {h} (LMBO {lmbo}, budgets {budgets})"
            assert len(kept) == budgets[layer], f"{where}: keeps {len(kept)}"
            assert set(range(n - window, n)) <= kept, f"{where}: window dropped"
            assert_top_k(kept, list(range(n - window)), dict(enumerate(all_scores[layer][h].tolist())), where)


# --- SnapKV under a sliding window ---------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.integers(12, 40), st.integers(0, 2**16), st.integers(1, 2), st.integers(1, 3), st.integers(2, 6),
       st.sampled_from([3, 5]), st.sampled_from([4, 7]))
def test_snapkv_selection_under_a_sliding_window(n, seed, kv_heads, groups, window_size, kernel, sliding):
    """METHODS.md 4.3 with Mistral's sliding window W < n: the observation window's attention reaches only
    the last W positions of each query, so the pooled scores (avg-pooled over the first n - w keys) rank
    those first; the kept tokens are the window plus the top of these scores, computed here."""
    budget = max(window_size + 2, n // 3)
    qkv = random_qkv(1, 1, kv_heads, groups, n, seed=seed)
    method = SnapKV(budget=budget, window_size=window_size, kernel_size=kernel, pooling="avg")
    snap = drive_synthetic(method, qkv, [n], 0, window=sliding).snapshots[0]
    scores = pooled_window_scores(qkv, 0, n, window_size, kernel, "avg", sliding=sliding)
    for h in range(kv_heads):
        kept = set(snap.kept(0, 0, h))
        assert len(kept) == budget and set(range(n - window_size, n)) <= kept, f"head {h}: {sorted(kept)}"
        assert_top_k(kept, list(range(n - window_size)), dict(enumerate(scores[h].tolist())), f"head {h}")


# --- merged slots stay inside what they merge -------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: ZSMerge(budget=8, proximity=2, residual=2),
                                  # min_similarity=None: random keys would mostly be evicted, not merged
                                  lambda: KVMerger(budget=8, skip_layers=(), min_similarity=None),
                                  lambda: KVMerger(budget=8, skip_layers=(), sigma=float("inf"), min_similarity=None)],
                         ids=["ZSMerge", "KVMerger", "KVMerger-plain-mean"])
@pytest.mark.parametrize("seed", range(4))
def test_attention_over_merged_slots_stays_in_the_values_hull(make, seed):
    """ZSMerge and KVMerger (default value_scale="none") document merged values as weighted means of their
    members' values, so attention over the compressed cache with the log w bias, for any query, is a convex
    combination of the original values: coordinate-wise within their range. KVMerger.paper() (values times
    |S|) leaves it, which is the collapse the default avoids (next test)."""
    n = 40
    qkv = random_qkv(1, 1, 2, 2, n, seed=seed)
    snap = drive_synthetic(make(), qkv, [n], 0).snapshots[0].layers[0]
    assert (snap["logw"][torch.isfinite(snap["logw"])] > 0).any(), "nothing was merged"
    values = qkv.v[0][0, :, :n]  # [Hkv, n, D]
    lo, hi = values.min(1).values, values.max(1).values  # [Hkv, D]
    q = torch.randn(2, 2, values.shape[-1], generator=torch.Generator().manual_seed(seed)) * 3  # [Hkv, G, D]
    bias = torch.where(torch.isfinite(snap["logw"][0]), snap["logw"][0], float("-inf"))  # alpha = 1: log w
    logits = torch.einsum("hgd,hcd->hgc", q, snap["k"][0]) / values.shape[-1] ** 0.5 + bias[:, None]
    out = torch.einsum("hgc,hcd->hgd", logits.softmax(-1), snap["v"][0])  # [Hkv, G, D]
    assert (out >= lo[:, None] - 1e-5).all() and (out <= hi[:, None] + 1e-5).all()


def test_set_size_scaled_values_leave_the_hull():
    """The same check fails for the paper's value scaling (KVMerger.paper()): it can fail."""
    n = 40
    qkv = random_qkv(1, 1, 2, 2, n, seed=0)
    snap = drive_synthetic(KVMerger.paper(budget=8, skip_layers=()), qkv, [n], 0).snapshots[0].layers[0]
    values = qkv.v[0][0, :, :n]
    filled = torch.isfinite(snap["logw"][0])
    assert (snap["v"][0][filled].abs().amax(-1) > values.abs().max() * 1.5).any()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 30), kernel=st.integers(1, 9), ahead_frac=st.floats(0, 1), mode=st.sampled_from(["max", "avg"]),
       seed=st.integers(0, 10**6))
def test_pool_by_position_against_the_definition(n, kernel, ahead_frac, mode, seed):
    """scoring.pool_by_position on candidates in any slot order, some not poolable (padding, the window): each
    poolable token pools (max or mean) the poolable tokens at positions p - (kernel - 1 - ahead) .. p + ahead,
    written out below; the rest keep their own score."""
    from kvzoo.cache.scoring import pool_by_position

    gen = torch.Generator().manual_seed(seed)
    ahead = min(int(ahead_frac * kernel), kernel - 1)
    scores = torch.randn(1, 1, n, generator=gen)
    order = torch.randperm(n, generator=gen)
    key_pos = order[None, None, :]
    poolable = (torch.rand(1, 1, n, generator=gen) < 0.8) & (key_pos < n - 2)  # the last two: a window
    got = pool_by_position(scores, key_pos, poolable, kernel, mode, ahead)
    by_pos = torch.empty(n)
    by_pos[order] = scores[0, 0]
    ok = torch.zeros(n, dtype=torch.bool)
    ok[order] = poolable[0, 0]
    want = by_pos.clone()
    for p in range(n):
        if not ok[p]:
            continue
        span = [by_pos[j] for j in range(max(0, p - (kernel - 1 - ahead)), min(n, p + ahead + 1)) if ok[j]]
        want[p] = torch.stack(span).max() if mode == "max" else torch.stack(span).mean()
    torch.testing.assert_close(got[0, 0], want[order], rtol=1e-6, atol=1e-6)
