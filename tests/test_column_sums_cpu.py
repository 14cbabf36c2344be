"""The CPU fast path of the accumulated-attention statistic (kvzoo_kernels/column_sums_cpu.py) against its
specification, `weighted_column_sums_reference`, and the rule for when it may be taken.

Tolerance: both compute in fp32; the fast path gets each column sum as exp(logsumexp) instead of summing
softmax rows, so the two differ by float rounding of O(T) terms: 1e-4 relative, 1e-6 absolute."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvzoo.cache.chunk import make_prefill_chunk
from kvzoo_kernels.column_sums_cpu import causal_column_sums, fits_causal_fast_path
from kvzoo_kernels.window_scores import weighted_column_sums, weighted_column_sums_reference


def _prompt(b: int, hq: int, hkv: int, t: int, d: int, sharp: float, seed: int, dtype=torch.float32):  # noqa: ANN001, ANN202
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, t, d, generator=g) * sharp).to(dtype)
    k = (torch.randn(b, hkv, t, d, generator=g) * sharp).to(dtype)
    q_pos = torch.arange(t)[None].expand(b, t)
    return q, k, q_pos, q_pos[:, None, :].expand(b, hkv, t).contiguous(), torch.zeros(b, hkv, t)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 40), st.sampled_from([4, 16, 64]),
       st.sampled_from([0.3, 1.0, 3.0]), st.sampled_from(["ones", "decay", "window", "sparse"]), st.integers(0, 2**16))
def test_fast_path_equals_the_reference(b, hkv, groups, t, d, sharp, weighting, seed):
    """Every weighting the methods use: all ones (H2O, KVMerger), decayed (ZSMerge rank="accumulated"), the last
    few queries only (an observation window, zero weight elsewhere), and random zeros."""
    q, k, q_pos, key_pos, key_bias = _prompt(b, hkv * groups, hkv, t, d, sharp, seed)
    ages = torch.arange(t - 1, -1, -1, dtype=torch.float32)
    weights = {
        "ones": torch.ones(b, t),
        "decay": (0.9**ages)[None].expand(b, t),
        "window": (ages < 4).float()[None].expand(b, t),
        "sparse": (torch.rand(b, t, generator=torch.Generator().manual_seed(seed)) < 0.5).float(),
    }[weighting]
    assert fits_causal_fast_path(q, k, q_pos, key_pos, key_bias, None, weights)
    expected = weighted_column_sums_reference(q, k, q_pos, key_pos, key_bias, None, weights)
    torch.testing.assert_close(causal_column_sums(q, k, weights), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weighted_column_sums(q, k, q_pos, key_pos, key_bias, None, weights), expected,
                               rtol=1e-4, atol=1e-6)


def test_bf16_inputs_are_summed_in_fp32_like_the_reference():
    q, k, q_pos, key_pos, key_bias = _prompt(1, 6, 2, 33, 16, 1.0, 0, torch.bfloat16)
    weights = torch.ones(1, 33)
    expected = weighted_column_sums_reference(q, k, q_pos, key_pos, key_bias, None, weights)
    torch.testing.assert_close(causal_column_sums(q, k, weights), expected, rtol=1e-4, atol=1e-6)


def test_the_fast_path_is_only_taken_for_a_fresh_unpadded_causal_prompt():
    q, k, q_pos, key_pos, key_bias = _prompt(2, 4, 2, 12, 8, 1.0, 1)
    w = torch.ones(2, 12)
    assert fits_causal_fast_path(q, k, q_pos, key_pos, key_bias, None, w)
    assert not fits_causal_fast_path(q, k, q_pos, key_pos, key_bias, 6, w)  # a sliding window
    padded = q_pos.clone()
    padded[1, :3] = -1
    assert not fits_causal_fast_path(q, k, padded, padded[:, None].expand_as(key_pos), key_bias, None, w)
    biased = key_bias.clone()
    biased[0, 0, 2] = 1.0  # a merged slot's log w
    assert not fits_causal_fast_path(q, k, q_pos, key_pos, biased, None, w)
    slots = torch.cat([k[:, :, :2], k], dim=2)  # keys = [cache slots ; chunk]: later chunks
    slot_pos = torch.cat([key_pos[:, :, :2], key_pos + 2], dim=2)
    assert not fits_causal_fast_path(q, slots, q_pos + 2, slot_pos, torch.zeros(2, 2, 14), None, w)
    assert not fits_causal_fast_path(q, k, q_pos, key_pos, key_bias, None, -w)


def test_a_fresh_prompt_chunk_takes_the_fast_path():
    """What the methods hand over at prefill: make_prefill_chunk of a whole unpadded prompt."""
    q, k, q_pos, _, _ = _prompt(1, 6, 3, 20, 8, 1.0, 2)
    chunk = make_prefill_chunk(q, k, k, q_pos, None, 0, 1.0, None)
    assert fits_causal_fast_path(q, chunk.keys, chunk.q_pos, chunk.key_pos, chunk.key_bias, None, torch.ones(1, 20))
