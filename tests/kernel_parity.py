"""The Triton kernels of kvzoo_kernels against their torch references.

On CPU, under the Triton interpreter: run by tests/test_kernels.py in a fresh process with
TRITON_INTERPRET=1 and KVZOO_KERNELS=triton (this file is not collected by a plain `pytest tests`): triton
decorates its own library functions when it is imported, reading TRITON_INTERPRET at that moment, so the
interpreter must be on before anything imports triton, and that must not leak into the other tests. By hand:
`TRITON_INTERPRET=1 KVZOO_KERNELS=triton python -m pytest tests/kernel_parity.py`.
On a GPU (never done in this project, which has none):
`KVZOO_TEST_DEVICE=cuda KVZOO_KERNELS=triton python -m pytest tests/kernel_parity.py`.

Shapes are hypothesis-generated and tiny (the interpreter
costs Python per program), with small tiles so that several tiles and splits are exercised: one filled
slot, C not a multiple of the tile, H_kv = 1, G = 1, batches with different fill levels, empty slots,
padding queries, sliding windows. fp32 and fp16 (the interpreter cannot do bf16).
"""

from __future__ import annotations

import os
import sys

DEVICE = os.environ.get("KVZOO_TEST_DEVICE", "cpu")
INTERPRETED = DEVICE == "cpu"
if os.environ.get("KVZOO_KERNELS") != "triton" or (INTERPRETED and os.environ.get("TRITON_INTERPRET") != "1"):
    raise RuntimeError("tests/kernel_parity.py needs KVZOO_KERNELS=triton and, on CPU, TRITON_INTERPRET=1 in the "
                       "environment (tests/test_kernels.py runs it that way)")
if INTERPRETED and "triton" in sys.modules:
    raise RuntimeError("triton was imported before this module: its library was decorated without the interpreter")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402, F401 (the test extra: a missing triton fails loudly here)
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvzoo_kernels import dispatch  # noqa: E402
from kvzoo_kernels.chunk_attention import (  # noqa: E402
    chunk_attention,
    chunk_attention_reference,
    chunk_attention_triton,
)
from kvzoo_kernels.decode_attention import (  # noqa: E402
    decode_attention,
    decode_attention_reference,
    decode_attention_triton,
)
from kvzoo_kernels.window_scores import (  # noqa: E402
    weighted_column_sums,
    weighted_column_sums_reference,
    weighted_column_sums_triton,
)
from kvzoo_kernels.zsmerge_update import (  # noqa: E402
    zsmerge_update,
    zsmerge_update_reference,
    zsmerge_update_triton,
)

INF = float("inf")
DTYPES = st.sampled_from([torch.float32, torch.float16])
# Tolerances. fp32: the kernels sum in another order than torch (tiles, splits, online softmax): a few ulp
# of the result, 2e-5 covers sums of up to ~100 terms. fp16: both sides start from the same fp16 inputs;
# the reference rounds its logits and its weighted value sums to fp16 (eps 9.8e-4) while the kernels
# accumulate in fp32, so outputs of magnitude <= ~4 differ by a few fp16 ulp: 5e-3.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float16: dict(rtol=5e-3, atol=5e-3)}
# Probabilities and scores are fp32 on both sides; in fp16 they inherit the fp16 logit rounding of the
# reference (|logit| <~ 6: 6 * 2^-11 = 3e-3 relative on a probability).
PROB_TOL = {torch.float32: dict(rtol=2e-5, atol=1e-6), torch.float16: dict(rtol=5e-3, atol=5e-4)}
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def test_the_interpreter_and_the_triton_path_are_on():
    assert dispatch.MODE == "triton"
    assert bool(triton.knobs.runtime.interpret) == INTERPRETED


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dev(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Inputs are drawn on CPU (seeded) and moved to the device under test."""
    return tuple(t.to(DEVICE) for t in tensors)


# --- decode attention -----------------------------------------------------------------------------------

@st.composite
def decode_cases(draw):  # noqa: ANN001, ANN201
    b = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2, 3]))
    c = draw(st.integers(1, 45))
    d = draw(st.sampled_from([4, 8, 16]))
    filled = [draw(st.integers(1, c)) for _ in range(b)]  # a different fill level per sequence
    block_c = draw(st.sampled_from([16, 32]))
    split_size = block_c * draw(st.integers(1, 2))
    return b, hkv, groups, c, d, filled, block_c, split_size, draw(DTYPES), draw(st.integers(0, 2**16))


@SETTINGS
@given(decode_cases())
def test_decode_attention_equals_reference(case):
    b, hkv, groups, c, d, filled, block_c, split_size, dtype, seed = case
    g = _gen(seed)
    q = torch.randn(b, hkv * groups, d, generator=g).to(dtype)
    k_slots, v_slots = (torch.randn(b, hkv, c, d, generator=g).to(dtype) for _ in range(2))
    k_new, v_new = (torch.randn(b, hkv, d, generator=g).to(dtype) for _ in range(2))
    logw = torch.rand(b, hkv, c, generator=g).mul(3).log1p()  # merged slots stand for up to 4 tokens
    empty = (torch.arange(c)[None, None, :] >= torch.tensor(filled)[:, None, None]).expand(b, hkv, c).clone()
    empty |= torch.rand(b, hkv, c, generator=g) < 0.2  # e.g. outside a sliding window (unused capacity above)
    empty[:, :, 0] = False  # at least one visible slot... and some heads with exactly one:
    if c > 1:
        empty[0, 0, 1:] = True
    bias = logw.masked_fill(empty, -INF)
    q, k_slots, v_slots, bias, k_new, v_new, empty = _dev(q, k_slots, v_slots, bias, k_new, v_new, empty)

    out, probs = decode_attention_triton(q, k_slots, v_slots, bias, k_new, v_new, block_c=block_c,
                                         split_size=split_size)
    ref_out, ref_probs = decode_attention_reference(q, k_slots, v_slots, bias, k_new, v_new)
    assert out.dtype == ref_out.dtype and probs.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(probs, ref_probs, **PROB_TOL[dtype])
    assert (probs[..., :c][empty.repeat_interleave(groups, dim=1)] == 0).all(), "an empty slot got attention"


def test_decode_attention_dispatcher_default_tiles():
    """The dispatcher under KVZOO_KERNELS=triton picks the Triton path with its GPU-sized defaults."""
    g = _gen(0)
    q = torch.randn(2, 4, 16, generator=g)
    k_slots, v_slots = torch.randn(2, 2, 70, 16, generator=g), torch.randn(2, 2, 70, 16, generator=g)
    bias = torch.zeros(2, 2, 70)
    bias[1, :, 50:] = -INF
    k_new, v_new = torch.randn(2, 2, 16, generator=g), torch.randn(2, 2, 16, generator=g)
    q, k_slots, v_slots, bias, k_new, v_new = _dev(q, k_slots, v_slots, bias, k_new, v_new)
    out, probs = decode_attention(q, k_slots, v_slots, bias, k_new, v_new)
    ref_out, ref_probs = decode_attention_reference(q, k_slots, v_slots, bias, k_new, v_new)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(probs, ref_probs, **PROB_TOL[torch.float32])


# --- prefill chunks: [slots ; chunk] candidates ------------------------------------------------------------

@st.composite
def chunk_cases(draw):  # noqa: ANN001, ANN201
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2, 3]))
    t = draw(st.integers(1, 20))
    n_slots = draw(st.sampled_from([0, 1, draw(st.integers(2, 20))]))
    d = draw(st.sampled_from([4, 8, 16]))
    padding = [draw(st.integers(0, t - 1)) for _ in range(b)]  # left padding per sequence
    window = draw(st.sampled_from([None, 1, 3, 8]))
    blocks = (draw(st.sampled_from([16, 32])), draw(st.sampled_from([16, 32])))
    return b, hkv, groups, t, n_slots, d, padding, window, blocks, draw(DTYPES), draw(st.integers(0, 2**16))


def _chunk(case):  # noqa: ANN001, ANN202
    """A prefill chunk as kvzoo.attention builds it: slots in use (some empty, merged ones with a log-count
    bias, positions before the chunk) followed by the chunk's tokens (left-padded, positions continuing)."""
    b, hkv, groups, t, n_slots, d, padding, window, blocks, dtype, seed = case
    g = _gen(seed)
    q = torch.randn(b, hkv * groups, t, d, generator=g).to(dtype)
    keys, values = (torch.randn(b, hkv, n_slots + t, d, generator=g).to(dtype) for _ in range(2))
    start = n_slots + 5  # the chunk's first position: earlier positions are in the slots
    q_pos = torch.stack([torch.cat([torch.full((p,), -1), torch.arange(start, start + t - p)]) for p in padding])
    slot_pos = torch.randint(0, start, (b, hkv, n_slots), generator=g)
    slot_bias = torch.rand(b, hkv, n_slots, generator=g).mul(3).log1p()
    empty = torch.rand(b, hkv, n_slots, generator=g) < 0.25
    slot_pos, slot_bias = slot_pos.masked_fill(empty, -1), slot_bias.masked_fill(empty, -INF)
    key_pos = torch.cat([slot_pos, q_pos[:, None].expand(b, hkv, t)], dim=2)
    key_bias = torch.cat([slot_bias, torch.where(q_pos >= 0, 0.0, -INF)[:, None].expand(b, hkv, t)], dim=2)
    return _dev(q, keys, values, q_pos, key_pos, key_bias)


@SETTINGS
@given(chunk_cases())
def test_chunk_attention_equals_reference(case):
    n_slots, window, (block_t, block_s), dtype = case[4], case[7], case[8], case[9]
    q, keys, values, q_pos, key_pos, key_bias = _chunk(case)
    out = chunk_attention_triton(q, keys, values, q_pos, key_pos, key_bias, window, n_slots, block_t=block_t,
                                 block_s=block_s)
    ref = chunk_attention_reference(q, keys, values, q_pos, key_pos, key_bias, window, n_slots)
    assert out.dtype == ref.dtype
    # Every row, padding queries included (they take the reference's unbiased softmax over all candidates).
    torch.testing.assert_close(out, ref, **TOL[dtype])


@SETTINGS
@given(chunk_cases(), st.sampled_from([None, 4]), st.sampled_from([None, None, 2, 5]))
def test_window_column_scores_equal_reference(case, observed, within):
    """The decay-weighted column sums over the last `observed` queries (None: all of them, H2O-style), with
    non-zero weights on padding queries too, so their rule is checked as well; over every query or only those
    fewer than `within` positions after the key (the band ZSMerge's distant rate leaves out)."""
    window, (block_t, block_s), dtype, seed = case[7], case[8], case[9], case[10]
    q, keys, _, q_pos, key_pos, key_bias = _chunk(case)
    if observed is not None:
        q, q_pos = q[:, :, -observed:], q_pos[:, -observed:]
    (weights,) = _dev(torch.rand(q_pos.shape, generator=_gen(seed + 1)))
    out = weighted_column_sums_triton(q, keys, q_pos, key_pos, key_bias, window, weights, block_t=block_t,
                                      block_s=block_s, within=within)
    ref = weighted_column_sums_reference(q, keys, q_pos, key_pos, key_bias, window, weights, within)
    torch.testing.assert_close(out, ref, **PROB_TOL[dtype])


def test_prefill_dispatchers_take_the_triton_path():
    case = (2, 2, 2, 9, 7, 8, [0, 3], 4, (16, 16), torch.float32, 1)
    q, keys, values, q_pos, key_pos, key_bias = _chunk(case)
    torch.testing.assert_close(chunk_attention(q, keys, values, q_pos, key_pos, key_bias, 4, 7),
                               chunk_attention_reference(q, keys, values, q_pos, key_pos, key_bias, 4, 7))
    weights = torch.ones(q_pos.shape, device=DEVICE)
    torch.testing.assert_close(weighted_column_sums(q, keys, q_pos, key_pos, key_bias, 4, weights),
                               weighted_column_sums_reference(q, keys, q_pos, key_pos, key_bias, 4, weights))


# --- the fused ZSMerge update -------------------------------------------------------------------------

@st.composite
def zsmerge_cases(draw):  # noqa: ANN001, ANN201
    b = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from([4, 8]))
    layouts = []
    for _ in range(b):  # each sequence its own budget = residual + context + proximity ring
        residual, context, proximity = draw(st.integers(1, 4)), draw(st.integers(1, 8)), draw(st.integers(2, 6))
        layouts.append((residual, context, proximity))
    capacity = max(sum(x) for x in layouts) + draw(st.integers(0, 3))
    fill = draw(st.sampled_from(["full", "partial", "residual empty", "one slot"]))
    return (b, hkv, groups, d, layouts, capacity, fill, draw(st.sampled_from(["dot", "l2"])),
            draw(st.sampled_from(["max", "sum"])), draw(st.sampled_from([1, 2, 4])), draw(DTYPES),
            draw(st.integers(0, 2**16)), draw(st.booleans()))


def _zsmerge_state(case):  # noqa: ANN001, ANN202
    b, hkv, groups, d, layouts, c, fill, _, _, _, dtype, seed, same_keys = case
    g = _gen(seed)
    residual = torch.tensor([x[0] for x in layouts])
    proximity = torch.tensor([x[2] for x in layouts])
    budget = torch.tensor([sum(x) for x in layouts])
    idx = torch.arange(c)[None, None, :]
    within = (idx < budget[:, None, None]).expand(b, hkv, c)
    if fill == "full":  # every slot within budget holds something: the step merges
        filled = within.clone()
    elif fill == "partial":
        filled = within & (torch.rand(b, hkv, c, generator=g) < 0.7)
    elif fill == "residual empty":  # the first merges go into empty residual slots
        filled = within & (idx >= residual[:, None, None])
    else:
        filled = torch.zeros(b, hkv, c, dtype=torch.bool)
        filled[:, :, 0] = True
    k, v = (torch.randn(b, hkv, c, d, generator=g).to(dtype) for _ in range(2))
    if same_keys:  # every residual slot equally similar: the first one must win, as torch's argmax picks
        k = k[:, :, :1].expand_as(k).contiguous()
    logw = torch.rand(b, hkv, c, generator=g).mul(3).log1p().masked_fill(~filled, -INF)
    score = torch.rand(b, hkv, c, generator=g).masked_fill(~filled, 0.0)
    pos = torch.randint(0, 40, (b, hkv, c), generator=g).masked_fill(~filled, -1)
    k_new, v_new = (torch.randn(b, hkv, d, generator=g).to(dtype) for _ in range(2))
    pos_new = torch.randint(40, 60, (b,), generator=g)
    probs = torch.rand(b, hkv * groups, c + 1, generator=g)
    return list(_dev(k, v, logw, score, pos)), _dev(budget, residual, proximity, k_new, v_new, pos_new, probs)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(zsmerge_cases(), st.sampled_from([None, 0.5, 2.0]))
# Full stores whose residual slots hold identical keys: ties across similarity tiles go to the first slot.
@example((1, 1, 1, 4, [(3, 2, 2)], 7, "full", "dot", "max", 1, torch.float32, 5, True), None)
@example((2, 1, 2, 4, [(4, 1, 2), (2, 2, 3)], 8, "full", "l2", "sum", 2, torch.float16, 6, True), None)
# An eviction bias as large as the scores: it decides which slot is merged.
@example((2, 2, 1, 4, [(2, 4, 2), (1, 6, 3)], 10, "full", "dot", "max", 2, torch.float32, 7, False), 1.0)
def test_zsmerge_update_equals_reference(case, bias_scale):
    """bias_scale: None (no eviction bias) or the scale of a random one [B, Hkv, C], nonzero in every region
    (the update must read it for the context slots alone)."""
    metric, score_update, block_r, dtype = case[7], case[8], case[9], case[10]
    slots, rest = _zsmerge_state(case)
    bias = None if bias_scale is None else _dev(torch.rand(slots[2].shape, generator=_gen(case[11] + 1)) * bias_scale)[0]
    ref = [t.clone() for t in slots]
    out = [t.clone() for t in slots]
    zsmerge_update_reference(*ref, *rest, 0.9, metric, score_update, bias)
    zsmerge_update_triton(*out, *rest, 0.9, metric, score_update, eviction_bias=bias, block_r=block_r)
    assert torch.equal(out[4], ref[4]), "positions differ: a different slot was chosen"
    assert torch.equal(torch.isfinite(out[2]), torch.isfinite(ref[2])), "different slots are filled"
    # Same fp32 operations on both sides; a merged key/value is rounded to the storage dtype once.
    storage = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out[0], ref[0], **storage)
    torch.testing.assert_close(out[1], ref[1], **storage)
    torch.testing.assert_close(out[2], ref[2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[3], ref[3], rtol=1e-6, atol=1e-6)


def test_zsmerge_update_dispatcher_merges_without_losing_tokens():
    """A full store: the dispatcher's Triton path merges like the reference, every slot stays filled and the
    slots stand for one token more than before (the new one; nothing is dropped)."""
    case = (1, 2, 2, 8, [(2, 3, 3)], 8, "full", "dot", "max", 1, torch.float32, 3, False)
    slots, rest = _zsmerge_state(case)
    before = slots[2].exp().sum(-1)
    ref = [t.clone() for t in slots]
    zsmerge_update_reference(*ref, *rest, 0.9, "dot", "max")
    zsmerge_update(*slots, *rest, decay=0.9, metric="dot", score_update="max")
    for got, want in zip(slots, ref):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(slots[2]).all()
    torch.testing.assert_close(slots[2].exp().sum(-1), before + 1)


# --- torch.compile compatibility -------------------------------------------------------------

def test_custom_ops_pass_opcheck():
    """Each Triton launch is a torch custom op with a fake (meta) implementation, so compiled code can call
    it: torch.library.opcheck runs the schema, fake-tensor and AOT-dispatch checks."""
    g = _gen(0)
    q = torch.randn(1, 2, 16, generator=g)
    k_slots, v_slots = torch.randn(1, 1, 5, 16, generator=g), torch.randn(1, 1, 5, 16, generator=g)
    k_new, v_new = torch.randn(1, 1, 16, generator=g), torch.randn(1, 1, 16, generator=g)
    torch.library.opcheck(torch.ops.kvzoo.decode_attention.default,
                          (*_dev(q, k_slots, v_slots, torch.zeros(1, 1, 5), k_new, v_new), 16, 16))
    case = (1, 1, 2, 5, 3, 8, [1], 4, (16, 16), torch.float32, 2)
    qc, keys, values, q_pos, key_pos, key_bias = _chunk(case)
    torch.library.opcheck(torch.ops.kvzoo.chunk_attention.default,
                          (qc, keys, values, q_pos, key_pos, key_bias, 4, 3, 16, 16))
    torch.library.opcheck(torch.ops.kvzoo.weighted_column_sums.default,
                          (qc, keys, q_pos, key_pos, key_bias, 4, torch.ones(q_pos.shape, device=DEVICE), 16, 16, 2))
    slots, rest = _zsmerge_state((1, 1, 2, 8, [(1, 2, 2)], 5, "full", "dot", "max", 1, torch.float32, 0, False))
    torch.library.opcheck(torch.ops.kvzoo.zsmerge_update.default, (*slots, *rest, None, 0.9, True, True, 1))
    bias = torch.rand(slots[2].shape, generator=_gen(1)).to(slots[2].device)
    torch.library.opcheck(torch.ops.kvzoo.zsmerge_update.default, (*slots, *rest, bias, 0.9, True, True, 1))




def test_compiled_decode_step_calls_the_kernels():
    """A decode step (attention over slots, then the ZSMerge update in place) under torch.compile with
    fullgraph=True: the custom ops compile without a graph break and give the eager reference's results,
    slot mutations included."""
    case = (1, 2, 2, 16, [(2, 3, 3)], 9, "full", "dot", "max", 1, torch.float32, 4, False)
    slots, (budget, residual, proximity, k_new, v_new, pos_new, probs) = _zsmerge_state(case)
    (q,) = _dev(torch.randn(1, 4, 16, generator=_gen(5)))

    def step(q, k, v, logw, score, pos, k_new, v_new, pos_new):  # noqa: ANN001, ANN202
        out, probs = decode_attention(q, k, v, logw, k_new, v_new)
        zsmerge_update(k, v, logw, score, pos, budget, residual, proximity, k_new, v_new, pos_new, probs,
                       decay=0.9, metric="dot", score_update="max")
        return out

    ref = [t.clone() for t in slots]
    ref_out, ref_probs = decode_attention_reference(q, ref[0], ref[1], ref[2], k_new, v_new)
    zsmerge_update_reference(*ref, budget, residual, proximity, k_new, v_new, pos_new, ref_probs, 0.9, "dot", "max")
    out = torch.compile(step, fullgraph=True)(q, *slots, k_new, v_new, pos_new)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    for got, want in zip(slots, ref):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
