"""What reading a document again reads of it: a query-agnostic importance from the model's own copying.

A question asked after a document was compressed is answered through the model's copy (induction) heads,
which read the token after the phrase the question quotes (tools/RESULTS.md, "Session 21"). While the document
itself is read, those heads have nothing to copy, so no statistic of the document's own attention says what
they will need. Feeding the document a second time makes them copy every token of it: each query of the second
copy reads, in the first copy, the token it is about to reproduce. The largest attention a first-copy token
gets from any query of the second copy (and any query head of its KV head) is its reconstruction score, as
KVzip ranks tokens (Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv
2505.23416), there with an instruction ("Repeat the previous context") between the copies; here the copies
are adjacent, which needs no tokenizer and is what the model's induction heads respond to. It costs one more
forward over twice the document, once per stored document.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from kvzoo.cache.observe import PrefillObserver, observe_prefill
from kvzoo_kernels.attention import attention_probs

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk
    from kvzoo.cache.slots import KVCache, LayerSlots
    from kvzoo.models.base import CausalLM

_LAST: list[tuple] = []  # the last (model, ids, positions, scores): several budgets of one document score it once
QUERY_BLOCK = 256  # second-copy queries whose attention is materialised at once: [B, Hq, 256, 2T] fp32


class _SecondCopyReads(PrefillObserver):
    """Records, per layer, the largest attention each first-copy key gets from the second copy's queries."""

    def __init__(self, lengths: torch.Tensor) -> None:
        self.lengths = lengths  # [B] document lengths n_b: positions < n_b are the first copy
        self.scores: list[torch.Tensor] = []

    def compress_prefill(self, layer_idx: int, slots: "LayerSlots", chunk: "PrefillChunk") -> None:
        b, hq, t, _ = chunk.q.shape
        hkv = chunk.keys.shape[1]
        n = self.lengths[:, None]  # [B, 1]
        best = torch.zeros(b, hkv, chunk.keys.shape[2], device=chunk.q.device)  # [B, Hkv, S]
        first_query = t - int(self.lengths.max())  # every second-copy query is in the last max(n) columns
        for start in range(first_query, t, QUERY_BLOCK):
            q_pos = chunk.q_pos[:, start:start + QUERY_BLOCK]  # [B, t']
            probs = attention_probs(chunk.q[:, :, start:start + QUERY_BLOCK], chunk.keys, q_pos, chunk.key_pos,
                                    chunk.key_bias, chunk.window)  # [B, Hq, t', S]
            second = (q_pos >= n).float()[:, None, :, None]  # only the second copy's queries count
            per_kv = (probs * second).reshape(b, hkv, hq // hkv, -1, probs.shape[-1]).amax(dim=(2, 3))
            best = torch.maximum(best, per_kv)
        first = (chunk.key_pos >= 0) & (chunk.key_pos < n[:, :, None])  # [B, Hkv, S] first-copy keys
        self.scores.append(torch.where(first, best, 0.0))


@torch.inference_mode()
def reconstruction_scores(model: "CausalLM", ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[L, B, Hkv, T] fp32 the reconstruction score of every token of the left-padded documents ids [B, T]
    (positions [B, T], -1 at padding; each document's positions 0..n_b-1), 0 at padding: one forward over
    each document followed by itself. The last call's result is reused for the same model and documents (an
    evaluation compresses one document at several budgets)."""
    if _LAST and _LAST[0][0]() is model and torch.equal(_LAST[0][1], ids) and torch.equal(_LAST[0][2], positions):
        return _LAST[0][3]
    lengths = (positions >= 0).sum(dim=1)  # [B] n_b
    t = ids.shape[1]
    # [B, 2T] each row's tokens, then the same tokens again, left-padded (padding: id 0, position -1).
    twice = torch.cat([ids, ids], dim=1)
    twice_pos = torch.cat([positions, positions + lengths[:, None]], dim=1).masked_fill(
        torch.cat([positions, positions], dim=1) < 0, -1)
    order = (twice_pos >= 0).long().argsort(dim=1, stable=True)  # padding first, then both copies in order
    twice, twice_pos = twice.gather(1, order), twice_pos.gather(1, order)
    reads = _SecondCopyReads(lengths)
    observe_prefill(model, twice, twice_pos, reads)
    scores = torch.stack(reads.scores)  # [L, B, Hkv, 2N]: the first copy at each row's left-padded positions
    # The document's token at position p sits at column 2T - 2n_b + p of `twice` (and T - n_b + p of `ids`).
    at = positions.clamp(min=0) + (2 * t - 2 * lengths)[:, None]  # [B, T]
    picked = scores.gather(-1, at[None, :, None, :].expand(scores.shape[0], -1, scores.shape[2], t))
    result = torch.where(positions[None, :, None, :] >= 0, picked, 0.0)
    _LAST[:] = [(weakref.ref(model), ids.clone(), positions.clone(), result)]
    return result


def score_a_fresh_document(model: "CausalLM", cache: "KVCache", ids: torch.Tensor, positions: torch.Tensor) -> None:
    """Before a prompt's forward (`before_prefill`): put each layer's reconstruction scores [B, Hkv, T] in its
    state for `take_reconstruction_scores`, when the prompt is a document on an empty cache (a later prompt to a
    stored document is not reconstructed)."""
    if cache.tokens_seen > 0:
        return
    for slots, scores in zip(cache.layers, reconstruction_scores(model, ids, positions)):
        slots.state["reconstruction"] = scores


def take_reconstruction_scores(slots: "LayerSlots", chunk: "PrefillChunk") -> torch.Tensor | None:
    """[B, Hkv, S] the chunk's reconstruction scores (-inf at padding), removed from the layer's state (read
    once, never kept in the cache), or None for a chunk that was not scored (`score_a_fresh_document`)."""
    scores = slots.state.pop("reconstruction", None)
    return None if scores is None else scores.masked_fill(chunk.key_pos < 0, float("-inf"))
