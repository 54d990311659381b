"""Masked-LM pre-training (task.type masked_lm) and its transfer into a classifier, on a tiny BERT with an MLM head.

The tiny base here is a ``BertForMaskedLM`` (with its own MLM head, tied decoder) and a tokenizer with ``[MASK]``;
its dropout is off, so runs that differ only in how rows fall into batches can be compared weight for weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from peftkit.cli import main
from peftkit.config.recipe import build_recipe
from peftkit.errors import PeftkitError
from peftkit.ops.export import export
from peftkit.ops.merge import merge
from peftkit.serve.serving import load_server
from peftkit.store.loading import load_trained
from peftkit.store.registry import Registry
from peftkit.tasks import make_task
from peftkit.tasks.masked_lm import IGNORE
from peftkit.train.training import train
from peftkit.train.transfer import prepare_run
from tests import tiny
from tests.conftest import make_recipe
from tests.test_distributed import assert_same_adapter_weights

QUIET = {"echo": lambda line: None}


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    root = tmp_path_factory.mktemp("mlm")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128, pad_token_id=0,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForMaskedLM(config).save_pretrained(root / "bert")
    tokenizer = tiny.build_tokenizer(root / "bert")
    tokenizer.add_special_tokens({"mask_token": "[MASK]"})
    tokenizer.save_pretrained(root / "bert")
    tiny.write_text(root / "text.txt", 200, seed=4)
    tiny.write_tsv(root / "cls_train.tsv", tiny.sentiment_rows(128, seed=1))
    tiny.write_tsv(root / "cls_dev.tsv", tiny.sentiment_rows(32, seed=2))
    return root


def _recipe(mlm_dir: Path, out: Path, name: str, quant: str = "fp32", adapter: str = "lora", **train_section):
    data = make_recipe(mlm_dir, out, quant=quant, adapter=adapter)
    data["base"]["model"] = str(mlm_dir / "bert")
    data["task"] = {"type": "masked_lm"}
    data["data"] = {"train": str(mlm_dir / "text.txt"), "eval_fraction": 0.2, "max_length": 32}
    data["train"].update({"max_steps": 12, "lr": 2e-2, **train_section})
    data["output"]["name"] = name
    return data


@pytest.fixture(scope="module")
def trained(mlm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One fp32 LoRA masked-LM run, with the base's parameters before and after it."""
    from transformers import AutoModelForMaskedLM

    out = tmp_path_factory.mktemp("mlm-run")
    base = {n: p.clone() for n, p in AutoModelForMaskedLM.from_pretrained(mlm_dir / "bert").state_dict().items()}
    result = train(build_recipe(_recipe(mlm_dir, out, "mlm")), **QUIET)
    return SimpleNamespace(result=result, base=base, registry=Registry(out / "adapters"), out=out)


def _tokenizer(mlm_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(mlm_dir / "bert")


def test_masks_are_reproducible_fresh_each_epoch_and_skip_special_tokens(mlm_dir):
    tokenizer = _tokenizer(mlm_dir)
    task = make_task("masked_lm", {"mlm_probability": 0.3})
    rows = task.encode({"text": ["the king said good and the queen said again"] * 4}, tokenizer, 32)["input_ids"]
    features = [{"input_ids": ids} for ids in rows]
    first = task.train_collate(features, tokenizer, seed=7, epoch=0, rows=[0, 1, 2, 3])
    again = task.train_collate(features, tokenizer, seed=7, epoch=0, rows=[0, 1, 2, 3])
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["labels"], again["labels"])
    # a row's mask is its own: the same row index gives the same mask in another batch
    alone = task.train_collate(features[2:3], tokenizer, seed=7, epoch=0, rows=[2])
    assert torch.equal(alone["labels"][0], first["labels"][2])
    # identical texts, different rows: different masks; the next epoch and another seed: different again
    assert not all(torch.equal(first["labels"][0], first["labels"][i]) for i in range(1, 4))
    assert not torch.equal(task.train_collate(features, tokenizer, 7, 1, [0, 1, 2, 3])["labels"], first["labels"])
    assert not torch.equal(task.train_collate(features, tokenizer, 8, 0, [0, 1, 2, 3])["labels"], first["labels"])

    chosen = first["labels"] != IGNORE
    assert chosen.sum(-1).min() >= 1  # every row teaches something
    ids = torch.tensor(rows)
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    assert not (chosen & special).any()  # [CLS] and [SEP] are never chosen
    assert torch.equal(first["labels"][chosen], ids[chosen])  # labels are the original tokens
    assert torch.equal(first["input_ids"][~chosen], ids[~chosen])  # unchosen tokens are left as they were
    assert (first["input_ids"][chosen] == tokenizer.mask_token_id).float().mean() > 0.5
    # the eval mask is fixed: the same in any batch, on every call
    assert torch.equal(task.collate(features, tokenizer)["labels"], task.collate(features, tokenizer)["labels"])
    fixed = task.collate(features, tokenizer)["labels"]
    assert torch.equal(task.collate(features[1:2], tokenizer)["labels"][0], fixed[1])


def test_the_loss_reads_the_masked_tokens_only(mlm_dir):
    tokenizer = _tokenizer(mlm_dir)
    task = make_task("masked_lm", {})
    ids = task.encode({"text": ["the king said good", "a film was very dull and boring"]}, tokenizer, 32)["input_ids"]
    batch = task.train_collate([{"input_ids": i} for i in ids], tokenizer, seed=1, epoch=0, rows=[0, 1])
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, len(tokenizer))
    loss = task.loss(SimpleNamespace(logits=logits), batch)
    chosen = batch["labels"] != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[chosen], batch["labels"][chosen])
    assert torch.allclose(loss, expected)
    assert task.batch_loss_items(batch) == int(chosen.sum())
    assert torch.allclose(task.loss_sum(SimpleNamespace(logits=logits), batch), expected * chosen.sum())
    moved = logits.clone()
    moved[~chosen] += 5 * torch.randn_like(moved[~chosen])
    assert torch.equal(task.loss(SimpleNamespace(logits=moved), batch), loss)
    moved[chosen] += 5 * torch.randn_like(moved[chosen])
    assert not torch.equal(task.loss(SimpleNamespace(logits=moved), batch), loss)


def test_training_learns_moves_only_the_adapter_and_keeps_the_tied_head_frozen(trained):
    result = trained.result
    assert set(result.metrics) == {"loss", "perplexity", "accuracy"}
    assert result.metadata.adapter.head_modules == ["transform"]
    model = result.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".transform.modules_to_save." in n for n in trainable)
    assert not any("predictions.transform" in n and "lora_" in n for n in trainable)  # the head is not adapted
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.abs().max() > 0 for p in lora_b)  # every adapted layer moved off its zero start
    # the frozen base, the tied decoder and its bias included, is exactly the base it started from
    now = model.get_base_model().state_dict()
    for name, before in trained.base.items():
        if name in now:
            assert torch.equal(now[name], before), name
    decoder = model.get_base_model().cls.predictions.decoder
    assert decoder.weight is model.get_base_model().bert.embeddings.word_embeddings.weight
    assert not decoder.weight.requires_grad


def test_eval_loss_falls(trained):
    history = trained.result.metadata.history
    assert history[0]["step"] == 0 and history[-1]["step"] == 12
    assert history[-1]["loss"] < history[0]["loss"] - 0.3
    assert history[-1]["accuracy"] > history[0]["accuracy"]


def test_reload_predict_serve_and_eval(mlm_dir, trained, tmp_path):
    from peftkit.core.evaluation import evaluate_file

    folder = trained.registry.folder("mlm")
    loaded = load_trained(folder)
    tokenizer = loaded.tokenizer
    text = "the king said [MASK] and the queen [MASK] again"
    batch = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        reloaded = loaded.model(**batch).logits[0]
        trained_model = trained.result.model.eval()
        original = trained_model(**batch).logits[0]
    assert torch.allclose(reloaded, original, atol=1e-5)

    # the float32 4-bit path, as load_trained takes: the packed default rounds on AVX512-BF16
    server = load_server(trained.registry, ["mlm"], packed_inference=False)
    [prediction] = server.predict([text], "mlm")
    masks = [i for i, t in enumerate(batch["input_ids"][0].tolist()) if t == tokenizer.mask_token_id]
    assert [m["position"] for m in prediction["masks"]] == masks
    for mask in prediction["masks"]:
        probs = torch.softmax(reloaded[mask["position"]], -1)
        top = torch.topk(probs, 5)
        assert [t["id"] for t in mask["tokens"]] == top.indices.tolist()
        assert [t["score"] for t in mask["tokens"]] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert mask["tokens"][0]["token"] == tokenizer.convert_ids_to_tokens(top.indices[0].item())
    assert "[MASK]" not in prediction["filled"]
    # its LoRA weights and transform; the decoder it shares with the base is the base's
    own = sum(p.numel() * p.element_size() for p in trained_model.parameters() if p.requires_grad)
    assert server.memory()["adapters"]["mlm"] == own

    # `peftkit predict` prints the same as JSON lines
    result = CliRunner().invoke(main, ["predict", "--adapter", "mlm", "--registry", str(trained.registry.root), text])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1]) == {"row": 0, "text": text, **prediction}

    # peftkit eval on a file of the same kind of text: far below the untrained model's loss
    rows = (mlm_dir / "text.txt").read_text().split("\n\n")
    (tmp_path / "eval.txt").write_text("\n\n".join(rows[:40]))
    scores = evaluate_file(loaded, str(tmp_path / "eval.txt"))["metrics"]
    assert set(scores) == {"loss", "perplexity", "accuracy"}
    assert scores["loss"] < trained.result.metadata.history[0]["loss"] - 0.3
    assert scores == evaluate_file(loaded, str(tmp_path / "eval.txt"))["metrics"]  # the eval mask is fixed


@pytest.fixture(scope="module")
def classifier(mlm_dir, trained) -> str:
    """A classifier on the same base, in the same registry."""
    data = make_recipe(mlm_dir, trained.out, train={"max_steps": 2, "eval_at_start": False})
    data["base"]["model"] = str(mlm_dir / "bert")
    data["output"]["name"] = "classifier"
    train(build_recipe(data), **QUIET)
    return "classifier"


def test_serving_refuses_to_mix_with_a_classifier(trained, classifier):
    with pytest.raises(PeftkitError, match=r"^mlm needs the base loaded as AutoModelForMaskedLM and classifier as "
                                           r"AutoModel; serve them in separate servers$"):
        load_server(trained.registry, ["mlm", "classifier"])


def test_merge_and_export_say_fill_mask(trained, tmp_path):
    merged = merge(trained.registry, "mlm", tmp_path / "merged", rows=16)
    assert merged.drift["max_rel_diff"] < 1e-5 and merged.drift["label_agreement"] == 1.0
    config = json.loads((merged.folder / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"]
    card = (merged.folder / "README.md").read_text()
    assert "pipeline_tag: fill-mask" in card and "AutoModelForMaskedLM.from_pretrained(" in card

    result = export(trained.registry, "mlm", "peft", tmp_path / "export", check_rows=16)
    assert result["check"]["max_rel_diff"] < 1e-5
    card = (tmp_path / "export" / "README.md").read_text()
    assert "pipeline_tag: fill-mask" in card and "AutoModelForMaskedLM.from_pretrained(" in card


def test_accumulating_2_batches_of_8_equals_one_batch_of_16(mlm_dir, tmp_path):
    """The loss is a mean over the masked tokens of the whole step, and each row's mask is its own."""
    runs = {}
    for label, batch, accum in (("accumulated", 8, 2), ("whole", 16, 1)):
        data = _recipe(mlm_dir, tmp_path / label, "acc", max_steps=3, batch_size=batch, grad_accum=accum,
                       group_by_length=False, eval_at_start=False)
        data["data"]["max_length"] = 16  # rows of different lengths: micro-batches count different tokens
        runs[label] = train(build_recipe(data), **QUIET).adapter_dir
    assert_same_adapter_weights(runs["accumulated"], runs["whole"])


def test_4bit_adalora_keeps_the_head_in_full_precision(mlm_dir, tmp_path):
    from torch import nn

    result = train(build_recipe(_recipe(mlm_dir, tmp_path, "ada4", quant="4bit", adapter="adalora",
                                        max_steps=6, eval_at_start=False)), **QUIET)
    assert result.metadata.adapter.method == "adalora" and result.metrics["loss"] < 10
    base = result.model.get_base_model()
    assert type(base.cls.predictions.decoder) is nn.Linear
    assert type(base.cls.predictions.transform.modules_to_save["default"].dense) is nn.Linear
    assert "Linear4bit" in type(base.bert.encoder.layer[0].attention.self.query.base_layer).__name__


def test_a_classifier_starts_from_a_masked_lm_adapter(mlm_dir, trained):
    data = make_recipe(mlm_dir, trained.out, train={"max_steps": 2, "eval_at_start": False})
    data["base"]["model"] = str(mlm_dir / "bert")
    data["output"]["name"] = "from-mlm"
    data["adapter"]["init_from"] = "mlm"
    _, built = prepare_run(build_recipe(data), torch.device("cpu"))
    parent = {n.replace(".default", ""): p for n, p in trained.result.model.named_parameters() if "lora_" in n}
    child = {n.replace(".default", ""): p for n, p in built.model.named_parameters() if "lora_" in n}
    # every LoRA weight carries over; the classifier's pooler (which a masked-LM model has not) starts afresh
    assert parent.keys() < child.keys() and {k.split(".")[3] for k in child.keys() - parent.keys()} == {"pooler"}
    assert all(torch.equal(parent[k], child[k]) for k in parent)
    assert built.provenance["init_from"] == "mlm" and built.provenance["head"] == "reinitialised"
    assert not any("transform" in n for n, _ in built.model.named_parameters())

    data["adapter"]["init_head"] = "keep"
    with pytest.raises(PeftkitError, match=r"^adapter.init_head: keep needs the same task and labels as mlm \(a "
                                           r"masked_lm head there, a classification head here\); set "
                                           r"adapter.init_head: reinit$"):
        prepare_run(build_recipe(data), torch.device("cpu"))


def test_a_masked_lm_cannot_start_from_a_classifier_with_a_pooler(mlm_dir, trained, classifier):
    data = _recipe(mlm_dir, trained.out, "mlm-from-classifier")
    data["adapter"]["init_from"] = classifier
    with pytest.raises(PeftkitError, match=r"^adapter.init_from: classifier adapts modules this model does not have "
                                           r"\(base_model.model.bert.pooler.dense.lora_A.weight\); its classification "
                                           r"model has modules a masked_lm model lacks$"):
        prepare_run(build_recipe(data), torch.device("cpu"))


def test_a_base_without_a_mask_token_is_refused(tiny_dir, tmp_path):
    data = make_recipe(tiny_dir, tmp_path)
    data["task"] = {"type": "masked_lm"}
    data["data"] = {"train": str(tiny_dir / "text.txt"), "eval_fraction": 0.2}
    with pytest.raises(PeftkitError, match=r"^task.type: masked_lm needs a tokenizer with a mask token"):
        train(build_recipe(data), **QUIET)
