"""`kvzoo eval`: the command line of the quality evaluation (the work is in runner.py)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kvzoo.cli import HelpFormatter
from kvzoo.errors import KvzooError
from kvzoo.eval import report, tasks
from kvzoo.eval.runner import DEFAULT_BUDGETS, DEFAULT_METHODS, EvalConfig, Runner, run_longbench
from kvzoo.eval.texts import BUILTIN_SOURCE, read_source


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def comma_names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_eval_parser(sub: argparse._SubParsersAction, add_model_args) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "eval", help="quality of every method and budget against the full cache",
        formatter_class=HelpFormatter,
        description="Continuation NLL, needle retrieval and greedy agreement under compression, each "
                    "instance also run with the full cache; `kvzoo eval longbench --data DIR` scores "
                    "LongBench-format files instead.",
    )
    p.add_argument("suite", nargs="?", choices=("builtin", "longbench"), default="builtin",
                   help="builtin: the tasks below on --source text; longbench: LongBench jsonl files in --data")
    add_model_args(p)
    p.add_argument("--methods", type=comma_names, default=list(DEFAULT_METHODS),
                   help="comma-separated method names (the full cache is always run)")
    p.add_argument("--method", action="append", default=[], metavar="SPEC",
                   help="an extra method spec, e.g. 'zsmerge:rank=accumulated' (repeatable; default: none)")
    p.add_argument("--budgets", type=_floats, default=list(DEFAULT_BUDGETS), help="ratios of the prompt kept")
    p.add_argument("--tasks", type=comma_names, default=list(tasks.TASKS), help=f"any of {', '.join(tasks.TASKS)}")
    p.add_argument("--n", type=int, default=8, help="nll / agreement instances")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing instances")
    p.add_argument("--source", default=BUILTIN_SOURCE,
                   help="text or HTML file, or a directory of .txt/.md/.html files (default: CPython's documentation prose)")
    p.add_argument("--context-len", type=int, default=3072, help="nll / agreement context tokens")
    p.add_argument("--continuation-len", type=int, default=256, help="nll tokens teacher-forced after it")
    p.add_argument("--agreement-tokens", type=int, default=64, help="greedy tokens compared with the full cache's")
    p.add_argument("--needle-lengths", type=_ints, default=[1024, 2048], help="needle instance lengths (tokens)")
    p.add_argument("--needle-depths", type=_floats, default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
                   help="where the needle goes, as fractions of the instance")
    p.add_argument("--needle-repeats", type=int, default=2, help="instances per (kind, length, depth)")
    p.add_argument("--needle-layouts", type=comma_names, default=["aware", "agnostic"],
                   help="aware: the question is compressed with the haystack; agnostic: it is asked after "
                        "compression, as generate(question, cache=model.prefill(haystack)) asks it")
    p.add_argument("--needle-placement", choices=tasks.NEEDLE_PLACEMENTS, default="token",
                   help="token: a needle goes in at its depth's token, mid-sentence (as passkey benchmarks plant it); "
                        "sentence: at the end of the sentence that token is in, so the needle starts a sentence")
    p.add_argument("--batch-size", type=int, default=4, help="instances prefilled together")
    p.add_argument("--memory", choices=("budget", "matched"), default="budget",
                   help="budget: every method keeps --budgets of the prompt, prefill-only methods then append "
                        "the generated tokens; matched: decode-time methods (ZSMerge, H2O, TOVA, StreamingLLM) "
                        "also get the generated tokens' worth of slots, so every method ends with the same memory")
    p.add_argument("--data", default=None,
                   help="longbench: the directory of <task>.jsonl files (required there; default: none)")
    p.add_argument("--longbench-tasks", type=comma_names, default=None,
                   help="longbench: only these tasks (default: every supported task found in --data)")
    p.add_argument("--out", default="eval-results", help="directory for results.json / results.md / charts")
    p.add_argument("--plot", action="store_true", help="write PNG charts (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> None:
    from kvzoo.cli import load_model_for_args

    config = EvalConfig(
        methods=args.methods + args.method, budgets=args.budgets, tasks=args.tasks, n=args.n, seed=args.seed,
        context_len=args.context_len, continuation_len=args.continuation_len, agreement_tokens=args.agreement_tokens,
        needle_lengths=args.needle_lengths, needle_depths=args.needle_depths,
        needle_repeats=args.needle_repeats, needle_layouts=args.needle_layouts,
        needle_placement=args.needle_placement, batch_size=args.batch_size,
        memory=args.memory,
    )
    from kvzoo.eval.runner import method_cases

    method_cases(config.methods, config.budgets)  # a bad spec fails before the model loads
    out = report.prepare_out_dir(args.out)
    if args.suite == "longbench":
        if not args.data:
            raise KvzooError("kvzoo eval longbench needs --data DIR (LongBench <task>.jsonl files)")
        from kvzoo.eval.longbench import read_tasks

        examples = read_tasks(args.data, args.longbench_tasks, limit=args.n)
        corpus_text = None
    else:
        corpus_text = read_source(args.source)
    model = load_model_for_args(args)
    tok = model.require_tokenizer()
    corpus = tok.encode(corpus_text, add_special_tokens=False) if corpus_text is not None else []
    started = time.perf_counter()
    dtype = next(model.parameters()).dtype
    last_save = [time.monotonic()]

    prov = report.provenance(dtype)  # taken at the start: the code that produced the numbers

    def save(interrupted: bool) -> tuple[list[Path], str]:
        rows = report.summarize(runner.records)
        payload = {"kind": "eval", "provenance": prov, "model": args.model or "default", "config": config,
                   "source": args.source if corpus_text is not None else args.data, "corpus_tokens": len(corpus),
                   "seconds": time.perf_counter() - started, "interrupted": interrupted, "summary": rows,
                   "records": runner.records}
        written = [report.write_json(out, payload)]
        table = (report.markdown_tables(rows) + "\n" + report.needle_kinds_table(runner.records)).rstrip() + "\n" \
            if args.suite == "builtin" else report.longbench_table(rows)
        written.append(report.write_markdown(out, "kvzoo eval", prov, table))
        return written, table

    def checkpoint() -> None:  # partial results at most once a minute, so a killed run loses little
        if time.monotonic() - last_save[0] > 60:
            save(interrupted=True)
            last_save[0] = time.monotonic()

    runner = Runner(model, config, corpus, progress=not args.quiet, on_cell=checkpoint)
    interrupted = False
    try:
        with report.sigterm_interrupts():
            if args.suite == "longbench":
                run_longbench(runner, examples, model.config.max_position_embeddings)
            else:
                runner.run()
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing what finished", file=sys.stderr)
    written, table = save(interrupted)
    if args.plot:
        written += report.plot_quality(out, report.summarize(runner.records))
    print(table)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    if interrupted:
        raise KeyboardInterrupt
