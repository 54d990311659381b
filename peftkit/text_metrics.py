"""Scores of generated text against a reference: exact match and ROUGE-L, pure Python, no dependency.

Both compare whitespace tokens after stripping, case kept (a model that writes "Paris" for "paris" is not exact).
ROUGE-L (Lin, 2004) of a prediction ``p`` (``m`` tokens) against a reference ``r`` (``n`` tokens), from the length
``L`` of their longest common subsequence::

    precision = L / m,   recall = L / n,   F1 = 2 precision recall / (precision + recall)

reported as F1 (the ``rouge_score`` package's ``rougeL`` fmeasure, without its stemming and its lower-casing and
punctuation-stripping tokenizer). Two empty texts match (F1 1.0); one empty text against a non-empty one scores 0.
"""

from __future__ import annotations

from typing import Sequence


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic programming, one row of memory)."""
    if len(b) > len(a):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference`` on whitespace tokens."""
    p, r = prediction.split(), reference.split()
    if not p and not r:
        return 1.0
    common = lcs_length(p, r)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two texts have the same whitespace tokens, else 0.0."""
    return float(prediction.split() == reference.split())


def generation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match and ROUGE-L F1 over pairs of texts (0.0 each for no pairs)."""
    n = len(predictions)
    if n == 0:
        return {"exact_match": 0.0, "rougeL": 0.0}
    return {"exact_match": sum(map(exact_match, predictions, references)) / n,
            "rougeL": sum(map(rouge_l, predictions, references)) / n}
