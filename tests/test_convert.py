"""AdaLoRA -> LoRA conversion: same outputs, smaller file, loadable by plain peft, usable in a mixed batch."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from peftkit.cli import main
from peftkit.config.recipe import build_recipe
from peftkit.core.cpu_paths import DEQUANTIZED, PACKED_BF16
from peftkit.errors import PeftkitError
from peftkit.ops.convert import to_lora
from peftkit.store.artifacts import seal
from peftkit.store.loading import load_trained
from peftkit.store.registry import Registry
from peftkit.train.training import train
from tests.conftest import make_recipe, write_recipe
from tests.cpu_paths import PATHS, path_ran, put_on_path

QUIET = {"echo": lambda line: None}


def _batch(loaded, n=16):
    from peftkit.core.data import encode, load_task_data

    raw = load_task_data(loaded.recipe.data, loaded.task, 0)
    rows = encode(raw.eval, loaded.task, loaded.tokenizer, loaded.recipe.data.max_length)
    return loaded.task.model_inputs(loaded.task.collate([rows[i] for i in range(n)], loaded.tokenizer))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def adalora_runs(tiny_dir, tmp_path_factory):
    """AdaLoRA adapters named "ada", trained once per quantization for the whole module."""
    runs = {}

    def trained(quant):
        if quant not in runs:
            data = make_recipe(tiny_dir, tmp_path_factory.mktemp(f"ada-{quant}"), quant=quant, adapter="adalora",
                               train={"eval_at_start": False, "lr": 2e-2, "epochs": 2}, output={"name": "ada"})
            runs[quant] = train(build_recipe(data), **QUIET)
        return runs[quant]

    return trained


@pytest.fixture(params=["fp32", "4bit"])
def trained_adalora(request, adalora_runs, tmp_path):
    """The trained "ada" in a registry of this test's own (``recipe_for``'s), so tests may add to it."""
    result = adalora_runs(request.param)
    shutil.copytree(result.adapter_dir.parent, tmp_path / "adapters")
    return Registry(tmp_path / "adapters"), result


@pytest.mark.parametrize("path", PATHS)
def test_conversion_is_exact_smaller_and_plain_peft(trained_adalora, path, tmp_path):
    registry, result = trained_adalora
    folder = to_lora(registry, "ada", "ada-lora")

    packed = path == PACKED_BF16
    source = load_trained(registry.folder("ada"), packed_inference=packed)
    converted = load_trained(folder, packed_inference=packed)
    batch = _batch(source)
    with torch.no_grad():
        expected, got = source.model(**batch).logits, converted.model(**batch).logits
    assert _relative(got, expected) < 1e-5
    assert (folder / "adapter_model.safetensors").stat().st_size < \
        (registry.folder("ada") / "adapter_model.safetensors").stat().st_size

    config = json.loads((folder / "adapter_config.json").read_text())
    ranks = result.metadata.adapter.adalora.final_ranks
    assert config["peft_type"] == "LORA"
    assert config["rank_pattern"] == {m: r for m, r in ranks.items() if r > 0}
    meta = registry.get("ada-lora").metadata
    assert meta.provenance["converted_from"] == "ada" and meta.adapter.method == "lora"
    assert meta.provenance["dropped_modules"] == sorted(m for m, r in ranks.items() if r == 0)

    # plain peft, no peftkit in the loading path
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from peftkit.core.models import bnb_config

    base = AutoModelForSequenceClassification.from_pretrained(
        source.recipe.base.model, num_labels=2,
        quantization_config=bnb_config(source.recipe.quantization, ["classifier"]))
    plain = PeftModel.from_pretrained(put_on_path(base, path), folder).eval()
    with torch.no_grad():
        difference = _relative(plain(**batch).logits, expected)
    # the same bitsandbytes path on both sides (or no 4-bit layer at all): only float reordering may differ
    ran = path_ran(plain), path_ran(source.model)
    assert difference < 1e-5, f"plain peft ({ran[0]} path) against peftkit ({ran[1]} path): {difference:.2e}"
    assert ran[0] == ran[1] == (path if result.metadata.base.quantization.bits == 4 else DEQUANTIZED)


def test_converted_adapter_joins_a_mixed_batch(trained_adalora, recipe_for):
    registry, result = trained_adalora
    to_lora(registry, "ada", "ada-lora")
    quant = "4bit" if result.metadata.base.quantization.bits else "fp32"
    data = recipe_for(quant=quant, adapter="lora", train={"eval_at_start": False, "max_steps": 4},
                      output={"name": "other", "registry": str(registry.root)})
    train(build_recipe(data), **QUIET)

    first = load_trained(registry.folder("ada-lora"))
    other = load_trained(registry.folder("other"))
    batch = _batch(first, n=8)
    with torch.no_grad():
        alone_first = first.model(**batch).logits
        alone_other = other.model(**batch).logits
    model = first.model
    model.load_adapter(str(registry.folder("other")), adapter_name="other")
    names = ["default", "other"] * 4
    with torch.no_grad():
        mixed = model(**batch, adapter_names=names).logits
    for i, name in enumerate(names):
        expected = alone_first[i] if name == "default" else alone_other[i]
        assert _relative(mixed[i], expected) < 1e-5, (i, name)


def test_refuses_what_is_not_adalora(recipe_for):
    data = recipe_for(adapter="lora", train={"max_steps": 2, "eval_at_start": False}, output={"name": "plain"})
    result = train(build_recipe(data), **QUIET)
    registry = Registry(result.adapter_dir.parent)
    with pytest.raises(PeftkitError, match=r"^plain is a lora adapter; `adalora to-lora` converts AdaLoRA adapters only$"):
        to_lora(registry, "plain", "x")
    with pytest.raises(PeftkitError, match=r"^no adapter named 'plian' in .*; did you mean plain\?$"):
        to_lora(registry, "plian", "x")


def test_cli_converts_and_warns_when_the_budget_was_never_reached(recipe_for, tmp_path):
    data = recipe_for(adapter="adalora", train={"eval_at_start": False, "max_steps": 6}, output={"name": "early"})
    recipe = write_recipe(tmp_path / "early.yaml", data)
    runner = CliRunner()
    assert runner.invoke(main, ["train", str(recipe)]).exit_code == 0
    registry = data["output"]["registry"]
    # an adapter whose run ended before the final phase (as a hand-driven peft run can): its metadata says so
    meta_path = tmp_path / "adapters" / "early" / "peftkit.json"
    meta = json.loads(meta_path.read_text())
    meta["adapter"]["adalora"]["target_budget"] -= 5
    seal(meta_path.parent, meta)
    result = runner.invoke(main, ["adalora", "to-lora", "early", "--name", "early-lora", "--registry", registry])
    assert result.exit_code == 0, result.output
    kept = meta["adapter"]["adalora"]["final_budget"]
    assert (f"Warning: early stopped before its final budget ({kept} ranks kept, target {kept - 5}); "
            f"converting the {kept} ranks it kept") in result.output
    assert "registered early-lora: plain LoRA" in result.output
    shown = runner.invoke(main, ["adapters", "show", "early", "--registry", registry])
    assert "AdaLoRA ranks:" in shown.output and "files: ok" in shown.output
    assert "the budget was not reached" in shown.output


def test_training_leaves_a_rank_heatmap(trained_adalora):
    registry, _ = trained_adalora
    png = registry.folder("ada") / "rank_heatmap.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
