"""Falcon (rotary variants): 7B-style multi-query, 40B/180B-style grouped QKV, and plain multi-head.

The three layouts differ only in how the fused `query_key_value` projection is split into heads:
- "multi_query" (7B): [q_0 .. q_{H-1}, k, v] — one shared K/V head;
- "grouped" (new_decoder_architecture): per KV group [q_0 .. q_{G-1}, k, v];
- "mha": per head [q, k, v].
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kvzoo.attention import ForwardContext, attend
from kvzoo.config import ModelConfig
from kvzoo.layers import apply_rope
from kvzoo.models.base import CausalLM


class FalconAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.layout = cfg.falcon_layout
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, qkv_out, bias=cfg.bias)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.bias)

    def split_heads(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fused [B, T, (H + 2 Hkv) * D] -> q [B, Hq, T, D], k and v [B, Hkv, T, D]."""
        b, t, _ = fused.shape
        d, hkv = self.head_dim, self.num_kv_heads
        if self.layout == "mha":
            qkv = fused.view(b, t, self.num_heads, 3, d)
            q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        else:  # multi_query is the grouped layout with a single group
            qkv = fused.view(b, t, hkv, self.num_heads // hkv + 2, d)
            q = qkv[..., :-2, :].reshape(b, t, self.num_heads, d)
            k, v = qkv[..., -2, :], qkv[..., -1, :]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.split_heads(self.query_key_value(x))
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        out = attend(self.layer_idx, q, k, v, ctx)
        return self.dense(out.transpose(1, 2).reshape(b, t, -1))


class FalconMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.bias)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.parallel = cfg.parallel_attn
        self.two_norms = cfg.num_ln_in_parallel_attn == 2
        norm = lambda: nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)  # noqa: E731
        if self.two_norms:
            self.ln_attn, self.ln_mlp = norm(), norm()
        else:
            self.input_layernorm = norm()
            if not self.parallel:
                self.post_attention_layernorm = norm()
        self.self_attention = FalconAttention(cfg, layer_idx)
        self.mlp = FalconMLP(cfg)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if not self.parallel:  # sequential: x + attn, then + mlp
            x = x + self.self_attention(self.input_layernorm(x), ctx)
            return x + self.mlp(self.post_attention_layernorm(x))
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        attn_out = self.self_attention(attn_in, ctx)
        return x + (self.mlp(mlp_in) + attn_out)


class FalconBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.h = nn.ModuleList(FalconDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


class Falcon(CausalLM):
    """A Falcon decoder (`model_type: falcon`, legacy `RefinedWeb*`); ALiBi checkpoints are refused."""

    family = "falcon"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.transformer = FalconBackbone(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.word_embeddings(input_ids)

    def blocks(self) -> Iterator[nn.Module]:
        return iter(self.transformer.h)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer.ln_f(x)

    def output_weight(self) -> torch.Tensor:
        return self.transformer.word_embeddings.weight if self.config.tie_word_embeddings else self.lm_head.weight
