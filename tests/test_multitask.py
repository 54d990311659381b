"""Several data sets trained into one adapter from one recipe (``data.also``), with metrics per data set."""

from __future__ import annotations

import pytest
import torch

from peftkit.config.recipe import build_recipe
from peftkit.core.evaluation import in_row_order
from peftkit.errors import PeftkitError, RecipeError
from peftkit.train.training import train
from tests import tiny

QUIET = {"echo": lambda line: None}


@pytest.fixture
def second_set(tmp_path):
    rows = [{"review": r["sentence"], "stars": ["neg", "pos"][r["label"]]} for r in tiny.sentiment_rows(96, seed=9)]
    return tiny.write_tsv(tmp_path / "reviews.tsv", rows)


def test_two_data_sets_one_shared_head_when_asked(recipe_for, second_set):
    data = recipe_for(train={"max_steps": 6, "eval_at_start": False})
    data["task"]["labels"] = ["0", "1", "neg", "pos"]
    data["data"]["name"] = "tiny"
    data["data"]["heads"] = "shared"
    data["data"]["also"] = [{"train": str(second_set), "eval_fraction": 0.25,
                             "columns": {"text": "review", "label": "stars"}, "max_train_samples": 50}]
    result = train(build_recipe(data), **QUIET)
    metrics = result.metrics
    assert {"tiny/accuracy", "reviews/accuracy", "accuracy"} <= set(metrics)
    assert result.metadata.training.train_rows == 256 + 50
    n_tiny, n_reviews = 64, 24
    pooled = (metrics["tiny/accuracy"] * n_tiny + metrics["reviews/accuracy"] * n_reviews) / (n_tiny + n_reviews)
    assert metrics["accuracy"] == pytest.approx(pooled)
    assert result.metadata.task.state.labels == ["0", "1", "neg", "pos"]


def test_pooled_data_sets_must_agree(recipe_for, second_set, tmp_path):
    data = recipe_for(train={"max_steps": 1})
    data["data"]["also"] = [{"train": str(second_set), "columns": {"text": "review"}}]
    with pytest.raises(PeftkitError, match=r"^data.also\[0\].columns.label: no column for 'label' in .*reviews.tsv"):
        train(build_recipe(data), **QUIET)
    pairs = tiny.write_tsv(tmp_path / "pairs.tsv", tiny.sentiment_rows(32, seed=4, pair=True))
    data["data"]["also"] = [{"train": str(pairs)}]
    data["data"]["heads"] = "shared"  # one head per data set reads what each data set has
    with pytest.raises(PeftkitError, match=r"^data.also\[0\].train: .*pairs.tsv gives the task label, text, text_pair "
                                           r"but data.train gives label, text; .*map them with data.also\[0\].columns\)$"):
        train(build_recipe(data), **QUIET)
    data["data"]["heads"] = "per_dataset"
    data["data"]["also"] = [{"train": str(tmp_path / "cls_train.tsv")}]
    data["data"]["train"] = str(tmp_path / "cls_train.tsv")
    (tmp_path / "cls_train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    with pytest.raises(RecipeError, match=r"two data sets are called 'cls_train'"):
        build_recipe(data)
    data["data"]["also"] = [{"train": str(second_set), "max_lenght": 5}]
    with pytest.raises(RecipeError, match=r"data.also.0.max_lenght|data.also\[0\].max_lenght"):
        build_recipe(data)


def test_rows_gathered_from_processes_come_back_in_file_order():
    n_rows, batch_size, world = 10, 3, 2
    # process 0 evaluated batches 0 and 2 (rows 0-2, 6-8), process 1 batches 1 and 3 (rows 3-5, 9)
    gathered = torch.tensor([0, 1, 2, 6, 7, 8, 3, 4, 5, 9])
    restored = in_row_order({"row": gathered}, n_rows, batch_size, world)
    assert restored["row"].tolist() == list(range(10))


# ---- one head per data set (the default) ------------------------------------------------------------------------

def _three_sets(recipe_for, tiny_dir, tmp_path, **train):
    """Sentiment (labels 0/1), a regression (scores), and sentence pairs whose labels are also spelled 0/1."""
    pairs = tiny.write_tsv(tmp_path / "pairs.tsv", tiny.sentiment_rows(96, seed=21, pair=True))
    data = recipe_for(quant="4bit", train={"max_steps": 6, "eval_at_start": False, "lr": 2e-2, **train})
    data["data"].update(name="sent", also=[
        {"name": "score", "train": str(tiny_dir / "reg_train.tsv"), "eval": str(tiny_dir / "reg_dev.tsv"),
         "max_train_samples": 96, "task": {"type": "regression"}},
        {"name": "pairs", "train": str(pairs), "eval_fraction": 0.25},
    ])
    return data


def test_a_head_per_data_set_keeps_colliding_labels_apart_and_mixes_task_types(recipe_for, tiny_dir, tmp_path):
    from peftkit.store.loading import load_trained

    result = train(build_recipe(_three_sets(recipe_for, tiny_dir, tmp_path)), **QUIET)
    meta = result.metadata
    assert meta.task.type == "multi_task"
    heads = meta.task.state.to_json()["heads"]
    assert [(h["name"], h["type"]) for h in heads] == [("sent", "classification"), ("score", "regression"),
                                                       ("pairs", "classification")]
    assert heads[0]["state"]["labels"] == heads[2]["state"]["labels"] == ["0", "1"]  # two heads, not one merged
    metrics = result.metrics
    assert {"sent/accuracy", "score/pearson", "score/mse", "pairs/accuracy", "score", "loss"} <= set(metrics)
    assert "accuracy" not in metrics  # no accuracy over rows of different heads
    assert metrics["score"] == pytest.approx((metrics["sent/accuracy"] + metrics["score/pearson"]
                                              + metrics["pairs/accuracy"]) / 3)
    # one linear layer, the heads as its slices: 2 + 1 + 2 outputs, named by data set
    model = load_trained(result.adapter_dir).model
    assert model.config.id2label == {0: "sent:0", 1: "sent:1", 2: "score:score", 3: "pairs:0", 4: "pairs:1"}
    # the regressor's slice starts at its own data set's mean
    assert heads[1]["state"]["mean"] == pytest.approx(2.5, abs=0.3)


def test_each_rows_loss_reads_only_its_own_heads_slice():
    from peftkit.tasks import make_task

    task = make_task("multi_task", {"tasks": [{"name": "a", "type": "classification"},
                                              {"name": "b", "type": "regression"}]},
                     {"heads": [{"name": "a", "type": "classification", "state": {"labels": ["x", "y"]}},
                                {"name": "b", "type": "regression", "state": {"mean": 1.0, "std": 1.0}}]})
    logits = torch.tensor([[2.0, -1.0, 9.0], [5.0, 5.0, 3.0]])
    targets = torch.tensor([[0.0], [2.5]])  # row 0: class x; row 1: score 2.5
    task_id = torch.tensor([0, 1])
    losses = task._row_losses(logits, targets, task_id)
    assert losses[0] == pytest.approx(float(torch.nn.functional.cross_entropy(logits[:1, :2], torch.tensor([0]))))
    assert losses[1] == pytest.approx((3.0 - 2.5) ** 2)
    changed = logits.clone()
    changed[0, 2] = -40.0  # row 0's regression output, and row 1's class outputs: not theirs
    changed[1, :2] = torch.tensor([-7.0, 11.0])
    assert torch.equal(task._row_losses(changed, targets, task_id), losses)


def test_served_under_each_task_name_in_mixed_batches(recipe_for, tiny_dir, tmp_path):
    from peftkit.serve.serving import load_server
    from peftkit.store.loading import load_trained
    from peftkit.store.registry import Registry

    data = _three_sets(recipe_for, tiny_dir, tmp_path)
    data["output"]["name"] = "three"
    train(build_recipe(data), **QUIET)
    registry = Registry(tmp_path / "adapters")
    # the float32 4-bit path, as load_trained takes: the packed default rounds on AVX512-BF16
    server = load_server(registry, ["three:sent", "three:score", "three:pairs"], packed_inference=False)
    texts = ["good film", "bad awful king", {"text": "good", "text_pair": "the river"}, "awful"]
    names = ["three:sent", "three:score", "three:pairs", "three"]
    predictions = server.predict(texts, names)
    loaded = load_trained(registry.folder("three"))
    with torch.no_grad():
        logits = [loaded.model(**loaded.tokenizer([t] if isinstance(t, str) else [t["text"]],
                                                  [t["text_pair"]] if isinstance(t, dict) else None,
                                                  return_tensors="pt")).logits[0] for t in texts]
    assert set(predictions[0]) == {"adapter", "label", "probs"} and predictions[0]["adapter"] == "three:sent"
    assert predictions[0]["label"] == ["0", "1"][int(logits[0][:2].argmax())]
    assert predictions[1]["score"] == pytest.approx(float(logits[1][2]), abs=1e-5)
    assert predictions[2]["probs"]["1"] == pytest.approx(float(torch.softmax(logits[2][3:], -1)[1]), abs=1e-5)
    assert set(predictions[3]) == {"adapter", "sent", "score", "pairs"}  # the adapter alone: every task's
    with pytest.raises(PeftkitError, match=r"^adapter 'three:scroe': three has no task 'scroe'; its tasks: sent, "
                                           r"score, pairs$"):
        server.predict(["x"], "three:scroe")


def test_temperature_sampling_draws_small_data_sets_more_often():
    import datasets

    from peftkit.core.data import _temperature_sampled

    parts = [datasets.Dataset.from_dict({"i": list(range(n))}) for n in (900, 100)]
    by_size = _temperature_sampled(parts, 1.0, seed=0)
    assert [len(p) for p in by_size] == [900, 100]
    sampled = _temperature_sampled(parts, 2.0, seed=0)  # shares 30:10 -> 750 and 250 of the 1,000 rows
    assert [len(p) for p in sampled] == [750, 250]
    small = sampled[1]["i"]
    assert sorted(set(small)) == list(range(100)) and all(small.count(i) in (2, 3) for i in range(100))
    assert len(set(sampled[0]["i"])) == 750  # the large one is cut, never repeated
    assert _temperature_sampled(parts, 2.0, seed=0)[1]["i"] == small  # seeded


@pytest.mark.parametrize(("change", "message"), [
    ({"also": [{"train": "x.tsv", "task": {"type": "causal_lm"}}]},
     r"data.also: a causal_lm head cannot share an adapter with other data sets' heads"),
    ({"also": [{"train": "x.tsv", "task": {"type": "regression", "los": "mse"}}]},
     r"data.also\[0\].task.los: unknown key; did you mean `loss`\?"),
    ({"task": {"type": "regression"}}, r"data.task: the first data set's head is the recipe's task section"),
    ({"heads": "shared", "also": [{"train": "x.tsv", "task": {"type": "regression"}}]},
     r"data.also.0.task: one shared head has the task section's type and labels"),
    ({"sampling": "temperature"}, r"data.sampling: only several data sets \(data.also\) are sampled"),
])
def test_bad_multi_task_recipes_are_one_line_errors(recipe_for, tiny_dir, change, message):
    from peftkit.ops.validate import check_data

    data = recipe_for()
    data["data"].update(change)
    for also in data["data"].get("also", []):
        also["train"] = str(tiny_dir / "reg_train.tsv")
    with pytest.raises((PeftkitError, RecipeError), match=message):
        check_data(build_recipe(data))
