"""ZSMerge's share ranks keep two numbers per slot: the score decode steps add attention to and evict by (the
accumulated attention, H2O's statistic) and the standing the prompt's context was ranked by (the largest share
times the attention mass), kept beside it for a later prompt chunk."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvzoo
import kvzoo.cache.zsmerge as zsmerge_module
from kvzoo.cache.chunk import make_prefill_chunk
from kvzoo.cache.copy_heads import induction_scores
from kvzoo.cache.zsmerge import ACCUMULATED, KEEP_SUM_IN_COPY_HEADS, ZSMerge
from kvzoo.likelihood import prefill_cache
from tests.method_helpers import _at, drive_synthetic, random_qkv, reference_probs, spiky_surprisal


def _unique_key_prompt(n: int):
    """One head, n tokens: every key but `unique` lies in a 4-dimensional subspace the queries read; `unique`
    points where no query looks, so it is kept for its leverage share alone (as in test_leverage.py)."""
    qkv = random_qkv(1, 1, 1, 1, n, seed=7, scale=1.5)
    qkv.k[0][..., 4:] = 0.0
    qkv.k[0][0, 0, 15, 6] = 3.0
    qkv.q[0][..., 6] = 0.0
    return qkv, 15


@pytest.mark.parametrize("rank", ["shares", "attention_shares"])
def test_slots_store_the_accumulated_attention_and_the_standing_beside_it(rank):
    """After a one-chunk prompt every verbatim slot's score is the token's attention summed over every prompt
    query (float64 reference from the softmax definition), and state["standing_bonus"] + score is what ranked it:
    with the accumulated share of the sum, a share of the head's mass at least the token's own, so never below
    its accumulated attention, and for the token kept for its leverage far above it."""
    n = 40
    qkv, unique = _unique_key_prompt(n)
    method = ZSMerge(budget=8, proximity=3, residual=1, kernel_size=3, decay=1.0, rank=rank, accumulated="sum")
    slots = drive_synthetic(method, qkv, [n], 0).cache.layers[0]
    accumulated = reference_probs(qkv.q[0][0], qkv.k[0][0, 0], list(range(n)), list(range(n)), None)[0].sum(0)
    exact = slots.logw[0, 0] == 0  # verbatim slots: the context and the ring
    positions = slots.pos[0, 0][exact]
    torch.testing.assert_close(slots.score[0, 0][exact].double(), accumulated[positions], rtol=1e-5, atol=1e-6)
    standing = slots.state["standing_bonus"][0, 0]
    assert bool((standing >= 0).all())
    assert torch.equal(slots.state["standing_pos"][0, 0], slots.pos[0, 0].to(torch.int32))
    if rank == "shares":
        kept_for_leverage = int((slots.pos[0, 0] == unique).nonzero())
        assert standing[kept_for_leverage] > 5 * slots.score[0, 0, kept_for_leverage], (standing, slots.score)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(20, 60), first=st.integers(6, 40), seed=st.integers(0, 10_000),
       rank=st.sampled_from(["shares", "attention_shares"]))
def test_a_later_prompt_chunk_ranks_older_slots_by_their_standing(n, first, seed, rank):
    """A prompt fed in chunks keeps, chunk after chunk, the tokens it keeps with decode_score="standing" (each
    slot's score is its standing): what a slot stores for decode steps does not change a later chunk's
    choice. (Slot order within the context follows the rank, whose near-ties the two sums, standing = score
    + (standing - score), may round apart in float32: compared as sets, by position.)"""
    first = min(first, n - 1)
    qkv = random_qkv(1, 1, 2, 2, n, seed=seed)
    method = ZSMerge(budget=10, proximity=3, residual=1, kernel_size=3, rank=rank)
    split = drive_synthetic(method, qkv, [n], 0, prefill_chunk=first).cache
    merged = drive_synthetic(dataclasses.replace(method, decode_score="standing"), qkv, [n], 0,
                             prefill_chunk=first).cache
    assert "standing_bonus" not in merged.layers[0].state
    for mine, theirs in zip(split.layers, merged.layers):
        order_mine, order_theirs = mine.pos.argsort(-1), theirs.pos.argsort(-1)
        assert torch.equal(mine.pos.gather(-1, order_mine), theirs.pos.gather(-1, order_theirs))
        assert torch.equal(mine.logw.gather(-1, order_mine), theirs.logw.gather(-1, order_theirs))
        standing = (mine.score + mine.state["standing_bonus"]).gather(-1, order_mine)
        exact = mine.logw.gather(-1, order_mine) == 0
        torch.testing.assert_close(standing[exact], theirs.score.gather(-1, order_theirs)[exact])


@pytest.mark.parametrize("decay", [1.0, 0.9])
def test_the_standing_lapses_when_a_decode_step_moves_a_slot(decay):
    """Decode steps move tokens between slots and merge them; a later chunk adds a slot's standing only while
    the slot still holds the token it was granted to (positions compared), decayed as its score was over the
    decode steps since (decay^6 here), and 0 for the chunk's own tokens."""
    n, steps = 40, 6
    qkv, _ = _unique_key_prompt(n + steps + 2)
    method = ZSMerge(budget=8, proximity=3, residual=1, kernel_size=3, decay=decay, rank="shares")
    trace = drive_synthetic(method, qkv, [n], steps)
    slots = trace.cache.layers[0]
    granted = trace.snapshots[0].layers[0]["pos"]  # positions after prefill
    moved = slots.pos != granted
    assert bool(moved.any()) and bool((~moved & (slots.state["standing_bonus"] > 0)).any())
    t = 2
    chunk = make_prefill_chunk(qkv.q[0][:, :, n + steps:], qkv.k[0][:, :, n + steps:], qkv.v[0][:, :, n + steps:],
                               torch.arange(n + steps, n + steps + t)[None], slots, slots.capacity,
                               method.attention_alpha, None)
    bonus = method._standing_bonus(slots, chunk)
    assert bonus is not None
    held = slots.state["standing_bonus"].masked_fill(moved, 0.0) * decay**steps
    torch.testing.assert_close(bonus, torch.cat([held, torch.zeros(1, 1, t)], dim=-1), rtol=1e-6, atol=0.0)


def _later_prompt(method: ZSMerge, qkv, lens: list[int], t: int):
    """Prefill the documents (left-padded, one chunk), then feed the next t tokens of each as a later prompt
    (a question to the stored documents): positions n_b .. n_b + t - 1 on the cache whose prompt ended."""
    slots = drive_synthetic(method, qkv, lens, 0).cache.layers[0]
    positions = torch.stack([torch.arange(n, n + t) for n in lens])  # [B, t]
    q, k, v = (_at(x[0], positions) for x in (qkv.q, qkv.k, qkv.v))
    chunk = make_prefill_chunk(q, k, v, positions, slots, slots.capacity, method.attention_alpha, None)
    method.compress_prefill(0, slots, chunk)
    return slots


def test_a_later_prompt_stores_the_earlier_slots_standing():
    """A chunk that starts where the last prefill ended (a question to a stored document; here a left-padded
    batch of two documents) stores the slots kept before it with their standing, as decode_score="standing"
    does (so the decode steps that write the answer do not give up a fact kept for its leverage first), and
    its own tokens with their accumulated attention (standing - score kept beside it)."""
    n, t = 40, 6
    qkv = random_qkv(2, 1, 1, 1, n + t, seed=7, scale=1.5)
    qkv.k[0][..., 4:] = 0.0
    qkv.k[0][:, 0, 15, 6] = 3.0  # the unique key of _unique_key_prompt, in both documents
    qkv.q[0][..., 6] = 0.0
    spec = dict(budget=8, proximity=3, residual=1, kernel_size=3, decay=1.0, rank="shares")
    split = _later_prompt(ZSMerge(**spec), qkv, [n, n - 5], t)
    standing = _later_prompt(ZSMerge(**spec, decode_score="standing"), qkv, [n, n - 5], t)
    assert torch.equal(split.pos, standing.pos)
    assert (split.pos == 15).any(-1).all(), "the fact kept for its leverage survives the question in both"
    lens = torch.tensor([n, n - 5])[:, None, None]
    earlier = (split.pos < lens) & (split.logw == 0)
    own = (split.pos >= lens) & (split.logw == 0)
    assert bool(earlier.any(-1).all()) and bool(own.any(-1).all())
    torch.testing.assert_close(split.score[earlier], standing.score[earlier])
    assert bool((split.state["standing_bonus"][earlier] == 0).all())
    torch.testing.assert_close((split.score + split.state["standing_bonus"])[own], standing.score[own])
    assert bool((split.state["standing_bonus"][own] > 0).any())  # and they did store something else


def test_a_later_chunk_of_the_same_prompt_keeps_storing_the_accumulated_attention():
    """The same tokens fed as the second chunk of one prompt are no later prompt: the fact kept for its leverage
    in the first chunk still stores less than its standing, the rest kept beside it."""
    n, t = 40, 6
    qkv, unique = _unique_key_prompt(n + t)
    method = ZSMerge(budget=8, proximity=3, residual=1, kernel_size=3, decay=1.0, rank="shares")
    slots = drive_synthetic(method, qkv, [n + t], 0, prefill_chunk=n).cache.layers[0]
    kept = int((slots.pos[0, 0] == unique).nonzero())
    assert slots.state["standing_bonus"][0, 0, kept] > slots.score[0, 0, kept]


def test_a_fork_with_headroom_pads_the_standing_as_empty_slots():
    """A fork that grows the store (headroom) pads per-slot state as empty slots hold it: bonus 0, position
    -1; the slots the original holds keep theirs, every sequence repeated."""
    n = 40
    qkv, _ = _unique_key_prompt(n)
    cache = drive_synthetic(ZSMerge(budget=8, proximity=3, residual=1, rank="shares"), qkv, [n], 0).cache
    fork = cache.fork(headroom=3, batch=2)
    old, new = cache.layers[0], fork.layers[0]
    assert new.state["standing_bonus"].shape == new.score.shape
    c = old.capacity
    for name, empty in (("standing_bonus", 0), ("standing_pos", -1)):
        assert torch.equal(new.state[name][:, :, :c], old.state[name].expand(2, -1, -1))
        assert bool((new.state[name][:, :, c:] == empty).all())


@dataclasses.dataclass
class _HeadOneCopies(ZSMerge):
    """ZSMerge whose KV head 1 of every layer is a copy head (what before_prefill marks from a model)."""

    def make_cache(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        cache = super().make_cache(*args, **kwargs)
        for slots in cache.layers:
            if "induction_head" in slots.state:  # accumulated in KEEP_SUM_IN_COPY_HEADS only
                slots.state["induction_head"][:, 1] = True
        return cache


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), groups=st.integers(1, 2),
       accumulated=st.sampled_from(ACCUMULATED))
def test_the_accumulated_share_of_every_query_or_of_its_rate(seed, groups, accumulated):
    """A one-chunk prompt of n tokens, per KV head: the context is the top (B - B_p - B_r) of the older tokens by
    max(a_j / sum a, w_j / sum w), w the last W queries' attention and a every query's attention, summed,
    a_j = sum_i A_i(j) ("sum"), or its rate, a_j = sum_i A_i(j) / (n - j), over the queries that saw token j
    ("rate"), or its distant rate, a_j = sum_{i >= j + B_p} A_i(j) / (n - j - B_p), over the queries at least
    the ring's size after it ("distant_rate"); "..._outside_copy_heads": the sum in the copy heads, here KV
    head 1. Float64 softmax reference; GQA: the mean over a KV head's query heads."""
    n, w, budget, proximity, residual = 40, 4, 12, 3, 1
    qkv = random_qkv(1, 1, 2, groups, n, seed=seed, scale=1.5)
    method = _HeadOneCopies(budget=budget, proximity=proximity, residual=residual, window_size=w, kernel_size=1,
                            decay=1.0, accumulated=accumulated)
    slots = drive_synthetic(method, qkv, [n], 0).cache.layers[0]
    older = list(range(n - proximity))
    for h in range(2):
        q = qkv.q[0][0, h * groups:(h + 1) * groups]
        probs = reference_probs(q, qkv.k[0][0, h], list(range(n)), list(range(n)), None).mean(0)  # [n, n]
        summed, window = probs.sum(0), probs[n - w:].sum(0)
        by_sum = accumulated == "sum" or (accumulated in KEEP_SUM_IN_COPY_HEADS and h == 1)
        seen_by = torch.arange(n, 0, -1, dtype=torch.float64)  # queries i >= j
        far = torch.arange(n)[:, None] - torch.arange(n)[None, :] >= proximity  # [i, j]
        distant = (probs * far).sum(0) / (seen_by - proximity).clamp(min=1)
        a = summed if by_sum else distant if accumulated.startswith("distant") else summed / seen_by
        share = torch.maximum(a / a.sum(), window / window.sum())
        kept = set(slots.pos[0, h, residual:budget - proximity].tolist())
        assert len(kept) == budget - proximity - residual
        chosen = [share[p].item() for p in older if p in kept]
        dropped = [share[p].item() for p in older if p not in kept]
        assert min(chosen) >= max(dropped) - 1e-6, (accumulated, h, sorted(kept))


def test_the_copy_heads_ranked_by_the_sum_are_the_models_induction_heads(tiny_checkpoint, monkeypatch):
    """accumulated="rate_outside_copy_heads" marks, before the prompt, the KV heads whose induction score
    (copy_heads.induction_scores) is above COPY_HEAD_THRESHOLD (here the scores' median, so that some are
    and some are not)."""
    model = kvzoo.load(tiny_checkpoint("llama-gqa")[1])
    scores = induction_scores(model)  # [L, Hkv]
    threshold = float(scores.flatten().median())
    monkeypatch.setattr(zsmerge_module, "COPY_HEAD_THRESHOLD", threshold)
    cache, _ = prefill_cache(model, [list(range(3, 23))], ZSMerge(budget=8, accumulated="rate_outside_copy_heads"),
                             headroom=0)
    marked = torch.stack([slots.state["induction_head"][0] for slots in cache.layers])
    assert torch.equal(marked, scores > threshold) and bool(marked.any()) and not bool(marked.all())


@pytest.mark.parametrize("seed", range(4))
def test_a_question_to_a_stored_document_ranks_the_context_by_attention_scores(seed):
    """A stored document's context is chosen by Compactor's query-agnostic score (`for_stored_document`), but
    the slots keep attention scores, and Compactor's scores of a later chunk cannot rank against them. A later
    prompt (the question) is the query the document was stored for: the tokens it pushes out of the ring and
    the stored context compete by their attention scores plus the question's reads, exactly as with
    context_rank="score" on the same stored slots (not by Compactor's scores of the question beside the stored
    attention sums, which ignored what the question reads)."""
    n, t = 48, 6
    qkv = random_qkv(1, 1, 2, 2, n + t, seed=seed, scale=1.5)
    stored = ZSMerge(budget=20).for_stored_document()
    assert stored.context_rank == "compactor"
    document = drive_synthetic(stored, qkv, [n], 0, surprisal=spiky_surprisal(n, seed)).cache.layers[0]
    positions = torch.arange(n, n + t)[None]
    q, k, v = (_at(x[0], positions) for x in (qkv.q, qkv.k, qkv.v))
    asked = {}
    for rank in ("compactor", "score"):
        slots = copy.deepcopy(document)
        chunk = make_prefill_chunk(q, k, v, positions, slots, slots.capacity, stored.attention_alpha, None)
        dataclasses.replace(stored, context_rank=rank).compress_prefill(0, slots, chunk)
        asked[rank] = slots
    for head in range(2):
        held = [set(asked[rank].pos[0, head].tolist()) for rank in ("compactor", "score")]
        assert held[0] == held[1], f"head {head}: {sorted(held[0] ^ held[1])}"
    assert bool((asked["compactor"].pos >= n).sum(-1).eq(t).all()), "the question's tokens are all kept"
