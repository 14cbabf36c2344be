"""Building blocks shared by every model family: RMSNorm, rotary embeddings, the gated MLP, fused linears."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm; normalises in fp32 and casts back, as the reference implementation does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class FusedLinear(nn.Linear):
    """Several linear maps of the same input run as one GEMM (q/k/v, gate/up): one weight read, one call.

    `parts` maps each checkpoint module name to its output size, in the order of the fused rows. Attach it
    with `add_fused_linear`, which keeps the parts' checkpoint keys in `state_dict()` / `load_state_dict()`.
    """

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = dict(parts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        """x [..., in] -> one [..., out_i] view per part."""
        return F.linear(x, self.weight, self.bias).split(list(self.parts.values()), dim=-1)


def add_fused_linear(parent: nn.Module, name: str, fused: FusedLinear) -> None:
    """Register `fused` as `parent.<name>`; its state dict keys stay the parts' (`q_proj.weight`, ...).

    Saving splits the fused weight/bias into the part keys; loading concatenates the part keys back, so
    checkpoints, strict loading and `state_dict()` see the unfused layout.
    """
    setattr(parent, name, fused)
    parent.register_state_dict_post_hook(partial(_split_fused_keys, name))
    parent.register_load_state_dict_pre_hook(partial(_join_fused_keys, name))


def _split_fused_keys(name: str, module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    fused: FusedLinear = getattr(module, name)
    for kind in ("weight", "bias"):
        key = f"{prefix}{name}.{kind}"
        if key not in state_dict:
            continue
        pieces = state_dict.pop(key).split(list(fused.parts.values()), dim=0)
        for part, piece in zip(fused.parts, pieces):
            state_dict[f"{prefix}{part}.{kind}"] = piece


def _join_fused_keys(name: str, module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any,
                     _strict: bool, missing_keys: list[str], _unexpected: list[str], _errors: list[str]) -> None:
    fused: FusedLinear = getattr(module, name)
    kinds = ("weight", "bias") if fused.bias is not None else ("weight",)
    for kind in kinds:
        keys = [f"{prefix}{part}.{kind}" for part in fused.parts]
        present = [k for k in keys if k in state_dict]
        if not present:
            continue  # nothing of this layout here: strict loading reports the fused key as missing
        if len(present) < len(keys):
            missing_keys.extend(k for k in keys if k not in state_dict)
            continue
        state_dict[f"{prefix}{name}.{kind}"] = torch.cat([state_dict.pop(k) for k in keys], dim=0)


class GatedMLP(nn.Module):
    """SwiGLU MLP (LLaMA, Mistral): down(silu(gate(x)) * up(x)); gate and up run as one fused GEMM while
    the state dict keeps the checkpoint's `gate_proj` / `up_proj` / `down_proj` keys."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        add_fused_linear(self, "gate_up_proj", FusedLinear(hidden, {"gate_proj": intermediate, "up_proj": intermediate}, bias))
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class RotaryTable:
    """cos/sin tables of rotate-half RoPE for positions 0 .. size-1, built once per (device, dtype) and
    indexed by position, so a decode step does one gather instead of recomputing the frequencies.

    The table covers `max_position_embeddings`; `reserve(n)` grows it (generation past the context).
    Entries are `rotary_cos_sin` of their position: angles in fp32, then cos/sin, then the model's dtype.
    """

    def __init__(self, head_dim: int, theta: float, linear_factor: float, size: int) -> None:
        self.head_dim, self.theta, self.linear_factor = head_dim, theta, linear_factor
        self.size = size
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def reserve(self, size: int) -> None:
        """Make positions up to size - 1 valid (tables are rebuilt lazily on next use)."""
        if size > self.size:
            self.size = size
            self._tables.clear()

    def tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [size, head_dim] on `device` in `dtype`."""
        key = (torch.device(device), dtype)
        if key not in self._tables:
            positions = torch.arange(self.size, device=device)[None]
            cos, sin = rotary_cos_sin(positions, self.head_dim, self.theta, self.linear_factor, dtype)
            self._tables[key] = (cos[0, 0].contiguous(), sin[0, 0].contiguous())
        return self._tables[key]

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, T, head_dim] for positions [B, T] (< size; padding -1 reads position 0)."""
        cos, sin = self.tables(positions.device, dtype)
        index = positions.clamp(min=0)
        return cos[index][:, None], sin[index][:, None]


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, linear_factor: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for rotate-half RoPE at the given positions (the definition `RotaryTable` tabulates).

    positions: [B, T] integer positions (padding may be -1: it is clamped to 0, its output is never used).
    Returns two [B, 1, T, head_dim] tensors (the 1 broadcasts over heads). Computed in fp32, then cast.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    t = positions.clamp(min=0).to(torch.float32) / linear_factor
    freqs = t[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by the angles in cos/sin [B, 1, T, D] (rotate-half convention, as in HF)."""
    return x * cos + _rotate_half(x) * sin
