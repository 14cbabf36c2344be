"""Benchmark: peak process RSS and KV-cache bytes vs prompt length, full cache vs ZSMerge (with and without
chunked prefill), on the default SmolLM2-135M-Instruct model.

Each (method, prompt length) runs in a fresh subprocess so its peak RSS (`ru_maxrss`) is its own. A run
prefills a synthetic prompt, then decodes a few tokens. Prompts longer than the model's 8k context are
fed anyway (positions past training only affect quality, not memory or speed).

    python tools/bench_memory.py                       # 1k .. 32k
    python tools/bench_memory.py --lengths 1024 2048   # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = {
    "full": ("full", None),
    "zsmerge-0.05": ("zsmerge:budget=0.05", None),  # holds the prompt until its layers share the budget by need
    "zsmerge-0.05-uniform": ("zsmerge:budget=0.05,layer_budgets=uniform", None),  # compresses layer by layer
    "zsmerge-0.05+chunk512": ("zsmerge:budget=0.05", 512),
}


def run_one(spec: str, prompt_len: int, chunk: int | None, decode_steps: int, dtype: str) -> dict:
    """Runs in the child process."""
    import torch

    import kvzoo
    from kvzoo.cache.registry import parse_compression
    from kvzoo.default_model import ensure_default_model

    torch.manual_seed(0)
    model = kvzoo.load(ensure_default_model(progress=False), dtype=dtype)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    method = parse_compression(spec)
    if chunk is not None:  # as generate compresses a prompt fed in chunks (ZSMerge: uniform layer budgets)
        method = method.for_chunked_prefill()
    ids = torch.randint(100, model.config.vocab_size, (1, prompt_len))
    positions = torch.arange(prompt_len)[None]
    t0 = time.perf_counter()
    with torch.inference_mode():
        cache = method.make_cache(model.config, [prompt_len], decode_steps, model.model.embed_tokens.weight.dtype,
                                  "cpu")
        step = chunk or prompt_len
        for start in range(0, prompt_len, step):
            logits = model(ids[:, start:start + step], positions[:, start:start + step], cache=cache,
                           last_only=True)
        method.end_prefill(cache)
        prefill_s = time.perf_counter() - t0
        token = logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for i in range(decode_steps):
            logits = model(token, torch.tensor([[prompt_len + i]]), cache=cache, decode=True)
            token = logits[:, -1].argmax(-1, keepdim=True)
        decode_ms = (time.perf_counter() - t1) / max(decode_steps, 1) * 1000
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "model_rss_mib": base_rss / 2**20,
        "cache_mib": cache.nbytes() / 2**20,
        "prefill_s": prefill_s,
        "decode_ms": decode_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--child", nargs=3, metavar=("SPEC", "LEN", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec, length, chunk = args.child
        result = run_one(spec, int(length), int(chunk) or None, args.decode_steps, args.dtype)
        print(json.dumps(result))
        return
    header = f"{'method':<24}{'prompt':>8}{'peak RSS MiB':>14}{'cache MiB':>11}{'prefill s':>11}{'decode ms/tok':>15}"
    print(header)
    print("-" * len(header))
    for name in args.configs:
        spec, chunk = CONFIGS[name]
        for length in args.lengths:
            cmd = [sys.executable, __file__, "--decode-steps", str(args.decode_steps), "--dtype", args.dtype,
                   "--child", spec, str(length), str(chunk or 0)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name:<24}{length:>8}  failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{name:<24}{length:>8}{r['peak_rss_mib']:>14.0f}{r['cache_mib']:>11.2f}"
                  f"{r['prefill_s']:>11.1f}{r['decode_ms']:>15.1f}", flush=True)


if __name__ == "__main__":
    main()
