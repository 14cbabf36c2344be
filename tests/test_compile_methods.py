"""Compiled decoding equals eager through the public `generate_ids(compile=True)`, for every method of
tests/method_cases.py, on every family layout: Llama (GQA), Mistral with a sliding window of 5 (shorter than
the prompts, so the window masks cache slots), Falcon-7B (multi-query, parallel attention) and Falcon-40B
(grouped KV, new decoder architecture). One-layer tiny models; prompts of 30 and 18 tokens (left padding)
with a budget of 10 slots, and 12 new tokens, so constant-memory methods evict/merge at every step.

torch.compile costs seconds per (model, method) even for one layer, so the default run compiles 6 cases:
the four decode-time methods and two of the prefill-only ones (which all decode with the same append step),
each layout at least once; `pytest -m slow` runs the whole matrix (4 layouts x 9 methods, FullCache
included).
Compiled and eager must give the same greedy tokens and the same final cache contents (fp32 on the same
CPU: inductor may fuse or reorder reductions, so ~1e-5 relative differences are allowed).
"""

from __future__ import annotations

import pytest
import torch

import kvzoo
from kvzoo.cache.full import FullCache
from tests.conftest import build_hf_model
from tests.method_cases import METHOD_CASES

TOL = dict(atol=1e-5, rtol=1e-5)
LAYOUTS = ["llama-gqa", "mistral-window", "falcon-7b-style", "falcon-40b-style"]
CASES = [("FullCache", lambda b: FullCache())] + [(c.name, c.make) for c in METHOD_CASES]
# The default run: every decode-time method and two prefill-only ones (they all decode with the same append
# step), every layout at least once; FullCache is compiled in test_compile.py.
FAST = {
    ("llama-gqa", "StreamingLLM"), ("mistral-window", "ZSMerge"), ("mistral-window", "SnapKV"),
    ("falcon-7b-style", "TOVA"), ("falcon-40b-style", "H2O"), ("falcon-40b-style", "KVMerger"),
}


def _params() -> list:
    params = []
    for layout in LAYOUTS:
        for name, make in CASES:
            marks = [] if (layout, name) in FAST else [pytest.mark.slow]
            params.append(pytest.param(layout, make, id=f"{layout}-{name}", marks=marks))
    return params


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    loaded = {}

    def get(layout: str):
        if layout not in loaded:
            path = tmp_path_factory.mktemp(layout)
            build_hf_model(layout, num_hidden_layers=1).save_pretrained(path)
            loaded[layout] = kvzoo.load(path)
        return loaded[layout]

    return get


@pytest.mark.parametrize("layout, make", _params())
def test_compiled_generation_equals_eager(one_layer, layout, make):
    model = one_layer(layout)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (30, 18)]
    # A fresh dynamo state per case: past its recompile limit dynamo would silently run the step eagerly.
    torch._dynamo.reset()
    kwargs = dict(max_new_tokens=12, eos_token_ids=[], compression=make(10))
    eager = model.generate_ids(prompts, compile=False, **kwargs)
    compiled = model.generate_ids(prompts, compile=True, **kwargs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert compiled.token_ids == eager.token_ids
    for layer, (a, b) in enumerate(zip(eager.cache.layers, compiled.cache.layers)):
        for name in ("k", "v", "logw", "score", "pos", "budget"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), **TOL, msg=f"layer {layer} {name}")
