"""Copy heads: the KV heads through which a model copies a token it has seen (induction heads).

When a question asks for a fact in a document, the answer is read through a handful of heads that attend to
the token after an earlier copy of what they are reading ("the passkey is" -> the code that followed it
there). tools/RESULTS.md, "Session 21": on SmolLM2-135M the same four of 90 KV heads read every needle's
answer, and while the document is read they have nothing to copy, so no statistic of the document's own
attention tells them what to keep.

They are found without data, once per model, as induction heads are (Olsson et al. 2022; RazorAttention,
Tang et al. 2024): a random token sequence fed twice; a head's score is the attention each query of the
second copy gives the token that followed its counterpart in the first copy (the largest over the query heads
sharing the KV head, averaged over the queries). A head that copies scores near 1, any other near 0.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from kvzoo.cache.observe import PrefillObserver, observe_prefill
from kvzoo_kernels.attention import attention_probs

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk
    from kvzoo.cache.slots import LayerSlots
    from kvzoo.models.base import CausalLM

PROBE_TOKENS = 256  # length of the random sequence; it is fed twice
PROBE_SEED = 0
# An induction score above this marks a copy head (on SmolLM2-135M the five heads above it are the ones every
# needle's answer is read through; tools/RESULTS.md, "Session 21"): ZSMerge's
# `stored_copy_heads` default and the heads that keep the sum with accumulated="..._outside_copy_heads".
COPY_HEAD_THRESHOLD = 0.3
_SCORES: "weakref.WeakKeyDictionary[CausalLM, torch.Tensor]" = weakref.WeakKeyDictionary()


def probe_ids(vocab_size: int, length: int = PROBE_TOKENS, seed: int = PROBE_SEED) -> torch.Tensor:
    """[2 * length] a seeded random sequence from the middle of the vocabulary (away from the special tokens
    that vocabularies put first or last), then the same sequence again."""
    low, high = vocab_size // 8, max(vocab_size // 8 + 2, vocab_size * 7 // 8)
    half = torch.randint(low, high, (length,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([half, half])


def successor_attention(probs: torch.Tensor, length: int, num_kv_heads: int) -> torch.Tensor:
    """[Hkv] the induction score from probs [Hq, length, 2 * length], the attention of the second copy's
    queries: query i (position length + i) reading key i + 1, the token after its counterpart; the largest over
    a KV head's query heads, averaged over the queries."""
    hq = probs.shape[0]
    i = torch.arange(length - 1)  # the last query's counterpart is followed by the second copy's first token
    read = probs[:, i, i + 1].mean(dim=-1)  # [Hq]
    return read.reshape(num_kv_heads, hq // num_kv_heads).amax(dim=1)


class _InductionProbe(PrefillObserver):
    """Records `successor_attention` of every layer's chunk of the probe's prefill."""

    def __init__(self, length: int) -> None:
        self.length, self.scores = length, []

    def compress_prefill(self, layer_idx: int, slots: LayerSlots, chunk: "PrefillChunk") -> None:
        n = self.length
        probs = attention_probs(chunk.q[:, :, n:], chunk.keys, chunk.q_pos[:, n:], chunk.key_pos, chunk.key_bias,
                                chunk.window)  # [1, Hq, n, 2n]
        self.scores.append(successor_attention(probs[0].float(), n, chunk.keys.shape[1]))


@torch.inference_mode()
def induction_scores(model: "CausalLM") -> torch.Tensor:
    """[L, Hkv] every KV head's induction score, computed once per model (one forward of 2 * 256 tokens)."""
    if model in _SCORES:
        return _SCORES[model]
    cfg = model.config
    param = next(model.parameters())
    length = min(PROBE_TOKENS, cfg.max_position_embeddings // 2)
    if cfg.sliding_window is not None:  # the second copy must see the first
        length = min(length, cfg.sliding_window // 2)
    ids = probe_ids(cfg.vocab_size, length).to(param.device)[None]
    probe = _InductionProbe(length)
    observe_prefill(model, ids, torch.arange(2 * length, device=param.device)[None], probe)
    _SCORES[model] = torch.stack(probe.scores)
    return _SCORES[model]
