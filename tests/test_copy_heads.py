"""Copy heads (kvzoo.cache.copy_heads) and ZSMerge's use of them (`ZSMerge.copy_heads`)."""

from __future__ import annotations

import pytest
import torch

from kvzoo.cache.copy_heads import induction_scores, probe_ids, successor_attention
from kvzoo.cache.zsmerge import ZSMerge
from kvzoo.errors import KvzooError
from method_helpers import drive_model


def test_probe_is_one_random_sequence_twice_away_from_the_vocabulary_ends():
    ids = probe_ids(1000, length=50)
    assert ids.shape == (100,) and torch.equal(ids[:50], ids[50:])
    assert int(ids.min()) >= 125 and int(ids.max()) < 875 and len(set(ids[:50].tolist())) > 30
    assert torch.equal(ids, probe_ids(1000, length=50))  # seeded


def test_successor_attention_reads_the_token_after_the_earlier_copy_with_the_best_head_of_each_group():
    n = 4
    probs = torch.zeros(4, n, 2 * n)  # 4 query heads in 2 KV groups; query i sits at position n + i
    for i in range(n - 1):
        probs[1, i, i + 1] = 1.0  # group 0's second head copies: it reads the successor of its counterpart
        probs[2, i, n + i] = 1.0  # group 1 reads itself (a local head)
    probs[3, :, 0] = 0.5  # and the first token
    probs[3, 0, 1] = 0.5  # once the successor, for one query of three
    assert torch.allclose(successor_attention(probs, n, num_kv_heads=2), torch.tensor([1.0, 0.5 / 3]))


def test_induction_scores_are_the_models_own_attention_on_the_probe(models, tiny_checkpoint):
    """Against transformers' eager attention weights on the same probe (the reference implementation)."""
    model = models("llama-gqa")
    hf_model = tiny_checkpoint("llama-gqa")[0]
    scores = induction_scores(model)
    assert induction_scores(model) is scores  # once per model
    n = min(256, model.config.max_position_embeddings // 2)
    ids = probe_ids(model.config.vocab_size, n)[None]
    with torch.no_grad():
        attentions = hf_model(ids, output_attentions=True).attentions  # per layer [1, Hq, 2n, 2n]
    expected = torch.stack([successor_attention(a[0, :, n:], n, model.config.num_kv_heads) for a in attentions])
    assert scores.shape == (model.config.num_layers, model.config.num_kv_heads)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)  # fp32 parity


def test_copy_heads_lend_their_ring_to_the_context_and_decode_overwrites_the_lowest_ranked_first(models):
    model = models("llama-gqa")
    prompt = [(7 * i + 3) % 120 + 1 for i in range(80)]
    # A threshold of 0 makes every head of the random model a copy head (every score is above 0).
    method = ZSMerge(budget=40, proximity=0.5, copy_heads=0.0, copy_recent=4, layer_budgets="uniform")
    trace = drive_model(model, [prompt], method, steps=3)
    layout = method.layout(len(prompt))  # proximity 20, residual 1, context 19
    ring_start = layout.budget - layout.proximity
    for layer in range(model.config.num_layers):
        pos = trace.snapshots[0].layers[layer]["pos"][0]  # [Hkv, C]
        logw = trace.snapshots[0].layers[layer]["logw"][0]
        for h in range(pos.shape[0]):
            ring = pos[h, ring_start:layout.budget].tolist()
            assert set(range(76, 80)) <= set(ring)  # the 4 most recent tokens where the ring keeps them
            assert sum(0 <= p < 76 for p in ring) == layout.proximity - 4  # the 16 others: context picks
            exact = pos[h][logw[h] == 0].tolist()
            assert len(exact) == len(set(exact)) == layout.budget - layout.residual
        # decode position 80 takes ring slot 80 % 20 = 0, which held a lent slot's pick, not a recent token
        first_overwritten = ring_start + 80 % layout.proximity
        assert (pos[:, first_overwritten] < 76).all()
        assert (trace.snapshots[1].layers[layer]["pos"][0, :, first_overwritten] == 80).all()


def test_without_copy_heads_the_ring_holds_the_most_recent_tokens(models):
    model = models("llama-gqa")
    prompt = [(7 * i + 3) % 120 + 1 for i in range(80)]
    method = ZSMerge(budget=40, proximity=0.5, layer_budgets="uniform")
    trace = drive_model(model, [prompt], method, steps=0)
    layout = method.layout(len(prompt))
    ring = trace.snapshots[0].layers[0]["pos"][0, :, layout.budget - layout.proximity:layout.budget]
    assert sorted(ring[0].tolist()) == list(range(60, 80))


@pytest.mark.parametrize("rule", ["stored_ring", "stored_copy_heads"])
def test_a_stored_document_is_compressed_by_the_stored_rule_and_a_prompt_to_continue_is_not(models, rule):
    """`prefill_cache` compresses with `for_stored_document`, exactly as if its setting had been asked for: the
    default ZSMerge with a ring of at most `stored_ring` tokens and the context ranked by Compactor's score, or
    (stored_ring=None) with copy heads at `stored_copy_heads`; generation from a prompt keeps the method."""
    from dataclasses import replace

    from kvzoo.generate import prefill, prefill_cache, prepare

    model = models("llama-gqa")
    doc = [(7 * i + 3) % 120 + 1 for i in range(200)]
    if rule == "stored_ring":
        method = ZSMerge(budget=80)  # a ring of 40 by the budget, capped at 32 for a stored document
        asked = replace(method, proximity_cap=32, context_rank="compactor", rank="window", accumulated="sum",
                        layer_budgets="uniform", kernel_size=7)
    else:
        method = ZSMerge(budget=40, stored_ring=None, stored_copy_heads=0.0)  # every random head scores above 0
        asked = replace(method, copy_heads=0.0, rank="shares", layer_budgets="uniform", kernel_size=7)
    stored = prefill_cache(model, [doc], method)
    assert stored.method == asked
    explicit = prepare(model, [doc], 0, asked, None)
    prefill(model, explicit.ids, explicit.positions, explicit.cache, None)
    for got, want in zip(stored.layers, explicit.cache.layers):
        assert torch.equal(got.pos, want.pos) and torch.equal(got.k, want.k)
        if rule == "stored_ring":
            assert int(got.state["proximity"][0]) == 32 and asked.layout(len(doc)).proximity == 32
            ring = got.pos[0, :, 80 - 32:80]  # [Hkv, 32] the ring's slots hold the 32 newest tokens
            assert all(sorted(row.tolist()) == list(range(168, 200)) for row in ring)
        else:
            assert bool(got.state["copy_head"].all())
    plain = prepare(model, [doc], 0, method, None)
    prefill(model, plain.ids, plain.positions, plain.cache, None)
    assert plain.cache.method == method and "copy_head" not in plain.cache.layers[0].state
    # the prompt's layers share the budget by need, each with a ring of half its budget, not capped at 32
    rings = [int(layer.state["proximity"][0]) for layer in plain.cache.layers]
    assert rings == [int(layer.budget[0]) // 2 for layer in plain.cache.layers]
    if rule == "stored_ring":
        assert max(rings) > 32
    assert any(not torch.equal(a.pos, b.pos) for a, b in zip(plain.cache.layers, stored.layers))


@pytest.mark.parametrize("name", ["kvmerger", "zigzag"])
def test_kvmerger_and_zigzag_store_a_document_with_compactors_rank(models, name):
    """`prefill_cache` with KVMerger or ZigZagKV keeps what an explicit prefill with their stored rule keeps (heavy
    hitters, or every layer's tokens, by Compactor's score; KVMerger's recent window of `stored_recent` and its
    merged slots' counts by `stored_merged_count`), which is not what the prompt rule keeps."""
    from kvzoo.cache.kvmerger import KVMerger
    from kvzoo.cache.zigzag import ZigZagKV
    from kvzoo.generate import prefill, prefill_cache, prepare

    model = models("llama-gqa")
    doc = [(7 * i + 3) % 120 + 1 for i in range(200)]
    method = KVMerger(budget=80) if name == "kvmerger" else ZigZagKV(budget=60, window_size=8)
    asked = (KVMerger(budget=80, rank="compactor", recent_tokens=32, heavy_ratio=0.66, merged_count="attention",
                      layer_budgets="uniform")
             if name == "kvmerger" else ZigZagKV(budget=60, window_size=8, rank="compactor"))
    stored = prefill_cache(model, [doc], method)
    assert stored.method == asked
    caches = []
    for setting in (asked, method):
        request = prepare(model, [doc], 0, setting, None)
        prefill(model, request.ids, request.positions, request.cache, None)
        caches.append(request.cache)
    for got, want in zip(stored.layers, caches[0].layers):
        assert torch.equal(got.pos, want.pos) and torch.equal(got.k, want.k) and torch.equal(got.logw, want.logw)
        newest = 32 if name == "kvmerger" else 8  # the recent window, or ZigZagKV's observation window
        assert set(range(200 - newest, 200)) <= set(got.pos[0, 0].tolist())
    assert any(not torch.equal(a.pos, b.pos) for a, b in zip(caches[1].layers, stored.layers))


def test_for_stored_document_changes_zsmerge_kvmerger_and_zigzag_only():
    from kvzoo.cache.h2o import H2O
    from kvzoo.cache.kvmerger import KVMerger
    from kvzoo.cache.snapkv import SnapKV
    from kvzoo.cache.zigzag import ZigZagKV

    assert ZigZagKV().for_stored_document() == ZigZagKV(rank="compactor")
    assert ZigZagKV(stored_rank="window").for_stored_document() == ZigZagKV(stored_rank="window", rank="window")
    # a stored document's merged slots (`stored_merged_count`), in uniform layers (`layer_budgets`)
    by_attention = {"merged_count": "attention", "layer_budgets": "uniform"}
    # Compactor's rank, a window of `stored_recent`, `stored_verbatim` of the budget verbatim (0.34 + 0.66)
    stored = {"rank": "compactor", "heavy_ratio": 0.66}
    assert KVMerger().for_stored_document() == KVMerger(recent_tokens=32, **stored, **by_attention)
    assert KVMerger(stored_recent=8).for_stored_document() == KVMerger(stored_recent=8, recent_tokens=8, **stored,
                                                                       **by_attention)
    assert KVMerger(stored_verbatim=0.8).for_stored_document() == KVMerger(
        stored_verbatim=0.8, recent_tokens=32, rank="compactor", heavy_ratio=0.46, **by_attention)
    assert KVMerger(stored_recent=None).for_stored_document() == KVMerger(stored_recent=None, **by_attention)
    assert KVMerger(stored_merged_count=None).for_stored_document() == KVMerger(
        stored_merged_count=None, recent_tokens=32, layer_budgets="uniform", **stored)
    for method in (H2O(), SnapKV(), ZigZagKV.paper(), ZigZagKV(stored_rank=None), ZigZagKV(cross_layer=True),
                   KVMerger.paper(), KVMerger(stored_recent=None, stored_merged_count=None, layer_budgets="uniform"),
                   ZSMerge.paper(),
                   ZSMerge(copy_heads=0.5, layer_budgets="uniform"), ZSMerge(stored_ring=None, stored_copy_heads=None),
                   ZSMerge(cross_layer=True, rank="window"),
                   ZSMerge(proximity=0.1, context_rank="compactor", rank="window", layer_budgets="uniform")):
        assert method.for_stored_document() is method
    # what a stored document keeps (`for_stored_document`): uniform layers, the window pooled over 7 positions
    uniform = {"layer_budgets": "uniform", "kernel_size": 7}
    assert ZSMerge().for_stored_document() == ZSMerge(proximity_cap=32, context_rank="compactor", rank="window",
                                                      accumulated="sum", **uniform)
    assert ZSMerge(stored_ring=None).for_stored_document() == ZSMerge(stored_ring=None, copy_heads=0.3, rank="shares",
                                                                      **uniform)
    assert ZSMerge(stored_ring=None, rank="window").for_stored_document() == ZSMerge(stored_ring=None, copy_heads=0.3,
                                                                                     rank="window", **uniform)
    # Compactor's context rank takes no leverage term, nor a document fed in chunks: then the copy heads
    assert ZSMerge(leverage=1.0).for_stored_document() == ZSMerge(leverage=1.0, copy_heads=0.3, rank="shares",
                                                                  **uniform)
    rate = ZSMerge(accumulated="rate").for_stored_document()  # Compactor ranks a stored document's context
    assert rate.context_rank == "compactor" and rate.accumulated == "sum"
    assert ZSMerge().for_stored_document(chunked=True) == ZSMerge(copy_heads=0.3, rank="shares", **uniform)
    # stored_kernel_size=None: the prompt's pooling
    assert ZSMerge(stored_kernel_size=None).for_stored_document().kernel_size == ZSMerge().kernel_size == 9
    # Compactor's score is of one chunk: a document fed in chunks keeps the prompt's rank and window
    assert KVMerger().for_stored_document(chunked=True) == KVMerger(**by_attention)


def test_a_stored_document_fed_in_chunks_gets_the_copy_heads_and_answers(models):
    model = models("llama-gqa")
    doc = [(7 * i + 3) % 120 + 1 for i in range(200)]
    method = ZSMerge(budget=80)
    cache = model.prefill(doc, compression=method, prefill_chunk=64)
    assert cache.method == ZSMerge(budget=80, copy_heads=0.3, rank="shares", layer_budgets="uniform", kernel_size=7)
    out = model.generate_ids([9, 8, 7], max_new_tokens=2, eos_token_ids=[], cache=cache, compression=method)
    assert len(out.token_ids[0]) == 2


def test_proximity_cap_bounds_the_ring_and_never_raises_the_budget():
    assert ZSMerge(budget=200, proximity_cap=32).layout(1000).proximity == 32
    assert ZSMerge(budget=40, proximity_cap=32).layout(1000).proximity == 20  # half the budget is below the cap
    small = ZSMerge(budget=6, proximity_cap=2).layout(1000)
    assert (small.budget, small.proximity) == (6, 2)
    with pytest.raises(KvzooError, match="proximity_cap must be None or an integer >= 2"):
        ZSMerge(proximity_cap=1)
    with pytest.raises(KvzooError, match="stored_ring must be None or an integer >= 2"):
        ZSMerge(stored_ring=0.5)
