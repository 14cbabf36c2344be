"""Why a method misses a needle: which of the answer's tokens each layer keeps, and what fills the context.

`kvzoo eval --tasks needle` says whether the answer came out; this shows where it was lost. It rebuilds one
needle instance of the eval (same seed and instance index as in results.json), compresses the query-aware
prompt (question included) with a method, and prints, per layer and KV head, which occurrences of the
answer's tokens are still in the cache (X kept, . not), after prefill and after each greedy answer token,
then the greedy answer.

    python tools/needle_trace.py --seed 3 --instance 5 --method "zsmerge:budget=0.05" [--layers 5,10,20]
                                 [--steps 6] [--agnostic]

`--agnostic` traces the query-agnostic layout instead, as `kvzoo eval` runs it: the haystack alone is compressed
as a stored document (`for_stored_document`), then the question is fed as `generate(question, cache=...)` feeds
it (one later prompt chunk), and the map is printed after it too.

`--layers` also lists, for those layers, the prompt positions each KV head holds outside the last 30
tokens (the context region of most methods), e.g. the attention sinks that fill it at small budgets.

`--reads N` first lists the N KV heads through which the *full* cache reads the answer: one exact forward
over haystack, question and answer, where each query that writes an answer token (the question's last
token, then the answer's tokens but the last) gives the needle's copy of the token it writes a share of its
attention (the largest of the KV head's query heads, averaged over the answer's tokens). A method can only
answer if it keeps the answer in such heads; the map shows whether it does.

`--write lead-in|code|both [--write-layers 15-29]` tests what a miss lacks: after the prefill it writes the
asked needle's lead-in (its tokens before the code), its code (and the token after it) or both, from the full
cache's keys and values, into those layers' compressed cache (every head; over the lowest-scored slots that hold
one token, outside the first `compactor.SINKS` and the last 40 positions), then asks as usual.
"""

from __future__ import annotations

import argparse

import torch

from kvzoo import load
from kvzoo.cache.chunk import PrefillChunk
from kvzoo.cache.compactor import SINKS
from kvzoo.cache.full import FullCache
from kvzoo.cache.observe import PrefillObserver, observe_prefill
from kvzoo.cache.registry import parse_compression
from kvzoo.cache.slots import KVCache, LayerSlots
from kvzoo.default_model import ensure_default_model
from kvzoo.eval.fanout import fanout_prefill
from kvzoo.eval.runner import EvalConfig, Runner
from kvzoo.eval.tasks import NEEDLE_PLACEMENTS, NeedleInstance
from kvzoo.eval.texts import read_source
from kvzoo.generate import make_decode_step, prefill, prepare
from kvzoo.models.base import CausalLM
from kvzoo_kernels.attention import attention_probs


def answer_positions(instance: NeedleInstance, code_tokens: list[int]) -> list[int]:
    """Haystack positions, from the asked needle on, holding one of the answer's tokens."""
    prompt = instance.prompt
    return [p for p in range(instance.needle_start, len(instance.haystack)) if prompt[p] in code_tokens]


def answer_run(instance: NeedleInstance, code_tokens: list[int]) -> list[int]:
    """Haystack positions of the asked needle's first whole copy of the answer's tokens."""
    prompt, n = instance.haystack, len(code_tokens)
    for p in range(instance.needle_start, len(prompt) - n + 1):
        if prompt[p:p + n] == code_tokens:
            return list(range(p, p + n))
    raise SystemExit(f"the answer's tokens {code_tokens} do not occur whole after the needle's start")


def read_shares(probs: torch.Tensor, run: list[int], num_kv_heads: int) -> torch.Tensor:
    """[Hkv] how much each KV head reads the answer: probs [Hq, n, S] is the attention of the n queries that
    write the answer's n tokens, query i writing the token at run[i]; the largest share of a KV head's query
    heads, averaged over the answer's tokens."""
    hq, n, _ = probs.shape
    read = probs[:, torch.arange(n), torch.tensor(run)]  # [Hq, n]
    return read.reshape(num_kv_heads, hq // num_kv_heads, n).amax(dim=1).mean(dim=-1)


class _AnswerReads(PrefillObserver):
    """Each layer's `read_shares` for a one-shot prefill of [haystack ; question ; answer tokens]."""

    def __init__(self, run: list[int]) -> None:
        self.run, self.shares = run, []

    def compress_prefill(self, layer_idx: int, slots: LayerSlots, chunk: PrefillChunk) -> None:
        n = len(self.run)
        writers = slice(-n - 1, -1)  # the question's last token, then the answer's tokens but the last
        probs = attention_probs(chunk.q[:, :, writers], chunk.keys, chunk.q_pos[:, writers], chunk.key_pos,
                                chunk.key_bias, chunk.window)  # [1, Hq, n, S]
        self.shares.append(read_shares(probs[0], self.run, chunk.keys.shape[1]))


@torch.inference_mode()
def reading_heads(model: CausalLM, instance: NeedleInstance, code_tokens: list[int]) -> torch.Tensor:
    """[L, Hkv] `read_shares` of every layer, from the full cache's exact forward."""
    reads = _AnswerReads(answer_run(instance, code_tokens))
    ids = instance.haystack + instance.question + code_tokens
    observe_prefill(model, torch.tensor([ids]), torch.arange(len(ids))[None], reads)
    return torch.stack(reads.shares)


def kept_map(cache: KVCache, positions: list[int]) -> str:
    """'layer:head0/head1/...' with X where the cache holds the position's token (exactly or as a merged
    slot's representative), per layer."""
    rows = []
    for layer, slots in enumerate(cache.layers):
        pos = slots.pos[0]  # [Hkv, C]
        heads = ["".join("X" if bool((pos[h] == p).any()) else "." for p in positions) for h in range(pos.shape[0])]
        rows.append(f"{layer}:" + "/".join(heads))
    return " ".join(rows)


def write_positions(cache: KVCache, full: KVCache, positions: list[int], layers: range, protect_last: int) -> None:
    """Write `positions`' keys and values from the full cache `full` into `layers` of `cache` (sequence 0, every
    KV head), each over the lowest-scored slot that holds one token (log w = 0) at a position from SINKS to
    prompt length - `protect_last` and not itself one of `positions` (a head keeps those it holds)."""
    for layer in layers:
        slots, source = cache.layers[layer], full.layers[layer]
        prompt_len = int(source.pos[0].max()) + 1
        for head in range(slots.pos.shape[1]):
            pos = slots.pos[0, head]
            held = set(pos.tolist())  # one host read per head
            missing = [p for p in positions if p not in held]
            eligible = (pos >= SINKS) & (pos < prompt_len - protect_last) & (slots.logw[0, head] == 0)
            eligible &= ~torch.isin(pos, torch.tensor(positions, device=pos.device))  # never over a written one
            lowest = slots.score[0, head].masked_fill(~eligible, float("inf")).argsort()[:len(missing)]
            for slot, p in zip(lowest.tolist(), missing):
                if not bool(eligible[slot]):
                    raise SystemExit(f"layer {layer} head {head}: no slot left to write position {p} into")
                at = int((source.pos[0, head] == p).nonzero()[0])
                slots.k[0, head, slot], slots.v[0, head, slot] = source.k[0, head, at], source.v[0, head, at]
                slots.pos[0, head, slot], slots.logw[0, head, slot] = p, 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="the eval's --seed")
    parser.add_argument("--instance", type=int, required=True, help="the needle's index in the eval's results")
    parser.add_argument("--method", required=True, help="a compression spec, e.g. 'zsmerge:budget=0.05'")
    parser.add_argument("--lengths", default="1024,2048", help="the eval's --needle-lengths")
    parser.add_argument("--source", default=None, help="the eval's --source (default: its built-in text)")
    parser.add_argument("--placement", choices=NEEDLE_PLACEMENTS, default="token",
                        help="the eval's --needle-placement")
    parser.add_argument("--layers", default="", help="layers whose context positions are listed")
    parser.add_argument("--steps", type=int, default=6, help="greedy answer tokens")
    parser.add_argument("--agnostic", action="store_true", help="compress the haystack, then ask the question")
    parser.add_argument("--reads", type=int, default=0,
                        help="list the N KV heads the full cache reads the answer through, and what each keeps")
    parser.add_argument("--write", choices=("lead-in", "code", "both"), default=None,
                        help="after the prefill, write the needle's lead-in, code or both from the full cache")
    parser.add_argument("--write-layers", default=None, help="the layers --write writes into, e.g. 15-29 (all)")
    args = parser.parse_args()

    model = load(ensure_default_model(progress=True))
    tok = model.require_tokenizer()
    corpus = tok.encode(read_source(args.source), add_special_tokens=False)
    config = EvalConfig(methods=["full"], budgets=[0.05], tasks=["needle"], seed=args.seed, needle_repeats=1,
                        needle_lengths=[int(x) for x in args.lengths.split(",")], needle_placement=args.placement)
    needles = Runner(model, config, corpus, progress=False).needles()
    if not 0 <= args.instance < len(needles):
        raise SystemExit(f"--instance {args.instance}: the eval has needles 0 .. {len(needles) - 1} for these lengths")
    instance = needles[args.instance]
    code_tokens = tok.encode(" " + instance.answer, add_special_tokens=False)
    positions = answer_positions(instance, code_tokens)
    prompt = instance.haystack if args.agnostic else instance.prompt
    print(f"{instance.kind}, {len(prompt)} tokens, depth {instance.depth}, answer {instance.answer!r} at "
          f"positions {positions}")

    method = parse_compression(args.method)
    if args.agnostic:  # stored as `m.prefill` stores it: no room yet (continue_cache gives it below)
        method = method.for_stored_document()
    methods = [method] if args.write is None else [method, FullCache()]
    caches, logits = fanout_prefill(model, [prompt], methods, 0 if args.agnostic else args.steps)
    cache = caches[0]  # fanout_prefill has run the method's end of prefill
    run = answer_run(instance, code_tokens) if args.write is not None or args.reads else []
    if args.write is not None:
        lead_in, code = list(range(instance.needle_start, run[0])), run + [run[-1] + 1]
        written = {"lead-in": lead_in, "code": code, "both": lead_in + code}[args.write]
        first, last = (int(x) for x in (args.write_layers or f"0-{len(cache.layers) - 1}").split("-"))
        with torch.inference_mode():
            write_positions(cache, caches[1], written, range(first, last + 1), protect_last=40)
        print(f"wrote {tok.decode([prompt[p] for p in written])!r} into layers {first}-{last}")
    print("prefill", kept_map(cache, positions))
    if args.reads:
        shares = reading_heads(model, instance, code_tokens)  # [L, Hkv]
        hkv = shares.shape[1]
        for flat in shares.flatten().argsort(descending=True)[:args.reads].tolist():
            layer, head = divmod(flat, hkv)
            kept = "".join("X" if bool((cache.layers[layer].pos[0, head] == p).any()) else "." for p in run)
            print(f"full cache reads the answer through layer {layer} head {head}: {float(shares[layer, head]):.2f} "
                  f"of its attention; kept after prefill: {kept}")
    for layer in [int(x) for x in args.layers.split(",") if x]:
        held = [sorted(p for p in cache.layers[layer].pos[0, h].tolist() if 0 <= p < len(prompt) - 30)
                for h in range(cache.layers[layer].pos.shape[1])]
        print(f"layer {layer} holds (before the last 30 tokens):", held)
    step = make_decode_step(model, compile=False)
    start = torch.tensor([len(prompt)])
    with torch.inference_mode():
        if args.agnostic:  # the question as one later prompt chunk, as the eval feeds it; the answer follows
            asked = prepare(model, [instance.question], args.steps, None, None, cache, in_place=True)
            cache = asked.cache
            logits = prefill(model, asked.ids, asked.positions, cache)
            start = start + len(instance.question)
            print("after the question", kept_map(cache, positions))
        tokens = [logits.argmax(-1)]
        for i in range(args.steps - 1):
            logits = step(tokens[-1][:, None], (start + i)[:, None], cache)
            tokens.append(logits.argmax(-1))
            print(f"after {tok.decode(tokens[-2].tolist())!r}", kept_map(cache, positions))
    print("answer:", repr(tok.decode(torch.cat(tokens).tolist())))


if __name__ == "__main__":
    main()
