"""LongBench-format data a user has downloaded (one `<dataset>.jsonl` per task, each line with `input`,
`context`, `answers`, optional `all_classes`), scored with each task's standard metric.

Prompts are one generic template (context, then the question, then "Answer:"); prompts longer than the
model's context are cut in the middle (first and last halves kept), as LongBench does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvzoo.errors import KvzooError
from kvzoo.eval import metrics

Metric = Callable[[str, str, list[str]], float]


def _qa_f1(pred: str, answer: str, classes: list[str]) -> float:
    return metrics.token_f1(pred, answer)


def _rouge(pred: str, answer: str, classes: list[str]) -> float:
    return metrics.rouge_l(pred, answer)


def _classification(pred: str, answer: str, classes: list[str]) -> float:
    return metrics.classification_score(pred, answer, classes)


def _code(pred: str, answer: str, classes: list[str]) -> float:
    return metrics.edit_similarity(pred, answer)


def _retrieval(pred: str, answer: str, classes: list[str]) -> float:
    """passage_retrieval: the share of numbers in the prediction that are the right paragraph's."""
    wanted = re.findall(r"\d+", answer)
    found = re.findall(r"\d+", pred)
    return sum(n == wanted[0] for n in found) / len(found) if wanted and found else 0.0


def _count(pred: str, answer: str, classes: list[str]) -> float:
    """passage_count: the share of numbers in the prediction equal to the answer."""
    found = re.findall(r"\d+", pred)
    return sum(n == answer.strip() for n in found) / len(found) if found else 0.0


# English LongBench tasks -> (metric, new tokens to generate: LongBench's dataset2maxlen).
TASKS: dict[str, tuple[Metric, int]] = {
    "narrativeqa": (_qa_f1, 128), "qasper": (_qa_f1, 128), "multifieldqa_en": (_qa_f1, 64),
    "hotpotqa": (_qa_f1, 32), "2wikimqa": (_qa_f1, 32), "musique": (_qa_f1, 32), "triviaqa": (_qa_f1, 32),
    "gov_report": (_rouge, 512), "qmsum": (_rouge, 512), "multi_news": (_rouge, 512), "samsum": (_rouge, 128),
    "trec": (_classification, 64), "passage_retrieval_en": (_retrieval, 32), "passage_count": (_count, 32),
    "lcc": (_code, 64), "repobench-p": (_code, 64),
}


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answers: list[str]
    classes: list[str]


def read_tasks(data_dir: str | Path, only: list[str] | None = None, limit: int | None = None) -> dict[str, list[Example]]:
    """{task: examples} for every known `<task>.jsonl` in data_dir (or only those named)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise KvzooError(f"--data {root}: no such directory")
    names = only or sorted(p.stem for p in root.glob("*.jsonl") if p.stem in TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise KvzooError(f"LongBench task {unknown[0]!r} is not supported; supported: {', '.join(sorted(TASKS))}")
    if not names:
        raise KvzooError(f"--data {root}: no LongBench file (<task>.jsonl for a task in: {', '.join(sorted(TASKS))})")
    return {name: _read(root / f"{name}.jsonl", name, limit) for name in names}


def _read(path: Path, task: str, limit: int | None) -> list[Example]:
    if not path.is_file():
        raise KvzooError(f"{path}: no such file")
    out = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            answers = [str(a) for a in row["answers"]]
            prompt = f"{row['context']}\n\nQuestion: {row['input']}\nAnswer:" if row.get("input") else \
                f"{row['context']}\n\nAnswer:"
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise KvzooError(f"{path}:{no}: not a LongBench record with context / input / answers ({e})") from None
        if not answers:
            raise KvzooError(f"{path}:{no}: 'answers' is empty")
        out.append(Example(task, prompt, answers, list(row.get("all_classes") or [])))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise KvzooError(f"{path}: the file has no records")
    return out


def score_prediction(example: Example, prediction: str) -> float:
    """The task's metric against the best-matching reference answer."""
    metric = TASKS[example.task][0]
    return max(metric(prediction, answer, example.classes) for answer in example.answers)


def truncate_middle(ids: list[int], max_len: int) -> list[int]:
    """Keep the first and last max_len // 2 tokens of an over-long prompt."""
    if len(ids) <= max_len:
        return ids
    half = max_len // 2
    return ids[:half] + ids[len(ids) - (max_len - half):]
