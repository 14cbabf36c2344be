"""Scoring a continuation under a compressed context: per-token log-probabilities, teacher-forced through
decode steps (so decode-time methods keep compressing while the continuation is fed, exactly as they would
while generating it).

With FullCache the result equals the log-softmax of one plain forward over context + continuation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvzoo.cache.base import CompressionMethod
from kvzoo.cache.slots import KVCache
from kvzoo.errors import KvzooError
from kvzoo.generate import Compression, DecodeStep, make_decode_step, prefill, prepare

if TYPE_CHECKING:
    from kvzoo.models.base import CausalLM

TokensOrText = str | list[int]


def prefill_cache(
    model: "CausalLM", prompt_ids: list[list[int]], compression: CompressionMethod, headroom: int,
    prefill_chunk: int | None = None,
) -> tuple[KVCache, torch.Tensor]:
    """Feed left-padded prompts into a fresh cache of `compression` with room for `headroom` decode steps.
    Returns (cache, next-token logits [B, V] of each prompt's last position)."""
    request = prepare(model, prompt_ids, headroom, compression, prefill_chunk)
    return request.cache, prefill(model, request.ids, request.positions, request.cache, prefill_chunk)


def teacher_force(
    step: DecodeStep, cache: KVCache, logits: torch.Tensor, tokens: torch.Tensor, start_pos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed tokens [B, N] as N decode steps after `logits` [B, V] (the prediction for tokens[:, 0]).

    start_pos: [B] position of tokens[:, 0]. Returns (log-probabilities [B, N] fp32 of each fed token,
    logits [B, V] after the last one: the prediction for what follows)."""
    n = tokens.shape[1]
    logprobs = torch.empty(tokens.shape, dtype=torch.float32, device=tokens.device)
    for i in range(n):
        logprobs[:, i] = logits.float().log_softmax(-1).gather(-1, tokens[:, i:i + 1])[:, 0]
        logits = step(tokens[:, i:i + 1], (start_pos + i)[:, None], cache)
    return logprobs, logits


def continuation_logprobs(
    step: DecodeStep, cache: KVCache, logits: torch.Tensor, tokens: torch.Tensor, start_pos: torch.Tensor,
) -> torch.Tensor:
    """Log-probabilities [B, N] of tokens [B, N] after `logits`: the last token is only scored, never fed
    (N - 1 decode steps)."""
    logprobs, logits = teacher_force(step, cache, logits, tokens[:, :-1], start_pos)
    last = logits.float().log_softmax(-1).gather(-1, tokens[:, -1:])
    return torch.cat([logprobs, last], dim=1)


@torch.inference_mode()
def score_ids(
    model: "CausalLM",
    contexts: list[list[int]],
    continuations: list[list[int]],
    compression: Compression = None,
    prefill_chunk: int | None = None,
    compile: bool = False,
    cache: KVCache | None = None,
) -> list[torch.Tensor]:
    """Log-probabilities (fp32, one per continuation token) of each continuation given its context,
    compressed by `compression`. Batched: contexts are left-padded, shorter continuations are padded at the
    end (their padding steps are not scored). With `cache=` (from `model.prefill`), the contexts continue
    after the cached tokens, on a fork: the given cache is left unchanged."""
    if len(contexts) != len(continuations):
        raise KvzooError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    if not all(continuations):
        raise KvzooError("every continuation needs at least one token")
    n = max(len(c) for c in continuations)
    # n - 1 decode steps: the first continuation token is predicted by the prefill.
    request = prepare(model, contexts, n - 1, compression, prefill_chunk, cache)
    logits = prefill(model, request.ids, request.positions, request.cache, prefill_chunk)
    device = logits.device
    tokens = torch.tensor([c + [c[-1]] * (n - len(c)) for c in continuations], device=device)
    start = torch.tensor(request.cache.lengths, device=device)
    step = make_decode_step(model, compile)
    logprobs = continuation_logprobs(step, request.cache, logits, tokens, start)
    return [logprobs[b, : len(c)].cpu() for b, c in enumerate(continuations)]


def score(
    model: "CausalLM",
    context: TokensOrText,
    continuation: TokensOrText,
    compression: Compression = None,
    prefill_chunk: int | None = None,
    compile: bool = False,
    cache: KVCache | None = None,
) -> torch.Tensor:
    """Log-probabilities [N] of `continuation` (text or ids) given `context` (text or ids) compressed by
    `compression`. Text is tokenized separately: the context with the tokenizer's special tokens (none after
    a `cache=`, which the context continues), the continuation without them."""
    context_ids = _as_ids(model, context, add_special_tokens=cache is None, what="context")
    continuation_ids = _as_ids(model, continuation, add_special_tokens=False, what="continuation")
    return score_ids(model, [context_ids], [continuation_ids], compression, prefill_chunk, compile, cache)[0]


def _as_ids(model: "CausalLM", x: TokensOrText, add_special_tokens: bool, what: str) -> list[int]:
    if isinstance(x, str):
        if not x:
            raise KvzooError(f"empty {what}: give some text or token ids")
        return model.require_tokenizer().encode(x, add_special_tokens=add_special_tokens)
    if not isinstance(x, (list, tuple)) or not x or not all(isinstance(t, int) for t in x):
        raise KvzooError(f"{what} must be a non-empty string or list of token ids, got {type(x).__name__}")
    return list(x)
