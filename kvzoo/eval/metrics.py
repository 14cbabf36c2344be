"""Answer metrics: needle exact/partial scores and LongBench's standard metrics (token F1, ROUGE-L,
classification accuracy, edit similarity), written from their definitions."""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def leading_match(prediction: str, answer: str) -> float:
    """Fraction of `answer`'s characters that `prediction` gets right from the start, before the first
    wrong one (1.0 = exact). E.g. answer 48213, prediction 48299 -> 0.6."""
    if not answer:
        raise ValueError("answer is empty")
    right = 0
    for p, a in zip(prediction, answer):
        if p != a:
            break
        right += 1
    return right / len(answer)


def first_number(text: str) -> str:
    """The first run of digits in `text` ('' if none): what a passkey answer is read as."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else ""


def normalize_answer(text: str) -> str:
    """LongBench / SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def token_f1(prediction: str, answer: str) -> float:
    """Harmonic mean of precision and recall of the normalised words (bag of words, with multiplicity)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, answer: str) -> float:
    """ROUGE-L F1: longest common subsequence of the (lower-cased) words, as an F-measure."""
    pred, gold = prediction.lower().split(), answer.lower().split()
    lcs = _lcs_length(pred, gold)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(gold)
    return 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, answer: str, all_classes: list[str]) -> float:
    """LongBench's classification accuracy: the classes named in the prediction; 1/n if the right one is
    among n named (a class that is a substring of the right one does not count), 0 if it is not."""
    named = [c for c in all_classes if c in prediction]
    named = [c for c in named if not (c in answer and c != answer)]
    return 1.0 / len(named) if answer in named else 0.0


def edit_similarity(prediction: str, answer: str) -> float:
    """1 - Levenshtein distance / length of the longer string (1.0 = identical), on the first line of code
    that is not a comment (LongBench's code completion post-processing)."""
    lines = [line for line in prediction.lstrip("\n").split("\n") if not line.strip().startswith(("#", "//", "`"))]
    a, b = (lines[0] if lines else ""), answer
    if not a and not b:
        return 1.0
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return 1 - previous[-1] / max(len(a), len(b))
