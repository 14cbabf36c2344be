"""The uncompressed cache, expressed as a policy that never evicts: slot index = token position."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvzoo.cache.base import CompressionMethod
from kvzoo.cache.slots import LayerSlots

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk
    from kvzoo.config import ModelConfig


@dataclass
class FullCache(CompressionMethod):
    """No compression: every token keeps its own slot (capacity = prompt + new tokens); no budget."""

    reads_decode_probs = False
    decode_writes_first = True  # slot index = position: the new token's slot is always free

    def slots_in_use(self, capacity: int, tokens_seen: int) -> int:
        return min(capacity, tokens_seen)  # slot index = position < tokens seen

    def prefill_budgets(self, cfg: "ModelConfig", prompt_lens: list[int]) -> list[list[int]]:
        return [list(prompt_lens)] * cfg.num_layers

    def decode_headroom(self, max_new_tokens: int) -> int:
        return max_new_tokens

    def compress_prefill(self, layer_idx: int, slots: LayerSlots, chunk: "PrefillChunk") -> None:
        # Only real tokens are written (padding never occupies a slot); prefill is eager, so
        # data-dependent indexing is fine here.
        b_idx, t_idx = (chunk.q_pos >= 0).nonzero(as_tuple=True)
        p = chunk.q_pos[b_idx, t_idx]
        slots.k[b_idx, :, p] = chunk.k[b_idx, :, t_idx].to(slots.k.dtype)
        slots.v[b_idx, :, p] = chunk.v[b_idx, :, t_idx].to(slots.v.dtype)
        slots.logw[b_idx, :, p] = 0.0
        slots.pos[b_idx, :, p] = p[:, None]

    def decode_step(
        self,
        layer_idx: int,
        slots: LayerSlots,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        pos_new: torch.Tensor,
        probs: torch.Tensor | None,
    ) -> None:
        b, hkv = k_new.shape[:2]
        index = pos_new[:, None].expand(b, hkv)
        zeros = torch.zeros(b, hkv, device=k_new.device)
        slots.write(index, k_new, v_new, zeros, zeros, index)
