"""ZSMerge(layer_budgets="uncertainty"): the layers share L x budget slots by ZigZagKV's rule, from each layer's
output uncertainty measured in ZSMerge's own keeping order, and each layer is then exactly a uniform ZSMerge
with its own budget. References are computed from the definitions (float64 attention)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvzoo.cache import ZSMerge
from kvzoo.cache.budgets import level_budgets, zigzag_budgets
from kvzoo.cache.zsmerge import LAYER_LEVELS
from kvzoo.errors import KvzooError
from kvzoo.attention import ForwardContext, apply_deferred_updates, attend, defer_decode_updates
from tests.method_helpers import _at, drive_synthetic, layer_of, random_qkv, record_layer_needs, reference_uncertainty

SPEC = dict(budget=16, rank="accumulated")  # a standing that does not depend on the layout: a plain reference


def test_budgets_are_shares_of_the_layers_output_uncertainty(monkeypatch):
    """Each sequence's layer budgets are ZigZagKV's shares of L x its average layout (none below a fifth of
    it) by each layer's uncertainty, measured as ZSMerge keeps its tokens: the ring first, then the rank."""
    qkv = random_qkv(2, 3, 2, 2, 64, seed=5)
    qkv.q[0], qkv.q[2] = qkv.q[0] * 0.2, qkv.q[2] * 3  # layer 0 reads diffusely, layer 2 sharply
    lens = [60, 45]
    method = ZSMerge(layer_budgets="uncertainty", **SPEC)
    needs = record_layer_needs(monkeypatch)  # what the allocation was given, per sequence
    got = drive_synthetic(method, qkv, lens, 0).cache.budgets()  # [L, B]
    for b, n in enumerate(lens):
        layout = method.layout(n)
        need = [reference_uncertainty(qkv, layer, b, n, layout.proximity) for layer in range(3)]
        assert needs[b] == need
        smallest = 4  # the smallest layout of the defaults: ring 2, residual 1, context 1 (README)
        expected = zigzag_budgets(need, layout.budget, max(smallest, layout.budget // 5), smallest, n)
        assert got[:, b].tolist() == expected, (need, expected)  # three layers: a run each, nothing evened out
        assert sum(expected) == 3 * layout.budget  # the same memory as uniform layouts
    assert (got[0] > got[2]).all(), "the diffuse layer needs more slots than the sharp one"


def test_each_layer_is_a_uniform_zsmerge_with_its_own_budget():
    """After the allocation, every layer holds (and decodes) exactly what a one-layer ZSMerge with that layer's
    budget holds: its own ring, context and residual regions, for a left-padded batch."""
    qkv = random_qkv(2, 3, 2, 2, 64, seed=7)
    lens = [60, 45]
    trace = drive_synthetic(ZSMerge(layer_budgets="uncertainty", **SPEC), qkv, lens, 4)
    budgets = trace.cache.budgets()
    for layer in range(3):
        for b, n in enumerate(lens):
            uniform = ZSMerge(**{**SPEC, "budget": int(budgets[layer, b]), "layer_budgets": "uniform"})
            alone = drive_synthetic(uniform, layer_of(qkv, layer, b), [n], 4)
            for step, (mine, theirs) in enumerate(zip(trace.snapshots, alone.snapshots)):
                got, want = mine.layers[layer], theirs.layers[0]
                filled = torch.isfinite(got["logw"][b])
                assert int(filled.sum(-1).max()) <= int(budgets[layer, b])
                assert got["pos"][b][filled].tolist() == want["pos"][0][torch.isfinite(want["logw"][0])].tolist(), \
                    (layer, b, step)
                for name in ("k", "v", "logw", "score"):
                    torch.testing.assert_close(got[name][b][filled], want[name][0][torch.isfinite(want["logw"][0])],
                                               atol=1e-5, rtol=1e-5)


def test_one_sequence_holds_the_memory_of_uniform_layouts():
    """Per-layer capacities differ, so the stores are not one stacked allocation, but together they hold as many
    bytes as the uniform layouts (L x the average budget)."""
    qkv = random_qkv(1, 3, 2, 2, 64, seed=3)
    qkv.q[0] = qkv.q[0] * 0.2  # a diffuse layer: the budgets differ
    shared = drive_synthetic(ZSMerge(layer_budgets="uncertainty", **SPEC), qkv, [60], 2).cache
    uniform = drive_synthetic(ZSMerge(layer_budgets="uniform", **SPEC), qkv, [60], 2).cache
    assert len(set(shared.budgets()[:, 0].tolist())) > 1
    assert not shared.is_stacked() and uniform.is_stacked()
    assert shared.nbytes() == uniform.nbytes()


def test_a_prompt_in_chunks_keeps_uniform_layouts(monkeypatch):
    """Chunked prefill keeps its memory flat: the method becomes uniform (`for_chunked_prefill`); driven in
    chunks as it is (for_chunked_prefill bypassed), it refuses with a message naming the setting."""
    method = ZSMerge()
    assert method.layer_budgets == "uncertainty"  # the default
    assert method.for_chunked_prefill() == ZSMerge(layer_budgets="uniform")
    uniform = ZSMerge(layer_budgets="uniform")
    assert uniform.for_chunked_prefill() is uniform
    assert method.for_stored_document().layer_budgets == "uniform"
    qkv = random_qkv(1, 2, 1, 2, 40, seed=1)
    as_it_is = ZSMerge(layer_budgets="uncertainty", budget=8)
    monkeypatch.setattr(ZSMerge, "for_chunked_prefill", lambda self: self)
    with pytest.raises(KvzooError, match="layer_budgets='uncertainty'.*prompt fed in chunks"):
        drive_synthetic(as_it_is, qkv, [40], 0, prefill_chunk=16)


def test_bad_settings_are_refused():
    with pytest.raises(KvzooError, match="layer_budgets must be one of 'uniform', 'uncertainty', got 'layers'"):
        ZSMerge(layer_budgets="layers")
    with pytest.raises(KvzooError, match="which copy_heads and rank='split' do not .got copy_heads=0.3"):
        ZSMerge(layer_budgets="uncertainty", copy_heads=0.3)
    with pytest.raises(KvzooError, match="rank='split'.*use layer_budgets='uniform'"):
        ZSMerge(rank="split")


@given(st.lists(st.integers(1, 60), min_size=7, max_size=7), st.permutations(range(7)), st.integers(1, 8))
@settings(max_examples=60, deadline=None)
def test_levelled_budgets_keep_the_total_in_few_sizes(budgets, order, levels):
    """Evened out into `levels` runs of the layers in need order, the total is kept, a run's layers share one
    size except the neediest layer (which takes what the floors leave), and no layer falls below the smallest
    budget of its run."""
    out = level_budgets(budgets, order, levels)
    runs = min(levels, 7)
    assert sum(out) == sum(budgets)
    assert len(set(out[i] for i in order[1:])) <= runs
    cuts = [round(i * 7 / runs) for i in range(runs + 1)]
    for a, b in zip(cuts, cuts[1:]):
        run = order[a:b]
        assert all(out[i] >= min(budgets[j] for j in run) for i in run)


def test_a_deep_model_decodes_its_layers_in_a_few_stacked_groups():
    """Eight layers of different needs become at most LAYER_LEVELS + 1 stores sizes, so an eager decode step
    updates a few stacked groups rather than eight layers one by one; the total stays L x the budget."""
    qkv = random_qkv(1, 8, 2, 2, 64, seed=9)
    for layer in range(8):
        qkv.q[layer] = qkv.q[layer] * (0.2 + 0.4 * layer)  # from diffuse to sharp
    cache = drive_synthetic(ZSMerge(layer_budgets="uncertainty", **SPEC), qkv, [60], 2).cache
    budgets = cache.budgets()[:, 0].tolist()
    assert sum(budgets) == 8 * SPEC["budget"] and len(set(budgets)) > 1
    groups = cache.stacked_groups()
    assert groups is not None and len(groups) <= LAYER_LEVELS + 1
    assert sorted(i for ids, _ in groups for i in ids) == list(range(8))


def test_grouped_stacked_updates_equal_one_update_per_layer():
    """Eager decode defers the layers' updates and runs one per stacked group (`apply_deferred_updates`): the
    stores after several steps must be those of updating every layer right after its own attention."""
    qkv = random_qkv(1, 8, 2, 2, 64, seed=9)
    for layer in range(8):
        qkv.q[layer] = qkv.q[layer] * (0.2 + 0.4 * layer)
    prefilled = drive_synthetic(ZSMerge(layer_budgets="uncertainty", **SPEC), qkv, [56], 0).cache
    grouped, per_layer = copy.deepcopy(prefilled), copy.deepcopy(prefilled)
    with torch.no_grad():
        for step in range(6):
            pos = torch.tensor([[56 + step]])
            for cache, deferred in ((grouped, defer_decode_updates(grouped)), (per_layer, None)):
                ctx = ForwardContext(pos, None, None, cache, True, None, False, deferred=deferred)  # type: ignore[arg-type]
                for layer in range(8):
                    attend(layer, *(_at(x[layer], pos) for x in (qkv.q, qkv.k, qkv.v)), ctx)
                if deferred is not None:
                    assert 1 < len(deferred.groups) < 8
                    apply_deferred_updates(cache, pos, deferred)
    for mine, theirs in zip(grouped.layers, per_layer.layers):
        assert torch.equal(mine.pos, theirs.pos) and torch.equal(mine.logw, theirs.logw)
        torch.testing.assert_close(mine.score, theirs.score, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mine.k, theirs.k, atol=1e-6, rtol=1e-6)


def test_a_batch_gets_the_budgets_and_tokens_each_prompt_gets_alone(tiny_checkpoint):
    """Each sequence is allocated from its own layers' needs (left padding neither counts as a key nor changes
    the order), so a left-padded batch keeps, per layer, the budget and the tokens each prompt keeps alone."""
    import kvzoo

    model = kvzoo.load(tiny_checkpoint("llama-gqa")[1])
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (40, 25, 33)]
    method = ZSMerge(budget=0.4, layer_budgets="uncertainty")
    alone = [model.generate_ids(p, max_new_tokens=10, eos_token_ids=[], compression=method) for p in prompts]
    batch = model.generate_ids(prompts, max_new_tokens=10, eos_token_ids=[], compression=method)
    assert batch.token_ids == [a.token_ids[0] for a in alone]
    for i, a in enumerate(alone):
        assert batch.cache.budgets()[:, i].tolist() == a.cache.budgets()[:, 0].tolist()
        for mine, theirs in zip(batch.cache.layers, a.cache.layers):
            for x, y in zip(mine.pos[i], theirs.pos[0]):
                assert sorted(p for p in x.tolist() if p >= 0) == sorted(p for p in y.tolist() if p >= 0)
