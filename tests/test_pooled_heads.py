"""Regression and multi-label heads: their metrics, targets, errors, start, and serving next to a classifier.

The training invariants (loss falls, adapter moves, only adapter and head change, reload reproduces) run for
both heads in ``test_training.py``; this file pins what is their own.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from peftkit.config.recipe import build_recipe
from peftkit.errors import PeftkitError
from peftkit.metrics import multilabel_scores, regression_scores
from peftkit.serve.serving import load_server
from peftkit.store.loading import load_trained
from peftkit.store.registry import Registry
from peftkit.tasks import make_task
from peftkit.train.training import train
from tests import tiny
from tests.conftest import make_recipe, write_recipe

QUIET = {"echo": lambda line: None}


# ---- metrics ------------------------------------------------------------------------------------------------

def test_regression_scores_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(3)
    targets = [round(rng.uniform(0, 5), 1) for _ in range(200)]  # rounded: many ties, as STS-B's scores
    preds = [t + rng.gauss(0, 1.5) if i % 7 else 2.5 for i, t in enumerate(targets)]
    preds[:20] = [3.0] * 20  # tied predictions too
    got = regression_scores(preds, targets)
    assert got["pearson"] == pytest.approx(stats.pearsonr(preds, targets)[0], abs=1e-12)
    assert got["spearman"] == pytest.approx(stats.spearmanr(preds, targets)[0], abs=1e-12)
    assert got["mse"] == pytest.approx(sum((p - t) ** 2 for p, t in zip(preds, targets)) / 200)
    assert got["mae"] == pytest.approx(sum(abs(p - t) for p, t in zip(preds, targets)) / 200)


def test_regression_scores_of_a_constant_prediction_are_zero_not_nan():
    scores = regression_scores([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert scores["pearson"] == 0.0 and scores["spearman"] == 0.0 and scores["mse"] == pytest.approx(2 / 3)


def test_multilabel_scores_against_hand_computed_values():
    # labels a, b, c; row 1 exact, row 2 one false positive (b), row 3 one miss (a), row 4 nothing either way
    predicted = [[1, 0, 1], [1, 1, 0], [0, 0, 1], [0, 0, 0]]
    actual = [[1, 0, 1], [1, 0, 0], [1, 0, 1], [0, 0, 0]]
    got = multilabel_scores(predicted, actual)
    # pooled: tp 4, fp 1, fn 1 -> 8 / 10; per label: a 2*2/(4+1)=0.8, b 0 (fp only), c 1.0 -> mean 0.6
    assert got == pytest.approx({"micro_f1": 0.8, "macro_f1": 0.6, "subset_accuracy": 0.5,
                                 "hamming_accuracy": 10 / 12})


# ---- targets and errors ------------------------------------------------------------------------------------

def test_multi_label_cells_as_text_or_lists_and_empty_rows():
    task = make_task("multi_label", {"separator": ";"})
    task.fit({"label": ["b; a", ["c"], None, ""]}, None, "data.eval")
    assert task.labels == ["a", "b", "c"]
    assert [task.target(cell) for cell in ("a;c", ["b"], None, "")] == [[1, 0, 1], [0, 1, 0], [0, 0, 0], [0, 0, 0]]
    fixed = make_task("multi_label", {"labels": ["z", "a"]})
    fixed.fit({"label": ["a"]}, None, "data.eval")
    assert fixed.output_labels() == ["z", "a"]  # the order asked for, not sorted


@pytest.mark.parametrize(("task_type", "options", "train", "eval_", "message"), [
    ("regression", {}, ["1.0", "x"], None, r"^data.train: row 2 has 'x' as its target, which is not a finite number"),
    ("regression", {}, [1.0, 2.0], ["nan"], r"^data.eval: row 1 has 'nan' as its target"),
    ("regression", {}, [3.0, 3.0], None, r"^data.train: every target is 3; regression needs targets that vary$"),
    ("multi_label", {"labels": ["a"]}, ["a,b"], None, r"^data.train: label 'b' is not in task.labels"),
    ("multi_label", {}, ["a"], ["a,q"], r"^data.eval: row 1 has label 'q', which the training data does not have"),
    ("multi_label", {}, ["", None], None, r"^data.train: no row has a label"),
])
def test_bad_targets_are_one_line_errors(task_type, options, train, eval_, message):
    task = make_task(task_type, options)
    with pytest.raises(PeftkitError, match=message):
        task.fit({"label": train}, {"label": eval_} if eval_ else None, "data.eval")


def test_unknown_option_is_named(tiny_dir, tmp_path):
    data = make_recipe(tiny_dir, tmp_path, task="regression")
    data["task"]["los"] = "huber"
    with pytest.raises(PeftkitError, match=r"task.los: unknown key; did you mean `loss`\?"):
        build_recipe(data)


def test_huber_loss_is_squared_near_and_linear_far():
    task = make_task("regression", {"loss": "huber", "huber_delta": 1.0})
    logits = torch.tensor([[0.5], [3.0]])
    losses = task.row_losses(logits, torch.tensor([0.0, 0.0]))
    assert losses.tolist() == pytest.approx([0.5 * 0.25, 3.0 - 0.5])


# ---- the regressor's start, and what a user runs ----------------------------------------------------------------

def test_regressor_starts_at_the_training_mean_and_predicts_numbers(tiny_dir, tmp_path):
    data = make_recipe(tiny_dir, tmp_path, task="regression", quant="4bit")
    data["train"].update(max_steps=2)
    result = train(build_recipe(data), **QUIET)
    targets = [float(r.split("\t")[1]) for r in (tiny_dir / "reg_train.tsv").read_text().splitlines()[1:]]
    mean = sum(targets) / len(targets)
    assert result.metadata.task.state.mean == pytest.approx(mean)
    # before any step the model predicts about the mean, so its eval error is about the targets' spread
    first = result.metadata.history[0]
    dev = [float(r.split("\t")[1]) for r in (tiny_dir / "reg_dev.tsv").read_text().splitlines()[1:]]
    around_mean = sum((t - mean) ** 2 for t in dev) / len(dev)
    assert first["step"] == 0 and first["mse"] == pytest.approx(around_mean, rel=0.1)
    assert first["mse"] < 0.5 * sum(t * t for t in dev) / len(dev)  # far below a head that starts at 0

    # the saved model predicts numbers, and the exported config says what it is
    loaded = load_trained(result.adapter_dir)
    assert loaded.model.config.problem_type == "regression" and loaded.model.config.num_labels == 1
    cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS"


@pytest.fixture(scope="module")
def registry(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    out = tmp_path_factory.mktemp("pooled")
    for name, task, adapter in (("score", "regression", "lora"), ("tags", "multi_label", "adalora"),
                                ("sentiment", "classification", "lora")):
        data = make_recipe(tiny_dir, out, task=task, quant="4bit", adapter=adapter)
        data["train"].update(max_steps=4, eval_at_start=False, lr=2e-2)
        data["output"]["name"] = name
        train(build_recipe(data), **QUIET)
    return Registry(out / "adapters")


def test_mixed_batch_of_a_regressor_a_multi_label_and_a_classifier_equals_each_alone(registry):
    names = ["score", "tags", "sentiment", "tags", "score", "base"]
    texts = ["good great film", "bad awful", "the king", "good but bad", "awful", "a river"]
    # the float32 4-bit path, as load_trained takes: the packed default rounds on AVX512-BF16
    server = load_server(registry, ["score", "tags", "sentiment"], packed_inference=False)
    mixed = server.outputs(texts, names)
    for name in ("score", "tags", "sentiment"):
        loaded = load_trained(registry.folder(name))
        for i in (i for i, n in enumerate(names) if n == name):
            with torch.no_grad():
                alone = loaded.model(**loaded.tokenizer([texts[i]], return_tensors="pt")).logits[0].float()
            assert mixed[i].shape == alone.shape
            torch.testing.assert_close(mixed[i], alone, rtol=1e-5, atol=1e-5)
    predictions = server.predict(texts[:5], names[:5])  # an encoder base has no head of its own to predict with
    assert set(predictions[0]) == {"adapter", "score"}
    assert predictions[0]["score"] == pytest.approx(float(mixed[0][0]), abs=1e-5)
    tags = predictions[1]
    assert set(tags["probs"]) == {"pos", "neg"}
    assert tags["labels"] == [k for k, p in tags["probs"].items() if p >= 0.5]
    assert tags["probs"]["pos"] == pytest.approx(float(torch.sigmoid(mixed[1][1])), abs=1e-5)  # labels: neg, pos
    assert set(predictions[2]) >= {"label", "probs"}


def test_eval_command_reports_the_heads_metrics(registry, tiny_dir):
    from click.testing import CliRunner

    from peftkit.cli import main

    result = CliRunner().invoke(main, ["eval", "score", "--data", str(tiny_dir / "reg_dev.tsv"), "--json",
                                       "--registry", str(registry.root)])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert {"pearson", "spearman", "mse", "mae"} <= set(scores.get("metrics", scores))
    bad = tiny_dir / "reg_bad.tsv"
    bad.write_text("sentence\tscore\ngood film\tvery\n")
    result = CliRunner().invoke(main, ["eval", "score", "--data", str(bad), "--registry", str(registry.root)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "row 1 has 'very' as its target" in result.output


def test_multi_label_recipe_from_the_command_line(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from peftkit.cli import main

    data = make_recipe(tiny_dir, tmp_path, task="multi_label")
    data["train"].update(max_steps=2, eval_at_start=False)
    result = CliRunner().invoke(main, ["train", str(write_recipe(tmp_path / "r.yaml", data))])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "adapters" / "tiny" / "peftkit.json").read_text())
    assert meta["task"]["type"] == "multi_label" and meta["task"]["state"]["labels"] == ["neg", "pos"]
    assert math.isfinite(meta["history"][-1]["micro_f1"])


@pytest.mark.parametrize("name", ["score", "tags"])
def test_export_and_merge_give_plain_peft_and_transformers_the_same_outputs(registry, name, tmp_path):
    import os
    import subprocess
    import sys

    from peftkit.ops.export import export
    from peftkit.ops.merge import merge
    from tests.test_export import FRESH_PROCESS

    texts = ["good great film", "bad awful", "the king and good"]
    loaded = load_trained(registry.folder(name))
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = loaded.model(**batch).logits

    result = export(registry, name, "peft", tmp_path / "export")
    env = {**os.environ, "PYTHONPATH": ""}
    fresh = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "export"), json.dumps(texts),
                            "dequantized"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    torch.testing.assert_close(torch.tensor(json.loads(fresh.stdout.strip().splitlines()[-1])), expected,
                               rtol=1e-5, atol=1e-5)
    card = (tmp_path / "export" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card
    labels = {"score": "{0: 'score'}", "tags": "{0: 'neg', 1: 'pos'}"}[name]
    assert f"id2label={labels}" in card, card
    assert result["check"]["max_rel_diff"] < 1e-5

    merged = merge(registry, name, tmp_path / "merged", rows=16)
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(merged.folder).eval()
    problem = {"score": "regression", "tags": "multi_label_classification"}[name]
    assert plain.config.problem_type == problem
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-4, atol=1e-4)
