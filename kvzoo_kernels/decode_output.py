"""Decode attention when the method does not read the probabilities: the output only.

Same output as `decode_attention.decode_attention_reference` (one query token over [C slots ; the new token],
slot bias alpha * log w, GQA), without the [B, Hq, C + 1] probabilities. On the CPU the slots go through the
fused flash-attention kernel, which returns each row's logsumexp beside the output, and the new token is
folded in afterwards without concatenating it to the store:

    out = (e^{lse} * out_slots + e^{l_new} * v_new) / (e^{lse} + e^{l_new}),   l_new = q . k_new / sqrt(D)

(computed relative to max(lse, l_new)). Methods that only evict by position (StreamingLLM, a prefill-only
method with a decode cap) take this path through `decode_attention(..., with_probs=False)`; see
`CompressionMethod.reads_decode_probs`. Methods whose new token always goes to a free slot (the full cache,
the prefill-only methods without a cap) write it first and attend over the store alone
(`store_attention`, op `store_output_cpu`): one kernel call and nothing to fold, as transformers' static
cache does; see `CompressionMethod.decode_writes_first`.

Flash-decoding on the CPU: the kernel parallelises over (sequence, head, query block) only, and a decode
step has B * Hkv of those (3 for the default model at batch 1), which two threads split 2 : 1. So each
store row is cut into `s` pieces of equal length that the kernel sees as extra heads (a strided view, no
copy); the pieces, the < s slots left over and the new token are combined by their logsumexps. The body is a
custom op, so that the compiled decode step calls the same kernel with the split chosen from the store's
actual capacity at run time (a graph with a symbolic capacity cannot reshape it without guards). The
write-first path does not split: without a new token to fold in, whole rows measured faster.
"""

from __future__ import annotations

import math

import torch

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
MIN_SPLIT_SLOTS = 512  # below this a piece is too short for the extra combine to pay


def split_count(batch: int, kv_heads: int, capacity: int, threads: int) -> int:
    """Pieces to cut each store row into: enough (sequence, head, piece) items for two per thread, each at
    least MIN_SPLIT_SLOTS long."""
    return max(1, min(-(-2 * threads // (batch * kv_heads)), capacity // MIN_SPLIT_SLOTS))


def _pieces(x: torch.Tensor, s: int, length: int) -> torch.Tensor:
    """The first s * length slots of every (sequence, head) row of a contiguous store x [B, Hkv, C, ...] as
    [B * Hkv, s, length, ...]: piece j of a row is a "head" of the flash kernel (a strided view, no copy)."""
    b, hkv, c = x.shape[:3]
    rest = x.shape[3:]
    inner = x.stride(2)
    return x.as_strided((b * hkv, s, length, *rest), (c * inner, length * inner, *x.stride()[2:]))


@torch.library.custom_op("kvzoo::decode_output_cpu", mutates_args=())
def decode_output_cpu(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, slot_bias: torch.Tensor,
                      k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
    """out [B, Hq, D] of `decode_attention_reference` for CPU tensors, through the fused kernel (see above)."""
    b, hq, d = q.shape
    hkv, c = k_slots.shape[1], k_slots.shape[2]
    g = hq // hkv
    k_slots, v_slots, slot_bias = k_slots.contiguous(), v_slots.contiguous(), slot_bias.contiguous()  # no-ops
    s = split_count(b, hkv, c, torch.get_num_threads())
    length = c // s  # the last c - s * length (< s) slots are folded in beside the new token
    scale = 1.0 / math.sqrt(d)
    qg = q.reshape(b, hkv, g, d).float()  # [B, Hkv, G, D]: a group's query heads are rows of its KV head
    q_pieces = q.reshape(b * hkv, 1, g, d).expand(b * hkv, s, g, d)
    bias = _pieces(slot_bias.to(q.dtype)[..., None], s, length)[..., 0][:, :, None, :]  # [B*Hkv, s, 1, L]
    out_p, lse = _flash(q_pieces, _pieces(k_slots, s, length), _pieces(v_slots, s, length), attn_mask=bias,
                        scale=scale)  # [B*Hkv, s, G, D], [B*Hkv, s, G]
    out_p = out_p.reshape(b, hkv, s, g, d).float()
    # The kernel returns lse = 0 and a zero output for a row that sees no slot: make that piece weigh nothing.
    sees = torch.isfinite(slot_bias[..., : s * length]).reshape(b, hkv, s, length).any(dim=-1)[..., None]
    lse = torch.where(sees, lse.reshape(b, hkv, s, g).float(), float("-inf"))  # [B, Hkv, s, G]
    # The tail slots and the new token: plain logits [B, Hkv, G, E] and values [B, Hkv, E, D].
    k_extra = torch.cat([k_slots[:, :, s * length:], k_new[:, :, None]], dim=2).float()
    v_extra = torch.cat([v_slots[:, :, s * length:], v_new[:, :, None]], dim=2).float()
    extra_bias = torch.cat([slot_bias[..., s * length:], slot_bias.new_zeros(b, hkv, 1)], dim=-1).float()
    l_extra = torch.einsum("bhgd,bhed->bhge", qg, k_extra) * scale + extra_bias[:, :, None, :]
    top = torch.maximum(lse.amax(dim=2), l_extra.amax(dim=-1))  # [B, Hkv, G]; finite: the new token's logit
    w_pieces = (lse - top[:, :, None]).exp()  # [B, Hkv, s, G]; 0 for a piece that sees no slot
    w_extra = (l_extra - top[..., None]).exp()  # [B, Hkv, G, E]
    mixed = torch.where(w_pieces[..., None] > 0, out_p * w_pieces[..., None], 0.0).sum(dim=2)
    mixed = mixed + torch.einsum("bhge,bhed->bhgd", w_extra, v_extra)
    out = mixed / (w_pieces.sum(dim=2) + w_extra.sum(dim=-1))[..., None]
    return out.to(q.dtype).reshape(b, hq, d)


@decode_output_cpu.register_fake
def _(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, slot_bias: torch.Tensor,
      k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


@torch.library.custom_op("kvzoo::store_output_cpu", mutates_args=())
def store_output_cpu(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor,
                     slot_bias: torch.Tensor) -> torch.Tensor:
    """out [B, Hq, D] of `store_attention_reference` for CPU tensors: one call of the fused kernel over the
    store, a group's query heads as rows of its KV head. Not split into pieces: with nothing to fold in, the
    whole rows measured 5-15% faster than pieces at 1k-8k slots (tools/RESULTS.md; `bench_decode_paths.py
    --compare split` at commit d56c658, when this op still split; the tool's split arms now time the fold)."""
    b, hq, d = q.shape
    hkv = k_slots.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]
    mask = slot_bias.to(q.dtype)[:, :, None, :]  # [B, Hkv, 1, C]
    out, _ = _flash(qg, k_slots.contiguous(), v_slots.contiguous(), attn_mask=mask, scale=1.0 / math.sqrt(d))
    return out.reshape(b, hq, d)


@store_output_cpu.register_fake
def _(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, slot_bias: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)
