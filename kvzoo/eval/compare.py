"""`kvzoo compare`: pool the instances of several `kvzoo eval` runs and compare methods on them.

One run has a few dozen instances, and most differences between methods are within a standard error or two
of it. Runs of different seeds (or the same seed with different methods) pool: every record is keyed by the
instance it was measured on, so a method is compared with another (or with the full cache) only on the
instances both ran, each instance paired with itself (paired difference, mean ± standard error).
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvzoo.cli import HelpFormatter
from kvzoo.errors import KvzooError, KvzooWarning

# The config fields that decide which instances a task's records are (kvzoo.eval.runner.Runner.run): two runs
# agreeing on them (and on the source text) measured the same instances under the same numbers.
TEXT_FIELDS = ("seed", "n", "context_len", "continuation_len")
INSTANCE_FIELDS: dict[str, tuple[str, ...]] = {
    "nll": TEXT_FIELDS,
    "agreement": TEXT_FIELDS + ("agreement_tokens",),
    "attn_error": TEXT_FIELDS,
    "needle-aware": ("seed", "needle_lengths", "needle_depths", "needle_repeats"),
    "needle-agnostic": ("seed", "needle_lengths", "needle_depths", "needle_repeats"),
}
LONGBENCH_FIELDS = ("n",)  # longbench-<task>: the first n examples of the task's file
COUNTED = ("needle-aware", "needle-agnostic")  # 0/1 values: shown as counts

InstanceKey = tuple[Any, ...]  # (source, corpus_tokens, the task's instance fields..., instance number)
CellKey = tuple[str, str | None, str, float | None]  # (task, memory mode, method label, budget)


@dataclass
class Pool:
    """Every run's records by cell and instance; `runs` names each run read, `sets` its instance sets."""

    values: dict[CellKey, dict[InstanceKey, float]] = field(default_factory=lambda: defaultdict(dict))
    origin: dict[tuple[CellKey, InstanceKey], str] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Paired:
    """A paired difference over n instances (se is nan for a single instance)."""

    n: int
    mean: float
    se: float
    total: float


def results_file(path: str | Path) -> Path:
    """The results.json of a run: `path` itself or the file in the directory `kvzoo eval --out` wrote."""
    p = Path(path)
    target = p / "results.json" if p.is_dir() else p
    if not target.is_file():
        raise KvzooError(f"{path}: no such results file (give a directory `kvzoo eval --out` wrote, or its "
                         "results.json)")
    return target


def read_run(path: str | Path) -> dict[str, Any]:
    """The payload of one `kvzoo eval` run, checked to be one."""
    target = results_file(path)
    try:
        payload = json.loads(target.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KvzooError(f"{target}: not a readable results.json ({e})") from None
    if not isinstance(payload, dict) or payload.get("kind") != "eval" or not isinstance(payload.get("records"), list):
        kind = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise KvzooError(f"{target}: not the results of `kvzoo eval` (kind {kind!r}; `kvzoo compare` reads "
                         "eval runs, not bench runs)")
    return payload


def instance_key(payload: dict[str, Any], task: str, instance: int) -> InstanceKey:
    """Which instance a record is: the run's source text and the config fields that chose the task's instances."""
    config = payload.get("config", {})
    names = INSTANCE_FIELDS.get(task, LONGBENCH_FIELDS)
    fields = tuple(_hashable(config.get(name)) for name in names)
    return (payload.get("source"), payload.get("corpus_tokens"), task, *fields, instance)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _primary(values: dict[str, float]) -> float:
    """A record's main value: the first the task writes (nll, exact, agreement, error, score)."""
    return float(next(iter(values.values())))


def pool_runs(paths: list[str | Path]) -> Pool:
    """Every record of every run, keyed by cell and instance. A record met twice (the full cache of two runs of
    one seed) is kept once; if the two differ (different code), the first is kept and the conflict reported."""
    pool = Pool()
    for path in paths:
        payload = read_run(path)
        name = str(path)
        pool.runs.append(name + (" (interrupted)" if payload.get("interrupted") else ""))
        memory = payload.get("config", {}).get("memory", "budget")
        clashes: dict[tuple[CellKey, str], list[float]] = defaultdict(list)  # (cell, first run) -> differences
        for r in payload["records"]:
            try:
                task, label, budget, instance, values = r["task"], r["label"], r["budget"], r["instance"], r["values"]
            except (KeyError, TypeError):
                raise KvzooError(f"{results_file(path)}: a record without task/label/budget/instance/values: "
                                 f"{r!r:.200}") from None
            cell = (task, None if label == "full" else memory, label, budget)
            key = instance_key(payload, task, instance)
            value = _primary(values)
            seen = pool.values[cell].get(key)
            if seen is None:
                pool.values[cell][key] = value
                pool.origin[(cell, key)] = name
            elif abs(seen - value) > 1e-6 * max(1.0, abs(seen)):
                clashes[(cell, pool.origin[(cell, key)])].append(abs(seen - value))
        for ((task, _, label, budget), first), diffs in clashes.items():
            pool.conflicts.append(f"{label} at budget {budget} on {task}: {len(diffs)} instances differ between "
                                  f"{first} and {name} (largest difference {max(diffs):.3g}); kept {first}'s")
    return pool


def paired(a: dict[InstanceKey, float], b: dict[InstanceKey, float]) -> Paired | None:
    """a - b over the instances both have; None when they share none."""
    common = [k for k in a if k in b]
    if not common:
        return None
    diffs = [a[k] - b[k] for k in common]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else math.nan
    return Paired(n, mean, se, sum(diffs))


def _selected(task: str, tasks: list[str] | None) -> bool:
    """Whether `task` is one of `tasks` (None: all); "needle" names both needle layouts, as in `kvzoo eval`."""
    return tasks is None or any(task == t or task.startswith(t + "-") for t in tasks)


def _cell_text(task: str, vals: dict[InstanceKey, float], full: dict[InstanceKey, float],
               against: dict[InstanceKey, float] | None) -> str:
    """What a table shows for one method and budget: needles as a count, nll as its increase over the full
    cache (paired), anything else as its mean; then the paired difference to `against`, when given."""
    if task in COUNTED:
        text = f"{sum(vals.values()):.0f}/{len(vals)}"
    elif task == "nll" and (base := paired(vals, full)) is not None:
        text = f"{base.mean:+.3f} [{base.n}]"
    else:
        text = f"{sum(vals.values()) / len(vals):.3f} [{len(vals)}]"
    if against is not None:
        d = paired(vals, against)
        if d is None:
            text += " (no common instances)"
        elif task in COUNTED:
            text += f" ({d.total:+.0f} of {d.n})"
        else:
            se = "n/a" if math.isnan(d.se) else f"{d.se:.3f}"
            text += f" ({d.mean:+.3f} ± {se})"
    return text


def compare_markdown(pool: Pool, against: str | None = None, tasks: list[str] | None = None) -> str:
    """One table per task and memory mode: methods as rows, budgets as columns (see `_cell_text`)."""
    groups = sorted({(t, m) for t, m, label, _ in pool.values if label != "full" and _selected(t, tasks)},
                    key=lambda g: (g[0], g[1] or ""))
    if not groups:
        raise KvzooError("no compressed-method records to compare" + (f" for tasks {', '.join(tasks)}" if tasks else ""))
    labels = list(dict.fromkeys(label for t, _, label, _ in pool.values if _selected(t, tasks)))
    if against is not None and against not in labels:
        raise KvzooError(f"--against {against!r}: no records of that method in the runs; they have "
                         + ", ".join(labels))
    out = ["Pooled runs: " + ", ".join(pool.runs), ""]
    for task, memory in groups:
        cells = {k: v for k, v in pool.values.items() if k[0] == task and k[1] == memory}
        full = pool.values.get((task, None, "full", None), {})
        budgets = sorted({b for _, _, _, b in cells if b is not None})
        methods = list(dict.fromkeys(label for _, _, label, _ in cells))
        shown = ("increase in NLL over the full cache [instances]" if task == "nll" else
                 "retrieved / instances" if task in COUNTED else "mean [instances]")
        vs = f"; in brackets: the paired difference to {against} (mean ± standard error)" if against else ""
        if against and task in COUNTED:
            vs = f"; in brackets: retrieved minus {against}'s, on the instances both ran"
        if against and against not in methods:
            vs = f"; {against} has no records here"
        full_text = (f"; full cache {sum(full.values()) / len(full):.3f} over {len(full)} instances"
                     if full and task not in COUNTED else
                     f"; full cache {sum(full.values()):.0f}/{len(full)}" if full else "")
        out.append(f"**{task}, memory {memory}**: {shown}{vs}{full_text}\n")
        out.append("| method | " + " | ".join(f"{b:g}" for b in budgets) + " |")
        out.append("|---|" + "---|" * len(budgets))
        for label in methods:
            row = []
            for b in budgets:
                vals = cells.get((task, memory, label, b))
                ref = cells.get((task, memory, against, b), {}) if against and label != against else None
                row.append(_cell_text(task, vals, full, ref) if vals else "")
            out.append(f"| {label} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="pool several `kvzoo eval` runs and compare methods instance by instance",
        formatter_class=HelpFormatter,
        description="Reads the results.json of each RUN (a `kvzoo eval --out` directory or the file), pools "
                    "the instances of every run (runs of one seed share instances, other seeds add new ones) "
                    "and prints, per task, budget and method, the pooled value and the paired difference to "
                    "--against on the instances both ran (mean ± standard error).",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="`kvzoo eval --out` directories or results.json files")
    p.add_argument("--against", default=None, metavar="METHOD",
                   help="a method label of the runs (e.g. h2o, 'zsmerge:proximity=0.75') to pair every other "
                        "method with (default: none, only the full cache)")
    p.add_argument("--tasks", default=None, type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help="only these tasks (e.g. nll,needle-aware; default: every task in the runs)")
    p.set_defaults(func=run_compare_command)


def run_compare_command(args: argparse.Namespace) -> None:
    pool = pool_runs(args.runs)
    for conflict in pool.conflicts:
        warnings.warn(conflict, KvzooWarning, stacklevel=2)
    print(compare_markdown(pool, args.against, args.tasks))
