"""Decode attention over a slot cache: one query token per sequence over [C slots ; the new token itself].

    logits[g, c] = q_g · k_c / sqrt(D) + slot_bias[c]      (slot_bias = alpha * log w, -inf for empty slots)
    logits[g, C] = q_g · k_new / sqrt(D)                   (the new token, always visible)
    probs = softmax(logits), out_g = probs[g, :C] · V + probs[g, C] · v_new

for the G query heads g of each KV head (GQA/MQA). The methods need `probs` (per query head) to update their
scores, so the kernel returns it beside the output.

- `decode_attention_reference`: the torch specification, and the CPU path.
- The Triton version is flash-decoding: the C slots are cut into splits, one program per (sequence, KV head,
  split) computes the split's running max / sum / unnormalised output for the group's query heads (and
  writes the raw logits into the `probs` buffer); a reduction program per (sequence, KV head) adds the new
  token and combines the splits; a light third pass turns the stored logits into probabilities with the
  global max and sum.
- `decode_attention`: the dispatcher (kvzoo_kernels.dispatch).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from kvzoo_kernels.decode_output import decode_output_cpu, store_output_cpu
from kvzoo_kernels.dispatch import block_size, check_launchable, kernels_setting, triton_kernel, use_triton

tl: Any = None  # triton.language, bound on the first Triton launch (kvzoo_kernels.dispatch.triton_kernel)


def decode_attention_reference(
    q: torch.Tensor,
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    slot_bias: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token over [C cache slots ; the new token itself], without concatenating K/V.

    q: [B, Hq, D]; k_slots, v_slots: [B, Hkv, C, D]; slot_bias: [B, Hkv, C] (-inf for invisible slots);
    k_new, v_new: [B, Hkv, D]. Returns out [B, Hq, D] and probs [B, Hq, C + 1] (fp32; last column = new token).
    Static shapes, no host synchronisation: this is the body of the compiled decode step.
    """
    b, hq, d = q.shape
    hkv = k_slots.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]
    scale = 1.0 / math.sqrt(d)
    slot_logits = torch.einsum("bhgd,bhcd->bhgc", qg, k_slots).float() * scale + slot_bias[:, :, None, :]
    new_logit = torch.einsum("bhgd,bhd->bhg", qg, k_new).float()[..., None] * scale
    probs = torch.cat([slot_logits, new_logit], dim=-1).softmax(dim=-1)  # [B, Hkv, G, C+1]
    p_slots = probs[..., :-1].to(v_slots.dtype)
    out = torch.einsum("bhgc,bhcd->bhgd", p_slots, v_slots)
    out = out + probs[..., -1:].to(v_new.dtype) * v_new[:, :, None, :]
    return out.reshape(b, hq, d), probs.reshape(b, hq, -1)


def decode_attention(
    q: torch.Tensor,
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    slot_bias: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    with_probs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`decode_attention_reference`'s contract; Triton on CUDA tensors (see kvzoo_kernels.dispatch).
    `with_probs=False` (a method that never reads them): probs is None, and on the CPU the output comes from
    the fused kernel of kvzoo_kernels/decode_output.py (KVZOO_KERNELS=torch: the reference's)."""
    if use_triton(q):
        out, probs = decode_attention_triton(q, k_slots, v_slots, slot_bias, k_new, v_new)
    elif not with_probs and q.device.type == "cpu" and kernels_setting() != "torch":
        return decode_output_cpu(q, k_slots, v_slots, slot_bias, k_new, v_new), None
    else:
        out, probs = decode_attention_reference(q, k_slots, v_slots, slot_bias, k_new, v_new)
    return out, probs if with_probs else None


def store_attention_reference(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor,
                              slot_bias: torch.Tensor) -> torch.Tensor:
    """One query token over the C slots alone, the new token being one of them (written before attention):
    out [B, Hq, D]. Every row must see at least one slot (the new token's own). Shapes as above."""
    b, hq, d = q.shape
    hkv = k_slots.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]
    logits = torch.einsum("bhgd,bhcd->bhgc", qg, k_slots).float() / math.sqrt(d) + slot_bias[:, :, None, :]
    out = torch.einsum("bhgc,bhcd->bhgd", logits.softmax(dim=-1).to(v_slots.dtype), v_slots)
    return out.reshape(b, hq, d)


def store_attention(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor,
                    slot_bias: torch.Tensor) -> torch.Tensor:
    """`store_attention_reference`'s contract. On the CPU the fused kernel of kvzoo_kernels/decode_output.py
    (split for long stores), elsewhere torch's fused SDPA; KVZOO_KERNELS=torch: the reference."""
    if kernels_setting() == "torch":
        return store_attention_reference(q, k_slots, v_slots, slot_bias)
    if q.device.type == "cpu":
        return store_output_cpu(q, k_slots, v_slots, slot_bias)
    return store_attention_sdpa(q, k_slots, v_slots, slot_bias)


def store_attention_sdpa(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor,
                         slot_bias: torch.Tensor) -> torch.Tensor:
    """`store_attention` through torch's fused SDPA (any device), the bias as its additive mask."""
    b, hq, d = q.shape
    hkv = k_slots.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]: a group's query heads are query rows of its KV head
    mask = slot_bias.to(q.dtype)[:, :, None, :]  # [B, Hkv, 1, C], broadcast over the G rows
    return F.scaled_dot_product_attention(qg, k_slots, v_slots, attn_mask=mask).reshape(b, hq, d)


# --- Triton ---------------------------------------------------------------------------------------------

BLOCK_C = 64  # slots per tile on a GPU
TARGET_PROGRAMS = 256  # enough (sequence, KV head, split) programs to fill a GPU's SMs twice


def decode_attention_triton(
    q: torch.Tensor,
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    slot_bias: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    block_c: int | None = None,
    split_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path (a torch custom op, so compiled code can call it). `block_c` (slots per tile, a power
    of two >= 16) and `split_size` (slots per split, a multiple of block_c) default to GPU-sized values;
    tests pass small ones to exercise several tiles and splits on tiny shapes."""
    b, hkv, c, _ = k_slots.shape
    block_c = block_c or block_size(c, maximum=BLOCK_C)
    if split_size is None:
        tiles = -(-c // block_c)
        splits = max(1, min(tiles, -(-TARGET_PROGRAMS // (b * hkv))))
        split_size = block_c * -(-tiles // splits)
    if block_c < 16 or block_c & (block_c - 1) or split_size % block_c:
        raise ValueError(f"decode_attention_triton: block_c={block_c} must be a power of two >= 16 and "
                         f"split_size={split_size} a multiple of it")
    return torch.ops.kvzoo.decode_attention(q, k_slots, v_slots, slot_bias, k_new, v_new, block_c, split_size)


@torch.library.custom_op("kvzoo::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor,
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    slot_bias: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    block_c: int,
    split_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_launchable(q, k_slots, v_slots, slot_bias, k_new, v_new)
    q, k_slots, v_slots, k_new, v_new = (_last_dim_contiguous(t) for t in (q, k_slots, v_slots, k_new, v_new))
    slot_bias = slot_bias.float().contiguous()
    b, hq, d = q.shape
    hkv, c = k_slots.shape[1], k_slots.shape[2]
    groups = hq // hkv
    n_splits = max(1, -(-c // split_size))
    block_g, block_d = block_size(groups), block_size(d)
    dev = q.device
    out = torch.empty(b, hq, d, dtype=v_slots.dtype, device=dev)
    probs = torch.empty(b, hq, c + 1, dtype=torch.float32, device=dev)  # raw logits first, then probabilities
    part_max = torch.empty(b * hkv, n_splits, block_g, dtype=torch.float32, device=dev)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(b * hkv, n_splits, block_g, block_d, dtype=torch.float32, device=dev)
    row_max = torch.empty(b, hq, dtype=torch.float32, device=dev)
    row_sum = torch.empty_like(row_max)
    scale = 1.0 / math.sqrt(d)
    _split_kernel[(b * hkv, n_splits)](
        q, k_slots, v_slots, slot_bias, probs, part_max, part_sum, part_acc,
        q.stride(0), q.stride(1), k_slots.stride(0), k_slots.stride(1), k_slots.stride(2),
        v_slots.stride(0), v_slots.stride(1), v_slots.stride(2),
        c, groups, d, hkv, n_splits, split_size, scale,
        BLOCK_G=block_g, BLOCK_C=block_c, BLOCK_D=block_d,
    )
    _reduce_kernel[(b * hkv,)](
        q, k_new, v_new, part_max, part_sum, part_acc, out, probs, row_max, row_sum,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        c, groups, d, hkv, n_splits, scale,
        BLOCK_G=block_g, BLOCK_D=block_d,
    )
    block_n = block_size(c, maximum=1024)
    _normalise_kernel[(b * hq, -(-c // block_n) if c else 1)](
        probs, row_max, row_sum, c, b * hq, BLOCK_N=block_n,
    )
    return out, probs


@_decode_attention_op.register_fake
def _(q, k_slots, v_slots, slot_bias, k_new, v_new, block_c, split_size):  # noqa: ANN001, ANN202
    b, hq, d = q.shape
    return (q.new_empty(b, hq, d, dtype=v_slots.dtype),
            q.new_empty(b, hq, k_slots.shape[2] + 1, dtype=torch.float32))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@triton_kernel
def _split_kernel(
    q, k, v, bias, logits, part_max, part_sum, part_acc,
    sq_b, sq_h, sk_b, sk_h, sk_c, sv_b, sv_h, sv_c,
    C, G, D, HKV, n_splits, split_size, scale,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (sequence * KV head, split): running max / sum / unnormalised output over the split's slots
    for the G query heads of the KV head; stores the raw logits into `logits` ([B, Hq, C + 1] fp32)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < G
    d_ok = d < D
    heads = h * G + g  # the group's query heads
    q_tile = tl.load(q + b * sq_b + heads[:, None] * sq_h + d[None, :],
                     mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [G, D]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = split * split_size
    for offset in range(0, split_size, BLOCK_C):
        c = start + offset + tl.arange(0, BLOCK_C)
        c_ok = c < C
        kv_mask = c_ok[:, None] & d_ok[None, :]
        k_tile = tl.load(k + b * sk_b + h * sk_h + c[:, None] * sk_c + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q_tile, tl.trans(k_tile.to(tl.float32)), input_precision="ieee") * scale  # [G, C]
        slot_bias = tl.load(bias + (b * HKV + h) * C + c, mask=c_ok, other=float("-inf"))
        s = s + slot_bias[None, :]
        s = tl.where(g_ok[:, None] & c_ok[None, :], s, float("-inf"))
        tl.store(logits + (b * HKV * G + heads[:, None]) * (C + 1) + c[None, :], s,
                 mask=g_ok[:, None] & c_ok[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-empty tile: exp(-inf - 0) = 0, no NaN
        p = tl.exp(s - m_safe[:, None])
        rescale = tl.exp(m_i - m_safe)
        l_i = l_i * rescale + tl.sum(p, axis=1)
        v_tile = tl.load(v + b * sv_b + h * sv_h + c[:, None] * sv_c + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p, v_tile.to(tl.float32), input_precision="ieee")
        m_i = m_new
    part = bh * n_splits + split
    tl.store(part_max + part * BLOCK_G + g, m_i, mask=g_ok)
    tl.store(part_sum + part * BLOCK_G + g, l_i, mask=g_ok)
    tl.store(part_acc + (part * BLOCK_G + g[:, None]) * BLOCK_D + d[None, :], acc,
             mask=g_ok[:, None] & d_ok[None, :])


@triton_kernel
def _reduce_kernel(
    q, k_new, v_new, part_max, part_sum, part_acc, out, probs, row_max, row_sum,
    sq_b, sq_h, skn_b, skn_h, svn_b, svn_h,
    C, G, D, HKV, n_splits, scale,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (sequence * KV head): the new token's logit, the global max / sum over all splits, the
    output, the new token's probability, and the per-head max / sum for the normalising pass."""
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < G
    d_ok = d < D
    gd_mask = g_ok[:, None] & d_ok[None, :]
    heads = h * G + g
    q_tile = tl.load(q + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=gd_mask, other=0.0).to(tl.float32)
    k_n = tl.load(k_new + b * skn_b + h * skn_h + d, mask=d_ok, other=0.0).to(tl.float32)
    v_n = tl.load(v_new + b * svn_b + h * svn_h + d, mask=d_ok, other=0.0).to(tl.float32)
    s_new = tl.sum(q_tile * k_n[None, :], axis=1) * scale  # [G]: finite, so the global max is finite
    m = s_new
    for split in range(0, n_splits):
        part = bh * n_splits + split
        m = tl.maximum(m, tl.load(part_max + part * BLOCK_G + g, mask=g_ok, other=float("-inf")))
    p_new = tl.exp(s_new - m)
    total = p_new
    acc = p_new[:, None] * v_n[None, :]
    for split in range(0, n_splits):
        part = bh * n_splits + split
        factor = tl.exp(tl.load(part_max + part * BLOCK_G + g, mask=g_ok, other=float("-inf")) - m)
        total += factor * tl.load(part_sum + part * BLOCK_G + g, mask=g_ok, other=0.0)
        acc += factor[:, None] * tl.load(part_acc + (part * BLOCK_G + g[:, None]) * BLOCK_D + d[None, :],
                                         mask=gd_mask, other=0.0)
    row = b * HKV * G + heads
    tl.store(out + row[:, None] * D + d[None, :], acc / total[:, None], mask=gd_mask)
    tl.store(probs + row * (C + 1) + C, p_new / total, mask=g_ok)
    tl.store(row_max + row, m, mask=g_ok)
    tl.store(row_sum + row, total, mask=g_ok)


@triton_kernel
def _normalise_kernel(probs, row_max, row_sum, C, ROWS, BLOCK_N: tl.constexpr):
    """Program (sequence * query head, tile of slots): raw logit -> probability with the global max / sum."""
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = (c < C) & (row < ROWS)
    m = tl.load(row_max + row, mask=row < ROWS, other=0.0)
    total = tl.load(row_sum + row, mask=row < ROWS, other=1.0)
    logit = tl.load(probs + row * (C + 1) + c, mask=c_ok, other=float("-inf"))
    tl.store(probs + row * (C + 1) + c, tl.exp(logit - m) / total, mask=c_ok)
