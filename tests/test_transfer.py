"""adapter.init_from: a new task's adapter starts from a registered one, head kept or not, lineage recorded."""

from __future__ import annotations

import pytest
import torch

from peftkit.config.recipe import build_recipe
from peftkit.errors import PeftkitError
from peftkit.train.training import train
from peftkit.train.transfer import prepare_run
from tests import tiny

QUIET = {"echo": lambda line: None}


def _state(model, keep):
    return {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if keep(n)}


@pytest.fixture
def parent(recipe_for):
    return train(build_recipe(recipe_for(quant="4bit", train={"max_steps": 6, "eval_at_start": False},
                                         output={"name": "parent"})), **QUIET)


def test_child_starts_from_parent_weights_and_head(recipe_for, parent):
    data = recipe_for(quant="4bit", train={"max_steps": 2, "eval_at_start": False}, output={"name": "child"})
    data["adapter"]["init_from"] = "parent"
    plan, built = prepare_run(build_recipe(data), torch.device("cpu"))
    lora = lambda n: "lora_" in n  # noqa: E731
    expected, got = _state(parent.model, lora), _state(built.model, lora)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    head = lambda n: "modules_to_save" in n  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(_state(parent.model, head).values(), _state(built.model, head).values()))

    child = train(build_recipe(data), **QUIET)
    assert child.metadata.provenance["init_from"] == "parent"
    assert child.metadata.provenance["head"] == "kept"


def test_new_labels_get_a_new_head(recipe_for, parent, tiny_dir, tmp_path):
    rows = [{**r, "label": ["neg", "pos", "mid"][i % 3]} for i, r in enumerate(tiny.sentiment_rows(96, 5))]
    tiny.write_tsv(tmp_path / "three.tsv", rows)
    data = recipe_for(quant="4bit", train={"max_steps": 2, "eval_at_start": False}, output={"name": "three"},
                      data={"train": str(tmp_path / "three.tsv"), "eval": None, "eval_fraction": 0.25})
    data["adapter"]["init_from"] = "parent"
    child = train(build_recipe(data), **QUIET)
    assert child.metadata.provenance["head"] == "reinitialised"
    assert child.metadata.task.state.labels == ["mid", "neg", "pos"]

    data["adapter"]["init_head"] = "keep"
    data["output"]["name"] = "three-keep"
    with pytest.raises(PeftkitError, match=r"^adapter.init_head: keep needs the same task and labels as parent"):
        train(build_recipe(data), **QUIET)


def test_unknown_or_incompatible_parent(recipe_for, parent):
    data = recipe_for(quant="4bit", train={"max_steps": 2}, output={"name": "x"})
    data["adapter"]["init_from"] = "parnet"
    with pytest.raises(PeftkitError, match=r"^adapter.init_from: no adapter named 'parnet' .*did you mean parent\?$"):
        train(build_recipe(data), **QUIET)
    data["adapter"].update(init_from="parent", r=8)
    with pytest.raises(PeftkitError, match=r"^adapter.init_from: parent's .* has shape \(4, 64\), this adapter's is "
                                           r"\(8, 64\); use the same rank and target modules as parent$"):
        train(build_recipe(data), **QUIET)
