"""Classification scores from predicted and true label ids: pure Python, no dependency.

The one place these are computed: peftkit's classification head reports them, and the hand-written peer
(``benchmarks/baseline_hf.py``) imports :func:`classification_scores`, so both tools score rows identically.
"""

from __future__ import annotations

import math
from typing import Sequence


def confusion(preds: Sequence[int], labels: Sequence[int], num_labels: int) -> list[list[int]]:
    """``C[i][j]``: rows whose true label is ``i`` and predicted label ``j``."""
    matrix = [[0] * num_labels for _ in range(num_labels)]
    for p, y in zip(preds, labels):
        matrix[y][p] += 1
    return matrix


def macro_f1(preds: Sequence[int], labels: Sequence[int], num_labels: int) -> float:
    """Mean over classes of ``2 tp / (2 tp + fp + fn)``; a class absent from both predictions and labels does
    not count (0.0 when no class counts)."""
    matrix = confusion(preds, labels, num_labels)
    scores = []
    for k in range(num_labels):
        tp = matrix[k][k]
        fn = sum(matrix[k]) - tp
        fp = sum(row[k] for row in matrix) - tp
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def matthews(preds: Sequence[int], labels: Sequence[int], num_labels: int) -> float:
    """Matthews correlation coefficient for K classes: Gorodkin's R_K (Comput. Biol. Chem. 28, 2004), from the
    confusion matrix C with s rows in all, c = trace(C) correct, t_k rows truly of class k and p_k predicted k:

        R_K = (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))

    For two classes this is the usual (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)). Undefined when
    every prediction, or every label, is one class (a factor under the root is 0): 0.0 then, as for a model no
    better than chance.
    """
    matrix = confusion(preds, labels, num_labels)
    s = sum(map(sum, matrix))
    c = sum(matrix[k][k] for k in range(num_labels))
    t = [sum(row) for row in matrix]
    p = [sum(row[k] for row in matrix) for k in range(num_labels)]
    denominator = (s * s - sum(x * x for x in p)) * (s * s - sum(x * x for x in t))
    if denominator == 0:
        return 0.0
    return (c * s - sum(pk * tk for pk, tk in zip(p, t))) / math.sqrt(denominator)


def classification_scores(preds: Sequence[int], labels: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy, macro F1 and Matthews correlation of ``preds`` against ``labels`` (label ids 0..num_labels-1)."""
    correct = sum(int(p == y) for p, y in zip(preds, labels))
    return {"accuracy": correct / max(len(labels), 1), "macro_f1": macro_f1(preds, labels, num_labels),
            "matthews": matthews(preds, labels, num_labels)}
