"""Decode attention when the method does not read the probabilities: the output only.

Same output as `decode_attention.decode_attention_reference` (one query token over [C slots ; the new token],
slot bias alpha * log w, GQA), without the [B, Hq, C + 1] probabilities. On the CPU the slots go through the
fused flash-attention kernel, which returns each row's logsumexp beside the output, and the new token is
folded in afterwards without concatenating it to the store:

    out = (e^{lse} * out_slots + e^{l_new} * v_new) / (e^{lse} + e^{l_new}),   l_new = q . k_new / sqrt(D)

(computed relative to max(lse, l_new)). Methods that only append or evict by position (the full cache,
StreamingLLM, the prefill-only methods) take this path through `decode_attention(..., with_probs=False)`;
see `CompressionMethod.reads_decode_probs`.
"""

from __future__ import annotations

import math

import torch

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def decode_output_cpu(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, slot_bias: torch.Tensor,
                      k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
    """out [B, Hq, D] of `decode_attention_reference` for CPU tensors, through the fused kernel (see above)."""
    b, hq, d = q.shape
    hkv = k_slots.shape[1]
    scale = 1.0 / math.sqrt(d)
    qg = q.reshape(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]: a group's query heads are rows of its KV head
    mask = slot_bias[:, :, None, :].to(q.dtype)  # [B, Hkv, 1, C], -inf at empty slots
    out_slots, lse = _flash(qg, k_slots, v_slots, attn_mask=mask, scale=scale)  # [B, Hkv, G, D], [B, Hkv, G]
    # The kernel returns lse = 0 and a zero output for a row that sees no slot: make that row weigh nothing.
    sees_slots = torch.isfinite(slot_bias).any(dim=-1)[..., None]  # [B, Hkv, 1]
    lse = torch.where(sees_slots, lse.float(), float("-inf"))
    l_new = torch.einsum("bhgd,bhd->bhg", qg, k_new).float() * scale
    top = torch.maximum(lse, l_new)
    w_slots = (lse - top).exp()  # 0 when no slot is visible (lse = -inf)
    w_new = (l_new - top).exp()
    mixed = torch.where(w_slots[..., None] > 0, out_slots.float() * w_slots[..., None], 0.0)
    out = (mixed + v_new[:, :, None, :].float() * w_new[..., None]) / (w_slots + w_new)[..., None]
    return out.to(q.dtype).reshape(b, hq, d)
