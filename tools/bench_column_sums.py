"""Accumulated attention of one layer's prompt (what H2O and KVMerger rank tokens by): the fused CPU path
against the block reference, in one process, at the default model's head layout (9 query heads, 3 KV heads,
head dim 64), fp32, random q/k. Prints the median of `--repeats` runs per length and the largest relative
difference. Multiply by the layer count (30) for a prefill's cost. Run it alone on a quiet machine.

    python tools/bench_column_sums.py [--lengths 2048,8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvzoo_kernels.column_sums_cpu import causal_column_sums
from kvzoo_kernels.window_scores import weighted_column_sums_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads; seconds per layer, median of {args.repeats}")
    print(f"{'tokens':>7} {'reference':>10} {'fused':>8} {'speed-up':>9} {'max rel diff':>13}")
    for t in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator().manual_seed(t)
        q, k = torch.randn(1, 9, t, 64, generator=g), torch.randn(1, 3, t, 64, generator=g)
        q_pos = torch.arange(t)[None]
        key_pos, bias, weights = q_pos[:, None].expand(1, 3, t).contiguous(), torch.zeros(1, 3, t), torch.ones(1, t)
        runs: dict[str, list[float]] = {"reference": [], "fused": []}
        for _ in range(args.repeats):  # alternate, so that a slower phase of the machine hits both
            start = time.perf_counter()
            ref = weighted_column_sums_reference(q, k, q_pos, key_pos, bias, None, weights)
            runs["reference"].append(time.perf_counter() - start)
            start = time.perf_counter()
            fused = causal_column_sums(q, k, weights)
            runs["fused"].append(time.perf_counter() - start)
        r, f = statistics.median(runs["reference"]), statistics.median(runs["fused"])
        diff = float(((fused - ref).abs() / ref.abs().clamp(min=1e-6)).max())
        print(f"{t:>7} {r:>10.3f} {f:>8.3f} {r / f:>8.1f}x {diff:>13.1e}")


if __name__ == "__main__":
    main()
