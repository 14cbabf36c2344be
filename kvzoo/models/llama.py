"""LLaMA-2 family (every `LlamaForCausalLM` checkpoint: MHA or GQA, tied or separate head, SmolLM2, TinyLlama).

State dict keys equal the checkpoint keys (`model.layers.N.self_attn.q_proj.weight`, ...), so loading is a
checked copy, not a rename table. q/k/v (and the MLP's gate/up) run as one fused projection each; the fused
weights are concatenated when the checkpoint is loaded and split again by `state_dict()`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from kvzoo.attention import ForwardContext, attend
from kvzoo.config import ModelConfig
from kvzoo.layers import FusedLinear, GatedMLP, RMSNorm, add_fused_linear, apply_rope
from kvzoo.models.base import CausalLM


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        parts = {"q_proj": q_out, "k_proj": kv_out, "v_proj": kv_out}
        add_fused_linear(self, "qkv_proj", FusedLinear(cfg.hidden_size, parts, cfg.attention_bias))
        bias = cfg.attention_bias
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        out = attend(self.layer_idx, q, k, v, ctx)  # [B, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class Llama2(CausalLM):
    """A LLaMA-2 architecture decoder (`model_type: llama`)."""

    family = "llama"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.model = LlamaBackbone(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def blocks(self) -> Iterator[nn.Module]:
        return iter(self.model.layers)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
