"""kvzoo's decode step against transformers' static cache, interleaved step by step in one process.

`kvzoo bench --against hf` times each row after the other, so on a machine whose speed drifts within
minutes (a shared one) a row and its reference may be timed at different speeds. Here every arm takes one
decode step in turn, so a slow minute hits all of them; medians and ratios to transformers are printed.

    python tools/bench_interleaved.py [--contexts 512,2048,8192] [--methods "full;zsmerge:budget=0.05"]
                                      [--dtype fp32] [--steps 32] [--per-layer]

Arms: transformers (StaticCache) and, for every method, kvzoo eager and compiled, each on its own cache
prefilled with the same random prompt; with `--per-layer` also eager with each layer's decode update run
after its own attention (the cache's stack dropped: what eager decode did before the layers were batched,
see `KVCache.stacked_groups`). Run it alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvzoo import load
from kvzoo.default_model import ensure_default_model
from kvzoo.eval.bench import _load_hf, hf_stepper, kvzoo_stepper, random_prompts
from kvzoo.loading import parse_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="512,2048,8192")
    parser.add_argument("--methods", default="full;zsmerge:budget=0.05", help="';'-separated method specs")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--per-layer", action="store_true", help="also time eager decode without the stack")
    args = parser.parse_args()
    specs = [s.strip() for s in args.methods.split(";") if s.strip()]
    model = load(ensure_default_model(progress=True), dtype=parse_dtype(args.dtype))
    hf = _load_hf(argparse.Namespace(model=None), model)
    print(f"default model, {args.dtype}, {torch.get_num_threads()} threads, transformers StaticCache as reference; "
          "decode ms/token, median of steps taken in turn (ratio = transformers / kvzoo: above 1, kvzoo faster)")
    for context in (int(c) for c in args.contexts.split(",")):
        prompts = random_prompts(model.config.vocab_size, context, 1)
        total = args.warmup + args.steps
        with torch.inference_mode():
            arms = {"transformers": hf_stepper(hf, "static", prompts, total)[0]}
            for spec in specs:
                arms[f"{spec} eager"] = kvzoo_stepper(model, spec, prompts, total, False)[0]
                arms[f"{spec} compiled"] = kvzoo_stepper(model, spec, prompts, total, True)[0]
                if args.per_layer:
                    step, cache = kvzoo_stepper(model, spec, prompts, total, False)
                    cache.stacks = []  # every layer updates its own store, after its own attention
                    arms[f"{spec} eager per layer"] = step
            times: dict[str, list[float]] = {name: [] for name in arms}
            for i in range(total):
                for name, step in arms.items():
                    start = time.perf_counter()
                    step(i)
                    if i >= args.warmup:
                        times[name].append(time.perf_counter() - start)
        reference = statistics.median(times["transformers"])
        for name, ts in times.items():
            median = statistics.median(ts)
            print(f"{context:>6}  {name:36s} {median * 1e3:7.1f}  {reference / median:5.2f}x")


if __name__ == "__main__":
    main()
