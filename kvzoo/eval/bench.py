"""`kvzoo bench`: prefill time, decode ms/token, KV-cache bytes, peak RSS and compile time per method and
context length; `--against hf` times transformers (DynamicCache and StaticCache) on the same weights and
prompt in the same process.

Decode time is the median over `steps` single-token steps after `warmup` steps (each step timed alone).
Peak RSS is sampled every few milliseconds by a thread while a row runs, so it is this row's peak of the
whole process (weights included), not a difference.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvzoo.cli import HelpFormatter
from kvzoo.errors import KvzooError
from kvzoo.eval import report

DEFAULT_CONTEXTS = (512, 2048, 8192)
DEFAULT_BENCH_METHODS = ("full", "zsmerge:budget=0.05", "zsmerge:budget=0.2", "h2o:budget=0.05", "h2o:budget=0.2",
                         "streamingllm:budget=0.05", "streamingllm:budget=0.2", "snapkv:budget=0.05",
                         "snapkv:budget=0.2")


@dataclass
class BenchRow:
    engine: str  # "kvzoo" | "hf-dynamic" | "hf-static"
    method: str
    context: int
    batch: int
    dtype: str
    compiled: bool
    prefill_s: float
    decode_ms: float  # median per step (the whole batch)
    kv_bytes: int
    peak_rss_mib: float
    compile_s: float | None


class RssPeak:
    """Highest resident set size of this process while the `with` block runs (sampled every 5 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize()
        except OSError:  # not Linux: fall back to the lifetime peak
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> "RssPeak":
        gc.collect()
        self.peak = self.current()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def _timed_steps(run_step, warmup: int, steps: int) -> tuple[float, float | None]:  # noqa: ANN001
    """(median ms of `steps` timed steps, seconds of the first step) after `warmup` untimed ones."""
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        run_step(i)
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for i in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        run_step(i)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times), first


def kvzoo_stepper(model: Any, spec: str, prompts: list[list[int]], steps: int, compile: bool) -> tuple[Any, Any]:
    """(step(i): decode step i after the prompts, the cache) with room for `steps` steps."""
    from kvzoo.cache.registry import parse_compression
    from kvzoo.generate import make_decode_step
    from kvzoo.likelihood import prefill_cache

    cache, logits = prefill_cache(model, prompts, parse_compression(spec), steps)
    step = make_decode_step(model, compile)
    token = logits.argmax(-1)[:, None]
    start = torch.tensor([len(p) for p in prompts])[:, None]
    return (lambda i: step(token, start + i, cache)), cache


def bench_kvzoo(model: Any, spec: str, prompts: list[list[int]], warmup: int, steps: int, compile: bool) -> BenchRow:
    with torch.inference_mode(), RssPeak() as rss:
        t0 = time.perf_counter()
        run_step, cache = kvzoo_stepper(model, spec, prompts, warmup + steps, compile)
        prefill_s = time.perf_counter() - t0
        decode_ms, first = _timed_steps(run_step, warmup, steps)
    # Compile time: the first call compiles; a plain step costs decode_ms, so the rest is compilation.
    compile_s = max(first - decode_ms / 1000, 0.0) if compile and first is not None else None
    return BenchRow("kvzoo", spec, len(prompts[0]), len(prompts), _dtype_name(model), compile, prefill_s,
                    decode_ms, cache.nbytes(), rss.peak / 2**20, compile_s)


def hf_stepper(hf: Any, kind: str, prompts: list[list[int]], steps: int) -> tuple[Any, Any]:
    """(step(i): transformers' decode step i after the prompts, its DynamicCache or StaticCache)."""
    from transformers import DynamicCache, StaticCache

    ids = torch.tensor(prompts)
    t = ids.shape[1]
    if kind == "static":
        cache = StaticCache(config=hf.config, max_cache_len=t + steps)
    else:
        cache = DynamicCache(config=hf.config)
    out = hf(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(t))
    token = out.logits[:, -1:].argmax(-1)
    return (lambda i: hf(token, past_key_values=cache, use_cache=True, cache_position=torch.tensor([t + i]))), cache


def bench_hf(hf: Any, kind: str, prompts: list[list[int]], warmup: int, steps: int) -> BenchRow:
    """transformers with a DynamicCache or a StaticCache: the same prompt, the same number of steps."""
    with torch.inference_mode(), RssPeak() as rss:
        t0 = time.perf_counter()
        run_step, cache = hf_stepper(hf, kind, prompts, warmup + steps)
        prefill_s = time.perf_counter() - t0
        decode_ms, _ = _timed_steps(run_step, warmup, steps)
    kv = sum(x.numel() * x.element_size() for layer in cache.layers for x in (layer.keys, layer.values)
             if x is not None)
    b, t = len(prompts), len(prompts[0])
    return BenchRow(f"hf-{kind}", "full", t, b, str(hf.dtype).removeprefix("torch."), False, prefill_s, decode_ms,
                    kv, rss.peak / 2**20, None)


def _dtype_name(model: Any) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def random_prompts(vocab: int, context: int, batch: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Ids from the low end of the vocabulary: ordinary tokens, never the special ones at the top.
    return [torch.randint(3, min(vocab, 32000), (context,), generator=g).tolist() for _ in range(batch)]


def table(rows: list[BenchRow]) -> str:
    """Markdown: one row per measurement, with the kvzoo / transformers decode ratios."""
    hf = {(r.context, r.engine): r.decode_ms for r in rows if r.engine.startswith("hf-")}
    head = "| engine | method | context | prefill s | decode ms/token | vs hf dynamic | vs hf static | KV MiB | peak RSS MiB | compile s |"
    out = [head, "|---" * 10 + "|"]
    for r in rows:
        ratio = [f"{hf[(r.context, k)] / r.decode_ms:.2f}x" if (r.context, k) in hf else "" for k in ("hf-dynamic", "hf-static")]
        comp = f"{r.compile_s:.1f}" if r.compile_s is not None else ""
        out.append(f"| {r.engine}{' compiled' if r.compiled else ''} | {r.method} | {r.context} | {r.prefill_s:.2f} | "
                   f"{r.decode_ms:.1f} | {ratio[0]} | {ratio[1]} | {r.kv_bytes / 2**20:.1f} | {r.peak_rss_mib:.0f} | {comp} |")
    return "\n".join(out) + "\n\nvs hf: transformers' decode time / this row's (above 1 = kvzoo faster).\n"


def add_bench_parser(sub: argparse._SubParsersAction, add_model_args) -> None:  # noqa: ANN001
    summary = "prefill / decode speed, KV bytes and peak RSS per method and context"
    p = sub.add_parser("bench", help=summary, formatter_class=HelpFormatter,
                       description=f"{summary}; --against hf also times transformers on the same weights and prompts")
    add_model_args(p)
    p.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)), help="prompt lengths (tokens)")
    p.add_argument("--methods", default=";".join(DEFAULT_BENCH_METHODS),
                   help="';'-separated method specs (a spec itself uses commas)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="also time the torch.compile'd decode step (default: eager only)")
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps (median reported; >= 16)")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps first")
    p.add_argument("--against", choices=("hf",), default=None,
                   help="also time transformers (DynamicCache, StaticCache) in this process (default: kvzoo only)")
    p.add_argument("--out", default="bench-results", help="directory for results.json / results.md")
    p.set_defaults(func=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> None:
    from kvzoo.cache.registry import parse_compression
    from kvzoo.cli import load_model_for_args

    try:
        contexts = [int(x) for x in args.contexts.split(",") if x.strip()]
    except ValueError:
        raise KvzooError(f"--contexts {args.contexts!r}: expected comma-separated integers") from None
    specs = [s.strip() for s in args.methods.split(";") if s.strip()]
    for spec in specs:
        parse_compression(spec)  # fail before loading the model
    if args.steps < 16 or args.warmup < 1 or args.batch < 1 or any(c < 2 for c in contexts):
        raise KvzooError("need --steps >= 16, --warmup >= 1, --batch >= 1 and contexts >= 2 tokens")
    out = report.prepare_out_dir(args.out)
    model = load_model_for_args(args)
    hf = _load_hf(args, model) if args.against == "hf" else None
    rows: list[BenchRow] = []
    prov = report.provenance(next(model.parameters()).dtype)  # taken at the start, with the code that runs
    interrupted = False
    try:
        with report.sigterm_interrupts():
            for context in contexts:
                prompts = random_prompts(model.config.vocab_size, context, args.batch)
                if hf is not None:
                    for kind in ("dynamic", "static"):
                        rows.append(bench_hf(hf, kind, prompts, args.warmup, args.steps))
                        _progress(rows[-1])
                for spec in specs:
                    for compiled in (False, True) if args.compile else (False,):
                        rows.append(bench_kvzoo(model, spec, prompts, args.warmup, args.steps, compiled))
                        _progress(rows[-1])
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing what finished", file=sys.stderr)
    report.write_json(out, {"kind": "bench", "provenance": prov, "interrupted": interrupted,
                            "rows": [asdict(r) for r in rows]})
    text = table(rows)
    report.write_markdown(out, "kvzoo bench", prov, text)
    print(text)
    print(f"wrote {Path(out) / 'results.json'}", file=sys.stderr)
    if interrupted:
        raise KeyboardInterrupt


def _progress(row: BenchRow) -> None:
    print(f"  {row.engine:10s} {row.method:28s} {row.context:6d}  prefill {row.prefill_s:6.2f} s  "
          f"decode {row.decode_ms:7.1f} ms/token{'  (compiled)' if row.compiled else ''}", file=sys.stderr)


def _load_hf(args: argparse.Namespace, model: Any) -> Any:
    """transformers' model on the same checkpoint directory and dtype (a bench extra, never a runtime need)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise KvzooError("--against hf needs transformers: pip install 'kvzoo[bench]'") from None
    path = getattr(model, "source_path", None) or args.model
    if path is None:
        from kvzoo.default_model import ensure_default_model

        path = ensure_default_model(progress=False)
    dtype = next(model.parameters()).dtype
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
