"""Combining adapters: every peft method runs, an adapter combined with itself comes back, heads are
averaged, AdaLoRA parents are converted, and incompatible parents are refused with a way out."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftkit.cli import main
from peftkit.config.recipe import build_recipe
from peftkit.errors import PeftkitError
from peftkit.ops.combine import combine, methods, uses_density
from peftkit.store.artifacts import seal
from peftkit.store.loading import load_trained
from peftkit.store.registry import Registry
from peftkit.train.training import train
from tests.conftest import make_recipe
from tests.test_convert import _batch, _relative


@pytest.fixture(scope="module")
def registry(tiny_dir, tmp_path_factory):
    """One registry with: a, b (LoRA r=4, different seeds), r2 (LoRA r=2) and ada (AdaLoRA), on a 4-bit base."""
    root = tmp_path_factory.mktemp("combine")
    runs = {"a": ("lora", {"seed": 1}, {}), "b": ("lora", {"seed": 2}, {}),
            "r2": ("lora", {"seed": 3}, {"r": 2}), "ada": ("adalora", {"seed": 4}, {})}
    for name, (adapter, train_opts, adapter_opts) in runs.items():
        data = make_recipe(tiny_dir, root, quant="4bit", adapter=adapter,
                           train={"max_steps": 6, "eval_at_start": False, "lr": 2e-2, **train_opts},
                           output={"name": name})
        data["adapter"].update(adapter_opts)
        train(build_recipe(data), echo=lambda line: None)
    return Registry(root / "adapters")


def _logits(registry, name, batch):
    with torch.no_grad():
        return load_trained(registry.folder(name)).model(**batch).logits


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_an_adapter_combined_with_itself_comes_back(registry, method):
    combine(registry, ["a", "a"], [0.5, 0.5], method, f"self-{method}")
    batch = _batch(load_trained(registry.folder("a")))
    assert _relative(_logits(registry, f"self-{method}", batch), _logits(registry, "a", batch)) < 1e-5


def test_every_peft_method_runs(registry):
    batch = _batch(load_trained(registry.folder("a")))
    reference = _logits(registry, "a", batch)
    for method in methods():
        name = f"ab-{method}"
        combine(registry, ["a", "b"], [0.7, 0.3], method, name, density=0.5 if uses_density(method) else None)
        got = _logits(registry, name, batch)
        assert torch.isfinite(got).all() and got.shape == reference.shape, method
        meta = registry.get(name).metadata
        assert meta.provenance["method"] == method and meta.provenance["combined_from"] == ["a", "b"]
        assert meta.provenance["weights"] == [0.7, 0.3]


def test_heads_are_averaged_and_adalora_is_converted(registry):
    combine(registry, ["a", "ada"], [3.0, 1.0], "cat", "a-ada")
    heads = [load_file(str(registry.folder(n) / "adapter_model.safetensors")) for n in ("a", "ada", "a-ada")]
    key = "base_model.model.classifier.weight"
    assert torch.allclose(heads[2][key], 0.75 * heads[0][key] + 0.25 * heads[1][key], atol=1e-7)
    provenance = registry.get("a-ada").metadata.provenance
    assert provenance["converted_from_adalora"] == ["ada"]
    assert provenance["parents"]["ada"]["files"] == registry.get("ada").metadata.files
    config = json.loads((registry.folder("a-ada") / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] and config["task_type"] == "SEQ_CLS"


def test_incompatible_parents_are_refused(registry, tmp_path):
    with pytest.raises(PeftkitError, match=r"^--method ties combines the A and B matrices entry by entry, so every "
                                           r"module of every adapter needs the same rank, but a has rank 4 in .* and "
                                           r"r2 rank 2 in .*; use --method cat \(exact, the ranks add up\) or svd"):
        combine(registry, ["a", "r2"], [0.5, 0.5], "ties", "x", density=0.5)
    combine(registry, ["a", "r2"], [0.5, 0.5], "svd", "a-r2")  # the suggested way out works

    other = Registry(tmp_path)
    for name in ("a", "b"):
        shutil.copytree(registry.folder(name), tmp_path / name)
    meta_path = tmp_path / "b" / "peftkit.json"
    meta = json.loads(meta_path.read_text())
    meta["task"]["state"]["labels"] = ["neg", "pos"]
    seal(meta_path.parent, meta)
    with pytest.raises(PeftkitError, match=r'^a and b have different head states \({"labels": \["0", "1"\]} and {"labels": \["neg", "pos"\]}\); '
                                           r"only adapters trained for the same task on the same base can be combined$"):
        combine(other, ["a", "b"], [0.5, 0.5], "linear", "x")
    meta["task"]["state"]["labels"] = ["0", "1"]
    meta["base"]["fingerprint"] = "sha256:" + "0" * 64
    seal(meta_path.parent, meta)
    with pytest.raises(PeftkitError, match=r"^a and b have different bases \(.* sha256:[0-9a-f]{12} and "
                                           r".* sha256:000000000000\)"):
        combine(other, ["a", "b"], [0.5, 0.5], "linear", "x")


def test_cli_errors(registry):
    run = lambda *args: CliRunner().invoke(main, ["combine", *args, "--registry", str(registry.root)])  # noqa: E731
    assert run("a", "b", "--weights", "0.5,0.5", "--method", "average", "--name", "x").output == (
        "Error: --method: unknown combination 'average'; use one of: " + ", ".join(methods()) + "\n")
    assert run("a", "b", "--weights", "0.5,0.5", "--method", "ties", "--name", "x").output == (
        "Error: --density: ties prunes each adapter to a fraction of its entries; give --density between 0 "
        "(exclusive) and 1, e.g. 0.5 (got None)\n")
    assert run("a", "b", "--weights", "0.5", "--name", "x").output == (
        "Error: --weights: 1 weights for 2 adapters; give one weight per adapter, e.g. --weights 0.5,0.5\n")
    assert run("a", "b", "--weights", "half,half", "--name", "x").output == (
        "Error: --weights: 'half,half' is not a comma-separated list of numbers, e.g. 0.5,0.5\n")
    done = run("a", "b", "--weights", "0.5,0.5", "--name", "ab")
    assert done.exit_code == 0 and "registered ab in" in done.output
    assert run("a", "b", "--weights", "0.5,0.5", "--name", "ab").output == (
        f"Error: adapter 'ab' already exists in {registry.root}/; choose another --name or pass --overwrite\n")
