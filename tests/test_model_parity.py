"""Logits and greedy tokens of kvzoo's models equal transformers' on tiny random checkpoints (fp32).

Tolerance 1e-4 absolute on logits of magnitude ~1: both sides compute the same fp32 math, differing only in
kernel choice and summation order (observed differences are ~1e-7).
"""

from __future__ import annotations

import pytest
import torch

import kvzoo
from tests.conftest import FAMILY_OF, TINY_CONFIGS

ATOL = 1e-4
NAMES = list(TINY_CONFIGS)


@pytest.mark.parametrize("name", NAMES)
def test_full_forward_matches_transformers(tiny_checkpoint, name):
    ref, path = tiny_checkpoint(name)
    model = kvzoo.load(path)
    assert type(model).__name__ == FAMILY_OF[TINY_CONFIGS[name][0]]
    ids = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    assert (got - expected).abs().max() <= ATOL


@pytest.mark.parametrize("name", NAMES)
def test_step_by_step_decoding_matches_full_forward(tiny_checkpoint, name):
    """Prefill 9 tokens into the cache, then decode one token at a time: each step's logits must equal
    transformers' logits at that position of one full forward pass."""
    ref, path = tiny_checkpoint(name)
    model = kvzoo.load(path)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(ids).logits[0]
        cache = kvzoo.FullCache().make_cache(model.config, [9], 11, torch.float32, "cpu")
        logits = model(ids[:, :9], cache=cache)[0]
        assert (logits - expected[:9]).abs().max() <= ATOL
        for t in range(9, 20):
            step = model(ids[:, t:t + 1], torch.tensor([[t]]), cache=cache, decode=True)[0, 0]
            assert (step - expected[t]).abs().max() <= ATOL, f"decode step at position {t}"


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches_transformers(tiny_checkpoint, name):
    ref, path = tiny_checkpoint(name)
    model = kvzoo.load(path)
    prompt = [5, 17, 33, 2, 90, 64, 7]
    expected = ref.generate(
        torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0,
        eos_token_id=None,
    )[0, len(prompt):].tolist()
    got = model.generate_ids(prompt, max_new_tokens=20, eos_token_ids=[]).token_ids[0]
    assert got == expected


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window", "falcon-7b-style", "falcon-40b-style"])
def test_batch_equals_each_prompt_alone(tiny_checkpoint, name):
    _, path = tiny_checkpoint(name)
    model = kvzoo.load(path)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4], [100, 101, 102, 103, 104]]
    alone = [model.generate_ids(p, max_new_tokens=12, eos_token_ids=[]).token_ids[0] for p in prompts]
    batch = model.generate_ids(prompts, max_new_tokens=12, eos_token_ids=[]).token_ids
    assert batch == alone


def test_chunked_prefill_with_full_cache_matches_one_shot(tiny_checkpoint):
    _, path = tiny_checkpoint("mistral-window")
    model = kvzoo.load(path)
    prompt = list(range(3, 40))
    one_shot = model.generate_ids(prompt, max_new_tokens=8, eos_token_ids=[]).token_ids
    chunked = model.generate_ids(prompt, max_new_tokens=8, eos_token_ids=[], prefill_chunk=6).token_ids
    assert chunked == one_shot


def test_linear_rope_scaling_matches_transformers(tmp_path):
    from tests.conftest import build_hf_model

    ref = build_hf_model("llama-gqa", rope_scaling={"rope_type": "linear", "factor": 2.0})
    ref.save_pretrained(tmp_path)
    model = kvzoo.Llama2.from_pretrained(tmp_path)
    assert model.config.rope_linear_factor == 2.0
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() <= ATOL
