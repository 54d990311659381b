"""Export in peft format: loaded in a fresh process with plain transformers + peft (the model card's own
code), it predicts what peftkit predicts; and the bad inputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from peftkit.cli import main
from peftkit.config.recipe import build_recipe
from peftkit.core.cpu_paths import PACKED_BF16, cpu_model, plain_peft_path
from peftkit.errors import PeftkitError
from peftkit.ops.export import export
from peftkit.store.loading import load_trained
from peftkit.store.registry import Registry
from peftkit.train.training import train
from tests.conftest import make_recipe
from tests.cpu_paths import PATHS, path_ran
from tests.test_convert import _relative
from tests.tiny import sentiment_rows

# runs the README's python block, then predicts; peftkit must not be imported on the way
FRESH_PROCESS = """
import json, re, sys
card = open(sys.argv[1] + "/README.md").read()
exec(re.search(r"```python\\n(.*?)```", card, re.S).group(1))
assert not any(m == "peftkit" or m.startswith("peftkit.") for m in sys.modules), "peftkit was imported"
sentences = json.loads(sys.argv[2])
if sys.argv[3] == "dequantized":  # bitsandbytes' own switch for its packed bfloat16 CPU path (see cpu_paths)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
batch = tokenizer(sentences, padding=True, return_tensors="pt")
with torch.no_grad():
    print(json.dumps(model(**batch).logits.tolist()))
"""


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    registries = {}
    for name, quant, adapter in [("lora4", "4bit", "lora"), ("ada", "fp32", "adalora")]:
        data = make_recipe(tiny_dir, root / name, quant=quant, adapter=adapter,
                           train={"max_steps": 8, "eval_at_start": False, "lr": 2e-2}, output={"name": name})
        registries[name] = Registry(train(build_recipe(data), echo=lambda line: None).adapter_dir.parent)
    return registries


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["lora4", "ada"])
def test_export_loads_in_a_fresh_process_with_the_same_predictions(adapters, name, path, tmp_path):
    registry = adapters[name]
    out = tmp_path / "export"
    result = export(registry, name, "peft", out)
    # the check puts peftkit on the path plain peft takes on this CPU, so the two agree to float rounding
    check = result["check"]
    four_bit = name == "lora4"
    assert check["cpu_4bit_path"] == (plain_peft_path() if four_bit else None)
    assert check["max_rel_diff"] < 1e-6 and check["label_agreement"] == 1.0, check

    sentences = [row["sentence"] for row in sentiment_rows(24, seed=5)]
    loaded = load_trained(registry.folder(name), packed_inference=path == PACKED_BF16)
    batch = loaded.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = loaded.model(**batch).logits
    env = {**os.environ, "PYTHONPATH": ""}
    fresh = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(out), json.dumps(sentences), path], env=env,
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    got = torch.tensor(json.loads(fresh.stdout.strip().splitlines()[-1]))
    ran = path_ran(loaded.model) if four_bit else "no 4-bit layer"
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist(), f"peftkit on the {ran} path"
    difference = _relative(got, expected)
    # the same logits: the trained head travelled with the adapter
    assert difference < 1e-5, f"fresh plain peft against peftkit, both on the {ran} path: {difference:.2e}"
    assert ran == (path if four_bit else "no 4-bit layer")

    card = (out / "README.md").read_text()
    header = card.split("---")[1]
    assert re.search(r"^library_name: peft$", header, re.M) and re.search(r"^base_model: ", header, re.M)
    assert "- accuracy" in header and "pipeline_tag: text-classification" in header
    assert "num_labels=2, id2label={0: '0', 1: '1'}" in card
    assert ("BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'" in card) == (name == "lora4")
    assert json.loads((out / "peftkit.json").read_text())["exported_from"] == name
    # the data were local files: named in the text, not under the hub's datasets key (which links hub ids)
    assert "datasets:" not in header and "## Training data" in card
    # a 4-bit adapter's card says what a CPU user should expect; the export check's own path is named there
    assert ("## 4-bit layers on a CPU" in card) == four_bit
    if four_bit:
        assert f"This export was checked on {cpu_model()}, on the {check['cpu_4bit_path']} path: " in card


def test_card_lists_hub_data_sets_by_id_and_local_files_in_the_text():
    from peftkit.config.recipe import DataSection
    from peftkit.ops.model_card import _data_sets

    data = DataSection.model_validate({"train": "stanfordnlp/sst2", "eval": "data/dev.tsv",
                                       "also": [{"train": "/abs/rte/train.jsonl"}, {"train": "ag_news"}]})
    assert _data_sets(data) == (["stanfordnlp/sst2", "ag_news"], ["data/dev.tsv", "/abs/rte/train.jsonl"])


def test_bad_input_is_one_line(adapters, tmp_path):
    registry = str(adapters["lora4"].root)
    run = lambda *args: CliRunner().invoke(main, [*args, "--registry", registry])  # noqa: E731
    out = tmp_path / "e"
    assert run("export", "lora4", "--format", "onnx", "--out", str(out)).output == (
        "Error: --format: unknown format 'onnx'; use one of: peft, gguf\n")
    ok = run("export", "lora4", "--out", str(out), "--check", "0")
    assert ok.exit_code == 0 and f"saved {out} (" in ok.output
    assert run("export", "lora4", "--out", str(out)).output == (
        f"Error: --out {out} already exists; choose another folder or pass --force to replace it\n")
    assert run("export", str(out), "--out", str(tmp_path / "f")).output == (
        f"Error: {out} is an export of adapter lora4; export the registered adapter instead: "
        "peftkit export lora4 --out DIR\n")
    assert run("export", "lora5", "--out", str(tmp_path / "g")).output == (
        f"Error: no adapter named 'lora5' in {registry}/; did you mean lora4?\n")


def test_an_adapter_replaced_while_it_is_exported_is_refused(adapters, tmp_path, monkeypatch):
    """The export's files are the bytes checked against the metadata; if the adapter the check loads is no longer
    that one (replaced by a retrain in between), nothing is written."""
    import peftkit.store.loading as loading

    real = loading.load_trained

    def replaced_meanwhile(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded.metadata = loaded.metadata.model_copy(update={"digest": "0" * 64})
        return loaded

    monkeypatch.setattr(loading, "load_trained", replaced_meanwhile)
    out = tmp_path / "e"
    with pytest.raises(PeftkitError, match=r"^lora4 was replaced while it was being read; nothing was written"):
        export(adapters["lora4"], "lora4", "peft", out, check_rows=4)
    assert not out.exists()
