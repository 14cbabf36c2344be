"""What every model family shares: the forward over decoder blocks, loading, generation, reusable caches and
conversations.

A family file only defines its blocks (attention projections, MLP, norms) with module names equal to the
checkpoint keys, and says where its embedding, blocks, final norm and head live.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from kvzoo import generate as gen
from kvzoo import likelihood
from kvzoo.attention import ForwardContext, apply_deferred_updates, defer_decode_updates
from kvzoo.cache.slots import KVCache
from kvzoo.compile import BlockRunner, call_block
from kvzoo.config import ModelConfig
from kvzoo.conversation import Conversation
from kvzoo.errors import KvzooError
from kvzoo.layers import RotaryTable
from kvzoo.loading import load_pretrained

if TYPE_CHECKING:
    from kvzoo.tokenizer import Tokenizer

M = TypeVar("M", bound="CausalLM")


class CausalLM(nn.Module):
    """Base class of Llama2, Mistral and Falcon."""

    family: str = ""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer: Tokenizer | None = None
        # RoPE cos/sin by position, built on first use per device and dtype (not part of the state dict).
        self.rotary = RotaryTable(config.head_dim, config.rope_theta, config.rope_linear_factor,
                                  config.max_position_embeddings)

    # --- what a family provides -------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self) -> Iterator[nn.Module]:
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def output_weight(self) -> torch.Tensor:
        """The LM head's weight [V, hidden] (the embedding when tied)."""
        raise NotImplementedError

    def tied_head_keys(self) -> tuple[str, ...]:
        """Checkpoint keys that may be present but are ignored because the head is tied."""
        return ("lm_head.weight",) if self.config.tie_word_embeddings else ()

    # --- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        decode: bool = False,
        last_only: bool = False,
        run_block: BlockRunner = call_block,
    ) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with last_only) for input_ids [B, T].

        positions: [B, T] int64, -1 marks (left) padding; default 0..T-1. With a cache, prompt chunks are
        attended exactly and handed to the cache's method; `decode=True` runs one static-shaped decode step
        with no host synchronisation (its positions must be below `self.rotary.size`, at least the model's
        context: `generate` reserves more when a generation runs past it). `run_block` calls each decoder
        block (see `BlockRunner`).
        """
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        has_padding = False
        if cache is not None:  # host-side ints: no synchronisation
            self.rotary.reserve(max(cache.max_position, max(cache.lengths, default=0)) + 1)
        if not decode:  # one host read in prefill: padding, and the largest position for the RoPE table
            lowest, highest = torch.stack(torch.aminmax(positions)).tolist()
            has_padding = lowest < 0
            self.rotary.reserve(highest + 1)
            if cache is not None:
                cache.method.before_prefill(self, cache)
        x = self.embed(input_ids)
        cos, sin = self.rotary.lookup(positions, x.dtype)
        ctx = ForwardContext(
            positions=positions,
            cos=cos,
            sin=sin,
            cache=cache,
            decode=decode,
            window=self.config.sliding_window,
            has_padding=has_padding,
            # Eager only: a compiled block keeps each layer's update inside its graph, where it is fused.
            deferred=defer_decode_updates(cache) if decode and cache is not None and run_block is call_block else None,
        )
        for i, block in enumerate(self.blocks()):
            x = run_block(block, x, ctx.for_layer(i))
        if ctx.deferred is not None:
            apply_deferred_updates(cache, positions, ctx.deferred)
        if cache is not None and not decode:
            if cache.tokens_seen == 0 and cache.method.reads_prompt_surprisal:  # a fresh prompt, in one shot
                cache.prompt_surprisal = self._prompt_surprisal(x, input_ids, positions)
            cache.tokens_seen += input_ids.shape[1]
        if last_only:
            x = x[:, -1:]
        return torch.nn.functional.linear(self.final_norm(x), self.output_weight())

    def _prompt_surprisal(self, x: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
                          rows: int = 128) -> torch.Tensor:
        """[B, n_pos] -log p(ids[p] | ids before it) by position, from the last hidden states x [B, T, D] of a
        one-shot prompt (ids, positions [B, T]; -1 padding), `rows` positions of logits at a time (B x rows x V
        floats at once). The first token and padding get 0."""
        b, t, _ = x.shape
        out = torch.zeros(b, t, device=x.device, dtype=torch.float32)
        weight = self.output_weight()
        for start in range(0, t - 1, rows):
            end = min(start + rows, t - 1)
            logp = torch.log_softmax(torch.nn.functional.linear(self.final_norm(x[:, start:end]), weight).float(), -1)
            out[:, start + 1:end + 1] = -logp.gather(-1, ids[:, start + 1:end + 1, None])[..., 0]
        out = out.masked_fill(positions <= 0, 0.0)
        n_pos = int(positions.max()) + 1
        by_pos = torch.zeros(b, n_pos + 1, device=x.device)
        return by_pos.scatter(1, torch.where(positions >= 0, positions, n_pos), out)[:, :n_pos]

    # --- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls: type[M],
        path_or_hub_id: str | Path,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
    ) -> M:
        """Load a Hugging Face layout checkpoint (a local directory or a hub id) into this family."""
        return load_pretrained(path_or_hub_id, cls, dtype=dtype, device=device)  # type: ignore[return-value]

    @staticmethod
    def class_for(family: str) -> "type[CausalLM]":
        """The class of a family name (`ModelConfig.family`)."""
        from kvzoo.models import FAMILIES  # the package that lists the families imports this module

        return FAMILIES[family]

    # --- generation -------------------------------------------------------------------------------
    def generate(self, prompt: str | list[str], **kwargs: Any) -> Any:
        """Generate text; see `kvzoo.generate.generate_text` for every option (max_new_tokens default 256;
        an instruct checkpoint's chat template is applied by default; `cache=` continues a cache from
        `prefill`)."""
        return gen.generate_text(self, prompt, **kwargs)

    def generate_ids(self, prompt_ids: list[list[int]] | list[int], **kwargs: Any) -> Any:
        """Generate from token ids (no tokenizer needed); see `kvzoo.generate.generate_ids`."""
        return gen.generate_ids(self, prompt_ids, **kwargs)

    def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> Any:
        """Render `messages` with the checkpoint's chat template and generate the assistant's reply."""
        return gen.chat(self, messages, **kwargs)

    def prefill(self, context: str | list[str] | list[int] | list[list[int]],
                compression: "gen.Compression" = None, prefill_chunk: int | None = None,
                **kwargs: Any) -> KVCache:
        """The compressed cache of `context` alone (text or ids), to pass as `cache=` to `generate`,
        `generate_ids`, `chat` or `score` any number of times, or to `save`; see `kvzoo.generate.prefill_cache`."""
        return gen.prefill_cache(self, context, compression=compression, prefill_chunk=prefill_chunk, **kwargs)

    def conversation(self, system: str | None = None, compression: "gen.Compression" = None,
                     **kwargs: Any) -> Conversation:
        """A chat that keeps one cache across turns; see `kvzoo.conversation.Conversation`."""
        return Conversation(self, system=system, compression=compression, **kwargs)

    def score(self, context: str | list[int], continuation: str | list[int], **kwargs: Any) -> torch.Tensor:
        """Per-token log-probabilities of `continuation` given `context` compressed by `compression=`;
        see `kvzoo.likelihood.score`."""
        return likelihood.score(self, context, continuation, **kwargs)

    def require_tokenizer(self) -> "Tokenizer":
        if self.tokenizer is None:
            raise KvzooError(
                "this model has no tokenizer (the checkpoint has neither tokenizer.json nor tokenizer.model); "
                "use generate_ids() with token ids instead"
            )
        return self.tokenizer
