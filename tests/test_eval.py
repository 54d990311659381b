"""`peftkit eval`: the task's metrics on any labelled file, per group with the largest gap; the metrics' maths."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from peftkit.cli import main
from peftkit.config.recipe import build_recipe
from peftkit.metrics import classification_scores, confusion, macro_f1, matthews
from peftkit.train.training import train
from tests import tiny


def test_eval_matches_training_metrics_and_groups(recipe_for, tiny_dir, tmp_path):
    result = train(build_recipe(recipe_for(train={"max_steps": 6, "eval_at_start": False})), echo=lambda l: None)
    registry = str(result.adapter_dir.parent)
    rows = [{**r, "group": "a" if i % 4 else "b"} for i, r in enumerate(tiny.sentiment_rows(64, seed=2))]
    data = tiny.write_tsv(tmp_path / "dev_groups.tsv", rows)  # the eval rows of training, plus a group column

    out = CliRunner().invoke(main, ["eval", "tiny", "--data", str(data), "--group-by", "group", "--json",
                                    "--registry", registry])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["rows"] == 64
    assert set(report["metrics"]) == {"accuracy", "macro_f1", "matthews", "loss"}
    assert abs(report["metrics"]["accuracy"] - result.metrics["accuracy"]) < 1e-9
    groups = report["groups"]
    assert set(groups) == {"a", "b"} and groups["a"]["rows"] == 48 and groups["b"]["rows"] == 16
    overall = (groups["a"]["accuracy"] * 48 + groups["b"]["accuracy"] * 16) / 64
    assert abs(overall - report["metrics"]["accuracy"]) < 1e-9
    gap = abs(groups["a"]["accuracy"] - groups["b"]["accuracy"])
    assert report["largest_gap"] == {"metric": "accuracy", "value": gap}

    text = CliRunner().invoke(main, ["eval", "tiny", "--data", str(data), "--group-by", "grp",
                                     "--registry", registry])
    assert text.exit_code != 0
    assert text.output.strip() == (f"Error: --group-by: {data} has no column 'grp' "
                                   "(its columns: sentence, label, group)")
    missing = CliRunner().invoke(main, ["eval", "tinny", "--data", str(data), "--registry", registry])
    assert missing.output.strip() == f"Error: no adapter named 'tinny' in {registry}/; did you mean tiny?"


def from_confusion(matrix: list[list[int]]) -> tuple[list[int], list[int]]:
    """(predictions, labels) whose confusion matrix is ``matrix`` (rows: true label, columns: predicted)."""
    preds, labels = [], []
    for y, row in enumerate(matrix):
        for p, count in enumerate(row):
            preds += [p] * count
            labels += [y] * count
    return preds, labels


def test_matthews_binary_against_the_two_class_formula() -> None:
    # tp 3, fn 2, fp 1, tn 4: (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = 10 / sqrt(4 * 5 * 5 * 6)
    preds, labels = from_confusion([[4, 1], [2, 3]])
    assert confusion(preds, labels, 2) == [[4, 1], [2, 3]]
    assert matthews(preds, labels, 2) == pytest.approx(10 / math.sqrt(600))
    assert matthews(labels, labels, 2) == 1.0
    assert matthews([1 - y for y in labels], labels, 2) == -1.0


def test_matthews_three_classes_by_gorodkins_formula() -> None:
    # s = 13 rows, c = 3 + 2 + 4 = 9 correct, true counts t = (4, 4, 5), predicted p = (4, 3, 6):
    # (c s - sum p t) / sqrt((s^2 - sum p^2)(s^2 - sum t^2)) = (117 - 58) / sqrt((169 - 61)(169 - 57))
    matrix = [[3, 1, 0], [0, 2, 2], [1, 0, 4]]
    preds, labels = from_confusion(matrix)
    scores = classification_scores(preds, labels, 3)
    assert scores["matthews"] == pytest.approx(59 / math.sqrt(108 * 112))
    assert scores["accuracy"] == pytest.approx(9 / 13)
    # F1 per class 2 tp / (2 tp + fp + fn): 6 / (6 + 1 + 1), 4 / (4 + 1 + 2), 8 / (8 + 2 + 1)
    assert scores["macro_f1"] == pytest.approx((6 / 8 + 4 / 7 + 8 / 11) / 3)
    assert macro_f1(preds, labels, 3) == scores["macro_f1"]


@pytest.mark.parametrize("preds, labels", [
    ([1, 1, 1, 1], [0, 1, 0, 1]),  # every prediction one class
    ([0, 1, 1, 0], [1, 1, 1, 1]),  # every label one class
    ([], []),
])
def test_matthews_is_zero_where_undefined(preds: list[int], labels: list[int]) -> None:
    assert matthews(preds, labels, 3) == 0.0
