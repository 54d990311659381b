"""benchmarks/domain_pretrain.py without training: its arguments, the sweep's epoch rule, and the report's gains."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import domain_pretrain  # noqa: E402


def test_arguments_and_epoch_rule():
    args = domain_pretrain.parse_args([])
    assert args.rows == [250, 1000, 500] and args.seeds == [42, 1, 2] and not args.report_only
    with pytest.raises(SystemExit):
        domain_pretrain.parse_args(["--rows", "0"])
    # at least 128 optimizer steps of 32 rows, in whole epochs
    assert [domain_pretrain.epochs_for(n) for n in (250, 500, 1000, 8000)] == [17, 9, 5, 1]


def test_report_pairs_the_arms_by_seed(tmp_path: Path):
    runs = tmp_path / "runs"
    runs.mkdir()
    accuracy = {("plain", 42): 0.80, ("from-mlm", 42): 0.82, ("plain", 1): 0.70, ("from-mlm", 1): 0.71,
                ("plain", 2): 0.75}  # seed 2 has one arm only: left out of the pairs
    for (arm, seed), value in accuracy.items():
        record = {"ok": True, "rows": 250, "arm": arm, "seed": seed, "metrics": {"accuracy": value}}
        (runs / f"{domain_pretrain.run_name(250, arm, seed)}.json").write_text(json.dumps(record))
    text = domain_pretrain.report(tmp_path)
    assert "| 250 | 1, 42 | 75.0 ± 7.1 | 76.5 ± 7.8 | +1.5 ± 0.7 |" in text
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]["250"]
    assert summary["seeds"] == [1, 42] and summary["gain"] == pytest.approx([1.0, 2.0])
    assert (tmp_path / "results.md").read_text() == text
