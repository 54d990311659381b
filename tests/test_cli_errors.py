"""Bad input through the real CLI: one ``Error: ...`` line that names the key or file and the fix, no traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from peftkit.cli import main
from tests import tiny
from tests.conftest import write_recipe

FAST = ["--set", "train.max_steps=2", "--set", "train.eval_at_start=false"]


def invoke(*args: Any):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(*args: Any) -> str:
    """Run the CLI, check that it failed the way users should see a failure, and return its one line."""
    result = invoke(*args)
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    return lines[0]


@pytest.fixture
def write(tmp_path: Path):
    def build(name: str, data: dict[str, Any]) -> Path:
        return write_recipe(tmp_path / name, data)

    return build


# ---- the recipe ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["validate", "train"])
def test_missing_recipe_file(command: str, tmp_path: Path):
    path = tmp_path / "nope.yaml"
    assert error_line(command, path) == f"Error: recipe file {path} does not exist; check the path"


@pytest.mark.parametrize("command", ["validate", "train"])
def test_misspelled_key(command: str, recipe_for, write):
    data = recipe_for()
    data["adapter"]["lora_alfa"] = data["adapter"].pop("lora_alpha")
    path = write("r.yaml", data)
    assert error_line(command, path) == f"Error: {path}: adapter.lora_alfa: unknown key; did you mean `lora_alpha`?"


def test_wrong_type(recipe_for, write):
    path = write("r.yaml", recipe_for(train={"batch_size": "sixteen"}))
    assert error_line("validate", path) == (
        f"Error: {path}: train.batch_size: input should be a valid integer, unable to parse string as an integer "
        "(got 'sixteen')"
    )


def test_several_problems_share_one_line(recipe_for, write):
    data = recipe_for(adapter="adalora", quant="4bit", train={"lr": 0})
    data["adapter"]["r"] = 4
    path = write("r.yaml", data)
    line = error_line("validate", path, "--no-data")
    assert line == (
        f"Error: {path}: 2 problems: adapter.r: unknown key; `r` is a lora option: set method: lora; "
        "train.lr: input should be greater than 0 (got 0)"
    )


def test_quantized_base_without_adapter(recipe_for, write):
    path = write("r.yaml", recipe_for(quant="4bit", adapter=None))
    assert error_line("validate", path, "--no-data") == (
        f"Error: {path}: adapter: required with quantization.bits: 4 (a quantized base is frozen and cannot be "
        "fully fine-tuned); add an adapter section or set quantization.bits: null"
    )


def test_unsafe_adapter_name(recipe_for, write):
    path = write("r.yaml", recipe_for(output={"name": "../elsewhere"}))
    line = error_line("train", path)
    assert line.startswith(f"Error: {path}: output.name: adapter name '../elsewhere' is not allowed: ")
    assert "no path separators or '..'" in line


def test_invalid_yaml(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text("base:\n  model: x\n task: oops\n")
    line = error_line("validate", path)
    assert line.startswith(f"Error: {path}: not valid YAML at line ")


@pytest.mark.parametrize(
    "assignment, expected",
    [
        ("train.epochs", "Error: --set 'train.epochs': expected KEY=VALUE, for example --set train.epochs=2"),
        ("train.epochs.max=2",
         "Error: --set train.epochs.max=2: train.epochs is a value, not a section; set train.epochs=... instead"),
    ],
)
def test_bad_set_assignment(assignment: str, expected: str, recipe_for, write):
    path = write("r.yaml", recipe_for())
    assert error_line("validate", path, "--set", assignment) == expected


def test_set_value_is_validated_like_the_file(recipe_for, write):
    path = write("r.yaml", recipe_for())
    assert error_line("validate", path, "--set", "adapter.r=0", "--no-data") == (
        f"Error: {path}: adapter.r: input should be greater than or equal to 1 (got 0)"
    )


# ---- data ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["validate", "train"])
def test_missing_data_file(command: str, recipe_for, write, tmp_path: Path):
    missing = tmp_path / "gone.tsv"
    path = write("r.yaml", recipe_for(data={"train": str(missing)}))
    assert error_line(command, path, *FAST) == f"Error: data.train: file {missing} does not exist; check the path"


@pytest.mark.parametrize("command", ["validate", "train"])
def test_unknown_label_in_eval_data(command: str, recipe_for, write, tmp_path: Path):
    rows = tiny.sentiment_rows(8, seed=9)
    rows[5]["label"] = 7
    dev = tiny.write_tsv(tmp_path / "dev.tsv", rows)
    path = write("r.yaml", recipe_for(data={"eval": str(dev)}))
    assert error_line(command, path, *FAST) == (
        f"Error: {dev}: row 6 has label '7', which the training data does not have (0, 1); fix that row or list "
        "the label in task.labels"
    )


def test_unparseable_data_file(recipe_for, write, tmp_path: Path, capfd: pytest.CaptureFixture):
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("sentence,label\ngood film,1\nbad, bad film,0\n")
    path = write("r.yaml", recipe_for(data={"train": str(ragged), "eval": None}))
    capfd.readouterr()
    assert error_line("validate", path) == (
        f"Error: data.train: could not read {ragged} as csv: Error tokenizing data. C error: Expected 2 fields in "
        "line 3, saw 3; check data.format and data.header"
    )
    assert capfd.readouterr().err == ""  # datasets' own report of the failure is not printed as well


def test_column_not_in_the_file(recipe_for, write, tiny_dir: Path):
    path = write("r.yaml", recipe_for(data={"columns": {"text": "review"}}))
    assert error_line("validate", path) == (
        f"Error: data.columns.text: column 'review' is not in {tiny_dir / 'cls_train.tsv'} (its columns: sentence, "
        "label); fix the name"
    )


# ---- the model ----------------------------------------------------------------------------------------


def test_target_module_the_model_does_not_have(recipe_for, write):
    data = recipe_for()
    data["adapter"]["target_modules"] = ["qury"]
    path = write("r.yaml", data)
    assert error_line("train", path, *FAST) == (
        "Error: adapter.target_modules: the model has no linear layer named 'qury' (it has: dense, key, query, "
        "value); did you mean `query`?"
    )


def test_unreachable_hub_id(recipe_for, write, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write("r.yaml", recipe_for(base={"model": "some-org/does-not-exist"}))
    assert error_line("train", path, *FAST) == (
        "Error: base.model: hub id 'some-org/does-not-exist' is not in the local cache and HF_HUB_OFFLINE=1; "
        "download it on a connected machine (huggingface-cli download some-org/does-not-exist --local-dir DIR), "
        "copy DIR here and set base.model: DIR"
    )


def test_missing_model_folder(recipe_for, write, tmp_path: Path):
    path = write("r.yaml", recipe_for(base={"model": str(tmp_path / "no-model")}))
    assert error_line("train", path, *FAST) == (
        f"Error: base.model: folder {tmp_path / 'no-model'} does not exist; check the path"
    )


# ---- what is already on disk --------------------------------------------------------------------------


def test_adapter_that_already_exists(recipe_for, write, tmp_path: Path):
    path = write("r.yaml", recipe_for())
    first = invoke("train", path, *FAST)
    assert first.exit_code == 0, first.output
    assert (tmp_path / "adapters" / "tiny" / "peftkit.json").is_file()
    assert error_line("train", path, *FAST) == (
        f"Error: output.name: adapter 'tiny' already exists in {tmp_path / 'adapters'}/; choose another name "
        "(--set output.name=NEW) or pass --overwrite to replace it"
    )


def test_resume_without_a_checkpoint(recipe_for, write, tmp_path: Path):
    path = write("r.yaml", recipe_for())
    assert error_line("train", path, "--resume", *FAST) == (
        f"Error: --resume: no checkpoint in {tmp_path / 'runs' / 'tiny'}/checkpoints; run without --resume to start"
    )


def test_validate_finds_the_base_model(recipe_for, write, tmp_path: Path):
    missing = tmp_path / "no-such-model"
    path = write("r.yaml", recipe_for(base={"model": str(missing)}))
    assert error_line("validate", path) == f"Error: base.model: folder {missing} does not exist; check the path"
    ok = invoke("validate", write("ok.yaml", recipe_for()))
    assert ok.exit_code == 0 and ok.output.splitlines()[0].startswith("base: "), ok.output
