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


def test_two_data_sets_one_adapter(recipe_for, second_set):
    data = recipe_for(train={"max_steps": 6, "eval_at_start": False})
    data["task"]["labels"] = ["0", "1", "neg", "pos"]
    data["data"]["name"] = "tiny"
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
    with pytest.raises(PeftkitError, match=r"^data.also\[0\].train: .*pairs.tsv gives the task label, text, text_pair "
                                           r"but data.train gives label, text; .*map them with data.also\[0\].columns\)$"):
        train(build_recipe(data), **QUIET)
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
