"""The reconstruction score (kvzoo.cache.reconstruction) and KVzip, the method that keeps by it."""

from __future__ import annotations

import pytest
import torch

import kvzoo
from kvzoo.cache.kvzip import KVzip
from kvzoo.cache.reconstruction import reconstruction_scores
from kvzoo.cache.zsmerge import ZSMerge
from kvzoo.errors import KvzooError

DOCS = [[(7 * i + 3) % 120 + 1 for i in range(40)], [(5 * i + 2) % 110 + 3 for i in range(27)]]


def _left_padded(docs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(map(len, docs))
    ids = torch.zeros(len(docs), t, dtype=torch.long)
    pos = torch.full((len(docs), t), -1)
    for b, d in enumerate(docs):
        ids[b, t - len(d):] = torch.tensor(d)
        pos[b, t - len(d):] = torch.arange(len(d))
    return ids, pos


def _reference(hf_model, doc: list[int], num_kv_heads: int) -> torch.Tensor:
    """[L, Hkv, n] from transformers' eager attention weights over the document followed by itself: the
    largest attention each first-copy token gets from a second-copy query of any query head of its KV head."""
    n = len(doc)
    with torch.no_grad():
        attentions = hf_model(torch.tensor([doc + doc]), output_attentions=True).attentions  # [1, Hq, 2n, 2n]
    per_layer = []
    for a in attentions:
        second = a[0, :, n:, :n]  # [Hq, n, n] second-copy queries over first-copy keys
        per_layer.append(second.reshape(num_kv_heads, -1, n, n).amax(dim=(1, 2)))
    return torch.stack(per_layer)


@pytest.mark.parametrize("name", ["llama-gqa", "falcon-7b-style"])
def test_scores_are_the_models_attention_when_reading_the_document_again(models, tiny_checkpoint, name):
    """Against transformers (the reference implementation), one document at a time, and a left-padded batch
    of two documents of different lengths gives each its own scores (0 at padding)."""
    model = models(name)
    hf_model = tiny_checkpoint(name)[0]
    ids, pos = _left_padded(DOCS)
    batch = reconstruction_scores(model, ids, pos)  # [L, B, Hkv, T]
    t = ids.shape[1]
    for b, doc in enumerate(DOCS):
        expected = _reference(hf_model, doc, model.config.num_kv_heads)
        torch.testing.assert_close(batch[:, b, :, t - len(doc):], expected, rtol=1e-5, atol=1e-6)  # fp32 parity
        assert (batch[:, b, :, :t - len(doc)] == 0).all()


def test_kvzip_keeps_the_sinks_and_then_the_highest_reconstruction_scores(models):
    model = models("llama-gqa")
    doc = DOCS[0]
    ids, pos = _left_padded([doc])
    scores = reconstruction_scores(model, ids, pos)[:, 0]  # [L, Hkv, n]
    cache = model.prefill(doc, compression=KVzip(budget=12, sinks=3))
    for layer, layer_scores in zip(cache.layers, scores):
        for h in range(layer_scores.shape[0]):
            kept = set(layer.pos[0, h][layer.pos[0, h] >= 0].tolist())
            rest = layer_scores[h].clone()
            rest[:3] = float("-inf")
            assert kept == {0, 1, 2} | set(rest.topk(9).indices.tolist())


def test_kvzip_scores_only_a_fresh_document_and_needs_it_whole(models):
    model = models("llama-gqa")
    cache = model.prefill(DOCS[0], compression=KVzip(budget=12))
    assert all("reconstruction" not in layer.state for layer in cache.layers)  # read once, not kept
    out = model.generate_ids([9, 8, 7], max_new_tokens=3, eos_token_ids=[], cache=cache)  # appended, not scored
    assert len(out.token_ids[0]) == 3  # the question is appended (tests/test_reuse.py), never scored
    with pytest.raises(KvzooError, match="chunk"):
        model.generate_ids(DOCS[0], max_new_tokens=1, compression=KVzip(budget=12), prefill_chunk=16)
    with pytest.raises(KvzooError, match="sinks"):
        KVzip(sinks=-1)


def test_zsmerge_reconstruction_context_is_the_sinks_then_the_top_of_the_reconstruction_score(models):
    """ZSMerge(context_rank="reconstruction"): the ring holds the newest tokens, the first 8 (Compactor's sinks)
    take context slots first, the other context slots go to the highest reconstruction scores among the tokens
    before the ring, and the rest merges into the residual slot."""
    model = models("llama-gqa")
    doc = DOCS[0]
    ids, pos = _left_padded([doc])
    scores = reconstruction_scores(model, ids, pos)[:, 0]  # [L, Hkv, n]
    method = ZSMerge(budget=30, proximity=0.2, rank="window", context_rank="reconstruction")
    layout = method.layout(len(doc))
    ring = set(range(len(doc) - layout.proximity, len(doc)))
    cache = model.prefill(doc, compression=method)
    assert cache.method == method  # a stored document keeps this context rank (no copy heads)
    for layer, layer_scores in zip(cache.layers, scores):
        for h in range(layer_scores.shape[0]):
            exact = set(layer.pos[0, h][layer.logw[0, h] == 0].tolist())
            older = layer_scores[h].clone()
            older[:8] = float("-inf")
            older[sorted(ring)] = float("-inf")
            top = set(older.topk(layout.context - 8).indices.tolist())
            assert exact == ring | set(range(8)) | top, f"head {h}"
    answer = model.generate_ids([9, 8, 7], max_new_tokens=2, eos_token_ids=[], cache=cache)  # ranks by its scores
    assert len(answer.token_ids[0]) == 2
    with pytest.raises(KvzooError, match="cannot compress chunk by chunk"):
        model.generate_ids(doc, max_new_tokens=1, compression=method, prefill_chunk=16)
