"""T5-family (encoder-decoder) bases end to end on a tiny T5: seq2seq and classification adapters, LoRA and AdaLoRA,
4-bit and 8-bit; reload, eval, many adapters on one served base, merge and export."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit.config.recipe import build_recipe
from peftkit.core.evaluation import evaluate_file
from peftkit.core.models import load_base_for_task, resolve_base
from peftkit.errors import PeftkitError
from peftkit.ops.export import export
from peftkit.ops.merge import merge
from peftkit.serve.predict_io import route
from peftkit.serve.serving import load_server
from peftkit.store.loading import load_trained
from peftkit.store.registry import Registry
from peftkit.train.training import train
from tests import tiny
from tests.conftest import ADAPTERS, QUANTIZATION
from tests.test_convert import _batch, _relative
from tests.tiny_t5 import build_t5, write_copy_tsv

QUIET = {"echo": lambda line: None}
TEXTS = ["the film was good and great", "king queen river town", "bad awful dull plot", "a movie"]
# name -> (task section, quantization, adapter method, learning rate)
RUNS = {
    "s2s4": ({"type": "seq2seq", "prefix": "copy: ", "eval_generate_rows": 4, "max_new_tokens": 6}, "4bit", "lora",
             3e-2),
    "cls4": ({"type": "classification"}, "4bit", "lora", 5e-3),
    "s2s8ada": ({"type": "seq2seq", "eval_generate_rows": 4, "max_new_tokens": 6}, "8bit", "adalora", 3e-2),
}


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """The tiny T5, its data, and one trained adapter per run of RUNS (results kept: their models are compared)."""
    root = tmp_path_factory.mktemp("t5")
    build_t5(root / "t5")
    write_copy_tsv(root / "copy_train.tsv", 64, seed=1)
    write_copy_tsv(root / "copy_dev.tsv", 8, seed=2)
    tiny.write_tsv(root / "cls_train.tsv", tiny.sentiment_rows(64, seed=1))
    tiny.write_tsv(root / "cls_dev.tsv", tiny.sentiment_rows(16, seed=2))
    results = {}
    for name, (task, quant, method, lr) in RUNS.items():
        kind = "copy" if task["type"] == "seq2seq" else "cls"
        recipe = {
            "base": {"model": str(root / "t5")}, "task": task,
            "data": {"train": str(root / f"{kind}_train.tsv"), "eval": str(root / f"{kind}_dev.tsv"),
                     "max_length": 16},
            "quantization": copy.deepcopy(QUANTIZATION[quant]), "adapter": copy.deepcopy(ADAPTERS[method]),
            "train": {"epochs": 1, "max_steps": 4, "batch_size": 16, "lr": lr, "progress": False, "seed": 7,
                      "eval_at_start": True},
            "output": {"name": name, "registry": str(root / "adapters"), "runs": str(root / "runs")},
        }
        results[name] = train(build_recipe(recipe), **QUIET)
    return root, Registry(root / "adapters"), results


@pytest.fixture(scope="module")
def loaded(t5):
    """name -> the adapter loaded back onto a fresh base (once per module: every load quantizes the base again)."""
    _, registry, _ = t5
    cache = {}

    def load(name):
        if name not in cache:
            cache[name] = load_trained(registry.folder(name))
        return cache[name]

    return load


def _is_head(name: str) -> bool:
    return "classification_head" in name


@pytest.mark.parametrize("name", list(RUNS))
def test_training_lowers_loss_moves_only_adapter_and_head_and_reloads(t5, loaded, name):
    root, registry, results = t5
    result = results[name]
    history = result.metadata.history
    assert history[0]["step"] == 0 and history[-1]["step"] == 4
    assert history[-1]["loss"] < history[0]["loss"] - 1e-3, history

    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    grown = ".lora_E" if RUNS[name][2] == "adalora" else ".lora_B."  # both start at zero
    moved = [k for k in saved if grown in k and saved[k].numel()]  # AdaLoRA saves a pruned module empty
    assert moved and all(saved[k].abs().max() > 0 for k in moved)
    assert {_is_head(k) for k in saved if ".lora_" not in k} <= {True}
    assert any(_is_head(k) for k in saved) == (name == "cls4")

    # every frozen tensor equals a freshly loaded base's, quantized bytes included
    reloaded = loaded(name)
    fresh = load_base_for_task(reloaded.recipe, reloaded.task, resolve_base(reloaded.recipe.base),
                               reloaded.tokenizer, torch.device("cpu")).state_dict()
    compared = 0
    for key, tensor in result.model.state_dict().items():
        if ".lora_" in key or ".ranknum" in key or "modules_to_save" in key or "original_module" in key:
            continue
        plain = key.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(fresh[plain], tensor), f"{key} changed in training"
        compared += 1
    assert compared >= len([k for k in fresh if not _is_head(k)]) - 2
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)

    result.model.eval()
    batch = _batch(reloaded, n=6)
    with torch.no_grad():
        expected, got = result.model(**batch).logits, reloaded.model(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # AdaLoRA reloads shrunk: same sums


@pytest.mark.parametrize("name, bits_class", [("s2s4", "Linear4bit"), ("s2s8ada", "Linear8bitLt")])
def test_quantized_t5_keeps_wo_and_heads_in_float32_and_reports_it(t5, loaded, name, bits_class):
    """transformers keeps T5's feed-forward output ``wo`` out of quantization (``_keep_in_fp32_modules``): peftkit
    keeps that choice, and the memory it reports is what the model holds, ``wo`` at 4 bytes a weight."""
    _, registry, results = t5
    model = results[name].model.get_base_model()
    layers = dict(model.named_modules())
    for block in ("encoder.block.0.layer.0.SelfAttention.q", "decoder.block.1.layer.2.DenseReluDense.wi_0"):
        assert type(layers[block].base_layer).__name__ == bits_class
    wo = [m.base_layer for n, m in layers.items() if n.endswith("DenseReluDense.wo")]
    assert len(wo) == 4 and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in wo)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    memory = results[name].metadata.base.memory_bytes
    reloaded = loaded(name)
    fresh = load_base_for_task(reloaded.recipe, reloaded.task, resolve_base(reloaded.recipe.base),
                               reloaded.tokenizer, torch.device("cpu"))
    assert memory == fresh.get_memory_footprint()
    assert memory > sum(m.weight.numel() * 4 for m in wo)


def test_eval_reports_loss_and_generation_scores(t5, loaded):
    root, _, results = t5
    report = evaluate_file(loaded("s2s4"), str(root / "copy_dev.tsv"))
    final = results["s2s4"].metadata.history[-1]
    assert set(report["metrics"]) == {"loss", "perplexity", "exact_match", "rougeL"}
    assert report["metrics"]["loss"] == pytest.approx(final["loss"], rel=1e-5)
    assert report["metrics"]["rougeL"] == pytest.approx(final["rougeL"], abs=1e-9)
    assert 0.0 <= report["metrics"]["exact_match"] <= report["metrics"]["rougeL"] <= 1.0


def _alone_logits(alone) -> list[torch.Tensor]:
    """What a classifier gives on its own (peft + transformers), rows one by one."""
    with torch.no_grad():
        return [alone.model(**alone.tokenizer([t], return_tensors="pt")).logits[0] for t in TEXTS]


def _alone_generations(alone) -> list[str]:
    """What a seq2seq adapter writes on its own (peft + transformers' generate)."""
    task = alone.task
    return task.generate(alone.model, alone.tokenizer,
                         [task.source_ids(t, alone.tokenizer, alone.recipe.data.max_length) for t in TEXTS])


def test_one_served_t5_base_mixes_classification_and_seq2seq_rows(t5, loaded):
    _, registry, _ = t5
    # the float32 4-bit path, as load_trained takes: the packed default rounds on AVX512-BF16
    server = load_server(registry, ["s2s4", "cls4"], packed_inference=False)
    names = ["cls4", "s2s4", "cls4", "s2s4"]
    predictions = server.predict(TEXTS, names)
    # a T5 classifier on the shared base: its dense -> tanh -> out_proj head on the decoder's last EOS state
    cls = _alone_logits(loaded("cls4"))
    for i in (0, 2):
        logits = server.outputs([TEXTS[i]], "cls4")[0]
        assert _relative(logits, cls[i]) < 1e-5
        assert predictions[i]["label"] == str(int(cls[i].argmax()))
    # a seq2seq adapter predicts its greedy output, with its task.prefix, as it does alone
    written = _alone_generations(loaded("s2s4"))
    assert [predictions[i]["output"] for i in (1, 3)] == [written[1], written[3]]
    assert any(written), "the tiny adapter writes something after 4 steps"

    # generate: seq2seq rows and the base's own rows in one batch, each as alone
    mixed = server.generate(TEXTS, ["s2s4", "base", "s2s4", "base"], max_new_tokens=6)
    assert [mixed[0], mixed[2]] == [written[0], written[2]]
    base = server.generate([TEXTS[1], TEXTS[3]], "base", max_new_tokens=6)
    assert [mixed[1], mixed[3]] == base
    assert base != [written[1], written[3]]
    with pytest.raises(PeftkitError, match=r"^adapter cls4 is a classification adapter; generate needs text-to-text "
                                           r"adapters \(use `peftkit predict --adapter cls4`\)$"):
        server.generate(TEXTS[:1], "cls4")
    with pytest.raises(PeftkitError, match=r"^adapter base: an encoder-decoder base has no head of its own"):
        server.predict(TEXTS[:1], "base")
    # `peftkit predict --input` finds a seq2seq adapter's text in its source column, as training did
    rows = datasets.Dataset.from_dict({"source": TEXTS[:2], "target": ["say a", "say b"]})
    fields, routed, _ = route(server, ["s2s4"], rows, "in.tsv", {})
    assert fields == [{"text": TEXTS[0]}, {"text": TEXTS[1]}] and routed == ["s2s4", "s2s4"]


def test_merge_and_export_carry_the_task_to_the_card(t5, tmp_path):
    _, registry, _ = t5
    merged = merge(registry, "s2s4", tmp_path / "merged", rows=8)
    assert merged.drift["max_rel_diff"] < 1e-5 and merged.drift["label_agreement"] == 1.0
    card = (tmp_path / "merged" / "README.md").read_text()
    assert re.search(r"^pipeline_tag: text2text-generation$", card, re.M)
    assert "AutoModelForSeq2SeqLM" in card

    result = export(registry, "cls4", "peft", tmp_path / "export", check_rows=8)
    assert result["check"]["max_rel_diff"] < 1e-5 and result["check"]["label_agreement"] == 1.0
    card = (tmp_path / "export" / "README.md").read_text()
    assert re.search(r"^pipeline_tag: text-classification$", card, re.M)
    assert "AutoModelForSequenceClassification" in card
