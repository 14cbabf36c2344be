"""`kvzoo compare`: pool the instances of several `kvzoo eval` runs and compare methods on them.

One run has a few dozen instances, and most differences between methods are within a standard error or two
of it. Runs pool: every record is keyed by the instance it was measured on (a text task by where its window
starts in the corpus, so seeds that drew the same window count it once), a method is compared with another
(or with the full cache) only on the instances both ran, and each instance is paired with itself (paired
difference, mean ± standard error).
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
from kvzoo.eval.command import comma_names
from kvzoo.eval.report import budget_table
from kvzoo.eval.tasks import text_offsets

# Each task's main value (what `kvzoo eval` tabulates first); longbench-<task> records hold "score".
PRIMARY = {"nll": "nll", "agreement": "agreement", "attn_error": "error", "needle-aware": "exact",
           "needle-agnostic": "exact"}
TEXT_TASKS = ("nll", "agreement", "attn_error")  # windows of the corpus (tasks.text_offsets)
COUNTED = ("needle-aware", "needle-agnostic")  # 0/1 values: shown as counts
NO_MEMORY_MODE = ("attn_error",)  # measured on each method's plain budget whatever --memory says

InstanceKey = tuple[Any, ...]  # (source, corpus_tokens, task, what decides the instance...)
CellKey = tuple[str, str | None, str, float | None]  # (task, memory mode or None, method label, budget)


@dataclass
class Pool:
    """Every run's main values by cell and instance, the run each was first read from, the runs read and the
    records that differed between runs."""

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


def read_run(target: Path) -> dict[str, Any]:
    """The payload of one `kvzoo eval` results file (`results_file`), checked to be one."""
    try:
        payload = json.loads(target.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KvzooError(f"{target}: not a readable results.json ({e})") from None
    if not isinstance(payload, dict) or payload.get("kind") != "eval":
        kind = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise KvzooError(f"{target}: not the results of `kvzoo eval` (kind {kind!r}; `kvzoo compare` reads "
                         "eval runs)")
    for name, kind in (("records", list), ("config", dict)):
        if not isinstance(payload.get(name), kind):
            raise KvzooError(f"{target}: an eval results file without a {name} {kind.__name__}")
    return payload


class InstanceKeys:
    """Which instance each record of one run is: the run's source text, then for a text task the window's
    offset in the corpus (so two seeds that drew the same window share it), for a needle its seed, lengths,
    depths, placement (runs from before it was a choice placed by token) and number (the repeats only append
    instances), for a LongBench task its example number."""

    def __init__(self, payload: dict[str, Any], where: Path) -> None:
        self.config, self.where = payload["config"], where
        self.base = (payload.get("source"), payload.get("corpus_tokens"))
        self._offsets: list[int] | None = None

    def __call__(self, task: str, instance: int) -> InstanceKey:
        c = self.config
        if task in TEXT_TASKS:
            span = (c.get("context_len"), c.get("continuation_len"))
            extra = (c.get("agreement_tokens"),) if task == "agreement" else ()
            return (*self.base, task, *span, *extra, self._offset(instance))
        if task in COUNTED:
            grid = tuple(tuple(c.get(k) or ()) for k in ("needle_lengths", "needle_depths"))
            return (*self.base, task, c.get("seed"), *grid, c.get("needle_placement", "token"), instance)
        return (*self.base, task, instance)

    def _offset(self, instance: int) -> int:
        if self._offsets is None:
            c = self.config
            try:
                self._offsets = text_offsets(int(self.base[1]), int(c["n"]), int(c["context_len"]),
                                             int(c["continuation_len"]), int(c["seed"]))
            except (KeyError, TypeError, ValueError, KvzooError) as e:
                raise KvzooError(f"{self.where}: the config cannot say which text windows the run used ({e})") from None
        if not 0 <= instance < len(self._offsets):
            raise KvzooError(f"{self.where}: instance {instance} is outside the run's n={len(self._offsets)}")
        return self._offsets[instance]


def _record_fields(r: Any, where: Path) -> tuple[str, str, float | None, int, float]:
    """(task, label, budget, instance, main value) of one record, each checked."""
    bad = f"{where}: a malformed record {r!r:.200}"
    if not isinstance(r, dict):
        raise KvzooError(bad)
    task, label, budget, instance, values = (r.get(k) for k in ("task", "label", "budget", "instance", "values"))
    if not isinstance(task, str) or not isinstance(label, str) or not isinstance(values, dict):
        raise KvzooError(f"{bad} (task and label must be strings, values a mapping)")
    if isinstance(instance, bool) or not isinstance(instance, int):
        raise KvzooError(f"{bad} (instance must be an integer)")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))):
        raise KvzooError(f"{bad} (budget must be a number or null)")
    key = PRIMARY.get(task, "score")
    value = values.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KvzooError(f"{bad} (no number {key!r} in its values)")
    return task, label, budget, instance, float(value)


def _needle_kind(r: dict[str, Any], where: Path) -> str:
    """The kind (passkey, multikey) a needle record's info names."""
    kind = r.get("info", {}).get("kind") if isinstance(r.get("info"), dict) else None
    if not isinstance(kind, str):
        raise KvzooError(f"{where}: a needle record without its kind in info {r!r:.200}; --by-kind needs it")
    return kind


def _identity(payload: dict[str, Any]) -> tuple[str | None, str | None]:
    """(model, dtype) of a run, None where the file does not say (runs written before the model was)."""
    return payload.get("model"), payload.get("provenance", {}).get("dtype")


def task_of(cell_task: str) -> str:
    """The eval task of a pooled cell's task ("needle-agnostic" of "needle-agnostic:multikey", `by_kind`)."""
    return cell_task.split(":", 1)[0]


def pool_runs(paths: list[str | Path], renames: dict[str, str] | None = None, by_kind: bool = False) -> Pool:
    """Every record of every run, keyed by cell and instance. A record met twice (the full cache of two runs,
    one window drawn by two seeds) is kept once; if the two differ (different code), the first is kept and
    the conflict reported. Runs of different models or dtypes are refused. `renames` {label: as}: a method
    recorded under another label in some runs (a default written out as its spec before it became the
    default) pools as `as`; a label no run holds is refused (a typo would silently rename nothing). `by_kind`:
    needles pool apart per kind, as task "needle-<layout>:<kind>" (passkey, multikey)."""
    renames = renames or {}
    unused = set(renames)
    pool = Pool()
    seen_identity: dict[tuple[str | None, str | None], str] = {}
    for path in paths:
        target = results_file(path)
        payload = read_run(target)
        name = str(path)
        model, dtype = _identity(payload)
        for (other_model, other_dtype), other in seen_identity.items():
            if (model and other_model and model != other_model) or (dtype and other_dtype and dtype != other_dtype):
                raise KvzooError(f"{name} ran {model or '?'} in {dtype or '?'}, {other} {other_model or '?'} in "
                                 f"{other_dtype or '?'}: compare runs of one model and dtype")
        seen_identity.setdefault((model, dtype), name)
        pool.runs.append(name + (" (interrupted)" if payload.get("interrupted") else ""))
        memory = payload["config"].get("memory", "budget")
        keys = InstanceKeys(payload, target)
        clashes: dict[tuple[CellKey, str], list[float]] = defaultdict(list)  # (cell, run kept) -> differences
        for r in payload["records"]:
            task, label, budget, instance, value = _record_fields(r, target)
            if label in renames:
                unused.discard(label)
                label = renames[label]
            mode = None if label == "full" or task in NO_MEMORY_MODE else memory
            key = keys(task, instance)
            if by_kind and task in COUNTED:
                task = f"{task}:{_needle_kind(r, target)}"
            cell = (task, mode, label, budget)
            kept = pool.values[cell].get(key)
            if kept is None:
                pool.values[cell][key] = value
                pool.origin[(cell, key)] = name
            elif abs(kept - value) > 1e-6 * max(1.0, abs(kept)):
                clashes[(cell, pool.origin[(cell, key)])].append(abs(kept - value))
        for ((task, mode, label, budget), first), diffs in clashes.items():
            between = f"twice in {name}" if first == name else f"between {first} and {name}"
            where = task + (f", memory {mode}" if mode else "") + ("" if budget is None else f", budget {budget:g}")
            pool.conflicts.append(f"{label} ({where}): {len(diffs)} instance{'s' * (len(diffs) > 1)} differ "
                                  f"{between} (largest difference {max(diffs):.3g}); kept {first}'s")
    if unused:
        raise KvzooError(f"--rename: no run holds a method labelled {', '.join(map(repr, sorted(unused)))}")
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


def _cell_text(task: str, vals: dict[InstanceKey, float], full: dict[InstanceKey, float],
               against: dict[InstanceKey, float] | None) -> str:
    """One method at one budget: needles as retrieved/instances, nll as its increase over the full cache on
    the instances paired with it [their count] ("no full cache" when none is), anything else as its mean
    [count]; then, given `against`, the paired difference to it on the instances both ran."""
    if task_of(task) in COUNTED:
        text = f"{sum(vals.values()):.0f}/{len(vals)}"
    elif task == "nll":
        base = paired(vals, full)
        text = "no full cache" if base is None else f"{base.mean:+.3f} [{base.n}]"
    else:
        text = f"{sum(vals.values()) / len(vals):.3f} [{len(vals)}]"
    if against is None:
        return text
    d = paired(vals, against)
    if d is None:
        return text + " (no common instances)"
    if task_of(task) in COUNTED:
        return text + f" ({d.total:+.0f} of {d.n})"
    se = "n/a" if math.isnan(d.se) else f"{d.se:.3f}"
    return text + f" ({d.mean:+.3f} ± {se}, {d.n})"


def _selected(task: str, tasks: list[str] | None) -> bool:
    """Whether `task` is one of `tasks` (None: all); "needle" names both needle layouts, as in `kvzoo eval`."""
    return tasks is None or any(task_of(task) == t or task.startswith(t + "-") for t in tasks)


def _legend(task: str, against: str | None, methods: list[str], full: dict[InstanceKey, float]) -> str:
    task = task_of(task)
    if task == "nll":
        shown = "increase in NLL over the full cache [instances paired with it]"
    elif task in COUNTED:
        shown = "retrieved / instances"
    else:
        shown = "mean [instances]"
    if against is None:
        vs = ""
    elif against not in methods:
        vs = f"; {against} has no records here"
    elif task in COUNTED:
        vs = f"; in parentheses: retrieved minus {against}'s on the instances both ran, and their count"
    else:
        vs = f"; in parentheses: the paired difference to {against}, mean ± standard error, and the instances"
    if not full:
        reference = ""
    elif task in COUNTED:
        reference = f"; full cache {sum(full.values()):.0f}/{len(full)}"
    else:
        reference = f"; full cache {sum(full.values()) / len(full):.3f} over {len(full)} instances"
    return shown + vs + reference


def compare_markdown(pool: Pool, against: str | None = None, tasks: list[str] | None = None) -> str:
    """One table per task and memory mode: methods as rows, budgets as columns (see `_cell_text`)."""
    if against == "full":
        raise KvzooError("--against full: the full cache is already every table's reference; name a method")
    cells = {k: v for k, v in pool.values.items() if _selected(k[0], tasks)}
    groups = sorted({(t, m) for t, m, label, _ in cells if label != "full"}, key=lambda g: (g[0], g[1] or ""))
    if not groups:
        have = sorted({t for t, _, label, _ in pool.values if label != "full"})
        asked = f" for tasks {', '.join(tasks)}" if tasks else ""
        raise KvzooError(f"no compressed-method records to compare{asked}"
                         + (f"; the runs have {', '.join(have)}" if have else ""))
    labels = list(dict.fromkeys(label for _, _, label, _ in cells if label != "full"))
    if against is not None and against not in labels:
        raise KvzooError(f"--against {against!r}: no records of that method in the runs; they have "
                         + ", ".join(labels))
    out = ["Pooled runs: " + ", ".join(pool.runs), ""]
    for task, memory in groups:
        group = {k: v for k, v in cells.items() if k[0] == task and k[1] == memory}
        full = pool.values.get((task, None, "full", None), {})
        budgets = sorted({b for _, _, _, b in group if b is not None})
        methods = list(dict.fromkeys(label for _, _, label, _ in group))
        title = task + (f", memory {memory}" if memory else "")
        out.append(f"**{title}**: {_legend(task, against, methods, full)}\n")
        table = {}
        for label in methods:
            table[label] = []
            for b in budgets:
                vals = group.get((task, memory, label, b))
                ref = group.get((task, memory, against, b), {}) if against and label != against else None
                table[label].append(_cell_text(task, vals, full, ref) if vals else "")
        out += budget_table(budgets, table)
    return "\n".join(out)


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="pool several `kvzoo eval` runs and compare methods instance by instance",
        formatter_class=HelpFormatter,
        description="Reads the results.json of each RUN (a `kvzoo eval --out` directory or the file), pools "
                    "their instances (a text window drawn by two seeds counts once) and prints, per task, "
                    "memory mode, budget and method, the pooled value and the paired difference to --against "
                    "on the instances both ran (mean ± standard error). Runs must share the model and dtype.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="`kvzoo eval --out` directories or results.json files")
    p.add_argument("--against", default=None, metavar="METHOD",
                   help="a method label of the runs (e.g. h2o, 'zsmerge:proximity=0.75') to pair every other "
                        "method with (default: none, only the full cache)")
    p.add_argument("--tasks", default=None, type=comma_names,
                   help="only these tasks (nll, needle = both layouts, needle-aware, ...; default: every task)")
    p.add_argument("--by-kind", action="store_true",
                   help="count needles apart per kind (passkey, multikey): where a method's misses are")
    p.add_argument("--rename", nargs=2, action="append", default=[], metavar=("LABEL", "AS"),
                   help="pool the method labelled LABEL as AS (repeatable), e.g. a default that older runs "
                        "recorded under its spec: --rename 'zigzag:window_size=32,pooling=avg' zigzag")
    p.set_defaults(func=run_compare_command)


def run_compare_command(args: argparse.Namespace) -> None:
    pool = pool_runs(args.runs, dict(args.rename), by_kind=args.by_kind)
    for conflict in pool.conflicts:
        warnings.warn(conflict, KvzooWarning, stacklevel=2)
    print(compare_markdown(pool, args.against, args.tasks))
