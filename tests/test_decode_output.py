"""The output-only decode attention (`decode_attention(..., with_probs=False)`, kvzoo_kernels/decode_output.py,
taken by methods that never read the probabilities) against the reference `decode_attention_reference`, and the methods that take it.

Tolerances: fp32 1e-5 (the fused kernel sums in another order); bf16 2 units in the last place of values
of magnitude ~2 (0.016): the reference rounds each slot probability to bf16 before the value matmul, the
fused kernel accumulates in fp32."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvzoo
from kvzoo_kernels.decode_attention import decode_attention, decode_attention_reference
from kvzoo_kernels.decode_output import MIN_SPLIT_SLOTS, split_count


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 70), st.sampled_from([8, 64]),
       st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 2**16))
def test_fused_output_equals_the_reference(b, hkv, groups, c, d, dtype, seed):
    """Any fill level, merged slots (bias log w > 0), empty slots, and sequences whose slots are all empty
    (then only the new token is attended)."""
    g = torch.Generator().manual_seed(seed)
    hq = hkv * groups
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, c, d, generator=g).to(dtype) for _ in range(2))
    bias = torch.rand(b, hkv, c, generator=g) * 3  # alpha * log w >= 0
    empty = torch.rand(b, hkv, c, generator=g) < 0.3
    empty[0] = True  # sequence 0 has no slot at all
    bias = bias.masked_fill(empty, float("-inf"))
    k_new, v_new = (torch.randn(b, hkv, d, generator=g).to(dtype) for _ in range(2))
    expected = decode_attention_reference(q, k, v, bias, k_new, v_new)[0]
    got, probs = decode_attention(q, k, v, bias, k_new, v_new, with_probs=False)
    assert probs is None
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(got.float(), expected.float(), **tol)


@pytest.mark.parametrize("c", [4 * MIN_SPLIT_SLOTS, 4 * MIN_SPLIT_SLOTS + 3])
@pytest.mark.parametrize("fill", ["all", "first piece only", "none"])
def test_stores_split_into_pieces_equal_the_reference(c, fill):
    """Long stores are cut into pieces combined by logsumexp (flash-decoding): pieces that see no slot weigh
    nothing, and slots left over when the capacity does not divide are folded in beside the new token."""
    g = torch.Generator().manual_seed(c)
    b, hkv, groups, d = 1, 2, 3, 64
    q = torch.randn(b, hkv * groups, d, generator=g)
    k, v = (torch.randn(b, hkv, c, d, generator=g) for _ in range(2))
    bias = torch.rand(b, hkv, c, generator=g).log1p()
    if fill == "first piece only":
        bias[..., MIN_SPLIT_SLOTS:] = float("-inf")
    elif fill == "none":
        bias[:] = float("-inf")
    k_new, v_new = (torch.randn(b, hkv, d, generator=g) for _ in range(2))
    expected = decode_attention_reference(q, k, v, bias, k_new, v_new)[0]
    previous = torch.get_num_threads()
    torch.set_num_threads(4)  # 2 * 4 threads / 2 heads: 4 pieces when the capacity divides
    try:
        assert split_count(b, hkv, c, 4) == 4
        got, _ = decode_attention(q, k, v, bias, k_new, v_new, with_probs=False)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_split_count_rule():
    """Two (sequence, head, piece) items per thread, pieces of at least MIN_SPLIT_SLOTS."""
    assert split_count(1, 3, 8193, 2) == 2
    assert split_count(1, 3, MIN_SPLIT_SLOTS * 2 - 2, 2) == 1  # pieces would be shorter than the minimum
    assert split_count(8, 3, 8192, 2) == 1  # enough items already
    assert split_count(1, 1, 6 * MIN_SPLIT_SLOTS + 5, 16) == 6  # 32 wanted, 6 fit the minimum


@pytest.mark.parametrize("spec, reads", [("full", False), ("streamingllm", False), ("snapkv", False),
                                         ("kvmerger", False), ("zigzag", False), ("pyramidkv", False),
                                         ("h2o", True), ("tova", True), ("zsmerge", True)])
def test_which_methods_read_the_probabilities(spec, reads):
    """Only the methods whose decode step scores tokens by attention pay for the probabilities."""
    assert kvzoo.cache.registry.parse_compression(spec).reads_decode_probs is reads
