"""Stacked stores and the layer-batched decode update (kvzoo.cache.slots.SlotStack): eager decode of a row-wise
method runs its update once per step over every layer's store, after the last layer's attention. It must give
exactly what updating each layer right after its own attention gives, and fall back to that wherever the
layers are not one allocation any more."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from kvzoo.cache import KVMerger, SnapKV, ZSMerge
from kvzoo.cache.slots import KVCache
from tests.method_cases import DECODE_TIME, MethodCase
from tests.method_helpers import drive_model

TOL = 1e-5  # fp32 logits: the same arithmetic, batched over layers (observed equal)
PROMPTS = [[5, 9, 3, 7, 1, 8, 2, 6, 4, 11, 12, 13, 14], [3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8, 1, 8, 2]]
STEPS = 12

# Every decode-time method, and prefill-only ones whose capped decode evicts (attend-then-fold): SnapKV, and
# KVMerger, whose per-sequence state (which layers merge) must not keep its layers from being batched.
CASES = [*DECODE_TIME, MethodCase("SnapKV-capped", lambda b: SnapKV(budget=b, window_size=2, decode_cap=3), False),
         MethodCase("KVMerger-capped", lambda b: KVMerger(budget=b, decode_cap=3, layer_budgets="uniform"), False)]


def _recorded_layers(method, monkeypatch) -> list[int]:
    """Record the layer_idx of every decode_step call of `method` (-1: all layers at once)."""
    calls: list[int] = []
    step = method.decode_step

    def record(layer_idx, *args):
        calls.append(layer_idx)
        return step(layer_idx, *args)

    monkeypatch.setattr(method, "decode_step", record)
    return calls


def _stacked_and_per_layer(model, method, monkeypatch, prompts=PROMPTS):
    """The traces of `method` decoding `prompts` with the layers' updates batched, then one update per layer
    (as if the layers were separate stores), after checking that each path was the one taken."""
    layers = model.config.num_layers
    calls = _recorded_layers(method, monkeypatch)
    stacked = drive_model(model, prompts, method, STEPS)
    decode_calls = calls[-STEPS:]
    assert decode_calls == [-1] * STEPS, "the eager decode did not batch the layers' updates"
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(KVCache, "stacked_groups", lambda self, *_: None)  # as if the layers were separate stores
        per_layer = drive_model(model, prompts, method, STEPS)
    assert calls[-STEPS * layers:] == list(range(layers)) * STEPS
    return stacked, per_layer


def _assert_same_trace(stacked, per_layer) -> None:
    for step, (a, b) in enumerate(zip(stacked.snapshots, per_layer.snapshots)):
        for layer, (mine, theirs) in enumerate(zip(a.layers, b.layers)):
            for name in ("pos", "logw", "budget"):
                assert torch.equal(mine[name], theirs[name]), f"step {step}, layer {layer}: {name}"
            for name in ("k", "v", "score"):
                torch.testing.assert_close(mine[name], theirs[name], atol=TOL, rtol=TOL)
    for a, b in zip(stacked.logits, per_layer.logits):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
    assert stacked.tokens == per_layer.tokens


@pytest.mark.parametrize("layout", ["llama-gqa", "falcon-mha"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_the_layer_batched_update_equals_one_update_per_layer(models, case, layout, monkeypatch):
    _assert_same_trace(*_stacked_and_per_layer(models(layout), case.make(0.5), monkeypatch))


def test_the_layer_batched_update_reads_zsmerges_lapsing_standing(models, monkeypatch):
    """ZSMerge's decode step reads per-slot state, the standing it lets lapse (`decode_slot_state`), which the
    stacked view copies in: batched, it keeps what one update per layer keeps, on prompts where the lapsing
    standing changes what is kept (against standing_half_life=0). The tiny model's attention is sharpened
    (query, key and value projections x 8), so that its last queries read a few tokens, as a trained model's
    do; its near-uniform attention gives no token a standing above its accumulated attention."""
    model = copy.deepcopy(models("llama-gqa"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight.mul_(8.0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 60, (n,), generator=g).tolist() for n in (24, 20)]
    method = ZSMerge(budget=0.5, standing_half_life=4.0)
    stacked, per_layer = _stacked_and_per_layer(model, method, monkeypatch, prompts)
    _assert_same_trace(stacked, per_layer)
    without = drive_model(model, prompts, replace(method, standing_half_life=0.0), STEPS)
    assert any(not torch.equal(mine["pos"], theirs["pos"]) for a, b in zip(stacked.snapshots, without.snapshots)
               for mine, theirs in zip(a.layers, b.layers)), "the standing changed no decode step's choice here"


def test_stacked_layers_are_rows_of_one_allocation(models):
    model = models("llama-gqa")
    method = DECODE_TIME[0].make(0.5)
    cache = method.make_cache(model.config, [13, 6], 4, torch.float32, "cpu")
    assert cache.is_stacked()
    [(layer_ids, whole)] = cache.stacked_groups()
    assert layer_ids == tuple(range(len(cache.layers)))
    assert whole is not None
    b = 2
    for i, layer in enumerate(cache.layers):
        layer.k[1, 0, 2, 3] = 100.0 + i  # a write to a layer is a write to its rows of the stack
        assert whole.k[i * b + 1, 0, 2, 3] == 100.0 + i
        assert torch.equal(whole.budget[i * b:(i + 1) * b], layer.budget)
        assert torch.equal(whole.state["prompt_len"][i * b:(i + 1) * b], layer.state["prompt_len"])


def test_a_fork_is_stacked_again_and_a_replaced_layer_falls_back(models):
    model = models("llama-gqa")
    cache = DECODE_TIME[0].make(0.5).make_cache(model.config, [13], 4, torch.float32, "cpu")
    cache.layers[1].k[0, 0, 0, 0] = 7.0
    fork = cache.fork(headroom=3, batch=2)
    [(_, whole)] = fork.stacked_groups()
    assert whole is not None and whole.k.shape[0] == 2 * model.config.num_layers
    assert whole.k.shape[2] == cache.layers[0].capacity + 3
    assert torch.equal(fork.layers[1].k[:, 0, 0, 0], torch.tensor([7.0, 7.0]))
    assert fork.stacks[0].k.data_ptr() != cache.stacks[0].k.data_ptr()  # its own copy

    fork.layers[0] = replace(fork.layers[0], k=fork.layers[0].k.clone())  # e.g. a method shrinking a layer
    assert fork.stacked_groups() is None and not fork.is_stacked()
    fork = cache.fork()
    fork.layers[0].state["shared"] = torch.tensor(True)  # 0-dim state cannot be split into rows
    assert fork.stacked_groups() is None


def test_layers_of_different_capacities_are_not_stacked(models):
    from kvzoo.cache import PyramidKV

    model = models("llama-gqa")
    cache = PyramidKV(budget=0.5, window_size=2).make_cache(model.config, [40], 4, torch.float32, "cpu")
    assert len({layer.capacity for layer in cache.layers}) > 1
    assert cache.stacks == [] and cache.stacked_groups() is None
    assert cache.fork().stacks == []


def test_stores_replaced_at_the_end_of_prefill_release_the_stack(models):
    """ZigZagKV shrinks every layer to its own budget at the end of prefill: the stack (the stores holding
    the whole prompt) must not outlive them, or the cache would keep the uncompressed prompt's memory."""
    import gc
    import weakref

    from kvzoo.cache import ZigZagKV
    from kvzoo.generate import prefill

    model = models("llama-gqa")
    cache = ZigZagKV(budget=0.3, window_size=2).make_cache(model.config, [40], 4, torch.float32, "cpu")
    assert cache.is_stacked() and cache.layers[0].capacity == 40 + 4
    whole = weakref.ref(cache.stacks[0].k)
    prompt = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        prefill(model, prompt, torch.arange(40)[None], cache)
    gc.collect()
    assert all(layer.capacity < 40 for layer in cache.layers)
    assert cache.stacks == [] and whole() is None
