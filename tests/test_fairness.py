"""`peftkit eval --group-by`'s gaps between groups: hand-computed tables, an end-to-end CLI run on a tiny model
checked against fairlearn itself, and bad input as one error line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from peftkit.cli import main
from peftkit.config.recipe import build_recipe
from peftkit.core import fairness
from peftkit.core.fairness import fairness_report, positive_labels
from peftkit.tasks import make_task
from peftkit.train.training import train
from tests import tiny
from tests.conftest import make_recipe
from tests.test_cli_errors import error_line

fairlearn_metrics = pytest.importorskip("fairlearn.metrics")


def report(task: Any, collected: dict[str, torch.Tensor], groups: list[str], asked: str | None = None) -> dict:
    """``fairness_report`` as ``evaluate_file`` calls it: the head's own metrics per group first."""
    per_group = {}
    for name in sorted(set(groups)):
        index = torch.tensor([i for i, g in enumerate(groups) if g == name])
        per_group[name] = task.metrics({k: v[index] for k, v in collected.items()})
    return fairness_report(task, collected, groups, per_group, positive_labels(task, asked))


def classified(labels: list[int], preds: list[int]) -> dict[str, torch.Tensor]:
    return {"label": torch.tensor(labels), "pred": torch.tensor(preds), "loss": torch.zeros(len(labels))}


def close(found: Any, expected: Any) -> bool:
    """Equal structure, numbers equal to 1e-9 (hand fractions against floats), None where undefined."""
    if isinstance(expected, dict):
        return isinstance(found, dict) and found.keys() == expected.keys() and all(
            close(found[k], v) for k, v in expected.items())
    if expected is None or found is None:
        return found is expected
    return found == pytest.approx(expected, abs=1e-9)


# Three groups of unequal size; group c holds label 0 only, so it has no true-positive rate for label 1.
#   a: truth 1 1 0 0 0, predicted 1 0 0 1 0     b: truth 1 1 0, predicted 1 1 1     c: truth 0 0, predicted 0 1
BINARY = (["a"] * 5 + ["b"] * 3 + ["c"] * 2, [1, 1, 0, 0, 0, 1, 1, 0, 0, 0], [1, 0, 0, 1, 0, 1, 1, 1, 0, 1])


def test_binary_gaps_by_hand():
    groups, labels, preds = BINARY
    task = make_task("classification", {}, {"labels": ["0", "1"]})
    found = report(task, classified(labels, preds), groups)
    # accuracy a 3/5, b 2/3, c 1/2
    assert close(found["per_group"], {"a": {"accuracy": 0.6}, "b": {"accuracy": 2 / 3},
                                      "c": {"accuracy": 0.5}})
    assert found["positive_labels"] == ["1"]
    rates = found["by_label"]["1"]
    # selection rate (predicted 1): a 2/5, b 3/3, c 1/2; TPR (of truth 1, predicted 1): a 1/2, b 2/2, c none;
    # FPR (of truth 0, predicted 1): a 1/3, b 1/1, c 1/2
    assert close(rates["per_group"], {
        "a": {"selection_rate": 0.4, "true_positive_rate": 0.5, "false_positive_rate": 1 / 3},
        "b": {"selection_rate": 1.0, "true_positive_rate": 1.0, "false_positive_rate": 1.0},
        "c": {"selection_rate": 0.5, "true_positive_rate": None, "false_positive_rate": 0.5}})
    # all ten rows: 6 predicted 1, 3 of the 4 positives, 3 of the 6 negatives
    assert close(rates["overall"], {"selection_rate": 0.6, "true_positive_rate": 0.75,
                                    "false_positive_rate": 0.5})
    # accuracy 2/3 - 1/2 and 1/2 / (2/3); selection 1 - 0.4 and 0.4 / 1; TPR over a and b only: 1 - 0.5, 0.5 / 1;
    # FPR 1 - 1/3, (1/3) / 1; equalized odds: the larger TPR/FPR difference, the smaller ratio
    expected = {"accuracy_difference": 1 / 6, "accuracy_ratio": 0.75,
                "demographic_parity_difference": 0.6, "demographic_parity_ratio": 0.4,
                "equalized_odds_difference": 2 / 3, "equalized_odds_ratio": 1 / 3}
    assert close(found["gaps"], expected)
    assert close(rates["gaps"], {k: v for k, v in expected.items() if not k.startswith("accuracy")})
    # fairlearn's own equalized odds counts group c's missing TPR as 0, a gap of 1 made of nothing measured
    assert fairlearn_metrics.equalized_odds_difference(labels, preds, sensitive_features=groups) == 1.0


def test_positive_label_zero_by_hand():
    groups, labels, preds = BINARY
    task = make_task("classification", {}, {"labels": ["0", "1"]})
    rates = report(task, classified(labels, preds), groups, asked="0")["by_label"]["0"]
    # selection rate (predicted 0): a 3/5, b 0/3, c 1/2; TPR (of truth 0, predicted 0): a 2/3, b 0/1, c 1/2;
    # FPR (of truth 1, predicted 0): a 1/2, b 0/2, c none (no truth 1)
    assert close(rates["per_group"], {
        "a": {"selection_rate": 0.6, "true_positive_rate": 2 / 3, "false_positive_rate": 0.5},
        "b": {"selection_rate": 0.0, "true_positive_rate": 0.0, "false_positive_rate": 0.0},
        "c": {"selection_rate": 0.5, "true_positive_rate": 0.5, "false_positive_rate": None}})
    assert close(rates["gaps"], {"demographic_parity_difference": 0.6, "demographic_parity_ratio": 0.0,
                                 "equalized_odds_difference": 2 / 3, "equalized_odds_ratio": 0.0})


def test_multi_class_one_vs_rest_by_hand():
    # g1: truth A A B C, predicted A B B C     g2: truth A C C, predicted C C A (no B at all)
    groups = ["g1"] * 4 + ["g2"] * 3
    task = make_task("classification", {}, {"labels": ["A", "B", "C"]})
    found = report(task, classified([0, 0, 1, 2, 0, 2, 2], [0, 1, 1, 2, 2, 2, 0]), groups)
    assert found["positive_labels"] == ["A", "B", "C"]
    by = {label: entry["gaps"] for label, entry in found["by_label"].items()}
    # A: selection 1/4 vs 1/3; TPR 1/2 vs 0; FPR 0 vs 1/2
    assert close(by["A"], {"demographic_parity_difference": 1 / 12, "demographic_parity_ratio": 0.75,
                           "equalized_odds_difference": 0.5, "equalized_odds_ratio": 0.0})
    # B: selection 2/4 vs 0; TPR defined in g1 only: no equalized odds; FPR 1/3 vs 0
    assert close(by["B"], {"demographic_parity_difference": 0.5, "demographic_parity_ratio": 0.0,
                           "equalized_odds_difference": None, "equalized_odds_ratio": None})
    # C: selection 1/4 vs 2/3; TPR 1 vs 1/2; FPR 0 vs 1
    assert close(by["C"], {"demographic_parity_difference": 5 / 12, "demographic_parity_ratio": 0.375,
                           "equalized_odds_difference": 1.0, "equalized_odds_ratio": 0.0})
    # headline: accuracy 3/4 vs 1/3, then the largest difference and smallest ratio over the labels that have one
    assert close(found["gaps"], {"accuracy_difference": 5 / 12, "accuracy_ratio": 4 / 9,
                                 "demographic_parity_difference": 0.5, "demographic_parity_ratio": 0.0,
                                 "equalized_odds_difference": 1.0, "equalized_odds_ratio": 0.0})
    only_c = report(task, classified([0, 0, 1, 2, 0, 2, 2], [0, 1, 1, 2, 2, 2, 0]), groups, asked="C")
    assert list(only_c["by_label"]) == ["C"] and close(only_c["gaps"]["demographic_parity_difference"], 5 / 12)


def test_multi_label_per_label_by_hand_and_its_plot(tmp_path: Path):
    # u: truth {pos} {neg} {neg,pos}, predicted {pos} {} {neg,pos}     v: truth {pos} {pos}, predicted {neg,pos} {pos}
    groups = ["u"] * 3 + ["v"] * 2
    truth, predicted = [[0, 1], [1, 0], [1, 1], [0, 1], [0, 1]], [[0, 1], [0, 0], [1, 1], [1, 1], [0, 1]]
    task = make_task("multi_label", {}, {"labels": ["neg", "pos"]})
    collected = {"label": torch.tensor(truth), "pred": torch.tensor(predicted), "loss": torch.zeros(5)}
    found = report(task, collected, groups)
    assert found["positive_labels"] == ["neg", "pos"] and "per_group" not in found
    # neg: selection 1/3 vs 1/2; TPR 1/2 in u, none in v (no neg there); FPR 0 vs 1/2
    assert close(found["by_label"]["neg"]["gaps"], {
        "demographic_parity_difference": 1 / 6, "demographic_parity_ratio": 2 / 3,
        "equalized_odds_difference": None, "equalized_odds_ratio": None})
    # pos: selection 2/3 vs 1; TPR 1 vs 1; FPR 0 in u, none in v (every v row is pos)
    assert close(found["by_label"]["pos"]["per_group"], {
        "u": {"selection_rate": 2 / 3, "true_positive_rate": 1.0, "false_positive_rate": 0.0},
        "v": {"selection_rate": 1.0, "true_positive_rate": 1.0, "false_positive_rate": None}})
    # micro F1 (decisions pooled, 2 tp / (2 tp + fp + fn)): u 6/7, v 4/5
    assert close(found["gaps"], {"micro_f1_difference": 6 / 7 - 4 / 5, "micro_f1_ratio": 14 / 15,
                                 "demographic_parity_difference": 1 / 3, "demographic_parity_ratio": 2 / 3,
                                 "equalized_odds_difference": None, "equalized_odds_ratio": None})
    from peftkit.core.fairness_plot import _panels, plot_groups

    per_group = {g: {"rows": 3 if g == "u" else 2, **task.metrics(
        {k: v[torch.tensor([i for i, x in enumerate(groups) if x == g])] for k, v in collected.items()})}
        for g in ("u", "v")}
    result = {"groups": per_group, "metrics": task.metrics(collected), "fairness": {"group_by": "g", **found}}
    # one panel of the key metric, then one per label with its three rates
    assert [(title, list(series)) for title, series, _ in _panels(result, "micro_f1")] == [
        ("micro_f1", ["micro_f1"]),
        ("label neg (one-vs-rest)", ["selection_rate", "true_positive_rate", "false_positive_rate"]),
        ("label pos (one-vs-rest)", ["selection_rate", "true_positive_rate", "false_positive_rate"])]
    png = plot_groups(result, "micro_f1", str(tmp_path / "ml.png"), "multi-label")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_regression_gaps_by_hand():
    # x: predictions on a line through the targets (r 1, MAE 1/3); y: a constant prediction (r undefined: 0 as
    # peftkit scores it, MAE 1); z: the targets reversed (r -1, MAE 2)
    groups = ["x"] * 3 + ["y"] * 2 + ["z"] * 4
    target = [1.0, 2.0, 3.0, 0.0, 2.0, 0.0, 1.0, 2.0, 3.0]
    pred = [1.5, 2.0, 2.5, 1.0, 1.0, 3.0, 2.0, 1.0, 0.0]
    task = make_task("regression", {}, {"mean": 1.5, "std": 1.0})
    collected = {"target": torch.tensor(target), "pred": torch.tensor(pred), "loss": torch.zeros(9)}
    found = report(task, collected, groups)
    assert close(found["per_group"], {"x": {"mae": 1 / 3, "pearson": 1.0}, "y": {"mae": 1.0, "pearson": 0.0},
                                      "z": {"mae": 2.0, "pearson": -1.0}})
    # a ratio of correlations, one of them negative, means nothing: None
    assert close(found["gaps"], {"pearson_difference": 2.0, "pearson_ratio": None,
                                 "mae_difference": 5 / 3, "mae_ratio": 1 / 6})
    with pytest.raises(Exception, match="a regression adapter has no class labels"):
        positive_labels(task, "1")


def test_heads_without_class_decisions_and_without_fairlearn(monkeypatch: pytest.MonkeyPatch):
    task = make_task("causal_lm", {}, {})
    per_group = {"long": {"loss": 2.0, "perplexity": 8.0}, "short": {"loss": 1.0, "perplexity": 2.0}}
    found = fairness_report(task, {}, ["long", "short"], per_group, [])
    assert found["gaps"] == {"perplexity_difference": 6.0, "perplexity_ratio": 0.25}
    assert found["note"] == ("demographic parity and equalized odds need a class decision per row, which a "
                             "causal_lm head does not make; its gaps are those of perplexity")
    # without fairlearn: the key metric's gap (no fairlearn needed), the rest named with the install line
    monkeypatch.setattr(fairness, "_fairlearn", lambda: None)
    groups, labels, preds = BINARY
    cls = make_task("classification", {}, {"labels": ["0", "1"]})
    bare = report(cls, classified(labels, preds), groups)
    assert bare == {"computed_with": None, "gaps": {"accuracy_difference": pytest.approx(1 / 6),
                                                    "accuracy_ratio": 0.75},
                    "note": 'demographic parity and equalized odds need fairlearn: pip install "peftkit[fairness]"'}


# ---- end to end on a tiny trained model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A tiny classifier (6 steps) and its dev rows with a derived group: character length below/above median.

    On the tiny Llama: the tiny BERT gives every row the same probability until about 100 steps, and predictions
    that are all one class make every selection-rate gap 0, which any code would report."""
    out = tmp_path_factory.mktemp("fair")
    recipe = make_recipe(tiny_dir, out, base={"model": str(tiny_dir / "llama")},
                         train={"max_steps": 6, "eval_at_start": False})
    result = train(build_recipe(recipe), echo=lambda line: None)
    rows = tiny.sentiment_rows(64, seed=2)
    median = sorted(len(r["sentence"]) for r in rows)[len(rows) // 2]
    banded = [{**r, "band": "short" if len(r["sentence"]) < median else "long"} for r in rows]
    return str(result.adapter_dir.parent), tiny.write_tsv(out / "dev_bands.tsv", banded)


def invoke(*args: Any):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_report_matches_fairlearn_and_draws_a_png(trained: tuple[str, Path], tmp_path: Path):
    registry, data = trained
    png = tmp_path / "groups.png"
    run = invoke("eval", "tiny", "--data", data, "--group-by", "band", "--json", "--plot", png,
                 "--registry", registry)
    assert run.exit_code == 0, run.output
    assert run.stderr == f"wrote {png}\n"
    result = json.loads(run.stdout)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    predicted = invoke("predict", "--adapter", "tiny", "--input", data, "--registry", registry)
    assert predicted.exit_code == 0, predicted.output
    preds = [int(json.loads(line)["label"]) for line in predicted.stdout.splitlines()]
    rows = [line.split("\t") for line in data.read_text().splitlines()[1:]]
    labels, bands = [int(r[1]) for r in rows], [r[2] for r in rows]
    assert len(preds) == len(labels) == result["rows"] == 64
    assert 0 < sum(preds) < len(preds), "the model predicts one class only: every gap below would be 0"
    # every band has both labels, so fairlearn's rates are all defined and its gaps are the report's
    assert all({y for y, b in zip(labels, bands) if b == band} == {0, 1} for band in set(bands))
    frame = fairlearn_metrics.MetricFrame(
        metrics={"selection_rate": fairlearn_metrics.selection_rate,
                 "true_positive_rate": fairlearn_metrics.true_positive_rate,
                 "false_positive_rate": fairlearn_metrics.false_positive_rate},
        y_true=labels, y_pred=preds, sensitive_features=bands)
    fair = result["fairness"]
    assert fair["group_by"] == "band" and fair["positive_labels"] == ["1"]
    assert close(fair["by_label"]["1"]["per_group"], {band: dict(row) for band, row in frame.by_group.iterrows()})
    accuracy = fairlearn_metrics.MetricFrame(metrics=lambda t, p: sum(a == b for a, b in zip(t, p)) / len(t),
                                             y_true=labels, y_pred=preds, sensitive_features=bands)
    kwargs = {"sensitive_features": bands}
    assert close(fair["gaps"], {
        "accuracy_difference": accuracy.difference(), "accuracy_ratio": accuracy.ratio(),
        "demographic_parity_difference": fairlearn_metrics.demographic_parity_difference(labels, preds, **kwargs),
        "demographic_parity_ratio": fairlearn_metrics.demographic_parity_ratio(labels, preds, **kwargs),
        "equalized_odds_difference": fairlearn_metrics.equalized_odds_difference(labels, preds, **kwargs),
        "equalized_odds_ratio": fairlearn_metrics.equalized_odds_ratio(labels, preds, **kwargs)})
    assert all(v > 0.01 for k, v in fair["gaps"].items() if k.endswith("_difference")), fair["gaps"]
    # the head's own per-group accuracy agrees with fairlearn's, and the older largest_gap key is kept
    assert {g: m["accuracy"] for g, m in result["groups"].items()} == pytest.approx(
        {g: m["accuracy"] for g, m in fair["per_group"].items()})
    assert close(result["largest_gap"]["value"], fair["gaps"]["accuracy_difference"])

    text = invoke("eval", "tiny", "--data", data, "--group-by", "band", "--registry", registry)
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    gaps = fair["gaps"]
    assert (f"  demographic parity: difference {gaps['demographic_parity_difference']:.4f}, "
            f"ratio {gaps['demographic_parity_ratio']:.4f}") in lines
    assert lines[lines.index("gaps between band groups (fairlearn " + fair["computed_with"].split()[1]
                             + "), positive label 1:") + 1].startswith("  accuracy: difference ")


def test_bad_input_is_one_line(trained: tuple[str, Path], tmp_path: Path):
    registry, data = trained
    args = ("eval", "tiny", "--data", data, "--registry", registry)
    assert error_line(*args, "--group-by", "bnad") == (
        f"Error: --group-by: {data} has no column 'bnad' (its columns: sentence, label, band)")
    one = tmp_path / "one_group.tsv"
    one.write_text("\n".join(line + "\tall" if i else line + "\tsource"
                             for i, line in enumerate(data.read_text().splitlines()[:9])) + "\n")
    assert error_line("eval", "tiny", "--data", one, "--registry", registry, "--group-by", "source") == (
        f"Error: --group-by: column 'source' of {one} holds one group only ('all'); gaps need at least two groups: "
        "pick a column with several values")
    assert error_line(*args, "--group-by", "band", "--positive-label", "positive") == (
        "Error: --positive-label: 'positive' is not a label of this adapter (its labels: 0, 1); pass one of them")
    assert error_line(*args, "--positive-label", "1") == (
        "Error: --positive-label: only used with --group-by COLUMN; add --group-by or leave it out")
    assert error_line(*args, "--plot", tmp_path / "x.png") == (
        "Error: --plot: draws the groups of --group-by COLUMN; add --group-by or leave --plot out")
    assert error_line(*args, "--group-by", "band", "--plot", tmp_path / "no" / "x.png") == (
        f"Error: --plot: folder {tmp_path / 'no'} does not exist; create it or pick another path")
