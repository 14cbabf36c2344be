"""Results of `kvzoo eval` / `kvzoo bench`: results.json with provenance, a markdown table, optional plots."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any, Iterator

import torch

from kvzoo.errors import KvzooError

SCHEMA_VERSION = 1


def provenance(dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Where a result came from: commit, command line, versions, CPU, threads, dtype, time."""
    import kvzoo

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "kvzoo": getattr(kvzoo, "__version__", "unknown")}
    for name in ("transformers", "triton"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "unknown")
    return {
        "commit": _git_commit(Path(kvzoo.__file__).resolve().parent.parent),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "versions": versions,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out.stdout.strip() + ("+dirty" if dirty else "")) if out.returncode == 0 else "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so a killed run still writes what
    finished; the handler before it comes back after (`kvzoo.cli.main` may be called from a program). Only the
    main thread can set a handler: in any other, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def prepare_out_dir(out: str | Path) -> Path:
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise KvzooError(f"--out {path}: exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    target = path / "results.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"schema": SCHEMA_VERSION, **payload}, indent=1, default=_jsonable))
    tmp.replace(target)
    return target


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)  # type: ignore[arg-type]
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    return str(x)


# --- eval summaries ---------------------------------------------------------------------------------------


def summarize(records: list[Any]) -> list[dict[str, Any]]:
    """Mean of every value per (task, method, budget), with the paired difference to the full cache."""
    cells: dict[tuple[str, str, float | None], list[Any]] = defaultdict(list)
    for r in records:
        cells[(r.task, r.label, r.budget)].append(r)
    full = {(r.task, r.instance): r.values for r in records if r.label == "full"}
    rows = []
    for (task, label, budget), recs in cells.items():
        row: dict[str, Any] = {"task": task, "method": label, "budget": budget, "n": len(recs)}
        for key in recs[0].values:
            row[key] = mean(r.values[key] for r in recs)
            paired = [r.values[key] - full[(task, r.instance)][key] for r in recs if (task, r.instance) in full]
            if paired and label != "full":
                row[f"{key}_vs_full"] = mean(paired)
        for key in ("kept", "kept_end"):
            if key in recs[0].info:
                row[key] = mean(r.info[key] for r in recs)
        rows.append(row)
    return rows


# (task, value shown, how to print it, heading)
_TABLES = [
    ("nll", "nll_vs_full", "{:+.3f}", "Continuation NLL increase over the full cache (lower is better; full cache: {full})"),
    ("nll", "kept_end", "{:.1%}", "Cache held at the end of the continuation, as a fraction of the prompt "
     "(prefill-only methods append every decoded token; decode-time methods hold their budget, which "
     "`--memory matched` raises to the same end size)"),
    ("needle-aware", "exact", "{:.0%}", "Needle accuracy, question compressed with the context (full cache: {full})"),
    ("needle-agnostic", "exact", "{:.0%}", "Needle accuracy, question asked after compression (full cache: {full})"),
    ("needle-aware", "partial", "{:.2f}", "Needle partial score (leading characters right), query-aware (full: {full})"),
    ("needle-agnostic", "partial", "{:.2f}", "Needle partial score, query-agnostic (full: {full})"),
    ("agreement", "agreement", "{:.0%}", "Greedy tokens identical to the full cache's"),
    ("attn_error", "error", "{:.3f}", "Relative attention-output error, mean over layers (lower is better)"),
]


def markdown_tables(rows: list[dict[str, Any]]) -> str:
    """One table per task: methods as rows, budgets as columns."""
    out = []
    for task, key, fmt, heading in _TABLES:
        cells = [r for r in rows if r["task"] == task]
        if not cells:
            continue
        full = next((r for r in cells if r["method"] == "full"), None)
        full_value = full.get("nll" if key == "nll_vs_full" else key) if full else None
        full_text = "n/a" if full_value is None else (f"{full_value:.3f}" if key == "nll_vs_full" else fmt.format(full_value))
        budgets = sorted({r["budget"] for r in cells if r["budget"] is not None})
        methods = list(dict.fromkeys(r["method"] for r in cells if r["method"] != "full"))
        n = max(r["n"] for r in cells)
        out.append(f"**{heading.format(full=full_text)}** ({n} instances)\n")
        table = {}
        for m in methods:
            by_budget = {r["budget"]: r for r in cells if r["method"] == m}
            table[m] = [fmt.format(by_budget[b][key]) if key in by_budget.get(b, {}) else "" for b in budgets]
        out += budget_table(budgets, table)
    return "\n".join(out)


_LAYOUTS = {"needle-aware": "question compressed with the context", "needle-agnostic": "question asked after compression"}


def needle_kinds_table(records: list[Any]) -> str:
    """Needles answered exactly, per needle kind (passkey, multikey) and budget, beside what the full cache
    answers of the same instances: where a method's misses are (the mean over kinds hides, e.g., that a stored
    document keeps a single passkey and loses one code among several). "" without a compressed method's needles."""
    out = []
    for task, layout in _LAYOUTS.items():
        recs = [r for r in records if r.task == task and "kind" in r.info]
        if all(r.label == "full" for r in recs):  # no records, or nothing to set beside the full cache
            continue
        full = {r.instance: r.values["exact"] for r in recs if r.label == "full"}
        budgets = sorted({r.budget for r in recs if r.budget is not None})
        kinds = list(dict.fromkeys(r.info["kind"] for r in recs))
        out += [f"**Needles answered by kind, {layout}** (answered / instances; the full cache on the same "
                "instances)\n", "| method | kind | full cache | " + " | ".join(f"{b:g}" for b in budgets) + " |",
                "|---|---|---|" + "---|" * len(budgets)]
        for method in dict.fromkeys(r.label for r in recs if r.label != "full"):
            for kind in kinds:
                cell = {b: [r for r in recs if r.label == method and r.info["kind"] == kind and r.budget == b]
                        for b in budgets}
                instances = {r.instance for cell_recs in cell.values() for r in cell_recs}
                if not instances:
                    continue
                reference = _answered([full[i] for i in sorted(instances) if i in full])
                counts = [_answered([r.values["exact"] for r in cell[b]]) for b in budgets]
                out.append(f"| {method} | {kind} | {reference} | " + " | ".join(counts) + " |")
        out.append("")
    return "\n".join(out)


def _answered(exact: list[float]) -> str:
    """'answered/instances' of exact scores (1.0 or 0.0); "" for none."""
    return f"{sum(exact):.0f}/{len(exact)}" if exact else ""


def budget_table(budgets: list[float], rows: dict[str, list[str]]) -> list[str]:
    """The lines of a markdown table with a column per budget and a row per method (its cells' texts), and a
    blank line after it."""
    lines = ["| method | " + " | ".join(f"{b:g}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    return lines + [f"| {method} | " + " | ".join(cells) + " |" for method, cells in rows.items()] + [""]


def write_markdown(path: Path, title: str, prov: dict[str, Any], body: str) -> Path:
    target = path / "results.md"
    target.write_text(f"# {title}\n\n`{prov['command']}` — commit {prov['commit']}, {prov['cpu']}, "
                      f"{prov['threads']} threads, {prov['dtype']}, {prov['date']}\n\n{body}\n")
    return target


def plot_quality(path: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """quality-vs-budget charts per task (needs matplotlib: `pip install kvzoo[plot]`)."""
    plt = _pyplot()
    written = []
    for task, key, _, heading in _TABLES:
        cells = [r for r in rows if r["task"] == task and r["budget"] is not None and key in r]
        if not cells or key in ("partial", "kept_end"):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in dict.fromkeys(r["method"] for r in cells):
            pts = sorted((r["budget"], r[key]) for r in cells if r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xscale("log")
        ax.set_xlabel("budget (fraction of the prompt kept)")
        ax.set_ylabel(key)
        ax.set_title(heading.split(" (")[0], fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        target = path / f"{task}-{key}.png"
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KvzooError("--plot needs matplotlib: pip install 'kvzoo[plot]'") from None
    return plt


def longbench_table(rows: list[dict[str, Any]]) -> str:
    """LongBench scores: tasks x (method, budget)."""
    cols = list(dict.fromkeys((r["method"], r["budget"]) for r in rows))
    task_names = list(dict.fromkeys(r["task"] for r in rows))
    head = ["task"] + [m if b is None else f"{m} {b:g}" for m, b in cols]
    out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for t in task_names:
        by = {(r["method"], r["budget"]): r for r in rows if r["task"] == t}
        out.append(f"| {t.removeprefix('longbench-')} | " +
                   " | ".join(f"{100 * by[c]['score']:.1f}" if c in by else "" for c in cols) + " |")
    return "\n".join(out) + "\n"
