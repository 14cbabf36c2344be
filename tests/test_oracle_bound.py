"""tools/oracle_bound.py: the attention it records against transformers' own attention weights, and the
clairvoyant cache keeping and evicting by it."""

from __future__ import annotations

import pytest
import torch

import kvzoo
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


def test_clairvoyant_keeps_the_newest_half_and_the_highest_recorded_attention_then_evicts_the_lowest(checkpoint):
    tool = load_tool("oracle_bound")
    model = kvzoo.load(checkpoint[1])
    cfg = model.config
    n, budget = 20, 8  # 4 newest positions kept, 4 of the 16 before them by score
    gen = torch.Generator().manual_seed(1)
    tables = [torch.rand(1, cfg.num_kv_heads, n + 1, generator=gen) for _ in range(cfg.num_layers)]
    method = tool.Clairvoyant(budget=budget, tables=tables)
    cache, _ = prefill_cache(model, [list(range(3, 3 + n))], method, headroom=1)
    for layer, table in zip(cache.layers, tables):
        for h in range(cfg.num_kv_heads):
            kept = set(layer.pos[0, h][layer.filled[0, h]].tolist())
            older = table[0, h, :n - 4]
            assert kept == set(range(n - 4, n)) | set(older.topk(4).indices.tolist())
    before = [layer.pos.clone() for layer in cache.layers]
    # one decode step: the new token (position n) replaces the kept older token of lowest recorded attention
    step_pos = torch.tensor([[n]])
    model(torch.tensor([[5]]), step_pos, cache=cache, decode=True)
    for layer, old, table in zip(cache.layers, before, tables):
        for h in range(cfg.num_kv_heads):
            old_set = set(old[0, h][old[0, h] >= 0].tolist())
            now = set(layer.pos[0, h][layer.filled[0, h]].tolist())
            candidates = [p for p in old_set if p <= n - budget // 2]  # still older than the newest 4
            lowest = min(candidates, key=lambda p: table[0, h, p].item())
            assert now == old_set - {lowest} | {n}
