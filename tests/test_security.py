"""Nothing a user is handed runs code: a crafted checkpoint, adapter metadata, stored recipe or base folder is
refused in one line, and the payload each one carries (it would create a marker file) never runs."""

from __future__ import annotations

import ast
import contextlib
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from peftkit.config.metadata import FORMAT_VERSION, digest
from peftkit.config.recipe import build_recipe
from peftkit.errors import PeftkitError
from peftkit.ops.export import export
from peftkit.store.artifacts import read_metadata, seal
from peftkit.store.loading import load_trained
from peftkit.store.registry import Registry
from peftkit.train.training import train
from tests.conftest import make_recipe, write_recipe
from tests.test_cli_errors import error_line

QUIET = {"echo": lambda line: None}


class Payload:
    """Unpickling this creates ``marker``: what a crafted pickle would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory) -> Path:
    """A run of 4 steps with a checkpoint at step 2; returns its root (adapters/, runs/, recipe.yaml)."""
    root = tmp_path_factory.mktemp("security")
    data = make_recipe(tiny_dir, root, train={"max_steps": 4, "save_every": 2, "eval_at_start": False})
    write_recipe(root / "recipe.yaml", data)
    train(build_recipe(data), **QUIET)
    return root


@pytest.fixture
def copy(trained, tmp_path) -> Path:
    """A copy of the trained run, to tamper with: its root."""
    shutil.copytree(trained, tmp_path / "run")
    root = tmp_path / "run"
    for moved in [root / "recipe.yaml", *root.glob("runs/*/checkpoints/*/trainer_state.json")]:
        moved.write_text(moved.read_text().replace(str(trained), str(root)))
    return root


def _edit_metadata(folder: Path, edit, redigest: bool) -> None:
    """Edit ``folder``'s peftkit.json in place; with ``redigest`` as someone who knows the format would."""
    path = folder / "peftkit.json"
    metadata = json.loads(path.read_text())
    edit(metadata)
    if redigest:
        metadata["digest"] = digest(metadata)
    path.write_text(json.dumps(metadata))


# ---- checkpoints ----------------------------------------------------------------------------------------


def _killed_before_save(root: Path) -> Path:
    """The run as if killed after its checkpoint: no adapter yet; returns the checkpoint's folder."""
    shutil.rmtree(root / "adapters" / "tiny")
    return root / "runs" / "tiny" / "checkpoints" / "checkpoint-2"


def test_a_pickled_checkpoint_of_the_old_format_is_refused_unread(copy):
    checkpoint = _killed_before_save(copy)
    old = checkpoint.parent / "step-2"  # peftkit before it trained on Trainer: a pickle in step-<N>/training.pt
    old.mkdir()
    shutil.rmtree(checkpoint)
    marker = copy / "ran"
    (old / "training.pt").write_bytes(pickle.dumps(Payload(marker)))
    assert error_line("train", copy / "recipe.yaml", "--resume") == (
        f"Error: checkpoint {old} was written by an earlier peftkit, before it trained on transformers' Trainer (its "
        "training.pt is a pickle, which can run code when loaded, and is not read); it cannot be resumed: start over "
        "with --overwrite")
    assert not marker.exists()


@pytest.mark.parametrize("replaced", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "adapter_model.safetensors",
                                      "trainer_state.json"])
def test_a_pickle_in_place_of_a_checkpoint_file_is_refused(copy, replaced):
    checkpoint = _killed_before_save(copy)
    assert (checkpoint / replaced).is_file()
    marker = copy / "ran"
    torch.save(Payload(marker), checkpoint / replaced)  # torch.load(weights_only=False) would run it
    assert error_line("train", copy / "recipe.yaml", "--resume") == (
        f"Error: checkpoint {checkpoint} is unreadable ({replaced}: "
        f"{'UnpicklingError' if replaced.endswith(('.pt', '.pth')) else 'SafetensorError' if 'safetensors' in replaced else 'UnicodeDecodeError'}"
        "); delete it to resume from an earlier one, or start over with --overwrite")
    assert not marker.exists()


# ---- metadata -------------------------------------------------------------------------------------------

CODE = "float32), __import__('pathlib').Path({marker!r}).touch(), (0"  # closes the dtype argument of the old snippet


@pytest.mark.parametrize("redigest", [False, True], ids=["edited", "edited-and-redigested"])
def test_code_in_the_metadata_is_refused_before_export(copy, redigest):
    folder, marker = copy / "adapters" / "tiny", copy / "ran"
    _edit_metadata(folder, lambda m: m["base"].__setitem__("dtype", CODE.format(marker=str(marker))), redigest)
    line = error_line("export", "tiny", "--out", copy / "out", "--registry", copy / "adapters")
    if redigest:  # the schema, not the digest, is what stops someone who recomputes it
        assert line == (f"Error: {folder / 'peftkit.json'} does not hold valid peftkit metadata (base.dtype: input "
                        "should be 'float32', 'bfloat16' or 'float16'); restore the folder from a copy you trust, or "
                        "retrain the adapter")
    else:
        assert line == (f"Error: {folder / 'peftkit.json'} was edited or is corrupt (its digest does not match its "
                        "content); restore the folder from a copy you trust, or retrain the adapter")
    assert not marker.exists() and not (copy / "out").exists()


@pytest.mark.parametrize("command", ["predict", "eval", "export", "combine", "to-lora"])
@pytest.mark.parametrize("replaced", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_swapped_adapter_file_with_its_checksums_redone_is_refused_unread(copy, command, replaced):
    """Whoever swaps a file can recompute its sha256 and the digest: the file itself is checked before loading."""
    folder, marker = copy / "adapters" / "tiny", copy / "ran"
    (folder / replaced).write_bytes(pickle.dumps(Payload(marker)))

    def rechecksum(metadata: dict[str, Any]) -> None:
        from peftkit.store.artifacts import sha256_file

        metadata["files"][replaced] = sha256_file(folder / replaced)

    _edit_metadata(folder, rechecksum, redigest=True)
    registry = str(copy / "adapters")
    args = {"predict": ["predict", "a film", "--adapter", "tiny"],
            "eval": ["eval", "tiny", "--data", str(copy / "nothing.tsv")],
            "export": ["export", "tiny", "--out", str(copy / "export")],
            "combine": ["combine", "tiny", "tiny", "--weights", "0.5,0.5", "--name", "both"],
            "to-lora": ["adalora", "to-lora", "tiny", "--name", "plain"]}[command]
    line = error_line(*args, "--registry", registry)
    what = "not a safetensors file" if replaced.endswith(".safetensors") else "not valid JSON"
    assert line == (f"Error: {folder / replaced} is {what}, though its checksum was recorded so: the folder was "
                    "tampered with; restore the adapter from a source you trust, or retrain it")
    assert not marker.exists() and not (copy / "export").exists()
    assert Registry(registry).names() == ["tiny"]


def test_an_adapter_file_replaced_after_its_check_is_not_what_loads(copy, monkeypatch):
    """load_trained checks the adapter's bytes and hands peft those bytes: a weight file swapped on disk right
    after the check (a concurrent writer) does not reach the loaded model."""
    from safetensors.torch import load_file, save_file

    from peftkit.store import loading

    folder = copy / "adapters" / "tiny"
    weights_file = folder / "adapter_model.safetensors"
    original = load_file(str(weights_file))
    read = loading.read_verified

    def swapped_after_reading(*args):
        blobs = read(*args)
        save_file({k: torch.zeros_like(v) for k, v in original.items()}, str(weights_file))
        return blobs

    monkeypatch.setattr(loading, "read_verified", swapped_after_reading)
    model = load_trained(folder).model
    params = dict(model.named_parameters())
    lora = [k for k in original if ".lora_B." in k]
    assert lora and any(original[k].abs().sum() > 0 for k in lora)
    for key in lora:
        name = key.replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(params[name].detach(), original[key]), key


def test_text_from_the_metadata_reaches_the_card_as_data(copy):
    """Label names are free text: in the card's code they are string literals, and nothing runs the code."""
    folder, marker = copy / "adapters" / "tiny", copy / "ran"
    crafted = f"0'}}); __import__('pathlib').Path({str(marker)!r}).touch(); ({{'"
    _edit_metadata(folder, lambda m: m["task"]["state"].__setitem__("label_names", {"0": crafted}), redigest=True)
    out = copy / "out"
    result = export(Registry(copy / "adapters"), "tiny", "peft", out, check_rows=8)
    assert result["check"]["max_rel_diff"] < 1e-6
    card = (out / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    tree = ast.parse(code)
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    base_call = next(c for c in calls if any(k.arg == "id2label" for k in c.keywords))
    id2label = next(k.value for k in base_call.keywords if k.arg == "id2label")
    assert ast.literal_eval(id2label) == {0: crafted, 1: "1"}
    assert len(tree.body) == 6  # three imports, base, model, tokenizer: nothing added
    assert not marker.exists()


def test_metadata_of_another_format_is_one_line(copy):
    folder = copy / "adapters" / "tiny"
    path = folder / "peftkit.json"
    _edit_metadata(folder, lambda m: m.__setitem__("format_version", FORMAT_VERSION + 1), redigest=True)
    with pytest.raises(PeftkitError, match=rf"^{path} is format {FORMAT_VERSION + 1}, written by a newer peftkit"):
        read_metadata(folder)
    _edit_metadata(folder, lambda m: m.__setitem__("format_version", 1), redigest=False)
    with pytest.raises(PeftkitError, match=rf"^{path} is format 1, written by an earlier peftkit without a checksum"):
        read_metadata(folder)


def test_every_field_is_checked(copy):
    folder = copy / "adapters" / "tiny"
    original = json.loads((folder / "peftkit.json").read_text())
    bad = {
        "files.../../../etc/passwd.[key]: a file inside the folder": lambda m: m["files"].__setitem__(
            "../../../etc/passwd", "0" * 64),
        "name: adapter name '../x' is not allowed": lambda m: m.__setitem__("name", "../x"),
        "adapter.head_modules.0: string should match pattern": lambda m: m["adapter"].__setitem__(
            "head_modules", ["x')"]),
        "recipe.quantization.bits: input should be 4 or 8": lambda m: m["recipe"]["quantization"].__setitem__(
            "bits", 3),
        "surprise: extra inputs are not permitted": lambda m: m.__setitem__("surprise", 1),
        "task.type: value error, unknown task type": lambda m: m["task"].__setitem__("type", "nope"),
        # the state is typed by its head's own schema (tasks/classification.py), not a shared list of keys
        "state.format: extra inputs are not permitted (a classification head's state)": lambda m: m["task"][
            "state"].__setitem__("format", "text"),
        "state.labels.1: string should match pattern": lambda m: m["task"]["state"].__setitem__(
            "labels", ["0", "`rm -rf`"]),
    }
    for expected, edit in bad.items():
        (folder / "peftkit.json").write_text(json.dumps(original))
        _edit_metadata(folder, edit, redigest=True)
        with pytest.raises(PeftkitError) as caught:
            read_metadata(folder)
        assert expected.replace("value error, ", "") in str(caught.value), str(caught.value)
    (folder / "peftkit.json").write_text(json.dumps({**original, "metrics": {"accuracy": float("nan")}}))
    with pytest.raises(PeftkitError, match=r"peftkit.json is corrupt \(not valid JSON\)"):  # NaN is not JSON
        read_metadata(folder)
    (folder / "peftkit.json").write_text(json.dumps(original))
    assert read_metadata(folder).name == "tiny"


def test_export_format_names_match_the_schema():
    import typing

    from peftkit.config.metadata import ExportMetadata
    from peftkit.ops.export import formats

    assert typing.get_args(ExportMetadata.model_fields["format"].annotation) == tuple(formats())


def test_readers_get_the_typed_metadata_and_writers_copy_it_whole(copy):
    """What a reader gets is the typed model (attributes, not string keys), frozen, and its ``to_json`` is the
    file's own content, every key where the writer put it: what a derived adapter copies is what was checked."""
    from pydantic import ValidationError

    from peftkit.config.metadata import AdapterMetadata

    folder = copy / "adapters" / "tiny"
    metadata = read_metadata(folder)
    assert isinstance(metadata, AdapterMetadata)
    assert metadata.base.quantization.bits == metadata.recipe.quantization.bits
    assert metadata.task.head().state == metadata.task.state.to_json()
    assert metadata.to_json() == json.loads((folder / "peftkit.json").read_text())
    with pytest.raises(ValidationError, match="frozen"):
        metadata.name = "other"


def test_what_peftkit_writes_is_checked_first(copy):
    folder = copy / "adapters" / "tiny"
    metadata = read_metadata(folder).to_json()
    metadata["metrics"]["accuracy"] = float("nan")
    with pytest.raises(PeftkitError, match=r"^nothing was saved: the metadata of tiny would not be valid "
                                           r"\(metrics.accuracy: input should be a finite number\)$"):
        seal(folder, metadata)


# ---- remote code ----------------------------------------------------------------------------------------


def _remote_code_base(tiny_dir: Path, root: Path, marker: Path) -> Path:
    """The tiny BERT with Python code in its folder (config.json's auto_map) that creates ``marker`` on import."""
    base = root / "remote-bert"
    shutil.copytree(tiny_dir / "bert", base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (base / "config.json").write_text(json.dumps(config))
    (base / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nfrom transformers import BertConfig\n\n\n"
        "class EvilConfig(BertConfig):\n    pass\n")
    return base


def test_a_stored_recipe_never_turns_remote_code_on(copy, tiny_dir, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    folder, marker = copy / "adapters" / "tiny", copy / "ran"
    base = _remote_code_base(tiny_dir, copy, marker)

    def remote(m: dict[str, Any]) -> None:
        m["recipe"]["base"].update(model=str(base), trust_remote_code=True)

    _edit_metadata(folder, remote, redigest=True)
    refused = (f"Error: tiny was trained with base.trust_remote_code: true, so loading it runs code from {base}; "
               "peftkit runs such code only when you ask: pass --trust-remote-code (trust_remote_code=True) if you "
               "trust that model")
    registry = ["--registry", copy / "adapters"]
    assert error_line("predict", "good film", "--adapter", "tiny", *registry) == refused
    assert error_line("eval", "tiny", "--data", tiny_dir / "cls_dev.tsv", *registry) == refused
    assert error_line("export", "tiny", "--out", copy / "out", *registry) == refused
    with pytest.raises(PeftkitError, match=r"^tiny was trained with base.trust_remote_code: true"):
        load_trained(folder)
    assert not marker.exists()

    # the payload is live: with the user's own flag, and only then, transformers runs it
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(copy / "modules"))
    with contextlib.suppress(Exception):
        load_trained(folder, trust_remote_code=True)
    assert marker.exists()


def test_remote_code_is_off_unless_asked_even_when_the_stored_recipe_says_nothing(copy, tiny_dir):
    folder, marker = copy / "adapters" / "tiny", copy / "ran"
    base = _remote_code_base(tiny_dir, copy, marker)
    _edit_metadata(folder, lambda m: m["recipe"]["base"].__setitem__("model", str(base)), redigest=True)
    assert load_trained(folder).model is not None
    assert not marker.exists()


# ---- pickled bases --------------------------------------------------------------------------------------


def test_a_base_with_only_pickled_weights_is_refused(tiny_dir, recipe_for, tmp_path):
    base, marker = tmp_path / "pickled-bert", tmp_path / "ran"
    shutil.copytree(tiny_dir / "bert", base)
    (base / "model.safetensors").unlink()
    torch.save(Payload(marker), base / "pytorch_model.bin")
    path = write_recipe(tmp_path / "r.yaml", recipe_for(base={"model": str(base)}))
    refused = (f"Error: base.model: {base} holds only pickled weights (pytorch_model.bin), which can run code when "
               "loaded; convert them to safetensors, or set base.allow_pickle: true (--allow-pickle for a trained "
               "adapter) if you trust the file")
    assert error_line("validate", path) == refused
    assert error_line("train", path) == refused
    # opted in: torch's weights-only unpickler still refuses what is more than tensors
    assert error_line("train", path, "--set", "base.allow_pickle=true") == (
        f"Error: base.model: the pickled weights in {base} hold more than tensors, so torch's weights-only loader "
        "refused them and nothing in them ran; get the model as safetensors from a source you trust")
    assert not marker.exists()


def test_a_broken_config_json_is_one_line(tiny_dir, recipe_for, tmp_path):
    base = tmp_path / "broken-bert"
    shutil.copytree(tiny_dir / "bert", base)
    (base / "config.json").write_text('{"model_type": "bert",')
    path = write_recipe(tmp_path / "r.yaml", recipe_for(base={"model": str(base)}))
    assert error_line("validate", path) == (
        f"Error: base.model: {base / 'config.json'} is not valid JSON (line 1: Expecting property name enclosed in "
        "double quotes); restore the model's config.json")
