"""KVMerger(layer_budgets="uncertainty"): the merging layers share L x budget slots by ZigZagKV's rule, from each
layer's output uncertainty measured in KVMerger's own keeping order (its recent window, then the heavy hitters'
rank), and each layer is then exactly a uniform KVMerger with its own budget. References are computed from the
definitions (float64 attention)."""

from __future__ import annotations

import pytest
import torch

from kvzoo.cache import KVMerger
from kvzoo.cache.budgets import zigzag_budgets
from kvzoo.errors import KvzooError
from tests.method_helpers import drive_synthetic, layer_of, random_qkv, record_layer_needs, reference_uncertainty

# rank="accumulated": the heavy hitters' rank is A_t, which the reference computes directly
SPEC = dict(budget=16, rank="accumulated", layer_budgets="uncertainty")
RECENT = int(16 * 0.34)  # the average layer's recent window: recent_ratio of the budget


def test_budgets_are_shares_of_the_layers_output_uncertainty(monkeypatch):
    """Each sequence's layer budgets are ZigZagKV's shares of L x its budget (none below a fifth of it) by each
    layer's uncertainty, measured as the average layer keeps its tokens: the recent window first, then A_t."""
    qkv = random_qkv(2, 3, 2, 2, 64, seed=5)
    qkv.q[0], qkv.q[2] = qkv.q[0] * 0.2, qkv.q[2] * 3  # layer 0 reads diffusely, layer 2 sharply
    lens = [60, 45]
    needs = record_layer_needs(monkeypatch)  # what the allocation was given, per sequence
    got = drive_synthetic(KVMerger(**SPEC), qkv, lens, 0).cache.budgets()  # [L, B], decode headroom 0
    for b, n in enumerate(lens):
        need = [reference_uncertainty(qkv, layer, b, n, RECENT) for layer in range(3)]
        assert needs[b] == pytest.approx(need, rel=1e-6)
        expected = zigzag_budgets(need, 16, 16 // 5, 1, n)
        assert got[:, b].tolist() == expected, (need, expected)
    assert (got[0] > got[2]).all(), "the diffuse layer needs more slots than the sharp one"


def test_each_layer_is_a_uniform_kvmerger_with_its_own_budget():
    """After the allocation every layer holds (and decodes) exactly what a one-layer KVMerger with that layer's
    budget holds: its recent window and heavy hitters from its own budget, the rest merged, for a left-padded
    batch."""
    qkv = random_qkv(2, 3, 2, 2, 64, seed=7)
    qkv.q[0] = qkv.q[0] * 0.2  # a diffuse layer: the budgets differ
    lens = [60, 45]
    trace = drive_synthetic(KVMerger(**SPEC), qkv, lens, 3)
    budgets = trace.cache.budgets() - 3  # [L, B] without the decode headroom
    assert len(set(budgets[:, 0].tolist())) > 1
    for layer in range(3):
        for b, n in enumerate(lens):
            uniform = KVMerger(**{**SPEC, "budget": int(budgets[layer, b]), "layer_budgets": "uniform"})
            alone = drive_synthetic(uniform, layer_of(qkv, layer, b), [n], 3)
            for step, (mine, theirs) in enumerate(zip(trace.snapshots, alone.snapshots)):
                got, want = mine.layers[layer], theirs.layers[0]
                filled, wanted = torch.isfinite(got["logw"][b]), torch.isfinite(want["logw"][0])
                assert int(filled.sum(-1).max()) <= int(budgets[layer, b]) + step
                assert got["pos"][b][filled].tolist() == want["pos"][0][wanted].tolist(), (layer, b, step)
                for name in ("k", "v", "logw", "score"):
                    torch.testing.assert_close(got[name][b][filled], want[name][0][wanted], atol=1e-5, rtol=1e-5)


def test_one_sequence_holds_the_memory_of_uniform_layers():
    """Per-layer capacities differ, but together the stores hold as many bytes as uniform layers (L x the
    budget), decode headroom included."""
    qkv = random_qkv(1, 3, 2, 2, 64, seed=3)
    qkv.q[0] = qkv.q[0] * 0.2
    shared = drive_synthetic(KVMerger(**SPEC), qkv, [60], 2).cache
    uniform = drive_synthetic(KVMerger(**{**SPEC, "layer_budgets": "uniform"}), qkv, [60], 2).cache
    assert len(set(shared.budgets()[:, 0].tolist())) > 1
    assert shared.nbytes() == uniform.nbytes()


def test_skipped_layers_keep_the_prompt_and_the_others_share_their_budget():
    """A skipped layer is left whole and outside the allocation: the merging layers alone share L' x budget. Every
    layer is then in a new store: the skipped one is not left a view of the allocation that held every layer's
    prompt (which would keep it alive)."""
    qkv = random_qkv(1, 3, 2, 2, 64, seed=3)
    qkv.q[1] = qkv.q[1] * 0.2
    cache = drive_synthetic(KVMerger(**SPEC, skip_layers=(0,)), qkv, [60], 0).cache
    budgets = cache.budgets()[:, 0].tolist()
    assert budgets[0] == 60 and budgets[1] + budgets[2] == 2 * 16 and budgets[1] > budgets[2]
    skipped = cache.layers[0]
    assert skipped.k.untyped_storage().nbytes() == skipped.k.nbytes  # its own bytes, not the held allocation's
    assert sorted(cache.layers[0].pos[0, 0].tolist()) == list(range(60))


def test_merging_layers_of_one_size_stay_one_allocation_under_their_own_ids():
    """Merging layers given the same budget are stored as one allocation (`SlotStack`), named by their layer ids
    in the cache (a skipped layer 0 shifts them), so that a capped decode updates them in one call."""
    qkv = random_qkv(1, 3, 2, 2, 64, seed=3)
    qkv.q[2], qkv.k[2], qkv.v[2] = qkv.q[1], qkv.k[1], qkv.v[1]  # equal needs: equal budgets
    cache = drive_synthetic(KVMerger(**SPEC, skip_layers=(0,), decode_cap=2), qkv, [60], 0).cache
    assert cache.budgets()[:, 0].tolist() == [60, 16, 16]
    [stack] = cache.stacks
    assert stack.layer_ids == (1, 2)
    [(layer_ids, whole), (alone, _)] = cache.stacked_groups()
    assert layer_ids == (1, 2) and alone == (0,)
    assert torch.equal(whole.k[1:], cache.layers[2].k)  # the second merging layer's rows


def test_a_prompt_that_fits_keeps_every_token_beside_one_that_shares():
    """In a batch, a sequence whose prompt fits the budget keeps it whole in every layer, while the other one's
    layers share its budget by need (and a sequence's allocation is its own)."""
    qkv = random_qkv(2, 3, 2, 2, 64, seed=5)
    qkv.q[0] = qkv.q[0] * 0.2
    cache = drive_synthetic(KVMerger(**SPEC), qkv, [60, 12], 0).cache
    budgets = cache.budgets()  # [L, B]
    assert budgets[:, 1].tolist() == [12, 12, 12]
    assert int(budgets[:, 0].sum()) == 3 * 16 and len(set(budgets[:, 0].tolist())) > 1
    for layer in cache.layers:
        assert torch.isfinite(layer.logw[1]).sum(-1).tolist() == [12, 12]


def test_chunked_prompts_and_stored_documents_keep_uniform_layers(monkeypatch):
    """A prompt fed in chunks keeps its memory flat and a stored document's needs say nothing of a question to
    come: both become uniform, as does the paper's KVMerger; driven in chunks as it is, it refuses with a
    message naming the setting."""
    method = KVMerger(layer_budgets="uncertainty")
    assert method.for_chunked_prefill() == KVMerger(layer_budgets="uniform")
    uniform = KVMerger(layer_budgets="uniform")
    assert uniform.for_chunked_prefill() is uniform
    assert method.for_stored_document().layer_budgets == "uniform"
    assert KVMerger.paper(layer_budgets="uncertainty").layer_budgets == "uncertainty"
    assert KVMerger.paper().layer_budgets == "uniform"
    fixed_epsilon = KVMerger(budget=None, layer_budgets="uncertainty")  # the data sizes each layer: nothing held
    assert fixed_epsilon.for_chunked_prefill() is fixed_epsilon
    monkeypatch.setattr(KVMerger, "for_chunked_prefill", lambda self: self)
    with pytest.raises(KvzooError, match="layer_budgets='uncertainty'.*prompt fed in chunks"):
        drive_synthetic(KVMerger(budget=8, layer_budgets="uncertainty"), random_qkv(1, 2, 1, 2, 40, seed=1), [40], 0,
                        prefill_chunk=16)


def test_bad_layer_budgets_are_refused():
    with pytest.raises(KvzooError, match="layer_budgets must be one of 'uniform', 'uncertainty', got 'layers'"):
        KVMerger(layer_budgets="layers")
