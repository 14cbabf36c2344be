"""What a compression method sees at prefill: one layer's queries, keys and values of a prompt chunk, and the
candidates the chunk's queries attended to ([slots already in use ; the chunk's own tokens])."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvzoo.cache.slots import LayerSlots, attention_bias


@dataclass
class PrefillChunk:
    """What a compression method sees after one layer's exact attention over a prompt chunk."""

    q: torch.Tensor  # [B, Hq, T, D] post-RoPE queries of the chunk
    k: torch.Tensor  # [B, Hkv, T, D] post-RoPE keys of the chunk
    v: torch.Tensor  # [B, Hkv, T, D]
    q_pos: torch.Tensor  # [B, T] positions of the chunk's tokens, -1 at padding
    # Candidates = [slots already in use ; chunk tokens], the keys this chunk's queries attended to.
    keys: torch.Tensor  # [B, Hkv, S, D]
    values: torch.Tensor  # [B, Hkv, S, D]
    key_pos: torch.Tensor  # [B, Hkv, S]
    key_logw: torch.Tensor  # [B, Hkv, S] (-inf: empty slot or padding)
    key_score: torch.Tensor  # [B, Hkv, S] the slots' scores so far (0 for chunk tokens)
    window: int | None  # sliding window of the model (Mistral), else None
    alpha: float  # logw bias scale used for this attention
    # Derived statistics (e.g. column sums of the attention) computed once per chunk and shared by every
    # method that reads the same chunk (several methods fed by one prefill, see kvzoo.eval.fanout).
    memo: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    # cos, sin [B, 1, T, D] that rotated the chunk's q and k (None: no rotary embedding), so a method can read
    # the pre-RoPE keys, whose geometry does not depend on position (scoring.pre_rope_keys).
    rope: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    # [B, Hq, T] fp32 log partition function of each query's attention over the candidates, when the attention
    # kernel returned it (a fresh causal prompt on the CPU): the accumulated-attention statistic reuses it
    # instead of running that attention again (kvzoo_kernels/column_sums_cpu.py). None: not known.
    row_lse: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def key_bias(self) -> torch.Tensor:
        return attention_bias(self.key_logw, self.alpha)

    @property
    def slots_before(self) -> int:
        """How many cache slots were in use before the chunk: the first candidates, ahead of the chunk's own
        tokens (0 for a fresh prompt)."""
        return self.keys.shape[2] - self.k.shape[2]

    def first_positions(self) -> torch.Tensor:
        """[B] each sequence's first position in the chunk (padding, -1, skipped)."""
        return self.q_pos.masked_fill(self.q_pos < 0, torch.iinfo(torch.int64).max).min(dim=1).values

    def continues_a_prompt(self, slots: LayerSlots) -> torch.Tensor:
        """[B] bool: whether each sequence's chunk starts a later prompt (at or past where the cached prompt
        ended, `state["prompt_len"]`: a question to a stored document, a conversation's next turn) rather than
        going on with the prompt the cache was made for."""
        return self.first_positions() >= slots.state["prompt_len"]


def make_prefill_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    slots: LayerSlots | None,
    used: int,
    alpha: float,
    window: int | None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> PrefillChunk:
    """The candidates a chunk's queries attend to: the first `used` slots, then the chunk's own tokens."""
    b, hkv, t, _ = k.shape
    chunk_pos = positions[:, None, :].expand(b, hkv, t)
    chunk_logw = torch.where(chunk_pos >= 0, 0.0, float("-inf"))
    chunk_score = torch.zeros_like(chunk_logw)
    if slots is None or used == 0:
        return PrefillChunk(q, k, v, positions, k, v, chunk_pos, chunk_logw, chunk_score, window, alpha, rope=rope)
    return PrefillChunk(
        q, k, v, positions,
        keys=torch.cat([slots.k[:, :, :used], k], dim=2),
        values=torch.cat([slots.v[:, :, :used], v], dim=2),
        key_pos=torch.cat([slots.pos[:, :, :used], chunk_pos], dim=2),
        key_logw=torch.cat([slots.logw[:, :, :used], chunk_logw], dim=2),
        key_score=torch.cat([slots.score[:, :, :used], chunk_score], dim=2),
        window=window,
        alpha=alpha,
        rope=rope,
    )
