"""The decode step is static-shaped and host-sync free: it compiles with torch.compile(fullgraph=True) and
gives the same logits and cache contents as eager, for FullCache, ZSMerge and H2O (1-layer tiny model)."""

from __future__ import annotations

import pytest
import torch

import kvzoo
from kvzoo.generate import left_pad, make_decode_step

# fp32 on the same CPU: inductor may fuse/reorder reductions, so allow ~1e-5 relative differences.
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def one_layer_model(tmp_path_factory):
    from tests.conftest import build_hf_model

    path = tmp_path_factory.mktemp("one-layer")
    build_hf_model("llama-gqa", num_hidden_layers=1).save_pretrained(path)
    return kvzoo.load(path)


@pytest.mark.parametrize(
    "method", [kvzoo.FullCache(), kvzoo.ZSMerge(budget=10, proximity=3, residual=2), kvzoo.H2O(budget=10)],
    ids=lambda m: type(m).__name__,
)
def test_compiled_decode_step_equals_eager(one_layer_model, method):
    model = one_layer_model
    prompts = [list(range(5, 27)), [7, 8, 9, 10, 11, 12, 13]]
    steps = 12  # enough to fill and then compress the 10-slot caches
    ids, positions = left_pad(prompts, 0, torch.device("cpu"))
    lens = [len(p) for p in prompts]
    caches = []
    for _ in range(2):
        cache = method.make_cache(model.config, lens, steps, torch.float32, "cpu")
        with torch.inference_mode():
            model(ids, positions, cache=cache, last_only=True)
        caches.append(cache)
    eager_step = make_decode_step(model, compile=False)
    compiled_step = make_decode_step(model, compile=True)
    tokens = torch.tensor([[3], [4]])
    pos = torch.tensor(lens)[:, None]
    with torch.inference_mode():
        for i in range(steps):
            eager = eager_step(tokens, pos + i, caches[0])
            compiled = compiled_step(tokens, pos + i, caches[1])
            torch.testing.assert_close(compiled, eager, **TOL, msg=f"logits at step {i}")
            tokens = eager.argmax(-1, keepdim=True)
    for a, b in zip(caches[0].layers[0].tensors(), caches[1].layers[0].tensors()):
        torch.testing.assert_close(b, a, **TOL)
