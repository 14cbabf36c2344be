"""`kvzoo eval`: run methods x budgets over the tasks, each instance also with the full cache.

Instances of a task are batched (left padding keeps every sequence's own positions); one exact prefill
feeds the caches of several methods at once (`fanout`), grouped so their cache tensors stay under a
memory cap; then each method's cache is decoded on its own (teacher-forced, or greedy).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvzoo.cache.base import CompressionMethod
from kvzoo.cache.full import FullCache
from kvzoo.cache.registry import parse_compression, spec_fields
from kvzoo.cache.slots import KVCache
from kvzoo.convert.common import ProgressBar
from kvzoo.errors import KvzooError
from kvzoo.eval import tasks as T
from kvzoo.eval.fanout import fanout_prefill
from kvzoo.eval.metrics import first_number, leading_match
from kvzoo.generate import make_decode_step, prefill, prepare
from kvzoo.likelihood import continuation_logprobs

if TYPE_CHECKING:
    from kvzoo.models.base import CausalLM

DEFAULT_METHODS = ("full", "streamingllm", "h2o", "tova", "snapkv", "pyramidkv", "zsmerge", "kvmerger", "zigzag",
                   "compactor")
DEFAULT_BUDGETS = (0.05, 0.1, 0.2, 0.5)
PROBE_TOKENS = 64  # attn_error: tokens after the context whose attention is compared
ANSWER_TOKENS = 10  # greedy tokens read for a needle answer (" 48213." is at most 7 tokens)
MEMORY_MODES = ("budget", "matched")
NEEDLE_LAYOUTS = ("aware", "agnostic")  # the question compressed with the haystack, or asked after it


@dataclass
class EvalConfig:
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))  # names or spec strings
    budgets: list[float] = field(default_factory=lambda: list(DEFAULT_BUDGETS))
    tasks: list[str] = field(default_factory=lambda: list(T.TASKS))
    n: int = 8  # nll / agreement instances
    seed: int = 0
    context_len: int = 3072
    continuation_len: int = 256
    agreement_tokens: int = 64
    needle_lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    needle_depths: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    needle_repeats: int = 2  # instances per (kind, length, depth): 2 kinds x 2 x 6 x 2 = 48 by default
    # "aware": the question is compressed with the haystack; "agnostic": it is asked after compression
    needle_layouts: list[str] = field(default_factory=lambda: list(NEEDLE_LAYOUTS))
    needle_placement: str = "token"  # "sentence": each needle starts a sentence of the text (T.NEEDLE_PLACEMENTS)
    batch_size: int = 4
    memory_cap_gib: float = 3.0  # cache tensors held at once during a fan-out prefill
    # "budget": every method keeps `budget` of the prompt (prefill-only methods then append every generated
    # token); "matched": decode-time methods get the budget plus the tokens the task generates, i.e. the
    # constant memory equals what the prefill-only methods hold at the end (see `matched_memory`).
    memory: str = "budget"

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in T.TASKS]
        if unknown:
            raise KvzooError(f"unknown task {unknown[0]!r}; choose from {', '.join(T.TASKS)}")
        for b in self.budgets:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1:
                raise KvzooError(f"budget {b!r} is out of range: give ratios of the prompt in (0, 1)")
        for layout in self.needle_layouts or ["none"]:  # an empty list names no layout
            if layout not in NEEDLE_LAYOUTS:
                raise KvzooError(f"needle layout {layout!r} is not known: give any of {', '.join(NEEDLE_LAYOUTS)}")
        if self.needle_placement not in T.NEEDLE_PLACEMENTS:
            raise KvzooError(f"needle placement {self.needle_placement!r} is not known: give one of "
                             f"{', '.join(T.NEEDLE_PLACEMENTS)}")
        if self.memory not in MEMORY_MODES:
            raise KvzooError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {self.memory!r}")
        for name in ("n", "context_len", "continuation_len", "agreement_tokens", "needle_repeats", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise KvzooError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class MethodCase:
    """One column of the results: a method at a budget (the full cache has none)."""

    label: str  # e.g. "zsmerge" or "zsmerge:rank=accumulated"
    budget: float | None
    method: CompressionMethod


def method_cases(specs: list[str], budgets: list[float]) -> list[MethodCase]:
    """The full cache once, then every other spec at every budget (its `budget` field replaced)."""
    cases = [MethodCase("full", None, FullCache())]
    for spec in specs:
        if isinstance(spec, str) and "budget" in spec_fields(spec):  # replaced below without a word otherwise
            parse_compression(spec.partition(":")[0])  # an unknown name or variant is named first
            raise KvzooError(f"method {spec!r} sets budget, but eval runs every method at each of --budgets "
                             f"({', '.join(map(str, budgets))}): drop budget= from the spec")
        method = parse_compression(spec)
        if isinstance(method, FullCache):
            continue
        if not any(f.name == "budget" for f in dataclasses.fields(method)):  # type: ignore[arg-type]
            raise KvzooError(f"method {spec!r} has no budget to vary")
        for b in budgets:
            cases.append(MethodCase(spec, b, dataclasses.replace(method, budget=b)))  # type: ignore[type-var]
    return cases


def matched_memory(case: MethodCase, prompt_len: int, generated: int) -> MethodCase:
    """The case with the memory of a prefill-only method at the end of the task: a method that holds its
    budget while decoding (decode headroom 0) gets budget + generated / prompt_len of the prompt (capped
    below 1); prefill-only methods, which append the generated tokens anyway, are returned unchanged."""
    method = case.method
    if case.budget is None or method.decode_headroom(generated) > 0:
        return case
    matched = min(case.budget + generated / prompt_len, 0.999)
    return MethodCase(case.label, case.budget, dataclasses.replace(method, budget=matched))  # type: ignore[type-var]


def groups_under_cap(model: "CausalLM", cases: list[MethodCase], lens: list[int], headroom: int,
                     cap_bytes: float) -> Iterator[list[MethodCase]]:
    """Consecutive groups of cases whose caches together fit under cap_bytes (at least one per group)."""
    param = next(model.parameters())
    group: list[MethodCase] = []
    used = 0
    for case in cases:
        size = case.method.make_cache(model.config, lens, headroom, param.dtype, "meta").nbytes()
        if group and used + size > cap_bytes:
            yield group
            group, used = [], 0
        group.append(case)
        used += size
    if group:
        yield group


def kept_fraction(cache: KVCache, prompt_lens: list[int]) -> float:
    """Mean over layers and sequences of (filled slots per KV head) / prompt length, now."""
    filled = cache.filled_slots().float().mean(-1)  # [L, B]
    return float((filled / torch.tensor(prompt_lens, dtype=torch.float32)).mean())


def greedy(model: "CausalLM", cache: KVCache, logits: torch.Tensor, start_pos: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy tokens [B, n] after `logits` (the first one is argmax(logits)); start_pos [B]."""
    step = make_decode_step(model, compile=False)
    tokens = [logits.argmax(-1)]
    for i in range(n - 1):
        logits = step(tokens[-1][:, None], (start_pos + i)[:, None], cache)
        tokens.append(logits.argmax(-1))
    return torch.stack(tokens, dim=1)


@dataclass
class Record:
    """One instance of one task under one case."""

    task: str
    label: str
    budget: float | None
    instance: int
    values: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)


class Runner:
    """Runs the tasks; `records` grows as cells finish (so an interrupted run keeps what finished)."""

    def __init__(self, model: "CausalLM", config: EvalConfig, corpus: list[int], progress: bool = True,
                 on_cell: Callable[[], None] | None = None) -> None:
        self.model, self.config, self.corpus, self.progress = model, config, corpus, progress
        self.cases = method_cases(config.methods, config.budgets)
        self.records: list[Record] = []
        self.on_cell = on_cell  # called after every finished (batch, case): e.g. to save partial results

    # --- the building blocks of a task (public: a new task, e.g. `run_longbench`, is written with them) ----
    def done(self, bar: ProgressBar, note: str) -> None:
        """One (batch, case) cell finished: advance the bar and let `on_cell` save partial results."""
        bar.update(note=note)
        if self.on_cell is not None:
            self.on_cell()

    def batches(self, items: list[Any]) -> Iterator[tuple[int, list[Any]]]:
        """(index of the first item, items) in batches of `config.batch_size`."""
        size = self.config.batch_size
        for start in range(0, len(items), size):
            yield start, items[start:start + size]

    def prefilled(self, prompts: list[list[int]], headroom: int,
                  stored: bool = False) -> Iterator[tuple[MethodCase, KVCache, torch.Tensor]]:
        """(case, cache, next-token logits) for every case, fanning one prefill out to groups of cases;
        `headroom`: the tokens the task feeds after the prompts. `stored`: each method compresses the prompts as
        documents stored for later questions, as `prefill_cache` does (`for_stored_document`, and no room: the
        room for what follows comes from `continue_cache`, as in `generate(cache=...)`)."""
        lens = [len(p) for p in prompts]
        cap = self.config.memory_cap_gib * 2**30
        cases = self.cases
        if self.config.memory == "matched":
            cases = [matched_memory(c, min(lens), headroom) for c in cases]
        for group in groups_under_cap(self.model, cases, lens, headroom, cap):
            methods = [c.method.for_stored_document() if stored else c.method for c in group]
            caches, logits = fanout_prefill(self.model, prompts, methods, 0 if stored else headroom)
            for case, cache in zip(group, caches):
                yield case, cache, logits

    def add(self, task: str, case: MethodCase, first: int, values: dict[str, list[float]], **info: Any) -> None:
        """One record per instance of a batch: values maps a metric name to its per-instance list."""
        for i in range(len(next(iter(values.values())))):
            self.records.append(Record(task, case.label, case.budget, first + i,
                                       {k: v[i] for k, v in values.items()}, dict(info)))

    def run(self) -> list[Record]:
        cfg = self.config
        jobs: list[tuple[str, Callable[[ProgressBar], None], int]] = []
        text = None
        if any(t in cfg.tasks for t in ("nll", "agreement", "attn_error")):
            text = T.text_instances(self.corpus, cfg.n, cfg.context_len, cfg.continuation_len, cfg.seed)
        if "nll" in cfg.tasks:
            jobs.append(("nll", lambda bar: self._nll(text, bar), math.ceil(cfg.n / cfg.batch_size)))
        if "agreement" in cfg.tasks:
            jobs.append(("agreement", lambda bar: self._agreement(text, bar), math.ceil(cfg.n / cfg.batch_size)))
        if "attn_error" in cfg.tasks:
            jobs.append(("attn_error", lambda bar: self._attn_error(text, bar), math.ceil(cfg.n / cfg.batch_size)))
        if "needle" in cfg.tasks:
            needles = self.needles()
            jobs.append(("needle", lambda bar: self._needle(needles, bar),
                         len(cfg.needle_layouts) * len(self._needle_batches(needles))))
        for name, job, steps in jobs:
            bar = ProgressBar(steps * len(self.cases), f"eval {name}", enabled=self.progress)
            try:
                job(bar)
            finally:
                bar.close()
        return self.records

    # --- nll ----------------------------------------------------------------------------------------
    def _nll(self, instances: list[T.TextInstance], bar: ProgressBar) -> None:
        for first, batch in self.batches(instances):
            cont = torch.tensor([x.continuation for x in batch])
            start = torch.tensor([len(x.context) for x in batch])
            step = make_decode_step(self.model, compile=False)
            for case, cache, logits in self.prefilled([x.context for x in batch], cont.shape[1] - 1):
                kept = kept_fraction(cache, [len(x.context) for x in batch])
                with torch.inference_mode():
                    logp = continuation_logprobs(step, cache, logits, cont, start)
                # Prefill-only methods append every decoded token, decode-time ones hold their budget: the
                # memory a method really used is the cache at the end of the continuation.
                kept_end = kept_fraction(cache, [len(x.context) for x in batch])
                self.add("nll", case, first, {"nll": (-logp.mean(1)).tolist()}, kept=kept, kept_end=kept_end)
                self.done(bar, case.label)

    # --- agreement ------------------------------------------------------------------------------------
    def _agreement(self, instances: list[T.TextInstance], bar: ProgressBar) -> None:
        n = self.config.agreement_tokens
        for first, batch in self.batches(instances):
            start = torch.tensor([len(x.context) for x in batch])
            reference: torch.Tensor | None = None
            for case, cache, logits in self.prefilled([x.context for x in batch], n):
                with torch.inference_mode():
                    tokens = greedy(self.model, cache, logits, start, n)
                if reference is None:  # the full cache is always the first case
                    reference = tokens
                same = (tokens == reference).float().mean(1)
                self.add("agreement", case, first, {"agreement": same.tolist()})
                self.done(bar, case.label)

    # --- attention-output error per layer ----------------------------------------------------------------
    def _attn_error(self, instances: list[T.TextInstance], bar: ProgressBar) -> None:
        from kvzoo.eval.attn_error import attention_errors

        probe = min(PROBE_TOKENS, self.config.continuation_len)
        cap = self.config.memory_cap_gib * 2**30
        for first, batch in self.batches(instances):
            contexts = [x.context for x in batch]
            for group in groups_under_cap(self.model, self.cases, [len(c) for c in contexts], 0, cap):
                errors = attention_errors(self.model, contexts, [x.continuation[:probe] for x in batch],
                                          [c.method for c in group])
                for case, err in zip(group, errors):  # err: [L, B]
                    for i in range(err.shape[1]):
                        self.records.append(Record("attn_error", case.label, case.budget, first + i,
                                                   {"error": float(err[:, i].mean())},
                                                   {"per_layer": err[:, i].tolist()}))
                    self.done(bar, case.label)

    # --- needle ------------------------------------------------------------------------------------------
    def needles(self) -> list[T.NeedleInstance]:
        """The needle instances of this config (seeded), in the order of the results' instance numbers."""
        cfg = self.config
        tok = self.model.require_tokenizer()
        out = []
        for r in range(cfg.needle_repeats):
            out += T.needle_instances(tok, self.corpus, cfg.needle_lengths, cfg.needle_depths, T.NEEDLE_KINDS,
                                      seed=cfg.seed * 1000 + r, placement=cfg.needle_placement)
        return out

    def _needle_batches(self, needles: list[T.NeedleInstance]) -> list[list[int]]:
        """Indices batched by (length, question length): a batch's questions are one unpadded later prompt."""
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(needles):
            by_shape.setdefault((x.length, len(x.question)), []).append(i)
        size = self.config.batch_size
        return [ids[s:s + size] for ids in by_shape.values() for s in range(0, len(ids), size)]

    def _needle(self, needles: list[T.NeedleInstance], bar: ProgressBar) -> None:
        for index in self._needle_batches(needles):
            batch = [needles[i] for i in index]
            for layout in self.config.needle_layouts:
                prompts = [x.prompt if layout == "aware" else x.haystack for x in batch]
                question = torch.tensor([x.question for x in batch])
                headroom = ANSWER_TOKENS + (0 if layout == "aware" else question.shape[1])
                for case, cache, logits in self.prefilled(prompts, headroom, stored=layout == "agnostic"):
                    start = torch.tensor([len(p) for p in prompts])
                    with torch.inference_mode():
                        if layout == "agnostic":  # as generate(question, cache=stored) feeds it: a later
                            # prompt chunk (a decode-time method compresses it, a prefill-only one appends it)
                            asked = prepare(self.model, question.tolist(), ANSWER_TOKENS, None, None, cache,
                                            in_place=True)  # the room generate gives, positions after the doc
                            cache = asked.cache
                            logits = prefill(self.model, asked.ids, asked.positions, cache)
                            start = start + question.shape[1]
                        answers = greedy(self.model, cache, logits, start, ANSWER_TOKENS)
                    texts = [self.model.require_tokenizer().decode(a.tolist()) for a in answers]
                    for i, x, text in zip(index, batch, texts):
                        got = first_number(text)
                        self.records.append(Record(
                            f"needle-{layout}", case.label, case.budget, i,
                            {"exact": float(got[:T.CODE_DIGITS] == x.answer), "partial": leading_match(got, x.answer)},
                            {"kind": x.kind, "length": x.length, "depth": x.depth, "answer": x.answer,
                             "output": text},
                        ))
                    self.done(bar, f"{layout} {case.label}")



def run_longbench(runner: Runner, examples: dict[str, list[Any]], max_prompt: int) -> list[Record]:
    """Greedy answers of every case for LongBench examples, scored with each task's metric."""
    from kvzoo.eval import longbench
    from kvzoo.generate import default_eos_ids

    model = runner.model
    tok = model.require_tokenizer()
    eos = set(default_eos_ids(model))
    total = sum(math.ceil(len(x) / runner.config.batch_size) for x in examples.values()) * len(runner.cases)
    bar = ProgressBar(total, "eval longbench", enabled=runner.progress)
    try:
        for task, items in examples.items():
            new_tokens = longbench.TASKS[task][1]
            for first, batch in runner.batches(items):
                prompts = [longbench.truncate_middle(tok.encode(x.prompt), max_prompt - new_tokens) for x in batch]
                start = torch.tensor([len(p) for p in prompts])
                for case, cache, logits in runner.prefilled(prompts, new_tokens):
                    with torch.inference_mode():
                        answers = greedy(model, cache, logits, start, new_tokens).tolist()
                    texts = [tok.decode(_until_eos(a, eos)) for a in answers]
                    scores = [longbench.score_prediction(x, t) for x, t in zip(batch, texts)]
                    runner.add(f"longbench-{task}", case, first, {"score": scores})
                    runner.done(bar, f"{task} {case.label}")
    finally:
        bar.close()
    return runner.records


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens
