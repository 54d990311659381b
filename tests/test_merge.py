"""Merging into the base: exact from 4-bit (LoRA, AdaLoRA) and 8-bit, re-quantized drift and its threshold,
the bad inputs, and an interrupted merge that leaves nothing behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from peftkit.cli import main
from peftkit.config.recipe import build_recipe
from peftkit.core.cpu_paths import DEQUANTIZED, describe_path
from peftkit.errors import PeftkitError
from peftkit.ops import model_card
from peftkit.ops.merge import merge
from peftkit.store.artifacts import seal
from peftkit.store.loading import load_trained
from peftkit.store.registry import Registry
from peftkit.train.training import train
from tests.conftest import make_recipe
from tests.test_convert import _batch, _relative

QUIET = {"echo": lambda line: None}


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """name -> Registry: tiny classification adapters on 4-bit and 8-bit bases, trained once for the module."""
    root = tmp_path_factory.mktemp("merge")
    registries = {}
    for name, quant, adapter in [("lora4", "4bit", "lora"), ("ada4", "4bit", "adalora"), ("lora8", "8bit", "lora")]:
        data = make_recipe(tiny_dir, root / name, quant=quant, adapter=adapter,
                           train={"max_steps": 6, "eval_at_start": False, "lr": 2e-2}, output={"name": name})
        result = train(build_recipe(data), **QUIET)
        registries[name] = Registry(result.adapter_dir.parent)
    return registries


def _plain_logits(folder, batch):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("name", ["lora4", "ada4"])
def test_merged_from_4bit_equals_base_plus_adapter(trained, name, tmp_path):
    registry = trained[name]
    result = merge(registry, name, tmp_path / "merged", rows=32)
    assert result.drift["max_rel_diff"] < 1e-5 and result.drift["label_agreement"] == 1.0
    assert result.drift["rows"] == 32 and result.drift["positions"] == 32

    # checked again here, independently of the drift module: plain transformers against peftkit's loading
    loaded = load_trained(registry.folder(name))
    batch = _batch(loaded)
    with torch.no_grad():
        expected = loaded.model(**batch).logits
    assert _relative(_plain_logits(result.folder, batch), expected) < 1e-5

    config = json.loads((result.folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "0", "1": "1"}
    assert not (result.folder / "adapter_config.json").exists()
    meta = json.loads((result.folder / "peftkit.json").read_text())
    assert meta["kind"] == "merged" and meta["merged_from"] == name
    assert meta["drift"]["max_rel_diff"] == result.drift["max_rel_diff"]
    card = (result.folder / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: transformers" in card
    assert "AutoModelForSequenceClassification.from_pretrained(" in card and "| max_rel_diff |" in card


def test_merged_from_8bit_keeps_the_weights_exact(trained, tmp_path):
    result = merge(trained["lora8"], "lora8", tmp_path / "merged8", rows=32)
    # the merge itself is exact; against the 8-bit model as trained what remains is LLM.int8's rounding of
    # the activations (module docstring of peftkit.ops.merge), reported and within the default threshold
    assert result.merge_rounding["max_rel_diff"] < 1e-5
    assert 0 < result.drift["max_rel_diff"] < 0.25


def test_requantized_drift_is_reported_and_the_threshold_refuses(trained, tmp_path):
    registry = trained["lora4"]
    out = tmp_path / "nf4"
    with pytest.raises(PeftkitError, match=r"^the merged model re-quantized to nf4 moves the logits by .* past "
                                           r"--max-drift 1e-06; nothing was written. Pass --accept-drift"):
        merge(registry, "lora4", out, quantize="nf4", rows=32, max_drift=1e-6)
    assert not out.exists() and list(tmp_path.iterdir()) == []

    result = merge(registry, "lora4", out, quantize="nf4", rows=32, max_drift=1e-6, accept_drift=True)
    exact = merge(registry, "lora4", tmp_path / "exact", rows=32)
    assert result.drift["max_rel_diff"] > 100 * exact.drift["max_rel_diff"]
    meta = json.loads((out / "peftkit.json").read_text())
    assert meta["drift"]["accepted_past_max"] is True and meta["merge"]["quantize"] == "nf4"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert (out / "model.safetensors").stat().st_size < (exact.folder / "model.safetensors").stat().st_size


def test_cli_merges_in_bf16_and_reports(trained, tmp_path):
    registry = str(trained["lora4"].root)
    out = tmp_path / "bf16"
    result = CliRunner().invoke(main, ["merge", "lora4", "--out", str(out), "--dtype", "bf16", "--rows", "16",
                                       "--registry", registry])
    assert result.exit_code == 0, result.output
    assert "written in bfloat16, reloaded: max relative difference" in result.output
    # measured on training's float32 path; a CPU user learns what plain transformers would do here instead
    assert f"against lora4 as trained; {describe_path(DEQUANTIZED)}\n" in result.output
    assert f"saved {out} (" in result.output
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_bad_input_is_one_line(trained, tmp_path):
    registry = str(trained["lora4"].root)
    run = lambda *args: CliRunner().invoke(main, [*args, "--registry", registry])  # noqa: E731
    out = tmp_path / "m"
    assert run("merge", "lora4", "--out", str(out), "--rows", "8").exit_code == 0

    again = run("merge", str(out), "--out", str(tmp_path / "m2"))
    assert again.exit_code == 1
    assert again.output == (f"Error: {out} is already merged (from adapter lora4): there is no adapter left in it to "
                            "merge; merge the adapter itself: peftkit merge lora4 --out DIR\n")
    exists = run("merge", "lora4", "--out", str(out))
    assert exists.output == f"Error: --out {out} already exists; choose another folder or pass --force to replace it\n"
    assert run("merge", "lora4", "--out", str(tmp_path / "x"), "--dtype", "int3").output == (
        "Error: --dtype: unknown dtype 'int3'; use one of: fp32, bf16, fp16 (or float32, bfloat16, float16)\n")
    assert run("merge", "lora4", "--out", str(tmp_path / "x"), "--quantize", "nf3").output == (
        "Error: --quantize: unknown type 'nf3'; use one of: nf4, fp4, int8\n")
    inside = run("merge", "lora4", "--out", f"{registry}/lora4", "--force")
    assert inside.output.startswith(f"Error: --out {registry}/lora4 would replace ")

    # an adapter whose base is gone
    copy = tmp_path / "other" / "lora4"
    shutil.copytree(trained["lora4"].folder("lora4"), copy)
    meta = json.loads((copy / "peftkit.json").read_text())
    meta["recipe"]["base"]["model"] = str(tmp_path / "gone")
    seal(copy, meta)
    gone = CliRunner().invoke(main, ["merge", "lora4", "--out", str(tmp_path / "y"), "--registry", str(copy.parent)])
    assert gone.output == (f"Error: cannot merge lora4: its base is not available (base.model: folder "
                           f"{tmp_path / 'gone'} does not exist; check the path)\n")


def test_an_interrupted_merge_leaves_no_folder(trained, tmp_path, monkeypatch):
    def interrupted(folder, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_card, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge(trained["lora4"], "lora4", tmp_path / "half", rows=8)
    assert list(tmp_path.iterdir()) == []
