"""Data: reading every supported file kind, mapping columns to task roles, labels, batching, step counts."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from peftkit.config.recipe import DataSection
from peftkit.core.data import (SHORT_RUN_STEPS, eval_batches, load_rows, load_task_data, plan_batches, short_run_notice,
                               steps_per_epoch, total_steps)
from peftkit.errors import PeftkitError
from peftkit.tasks import make_task
from tests import tiny


def rows_of(path: Path, **options: Any) -> dict[str, list]:
    """Every column of a file as read by ``data.train``, as plain lists."""
    section = DataSection(train=str(path), **options)
    return load_rows(str(path), section, "data.train", "train").to_dict()


def read_error(path: Path, **options: Any) -> str:
    with pytest.raises(PeftkitError) as info:
        rows_of(path, **options)
    return str(info.value)


def task_data(train: Path, eval: Path | None = None, seed: int = 0, task: str = "classification",
              task_options: dict[str, Any] | None = None, **options: Any):
    head = make_task(task, task_options or {})
    section = DataSection(train=str(train), eval=str(eval) if eval else None, **options)
    return load_task_data(section, head, seed), head


def task_error(*args: Any, **kwargs: Any) -> str:
    with pytest.raises(PeftkitError) as info:
        task_data(*args, **kwargs)
    return str(info.value)


def labelled(path: Path, labels: list[Any], column: str = "label", text: str = "sentence") -> Path:
    """A TSV with one row per label, texts ``row 1``, ``row 2`` ..."""
    return tiny.write_tsv(path, [{text: f"row {i + 1}", column: label} for i, label in enumerate(labels)])


# ---- file kinds ---------------------------------------------------------------------------------------


def test_csv_keeps_quoted_commas(tmp_path: Path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"hello, world",pos\nbye,neg\n')
    assert rows_of(path) == {"text": ["hello, world", "bye"], "label": ["pos", "neg"]}


def test_tsv_with_header_keeps_quotes_as_text(tmp_path: Path):
    # GLUE's TSVs are not quoted: a quote is part of the sentence, even an unbalanced one
    path = tmp_path / "d.tsv"
    path.write_text('sentence\tlabel\nhe said "hi\t1\n"quoted" start\t0\nit \'s fine\t1\n')
    assert rows_of(path) == {"sentence": ['he said "hi', '"quoted" start', "it 's fine"], "label": [1, 0, 1]}


def test_tsv_without_header_takes_column_names(tmp_path: Path):
    path = tmp_path / "cola.tsv"  # CoLA's layout: source, label, original mark, sentence
    path.write_text("gj04\t1\t\tThe sailors rode .\ngj04\t0\t*\tThe sailors rode the breeze \"clear .\n")
    rows = rows_of(path, header=False, column_names=["source", "label", "mark", "sentence"])
    assert rows["label"] == [1, 0]
    assert rows["sentence"] == ["The sailors rode .", 'The sailors rode the breeze "clear .']


def test_tsv_without_header_needs_column_names(tmp_path: Path):
    path = tmp_path / "nohead.tsv"
    path.write_text("a\t1\nb\t0\n")
    assert read_error(path, header=False) == (
        f"data.column_names: {path} has no header; list its columns in data.column_names"
    )


def test_column_names_must_match_the_file(tmp_path: Path):
    # pandas would make the surplus leading columns an index and read the wrong column as `label`
    path = tmp_path / "cola.tsv"
    path.write_text("gj04\t1\t\tThe sailors rode .\n")
    assert read_error(path, header=False, column_names=["label", "sentence"]) == (
        f"data.column_names: {path} has 4 columns but data.column_names names 2; name every column, in order"
    )


def test_column_names_with_a_header_is_refused(tmp_path: Path):
    path = labelled(tmp_path / "d.tsv", [0, 1])
    assert read_error(path, column_names=["s", "l"]) == (
        "data.column_names: names columns of a header-less file; set data.header: false"
    )


def test_json_list_and_json_lines(tmp_path: Path):
    records = [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    (tmp_path / "list.json").write_text(json.dumps(records))
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    expected = {"text": ["a", "b"], "label": [1, 0]}
    assert rows_of(tmp_path / "list.json") == expected
    assert rows_of(tmp_path / "lines.jsonl") == expected
    assert rows_of(tmp_path / "lines.json") == expected
    assert rows_of(tmp_path / "lines.json", format="jsonl") == expected


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".txt"])
def test_data_encoding_applies_to_every_text_format(tmp_path: Path, suffix: str):
    text = "café crème"
    content = {".csv": f"sentence,label\n{text},1\n", ".jsonl": json.dumps({"sentence": text, "label": 1},
                                                                           ensure_ascii=False) + "\n",
               ".txt": text + "\n"}[suffix]
    path = tmp_path / f"latin{suffix}"
    path.write_bytes(content.encode("latin-1"))
    column = "text" if suffix == ".txt" else "sentence"
    assert [value.strip() for value in rows_of(path, encoding="latin-1")[column]] == [text]


def test_parquet(tmp_path: Path):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"text": ["x", "y", "z"], "label": [0, 1, 0]}).to_parquet(str(path))
    assert rows_of(path) == {"text": ["x", "y", "z"], "label": [0, 1, 0]}


def test_txt_is_one_paragraph_a_row(tmp_path: Path):
    path = tmp_path / "d.txt"
    path.write_text("first line\nstill first\n\nsecond\n\nthird\n")
    rows = rows_of(path)
    assert [t.strip() for t in rows["text"]] == ["first line\nstill first", "second", "third"]
    extensionless = tmp_path / "corpus"
    extensionless.write_text(path.read_text())
    assert rows_of(extensionless) == rows


def test_format_overrides_the_extension(tmp_path: Path):
    path = tmp_path / "d.txt"
    path.write_text("a\t1\nb\t0\n")
    assert rows_of(path, format="tsv", header=False, column_names=["text", "label"]) == {
        "text": ["a", "b"], "label": [1, 0]}


def test_missing_file_folder_and_hub_id(tmp_path: Path):
    missing = tmp_path / "nope.tsv"
    assert read_error(missing) == f"data.train: file {missing} does not exist; check the path"
    assert read_error(tmp_path) == f"data.train: {tmp_path} is a folder; name a data file"
    section = DataSection(train="some-org/no-such-data")
    with pytest.raises(PeftkitError) as info:
        load_rows("some-org/no-such-data", section, "data.train", "train")
    assert str(info.value).startswith("data.train: 'some-org/no-such-data' is not a local file and could not be "
                                      "loaded from the hub (")
    assert str(info.value).endswith("); point it at a local csv/tsv/json/jsonl/parquet/txt file")


def test_empty_and_header_only_files(tmp_path: Path):
    (tmp_path / "empty.tsv").write_text("")
    (tmp_path / "header.tsv").write_text("sentence\tlabel\n")
    assert read_error(tmp_path / "empty.tsv") == f"data.train: {tmp_path / 'empty.tsv'} has no rows; it is empty"
    assert read_error(tmp_path / "header.tsv") == f"data.train: {tmp_path / 'header.tsv'} has no rows below its header"


def test_unparseable_file_names_the_file_and_the_parser_problem(tmp_path: Path):
    path = tmp_path / "ragged.csv"
    path.write_text("a,b\n1,2\n3,4,5,6\n")
    assert read_error(path) == (
        f"data.train: could not read {path} as csv: Error tokenizing data. C error: Expected 2 fields in line 3, "
        "saw 4; check data.format and data.header"
    )


# ---- train / eval -------------------------------------------------------------------------------------


@pytest.fixture
def sentiment(tmp_path: Path) -> Path:
    return tiny.write_tsv(tmp_path / "train.tsv", tiny.sentiment_rows(50, seed=5))


def test_eval_split_is_carved_deterministically(sentiment: Path):
    first, _ = task_data(sentiment, seed=3, eval_fraction=0.2)
    again, _ = task_data(sentiment, seed=3, eval_fraction=0.2)
    other, _ = task_data(sentiment, seed=4, eval_fraction=0.2)
    assert (len(first.train), len(first.eval)) == (40, 10)
    assert first.eval.to_dict() == again.eval.to_dict() and first.train.to_dict() == again.train.to_dict()
    assert other.eval.to_dict() != first.eval.to_dict()
    all_rows = sorted(tiny.sentiment_rows(50, seed=5), key=lambda r: r["sentence"])
    carved = sorted(first.train.to_list() + first.eval.to_list(), key=lambda r: r["text"])
    assert [(r["text"], r["label"]) for r in carved] == [(r["sentence"], r["label"]) for r in all_rows]
    assert first.eval_source == f"{sentiment} (eval split of 0.2)"


def test_eval_split_rounds_up_and_must_leave_training_rows(tmp_path: Path):
    path = labelled(tmp_path / "d.tsv", ["a", "b", "a"])
    raw, _ = task_data(path, eval_fraction=0.1)
    assert (len(raw.train), len(raw.eval)) == (2, 1)
    assert task_error(path, eval_fraction=0.7) == (
        f"data.eval_fraction: 0.7 of the 3 rows of {path} leaves none to train on; lower data.eval_fraction, "
        "give data.eval, or add rows"
    )
    one = labelled(tmp_path / "one.tsv", ["a"])
    assert task_error(one) == f"data.train: {one} has 1 row; give data.eval or more rows"


def test_max_train_samples_is_a_deterministic_subset(sentiment: Path, tmp_path: Path):
    dev = tiny.write_tsv(tmp_path / "dev.tsv", tiny.sentiment_rows(20, seed=6))
    full, _ = task_data(sentiment, dev)
    a, _ = task_data(sentiment, dev, seed=1, max_train_samples=12)
    b, _ = task_data(sentiment, dev, seed=1, max_train_samples=12)
    c, _ = task_data(sentiment, dev, seed=2, max_train_samples=12)
    assert len(a.train) == 12 and a.train.to_dict() == b.train.to_dict() != c.train.to_dict()
    assert {r["text"] for r in a.train.to_list()} <= set(full.train["text"])
    assert len(a.eval) == 20  # the eval rows are not touched
    bigger, _ = task_data(sentiment, dev, max_train_samples=500)
    assert len(bigger.train) == 50
    capped, _ = task_data(sentiment, dev, max_eval_samples=5)
    assert len(capped.eval) == 5 and len(capped.train) == 50


def test_labels_come_from_every_training_row_before_sampling(tmp_path: Path):
    path = labelled(tmp_path / "d.tsv", ["pos"] * 30 + ["neg"] * 30 + ["rare"])
    dev = labelled(tmp_path / "dev.tsv", ["rare", "pos"])
    _, head = task_data(path, dev, max_train_samples=4)
    assert head.state["labels"] == ["neg", "pos", "rare"]


def test_a_carved_eval_split_learns_labels_from_the_whole_file(tmp_path: Path):
    path = labelled(tmp_path / "d.tsv", ["a", "b"] * 5 + ["rare"])
    only_in_eval = 0
    for seed in range(8):
        raw, head = task_data(path, seed=seed, eval_fraction=0.3)
        assert head.state["labels"] == ["a", "b", "rare"]
        only_in_eval += "rare" in raw.eval["label"] and "rare" not in raw.train["label"]
    assert only_in_eval > 0  # the case that used to fail ("row 1 has label 'rare', which the training data ...")


# ---- columns ------------------------------------------------------------------------------------------


def test_columns_map_file_columns_to_roles(tmp_path: Path):
    path = tiny.write_tsv(tmp_path / "d.tsv", [{"id": i, "review": f"row {i}", "stars": i % 2} for i in range(6)])
    raw, _ = task_data(path, columns={"text": "review", "label": "stars"})
    assert sorted(raw.train.column_names) == ["label", "text"]
    row = raw.train.to_list()[0]
    assert row["text"] == f"row {int(row['text'].split()[1])}" and row["label"] == int(row["text"].split()[1]) % 2


def test_roles_are_found_by_their_usual_column_names(tmp_path: Path):
    rows = [{"index": i, "sentence1": f"a {i}", "sentence2": f"b {i}", "label": "x" if i % 2 else "y"}
            for i in range(6)]
    raw, head = task_data(tiny.write_tsv(tmp_path / "rte.tsv", rows))
    assert sorted(raw.train.column_names) == ["label", "text", "text_pair"]
    assert all(r["text"].replace("a", "b") == r["text_pair"] for r in raw.train.to_list())
    assert head.state["labels"] == ["x", "y"]


def test_one_column_can_fill_two_roles(tmp_path: Path):
    path = labelled(tmp_path / "d.tsv", [0, 1, 0, 1])
    raw, _ = task_data(path, columns={"text": "sentence", "text_pair": "sentence"})
    assert all(r["text"] == r["text_pair"] for r in raw.train.to_list())


def test_column_mapping_errors(tmp_path: Path):
    path = labelled(tmp_path / "d.tsv", [0, 1, 0, 1])
    assert task_error(path, columns={"txt": "sentence"}) == (
        "data.columns: txt is not a role of task classification; its roles are: text, text_pair, label"
    )
    assert task_error(path, columns={"text": "review"}) == (
        f"data.columns.text: column 'review' is not in {path} (its columns: sentence, label); fix the name"
    )
    spam = tiny.write_tsv(tmp_path / "spam.tsv", [{"Label": "ham", "SMS": "hi"}, {"Label": "spam", "SMS": "win"}])
    assert task_error(spam) == (
        f"data.columns.text: no column for 'text' in {spam} (its columns: Label, SMS); set data.columns.text: COLUMN"
    )
    raw, _ = task_data(spam, columns={"text": "SMS"}, eval_fraction=0.5)
    assert sorted(raw.train.column_names) == ["label", "text"]


def test_eval_file_columns_are_checked_too(tmp_path: Path):
    train = labelled(tmp_path / "train.tsv", [0, 1, 0, 1])
    dev = labelled(tmp_path / "dev.tsv", [0, 1], text="review")
    assert task_error(train, dev) == (
        f"data.columns.text: no column for 'text' in {dev} (its columns: review, label); set data.columns.text: COLUMN"
    )


# ---- classification labels ----------------------------------------------------------------------------


def test_label_names_are_sorted(tmp_path: Path):
    _, head = task_data(labelled(tmp_path / "d.tsv", ["pos", "neg", "neutral", "neg"]), eval_fraction=0.25)
    assert head.state["labels"] == ["neg", "neutral", "pos"]


def test_label_numbers_are_sorted_as_numbers(tmp_path: Path):
    _, head = task_data(labelled(tmp_path / "d.tsv", [10, 2, 0, 1, 2, 10, 0, 1]), eval_fraction=0.25)
    assert head.state["labels"] == ["0", "1", "2", "10"]


def test_task_labels_fix_the_order_and_match_numbers(tmp_path: Path):
    path = labelled(tmp_path / "d.tsv", [1, 0, 1, 0])
    _, head = task_data(path, task_options={"labels": ["1", "0"]}, eval_fraction=0.25)
    assert head.state["labels"] == ["1", "0"]
    assert task_error(path, task_options={"labels": ["0", "2"]}) == (
        "data.train: label '1' is not in task.labels (0, 2); add it to task.labels or fix the data"
    )


def test_one_label_is_not_a_classification(tmp_path: Path):
    assert task_error(labelled(tmp_path / "d.tsv", ["a", "a", "a"])) == (
        "data.train: only one label ('a') in the training data; classification needs at least two"
    )


def test_eval_label_unseen_in_training_names_file_row_and_label(tmp_path: Path):
    train = labelled(tmp_path / "train.tsv", ["neg", "pos"] * 4)
    dev = labelled(tmp_path / "dev.tsv", ["pos", "neg", "pos", "neutral", "neg"])
    expected = (
        f"{dev}: row 4 has label 'neutral', which the training data does not have (neg, pos); fix that row or "
        "list the label in task.labels"
    )
    assert task_error(train, dev) == expected
    assert task_error(train, dev, max_eval_samples=2) == expected  # the row number is the file's, not the sample's
    raw, head = task_data(train, dev, task_options={"labels": ["neg", "neutral", "pos"]})
    assert head.state["labels"] == ["neg", "neutral", "pos"] and len(raw.eval) == 5


def test_unseen_label_message_names_task_labels_when_given_and_stays_short(tmp_path: Path):
    train = labelled(tmp_path / "train.tsv", [f"c{i:02d}" for i in range(12)])
    dev = labelled(tmp_path / "dev.tsv", ["c00", "other"])
    assert task_error(train, dev) == (
        f"{dev}: row 2 has label 'other', which the training data does not have (c00, c01, c02, c03, c04, c05, c06, "
        "c07, c08, c09, ... (12 in all)); fix that row or list the label in task.labels"
    )
    given = ["c00", "c01", "c02", "c03", "c04", "c05", "c06", "c07", "c08", "c09", "c10", "c11"]
    assert task_error(train, dev, task_options={"labels": given}).startswith(
        f"{dev}: row 2 has label 'other', which task.labels does not have (c00, c01,"
    )


# ---- batches ------------------------------------------------------------------------------------------


def lengths_of(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 120) for _ in range(n)]


def padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("n, batch_size", [(1000, 16), (37, 8), (5, 16), (64, 64)])
def test_plan_batches_covers_every_row_once_per_epoch(n: int, batch_size: int, group: bool):
    lengths = lengths_of(n)
    for epoch in range(3):
        batches = plan_batches(lengths, batch_size, seed=1, epoch=epoch, group_by_length=group)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))
        assert len(batches) == -(-n // batch_size)
        assert all(1 <= len(b) <= batch_size for b in batches)
        assert sum(len(b) < batch_size for b in batches) <= 1


@pytest.mark.parametrize("group", [True, False])
def test_plan_batches_is_deterministic_per_seed_and_epoch(group: bool):
    lengths = lengths_of(500)

    def plan(seed: int, epoch: int) -> list[list[int]]:
        return plan_batches(lengths, 16, seed=seed, epoch=epoch, group_by_length=group)

    assert plan(1, 0) == plan(1, 0)
    assert plan(1, 1) == plan(1, 1)
    assert plan(1, 0) != plan(1, 1)
    assert plan(1, 0) != plan(2, 0)


def test_grouping_by_length_cuts_padding():
    lengths = lengths_of(2000, seed=3)
    grouped = plan_batches(lengths, 16, seed=0, epoch=0, group_by_length=True)
    shuffled = plan_batches(lengths, 16, seed=0, epoch=0, group_by_length=False)
    assert padding(grouped, lengths) < 0.25 * padding(shuffled, lengths)
    # the batches still come in random order, not longest first
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima, reverse=True) and maxima != sorted(maxima)


@pytest.mark.parametrize("num_processes", [2, 3, 4])
@pytest.mark.parametrize("group", [True, False])
def test_plan_batches_splits_evenly_across_processes(num_processes: int, group: bool):
    lengths = lengths_of(203)
    batches = plan_batches(lengths, 8, seed=5, epoch=0, group_by_length=group, num_processes=num_processes)
    n_batches = -(-203 // 8)
    assert len(batches) == n_batches - n_batches % num_processes
    shares = [batches[rank::num_processes] for rank in range(num_processes)]
    assert len({len(s) for s in shares}) == 1
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))  # no row twice, even across processes
    again = plan_batches(lengths, 8, seed=5, epoch=0, group_by_length=group, num_processes=num_processes)
    assert again == batches  # every process computes the same plan


def test_too_few_batches_for_the_processes():
    with pytest.raises(PeftkitError) as info:
        plan_batches([5] * 10, 8, seed=0, epoch=0, group_by_length=True, num_processes=4)
    assert str(info.value) == (
        "train.batch_size: 10 training rows make 2 batches, fewer than the 4 processes; lower the batch size"
    )


def test_eval_batches_cover_rows_in_order():
    assert eval_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert eval_batches(0, 3) == []


# ---- step counts --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_rows, batch_size, grad_accum, epochs, max_steps, num_processes, expected",
    [
        (100, 16, 1, 1.0, None, 1, 7),  # 7 batches, the last one short
        (100, 16, 2, 1.0, None, 1, 4),  # 7 batches in groups of 2: the last group has one
        (100, 16, 2, 2.0, None, 1, 8),
        (100, 16, 1, 1.5, None, 1, 10),  # round(7 * 1.5)
        (100, 16, 1, 0.1, None, 1, 1),  # never zero
        (100, 16, 4, 3.0, 5, 1, 5),  # max_steps wins
        (100, 16, 1, 10.0, 3, 1, 3),
        (100, 16, 1, 1.0, None, 2, 3),  # 7 batches -> 6, 3 per process
        (100, 16, 2, 1.0, None, 2, 2),
        (256, 16, 1, 2.0, None, 1, 32),
    ],
)
def test_total_steps(n_rows, batch_size, grad_accum, epochs, max_steps, num_processes, expected):
    assert total_steps(n_rows, batch_size, grad_accum, epochs, max_steps, num_processes) == expected


@pytest.mark.parametrize("n_rows, num_processes", [(1, 1), (15, 1), (16, 1), (17, 1), (100, 1), (333, 1),
                                                    (17, 2), (48, 2), (100, 2), (333, 2)])
@pytest.mark.parametrize("grad_accum", [1, 2, 3])
def test_total_steps_match_the_planned_batches(n_rows, grad_accum, num_processes):
    """The step count the LR and AdaLoRA schedules are laid over is what one epoch of batches gives."""
    batches = plan_batches([4] * n_rows, 16, seed=0, epoch=0, group_by_length=True, num_processes=num_processes)
    per_process = len(batches[0::num_processes])
    loop_steps = -(-per_process // grad_accum)  # groups of grad_accum batches, the last may be short
    assert total_steps(n_rows, 16, grad_accum, 1.0, None, num_processes) == loop_steps
    assert steps_per_epoch(len(batches), grad_accum, num_processes) == loop_steps


def test_a_short_run_says_so_and_names_the_fix():
    note = short_run_notice(16, 1, None)
    assert note.startswith("note: 16 optimizer steps is a short run") and "train.epochs 8 gives about 128" in note
    assert "raise train.max_steps" in short_run_notice(40, 1, 40)
    assert short_run_notice(SHORT_RUN_STEPS, 1, None) is None
