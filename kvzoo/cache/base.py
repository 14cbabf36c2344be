"""The interface every compression method implements: a policy on the slot cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvzoo.cache.slots import KVCache, LayerSlots

if TYPE_CHECKING:
    from kvzoo.attention import PrefillChunk
    from kvzoo.config import ModelConfig


class CompressionMethod:
    """A method decides how many slots each layer gets and what goes into them.

    Hooks (all optional but `compress_prefill` / `decode_step`):
    - `sequence_budgets`: slots per KV head for each sequence, from its prompt length;
    - `make_cache`: allocates the per-layer slot stores (capacity fixed before the first decode step);
    - `compress_prefill`: after a layer's exact attention over a prompt chunk, fill/evict/merge slots;
    - `decode_step`: after a decode step's attention, place the new token (tensor ops only: this runs
      inside the compiled decode step, so no `.item()`, no branching on tensor values, no data-dependent shapes).
    """

    @property
    def attention_alpha(self) -> float:
        """Scale of the `log w` attention bias of merged slots (0 for methods that never merge)."""
        return 0.0

    def sequence_budgets(self, prompt_lens: list[int], max_new_tokens: int) -> list[int]:
        raise NotImplementedError

    def layer_capacities(self, cfg: "ModelConfig", budgets: list[int], max_new_tokens: int) -> list[int]:
        """Capacity C of every layer's slot store; default: the largest sequence budget, for every layer."""
        return [max(budgets)] * cfg.num_layers

    def make_cache(
        self,
        cfg: "ModelConfig",
        prompt_lens: list[int],
        max_new_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        budgets = self.sequence_budgets(prompt_lens, max_new_tokens)
        budget = torch.tensor(budgets, dtype=torch.int64)
        layers = [
            LayerSlots.empty(len(prompt_lens), cfg.num_kv_heads, capacity, cfg.head_dim, budget, dtype, device)
            for capacity in self.layer_capacities(cfg, budgets, max_new_tokens)
        ]
        return KVCache(layers=layers, method=self)

    def compress_prefill(self, layer_idx: int, slots: LayerSlots, chunk: "PrefillChunk") -> None:
        raise NotImplementedError

    def decode_step(
        self,
        layer_idx: int,
        slots: LayerSlots,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        pos_new: torch.Tensor,
        probs: torch.Tensor,
    ) -> None:
        """k_new, v_new: [B, Hkv, D]; pos_new: [B]; probs: [B, Hq, C + 1] (last column: the new token)."""
        raise NotImplementedError

    def end_prefill(self, cache: KVCache) -> None:
        """Called once after the whole prompt has been fed (for methods that allocate from all layers)."""
