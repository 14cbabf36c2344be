"""The CPU fast path of the accumulated-attention statistic (kvzoo_kernels/column_sums_cpu.py) against its
specification, `weighted_column_sums_reference`, and the rule for when it may be taken.

Tolerance: both compute in fp32; the fast path gets each column sum as exp(logsumexp) instead of summing
softmax rows, so the two differ by float rounding of O(T) terms: 1e-4 relative, 1e-6 absolute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kvzoo.attention import ForwardContext, attend
from kvzoo.cache.chunk import PrefillChunk, make_prefill_chunk
from kvzoo.cache.full import FullCache
from kvzoo.cache.scoring import accumulated_scores, group_mean
from kvzoo_kernels import column_sums_cpu
from kvzoo_kernels.attention import causal_attention
from kvzoo_kernels.column_sums_cpu import causal_band_column_sums, causal_column_sums, fits_causal_fast_path
from kvzoo_kernels.window_scores import weighted_column_sums, weighted_column_sums_reference
from tests.method_helpers import FakeConfig


def _prompt(b: int, hq: int, hkv: int, t: int, d: int, sharp: float, seed: int, dtype=torch.float32):  # noqa: ANN001, ANN202
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, t, d, generator=g) * sharp).to(dtype)
    k = (torch.randn(b, hkv, t, d, generator=g) * sharp).to(dtype)
    q_pos = torch.arange(t)[None].expand(b, t)
    return q, k, q_pos, q_pos[:, None, :].expand(b, hkv, t).contiguous(), torch.zeros(b, hkv, t)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 40), st.sampled_from([4, 16, 64]),
       st.sampled_from([0.3, 1.0, 3.0]), st.sampled_from(["ones", "decay", "window", "sparse"]), st.integers(0, 2**16),
       st.sampled_from([None, None, 1, 3, 39, 45]))
def test_fast_path_equals_the_reference(b, hkv, groups, t, d, sharp, weighting, seed, within):
    """Every weighting the methods use: all ones (H2O, KVMerger), decayed (ZSMerge rank="accumulated"), the last
    few queries only (an observation window, zero weight elsewhere), and random zeros; over every query or only
    those fewer than `within` positions after the key (the band ZSMerge's distant rate leaves out; as long as
    the prompt or longer too)."""
    q, k, q_pos, key_pos, key_bias = _prompt(b, hkv * groups, hkv, t, d, sharp, seed)
    ages = torch.arange(t - 1, -1, -1, dtype=torch.float32)
    weights = {
        "ones": torch.ones(b, t),
        "decay": (0.9**ages)[None].expand(b, t),
        "window": (ages < 4).float()[None].expand(b, t),
        "sparse": (torch.rand(b, t, generator=torch.Generator().manual_seed(seed)) < 0.5).float(),
    }[weighting]
    assert fits_causal_fast_path(q, k, q_pos, key_pos, key_bias, None, weights)
    expected = weighted_column_sums_reference(q, k, q_pos, key_pos, key_bias, None, weights, within)
    fast = causal_column_sums(q, k, weights) if within is None else causal_band_column_sums(q, k, weights, within)
    torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weighted_column_sums(q, k, q_pos, key_pos, key_bias, None, weights, None, within),
                               expected, rtol=1e-4, atol=1e-6)


def test_the_band_sums_are_the_attention_from_that_near():
    """The specification itself: with within = h, key j sums exactly the full softmax's probabilities of the
    queries j <= i < j + h (float64 brute force over a [T, T] matrix); the band path, with and without the
    queries' lse given, sums the same, also across several key blocks."""
    t = column_sums_cpu.KEY_BLOCK + 23
    q, k, q_pos, key_pos, key_bias = _prompt(1, 4, 2, t, 8, 1.0, 3)
    weights = torch.rand(1, t, generator=torch.Generator().manual_seed(4))
    logits = q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2) / 8**0.5  # [1, 4, T, T]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    lse = logits.masked_fill(~causal, float("-inf")).logsumexp(-1).float()  # [1, 4, T]
    distance = torch.arange(t)[:, None] - torch.arange(t)[None, :]  # [i, j]
    for h in (1, 5, 40, t - 1, t):
        brute = (probs * (distance < h) * weights[0, None, :, None].double()).sum(2).float()
        torch.testing.assert_close(weighted_column_sums_reference(q, k, q_pos, key_pos, key_bias, None, weights, h),
                                   brute, rtol=1e-5, atol=1e-7)
        for given_lse in (None, lse):
            torch.testing.assert_close(causal_band_column_sums(q, k, weights, h, given_lse), brute, rtol=1e-5,
                                       atol=1e-7)


def test_an_empty_band_is_refused():
    q, k, q_pos, key_pos, key_bias = _prompt(1, 2, 1, 5, 4, 1.0, 0)
    with pytest.raises(ValueError, match="within must be None or >= 1, got 0"):
        weighted_column_sums(q, k, q_pos, key_pos, key_bias, None, torch.ones(1, 5), None, 0)


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


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 40), st.sampled_from([16, 64]),
       st.sampled_from([0.3, 3.0]), st.integers(0, 2**16))
def test_the_model_attention_gives_the_row_lse_the_column_sums_reuse(b, hkv, groups, t, d, sharp, seed):
    """causal_attention's output is plain causal SDPA (GQA included) and its lse is each query's log partition
    function; column sums fed that lse equal the reference (pass 1 skipped)."""
    q, k, q_pos, key_pos, key_bias = _prompt(b, hkv * groups, hkv, t, d, sharp, seed)
    v = torch.randn(b, hkv, t, d, generator=torch.Generator().manual_seed(seed + 1))
    out, lse = causal_attention(q, k, v)
    expected_out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    logits = (q @ k.repeat_interleave(groups, dim=1).transpose(-1, -2)) / d**0.5  # [B, Hq, T, T]
    logits = logits.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    assert lse is not None
    torch.testing.assert_close(lse, logits.logsumexp(-1), rtol=1e-5, atol=1e-5)
    weights = torch.ones(b, t)
    expected = weighted_column_sums_reference(q, k, q_pos, key_pos, key_bias, None, weights)
    torch.testing.assert_close(causal_column_sums(q, k, weights, lse), expected, rtol=1e-4, atol=1e-6)


def test_a_prompt_chunk_carries_the_row_lse_and_the_column_sums_run_one_pass(monkeypatch):
    """attend() leaves the model attention's lse on the chunk; accumulated_scores then runs one flash pass
    (keys against queries), not two, and still equals the reference."""
    q, k, q_pos, key_pos, key_bias = _prompt(1, 6, 3, 24, 16, 1.0, 3)
    seen: list[PrefillChunk] = []

    class Recorder(FullCache):
        def compress_prefill(self, layer_idx, slots, chunk):  # noqa: ANN001, ANN202
            seen.append(chunk)
            return super().compress_prefill(layer_idx, slots, chunk)

    cache = Recorder().make_cache(FakeConfig(num_layers=1, num_kv_heads=3, head_dim=16), [24], 0, torch.float32,
                                  "cpu")
    ctx = ForwardContext(q_pos, None, None, cache, decode=False, window=None, has_padding=False)
    attend(0, q, k, k, ctx.for_layer(0))
    (chunk,) = seen
    assert chunk.row_lse is not None and chunk.row_lse.shape == (1, 6, 24)
    calls = []
    real = column_sums_cpu._flash
    monkeypatch.setattr(column_sums_cpu, "_flash", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    scores = accumulated_scores(chunk)
    assert len(calls) == 1
    expected = weighted_column_sums_reference(q, k, q_pos, key_pos, key_bias, None, torch.ones(1, 24))
    torch.testing.assert_close(scores, group_mean(expected, 3), rtol=1e-4, atol=1e-6)
