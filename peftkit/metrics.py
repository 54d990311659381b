"""Task scores from predictions and truth: pure Python, no dependency.

The one place these are computed: peftkit's task heads report them, and the hand-written peer
(``benchmarks/baseline_hf.py``) imports the same functions, so both tools score rows identically.
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


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given the mean of the ranks they span (as scipy.stats.rankdata's "average")."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson's r; 0.0 when either side is constant (undefined), as for a model no better than chance."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def regression_scores(preds: Sequence[float], targets: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation (Pearson of the average ranks, as scipy.stats.spearmanr), mean squared
    and mean absolute error. Written here, a dozen lines, rather than adding scipy as a dependency for two
    functions; ``tests/test_regression.py`` pins them against scipy.stats where scipy is installed."""
    n = max(len(targets), 1)
    return {"pearson": pearson(preds, targets), "spearman": pearson(_ranks(preds), _ranks(targets)),
            "mse": sum((p - t) ** 2 for p, t in zip(preds, targets)) / n,
            "mae": sum(abs(p - t) for p, t in zip(preds, targets)) / n}


def multilabel_scores(predicted: Sequence[Sequence[int]], actual: Sequence[Sequence[int]]) -> dict[str, float]:
    """Scores of 0/1 label sets (one row per example, one column per label): micro F1 (every decision pooled),
    macro F1 (the mean over labels that occur in predictions or truth), subset accuracy (rows whose whole set is
    right) and Hamming accuracy (decisions that are right)."""
    width = len(actual[0]) if actual else 0
    tp = [0] * width
    fp = [0] * width
    fn = [0] * width
    exact = right = 0
    for p_row, y_row in zip(predicted, actual):
        exact += int(list(p_row) == list(y_row))
        for k, (p, y) in enumerate(zip(p_row, y_row)):
            right += int(p == y)
            tp[k] += p and y
            fp[k] += p and not y
            fn[k] += y and not p
    pooled = 2 * sum(tp) + sum(fp) + sum(fn)
    per_label = [2 * tp[k] / (2 * tp[k] + fp[k] + fn[k]) for k in range(width) if tp[k] + fp[k] + fn[k]]
    rows = max(len(actual), 1)
    return {"micro_f1": 2 * sum(tp) / pooled if pooled else 0.0,
            "macro_f1": sum(per_label) / len(per_label) if per_label else 0.0,
            "subset_accuracy": exact / rows, "hamming_accuracy": right / max(rows * width, 1)}
