"""The budget rule (kvzoo.cache.budgets.resolve_budget) for every method and every prompt length: no error for a
valid spec, single prompts and batches mixing short and long prompts, decoding past the budget, and the cache
holding exactly the documented number of slots.

The documented size is recomputed here from the README's statement of the rule and each method's minimum
layout as its docstring states it (MINIMUM below), not from the library's own budget code:
    slots = max(ratio * prompt_len (at least 1) or the integer budget, minimum layout),
    at most the prompt for prefill-only methods; decode-time methods keep this constant size (ZSMerge's layers
    share L times it by need, each at least its minimum layout).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvzoo
from kvzoo.cache.registry import parse_compression
from tests.conftest import build_hf_model

NUM_LAYERS = 4
# Minimum layout of each method with its defaults (from the docstrings): window_size for the window methods,
# sinks + 1 for StreamingLLM, proximity 2 + residual 1 + one context slot for ZSMerge.
MINIMUM = {"full": 0, "streamingllm": 5, "h2o": 1, "tova": 1, "zsmerge": 4, "snapkv": 32, "pyramidkv": 8,
           "zigzag": 32, "kvmerger": 1, "compactor": 12}
DECODE_TIME = ("streamingllm", "h2o", "tova", "zsmerge")
PREFILL_ONLY = ("snapkv", "pyramidkv", "zigzag", "kvmerger", "compactor")
RATIOS = (0.01, 0.05, 0.2, 0.5, 0.99)
INTEGERS = (1, 2, 4, 5, 8, 16, 40)
LENGTHS = (1, 2, 3, 7, 33, 60)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("budget-rule")
    build_hf_model("llama-gqa", num_hidden_layers=NUM_LAYERS).save_pretrained(path)
    torch.set_num_threads(1)
    return kvzoo.load(path)


def documented_slots(name: str, budget: float | int, n: int) -> int:
    """Slots per KV head kept from an n-token prompt (average over layers), as the README states the rule."""
    if name == "full":
        return n
    resolved = max(1, int(budget * n)) if isinstance(budget, float) else budget
    slots = max(resolved, MINIMUM[name])
    return min(slots, n) if name in PREFILL_ONLY else slots


def spec(name: str, budget: float | int) -> str:
    return name if name == "full" else f"{name}:budget={budget}"


def check_cache(name: str, budget: float | int, lens: list[int], steps: int, cache) -> None:
    """Slots filled per (layer, sequence, KV head) after `steps` generated tokens (steps - 1 fed back)."""
    fed = steps - 1
    filled = torch.stack([torch.isfinite(layer.logw).sum(-1) for layer in cache.layers])  # [L, B, Hkv]
    for b, n in enumerate(lens):
        want = documented_slots(name, budget, n)
        got = filled[:, b]  # [L, Hkv]
        if name == "full":
            assert (got == n + fed).all(), (name, n, got)
        elif name in ("streamingllm", "h2o", "tova"):
            assert (got == min(want, n + fed)).all(), (name, budget, n, want, got)
        elif name == "zsmerge":  # merges keep every token's weight: sum of w = tokens seen
            # the layers share L * want by need (each at least the minimum layout; each want when the prompt
            # fits), or keep want each (a prompt in chunks)
            layer_budget = cache.budgets()[:, b, None]  # [L, 1]
            assert int(layer_budget.sum()) == NUM_LAYERS * want and (layer_budget >= MINIMUM[name]).all(), \
                (name, budget, n, want, layer_budget)
            if n <= want:
                assert (layer_budget == want).all(), (name, budget, n, want, layer_budget)
            assert (got <= layer_budget).all() and (got >= torch.clamp(layer_budget, max=n + fed) - 1).all(), \
                (name, budget, n, layer_budget, got)
            weight = torch.stack([layer.logw[b].exp().sum(-1) for layer in cache.layers])  # [L, Hkv]
            assert torch.allclose(weight, torch.full_like(weight, n + fed)), (name, budget, n, weight)
        else:
            prefill_kept = got - fed  # prefill-only methods append every generated token (no decode_cap)
            if name == "snapkv":
                assert (prefill_kept == want).all(), (name, budget, n, want, got)
            elif name in ("zigzag", "kvmerger"):  # layers share exactly L * B_avg by need, each between its floor
                # (ZigZagKV's window, KVMerger's one slot) and the prompt; a KVMerger prompt in chunks: B_avg each
                assert (prefill_kept.sum(0) == NUM_LAYERS * want).all(), (name, budget, n, want, got)
                assert (prefill_kept <= n).all() and (prefill_kept >= min(8 if name == "zigzag" else 1, n)).all()
            else:  # pyramidkv: the mean is the budget up to rounding each layer (at most 1/2 per layer)
                assert ((prefill_kept.sum(0) - NUM_LAYERS * want).abs() <= NUM_LAYERS / 2).all(), (budget, n, got)
                assert (prefill_kept <= n).all()


def run(model, name: str, budget: float | int, lens: list[int], steps: int, chunk: int | None):
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lens]
    method = parse_compression(spec(name, budget))
    if chunk is not None and not method.supports_chunked_prefill:
        chunk = None
    out = model.generate_ids(prompts, max_new_tokens=steps, eos_token_ids=[], compression=method,
                             prefill_chunk=chunk)
    assert [len(t) for t in out.token_ids] == [steps] * len(lens)
    check_cache(name, budget, lens, steps, out.cache)


@pytest.mark.parametrize("name", list(MINIMUM))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lens=st.lists(st.sampled_from(LENGTHS), min_size=1, max_size=3),
    ratio=st.sampled_from(RATIOS),
    steps=st.integers(1, 12),
    chunk=st.sampled_from([None, 2, 5]),
)
def test_every_ratio_works_for_every_prompt_length(model, name, lens, ratio, steps, chunk):
    run(model, name, ratio, lens, steps, chunk)


@pytest.mark.parametrize("name", list(MINIMUM))
@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_shortest_prompts_alone_and_in_a_batch_with_a_long_one(model, name, n):
    """Prompts of 1..3 tokens, decoding well past every budget, alone and next to a 60-token prompt."""
    for ratio in (0.01, 0.5):
        run(model, name, ratio, [n], 10, None)
        run(model, name, ratio, [60, n], 10, None)


@pytest.mark.parametrize("name", [n for n in MINIMUM if n != "full"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lens=st.lists(st.sampled_from(LENGTHS), min_size=1, max_size=3), budget=st.sampled_from(INTEGERS),
       steps=st.integers(1, 12))
def test_every_integer_budget_works_for_every_prompt_length(model, name, lens, budget, steps):
    """Integers below the minimum layout (e.g. snapkv:budget=4 with its 32-token window) are raised to it."""
    run(model, name, budget, lens, steps, None)


def test_documented_sizes_spot_checks():
    """The rule as the README states it, on a few hand-computed cases (guards `documented_slots` itself)."""
    assert documented_slots("zsmerge", 0.05, 2) == 4  # 1 slot raised to the 4-slot layout
    assert documented_slots("snapkv", 0.1, 3) == 3  # window 32, capped at the 3-token prompt
    assert documented_slots("snapkv", 0.1, 400) == 40
    assert documented_slots("streamingllm", 0.5, 3) == 5  # sinks 4 + 1, larger than the prompt
    assert documented_slots("h2o", 0.2, 1) == 1
    assert documented_slots("snapkv", 4, 100) == 32 and documented_slots("zsmerge", 2, 100) == 4
    assert math.isclose(documented_slots("pyramidkv", 0.2, 60), 12)
