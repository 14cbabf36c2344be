"""The output-only decode attention (`decode_attention(..., with_probs=False)`, kvzoo_kernels/decode_output.py,
taken by methods that never read the probabilities) against the reference `decode_attention_reference`, and the methods that take it;
the write-first path (`store_attention`, methods whose new token takes a free slot) against the same reference.

Tolerances: fp32 1e-5 (the fused kernel sums in another order); bf16 2 units in the last place of values
of magnitude ~2 (0.016): the reference rounds each slot probability to bf16 before the value matmul, the
fused kernel accumulates in fp32."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvzoo
from kvzoo_kernels.decode_attention import (
    decode_attention,
    decode_attention_reference,
    store_attention,
    store_attention_reference,
    store_attention_sdpa,
)
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


def _write_then_attend(q, k, v, bias, k_new, v_new, free, attend):  # noqa: ANN001, ANN202
    """Put the new token in slot `free` [B] of copies of the store, then attend over the store alone."""
    k, v, bias = k.clone(), v.clone(), bias.clone()
    rows = torch.arange(k.shape[0])
    k[rows, :, free], v[rows, :, free], bias[rows, :, free] = k_new, v_new, 0.0
    return attend(q, k, v, bias)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 70), st.sampled_from([8, 64]),
       st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 2**16))
def test_writing_first_then_attending_the_store_equals_the_reference(b, hkv, groups, c, d, dtype, seed):
    """Attention over [C slots ; new token] == attention over the store after the new token took a free slot
    (what `decode_writes_first` methods do), for the CPU op, the SDPA formulation used on other devices and
    the reference; any fill level, merged slots, a sequence whose only visible slot is the new token's."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * groups, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, c + 1, d, generator=g).to(dtype) for _ in range(2))
    bias = (torch.rand(b, hkv, c + 1, generator=g) * 3).masked_fill(torch.rand(b, hkv, c + 1, generator=g) < 0.3,
                                                                     float("-inf"))
    bias[0] = float("-inf")  # sequence 0 holds nothing yet
    free = torch.randint(0, c + 1, (b,), generator=g)
    bias[torch.arange(b), :, free] = float("-inf")  # the slot the new token takes is empty before
    k_new, v_new = (torch.randn(b, hkv, d, generator=g).to(dtype) for _ in range(2))
    expected = decode_attention_reference(q, k, v, bias, k_new, v_new)[0].float()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1.6e-2, rtol=1.6e-2)
    for attend in (store_attention, store_attention_sdpa, store_attention_reference):
        got = _write_then_attend(q, k, v, bias, k_new, v_new, free, attend)
        torch.testing.assert_close(got.float(), expected, **tol, msg=lambda m: f"{attend.__name__}: {m}")


@pytest.mark.parametrize("threads", [1, 8])
def test_long_store_attention_equals_the_reference(threads):
    """Long stores, several sequences and threads, rows that see only part of the store."""
    c = 4 * MIN_SPLIT_SLOTS + 3
    g = torch.Generator().manual_seed(c)
    b, hkv, groups, d = 2, 2, 3, 64
    q = torch.randn(b, hkv * groups, d, generator=g)
    k, v = (torch.randn(b, hkv, c, d, generator=g) for _ in range(2))
    bias = torch.rand(b, hkv, c, generator=g).log1p()
    bias[1, :, 2 * MIN_SPLIT_SLOTS:] = float("-inf")  # sequence 1 sees the first half only
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = store_attention(q, k, v, bias)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(got, store_attention_reference(q, k, v, bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec, first", [("full", True), ("snapkv", True), ("pyramidkv", True), ("kvmerger", True),
                                         ("zigzag", True), ("snapkv:decode_cap=4", False), ("streamingllm", False),
                                         ("h2o", False), ("tova", False), ("zsmerge", False)])
def test_which_methods_write_the_new_token_first(spec, first):
    """Only methods whose new token always takes a free slot may write before attending: a capped
    prefill-only method and StreamingLLM overwrite a token this step must still see."""
    method = kvzoo.cache.registry.parse_compression(spec)
    assert method.decode_writes_first is first
    assert not (method.decode_writes_first and method.reads_decode_probs)


def test_writing_first_changes_no_logit(tiny_checkpoint, monkeypatch):
    """A whole model's decode steps with the full cache and SnapKV: writing first gives the logits of
    attending first (fp32; the two orders sum the same terms through different kernels)."""
    from kvzoo.cache import FullCache, SnapKV
    from tests.method_helpers import drive_model

    _, path = tiny_checkpoint("llama-gqa")
    model = kvzoo.load(path)
    prompts = [[(7 * i + 3) % 50 + 2 for i in range(n)] for n in (23, 17)]
    for method in (FullCache(), SnapKV(budget=0.5)):
        written_first = drive_model(model, prompts, method, steps=6)
        monkeypatch.setattr(type(method), "decode_writes_first", False)
        attended_first = drive_model(model, prompts, method, steps=6)
        monkeypatch.undo()
        assert written_first.tokens == attended_first.tokens
        for a, b in zip(written_first.logits, attended_first.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
