"""tools/oracle_bound.py: the attention it records against transformers' own attention weights, and the
clairvoyant cache keeping and evicting by it."""

from __future__ import annotations

import copy

import pytest
import torch

import kvzoo
from kvzoo.cache.h2o import H2O
from kvzoo.likelihood import prefill_cache
from tests.tool_loading import load_tool

@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("llama-gqa")


def test_future_attention_is_the_continuation_queries_attention_in_transformers(checkpoint):
    tool = load_tool("oracle_bound")
    hf_model, path = checkpoint
    model = kvzoo.load(path)
    ids = torch.randint(3, 100, (2, 14), generator=torch.Generator().manual_seed(0))
    context = 9
    tables = tool.future_attention(model, ids, context)
    with torch.no_grad():
        attentions = hf_model(ids, output_attentions=True).attentions  # per layer [B, Hq, T, T]
    hkv = model.config.num_kv_heads
    assert len(tables) == len(attentions)
    for table, probs in zip(tables, attentions):
        b, hq, t, _ = probs.shape
        expected = probs[:, :, context:].sum(2).reshape(b, hkv, hq // hkv, t).mean(2)
        # fp32 on both sides; the kernel sums the queries in another order
        torch.testing.assert_close(table, expected.float(), atol=1e-5, rtol=1e-5)
        # each of the 5 continuation queries pays 1 in all; nothing reaches a position after the last query
        torch.testing.assert_close(table.sum(-1), torch.full((b, hkv), t - context, dtype=torch.float32))


def _kept(cache) -> list[list[set[int]]]:
    """Per layer and KV head, the positions held in the cache's first sequence."""
    return [[set(layer.pos[0, h][layer.filled[0, h]].tolist()) for h in range(layer.pos.shape[1])]
            for layer in cache.layers]


@pytest.mark.parametrize("phase", ["both", "prefill", "decode"])
def test_clairvoyant_keeps_and_evicts_by_the_recorded_attention_in_its_phases(checkpoint, phase):
    """Prefill (phases "both" and "prefill"): the newest half of the budget, then the highest recorded
    attention; "decode" keeps what H2O keeps. A slot stores the recorded attention, except with "prefill",
    where it stores H2O's accumulated attention (H2O's own scores, read from an H2O cache that keeps every
    token). A decode step (phases "both" and "decode") evicts the kept older token of lowest recorded attention;
    with "prefill" it evicts as H2O does."""
    tool = load_tool("oracle_bound")
    model = kvzoo.load(checkpoint[1])
    cfg = model.config
    n, budget = 20, 8  # 4 newest positions kept, 4 of the 16 before them by score
    gen = torch.Generator().manual_seed(1)
    tables = [torch.rand(1, cfg.num_kv_heads, n + 1, generator=gen) for _ in range(cfg.num_layers)]
    prompt = [list(range(3, 3 + n))]
    cache, _ = prefill_cache(model, prompt, tool.Clairvoyant(budget=budget, tables=tables, phase=phase), headroom=1)
    h2o_cache, _ = prefill_cache(model, prompt, H2O(budget=budget), headroom=1)
    every_token, _ = prefill_cache(model, prompt, H2O(budget=n), headroom=1)
    h2o_kept = _kept(h2o_cache)
    for i, (layer, table, full) in enumerate(zip(cache.layers, tables, every_token.layers)):
        for h in range(cfg.num_kv_heads):
            kept = set(layer.pos[0, h][layer.filled[0, h]].tolist())
            by_table = set(range(n - 4, n)) | set(table[0, h, :n - 4].topk(4).indices.tolist())
            assert kept == (h2o_kept[i][h] if phase == "decode" else by_table)
            pos = layer.pos[0, h][layer.filled[0, h]]
            accumulated = full.score[0, h][full.pos[0, h].argsort()][pos]
            expected = accumulated if phase == "prefill" else table[0, h, pos]
            torch.testing.assert_close(layer.score[0, h][layer.filled[0, h]], expected)
    assert h2o_kept != _kept(cache) or phase == "decode", "the table must pick other tokens than H2O"
    before = _kept(cache)
    as_h2o = copy.deepcopy(cache)  # the same slots and scores, decoded by H2O itself
    as_h2o.method = H2O(budget=budget)
    step = (torch.tensor([[5]]), torch.tensor([[n]]))
    model(*step, cache=cache, decode=True)
    model(*step, cache=as_h2o, decode=True)
    for i, table in enumerate(tables):
        for h in range(cfg.num_kv_heads):
            now = set(cache.layers[i].pos[0, h][cache.layers[i].filled[0, h]].tolist())
            if phase == "prefill":  # the step's attention added to every score, as in H2O
                assert now == _kept(as_h2o)[i][h] and now != before[i][h] | {n}
                torch.testing.assert_close(cache.layers[i].score, as_h2o.layers[i].score)
                continue
            candidates = [p for p in before[i][h] if p <= n - budget // 2]  # still older than the newest 4
            lowest = min(candidates, key=lambda p: table[0, h, p].item())
            assert now == before[i][h] - {lowest} | {n}
