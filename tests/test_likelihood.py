"""`score`: per-token log-probabilities of a continuation under a compressed context."""

from __future__ import annotations

import pytest
import torch

import kvzoo
from kvzoo.errors import KvzooError
from kvzoo.likelihood import score_ids

# fp32 on CPU: the decode-step path sums attention in another order than the one-shot forward.
TOL = 1e-4


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return kvzoo.load(tiny_checkpoint("llama-gqa")[1])


def _reference(model, context: list[int], continuation: list[int]) -> torch.Tensor:
    """log-softmax of one plain forward over context + continuation, at the continuation's tokens."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = model(ids).float().log_softmax(-1)[0]
    n = len(context)
    return logp[n - 1: n - 1 + len(continuation)].gather(-1, torch.tensor(continuation)[:, None])[:, 0]


@pytest.mark.parametrize("chunk", [None, 5])
def test_full_cache_score_equals_one_plain_forward(model, chunk):
    contexts = [list(range(3, 20)), [7, 9, 11, 13]]
    continuations = [[5, 6, 7, 8, 9, 10], [40, 41]]
    got = score_ids(model, contexts, continuations, kvzoo.FullCache(), prefill_chunk=chunk)
    for g, ctx, cont in zip(got, contexts, continuations):
        assert g.shape == (len(cont),) and g.dtype == torch.float32
        torch.testing.assert_close(g, _reference(model, ctx, cont), atol=TOL, rtol=TOL)


def test_compression_changes_the_score_and_batching_does_not(model):
    ctx, cont = list(range(3, 60)), list(range(60, 80))
    full = score_ids(model, [ctx], [cont])[0]
    method = kvzoo.StreamingLLM(budget=8, sinks=2)
    alone = score_ids(model, [ctx], [cont], method)[0]
    batched = score_ids(model, [ctx, ctx[:30]], [cont, cont[:3]], method)[0]
    assert not torch.allclose(alone, full, atol=1e-3)  # a 8-slot cache must lose something
    torch.testing.assert_close(batched, alone, atol=TOL, rtol=TOL)


def test_score_accepts_ids_through_the_model_method(model):
    got = model.score([3, 4, 5, 6], [7, 8])
    torch.testing.assert_close(got, _reference(model, [3, 4, 5, 6], [7, 8]), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("context, continuation, message", [
    ([3, 4], [], "at least one token"),
    ([], [3], "empty"),
    ("", [3], "empty context"),
    ([3], "", "empty continuation"),
])
def test_bad_input_names_the_problem(model, context, continuation, message):
    with pytest.raises(KvzooError, match=message):
        if isinstance(context, str) or isinstance(continuation, str):
            model.score(context, continuation)
        else:
            score_ids(model, [context], [continuation])
