"""How much continuation NLL a perfect ranking would win: the clairvoyant bound of issue 11's NLL table.

    python tools/oracle_bound.py --seed 18 --n 16 --methods h2o,zsmerge [--source FILE] [--budgets 0.05,0.1,0.2]
                                 [--split]

Pass 1: one exact forward of the full model over context + continuation records, for every layer and KV head,
the attention the continuation's queries give each position (summed over those queries, mean over the query
heads of the KV head): the attention a cache will be asked for. Pass 2: `Clairvoyant`, H2O's layout (half the
budget the newest tokens, the rest chosen by score, one eviction per decode step) ranked by that recorded
attention instead of the attention seen so far, scores the continuation as `kvzoo eval --tasks nll --memory
matched` does (teacher-forced decode steps, the budget raised by the continuation's length), beside the methods
named. It reads the future, so it is a bound to measure methods against, never a method. `--split` also
scores it at prefill only and at decode only (`Clairvoyant.phase`): which of the two a better method should
improve.

Prints each method's NLL increase over the full cache per budget, its paired difference to the first method
named (mean +- standard error over windows), and every window's increase, since a few windows (a passage the
continuation copies from far back) can carry most of a mean. Runs one window batch at a time: two to three
and a half minutes per method, budget and 8 windows of 2048 tokens on one CPU thread (seen beside one other
job, not timed alone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvzoo.cache.base import CompressionMethod  # noqa: E402
from kvzoo.cache.h2o import H2O  # noqa: E402
from kvzoo.cache.observe import PrefillObserver, observe_prefill  # noqa: E402
from kvzoo.cache.scoring import group_mean  # noqa: E402
from kvzoo.cache.selection import keep_top  # noqa: E402
from kvzoo.cache.slots import LayerSlots  # noqa: E402
from kvzoo.likelihood import score_ids  # noqa: E402
from kvzoo_kernels.window_scores import weighted_column_sums  # noqa: E402

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk
    from kvzoo.models.base import CausalLM


class FutureAttention(PrefillObserver):
    """Records, per layer, [B, Hkv, T] the attention the queries at positions >= context_len pay each of the T
    positions (a one-shot prefill of context + continuation; padding queries pay nothing)."""

    def __init__(self, context_len: int) -> None:
        self.context_len = context_len
        self.tables: list[torch.Tensor] = []

    def compress_prefill(self, layer_idx: int, slots: LayerSlots, chunk: "PrefillChunk") -> None:
        # Only the continuation's queries (the chunk's last ones: `future_attention` feeds unpadded rows) attend.
        q_pos = chunk.q_pos[:, self.context_len:]  # [B, C]
        sums = weighted_column_sums(chunk.q[:, :, self.context_len:], chunk.keys, q_pos, chunk.key_pos,
                                    chunk.key_bias, chunk.window, torch.ones_like(q_pos, dtype=torch.float32))
        self.tables.append(group_mean(sums, chunk.keys.shape[1]))


def future_attention(model: "CausalLM", ids: torch.Tensor, context_len: int) -> list[torch.Tensor]:
    """Per layer [B, Hkv, T]: the attention the tokens of ids [B, T] at positions >= context_len pay each
    position, in the full model's exact forward."""
    observer = FutureAttention(context_len)
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.inference_mode():
        observe_prefill(model, ids, positions, observer)
    return observer.tables


PHASES = ("both", "prefill", "decode")


@dataclass
class Clairvoyant(H2O):
    """H2O's layout ranked by `tables` (per layer [B, Hkv, T], `future_attention`), the attention each position
    will be paid, for prefill and for the token each decode step places; scores never change after.

    `phase` splits the bound: "prefill" keeps the prompt's tokens by the recorded attention but stores H2O's
    accumulated attention and decodes as H2O (what a perfect prefill ranking alone wins); "decode" keeps them as
    H2O does but stores the recorded attention, by which every decode step evicts (what perfect evictions
    alone win)."""

    tables: list[torch.Tensor] = field(default_factory=list, repr=False)
    phase: str = "both"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.phase not in PHASES:
            raise ValueError(f"Clairvoyant: phase must be one of {PHASES}, got {self.phase!r}")
        # Layer-batched decode passes layer_idx -1 and every layer's rows stacked layer-major (L * B rows).
        self._stacked = torch.cat(self.tables) if self.tables else None

    def compress_prefill(self, layer_idx: int, slots: LayerSlots, chunk: "PrefillChunk") -> None:
        recorded = self.tables[layer_idx].gather(-1, chunk.key_pos.clamp(min=0))  # [B, Hkv, S]
        # H2O's accumulated attention (one more attention pass over the prompt) only where a phase uses it
        accumulated = recorded if self.phase == "both" else super().prefill_scores(slots, chunk)
        rank = accumulated if self.phase == "decode" else recorded
        stored = accumulated if self.phase == "prefill" else recorded
        keep_top(slots, chunk, rank.masked_fill(self.protected(slots, chunk), float("inf")),
                 self.prefill_keep(slots), stored_score=stored)

    def decode_step(self, layer_idx: int, slots: LayerSlots, k_new: torch.Tensor, v_new: torch.Tensor,
                    pos_new: torch.Tensor, probs: torch.Tensor) -> None:
        if self.phase == "prefill":
            super().decode_step(layer_idx, slots, k_new, v_new, pos_new, probs)
            return
        table = self._stacked if layer_idx < 0 else self.tables[layer_idx]
        new_score = table.gather(-1, pos_new[:, None, None].expand(-1, table.shape[1], 1))[..., 0]
        self.place_evicting_lowest(slots, k_new, v_new, pos_new, new_score)


def mean_nll(model: "CausalLM", contexts: list[list[int]], continuations: list[list[int]],
             method: CompressionMethod | None) -> list[float]:
    """Mean continuation NLL of every window under `method` (None: the full cache)."""
    return [float(-lp.mean()) for lp in score_ids(model, contexts, continuations, method)]


def _summary(name: str, values: list[float], reference: list[float]) -> str:
    diff = [a - b for a, b in zip(values, reference)]
    se = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else 0.0
    return (f"{name:24s} {statistics.mean(values):+.3f}  vs first {statistics.mean(diff):+.3f} ± {se:.3f}  "
            f"windows: {' '.join(f'{v:+.2f}' for v in values)}")


def main(argv: list[str] | None = None) -> None:
    from kvzoo.cli import load_model
    from kvzoo.eval.runner import matched_memory, method_cases
    from kvzoo.eval.tasks import text_instances
    from kvzoo.eval.texts import BUILTIN_SOURCE, read_source

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="h2o,zsmerge", help="comma-separated method specs, as kvzoo eval's")
    p.add_argument("--budgets", default="0.05,0.1,0.2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context-len", type=int, default=2048)
    p.add_argument("--continuation-len", type=int, default=128)
    p.add_argument("--source", default=BUILTIN_SOURCE)
    p.add_argument("--split", action="store_true",
                   help="also score the bound's two halves: clairvoyant at prefill only (decode as H2O) and at "
                        "decode only (prefill as H2O)")
    args = p.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    cases = [c for c in method_cases(args.methods.split(","), budgets) if c.budget is not None]
    model = load_model(None, None)
    corpus = model.require_tokenizer().encode(read_source(args.source), add_special_tokens=False)
    windows = text_instances(corpus, args.n, args.context_len, args.continuation_len, args.seed)
    steps = args.continuation_len - 1  # decode steps: the first continuation token is predicted by the prefill
    rows: dict[tuple[str, float], list[float]] = {}
    for first in range(0, len(windows), args.batch_size):
        batch = windows[first:first + args.batch_size]
        contexts, continuations = [w.context for w in batch], [w.continuation for w in batch]
        tables = future_attention(model, torch.tensor([c + t for c, t in zip(contexts, continuations)]),
                                  args.context_len)
        full = mean_nll(model, contexts, continuations, None)
        for budget in budgets:
            # as `kvzoo eval --memory matched`: every method's budget holds the decode steps too
            matched = [matched_memory(c, args.context_len, steps) for c in cases if c.budget == budget]
            methods: dict[str, CompressionMethod] = {c.label: c.method for c in matched}
            raised = min(budget + steps / args.context_len, 0.999)
            for phase in PHASES if args.split else PHASES[:1]:
                name = "clairvoyant" if phase == "both" else f"clairvoyant {phase} only"
                methods[name] = Clairvoyant(budget=raised, tables=tables, phase=phase)
            for name, method in methods.items():
                nll = mean_nll(model, contexts, continuations, method)
                rows.setdefault((name, budget), []).extend(a - f for a, f in zip(nll, full))
            print(f"windows {first + 1}-{first + len(batch)} of {len(windows)}, {budget:.0%} kept: done",
                  file=sys.stderr, flush=True)
    for budget in budgets:
        print(f"\n{budget:.0%} kept (+{steps / args.context_len:.2%} for the continuation), NLL increase over the "
              "full cache:")
        names = [n for n, b in rows if b == budget]
        for name in names:
            print(_summary(name, rows[(name, budget)], rows[(names[0], budget)]))


if __name__ == "__main__":
    main()
