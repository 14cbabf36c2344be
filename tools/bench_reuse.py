"""Benchmark: what keeping a compressed cache buys, on the default SmolLM2-135M-Instruct model.

1. Time to first token for a question over a long document (default 8k tokens): from a compressed cache
   stored on disk (load + feed the question + first token) vs prefilling document + question again.
   Medians over --repeats, both measured in the same process.
2. Peak RSS of a long conversation (default 200 turns) kept in one cache, ZSMerge vs the full cache; each
   configuration runs in its own process so its peak RSS (`ru_maxrss`) is its own.

    python tools/bench_reuse.py                                              # the README numbers
    python tools/bench_reuse.py --doc-tokens 300 --turns 5 --repeats 1       # a smoke test

Prints markdown tables (paste them into the README's "Compress once, ask many" section).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "According to the text above, what is the password of the Harbour Archive? Answer with the value only."


def _model(dtype: str):  # noqa: ANN202
    import kvzoo
    from kvzoo.default_model import ensure_default_model

    return kvzoo.load(ensure_default_model(progress=False), dtype=dtype)


def bench_ttft(doc_tokens: int, specs: list[str], repeats: int, dtype: str) -> None:
    import kvzoo
    from kvzoo.cache.registry import parse_compression
    from kvzoo.conversation import DocumentPrompt
    from kvzoo.demo import build_document
    from kvzoo.generate import generate_ids, store_document

    model = _model(dtype)
    tok = model.require_tokenizer()
    doc = build_document(doc_tokens, lambda t: len(tok.encode(t, add_special_tokens=False)), 1)
    prompt = DocumentPrompt.render(tok, doc)
    doc_ids = tok.encode(prompt.prefix, add_special_tokens=False)
    question = tok.encode(prompt.question(QUESTION), add_special_tokens=False)
    print(f"\n### Time to first token, {len(doc_ids)}-token document + {len(question)}-token question "
          f"({dtype}, median of {repeats})\n")
    print("| method | KV cache MiB | file MiB | prefill once s | from stored cache s (load + first token) "
          "| re-prefill s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="kvzoo-bench-") as tmp:
        for i, spec in enumerate(specs):
            method = parse_compression(spec)
            path = Path(tmp) / f"{i}.kvc"
            prefill_s, nbytes = store_document(model, doc_ids, path, method)
            stored_s, again_s = [], []
            for _ in range(repeats):
                started = time.perf_counter()
                stored = kvzoo.load_cache(path, model)
                load_s = time.perf_counter() - started
                out = generate_ids(model, question, max_new_tokens=1, cache=stored)
                stored_s.append(load_s + out.first_token_seconds)
                again_s.append(generate_ids(model, doc_ids + question, max_new_tokens=1,
                                            compression=method).first_token_seconds)
            s, a = statistics.median(stored_s), statistics.median(again_s)
            print(f"| {spec} | {nbytes / 2**20:.2f} | {path.stat().st_size / 2**20:.2f} | {prefill_s:.2f} "
                  f"| {s:.3f} | {a:.2f} | {a / s:.0f}x |", flush=True)


def conversation_child(spec: str, turns: int, max_new_tokens: int, dtype: str) -> dict:
    """Runs in the child process: one conversation of `turns` short turns."""
    from kvzoo.cache.registry import parse_compression
    from kvzoo.eval.bench import RssPeak

    model = _model(dtype)
    model_rss = RssPeak.current() / 2**20
    conv = model.conversation(system="Reply briefly.", compression=parse_compression(spec),
                              max_new_tokens=max_new_tokens)
    started = time.perf_counter()
    with RssPeak() as rss:  # sampled while the conversation runs: loading the model peaks higher
        for i in range(turns):
            conv.say(f"Tell me one fact about the number {i}.")
    assert conv.cache is not None
    return {
        "peak_rss_mib": rss.peak / 2**20,
        "model_rss_mib": model_rss,
        "cache_mib": conv.cache.nbytes() / 2**20,
        "tokens": conv.cache.lengths[0],
        "seconds_per_turn": (time.perf_counter() - started) / turns,
    }


def bench_conversation(specs: list[str], turns: int, max_new_tokens: int, dtype: str) -> None:
    print(f"\n### A {turns}-turn conversation in one cache ({dtype}, replies of at most {max_new_tokens} tokens, "
          "one process each)\n")
    print("| method | tokens seen | cache MiB at the end | peak RSS during the conversation MiB | RSS after loading the model MiB "
          "| s per turn |")
    print("|---|---|---|---|---|---|")
    for spec in specs:
        cmd = [sys.executable, __file__, "--child", spec, str(turns), str(max_new_tokens), "--dtype", dtype]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"| {spec} | failed: {proc.stderr.strip().splitlines()[-1:]} |||||", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {spec} | {r['tokens']} | {r['cache_mib']:.2f} | {r['peak_rss_mib']:.0f} | {r['model_rss_mib']:.0f} "
              f"| {r['seconds_per_turn']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc-tokens", type=int, default=8000)
    parser.add_argument("--methods", nargs="+", default=["full", "zsmerge:budget=0.05", "snapkv:budget=0.05"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--reply-tokens", type=int, default=8)
    parser.add_argument("--chat-methods", nargs="+", default=["full", "zsmerge:budget=512"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip", choices=("ttft", "conversation"), default=None)
    parser.add_argument("--child", nargs=3, metavar=("SPEC", "TURNS", "REPLY_TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec, turns, reply = args.child
        print(json.dumps(conversation_child(spec, int(turns), int(reply), args.dtype)))
        return
    if args.skip != "ttft":
        bench_ttft(args.doc_tokens, args.methods, args.repeats, args.dtype)
    if args.skip != "conversation":
        bench_conversation(args.chat_methods, args.turns, args.reply_tokens, args.dtype)


if __name__ == "__main__":
    main()
