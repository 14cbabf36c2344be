"""Leverage (kvzoo.cache.scoring.leverage_scores), checked against its definition, and ZSMerge's use of it:
a key that no combination of the others reproduces is kept although no query looked at it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvzoo.cache.scoring import leverage_scores
from tests.method_helpers import reference_leverage


def candidates(keys: torch.Tensor, valid: torch.Tensor | None = None) -> SimpleNamespace:
    """The fields of a PrefillChunk leverage_scores reads, for keys [B, H, S, D]."""
    b, h, s, _ = keys.shape
    valid = torch.ones(b, h, s, dtype=torch.bool) if valid is None else valid
    logw = torch.zeros(b, h, s).masked_fill(~valid, float("-inf"))
    return SimpleNamespace(keys=keys, key_logw=logw, key_pos=torch.arange(s).expand(b, h, s))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(1, 6), st.integers(0, 2**16))
def test_leverage_is_the_hat_matrix_diagonal_of_the_centred_keys(s, d, seed):
    """h = diag(X (X^T X + r I)^-1 X^T) for the centred keys X, r = 1e-4 tr(X^T X) / D (float64 reference):
    0 <= h < 1, and with many more keys than dimensions sum h = D; empty candidates score 0 and take no
    part in the mean."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 1, s + 1, d, generator=g)
    valid = torch.ones(1, 1, s + 1, dtype=torch.bool)
    valid[..., 0] = False  # an empty slot holding garbage
    keys[..., 0, :] = 1e3
    got = leverage_scores(candidates(keys, valid))[0, 0]
    expected = reference_leverage(keys[0, 0, 1:])
    assert got[0] == 0 and bool((got >= 0).all()) and bool((got < 1).all())
    torch.testing.assert_close(got[1:].double(), expected, atol=1e-4, rtol=1e-3)
    if s >= 4 * d:
        assert got.sum().item() == pytest.approx(d, rel=0.01)


def test_leverage_ignores_a_shift_of_every_key_and_finds_the_outlier():
    """Attention cannot see a vector added to every key (each logit of a query moves by the same amount), and
    neither can the leverage; a key off the others' subspace scores highest."""
    g = torch.Generator().manual_seed(0)
    keys = torch.zeros(1, 1, 64, 8)
    keys[..., :4] = torch.randn(1, 1, 64, 4, generator=g)  # the crowd spans 4 dimensions
    keys[0, 0, 17, 6] = 1.0  # one key leaves it
    lev = leverage_scores(candidates(keys))
    shifted = leverage_scores(candidates(keys + torch.randn(8, generator=g) * 5))
    torch.testing.assert_close(lev, shifted, atol=1e-4, rtol=0)
    assert int(lev[0, 0].argmax()) == 17 and lev[0, 0, 17] > 0.95


def test_zsmerge_keeps_a_unique_key_nobody_attended_to():
    """Queries look only at a few recent keys; one older key is unique. Attention alone leaves it to the
    residual merge, the leverage term keeps it verbatim in a context slot."""
    from kvzoo.cache.zsmerge import ZSMerge
    from tests.method_helpers import drive_synthetic, random_qkv

    n = 40
    qkv = random_qkv(1, 1, 1, 1, n, seed=3, scale=0.3)
    qkv.k[0][0, 0, :, 4:] = 0.0  # every key in the first 4 dimensions ...
    qkv.k[0][0, 0, 9, 6] = 3.0  # ... but key 9
    qkv.q[0][..., 6] = 0.0  # which no query looks at
    kept = {}
    for weight in (0.0, 1.0):
        method = ZSMerge(budget=8, proximity=3, residual=1, kernel_size=1, rank="window", leverage=weight)
        s = drive_synthetic(method, qkv, [n], 0).snapshots[0].layers[0]
        kept[weight] = s["pos"][0, 0, 1:5].tolist()  # slots: [residual | 4 context | 3 proximity]
    assert 9 not in kept[0.0] and 9 in kept[1.0], kept


def test_zsmerge_accumulate_keeps_what_earlier_queries_read():
    """rank="blend" adds the attention of every prompt query to the window's: a key the first queries read
    heavily and the last 8 avoid is kept, where rank="window" drops it."""
    from kvzoo.cache.zsmerge import ZSMerge
    from tests.method_helpers import drive_synthetic, random_qkv

    n = 40
    qkv = random_qkv(1, 1, 1, 1, n, seed=4, scale=0.1)
    a, b = torch.eye(8)[0], torch.eye(8)[1]
    qkv.k[0][0, 0, 5] = 8 * a - 4 * b  # read by the early queries, avoided by the window's
    qkv.k[0][0, 0, 10] = 8 * b  # what the window reads
    qkv.q[0][0, 0, 6:n - 8] = 2 * a
    qkv.q[0][0, 0, n - 8:] = 2 * b
    kept = {}
    for rank in ("window", "blend"):
        method = ZSMerge(budget=8, proximity=3, residual=1, kernel_size=1, decay=1.0, rank=rank)
        s = drive_synthetic(method, qkv, [n], 0).snapshots[0].layers[0]
        kept[rank] = s["pos"][0, 0, 1:5].tolist()  # slots: [residual | 4 context | 3 proximity]
    assert 5 not in kept["window"] and 5 in kept["blend"], kept
    assert 10 in kept["window"] and 10 in kept["blend"], kept


def test_zsmerge_window_share_keeps_the_window_peak_and_fills_the_rest_by_accumulated_attention():
    """rank="split": window_share of the context slots (here 2 of 4) goes to the tokens the window reads most,
    the rest to the highest accumulated attention; with share 0 the window's token competes on accumulated
    attention alone and loses to the early tokens and to tokens every query reads a little."""
    from kvzoo.cache.zsmerge import ZSMerge
    from tests.method_helpers import drive_synthetic, random_qkv

    n = 40
    qkv = random_qkv(1, 1, 1, 1, n, seed=4, scale=0.1)
    a, b, c = torch.eye(8)[0], torch.eye(8)[1], torch.eye(8)[2]
    for j in (3, 5, 7, 9, 12):
        qkv.k[0][0, 0, j] = 4 * a  # read a little by every query
    qkv.k[0][0, 0, 20] = 12 * b  # read by the window's 8 queries only (p ~ 0.3 each)
    qkv.q[0][0, 0, :] = 0.3 * a + c
    qkv.q[0][0, 0, n - 8:] += 0.25 * b
    kept = {}
    for share in (0.0, 0.5):
        method = ZSMerge(budget=8, proximity=3, residual=1, kernel_size=1, decay=1.0, rank="split",
                         window_weight=0.0, window_share=share, layer_budgets="uniform")
        s = drive_synthetic(method, qkv, [n], 0).snapshots[0].layers[0]
        kept[share] = sorted(s["pos"][0, 0, 1:5].tolist())  # slots: [residual | 4 context | 3 proximity]
    assert 20 not in kept[0.0] and 20 in kept[0.5], kept
    assert len(set(kept[0.5]) & set(kept[0.0])) == 2, kept  # the other half: the best by accumulated attention


def test_zsmerge_window_weight_zero_ranks_by_accumulated_attention_alone():
    """rank="blend" with window_weight=0 keeps exactly what scoring by accumulated attention alone keeps
    (rank="accumulated", paper Eq. 5 with decay 1): the window term is the only difference."""
    from kvzoo.cache.zsmerge import ZSMerge
    from tests.method_helpers import drive_synthetic, random_qkv

    qkv = random_qkv(2, 2, 2, 1, 64, seed=7)  # 60 prompt positions + 3 decode steps
    hybrid = ZSMerge(budget=12, decay=1.0, rank="blend", window_weight=0.0)
    accumulated = ZSMerge(budget=12, decay=1.0, rank="accumulated")
    for a, b in zip(drive_synthetic(hybrid, qkv, [60, 45], 3).snapshots,
                    drive_synthetic(accumulated, qkv, [60, 45], 3).snapshots):
        for la, lb in zip(a.layers, b.layers):
            assert torch.equal(la["pos"], lb["pos"])
            torch.testing.assert_close(la["k"], lb["k"], atol=1e-6, rtol=1e-6)
    weighted = drive_synthetic(ZSMerge(budget=12, decay=1.0, rank="blend"), qkv, [60, 45], 3).snapshots
    assert any(not torch.equal(la["pos"], lb["pos"]) for la, lb in zip(weighted[0].layers,
                                                                    drive_synthetic(accumulated, qkv, [60, 45], 3)
                                                                    .snapshots[0].layers))


def test_zsmerge_window_share_is_not_spent_on_a_heavy_hitter():
    """The window's share is filled after the accumulated attention's: a token that tops both (a sink every
    query reads, the window too) is kept as a heavy hitter, and the one window slot goes to the token only
    the window reads."""
    from kvzoo.cache.zsmerge import ZSMerge
    from tests.method_helpers import drive_synthetic, random_qkv

    n = 40
    qkv = random_qkv(1, 1, 1, 1, n, seed=4, scale=0.1)
    a, b = torch.eye(8)[0], torch.eye(8)[1]
    qkv.k[0][0, 0, 2] = 10 * a  # read by every query, the window's included
    qkv.k[0][0, 0, 20] = 12 * b  # read by the window's 8 queries only
    qkv.q[0][0, 0, :] = 0.5 * a
    qkv.q[0][0, 0, n - 8:] += 0.25 * b
    method = ZSMerge(budget=8, proximity=3, residual=1, kernel_size=1, decay=1.0, rank="split",
                     window_weight=0.0, window_share=0.25, layer_budgets="uniform")  # 1 of the 4 context slots
    kept = drive_synthetic(method, qkv, [n], 0).snapshots[0].layers[0]["pos"][0, 0, 1:5].tolist()
    assert 2 in kept and 20 in kept, kept


# The share ranks' tests below build their reference from the attention sum: what they check is how the shares
# combine (max, leverage, block attention); each accumulated statistic, the default's distant rate included, is
# checked against its definition in tests/test_zsmerge_standing.py.
SUM = {"accumulated": "sum"}


def _attention_shares(qkv, n: int, w: int, kernel: int, pooling: str = "max", ahead: int | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(accumulated / its sum, pooled window / its sum, the window's own unpooled scores), float64, for one
    sequence and one head, from the attention probabilities' definition."""
    from tests.method_helpers import pool_1d, reference_probs

    probs = reference_probs(qkv.q[0][0], qkv.k[0][0, 0], list(range(n)), list(range(n)), None)[0]  # [n, n]
    accumulated = probs.sum(0)
    own = probs[n - w:].sum(0)
    window = torch.cat([pool_1d(own[: n - w], kernel, pooling, ahead), own[n - w:]])  # pooled before the window
    return accumulated / accumulated.sum(), window / window.sum(), own


def _top(score: torch.Tensor, own: torch.Tensor, n: int, context: int) -> set[int]:
    """The `context` best of positions 0 .. n-4 (the last 3 are the proximity ring); equal scores (a pooled
    peak's neighbours) ordered by the token's own window score."""
    return set(sorted(range(n - 3), key=lambda j: (score[j].item(), own[j].item()), reverse=True)[:context])


def test_zsmerge_combine_max_keeps_the_largest_attention_shares():
    """rank="attention_shares": the context is the top of max(accumulated / its sum, pooled window / its sum), computed
    here from the attention probabilities' definition (float64), and differs from what either signal alone or
    their sum of shares keeps on this input."""
    from kvzoo.cache.zsmerge import ZSMerge
    from tests.method_helpers import drive_synthetic, random_qkv

    n, w, kernel, context = 40, 8, 3, 4
    qkv = random_qkv(1, 1, 1, 1, n, seed=7, scale=1.5)
    accumulated, window, own = _attention_shares(qkv, n, w, kernel, ahead=ZSMerge.pool_ahead)  # the default
    method = ZSMerge(budget=8, proximity=3, residual=1, kernel_size=kernel, decay=1.0, rank="attention_shares",
                     **SUM)
    kept = set(drive_synthetic(method, qkv, [n], 0).snapshots[0].layers[0]["pos"][0, 0, 1:5].tolist())
    assert kept == _top(torch.maximum(accumulated, window), own, n, context)
    others = [accumulated, window, accumulated + window]
    assert all(_top(score, own, n, context) != kept for score in others), "the input does not tell the rules apart"


def test_zsmerge_pool_ahead_lends_a_read_token_s_window_score_to_the_tokens_after_it():
    """pool_ahead: the window share is max-pooled over the kernel_size - 1 - pool_ahead earlier positions and
    the pool_ahead later ones (reference: pool_1d written from that definition), and the kept context is the
    top of max(accumulated share, that window share). The window's queries read one key (position 20) hard:
    a centred pool keeps its neighbours on both sides, pool_ahead=0 those after it, pool_ahead=4 those before."""
    from kvzoo.cache.zsmerge import ZSMerge
    from tests.method_helpers import drive_synthetic, random_qkv

    n, w, kernel, context = 40, 8, 5, 4
    qkv = random_qkv(1, 1, 1, 1, n, seed=4, scale=1.5)
    read = torch.eye(8)[1]
    qkv.k[0][0, 0, 20] = 12 * read
    qkv.q[0][0, 0, n - w:] += 3 * read
    kept = {}
    for ahead in (None, 0, 4):
        accumulated, window, own = _attention_shares(qkv, n, w, kernel, ahead=ahead)
        method = ZSMerge(budget=8, proximity=3, residual=1, kernel_size=kernel, pool_ahead=ahead, decay=1.0,
                         rank="attention_shares")
        kept[ahead] = set(drive_synthetic(method, qkv, [n], 0).snapshots[0].layers[0]["pos"][0, 0, 1:5].tolist())
        assert kept[ahead] == _top(torch.maximum(accumulated, window), own, n, context), ahead
    assert min(kept[None]) < 20 and min(kept[0]) == 20 and max(kept[4]) == 20, kept


def test_zsmerge_leverage_share_keeps_a_key_nobody_reads():
    """rank="shares": a third share, each key's ridge leverage among the prompt's keys over their sum
    (float64 reference: h = diag(X (X^T X + r I)^-1 X^T), X the centred keys, r = 1e-4 tr(X^T X) / D). Every
    key but one lies in a 4-dimensional subspace the queries read; the one outside it (leverage near 1, so
    a share near 1 / 5) is read by no query and is kept only with the third share, and the kept set is the
    top of max(the three shares)."""
    from kvzoo.cache.zsmerge import ZSMerge
    from tests.method_helpers import drive_synthetic, random_qkv

    n, w, kernel, context, unique = 40, 8, 3, 4, 15
    qkv = random_qkv(1, 1, 1, 1, n, seed=7, scale=1.5)
    keys = qkv.k[0]  # [1, 1, n, 8]
    keys[..., 4:] = 0.0
    keys[0, 0, unique, 6] = 3.0
    qkv.q[0][..., 6] = 0.0  # no query reads the unique direction
    accumulated, window, own = _attention_shares(qkv, n, w, kernel, ahead=ZSMerge.pool_ahead)  # the default
    leverage = reference_leverage(keys[0, 0])
    share = torch.maximum(torch.maximum(accumulated, window), leverage / leverage.sum())
    spec = dict(budget=8, proximity=3, residual=1, kernel_size=kernel, decay=1.0, **SUM)
    kept = set(drive_synthetic(ZSMerge(**spec, rank="shares"), qkv, [n], 0).snapshots[0].layers[0]["pos"]
               [0, 0, 1:5].tolist())
    without = set(drive_synthetic(ZSMerge(**spec, rank="attention_shares"), qkv, [n], 0).snapshots[0].layers[0]
                  ["pos"][0, 0, 1:5].tolist())
    assert kept == _top(share, own, n, context)
    assert unique in kept and unique not in without, (kept, without)


def test_zsmerge_leverage_share_goes_to_a_basis_of_the_keys():
    """leverage_tokens="basis" (default): only the round(sum of leverages) + 1 highest-leverage tokens of a
    head (the centred keys' effective dimension under the ridge, plus the mean's direction) keep their
    leverage share, which is the share of the whole sum as before; the kept context is the top of
    max(accumulated, window, that share), from the definitions (float64), and on this input differs from
    leverage_tokens="all" (every token's share) and from a cap of 2."""
    from kvzoo.cache.zsmerge import ZSMerge
    from tests.method_helpers import drive_synthetic, random_qkv

    n, w, kernel, context = 40, 8, 3, 20
    qkv = random_qkv(1, 1, 1, 1, n, seed=24, scale=3.0)
    accumulated, window, own = _attention_shares(qkv, n, w, kernel, ahead=ZSMerge.pool_ahead)  # the default
    leverage = reference_leverage(qkv.k[0][0, 0])
    dimension = round(leverage.sum().item()) + 1
    assert 7 <= dimension <= 9  # head_dim 8
    spec = dict(budget=context + 4, proximity=3, residual=1, kernel_size=kernel, decay=1.0, rank="shares", **SUM)
    kept, expected = {}, {}
    for tokens, count in (("basis", dimension), ("all", n), (2, 2)):
        highest = set(leverage.argsort(descending=True)[:count].tolist())
        share = torch.tensor([leverage[j] / leverage.sum() if j in highest else 0.0 for j in range(n)])
        expected[tokens] = _top(torch.maximum(torch.maximum(accumulated, window), share), own, n, context)
        pos = drive_synthetic(ZSMerge(**spec, leverage_tokens=tokens), qkv, [n], 0).snapshots[0].layers[0]["pos"]
        kept[tokens] = set(pos[0, 0, 1:1 + context].tolist())
    assert kept == expected
    assert kept["basis"] != kept["all"] and kept["basis"] != kept[2], "the input does not tell the counts apart"


@pytest.mark.parametrize("n", [5, 9, 30, 64])
def test_zsmerge_leverage_basis_counts_the_keys_dimension_and_their_mean(n):
    """The leverage share of a fresh chunk of n random keys (head_dim 8), against every token's share: the
    round(sum of leverages) + 1 highest-leverage tokens keep it unchanged, the rest get 0; a chunk of at most
    head_dim + 1 tokens (centred, its keys span n - 1 directions) keeps every token's share."""
    from kvzoo.cache.zsmerge import ZSMerge

    keys = torch.randn(1, 2, n, 8, generator=torch.Generator().manual_seed(n))
    chunk = candidates(keys)
    chunk.k, chunk.rope = keys, None  # the chunk's own keys, here every candidate
    valid = torch.ones(1, 2, n, dtype=torch.bool)
    every = ZSMerge(leverage_tokens="all")._leverage_share(chunk, valid)
    basis = ZSMerge(leverage_tokens="basis")._leverage_share(chunk, valid)
    for head in range(2):
        leverage = reference_leverage(keys[0, head])
        count = min(n, round(leverage.sum().item()) + 1)
        highest = leverage.argsort(descending=True)[:count]
        expected = torch.zeros(n, dtype=torch.float64)
        expected[highest] = leverage[highest] / leverage.sum()
        assert torch.allclose(basis[0, head].double(), expected, atol=1e-5)
        assert torch.allclose(every[0, head].double(), leverage / leverage.sum(), atol=1e-5)
        assert (count == n) == (n <= 9), (n, count)


def test_zsmerge_block_shares_adds_what_the_text_around_a_token_reads():
    """rank="block_shares": a fourth share, the attention each token receives from every query of its
    256-position block, earlier and later ones alike (unscaled logits q.k, Compactor's), times its value
    norm, average-pooled over 3 positions, over its sum; computed here from that definition (float64, the
    40-token prompt is one block) with the other three shares. The kept context is the top of max(the four
    shares), and on this input differs from rank="shares"'s."""
    from kvzoo.cache.zsmerge import ZSMerge
    from tests.method_helpers import dense_block_attention, drive_synthetic, pool_1d, random_qkv

    n, w, kernel, context = 40, 8, 3, 4
    qkv = random_qkv(1, 1, 1, 1, n, seed=8, scale=1.5)
    accumulated, window, own = _attention_shares(qkv, n, w, kernel, ahead=ZSMerge.pool_ahead)  # the default
    q, k, v = qkv.q[0][0], qkv.k[0][0], qkv.v[0][0, 0].double()  # [1, n, D]: one head
    received = dense_block_attention(q, k, list(range(n)), 256, 1.0)[0] * v.norm(dim=-1)  # one block: n < 256
    block = pool_1d(received, 3, "avg")
    leverage = reference_leverage(qkv.k[0][0, 0])
    three = torch.maximum(torch.maximum(accumulated, window), leverage / leverage.sum())
    four = torch.maximum(three, block / block.sum())
    spec = dict(budget=8, proximity=3, residual=1, kernel_size=kernel, decay=1.0, **SUM)
    kept = {}
    for rank in ("block_shares", "shares"):
        pos = drive_synthetic(ZSMerge(**spec, rank=rank), qkv, [n], 0).snapshots[0].layers[0]["pos"]
        kept[rank] = set(pos[0, 0, 1:5].tolist())
    assert kept["block_shares"] == _top(four, own, n, context), kept
    assert kept["shares"] == _top(three, own, n, context), kept
    assert kept["block_shares"] != kept["shares"], "the input does not tell the ranks apart"


def test_zsmerge_shares_a_short_chunk_does_not_outrank_what_every_query_reads():
    """rank="shares" on a prompt fed in chunks: a later chunk's tokens split only the chunk's part of the
    candidates' leverage (its tokens over all candidates), so six new keys nobody reads (each unique, so each
    with leverage near 5/6, a share of about 1/6 within the chunk) do not displace the 8 tokens every query
    reads (attention share about 1/8 each); with the whole share they would take the 3 context slots their
    leverage ranks above 1/8."""
    from kvzoo.cache.zsmerge import ZSMerge
    from tests.method_helpers import drive_synthetic, random_qkv

    n, first = 46, 40
    qkv = random_qkv(1, 1, 1, 1, n, seed=5, scale=0.1)
    eye = torch.eye(8)
    read = [2, 7, 11, 16, 21, 26, 30, 34]
    for j in read:
        qkv.k[0][0, 0, j] += 6 * eye[0]
    qkv.q[0][0, 0, :] = eye[0]  # every query reads the 8 keys along e0
    for i, j in enumerate(range(first, n)):
        qkv.k[0][0, 0, j] = 3 * eye[2 + i]  # the second chunk: 6 orthogonal keys no query reads
    method = ZSMerge(budget=12, proximity=3, residual=1, kernel_size=1, rank="shares", **SUM)  # 8 context slots
    one_chunk = drive_synthetic(method, qkv, [first], 0).snapshots[0].layers[0]["pos"][0, 0, 1:9].tolist()
    assert sorted(one_chunk) == read  # the first chunk alone keeps what every query reads
    two_chunks = drive_synthetic(method, qkv, [n], 0, prefill_chunk=first).snapshots[0].layers[0]["pos"]
    assert sorted(two_chunks[0, 0, 1:9].tolist()) == read, two_chunks[0, 0].tolist()
    assert sorted(two_chunks[0, 0, 9:].tolist()) == [n - 3, n - 2, n - 1]  # the ring


@pytest.mark.parametrize("question", [{}, dict(question_window=5, question_kernel_size=3, question_pooling="avg",
                                                 question_pool_ahead=1), dict(question_window=None)])
def test_zigzag_attention_shares_keeps_the_top_of_the_largest_share(question):
    """ZigZagKV(rank="attention_shares") with uniform budgets (bound_ratio=1.0): the layer keeps its
    observation window and the top of the largest of three shares among the older tokens: accumulated / its
    sum, the pooled observation window / its sum, and the pooled attention of the last `question_window`
    queries / its sum (by default 8 queries, max-pooled over a token and the 6 before it; question_window=None:
    the first two only), computed from the attention probabilities' definition (float64), as ZSMerge's rank
    does; equal shares go to the larger own score of the observation window. On this input the paper's window
    rank keeps a different set, and so would the default with another question window or pooling, or none (a
    changed default fails here)."""
    from kvzoo.cache.zigzag import ZigZagKV
    from tests.method_helpers import drive_synthetic, random_qkv

    n, w, kernel, context = 40, 8, 3, 4
    qkv = random_qkv(1, 1, 1, 1, n, seed=29, scale=1.5)
    accumulated, window, own = _attention_shares(qkv, n, w, kernel, "avg", ahead=ZigZagKV.pool_ahead)
    combined = torch.maximum(accumulated, window)
    spec = {"question_window": 8, "question_kernel_size": 7, "question_pooling": "max", "question_pool_ahead": 0,
            **question}
    if spec["question_window"] is not None:
        combined = torch.maximum(combined, _attention_shares(
            qkv, n, spec["question_window"], spec["question_kernel_size"], spec["question_pooling"],
            spec["question_pool_ahead"])[1])
    older = sorted(range(n - w), key=lambda j: (combined[j].item(), own[j].item()), reverse=True)[:context]
    kept = {}
    for rank in ("window", "attention_shares"):
        method = ZigZagKV(budget=w + context, window_size=w, kernel_size=kernel, pooling="avg", bound_ratio=1.0,
                          rank=rank, **question)
        pos = drive_synthetic(method, qkv, [n], 0).snapshots[0].layers[0]["pos"][0, 0]
        kept[rank] = set(pos[pos >= 0].tolist())
    assert kept["attention_shares"] == set(older) | set(range(n - w, n)), kept
    assert kept["window"] != kept["attention_shares"], "the input does not tell the ranks apart"


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_kvmerger_attention_shares_keeps_the_top_of_the_larger_share_verbatim(pooling):
    """KVMerger(rank="attention_shares"): the heavy hitters are the top of max(accumulated / its sum, pooled
    window / its sum) among the tokens older than the recent window (definitions, float64, with the window's
    max- or average-pooling), and each is kept verbatim (its own slot, log w = 0); with the paper's rank
    (A_t alone) some of them are merged away."""
    from kvzoo.cache.kvmerger import KVMerger
    from tests.method_helpers import drive_synthetic, random_qkv

    n, w, kernel, budget = 40, 8, 3, 14  # recent window int(0.34 * 14) = 4, heavy hitters int(0.24 * 14) = 3
    qkv = random_qkv(1, 1, 1, 1, n, seed=1, scale=1.5)
    accumulated, window, _ = _attention_shares(qkv, n, w, kernel, pooling, KVMerger.pool_ahead)  # the default
    share = torch.maximum(accumulated, window)
    heavy = set(sorted(range(n - 4), key=lambda j: share[j].item(), reverse=True)[:3])
    verbatim = {}
    for rank in ("attention_shares", "accumulated"):
        # min_similarity=None: every older token is merged or protected (random keys are too dissimilar for
        # the floor, which would keep singletons of either rank verbatim)
        method = KVMerger(budget=budget, rank=rank, window_size=w, kernel_size=kernel, pooling=pooling,
                          min_similarity=None)
        layer = drive_synthetic(method, qkv, [n], 0).snapshots[0].layers[0]
        single = layer["logw"][0, 0] == 0
        verbatim[rank] = set(layer["pos"][0, 0][single].tolist())
    assert heavy <= verbatim["attention_shares"], (heavy, verbatim)
    assert not heavy <= verbatim["accumulated"], "the input does not tell the ranks apart"


@pytest.mark.parametrize("field, bad", [("rank", "window"), ("window_size", 0), ("kernel_size", 2.5),
                                        ("pooling", "mean")])
def test_kvmerger_rank_settings_are_checked(field, bad):
    from kvzoo.cache.kvmerger import KVMerger
    from kvzoo.errors import KvzooError

    with pytest.raises(KvzooError, match=f"KVMerger: {field}"):
        KVMerger(**{field: bad})
