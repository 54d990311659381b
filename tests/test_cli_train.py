"""`peftkit train` end to end on a tiny model: the files it writes, the numbers it reports, and --resume."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftkit.cli import main
from peftkit.config.metadata import FORMAT_VERSION
from peftkit.config.recipe import build_recipe
from peftkit.train import training
from peftkit.train.training import train
from tests.conftest import write_recipe


def test_train_writes_a_self_describing_adapter(recipe_for, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", recipe_for(quant="4bit", train={"eval_at_start": False}))
    result = CliRunner().invoke(main, ["train", str(recipe), "--set", "train.epochs=1", "--set", "output.name=cli"])
    assert result.exit_code == 0, result.output

    lines = result.output.splitlines()
    assert lines[0].startswith("base: ") and "4-bit NF4, double quant" in lines[0] and "MiB in memory" in lines[0]
    assert lines[1].startswith("adapter: lora, trainable parameters ")
    assert lines[2] == "data: 256 train rows, 64 eval rows; 16 optimizer steps"
    assert lines[-1].startswith(f"saved {tmp_path / 'adapters' / 'cli'} in ")

    folder = tmp_path / "adapters" / "cli"
    assert {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "peftkit.json"}
    meta = json.loads((folder / "peftkit.json").read_text())
    assert meta["name"] == "cli" and meta["format_version"] == FORMAT_VERSION
    assert meta["task"] == {"type": "classification", "options": {}, "state": {"labels": ["0", "1"]}}
    assert meta["base"]["fingerprint"].startswith("sha256:") and meta["base"]["quantization"]["bits"] == 4
    assert meta["adapter"]["method"] == "lora" and meta["adapter"]["head_modules"] == ["classifier"]
    assert set(meta["versions"]) >= {"peftkit", "torch", "transformers", "peft", "bitsandbytes"}
    assert meta["training"]["optimizer_steps"] == 16 and meta["training"]["train_rows"] == 256
    assert meta["recipe"]["train"]["epochs"] == 1.0  # the resolved recipe, overrides applied
    assert 0.0 <= meta["metrics"]["accuracy"] <= 1.0 and meta["history"][-1]["step"] == 16
    reported = lines[-1].split(": ", 1)[1]
    assert f"accuracy {meta['metrics']['accuracy']:.4f}" in reported
    assert set(meta["files"]) == {p.name for p in folder.iterdir()} - {"peftkit.json"}

    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "classifier" in config["modules_to_save"]
    weights = load_file(str(folder / "adapter_model.safetensors"))
    assert any("classifier" in k for k in weights) and any("lora_A" in k for k in weights)
    assert list((tmp_path / "runs" / "cli" / "tensorboard").glob("events.out.tfevents.*"))
    assert not list((tmp_path / "adapters").glob(".staging-*"))


class Killed(Exception):
    pass


def test_resume_continues_a_killed_run_exactly(recipe_for, monkeypatch):
    """AdaLoRA, so the allocator's state must survive the restart too."""
    data = recipe_for(adapter="adalora", train={"max_steps": 12, "save_every": 4, "batch_size": 16,
                                                "eval_at_start": False})
    uninterrupted = train(build_recipe({**data, "output": {**data["output"], "name": "whole"}}),
                          echo=lambda line: None)

    interrupted = build_recipe({**data, "output": {**data["output"], "name": "split"}})
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # after the checkpoint at step 4, before step 7 is taken
            raise Killed()
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(Killed):
        train(interrupted, echo=lambda line: None)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert not (interrupted.output.registry and (training.Path(interrupted.output.registry) / "split").exists())

    lines = []
    resumed = train(interrupted, resume=True, echo=lines.append)
    assert any(line.startswith("resumed from ") and "checkpoint-4" in line for line in lines)
    expected = {n: p for n, p in uninterrupted.model.named_parameters() if p.requires_grad}
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, expected[name]), name
    a, b = uninterrupted.metadata.adapter.adalora, resumed.metadata.adapter.adalora
    assert a.final_ranks == b.final_ranks and b.reallocations == 12
    assert b.budget_history == a.budget_history
    # the examples trained before the restart count in the throughput too
    assert resumed.metadata.training.examples == uninterrupted.metadata.training.examples == 12 * 16


def test_resume_with_a_changed_recipe_is_refused(recipe_for, tmp_path):
    data = recipe_for(train={"max_steps": 6, "save_every": 2, "eval_at_start": False})
    recipe = write_recipe(tmp_path / "r.yaml", data)
    runner = CliRunner()
    assert runner.invoke(main, ["train", str(recipe), "--set", "train.max_steps=4"]).exit_code == 0
    (tmp_path / "adapters" / "tiny").rename(tmp_path / "finished")  # as if the run had been killed
    result = runner.invoke(main, ["train", str(recipe), "--resume", "--set", "train.batch_size=8"])
    assert result.exit_code != 0
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoints" / "checkpoint-2"
    assert result.output.strip() == (
        f"Error: --resume: train.batch_size was 16 when {checkpoint} was written and is 8 now; resume with the "
        "original value, or start over with --overwrite")
    ok = runner.invoke(main, ["train", str(recipe), "--resume", "--set", "train.max_steps=4",
                              "--set", "train.eval_every=1"])
    assert ok.exit_code == 0, ok.output
    assert "resumed from" in ok.output and "checkpoint-2" in ok.output


def test_a_half_written_checkpoint_is_never_resumed_from(recipe_for, tmp_path):
    """A checkpoint is complete once its record is written, last: a run killed while saving step 4 (Trainer's
    files there, no record) resumes from step 2, and pruning keeps complete checkpoints, never counting the
    half-written one."""
    from peftkit.train.checkpoint import RECORD_FILE, list_checkpoints, prune

    data = recipe_for(train={"max_steps": 6, "save_every": 2, "keep_checkpoints": 2, "eval_at_start": False})
    recipe = write_recipe(tmp_path / "r.yaml", data)
    runner = CliRunner()
    assert runner.invoke(main, ["train", str(recipe)]).exit_code == 0
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    (tmp_path / "adapters" / "tiny").rename(tmp_path / "finished")  # as if killed while saving step 4
    (checkpoints / "checkpoint-4" / RECORD_FILE).unlink()
    assert [p.name for p in list_checkpoints(tmp_path / "runs" / "tiny")] == ["checkpoint-2"]
    prune(checkpoints, keep=1)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    result = runner.invoke(main, ["train", str(recipe), "--resume"])
    assert result.exit_code == 0, result.output
    assert f"resumed from {checkpoints / 'checkpoint-2'} at step 2" in result.output
    # the step-4 checkpoint was written again, whole; the oldest complete one beyond keep_checkpoints is gone
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (checkpoints / "checkpoint-4" / RECORD_FILE).is_file()
