"""`peftkit eval`: the task's metrics on any labelled file, per group with the largest gap."""

from __future__ import annotations

import json

from click.testing import CliRunner

from peftkit.cli import main
from peftkit.recipe import build_recipe
from peftkit.training import train
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
