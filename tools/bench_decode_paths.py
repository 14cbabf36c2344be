"""A/B of the two decode attention paths in one process: the fused output-only path (methods that never read
the attention probabilities: full cache, StreamingLLM, prefill-only methods) against the path that also
returns the probabilities (what H2O, TOVA and ZSMerge need), on the default model's full cache.

    python tools/bench_decode_paths.py [--contexts 512,2048,8192] [--steps 24] [--dtype fp32] [--compile]

The cache is filled with random keys and values (a decode step's cost does not depend on what the slots
hold), so no prefill is timed. Rows alternate between the paths, step by step, so that a slower phase of a
shared machine hits both; medians are printed. Run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvzoo import load
from kvzoo.cache.full import FullCache
from kvzoo.default_model import ensure_default_model
from kvzoo.generate import make_decode_step, new_cache, prepare_decode
from kvzoo.loading import parse_dtype


def filled_full_cache(model, context: int, steps: int):  # noqa: ANN001, ANN201
    cache = new_cache(model, [context], steps + 1, FullCache())
    for layer in cache.layers:
        layer.k[:, :, :context].normal_()
        layer.v[:, :, :context].normal_()
        layer.logw[:, :, :context] = 0.0
        layer.pos[:, :, :context] = torch.arange(context)
    cache.tokens_seen, cache.lengths, cache.max_position = context, [context], context + steps + 1
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="512,2048,8192")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    model = load(ensure_default_model(progress=True), dtype=parse_dtype(args.dtype))
    print(f"default model, {args.dtype}, {'compiled' if args.compile else 'eager'}, {torch.get_num_threads()} threads; "
          "decode ms/token, median")
    print(f"{'context':>8} {'with probs':>11} {'output only':>12} {'ratio':>6}")
    for context in (int(c) for c in args.contexts.split(",")):
        caches = {reads: filled_full_cache(model, context, args.warmup + args.steps) for reads in (True, False)}
        step = make_decode_step(model, args.compile)
        for cache in caches.values():
            prepare_decode(model, cache, cache.max_position, args.compile)
        times: dict[bool, list[float]] = {True: [], False: []}
        token = torch.tensor([[42]])
        try:
            with torch.inference_mode():
                for i in range(args.warmup + args.steps):
                    for reads, cache in caches.items():
                        FullCache.reads_decode_probs = reads  # the class attribute the attention step reads
                        start = time.perf_counter()
                        step(token, torch.tensor([[context + i]]), cache)
                        if i >= args.warmup:
                            times[reads].append(time.perf_counter() - start)
        finally:
            FullCache.reads_decode_probs = False
        with_probs, output_only = (statistics.median(times[r]) * 1e3 for r in (True, False))
        print(f"{context:>8} {with_probs:>11.1f} {output_only:>12.1f} {output_only / with_probs:>6.2f}")


if __name__ == "__main__":
    main()
