"""The slot cache: one fixed-capacity store per layer that expresses eviction and merging alike.

Every slot holds one key/value pair and three small statistics. A slot can stand for several original tokens
(a merged slot), which attention honours through the bias `alpha * logw`. Empty slots have `logw = -inf` and
`pos = -1`, so no lengths or masks are needed: padding and unused capacity are simply empty slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NEG_INF = float("-inf")


def attention_bias(logw: torch.Tensor, alpha: float) -> torch.Tensor:
    """Additive attention bias of slots or candidates: alpha * logw where filled, -inf where empty.

    Empties are selected explicitly: with alpha = 0, 0 * -inf would be NaN.
    """
    filled = torch.isfinite(logw)
    return torch.where(filled, alpha * torch.where(filled, logw, 0.0), NEG_INF)


@dataclass
class LayerSlots:
    k: torch.Tensor  # [B, Hkv, C, D] post-RoPE keys (a merged slot: the count-weighted mean of its members)
    v: torch.Tensor  # [B, Hkv, C, D] values
    logw: torch.Tensor  # [B, Hkv, C] fp32: log(number of tokens the slot stands for); 0 = one; -inf = empty
    score: torch.Tensor  # [B, Hkv, C] fp32: the method's importance statistic (accumulated/decayed attention)
    pos: torch.Tensor  # [B, Hkv, C] int64: position of the slot's token (representative one if merged); -1 empty
    budget: torch.Tensor  # [B] int64: slots sequence b may fill (<= C); the rest stay empty
    # Method-specific state, e.g. ZSMerge's proximity-ring pointer; counted in nbytes().
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(
        cls,
        batch: int,
        kv_heads: int,
        capacity: int,
        head_dim: int,
        budget: torch.Tensor,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> "LayerSlots":
        shape = (batch, kv_heads, capacity)
        return cls(
            k=torch.zeros(*shape, head_dim, dtype=dtype, device=device),
            v=torch.zeros(*shape, head_dim, dtype=dtype, device=device),
            logw=torch.full(shape, NEG_INF, dtype=torch.float32, device=device),
            score=torch.zeros(shape, dtype=torch.float32, device=device),
            pos=torch.full(shape, -1, dtype=torch.int64, device=device),
            budget=budget.to(device=device, dtype=torch.int64),
        )

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def filled(self) -> torch.Tensor:
        """[B, Hkv, C] bool: which slots hold something."""
        return torch.isfinite(self.logw)

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.logw, self.score, self.pos, self.budget, *self.state.values()]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def slot_bias(self, alpha: float) -> torch.Tensor:
        """[B, Hkv, C] additive attention bias of the slots (see `attention_bias`)."""
        return attention_bias(self.logw, alpha)

    def write(
        self,
        index: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        logw: torch.Tensor,
        score: torch.Tensor,
        pos: torch.Tensor,
    ) -> None:
        """Overwrite one slot per (batch, head): index [B, Hkv]; k, v [B, Hkv, D]; logw, score, pos [B, Hkv]."""
        idx = index[..., None]
        self.k.scatter_(2, idx[..., None].expand(*idx.shape, self.k.shape[-1]), k[:, :, None].to(self.k.dtype))
        self.v.scatter_(2, idx[..., None].expand(*idx.shape, self.v.shape[-1]), v[:, :, None].to(self.v.dtype))
        self.logw.scatter_(2, idx, logw[..., None].to(self.logw.dtype))
        self.score.scatter_(2, idx, score[..., None].to(self.score.dtype))
        self.pos.scatter_(2, idx, pos[..., None].to(self.pos.dtype))

    def read(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The contents (k, v, logw, score, pos) of one slot per (batch, head); index [B, Hkv]."""
        idx = index[..., None]
        d = self.k.shape[-1]
        return (
            self.k.gather(2, idx[..., None].expand(*idx.shape, d))[:, :, 0],
            self.v.gather(2, idx[..., None].expand(*idx.shape, d))[:, :, 0],
            self.logw.gather(2, idx)[..., 0],
            self.score.gather(2, idx)[..., 0],
            self.pos.gather(2, idx)[..., 0],
        )

    def replace_all(self, k: torch.Tensor, v: torch.Tensor, logw: torch.Tensor, score: torch.Tensor,
                    pos: torch.Tensor) -> None:
        """Overwrite the first n slots with the given [B, Hkv, n(, D)] contents and empty the rest."""
        n = k.shape[2]
        if n > self.capacity:
            raise ValueError(f"{n} slots given for a cache of capacity {self.capacity}")
        self.k[:, :, :n] = k
        self.v[:, :, :n] = v
        self.logw[:, :, :n] = logw
        self.score[:, :, :n] = score
        self.pos[:, :, :n] = pos
        self.logw[:, :, n:] = NEG_INF
        self.score[:, :, n:] = 0.0
        self.pos[:, :, n:] = -1


@dataclass
class KVCache:
    """The whole model's cache: one LayerSlots per layer, plus the method that manages them."""

    layers: list[LayerSlots]
    method: "object"  # kvzoo.cache.base.CompressionMethod (untyped here to avoid an import cycle)
    tokens_seen: int = 0  # host-side count of prefill positions fed so far (padding included)

    def nbytes(self) -> int:
        """Bytes held by every tensor of the cache."""
        return sum(layer.nbytes() for layer in self.layers)

    def budgets(self) -> torch.Tensor:
        """[L, B] slots each sequence may use per KV head, per layer."""
        return torch.stack([layer.budget for layer in self.layers])

    def filled_slots(self) -> torch.Tensor:
        """[L, B, Hkv] slots currently filled."""
        return torch.stack([layer.filled.sum(-1) for layer in self.layers])
