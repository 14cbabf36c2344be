"""A/B of decode attention paths in one process, on the default model's full cache:

- `--compare probs` (default): the fused output-only path (methods that never read the attention
  probabilities: full cache, StreamingLLM, prefill-only methods) against the path that also returns the
  probabilities (what H2O, TOVA and ZSMerge need);
- `--compare split`: the output-only path that folds the new token in (StreamingLLM's) with the store rows
  cut into pieces for both threads (flash-decoding, kvzoo_kernels/decode_output.py) against the same kernel
  over whole rows;
- `--compare write-first`: the full cache writing the new token first and attending over the store alone,
  whole rows (`CompressionMethod.decode_writes_first`, what it does by default) against attending over the
  store, split for the threads, and folding the new token in by logsumexp before writing it (what
  StreamingLLM has to do).

    python tools/bench_decode_paths.py [--compare probs|split|write-first] [--contexts 512,2048,8192] [--steps 24]
                                       [--dtype fp32] [--compile]

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
from kvzoo_kernels import decode_output


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
    parser.add_argument("--compare", choices=("probs", "split", "write-first"), default="probs")
    args = parser.parse_args()
    # Each arm: (label, FullCache.reads_decode_probs, FullCache.decode_writes_first, the decode_output
    # minimum piece length). Writing first needs an output-only method, so the probs arms attend first.
    split_slots = decode_output.MIN_SPLIT_SLOTS
    arms = [("with probs", True, False, split_slots), ("output only", False, False, split_slots)]
    if args.compare == "split":
        arms = [("whole rows", False, False, 2**62), ("split rows", False, False, split_slots)]
    elif args.compare == "write-first":
        arms = [("fold new", False, False, split_slots), ("write first", False, True, split_slots)]
    model = load(ensure_default_model(progress=True), dtype=parse_dtype(args.dtype))
    print(f"default model, {args.dtype}, {'compiled' if args.compile else 'eager'}, {torch.get_num_threads()} threads; "
          "decode ms/token, median")
    print(f"{'context':>8} {arms[0][0]:>12} {arms[1][0]:>12} {'ratio':>6}")
    for context in (int(c) for c in args.contexts.split(",")):
        caches = [filled_full_cache(model, context, args.warmup + args.steps) for _ in arms]
        step = make_decode_step(model, args.compile)
        for cache in caches:
            prepare_decode(model, cache, cache.max_position, args.compile)
        times: list[list[float]] = [[] for _ in arms]
        token = torch.tensor([[42]])
        try:
            with torch.inference_mode():
                for i in range(args.warmup + args.steps):
                    for arm, ((_, reads, first, min_split), cache) in enumerate(zip(arms, caches)):
                        FullCache.reads_decode_probs = reads  # class attributes the attention step reads
                        FullCache.decode_writes_first = first
                        decode_output.MIN_SPLIT_SLOTS = min_split  # read by the op at run time
                        start = time.perf_counter()
                        step(token, torch.tensor([[context + i]]), cache)
                        if i >= args.warmup:
                            times[arm].append(time.perf_counter() - start)
        finally:
            FullCache.reads_decode_probs, FullCache.decode_writes_first = False, True
            decode_output.MIN_SPLIT_SLOTS = split_slots
        a, b = (statistics.median(t) * 1e3 for t in times)
        print(f"{context:>8} {a:>12.1f} {b:>12.1f} {b / a:>6.2f}")


if __name__ == "__main__":
    main()
