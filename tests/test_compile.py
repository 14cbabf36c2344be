"""The compiled decode step: one compiled decoder block for every layer, step, prompt length and store size,
slot writes in place, and the same logits and cache contents as eager."""

from __future__ import annotations

import re

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import kvzoo
from kvzoo.cache.slots import KVCache
from kvzoo.generate import left_pad, make_decode_step, prepare_decode

# fp32 on the same CPU: inductor may fuse/reorder reductions, so allow ~1e-5 relative differences.
TOL = dict(atol=1e-5, rtol=1e-5)


def _load(tmp_path_factory, name: str, **overrides):
    from tests.conftest import build_hf_model

    path = tmp_path_factory.mktemp(name)
    build_hf_model("llama-gqa", **overrides).save_pretrained(path)
    return kvzoo.load(path)


@pytest.fixture(scope="module")
def one_layer_model(tmp_path_factory):
    return _load(tmp_path_factory, "one-layer", num_hidden_layers=1)


@pytest.fixture(scope="module")
def two_layer_model(tmp_path_factory):
    return _load(tmp_path_factory, "two-layer")  # 2 layers, 4 query heads, 2 KV heads, head_dim 16


def _prefilled(model, method, prompts: list[list[int]], steps: int, compile: bool) -> KVCache:
    ids, positions = left_pad(prompts, 0, torch.device("cpu"))
    lens = [len(p) for p in prompts]
    cache = method.make_cache(model.config, lens, steps, torch.float32, "cpu")
    with torch.inference_mode():
        model(ids, positions, cache=cache, last_only=True)
    cache.end_prefill()
    prepare_decode(model, cache, max(lens) + steps, compile)
    return cache


def _stores(cache: KVCache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.k, layer.v, layer.logw, layer.score, layer.pos)]


@pytest.fixture
def fresh_compile():
    """Graphs counted from zero, and compiled for real (no FX graph / AOT cache hit) so that the generated
    code can be inspected."""
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


# Every compression method is compiled through generate_ids in tests/test_compile_methods.py; here the full
# cache (which that file leaves out) and ZSMerge with a 3-slot ring and 2 residual slots, so that merges into
# occupied residual slots happen within the 12 steps.
@pytest.mark.parametrize(
    "method", [kvzoo.FullCache(), kvzoo.ZSMerge(budget=10, proximity=3, residual=2)],
    ids=lambda m: type(m).__name__,
)
def test_compiled_decode_step_equals_eager(one_layer_model, method):
    model = one_layer_model
    prompts = [list(range(5, 27)), [7, 8, 9, 10, 11, 12, 13]]
    steps = 12  # enough to fill and then compress the 10-slot caches
    eager_cache = _prefilled(model, method, prompts, steps, compile=False)
    compiled_cache = _prefilled(model, method, prompts, steps, compile=True)
    eager_step = make_decode_step(model, compile=False)
    compiled_step = make_decode_step(model, compile=True)
    tokens = torch.tensor([[3], [4]])
    pos = torch.tensor([len(p) for p in prompts])[:, None]
    with torch.inference_mode():
        for i in range(steps):
            eager = eager_step(tokens, pos + i, eager_cache)
            compiled = compiled_step(tokens, pos + i, compiled_cache)
            torch.testing.assert_close(compiled, eager, **TOL, msg=f"logits at step {i}")
            tokens = eager.argmax(-1, keepdim=True)
    for a, b in zip(_stores(eager_cache), _stores(compiled_cache)):
        torch.testing.assert_close(b, a, **TOL)


def test_one_graph_for_every_layer_and_step_with_stores_written_in_place(two_layer_model, fresh_compile):
    """ZSMerge over 64 decode steps of a 2-layer model: the stores start with free context slots, fill up
    during decoding (so merging starts mid-run), and a second request with another prompt length (another
    capacity) runs through the same compiled block: exactly one graph in all."""
    model = two_layer_model
    method = kvzoo.ZSMerge(budget=24, proximity=6, residual=2)
    prompts = [list(range(5, 19)), list(range(30, 39))]  # 14 and 9 tokens: budget 24 fills while decoding
    steps = 64
    eager_cache = _prefilled(model, method, prompts, steps, compile=False)
    cache = _prefilled(model, method, prompts, steps, compile=True)
    stores_before = _stores(cache)
    pointers = [t.data_ptr() for t in stores_before]
    eager_step, compiled_step = make_decode_step(model, False), make_decode_step(model, True)
    tokens = torch.tensor([[3], [4]])
    pos = torch.tensor([len(p) for p in prompts])[:, None]
    filled = []
    with torch.inference_mode():
        for i in range(steps):
            eager = eager_step(tokens, pos + i, eager_cache)
            if i == 0:
                compiled, code = run_and_get_code(compiled_step, tokens, pos + i, cache)
            else:
                compiled = compiled_step(tokens, pos + i, cache)
            torch.testing.assert_close(compiled, eager, **TOL, msg=f"logits at step {i}")
            filled.append(int(cache.layers[0].filled.sum()))
            tokens = eager.argmax(-1, keepdim=True)
    assert counters["stats"]["unique_graphs"] == 1
    # The store became full during the run (the step where merging starts is inside the one graph).
    full = 2 * 2 * 24  # batch x KV heads x budget
    assert filled[0] < full and filled[-1] == full, filled

    # Same tensors before and after, and written: contents equal eager's, which moved on from the prefill.
    assert all(a is b for a, b in zip(stores_before, _stores(cache)))
    assert pointers == [t.data_ptr() for t in _stores(cache)]
    for a, b in zip(_stores(eager_cache), _stores(cache)):
        torch.testing.assert_close(b, a, **TOL)
    assert bool((cache.layers[1].pos >= min(len(p) for p in prompts)).any())  # generated tokens are in

    # No buffer shaped like a key/value store [B, Hkv, C, D] in the generated code: inductor did not copy
    # a store to write one slot (a functionalized scatter would allocate one and copy it back).
    store_shaped = re.compile(r"empty_strided_cpu\(\(2, 2, s\w+, 16\)")
    assert code and not any(store_shaped.search(c) for c in code)

    # Another prompt length = another capacity: still the same graph (only `slots.budget` reaches decode).
    method = kvzoo.ZSMerge(budget=0.5, proximity=6, residual=2)
    other = _prefilled(model, method, [list(range(40, 71))], 4, compile=True)
    with torch.inference_mode():
        for i in range(4):
            compiled_step(torch.tensor([[5]]), torch.tensor([[31 + i]]), other)
    assert counters["stats"]["unique_graphs"] == 2  # batch 1 vs 2 is a new static shape, capacity is not
    another = _prefilled(model, method, [list(range(40, 60))], 4, compile=True)
    with torch.inference_mode():
        compiled_step(torch.tensor([[5]]), torch.tensor([[20]]), another)
    assert another.layers[0].capacity != other.layers[0].capacity
    assert counters["stats"]["unique_graphs"] == 2


def test_layers_of_different_capacity_share_the_graph(two_layer_model, fresh_compile):
    """PyramidKV gives each layer its own budget, hence its own store capacity; one graph serves both."""
    model = two_layer_model
    method = kvzoo.PyramidKV(budget=12, window_size=2, kernel_size=1)
    prompts = [list(range(3, 43))]
    eager_cache = _prefilled(model, method, prompts, 8, compile=False)
    cache = _prefilled(model, method, prompts, 8, compile=True)
    assert cache.layers[0].capacity != cache.layers[1].capacity
    eager_step, compiled_step = make_decode_step(model, False), make_decode_step(model, True)
    tokens = torch.tensor([[3]])
    with torch.inference_mode():
        for i in range(8):
            eager = eager_step(tokens, torch.tensor([[40 + i]]), eager_cache)
            compiled = compiled_step(tokens, torch.tensor([[40 + i]]), cache)
            torch.testing.assert_close(compiled, eager, **TOL, msg=f"logits at step {i}")
            tokens = eager.argmax(-1, keepdim=True)
    assert counters["stats"]["unique_graphs"] == 1
