"""The cross-layer rank (ZigZagKV and ZSMerge `cross_layer=True`): each layer ranks its tokens by the larger of
its own share of the window's attention and the largest share any layer's head gives them, checked against
that definition computed from float64 attention probabilities, and ZSMerge's deferred compression against
its per-layer one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kvzoo
from kvzoo.cache import ZigZagKV
from kvzoo.cache import zsmerge as zsmerge_module
from kvzoo.cache.copy_heads import induction_scores
from kvzoo.cache.zsmerge import ZSMerge
from kvzoo.errors import KvzooError
from tests.method_helpers import QKV, drive_synthetic, random_qkv, reference_probs


def layer_one_reads_token_20(n: int, w: int) -> QKV:
    """Two layers, one KV head: layer 1's last w queries read token 20 (p ~ 0.3 each), layer 0's do not."""
    qkv = random_qkv(1, 2, 1, 1, n, seed=3, scale=1.0)
    b = torch.eye(8)[1]
    qkv.k[1][0, 0, 20] = 12 * b
    qkv.q[1][0, 0, n - w:] += 0.25 * b
    return qkv


def window_shares(qkv: QKV, layer: int, n: int, w: int, decay: float) -> torch.Tensor:
    """[n] the last w queries' attention to every token, weighted decay^age (age 0 = the last query), as a
    share of its total: what a head's window score gives each token, from the definition."""
    probs = reference_probs(qkv.q[layer][0], qkv.k[layer][0, 0], list(range(n)), list(range(n)), None)[0]
    ages = torch.arange(w - 1, -1, -1, dtype=torch.float64)
    window = (probs[n - w:] * (decay**ages)[:, None]).sum(0)
    return window / window.sum()


def top_positions(rank: torch.Tensor, candidates: int, k: int) -> set[int]:
    """The k best of positions 0 .. candidates-1 by rank."""
    return set(sorted(range(candidates), key=lambda j: rank[j].item(), reverse=True)[:k])


def test_zigzag_cross_layer_keeps_what_any_layer_reads_most():
    """cross_layer=True: each layer keeps the window plus the top of max(its own share of the window's
    attention, the largest share any layer gives the token), computed here from the attention probabilities
    (float64). Layer 1's window reads token 20 and layer 0's does not, so only with cross_layer does layer 0
    keep it."""
    n, w, context = 40, 8, 4
    qkv = layer_one_reads_token_20(n, w)
    shares = [window_shares(qkv, layer, n, w, decay=1.0) for layer in range(2)]
    widest = torch.maximum(shares[0], shares[1])

    def kept(cross_layer: bool) -> list[set[int]]:
        method = ZigZagKV(budget=w + context, window_size=w, kernel_size=1, bound_ratio=1.0, rank="window",
                          cross_layer=cross_layer)
        layers = drive_synthetic(method, qkv, [n], 0).snapshots[0].layers
        return [set(x["pos"][0, 0][x["pos"][0, 0] >= 0].tolist()) for x in layers]

    def expected(rank: torch.Tensor) -> set[int]:
        return set(range(n - w, n)) | set(sorted(range(n - w), key=lambda j: rank[j].item(), reverse=True)[:context])

    alone, across = kept(False), kept(True)
    assert alone == [expected(shares[0]), expected(shares[1])]
    assert across == [expected(torch.maximum(shares[0], widest)), expected(torch.maximum(shares[1], widest))]
    assert 20 in alone[1] and 20 not in alone[0] and 20 in across[0], (alone, across)


def test_zsmerge_cross_layer_context_is_the_top_of_the_widest_share():
    """ZSMerge(cross_layer=True): the context slots hold the top of max(own share of the decayed window score,
    widest share over the layers) among the tokens before the ring; without it layer 0 does not keep token 20."""
    n, w, context = 40, 8, 4
    qkv = layer_one_reads_token_20(n, w)
    shares = [window_shares(qkv, layer, n, w, decay=0.98) for layer in range(2)]
    widest = torch.maximum(shares[0], shares[1])

    def kept(cross_layer: bool) -> list[set[int]]:
        method = ZSMerge(budget=8, proximity=3, residual=1, kernel_size=1, decay=0.98, rank="window",
                         cross_layer=cross_layer)
        layers = drive_synthetic(method, qkv, [n], 0).snapshots[0].layers  # slots: [residual | 4 context | 3 ring]
        return [set(x["pos"][0, 0, 1:1 + context].tolist()) for x in layers]

    alone, across = kept(False), kept(True)
    assert alone == [top_positions(shares[0], n - 3, context), top_positions(shares[1], n - 3, context)]
    assert across == [top_positions(torch.maximum(s, widest), n - 3, context) for s in shares]
    assert 20 in alone[1] and 20 not in alone[0] and 20 in across[0], (alone, across)


@pytest.mark.parametrize("spec", [dict(rank="window"), dict(rank="attention_shares", decay=1.0)])
def test_zsmerge_cross_layer_with_one_layer_is_the_per_layer_compression(spec):
    """With one layer of one KV head the widest share is the head's own, so the deferred compression at the
    end of prefill must store exactly what compressing during prefill stores (ring, context, residual merge,
    scores), for a left-padded batch, and decode the same, in as many bytes."""
    qkv = random_qkv(2, 1, 1, 3, 64, seed=11)
    per_layer = drive_synthetic(ZSMerge(budget=12, **spec), qkv, [60, 45], 3)
    deferred = drive_synthetic(ZSMerge(budget=12, cross_layer=True, **spec), qkv, [60, 45], 3)
    for a, b in zip(per_layer.snapshots, deferred.snapshots):
        for la, lb in zip(a.layers, b.layers):
            assert torch.equal(la["pos"], lb["pos"])
            for name in ("k", "v", "logw", "score"):
                torch.testing.assert_close(la[name], lb[name], atol=1e-6, rtol=1e-6)
    assert len(deferred.cache.stacks) == len(per_layer.cache.stacks)  # (one layer: no stack to share)
    assert deferred.cache.nbytes() == per_layer.cache.nbytes()


@pytest.mark.parametrize("spec", [dict(rank="window"), dict(rank="attention_shares", decay=1.0)])
def test_zsmerge_cross_layer_with_a_prompt_shorter_than_the_layout(spec):
    """A prompt shorter than the smallest layout (3 tokens, 8 slots) is kept whole, as without cross_layer
    (it crashed in end_prefill: its per-token ranks were shorter than the store)."""
    qkv = random_qkv(1, 2, 1, 3, 8, seed=11)
    per_layer = drive_synthetic(ZSMerge(budget=8, **spec), qkv, [3], 2)
    deferred = drive_synthetic(ZSMerge(budget=8, cross_layer=True, **spec), qkv, [3], 2)
    for a, b in zip(per_layer.snapshots, deferred.snapshots):
        for la, lb in zip(a.layers, b.layers):
            assert torch.equal(la["pos"], lb["pos"])
            torch.testing.assert_close(la["score"], lb["score"], atol=1e-6, rtol=1e-6)


def test_zsmerge_cross_layer_refuses_a_prompt_in_chunks_and_bad_settings():
    qkv = random_qkv(1, 2, 1, 1, 40, seed=0)
    with pytest.raises(KvzooError, match="prefill_chunk"):
        drive_synthetic(ZSMerge(budget=8, rank="window", cross_layer=True), qkv, [40], 0, prefill_chunk=16)
    assert not ZSMerge(rank="window", cross_layer=True).supports_chunked_prefill
    assert ZSMerge().supports_chunked_prefill
    for bad, message in ((dict(cross_layer=1), "cross_layer must be True or False"),
                         (dict(cross_layer=True, rank="window", leverage=0.5), "neither leverage nor rank='split'"),
                         (dict(cross_layer=True, rank="shares"), "neither leverage nor rank='split', 'shares' or 'block_shares'"),
                         # block_shares includes the keys' leverage share, which is not an attention share
                         (dict(cross_layer=True, rank="block_shares"), "got leverage=0.0, rank='block_shares'")):
        with pytest.raises(KvzooError, match=message):
            ZSMerge(**bad)


@dataclasses.dataclass
class _ReadingHeads(ZSMerge):
    """ZSMerge whose KV head 0 of the layers in `reading_layers` is a copy head (what before_prefill marks from a
    model's induction scores)."""

    reading_layers: tuple[int, ...] = ()

    def make_cache(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        cache = super().make_cache(*args, **kwargs)
        for layer in self.reading_layers:
            cache.layers[layer].state["induction_head"][:, 0] = True
        return cache


def test_zsmerge_cross_layer_of_the_copy_heads_takes_their_shares_alone():
    """cross_layer_heads="copy": the widest share is over the copy heads alone. With layer 1's head a copy head,
    layer 0 keeps the token layer 1 reads (token 20), as with every head; with layer 0's head the copy head
    instead, the widest share is layer 0's own, so layer 0 keeps what it keeps alone and layer 1 takes layer
    0's reads beside its own."""
    n, w, context = 40, 8, 4
    qkv = layer_one_reads_token_20(n, w)
    shares = [window_shares(qkv, layer, n, w, decay=0.98) for layer in range(2)]

    def kept(reading_layers: tuple[int, ...]) -> list[set[int]]:
        method = _ReadingHeads(budget=8, proximity=3, residual=1, kernel_size=1, decay=0.98, rank="window",
                               cross_layer=True, cross_layer_heads="copy", reading_layers=reading_layers)
        layers = drive_synthetic(method, qkv, [n], 0).snapshots[0].layers
        return [set(x["pos"][0, 0, 1:1 + context].tolist()) for x in layers]

    def top(rank: torch.Tensor) -> set[int]:
        return top_positions(rank, n - 3, context)

    alone = [top(shares[0]), top(shares[1])]
    assert kept(()) == alone  # no copy head: nothing crosses layers
    assert kept((1,)) == [top(torch.maximum(shares[0], shares[1])), alone[1]]
    assert kept((0,)) == [alone[0], top(torch.maximum(shares[1], shares[0]))]
    assert 20 in kept((1,))[0] and 20 not in kept((0,))[0]


def test_zsmerge_cross_layer_copy_heads_are_the_models_induction_heads(tiny_checkpoint, monkeypatch):
    """before_prefill marks as reading heads the KV heads whose induction score is above COPY_HEAD_THRESHOLD
    (here the scores' median, so that some are and some are not)."""
    model = kvzoo.load(tiny_checkpoint("llama-gqa")[1])
    scores = induction_scores(model)  # [L, Hkv]
    threshold = float(scores.flatten().median())
    monkeypatch.setattr(zsmerge_module, "COPY_HEAD_THRESHOLD", threshold)
    method = ZSMerge(budget=8, cross_layer=True, cross_layer_heads="copy")
    cache = method.make_cache(model.config, [20], 0, torch.float32, "cpu")
    method.before_prefill(model, cache)
    marked = torch.stack([slots.state["induction_head"][0] for slots in cache.layers])
    assert torch.equal(marked, scores > threshold) and bool(marked.any()) and not bool(marked.all())
    # Marked only where something reads the mark: here neither the cross-layer rank (over every head) nor the
    # accumulated sum (accumulated="sum" keeps it in every head).
    assert "induction_head" not in ZSMerge(budget=8, cross_layer=True, accumulated="sum").make_cache(
        model.config, [20], 0, torch.float32, "cpu").layers[0].state


def test_zsmerge_cross_layer_heads_must_be_named():
    with pytest.raises(KvzooError, match="cross_layer_heads must be one of 'all', 'copy', got 'reading'"):
        ZSMerge(cross_layer=True, cross_layer_heads="reading")


def test_zsmerge_copy_reads_keeps_what_the_copy_heads_read_in_every_layer():
    """copy_reads=1: every layer keeps the token the copy heads' window reads most (token 20, read by layer 1's
    head) beside its own context; the rest of each layer's context is its own top. Without a copy head nothing
    changes."""
    n, w, context = 40, 8, 4
    qkv = layer_one_reads_token_20(n, w)
    shares = [window_shares(qkv, layer, n, w, decay=0.98) for layer in range(2)]

    def kept(copy_reads: int, reading_layers: tuple[int, ...]) -> list[set[int]]:
        method = _ReadingHeads(budget=8, proximity=3, residual=1, kernel_size=1, decay=0.98, rank="window",
                               layer_budgets="uniform", copy_reads=copy_reads, reading_layers=reading_layers)
        layers = drive_synthetic(method, qkv, [n], 0).snapshots[0].layers  # slots: [residual | 4 context | 3 ring]
        return [set(x["pos"][0, 0, 1:1 + context].tolist()) for x in layers]

    alone = [top_positions(s, n - 3, context) for s in shares]
    assert kept(0, ()) == alone and kept(1, ()) == alone
    assert 20 not in alone[0] and 20 in alone[1]
    assert kept(1, (1,)) == [{20} | top_positions(shares[0], n - 3, context - 1), alone[1]]


def test_zsmerge_copy_reads_is_off_where_there_is_no_question_or_no_whole_prompt():
    method = ZSMerge(copy_reads=9)
    assert method.for_chunked_prefill().copy_reads == 0 and method.for_stored_document().copy_reads == 0
    for stored in (dict(stored_kernel_size=None), dict(stored_ring=None),
                   dict(stored_ring=None, stored_copy_heads=None)):
        assert ZSMerge(copy_reads=9, **stored).for_stored_document().copy_reads == 0, stored
    assert ZSMerge(layer_budgets="uniform", copy_reads=9).for_chunked_prefill().layer_budgets == "uniform"
    assert ZSMerge().for_chunked_prefill() == ZSMerge(layer_budgets="uniform")
    for bad, message in ((dict(copy_reads=-1), "copy_reads must be an integer >= 0, got -1"),
                         (dict(copy_reads=True), "copy_reads must be an integer >= 0, got True"),
                         (dict(copy_reads=9, rank="accumulated"), "rank='accumulated'"),
                         (dict(copy_reads=9, rank="split", layer_budgets="uniform"), "rank='split'"),
                         (dict(copy_reads=9, copy_heads=0.3, layer_budgets="uniform"), "copy_heads=0.3")):
        with pytest.raises(KvzooError, match=message):
            ZSMerge(**bad)
