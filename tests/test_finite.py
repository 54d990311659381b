"""No NaN or infinity is ever saved or registered, and every JSON peftkit prints parses with a strict parser."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from peftkit.cli import main
from peftkit.config.recipe import build_recipe
from peftkit.finite import dumps, json_safe
from peftkit.store.artifacts import read_metadata, seal
from peftkit.train.training import train
from tests.conftest import make_recipe, write_recipe

DIVERGED = ("training diverged; lower train.lr ({lr}), or check the data for extreme or empty rows; no adapter was "
            "saved")


def _refuse(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def strict_json(text: str):
    return json.loads(text, parse_constant=_refuse)


@pytest.fixture(scope="module")
def registry(tiny_dir, tmp_path_factory):
    """`good`, trained a few steps, and `nanny`: the same adapter with one LoRA matrix holding a NaN."""
    root = tmp_path_factory.mktemp("finite")
    data = make_recipe(tiny_dir, root, train={"max_steps": 2, "eval_at_start": False}, output={"name": "good"})
    folder = train(build_recipe(data), echo=lambda line: None).adapter_dir
    nanny = folder.parent / "nanny"
    shutil.copytree(folder, nanny)
    weights = load_file(str(nanny / "adapter_model.safetensors"))
    key = next(k for k in sorted(weights) if "lora_A" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, str(nanny / "adapter_model.safetensors"), metadata={"format": "pt"})
    meta = read_metadata(nanny).to_json()
    meta["name"] = meta["recipe"]["output"]["name"] = "nanny"
    seal(nanny, {k: v for k, v in meta.items() if k not in ("files", "digest")})
    return {"root": root, "registry": str(folder.parent), "nan_key": key, "recipe": data}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and result.output.splitlines()[-1] == errors[0], result.output
    return errors[0]


def test_a_diverging_run_stops_at_the_first_nan_loss_and_saves_nothing(tiny_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_dir, tmp_path, train={"max_steps": 3}))
    line = _one_error(run("train", recipe, "--set", "train.lr=1e30", "--set", "train.eval_at_start=false"))
    assert line == "Error: step 2/3: the loss is nan: " + DIVERGED.format(lr="1e+30")
    assert list((tmp_path / "adapters").iterdir()) == []


def test_a_non_finite_gradient_norm_stops_the_run(tiny_dir, tmp_path, monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", lambda self, params, norm: torch.tensor(float("inf")))
    data = make_recipe(tiny_dir, tmp_path, train={"max_steps": 3, "eval_at_start": False})
    with pytest.raises(Exception, match=r"^step 1/3: the gradient norm is inf: training diverged; lower train.lr"):
        train(build_recipe(data), echo=lambda line: None)
    assert list((tmp_path / "adapters").iterdir()) == []


def test_weights_broken_by_the_last_step_are_not_saved(tiny_dir, tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step

    def breaking_step(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data.fill_(float("nan"))

    monkeypatch.setattr(torch.optim.AdamW, "step", breaking_step)
    data = make_recipe(tiny_dir, tmp_path, train={"max_steps": 1, "eval_at_start": False})
    with pytest.raises(Exception, match=r"^step 1/1: the trained weights hold NaN or infinite values \(in .*lora_"):
        train(build_recipe(data), echo=lambda line: None)
    assert list((tmp_path / "adapters").iterdir()) == []


def test_combine_refuses_a_nan_parent_and_a_non_finite_result(registry):
    reg = registry["registry"]
    assert _one_error(run("combine", "good", "nanny", "--weights", "0.5,0.5", "--name", "c", "--registry", reg)) == (
        f"Error: nanny holds NaN or infinite values (in {registry['nan_key']}); it cannot be combined; retrain it "
        "(with a lower train.lr)")
    line = _one_error(run("combine", "good", "good", "--weights", "1e200,1e200", "--name", "c", "--registry", reg))
    assert line.startswith("Error: the combination of good, good holds NaN or infinite values (in ")
    assert line.endswith("); nothing was registered")
    assert sorted(p.name for p in (registry["root"] / "adapters").iterdir()) == ["good", "nanny"]


def test_merge_and_init_from_refuse_a_nan_adapter(registry, tmp_path):
    line = _one_error(run("merge", "nanny", "--out", tmp_path / "merged", "--registry", registry["registry"]))
    assert line.startswith("Error: nanny merged into its base holds NaN or infinite values (in ")
    assert line.endswith("); nanny itself holds them or its base does; nothing was written")
    assert not (tmp_path / "merged").exists()

    data = dict(registry["recipe"], output={**registry["recipe"]["output"], "name": "child"})
    data["adapter"] = {**data["adapter"], "init_from": "nanny"}
    with pytest.raises(Exception, match=r"^adapter.init_from: nanny holds NaN or infinite values \(in .*\); it cannot "
                                        r"start another adapter; retrain it$"):
        train(build_recipe(data), echo=lambda line: None)


def test_printed_json_is_strict_json(registry, tiny_dir):
    reg = registry["registry"]
    out = run("predict", "good film", "bad film", "--adapter", "nanny", "--adapter", "good", "--registry", reg)
    assert out.exit_code == 0, out.output
    lines = [strict_json(line) for line in out.output.splitlines()]
    assert [line["probs"] for line in lines if line["adapter"] == "nanny"] == [{"0": None, "1": None}] * 2
    assert all(None not in line["probs"].values() for line in lines if line["adapter"] == "good")

    shown = run("eval", "nanny", "--data", tiny_dir / "cls_dev.tsv", "--json", "--registry", reg)
    assert shown.exit_code == 0, shown.output
    assert strict_json(shown.output)["metrics"]["loss"] is None


def test_json_safe_maps_every_non_finite_number_to_null():
    value = {"a": [1.0, float("nan"), {"b": float("inf")}], "c": (float("-inf"), 2), "d": "nan"}
    assert json_safe(value) == {"a": [1.0, None, {"b": None}], "c": [None, 2], "d": "nan"}
    assert strict_json(dumps(value)) == json_safe(value)
