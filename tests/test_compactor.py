"""Compactor's query-agnostic scoring (kvzoo.cache.scoring: non-causal block attention, leverage of the pre-RoPE
keys) against dense float64 definitions, and the Compactor method's kept set against the formula."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvzoo import Compactor, KVMerger, ZigZagKV, ZSMerge
from kvzoo.cache.chunk import make_prefill_chunk
from kvzoo.cache.compactor import (LEAD_IN, RUN, SPAN, SURPRISAL_LENDS, SURPRISE_LEND, dropped_fraction,
                                   lent_surprisal, sinks_then_compactor)
from kvzoo.cache.merging_sets import protected_tokens
from kvzoo.cache.scoring import compactor_scores, noncausal_block_scores, pre_rope_keys
from kvzoo.cache.slots import LayerSlots
from kvzoo.errors import KvzooError
from kvzoo.layers import apply_rope, rotary_cos_sin
from tests.method_helpers import (dense_block_attention, drive_synthetic, pool_1d, random_qkv, reference_leverage,
                                  spiky_surprisal)

SLACK = 1e-5  # top-k comparisons of fp32 scores built from z-scores of sums of probabilities


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 40), st.integers(0, 6), st.sampled_from([1, 3, 8, 64]), st.integers(0, 2**16))
def test_noncausal_block_scores_are_the_column_sums_of_attention_within_position_blocks(t, pad, block, seed):
    """Each valid query attends, with logits q.k * scale and no causal mask, to the valid keys whose position
    is in its own block; a key's score is the sum over those queries, averaged over its query heads. The
    second sequence is left-padded, so its blocks do not line up with the tensor's indices."""
    g = torch.Generator().manual_seed(seed)
    hkv, groups, d, n = 2, 3, 4, t + pad
    q = torch.randn(2, hkv * groups, n, d, generator=g)
    k, v = torch.randn(2, hkv, n, d, generator=g), torch.randn(2, hkv, n, d, generator=g)
    positions = torch.stack([torch.arange(n), torch.arange(n) - pad]).clamp(min=-1)
    got = noncausal_block_scores(make_prefill_chunk(q, k, v, positions, None, 0, 0.0, None), block, 0.7)
    for row in range(2):
        expected = dense_block_attention(q[row], k[row], positions[row].tolist(), block, 0.7)
        torch.testing.assert_close(got[row].double(), expected, rtol=1e-5, atol=1e-6)


def test_pre_rope_keys_undo_the_rotation_wherever_the_text_starts():
    """A chunk holds keys rotated by their positions; pre_rope_keys rotates them back to the projections, at
    any offset of the text (the same token gets the same pre-RoPE key wherever it stands)."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(1, 2, 24, 8, generator=g)
    for offset in (0, 37):
        positions = torch.arange(24)[None] + offset
        cos, sin = rotary_cos_sin(positions, 8, 10000.0, 1.0, torch.float32)
        k = apply_rope(raw, cos, sin)
        assert (k - raw).abs().max() > 0.1
        chunk = make_prefill_chunk(torch.randn(1, 2, 24, 8, generator=g), k, k, positions, None, 0, 0.0, None,
                                   rope=(cos, sin))
        torch.testing.assert_close(pre_rope_keys(chunk), raw, rtol=1e-5, atol=1e-5)


def test_a_stored_documents_rank_lends_each_tokens_score_to_its_span():
    """sinks_then_compactor: Compactor's score of the chunk's own tokens, each max-pooled over the SPAN positions
    from SPAN - 1 - LEAD_IN before it to LEAD_IN after it (a token lends its score to the LEAD_IN tokens before
    it), the first 8 positions first; slots kept from before the chunk (a question to a stored document) keep
    their stored score and lend it to no neighbour, nor take a neighbour's."""
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, 20, 8, generator=g), torch.randn(1, 1, 20, 8, generator=g), \
        torch.randn(1, 1, 20, 8, generator=g)
    kept, prompt_len = torch.tensor([6]), torch.tensor([20])
    first = make_prefill_chunk(q, k, v, torch.arange(20)[None], None, 0, 0.0, None)
    plain = compactor_scores(first, dropped_fraction(kept, prompt_len))  # [1, 1, 20]
    expected = pool_1d(plain, SPAN, "max", LEAD_IN).masked_fill(torch.arange(20) < 8, float("inf"))
    torch.testing.assert_close(sinks_then_compactor(first, kept, prompt_len), expected)
    assert not torch.equal(pool_1d(plain, SPAN, "max", LEAD_IN), plain)  # the pooling changed something here
    assert not torch.equal(pool_1d(plain, SPAN, "max", LEAD_IN), pool_1d(plain, SPAN, "max"))  # not centred

    slots = LayerSlots.empty(1, 1, 4, 8, torch.tensor([4]), torch.float32, "cpu")
    stored = torch.tensor([[[9.0, -9.0, 9.0, -9.0]]])  # extreme, so that pooling them in would show
    slots.replace_all(torch.randn(1, 1, 4, 8, generator=g), torch.randn(1, 1, 4, 8, generator=g),
                      torch.zeros(1, 1, 4), stored, torch.tensor([[[30, 31, 32, 33]]]))
    later = make_prefill_chunk(q, k, v, torch.arange(40, 60)[None], slots, 4, 0.0, None)
    own = compactor_scores(later, dropped_fraction(kept, prompt_len))[..., 4:]
    torch.testing.assert_close(sinks_then_compactor(later, kept, prompt_len),
                               torch.cat([stored, pool_1d(own, SPAN, "max", LEAD_IN)], dim=-1))


def zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std(unbiased=False)


def reference_scores(qkv, n: int, block: int, scale: float, kernel: int, blend: float, layer: int = 0,
                     span: int = 1, lead_in: int | None = None) -> torch.Tensor:
    """[Hkv, n] the Compactor score of one unpadded sequence, float64, from the definition; max-pooled over `span`
    positions up to `lead_in` after each (None: centred) as the methods rank a stored document (`compactor.SPAN`,
    `compactor.LEAD_IN`; the Compactor method: span 1)."""
    q, k, v = (x[layer][0, :, :n].double() for x in (qkv.q, qkv.k, qkv.v))
    attention = dense_block_attention(q, k, list(range(n)), block, scale) * v.norm(dim=-1)
    attention = pool_1d(attention, kernel, "avg")
    leverage = torch.stack([reference_leverage(k[h]) for h in range(k.shape[0])])
    return pool_1d(torch.stack([zscore(attention[h]) + blend * zscore(leverage[h]) for h in range(k.shape[0])]),
                   span, "max", lead_in)


def lent_surprisal_reference(surprisal: torch.Tensor, lend: str = "max") -> torch.Tensor:
    """[n] float64: each position's largest surprisal among itself and the SURPRISE_LEND before it, z-scored
    (population standard deviation), from surprisal [n]; a lend with "mean" adds the z-scored mean of the same
    positions, one with "run" the z-scored largest, over the runs of RUN positions that hold the position
    (runs starting before the text hold fewer), of the run's least surprisal."""
    s = surprisal.double()
    n = len(s)
    windows = [s[max(0, p - SURPRISE_LEND):p + 1] for p in range(n)]
    z = lambda x: (x - x.mean()) / x.std(unbiased=False)  # noqa: E731
    total = z(torch.stack([w.max() for w in windows]))
    if "mean" in lend.split("+"):
        total = total + z(torch.stack([w.mean() for w in windows]))
    if "run" in lend.split("+"):
        least = [s[max(0, end - RUN + 1):end + 1].min() for end in range(n)]  # the run ending at `end`
        total = total + z(torch.stack([max(least[p:min(n, p + RUN)]) for p in range(n)]))
    return total


@settings(max_examples=30, deadline=None)
@given(st.integers(12, 40), st.integers(12, 40), st.integers(0, 2**16), st.sampled_from(SURPRISAL_LENDS))
def test_lent_surprisal_matches_the_windows_it_describes(len_a, len_b, seed, lend):
    """Each sequence of a batch is lent from its own prompt alone (positions past prompt_len are padding)."""
    n_pos = max(len_a, len_b)
    surprisal = torch.rand(2, n_pos, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 8
    lent = lent_surprisal(surprisal.float(), torch.tensor([len_a, len_b]), lend)
    for row, length in enumerate((len_a, len_b)):
        ref = lent_surprisal_reference(surprisal[row, :length], lend)
        assume(bool(ref.isfinite().all()))  # a pooled term constant over a short prompt has no z-score
        torch.testing.assert_close(lent[row, :length].double(), ref, rtol=1e-4, atol=1e-4)


def test_run_lend_ranks_a_span_no_token_of_which_could_be_guessed_first():
    """A code (RUN + 1 tokens of 2.3 nats each, log 10) amid prose that alternates guessable and very surprising
    words (0.1 and 6 nats: a higher mean, a higher peak) is lent the most by the run term: every token of the code
    and nothing more than RUN - 1 tokens away from it."""
    prose = torch.tensor([0.1, 6.0] * 20)
    surprisal = torch.cat([prose, torch.full((RUN + 1,), 2.3), prose])[None]
    lengths = torch.tensor([surprisal.shape[1]])
    run_term = (lent_surprisal(surprisal, lengths, "max+mean+run") - lent_surprisal(surprisal, lengths, "max+mean"))[0]
    code, top = range(40, 40 + RUN + 1), run_term.max()
    assert all(run_term[p] > top - 1e-4 for p in code), run_term.tolist()
    far = [p for p in range(len(run_term)) if not 40 - RUN < p < 40 + 2 * RUN]
    assert all(run_term[p] < top - 1.0 for p in far), run_term.tolist()


@settings(max_examples=20, deadline=None)
@given(st.integers(6, 40), st.integers(1, 2), st.integers(1, 3), st.integers(0, 2**16), st.integers(2, 30),
       st.sampled_from([4, 16, 256]), st.sampled_from([1, 3]), st.sampled_from([None, 0.5]))
def test_compactor_keeps_sinks_recent_and_the_top_of_its_score(n, kv_heads, groups, seed, budget, block, kernel,
                                                               blend):
    """Selection of one sequence: the first `sinks` and last `recent` tokens, then the top of
    zscore(pooled block attention * |v|) + blend * zscore(leverage) (blend: the dropped fraction of the
    prompt when not given), `budget` slots in all; decoding appends."""
    sinks, recent = 2, 1
    assume(sinks + recent < budget < n)
    qkv = random_qkv(1, 1, kv_heads, groups, n + 1, seed=seed)  # the prompt, then one decoded token
    method = Compactor(budget=budget, sinks=sinks, recent=recent, block=block, kernel_size=kernel, blend=blend)
    trace = drive_synthetic(method, qkv, [n], 1)
    weight = 1.0 - budget / n if blend is None else blend
    ref = reference_scores(qkv, n, block, 1.0, kernel, weight)
    middle = list(range(sinks, n - recent))
    for h in range(kv_heads):
        kept = set(trace.snapshots[0].kept(0, 0, h))
        assert len(kept) == budget and {0, 1, n - 1} <= kept, f"head {h}: kept {sorted(kept)}"
        chosen = [ref[h, p].item() for p in middle if p in kept]
        dropped = [ref[h, p].item() for p in middle if p not in kept]
        assert min(chosen) >= max(dropped) - SLACK, f"head {h}: kept {sorted(kept)}, scores {ref[h].tolist()}"
        assert set(trace.snapshots[1].kept(0, 0, h)) == kept | {n}


@pytest.mark.parametrize("field, value", [("sinks", -1), ("block", 0), ("scale", 0.0), ("blend", -0.5),
                                          ("kernel_size", 1.5), ("decode_cap", 0)])
def test_compactor_refuses_bad_settings_by_name(field, value):
    with pytest.raises(KvzooError, match=field):
        Compactor(**{field: value})


@settings(max_examples=16, deadline=None)
@given(st.integers(30, 48), st.integers(1, 2), st.integers(1, 3), st.integers(0, 2**16), st.integers(20, 26),
       st.sampled_from([(1, "uniform"), (3, "uncertainty")]), st.sampled_from([0.0, 1.0, 3.0]),
       st.sampled_from(SURPRISAL_LENDS))
def test_zsmerge_compactor_context_is_the_top_of_compactor_score(n, kv_heads, groups, seed, budget, sharing,
                                                                 surprisal_weight, lend):
    """ZSMerge(context_rank="compactor"): the ring holds the newest tokens, the first 8 tokens take context
    slots first, and the other context slots go to the top of Compactor's score (blend: the fraction of the
    prompt the average layout drops) plus `stored_surprisal` times the z-scored surprisal each token is lent
    (the largest of its own and the 8 tokens' before it, plus their mean with lend "max+mean"), max-pooled over
    the span, among the tokens before the ring; what is left merges into the residual slot. With the layers
    sharing the budget by need, so in each layer's own layout."""
    layers, layer_budgets = sharing
    qkv = random_qkv(1, layers, kv_heads, groups, n, seed=seed)
    if layers > 1:  # layer 0 reads diffusely, the last one sharply: their needs differ
        qkv.q[0], qkv.q[-1] = qkv.q[0] * 0.2, qkv.q[-1] * 3
    surprisal = spiky_surprisal(n, seed)
    method = ZSMerge(budget=budget, rank="window", context_rank="compactor", layer_budgets=layer_budgets,
                     stored_surprisal=surprisal_weight, stored_surprisal_lend=lend)
    trace = drive_synthetic(method, qkv, [n], 0, surprisal=surprisal)
    assert int(trace.cache.budgets().sum()) == layers * method.layout(n).budget
    assume(layers == 1 or len(set(trace.cache.budgets()[:, 0].tolist())) > 1)  # the layers' budgets differ
    lent = lent_surprisal_reference(surprisal[0], lend)
    for layer in range(layers):
        own = reference_scores(qkv, n, 256, 1.0, 3, 1.0 - method.layout(n).budget / n, layer)
        ref = pool_1d(own + surprisal_weight * lent, SPAN, "max", LEAD_IN)
        slots = trace.cache.layers[layer]
        proximity = int(slots.state["proximity"][0])
        n_context = int(slots.budget[0]) - proximity - int(slots.state["residual"][0])
        snap = trace.snapshots[0].layers[layer]
        ring = set(range(n - proximity, n))
        older = [p for p in range(8, n - proximity)]
        for h in range(kv_heads):
            exact = torch.isfinite(snap["logw"][0, h]) & (snap["logw"][0, h] == 0)
            held = set(snap["pos"][0, h][exact].tolist())
            where = f"layer {layer}, head {h}"
            assert ring <= held and set(range(min(8, n_context))) <= held, f"{where}: held {sorted(held)}"
            context = held - ring - set(range(8))
            assert len(context) == max(0, n_context - 8), f"{where}: context {sorted(context)}"
            chosen = [ref[h, p].item() for p in older if p in context]
            dropped = [ref[h, p].item() for p in older if p not in context]
            assert not chosen or min(chosen) >= max(dropped) - SLACK, f"{where}: context {sorted(context)}"


def older_middle(n: int, recent: int) -> list[int]:
    """Positions after the first 8 (the sinks, ranked first) and before the `recent` newest tokens."""
    return list(range(8, n - recent))


# (stored_surprisal, stored_surprisal_lend): without the surprisal the lend changes nothing
SURPRISAL_SETTINGS = [(0.0, "max+mean"), (1.0, "max"), (1.0, "max+mean"), (1.0, "max+mean+run")]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("surprisal_weight, lend", SURPRISAL_SETTINGS)
def test_zigzag_compactor_rank_keeps_sinks_the_window_and_the_top_of_compactor_score(seed, surprisal_weight, lend):
    """ZigZagKV(rank="compactor") with uniform layer budgets (bound_ratio=1): the observation window, the first
    8 tokens, then the top of Compactor's score (blend: the fraction of the prompt the budget drops) plus
    `stored_surprisal` times the z-scored surprisal each token is lent (`lend`), max-pooled over the span."""
    n, budget, window = 72, 32, 6
    qkv = random_qkv(1, 1, 2, 2, n, seed=seed)
    surprisal = spiky_surprisal(n, seed)
    method = ZigZagKV(budget=budget, rank="compactor", bound_ratio=1.0, window_size=window,
                      stored_surprisal=surprisal_weight, stored_surprisal_lend=lend)
    trace = drive_synthetic(method, qkv, [n], 0, surprisal=surprisal)
    own = reference_scores(qkv, n, 256, 1.0, 3, 1.0 - budget / n)
    ref = pool_1d(own + surprisal_weight * lent_surprisal_reference(surprisal[0], lend), SPAN, "max", LEAD_IN)
    for h in range(2):
        kept = set(trace.snapshots[0].kept(0, 0, h))
        assert len(kept) == budget and set(range(8)) | set(range(n - window, n)) <= kept, sorted(kept)
        chosen = [ref[h, p].item() for p in older_middle(n, window) if p in kept]
        dropped = [ref[h, p].item() for p in older_middle(n, window) if p not in kept]
        assert len(chosen) == budget - 8 - window and min(chosen) >= max(dropped) - SLACK, sorted(kept)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("recent_tokens", [None, 2, 24, 100])
@pytest.mark.parametrize("surprisal_weight, lend", SURPRISAL_SETTINGS)
def test_kvmerger_compactor_rank_keeps_the_top_of_compactor_score_verbatim(seed, recent_tokens, surprisal_weight,
                                                                           lend):
    """KVMerger(rank="compactor"): the heavy hitters kept verbatim (as singletons, log w = 0) are the first 8
    tokens, then the top of Compactor's score plus `stored_surprisal` times the z-scored surprisal each token is
    lent (`lend`), max-pooled over the span, among the older tokens; `recent_tokens` sets the recent window (at
    most half the budget) and the heavy hitters take the rest of the verbatim share (what `protected_tokens` lets
    fit beside the merged runs), equal pooled ranks the newer first."""
    n, budget = 120, 60
    qkv = random_qkv(1, 1, 2, 2, n, seed=seed)
    surprisal = spiky_surprisal(n, seed)
    method = KVMerger(budget=budget, rank="compactor", recent_tokens=recent_tokens, layer_budgets="uniform",
                      stored_surprisal=surprisal_weight, stored_surprisal_lend=lend)
    trace = drive_synthetic(method, qkv, [n], 0, surprisal=surprisal)
    recent = int(budget * 0.34) if recent_tokens is None else min(recent_tokens, budget // 2)
    heavy = int(budget * 0.24) + int(budget * 0.34) - recent
    own = reference_scores(qkv, n, 256, 1.0, 3, 1.0 - budget / n)
    ref = pool_1d(own + surprisal_weight * lent_surprisal_reference(surprisal[0], lend), SPAN, "max",
                  LEAD_IN).float()
    rank = torch.cat([torch.full((2, 8), float("inf")), ref[:, 8:]], dim=1)[None]  # [1, Hkv, n] sinks first
    recent_m = torch.zeros(1, 2, n, dtype=torch.bool)
    recent_m[..., n - recent:] = True
    protected = protected_tokens(rank, recent_m, heavy, budget, newer_first=True)[0]  # [Hkv, n]
    snap = trace.snapshots[0].layers[0]
    for h in range(2):
        verbatim = set(snap["pos"][0, h][snap["logw"][0, h] == 0].tolist())
        expected = set(torch.nonzero(protected[h]).flatten().tolist())
        assert expected <= verbatim, (sorted(expected - verbatim), sorted(verbatim))
        assert len(expected) == recent + heavy and (heavy <= 8 or len(expected) > 8 + recent)
        assert len(trace.snapshots[0].kept(0, 0, h)) == budget
