"""Generation: batched prefill (optionally chunked), a static-shaped decode loop, sampling, stop conditions,
streaming and chat.

A batch is left-padded; every sequence keeps its own positions (padding has position -1 and never enters the
cache), so a prompt gives the same tokens alone or in a batch.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvzoo.cache.base import CompressionMethod
from kvzoo.cache.full import FullCache
from kvzoo.cache.registry import as_method
from kvzoo.cache.slots import KVCache
from kvzoo.errors import KvzooError, KvzooWarning

if TYPE_CHECKING:
    from kvzoo.models.base import CausalLM

DecodeStep = Callable[[torch.Tensor, torch.Tensor, KVCache], torch.Tensor]
Compression = CompressionMethod | type[CompressionMethod] | str | None  # see kvzoo.cache.registry.as_method

DEFAULT_MAX_NEW_TOKENS = 256  # generate, generate_ids, chat and the CLI


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy; top_k / top_p filter before sampling."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise KvzooError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise KvzooError(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1):
            raise KvzooError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if self.temperature == 0 and (self.top_k is not None or self.top_p is not None):
            warnings.warn("top_k / top_p have no effect with temperature 0 (greedy decoding); "
                          "give a temperature > 0 to sample", KvzooWarning, stacklevel=4)

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the most likely token always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@dataclass
class GenerationOutput:
    token_ids: list[list[int]]  # generated ids per sequence, eos excluded
    finish_reasons: list[str]  # "eos" | "length" (text-level "stop" is set by generate_text)
    cache: KVCache
    prompt_lens: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # sampling and decode steps after the first token

    @property
    def decode_tokens_per_second(self) -> float:
        """Generated tokens per second of decoding, over the whole batch (the first token comes from prefill)."""
        steps = max((len(t) for t in self.token_ids), default=0) - 1
        return len(self.token_ids) * steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0


def left_pad(prompt_ids: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] left-padded, positions [B, T] (-1 at padding)."""
    t = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), t), pad_id, dtype=torch.long)
    pos = torch.full((len(prompt_ids), t), -1, dtype=torch.long)
    for b, p in enumerate(prompt_ids):
        ids[b, t - len(p):] = torch.tensor(p, dtype=torch.long)
        pos[b, t - len(p):] = torch.arange(len(p))
    return ids.to(device), pos.to(device)


def _check_request(model: "CausalLM", prompt_ids: list[list[int]], max_new_tokens: int,
                   prefill_chunk: int | None, compression: CompressionMethod | None = None) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise KvzooError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise KvzooError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
    if not prompt_ids:
        raise KvzooError("no prompts given")
    context = model.config.max_position_embeddings
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise KvzooError(f"prompt {i} is empty: give at least one token")
        bad = [t for t in p if not 0 <= t < model.config.vocab_size]
        if bad:
            raise KvzooError(f"prompt {i} has token ids outside [0, {model.config.vocab_size}): {bad[:5]}")
    bounded = prefill_chunk is not None or not isinstance(as_method(compression), FullCache)
    _check_context(model, prompt_ids, max_new_tokens, bounded)


def _check_context(model: "CausalLM", prompt_ids: list[list[int]], max_new_tokens: int, bounded: bool) -> None:
    """The long-prompt rule: a prompt longer than the model's context is refused with the full cache fed at
    once, and fed anyway, with a warning, when compression or chunked prefill is on (memory stays bounded;
    positions past the context were not seen in training, so quality may drop). Prompt + max_new_tokens
    past the context only warns."""
    context = model.config.max_position_embeddings
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    n = len(prompt_ids[longest])
    if n > context and not bounded:
        raise KvzooError(
            f"prompt {longest} has {n} tokens, more than the model's context of {context}; shorten it, or give "
            "compression=... or prefill_chunk=N (CLI: --compression / --prefill-chunk) to feed it anyway"
        )
    if n > context:
        warnings.warn(f"prompt {longest} has {n} tokens, more than the model's context of {context}: fed anyway "
                      "(compression or chunked prefill is on); positions past the context were not seen in "
                      "training, so quality may drop", KvzooWarning, stacklevel=4)
    elif n + max_new_tokens > context:
        warnings.warn(f"prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                      f"({context}); positions past it were not seen in training", KvzooWarning, stacklevel=4)


def default_eos_ids(model: "CausalLM") -> list[int]:
    ids = list(model.config.eos_token_ids)
    if model.tokenizer is not None:
        ids += [i for i in model.tokenizer.eos_token_ids if i not in ids]
    return ids


def _pad_id(model: "CausalLM") -> int:
    if model.tokenizer is not None and model.tokenizer.pad_token_id is not None:
        return model.tokenizer.pad_token_id
    return (model.config.eos_token_ids or [0])[0]


def make_decode_step(model: "CausalLM", compile: bool) -> DecodeStep:
    """One decode step: token [B, 1] at positions [B, 1] -> next-token logits [B, V]. Optionally compiled
    once with static shapes (the cache capacity is fixed before the first step, so there are no recompiles)."""

    def step(token: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return model(token, positions, cache=cache, decode=True)[:, -1]

    return torch.compile(step, fullgraph=True, dynamic=False) if compile else step


@torch.inference_mode()
def stream_ids(
    model: "CausalLM",
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling,
    eos_token_ids: list[int],
    compression: CompressionMethod,
    prefill_chunk: int | None = None,
    compile: bool = False,
    out: GenerationOutput | None = None,
) -> Iterator[list[int | None]]:
    """Yields, per step, each sequence's new token (None once it has finished). Fills `out` as it goes."""
    _check_request(model, prompt_ids, max_new_tokens, prefill_chunk, compression)
    if prefill_chunk is not None and not compression.supports_chunked_prefill:
        raise KvzooError(
            f"{type(compression).__name__} allocates its budgets from every layer's statistics over the whole "
            "prompt, so it cannot compress chunk by chunk: leave prefill_chunk unset"
        )
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lens = [len(p) for p in prompt_ids]
    ids, positions = left_pad(prompt_ids, _pad_id(model), device)
    cache = compression.make_cache(model.config, lens, max_new_tokens, dtype, device)
    if out is not None:
        out.cache, out.prompt_lens = cache, lens
        out.token_ids = [[] for _ in prompt_ids]
        out.finish_reasons = ["length"] * len(prompt_ids)
    if max_new_tokens == 0:
        return
    chunk = prefill_chunk or ids.shape[1]
    started = time.perf_counter()
    for start in range(0, ids.shape[1], chunk):
        logits = model(ids[:, start:start + chunk], positions[:, start:start + chunk], cache=cache, last_only=True)
    compression.end_prefill(cache)
    logits = logits[:, -1]  # [B, V]: the last prompt position predicts the first new token
    if out is not None:
        out.prefill_seconds = time.perf_counter() - started
        started = time.perf_counter()
    generator = sampling.generator(device)
    step = make_decode_step(model, compile)
    eos = torch.tensor(eos_token_ids or [-1], device=device)
    done = [False] * len(prompt_ids)  # host-side: finished sequences
    next_pos = torch.tensor(lens, device=device)[:, None]
    for i in range(max_new_tokens):
        token = sample_next(logits, sampling, generator)
        # One host transfer per step: the tokens and which of them are eos.
        tokens, is_eos = torch.stack([token, torch.isin(token, eos).long()]).tolist()
        emitted: list[int | None] = []
        for b, (t, e) in enumerate(zip(tokens, is_eos)):
            if done[b] or e:
                emitted.append(None)
                if out is not None and e and not done[b]:
                    out.finish_reasons[b] = "eos"
                done[b] = True
            else:
                emitted.append(t)
                if out is not None:
                    out.token_ids[b].append(t)
        if out is not None:
            out.decode_seconds = time.perf_counter() - started
        yield emitted
        if all(done) or i == max_new_tokens - 1:
            return
        logits = step(token[:, None], next_pos, cache)
        next_pos = next_pos + 1


def generate_ids(
    model: "CausalLM",
    prompt_ids: list[list[int]] | list[int],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_ids: list[int] | None = None,
    compression: Compression = None,
    prefill_chunk: int | None = None,
    compile: bool = False,
) -> GenerationOutput:
    """Generate from token ids. A flat list of ints is one prompt. Returns ids, finish reasons and the cache.
    `compression`: a method, a method class or a spec string such as 'zsmerge:budget=0.1' (None: full cache)."""
    if prompt_ids and isinstance(prompt_ids[0], int):
        prompt_ids = [prompt_ids]  # type: ignore[list-item]
    out = GenerationOutput([], [], cache=None)  # type: ignore[arg-type]
    for _ in stream_ids(
        model,
        prompt_ids,  # type: ignore[arg-type]
        max_new_tokens,
        Sampling(temperature, top_k, top_p, seed),
        default_eos_ids(model) if eos_token_ids is None else eos_token_ids,
        as_method(compression),
        prefill_chunk,
        compile,
        out,
    ):
        pass
    return out


def _normalise_stop(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise KvzooError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stops


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def generate_text(
    model: "CausalLM",
    prompt: str | list[str],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    eos_token_ids: list[int] | None = None,
    stream: bool = False,
    compression: Compression = None,
    prefill_chunk: int | None = None,
    compile: bool = False,
    return_cache: bool = False,
    chat: bool | None = None,
    add_special_tokens: bool | None = None,
) -> Any:
    """Generate text for a prompt (-> str) or a batch of prompts (-> list[str]).

    - temperature 0 is greedy; `seed` makes sampling reproducible;
    - `stop`: strings that end a sequence (the text is cut before them); eos ids come from the checkpoint;
    - `stream=True` (one prompt): returns an iterator of text pieces as they are decoded;
    - `compression`: a method such as `ZSMerge(budget=0.05)` or a spec string such as 'zsmerge:budget=0.05'
      (default: FullCache); `prefill_chunk=N` feeds the prompt N tokens at a time;
    - `chat`: the chat-template rule (`render_prompts`), the same as the CLI's `--chat/--no-chat`;
    - `return_cache=True`: returns `(texts, cache)`; use `generate_ids` for token ids.
    """
    tok = model.require_tokenizer()
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise KvzooError("prompt must be a string or a non-empty list of strings")
    if any(p == "" for p in prompts):
        raise KvzooError("empty prompt: give some text")
    stops = _normalise_stop(stop)
    texts, special = render_prompts(tok, prompts, chat, add_special_tokens)
    ids = [tok.encode(p, add_special_tokens=special) for p in texts]
    args = (
        model, ids, max_new_tokens, Sampling(temperature, top_k, top_p, seed),
        default_eos_ids(model) if eos_token_ids is None else eos_token_ids,
        as_method(compression), prefill_chunk, compile,
    )
    if stream:
        if not single:
            raise KvzooError("stream=True takes a single prompt, not a batch")
        if return_cache:
            raise KvzooError("stream=True cannot return the cache")
        return _stream_text(tok, args, stops)
    out = GenerationOutput([], [], cache=None)  # type: ignore[arg-type]
    texts = [""] * len(prompts)
    stopped = [False] * len(prompts)
    for _ in stream_ids(*args, out=out):
        if stops:  # end sequences whose text now contains a stop string
            for b, done in enumerate(stopped):
                if not done:
                    texts[b], stopped[b] = _cut_at_stop(tok.decode(out.token_ids[b]), stops)
            if all(stopped):
                break
    texts = [_cut_at_stop(tok.decode(t), stops)[0] for t in out.token_ids]
    result: Any = texts[0] if single else texts
    return (result, out.cache) if return_cache else result


def _stream_text(tok: Any, args: tuple, stops: list[str]) -> Iterator[str]:
    """Text pieces as tokens arrive; holds back any tail that could still become a stop string."""
    from kvzoo.tokenizer import StreamDecoder

    decoder = StreamDecoder(tok)
    pending = ""
    for tokens in stream_ids(*args):
        if tokens[0] is None:
            break
        pending += decoder.push(tokens[0])
        cut, hit = _cut_at_stop(pending, stops)
        if hit:
            if cut:
                yield cut
            return
        safe = len(pending) - _stop_prefix_tail(pending, stops)
        if safe > 0:
            yield pending[:safe]
            pending = pending[safe:]
    pending += decoder.flush()
    cut, _ = _cut_at_stop(pending, stops)
    if cut:
        yield cut


def _stop_prefix_tail(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string (0 if none)."""
    longest = min(len(text), max((len(s) - 1 for s in stops), default=0))
    for k in range(longest, 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


def render_prompts(tok: Any, prompts: list[str], chat: bool | None,
                   add_special_tokens: bool | None) -> tuple[list[str], bool]:
    """The chat-template rule, shared by `generate` and the CLI: (texts to encode, add_special_tokens).

    - chat=None (default): each prompt is wrapped as one user message in the checkpoint's chat template
      when the checkpoint has one, unless `add_special_tokens=False` is given (the text is then taken as
      already rendered, e.g. the output of `tok.apply_chat_template`);
    - chat=True: always wrapped (an error when the checkpoint has no chat template);
    - chat=False: the raw text (a plain continuation).
    Wrapped text is encoded without adding special tokens (the template writes them); raw text with them
    unless `add_special_tokens=False`.
    """
    if chat is None:
        chat = tok.chat_template is not None and add_special_tokens is not False
    if not chat:
        return prompts, add_special_tokens is not False
    if tok.chat_template is None:
        raise KvzooError("chat=True, but this checkpoint has no chat template; use chat=False for plain text")
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
            for p in prompts], bool(add_special_tokens)


def chat(model: "CausalLM", messages: list[dict[str, str]], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
         **kwargs: Any) -> Any:
    """Reply to a conversation rendered with the checkpoint's chat template (generate's options apply)."""
    tok = model.require_tokenizer()
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise KvzooError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    # The template already contains the special tokens (as Hugging Face renders it).
    return generate_text(model, text, max_new_tokens=max_new_tokens, chat=False, add_special_tokens=False, **kwargs)
