"""The tests every compression method must pass, driven by the one list of tests/method_cases.py (kvzoo/cache/METHODS.md
section 5), on every family layout including Falcon with plain multi-head attention:

1. a budget covering prompt + generated tokens gives FullCache's logits and greedy tokens (left-padded batch);
2. with a compressing budget, a left-padded batch gives each prompt what it gets alone (same kept positions,
   logits and tokens);
3. memory: the cache's bytes are fixed before the first decode step; constant-memory methods' bytes do not
   depend on how many tokens will be generated, prefill-only ones grow with max_new_tokens.
"""

from __future__ import annotations

import pytest
import torch

from kvzoo.cache import FullCache
from tests.method_cases import METHOD_CASES
from tests.method_helpers import drive_model, random_prompt

LAYOUTS = ["llama-gqa", "mistral-window", "falcon-7b-style", "falcon-40b-style", "falcon-mha"]
TOL = 1e-5  # fp32 logits: the same math, different summation order (observed ~1e-7)

pytestmark = pytest.mark.usefixtures("one_thread")


PARITY_LENS = (13, 6, 9)
PARITY_STEPS = 8


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", METHOD_CASES, ids=repr)
def test_budget_covering_everything_equals_full_cache(models, case, layout):
    """Section 5: budget >= prompt + generated => full attention. The int budget is exactly the longest
    prompt + generated tokens, so that cache fills at the last step. Every step's logits equal FullCache's
    (<= 1e-5), the greedy tokens are identical (manual drive and `generate_ids`), and every slot stands for
    one token (nothing merged)."""
    model = models(layout)
    prompts = [random_prompt(n, i) for i, n in enumerate(PARITY_LENS)]
    budget = max(PARITY_LENS) + PARITY_STEPS
    full = drive_model(model, prompts, FullCache(), PARITY_STEPS)
    got = drive_model(model, prompts, case.make(budget), PARITY_STEPS)
    for step, (a, b) in enumerate(zip(got.logits, full.logits)):
        err = (a - b).abs().max().item()
        assert err <= TOL, f"step {step}: logits differ from FullCache's by {err}"
    assert got.tokens == full.tokens
    for layer in got.cache.layers:
        counts = layer.logw[torch.isfinite(layer.logw)].exp()
        torch.testing.assert_close(counts, torch.ones_like(counts))
    generated = model.generate_ids(prompts, max_new_tokens=PARITY_STEPS + 1, eos_token_ids=[],
                                   compression=case.make(budget))
    assert generated.token_ids == full.tokens


BATCH_LENS = (66, 80, 97)  # half of the shortest still holds SnapKV's default observation window (32)


@pytest.mark.parametrize("layout", ["llama-gqa", "mistral-window", "falcon-mha"])
@pytest.mark.parametrize("case", METHOD_CASES, ids=repr)
def test_batch_equals_each_prompt_alone(models, case, layout):
    """Section 5 with a compressing budget (0.5 of each prompt): a left-padded batch keeps the same positions
    as each prompt alone at every step, with the same logits (<= 1e-5) and greedy tokens."""
    model = models(layout)
    prompts = [random_prompt(n, 50 + i) for i, n in enumerate(BATCH_LENS)]
    steps = 8
    batch = drive_model(model, prompts, case.make(0.5), steps)
    for b, p in enumerate(prompts):
        alone = drive_model(model, [p], case.make(0.5), steps)
        for si, (snap_b, snap_1) in enumerate(zip(batch.snapshots, alone.snapshots)):
            for layer in range(model.config.num_layers):
                for h in range(model.config.num_kv_heads):
                    got, want = set(snap_b.kept(layer, b, h)), set(snap_1.kept(layer, 0, h))
                    assert got == want, f"sequence {b}, snapshot {si}, layer {layer}, head {h}"
        for step, (lb, l1) in enumerate(zip(batch.logits, alone.logits)):
            assert (lb[b] - l1[0]).abs().max() <= TOL, f"sequence {b}, step {step}"
        assert batch.tokens[b] == alone.tokens[0]


@pytest.mark.parametrize("case", METHOD_CASES, ids=repr)
def test_memory_is_fixed_before_decoding(models, case):
    """Bytes held by the cache never change while decoding; for the constant-memory methods they do not even
    depend on how many tokens will be generated, for the prefill-only ones they grow with max_new_tokens."""
    model = models("mistral-window")
    prompts = [random_prompt(70, 80), random_prompt(66, 81)]
    trace = drive_model(model, prompts, case.make(0.5), 10)
    assert len({s.nbytes for s in trace.snapshots}) == 1
    assert trace.snapshots[0].nbytes == trace.cache.nbytes()

    def nbytes(new_tokens: int) -> int:
        out = model.generate_ids(prompts, max_new_tokens=new_tokens, eos_token_ids=[], compression=case.make(0.5))
        return out.cache.nbytes()

    if case.constant_memory:
        assert nbytes(1) == nbytes(10) == nbytes(40)
    else:
        assert nbytes(1) < nbytes(10) < nbytes(40)


@pytest.mark.parametrize("case", METHOD_CASES, ids=repr)
def test_the_compressed_cache_is_known_before_the_prompt(models, case):
    """make_cache(compressed=True), what `kvzoo info` reports without a prompt, holds the bytes a generation's
    cache holds once prefill is over, also for the methods that allocate from the whole prompt."""
    model = models("mistral-window")
    for n, new_tokens in ((70, 10), (97, 1)):
        out = model.generate_ids([random_prompt(n, 82)], max_new_tokens=new_tokens, eos_token_ids=[],
                                 compression=case.make(0.5))
        known = case.make(0.5).make_cache(model.config, [n], new_tokens, torch.float32, "meta", compressed=True)
        assert known.nbytes() == out.cache.nbytes(), (n, new_tokens)
