"""Gaps between groups: how far apart a model's metrics lie across the values of a group column.

``peftkit eval --group-by COLUMN`` reports the head's metrics per group (``evaluation.py``); this module adds
the gaps, with fairlearn's ``MetricFrame`` (an optional extra: ``pip install "peftkit[fairness]"``). For a
metric ``m`` measured on each group ``g``'s rows (fairlearn's ``between_groups`` method)::

    difference = max_g m_g - min_g m_g          ratio = min_g m_g / max_g m_g

Classification (and multi-label, one decision per label) is read one label at a time, one-vs-rest: for a label
``k``, the selection rate is the share of a group's rows predicted ``k``, the true-positive rate (TPR) the share
of its rows labelled ``k`` that are predicted ``k``, the false-positive rate (FPR) the share of its other rows
predicted ``k``. Demographic parity compares selection rates; equalized odds is the larger of the TPR and FPR
differences (ratio: the smaller of their ratios), as fairlearn's ``equalized_odds_difference`` with
``agg="worst_case"``. On a binary task that is the positive label's (``--positive-label``, default the second
label in the adapter's order: ``1`` of 0/1 labels); on more labels every label's (or the one
``--positive-label`` names), the headline gap being the largest difference (smallest ratio) over them.

A rate with nothing to measure is undefined, not 0: a group without rows labelled ``k`` has no TPR, one with
only such rows no FPR. Such a group is left out of that rate's gap (fairlearn's own ``true_positive_rate``
returns 0 there, which would turn "no positive rows" into the largest gap), and a gap with fewer than two
groups to compare, or a ratio over a largest value of 0, is None.

Regression: per group MAE and Pearson's r, both differences, and MAE's ratio (r can be negative, where a ratio
means nothing). Other heads (causal LM perplexity, token tagging, multi-task) make no single decision per row
to take rates of: their gaps are those of their key metric, from the head's own per-group metrics, which need
no fairlearn.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

from ..errors import PeftkitError

FAIRNESS_EXTRA = 'pip install "peftkit[fairness]"'
NEEDS_FAIRLEARN = f"demographic parity and equalized odds need fairlearn: {FAIRNESS_EXTRA}"
_RATED = ("classification", "multi_label")  # heads with one class decision per row (per label)


def gap(values: Sequence[Optional[float]]) -> dict[str, Optional[float]]:
    """``{"difference", "ratio"}`` over the defined values (None where fewer than two are, or max is 0)."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    if len(kept) < 2:
        return {"difference": None, "ratio": None}
    high, low = max(kept), min(kept)
    return {"difference": high - low, "ratio": low / high if high > 0 else None}


def key_metric_gaps(task: Any, per_group: dict[str, dict[str, float]]) -> dict[str, Optional[float]]:
    """The head's key metric's difference and ratio between groups, from its own per-group metrics."""
    key = task.key_metric[0]
    found = gap([m.get(key) for m in per_group.values()])
    # a ratio of correlations or of log-likelihoods below 0 means nothing
    ratio = found["ratio"] if all(m.get(key, 0) >= 0 for m in per_group.values()) else None
    return {f"{key}_difference": found["difference"], f"{key}_ratio": ratio}


def positive_labels(task: Any, asked: Optional[str]) -> list[int]:
    """Label ids whose one-vs-rest rates are reported; ``asked`` may be the data's label or its shown name."""
    if task.name not in _RATED:
        if asked is not None:
            raise PeftkitError(f"--positive-label: a {task.name} adapter has no class labels to call positive; "
                               "leave the option out")
        return []
    raw, shown = list(task.labels), task.output_labels()
    if asked is None:
        # binary: the second label (1 of 0/1, the later of two sorted names); more labels: each one-vs-rest
        return [1] if task.name == "classification" and len(raw) == 2 else list(range(len(raw)))
    for i, (label, name) in enumerate(zip(raw, shown)):
        if asked in (label, name):
            return [i]
    raise PeftkitError(f"--positive-label: {asked!r} is not a label of this adapter (its labels: "
                       f"{', '.join(shown)}); pass one of them")


def _fairlearn() -> Any:
    try:
        import fairlearn
        from fairlearn.metrics import MetricFrame
    except ImportError:
        return None
    return fairlearn, MetricFrame


def _rate(of: int, predicted: int) -> Callable[[Any, Any], float]:
    """Share of the rows whose truth is ``of`` that are predicted ``predicted`` (NaN when there are none)."""
    def rate(y_true: Any, y_pred: Any) -> float:
        chosen = y_true == of
        return float((y_pred[chosen] == predicted).mean()) if chosen.any() else math.nan

    return rate


def _selection_rate(y_true: Any, y_pred: Any) -> float:
    return float((y_pred == 1).mean())


def _frame(MetricFrame: Any, metrics: dict[str, Callable[..., float]], y_true: Any, y_pred: Any, groups: Any
           ) -> tuple[dict[str, dict[str, Optional[float]]], dict[str, Optional[float]], dict[str, dict]]:
    """Per group, overall, and per metric ``{"difference", "ratio"}`` (None where undefined), from MetricFrame."""
    frame = MetricFrame(metrics=metrics, y_true=y_true, y_pred=y_pred, sensitive_features=groups)
    clean = lambda v: None if v is None or math.isnan(float(v)) else float(v)  # noqa: E731
    per_group = {str(g): {k: clean(v) for k, v in row.items()} for g, row in frame.by_group.iterrows()}
    overall = {k: clean(v) for k, v in frame.overall.items()}
    difference, ratio = frame.difference(), frame.ratio()
    gaps = {}
    for name in metrics:
        defined = sum(row[name] is not None for row in per_group.values())
        gaps[name] = {"difference": clean(difference[name]) if defined >= 2 else None,
                      "ratio": clean(ratio[name]) if defined >= 2 else None}
    return per_group, overall, gaps


def _one_vs_rest(MetricFrame: Any, y_true: Any, y_pred: Any, groups: Any) -> dict[str, Any]:
    """Selection rate, TPR and FPR per group of one binary decision, with demographic parity and equalized odds."""
    metrics = {"selection_rate": _selection_rate, "true_positive_rate": _rate(1, 1), "false_positive_rate": _rate(0, 1)}
    per_group, overall, gaps = _frame(MetricFrame, metrics, y_true, y_pred, groups)
    tpr, fpr = gaps["true_positive_rate"], gaps["false_positive_rate"]
    both = [tpr, fpr]
    return {"per_group": per_group, "overall": overall, "gaps": {
        "demographic_parity_difference": gaps["selection_rate"]["difference"],
        "demographic_parity_ratio": gaps["selection_rate"]["ratio"],
        # worst case of the two rates, as fairlearn's equalized_odds_difference; None if either is undefined
        "equalized_odds_difference": None if any(g["difference"] is None for g in both)
        else max(g["difference"] for g in both),
        "equalized_odds_ratio": None if any(g["ratio"] is None for g in both) else min(g["ratio"] for g in both),
    }}


def _worst(by_label: dict[str, dict[str, Any]]) -> dict[str, Optional[float]]:
    """Over the labels: the largest difference and the smallest ratio of each gap. A label whose gap is undefined
    (None) has nothing to add, as a group without a rate adds nothing to that rate's gap; None if no label has one."""
    out: dict[str, Optional[float]] = {}
    for key in next(iter(by_label.values()))["gaps"]:
        values = [entry["gaps"][key] for entry in by_label.values() if entry["gaps"][key] is not None]
        pick = min if key.endswith("_ratio") else max
        out[key] = pick(values) if values else None
    return out


def fairness_report(task: Any, collected: dict[str, Any], groups: list[str], per_group: dict[str, dict[str, float]],
                    positive: list[int]) -> dict[str, Any]:
    """The gaps between ``groups`` (one per row of ``collected``); see the module's docstring for each one."""
    gaps: dict[str, Any] = key_metric_gaps(task, per_group)
    report: dict[str, Any] = {"computed_with": None, "gaps": gaps}
    if task.name not in _RATED and task.name != "regression":
        report["note"] = (f"demographic parity and equalized odds need a class decision per row, which a "
                          f"{task.name} head does not make; its gaps are those of {task.key_metric[0]}")
        return report
    found = _fairlearn()
    if found is None:
        report["note"] = NEEDS_FAIRLEARN
        return report
    import numpy as np

    fairlearn, MetricFrame = found
    report["computed_with"] = f"fairlearn {fairlearn.__version__}"
    groups_array = np.asarray(groups)
    if task.name == "regression":
        from sklearn.metrics import mean_absolute_error

        from ..metrics import pearson

        metrics = {"mae": mean_absolute_error, "pearson": lambda t, p: pearson(list(p), list(t))}
        y_true, y_pred = collected["target"].double().numpy(), collected["pred"].double().numpy()
        report["per_group"], report["overall"], found_gaps = _frame(MetricFrame, metrics, y_true, y_pred,
                                                                    groups_array)
        gaps.update(mae_difference=found_gaps["mae"]["difference"], mae_ratio=found_gaps["mae"]["ratio"],
                    pearson_difference=found_gaps["pearson"]["difference"])
        return report
    y_true, y_pred = collected["label"].numpy(), collected["pred"].numpy()
    shown = task.output_labels()
    if task.name == "classification":
        from sklearn.metrics import accuracy_score

        report["per_group"], report["overall"], found_gaps = _frame(
            MetricFrame, {"accuracy": accuracy_score}, y_true, y_pred, groups_array)
        gaps.update(accuracy_difference=found_gaps["accuracy"]["difference"],
                    accuracy_ratio=found_gaps["accuracy"]["ratio"])
        decisions = {shown[k]: ((y_true == k).astype(int), (y_pred == k).astype(int)) for k in positive}
    else:  # multi-label: each label's column is its own yes/no decision
        decisions = {shown[k]: (y_true[:, k], y_pred[:, k]) for k in positive}
    report["positive_labels"] = list(decisions)
    report["by_label"] = {name: _one_vs_rest(MetricFrame, t, p, groups_array) for name, (t, p) in decisions.items()}
    gaps.update(_worst(report["by_label"]))
    return report
