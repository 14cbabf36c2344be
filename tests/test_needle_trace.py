"""tools/needle_trace.py's two pieces of logic: where the answer's tokens are, and which of them a cache holds."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kvzoo.eval.tasks import NeedleInstance
from tests.tool_loading import load_tool

def test_answer_positions_start_at_the_asked_needle_and_stop_before_the_question():
    tool = load_tool("needle_trace")
    # haystack: a decoy code token (7) before the needle, the needle " 7 8" at 3-5, its repeat at 7-8
    haystack = [1, 7, 2, 9, 7, 8, 3, 7, 8, 4]
    instance = NeedleInstance("passkey", 12, 0.3, haystack, [7, 5], "78", 3)
    assert tool.answer_positions(instance, [9, 7, 8]) == [3, 4, 5, 7, 8]


def test_kept_map_marks_the_positions_each_layer_and_head_holds():
    tool = load_tool("needle_trace")
    layer0 = SimpleNamespace(pos=torch.tensor([[[5, 1, -1], [2, 3, 4]]]))  # [B=1, Hkv=2, C=3]
    layer1 = SimpleNamespace(pos=torch.tensor([[[-1, -1, -1], [1, 5, 9]]]))
    cache = SimpleNamespace(layers=[layer0, layer1])
    assert tool.kept_map(cache, [1, 4, 5]) == "0:X.X/.X. 1:.../X.X"


def test_answer_run_is_the_first_whole_copy_after_the_needle_start():
    tool = load_tool("needle_trace")
    haystack = [7, 8, 1, 7, 9, 7, 8, 2, 7, 8]  # a copy before the needle, a broken one, then two whole ones
    instance = NeedleInstance("passkey", 12, 0.3, haystack, [5], "78", 2)
    assert tool.answer_run(instance, [7, 8]) == [5, 6]


def test_read_shares_take_the_strongest_query_head_of_each_group_at_the_token_each_query_writes():
    tool = load_tool("needle_trace")
    # 4 query heads in 2 KV groups, 2 writing queries over 5 keys; the answer's tokens sit at keys 1 and 3
    probs = torch.zeros(4, 2, 5)
    probs[0, 0, 1], probs[1, 0, 1] = 0.2, 0.6  # group 0, first token: its best head reads 0.6
    probs[1, 1, 3] = 0.4  # group 0, second token
    probs[2, 0, 3] = 0.9  # group 1 reads the second token's key with the *first* query: not a read of it
    probs[3, 1, 3] = 0.1
    shares = tool.read_shares(probs, [1, 3], num_kv_heads=2)
    assert torch.allclose(shares, torch.tensor([(0.6 + 0.4) / 2, (0.0 + 0.1) / 2]))


def test_write_positions_replaces_the_lowest_scored_single_token_slots_outside_sinks_and_the_end():
    tool = load_tool("needle_trace")
    n, c, d = 60, 6, 2  # a 60-token prompt; the compressed head holds 6 slots
    full_pos = torch.arange(n)[None, None]  # [1, 1, n]
    full_k = torch.arange(n, dtype=torch.float32)[None, None, :, None].expand(1, 1, n, d).clone()
    full = SimpleNamespace(layers=[SimpleNamespace(pos=full_pos, k=full_k, v=-full_k)])
    # slots: a sink (2), a merged slot (30, log w > 0), the needle's 20 already held, two plain slots, and 57
    # (among the last 5 positions); scores make the merged slot, the sink and the held 20 the lowest
    pos = torch.tensor([[[2, 30, 20, 35, 40, 57]]])
    logw = torch.tensor([[[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]]])
    score = torch.tensor([[[0.0, 0.1, 0.15, 0.3, 0.2, 0.05]]])
    slots = SimpleNamespace(pos=pos.clone(), logw=logw, score=score, k=torch.zeros(1, 1, c, d),
                            v=torch.zeros(1, 1, c, d))
    cache = SimpleNamespace(layers=[slots])
    tool.write_positions(cache, full, [20, 21, 22], range(1), protect_last=5)
    # 21 and 22 go over the two lowest eligible slots (40, then 35); the held 20 is kept, though scored lower
    assert slots.pos[0, 0].tolist() == [2, 30, 20, 22, 21, 57]
    assert slots.k[0, 0, 4].tolist() == [21.0, 21.0] and slots.v[0, 0, 3].tolist() == [-22.0, -22.0]
