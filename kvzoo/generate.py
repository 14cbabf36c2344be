"""Generation as small functions that return values:

    request = prepare(model, prompt_ids, max_new_tokens, compression, prefill_chunk, cache)  # checks, ids, cache
    logits = prefill(model, request.ids, request.positions, request.cache, prefill_chunk)   # [B, V]
    for tokens in decode(model, request.cache, logits, max_new_tokens, sampling, eos): ...   # per step

`generate_ids`, `generate_text` (streaming, stop strings) and `chat` compose them. `prefill_cache` stops after
the prompt and returns the compressed cache; passing it back as `cache=` continues from it on a fork (the
prompt is fed after the cached tokens through the same chunked prefill, then decoded), so one cache can be
asked many times, by a batch of prompts at once, or saved (`kvzoo.cache.io`).

A batch is left-padded; every sequence keeps its own positions (padding has position -1 and never enters the
cache), so a prompt gives the same tokens alone or in a batch.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from os import PathLike
from typing import TYPE_CHECKING, Any

import torch

from kvzoo.cache.base import CompressionMethod
from kvzoo.cache.full import FullCache
from kvzoo.cache.io import model_origin
from kvzoo.cache.registry import as_method
from kvzoo.cache.slots import KVCache
from kvzoo.compile import should_compile
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


@dataclass(frozen=True)
class GenerationOutput:
    token_ids: list[list[int]]  # generated ids per sequence, eos excluded
    finish_reasons: list[str]  # "eos" | "length" (text-level "stop" is set by generate_text)
    cache: KVCache  # the cache generation ran in (a fork when it continued a given cache)
    prompt_lens: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    first_token_seconds: float = 0.0  # prefill plus sampling the first token
    decode_seconds: float = 0.0  # sampling and decode steps after the first token

    @property
    def decode_tokens_per_second(self) -> float:
        """Generated tokens per second of decoding, over the whole batch (the first token comes from prefill)."""
        steps = max((len(t) for t in self.token_ids), default=0) - 1
        return len(self.token_ids) * steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0


def left_pad(prompt_ids: list[list[int]], pad_id: int, device: torch.device,
             start: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] left-padded, positions [B, T]: start[b], start[b] + 1, ... for the tokens (start: 0, or where
    each sequence of a cache continues), -1 at padding."""
    t = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), t), pad_id, dtype=torch.long)
    pos = torch.full((len(prompt_ids), t), -1, dtype=torch.long)
    for b, p in enumerate(prompt_ids):
        ids[b, t - len(p):] = torch.tensor(p, dtype=torch.long)
        pos[b, t - len(p):] = torch.arange(len(p)) + (start[b] if start else 0)
    return ids.to(device), pos.to(device)


def _check_request(model: "CausalLM", prompt_ids: list[list[int]], max_new_tokens: int,
                   prefill_chunk: int | None, compression: CompressionMethod | None = None,
                   start: list[int] | None = None) -> None:
    """start: positions each prompt continues from (a given cache's lengths), else all 0."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise KvzooError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise KvzooError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
    if not prompt_ids:
        raise KvzooError("no prompts given")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise KvzooError(f"prompt {i} is empty: give at least one token")
        bad = [t for t in p if not 0 <= t < model.config.vocab_size]
        if bad:
            raise KvzooError(f"prompt {i} has token ids outside [0, {model.config.vocab_size}): {bad[:5]}")
    bounded = prefill_chunk is not None or not isinstance(as_method(compression), FullCache)
    _check_context(model, prompt_ids, max_new_tokens, bounded, start or [0] * len(prompt_ids))


def _check_context(model: "CausalLM", prompt_ids: list[list[int]], max_new_tokens: int, bounded: bool,
                   start: list[int]) -> None:
    """The long-prompt rule: a prompt longer than the model's context is refused with the full cache fed at
    once, and fed anyway, with a warning, when compression or chunked prefill is on (memory stays bounded;
    positions past the context were not seen in training, so quality may drop). Prompt + max_new_tokens
    past the context only warns. After a cache, a prompt's length counts from the cache's `start`."""
    context = model.config.max_position_embeddings
    ends = [s + len(p) for s, p in zip(start, prompt_ids)]
    longest = max(range(len(prompt_ids)), key=lambda i: ends[i])
    n = ends[longest]
    after = f" after the cache's {start[longest]}" if start[longest] else ""
    if n > context and not bounded:
        raise KvzooError(
            f"prompt {longest} has {len(prompt_ids[longest])} tokens{after}, more than the model's context of "
            f"{context}; shorten it, or give compression=... or prefill_chunk=N (CLI: --compression / "
            "--prefill-chunk) to feed it anyway"
        )
    if n > context:
        warnings.warn(f"prompt {longest} has {len(prompt_ids[longest])} tokens{after}, more than the model's "
                      f"context of {context}: fed anyway (compression or chunked prefill is on); positions past "
                      "the context were not seen in training, so quality may drop", KvzooWarning, stacklevel=4)
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


def _dtype_device(model: "CausalLM") -> tuple[torch.dtype, torch.device]:
    weight = next(model.parameters())
    return weight.dtype, weight.device


def make_decode_step(model: "CausalLM", compile: bool) -> DecodeStep:
    """One decode step: token [B, 1] at positions [B, 1] -> next-token logits [B, V]. Static shapes, slot
    writes in place, no host synchronisation. With `compile`, every decoder block runs through one compiled
    function shared by all layers (kvzoo/compile.py); embedding, final norm and LM head stay eager."""
    from kvzoo.compile import call_block, compiled_block_runner, mark_capacity_dynamic

    run_block = compiled_block_runner() if compile else call_block

    def step(token: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if compile:
            mark_capacity_dynamic(cache)  # a host-side check per layer once the stores are marked
        return model(token, positions, cache=cache, decode=True, run_block=run_block)[:, -1]

    return step


def prepare_decode(model: "CausalLM", cache: KVCache, last_position: int, compile: bool) -> None:
    """Before the first decode step: RoPE tables up to `last_position` (also done from `cache.max_position`
    by the model), and (compiled) the stores' capacity marked symbolic (also done by the compiled step)."""
    from kvzoo.compile import mark_capacity_dynamic

    model.rotary.reserve(last_position + 1)
    if compile:
        mark_capacity_dynamic(cache)


# --- the three stages: a cache to work in, prefill, decode -------------------------------------------------------


def new_cache(model: "CausalLM", prompt_lens: list[int], max_new_tokens: int, method: CompressionMethod) -> KVCache:
    """An empty cache for prompts of these lengths, with room for `max_new_tokens` generated tokens."""
    dtype, device = _dtype_device(model)
    cache = method.make_cache(model.config, prompt_lens, max_new_tokens, dtype, device)
    cache.origin = model_origin(model)
    return cache


def continue_cache(model: "CausalLM", cache: KVCache, prompt_lens: list[int], max_new_tokens: int,
                   in_place: bool = False) -> KVCache:
    """The cache prompts of these lengths continue in: a fork of `cache` (which stays as it is) with the headroom
    its method needs for the prompt and `max_new_tokens` (none for decode-time methods), holding the cached
    sequence once per prompt. `in_place=True` reuses `cache` itself when it has the room and needs no batching."""
    _check_cache_fits(model, cache)
    method = cache.method
    headroom = method.decode_headroom(max(prompt_lens) + max_new_tokens)  # type: ignore[attr-defined]
    if method.appends_later_prompts:  # type: ignore[attr-defined]
        # the prompt whole beside the decode headroom (`decode_cap` bounds only the generated tokens)
        headroom = max(headroom, max(prompt_lens) + method.decode_headroom(max_new_tokens))  # type: ignore[attr-defined]
    if in_place and cache.batch_size == len(prompt_lens) and (headroom == 0 or _free_slots(cache) >= headroom):
        return cache
    return cache.fork(headroom, batch=len(prompt_lens))


def _free_slots(cache: KVCache) -> int:
    """The fewest empty slots any (layer, sequence, KV head) of `cache` has within its budget (one host read)."""
    return int((cache.budgets()[..., None] - cache.filled_slots()).min())


def _check_cache_fits(model: "CausalLM", cache: KVCache) -> None:
    cfg = model.config
    dtype, device = _dtype_device(model)
    layer = cache.layers[0] if cache.layers else None
    if layer is None or len(cache.layers) != cfg.num_layers or layer.k.shape[1] != cfg.num_kv_heads \
            or layer.k.shape[3] != cfg.head_dim:
        shape = "no layers" if layer is None else f"{len(cache.layers)} layers of {list(layer.k.shape)}"
        raise KvzooError(f"the cache ({shape}) does not fit this model ({cfg.num_layers} layers, "
                         f"{cfg.num_kv_heads} KV heads of dim {cfg.head_dim})")
    if cache.dtype != dtype or cache.device != device:
        raise KvzooError(f"the cache is {cache.dtype} on {cache.device}, the model {dtype} on {device}")
    if not cache.lengths:
        raise KvzooError("the cache holds nothing yet: build it with model.prefill(...)")


def prefill(model: "CausalLM", ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
            chunk: int | None = None, on_chunk: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Feed ids [B, T] at positions [B, T] (-1: padding) into `cache`, `chunk` tokens at a time (the method
    compresses after each chunk, layer by layer), then let the method finish the prompt. Returns the logits
    [B, V] of each sequence's last position. `on_chunk(done, total)` reports progress."""
    total = ids.shape[1]
    step = chunk or total
    with torch.inference_mode():
        for start in range(0, total, step):
            logits = model(ids[:, start:start + step], positions[:, start:start + step], cache=cache, last_only=True)
            if on_chunk is not None:
                on_chunk(min(start + step, total), total)
        cache.lengths = (positions.max(dim=1).values + 1).tolist()
        for layer in cache.layers:  # the prompt now ends where each sequence's tokens end
            if "prompt_len" in layer.state:
                layer.state["prompt_len"] = torch.tensor(cache.lengths, device=ids.device)
        cache.end_prefill()
    return logits[:, -1]


def decode(model: "CausalLM", cache: KVCache, logits: torch.Tensor, max_new_tokens: int, sampling: Sampling,
           eos_token_ids: list[int], compile: bool | None = None) -> Iterator[list[int | None]]:
    """Sample a token per sequence from logits [B, V], feed it into `cache`, repeat. Yields, per step, each
    sequence's new token, None once it has ended (its eos is not yielded). The last token sampled is not fed:
    `cache.lengths` counts what the cache holds."""
    device = logits.device
    generator = sampling.generator(device)
    compile = should_compile(compile, max_new_tokens)
    prepare_decode(model, cache, max(cache.lengths) + max_new_tokens, compile)
    step = make_decode_step(model, compile)
    eos = torch.tensor(eos_token_ids or [-1], device=device)
    done = [False] * logits.shape[0]  # host-side: finished sequences
    next_pos = torch.tensor(cache.lengths, device=device)[:, None]
    for i in range(max_new_tokens):
        with torch.inference_mode():
            token = sample_next(logits, sampling, generator)
            # One host transfer per step: the tokens and which of them are eos.
            tokens, is_eos = torch.stack([token, torch.isin(token, eos).long()]).tolist()
        done = [d or bool(e) for d, e in zip(done, is_eos)]
        yield [None if d else t for d, t in zip(done, tokens)]
        if all(done) or i == max_new_tokens - 1:
            return
        with torch.inference_mode():
            logits = step(token[:, None], next_pos, cache)
        next_pos = next_pos + 1
        cache.lengths = [n + 1 for n in cache.lengths]
        cache.tokens_seen += 1


@dataclass(frozen=True)
class Request:
    """Prompts ready to run: left-padded ids and positions [B, T], and the cache they run in."""

    ids: torch.Tensor
    positions: torch.Tensor
    cache: KVCache
    prompt_lens: list[int]


def _made_by(method: CompressionMethod) -> tuple[CompressionMethod, ...]:
    """The methods a cache asked to be compressed with `method` may have been made with: itself, or what it
    becomes for a stored document or a prompt fed in chunks."""
    return (method, method.for_chunked_prefill(), method.for_stored_document(),
            method.for_stored_document(chunked=True).for_chunked_prefill())


def prepare(model: "CausalLM", prompt_ids: list[list[int]], max_new_tokens: int,
            compression: Compression, prefill_chunk: int | None, cache: KVCache | None = None,
            in_place: bool = False, stored: bool = False) -> Request:
    """Check a request and give it a cache: a new one for `compression` (its `for_stored_document` when the
    prompt is a document `stored` for later questions), or one continuing `cache`."""
    lens = [len(p) for p in prompt_ids]
    if cache is None:
        method = as_method(compression)
        if stored:
            method = method.for_stored_document(chunked=prefill_chunk is not None)
        if prefill_chunk is not None:
            method = method.for_chunked_prefill()
        _check_request(model, prompt_ids, max_new_tokens, prefill_chunk, method)
        if prefill_chunk is not None and not method.supports_chunked_prefill:
            raise KvzooError(
                f"{type(method).__name__} ranks or allocates from statistics over the whole prompt at once "
                "(see its supports_chunked_prefill), so it cannot compress chunk by chunk: leave prefill_chunk unset"
            )
        work = new_cache(model, lens, max_new_tokens, method)
        start = None
    else:
        asked = as_method(compression) if compression is not None else None
        if asked is not None and cache.method not in _made_by(asked):
            raise KvzooError(f"the cache was compressed with {cache.method}; leave compression unset when passing "
                             f"cache= (got {compression})")
        _check_cache_fits(model, cache)
        if cache.batch_size not in (1, len(prompt_ids)):
            raise KvzooError(f"a cache of {cache.batch_size} sequences cannot continue {len(prompt_ids)} prompts: "
                             "give one prompt per cached sequence, or use a cache of one sequence")
        start = cache.lengths * (len(prompt_ids) // cache.batch_size)
        _check_request(model, prompt_ids, max_new_tokens, prefill_chunk, cache.method, start)
        work = continue_cache(model, cache, lens, max_new_tokens, in_place)
    ids, positions = left_pad(prompt_ids, _pad_id(model), _dtype_device(model)[1], start)
    return Request(ids, positions, work, lens)


def run(model: "CausalLM", request: Request, max_new_tokens: int, sampling: Sampling, eos_token_ids: list[int],
        prefill_chunk: int | None = None, compile: bool | None = None) -> Iterator[list[int | None]]:
    """Prefill then decode: the tokens of every step (see `decode`). Nothing is prefilled for 0 new tokens."""
    if max_new_tokens == 0:
        return iter(())
    logits = prefill(model, request.ids, request.positions, request.cache, prefill_chunk)
    return decode(model, request.cache, logits, max_new_tokens, sampling, eos_token_ids, compile)


def collect(steps: Iterator[list[int | None]], batch: int) -> tuple[list[list[int]], list[str]]:
    """Every sequence's tokens and finish reason ("eos" if it yielded None, else "length") from `decode`."""
    tokens: list[list[int]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    for step in steps:
        for b, t in enumerate(step):
            if t is None:
                reasons[b] = "eos"
            else:
                tokens[b].append(t)
    return tokens, reasons


def _as_batch(prompt_ids: list[list[int]] | list[int]) -> list[list[int]]:
    if prompt_ids and isinstance(prompt_ids[0], int):
        return [prompt_ids]  # type: ignore[list-item]
    return [list(p) for p in prompt_ids]  # type: ignore[union-attr]


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
    compile: bool | None = None,
    cache: KVCache | None = None,
) -> GenerationOutput:
    """Generate from token ids. A flat list of ints is one prompt. Returns ids, finish reasons, timings and the
    cache. `compression`: a method, a method class or a spec string such as 'zsmerge:budget=0.1' (None: full
    cache). With `cache=` (from `prefill_cache`), the prompts continue after the cached tokens, on a fork."""
    prompts = _as_batch(prompt_ids)
    sampling = Sampling(temperature, top_k, top_p, seed)
    eos = default_eos_ids(model) if eos_token_ids is None else eos_token_ids
    request = prepare(model, prompts, max_new_tokens, compression, prefill_chunk, cache)
    if max_new_tokens == 0:
        return GenerationOutput([[] for _ in prompts], ["length"] * len(prompts), request.cache, request.prompt_lens)
    started = time.perf_counter()
    logits = prefill(model, request.ids, request.positions, request.cache, prefill_chunk)
    prefill_s = time.perf_counter() - started
    steps = decode(model, request.cache, logits, max_new_tokens, sampling, eos, compile)
    first = next(steps)
    first_s = time.perf_counter() - started
    decode_started = time.perf_counter()
    tokens, reasons = collect(itertools.chain([first], steps), len(prompts))
    return GenerationOutput(tokens, reasons, request.cache, request.prompt_lens, prefill_s, first_s,
                            time.perf_counter() - decode_started)


def prefill_cache(
    model: "CausalLM",
    context: str | list[str] | list[int] | list[list[int]],
    compression: Compression = None,
    prefill_chunk: int | None = None,
    add_special_tokens: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
) -> KVCache:
    """The compressed cache of `context` alone (text or ids; a list is a batch), knowing nothing of what will be
    asked: pass it as `cache=` to generate / generate_ids / chat / score, as often as you like, or `save` it.
    The method compresses it as a document stored for later questions (`for_stored_document`: the default
    ZSMerge keeps a short ring and ranks the rest by a query-agnostic score)."""
    if isinstance(context, str) or (isinstance(context, list) and context and isinstance(context[0], str)):
        texts = [context] if isinstance(context, str) else context
        if any(not isinstance(t, str) or t == "" for t in texts):
            raise KvzooError("empty context: give some text")
        tok = model.require_tokenizer()
        ids = [tok.encode(t, add_special_tokens=add_special_tokens) for t in texts]  # type: ignore[arg-type]
    else:
        ids = _as_batch(context)  # type: ignore[arg-type]
    request = prepare(model, ids, 0, compression, prefill_chunk, stored=True)
    prefill(model, request.ids, request.positions, request.cache, prefill_chunk, on_chunk)
    return request.cache


def store_document(model: "CausalLM", ids: list[int], path: "str | PathLike[str]",
                   compression: Compression = None, prefill_chunk: int | None = None,
                   on_chunk: Callable[[int, int], None] | None = None, notes: dict[str, Any] | None = None
                   ) -> tuple[float, int]:
    """`prefill_cache` of one document's `ids`, saved to `path` (with `notes`, see `KVCache.save`): (the prefill's
    seconds, the cache's bytes in memory). What `kvzoo compress`, the demo and tools/bench_reuse.py do before
    questions are asked of the stored cache."""
    started = time.perf_counter()
    cache = prefill_cache(model, [ids], compression, prefill_chunk, on_chunk=on_chunk)
    seconds = time.perf_counter() - started
    cache.save(path, notes)
    return seconds, cache.nbytes()


def normalise_stop(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise KvzooError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stops


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
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
    compile: bool | None = None,
    return_cache: bool = False,
    chat: bool | None = None,
    add_special_tokens: bool | None = None,
    cache: KVCache | None = None,
) -> Any:
    """Generate text for a prompt (-> str) or a batch of prompts (-> list[str]).

    - temperature 0 is greedy; `seed` makes sampling reproducible;
    - `stop`: strings that end a sequence (the text is cut before them); eos ids come from the checkpoint;
    - `stream=True` (one prompt): returns an iterator of text pieces as they are decoded;
    - `compression`: a method such as `ZSMerge(budget=0.05)` or a spec string such as 'zsmerge:budget=0.05'
      (default: FullCache); `prefill_chunk=N` feeds the prompt N tokens at a time;
    - `chat`: the chat-template rule (`render_prompts`), the same as the CLI's `--chat/--no-chat`;
    - `cache`: a cache from `model.prefill(context)`: the prompt(s) continue after it (one batch over the same
      cache for a list); the given cache is left unchanged. The text then continues the cached text as it is:
      no chat template (unless chat=True) and no special tokens (unless add_special_tokens=True);
    - `compile`: torch.compile the decode step; None (default) compiles when max_new_tokens >=
      `kvzoo.compile.AUTO_COMPILE_MIN_NEW_TOKENS` (the CLI's `--compile/--no-compile`);
    - `return_cache=True`: returns `(texts, cache)`; use `generate_ids` for token ids.
    """
    tok = model.require_tokenizer()
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise KvzooError("prompt must be a string or a non-empty list of strings")
    if any(p == "" for p in prompts):
        raise KvzooError("empty prompt: give some text")
    stops = normalise_stop(stop)
    if stream and not single:
        raise KvzooError("stream=True takes a single prompt, not a batch")
    if stream and return_cache:
        raise KvzooError("stream=True cannot return the cache")
    if cache is not None:  # the prompt continues the cached text
        chat = False if chat is None else chat
        add_special_tokens = False if add_special_tokens is None else add_special_tokens
    texts, special = render_prompts(tok, prompts, chat, add_special_tokens)
    ids = [tok.encode(p, add_special_tokens=special) for p in texts]
    sampling = Sampling(temperature, top_k, top_p, seed)
    eos = default_eos_ids(model) if eos_token_ids is None else eos_token_ids
    request = prepare(model, ids, max_new_tokens, compression, prefill_chunk, cache)
    steps = run(model, request, max_new_tokens, sampling, eos, prefill_chunk, compile)
    if stream:
        return stream_text(tok, steps, stops)
    tokens: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    for step in steps:
        for b, t in enumerate(step):
            if t is not None:
                tokens[b].append(t)
        if stops:  # end sequences whose text now contains a stop string
            stopped = [done or cut_at_stop(tok.decode(t), stops)[1] for done, t in zip(stopped, tokens)]
            if all(stopped):
                break
    texts = [cut_at_stop(tok.decode(t), stops)[0] for t in tokens]
    result: Any = texts[0] if single else texts
    return (result, request.cache) if return_cache else result


def stream_text(tok: Any, steps: Iterator[list[int | None]], stops: list[str]) -> Iterator[str]:
    """Text pieces as tokens arrive; holds back any tail that could still become a stop string."""
    from kvzoo.tokenizer import StreamDecoder

    decoder = StreamDecoder(tok)
    pending = ""
    for tokens in steps:
        if tokens[0] is None:
            break
        pending += decoder.push(tokens[0])
        cut, hit = cut_at_stop(pending, stops)
        if hit:
            if cut:
                yield cut
            return
        safe = len(pending) - _stop_prefix_tail(pending, stops)
        if safe > 0:
            yield pending[:safe]
            pending = pending[safe:]
    pending += decoder.flush()
    cut, _ = cut_at_stop(pending, stops)
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
    """Reply to a conversation rendered with the checkpoint's chat template (generate's options apply; with
    `cache=`, the rendering is fed after the cached tokens; for a conversation kept across turns see
    `kvzoo.conversation`)."""
    tok = model.require_tokenizer()
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise KvzooError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    # The template already contains the special tokens (as Hugging Face renders it).
    return generate_text(model, text, max_new_tokens=max_new_tokens, chat=False, add_special_tokens=False, **kwargs)
