"""Data: read files or hub data sets through ``datasets``, name columns by task role, tokenize, batch.

Local files: csv, tsv (header or not; quotes are text, as in GLUE), json (a list or JSON lines), jsonl,
parquet and txt (one paragraph a row). Batches group rows of similar length (``train.group_by_length``):
rows are shuffled, cut into windows of 64 batches, sorted by length inside each window, and the batches
shuffled again, so padding shrinks while every epoch still sees a random order.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import PeftkitError
from .recipe import DataSection
from .tasks.base import TaskHead

_BUILDERS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "txt"}


@dataclass
class RawData:
    train: Any  # datasets.Dataset with role-named columns
    eval: Any
    train_source: str
    eval_source: str


def _format_of(path: Path, data: DataSection) -> str:
    if data.format != "auto":
        return "json" if data.format == "jsonl" else data.format
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        return "txt"  # extension-less text files (tiny-shakespeare style, msr_paraphrase_test.txt) are text
    return builder


def _load_file(path: Path, data: DataSection, key: str) -> Any:
    import datasets

    datasets.disable_progress_bars()

    fmt = _format_of(path, data)
    files = {"train": str(path)}
    try:
        if fmt in ("csv", "tsv"):
            options: dict[str, Any] = {"sep": "\t" if fmt == "tsv" else ",", "encoding": data.encoding}
            if fmt == "tsv":
                options["quoting"] = csv.QUOTE_NONE  # GLUE text holds stray quotes
            if not data.header:
                options["header"] = None
                if data.column_names:
                    options["column_names"] = data.column_names
            elif data.column_names:
                raise PeftkitError("data.column_names: names columns of a header-less file; set data.header: false")
            if not data.header and not data.column_names:
                raise PeftkitError(f"data.column_names: {path} has no header; list its columns in data.column_names")
            ds = datasets.load_dataset("csv", data_files=files, split="train", **options)
        elif fmt == "txt":
            ds = datasets.load_dataset("text", data_files=files, split="train", sample_by="paragraph",
                                       encoding=data.encoding)
        else:
            ds = datasets.load_dataset(fmt, data_files=files, split="train")
    except PeftkitError:
        raise
    except Exception as exc:  # parse errors from pandas / pyarrow carry no file name
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PeftkitError(f"{key}: could not read {path} as {fmt}: {first}; check data.format and data.header") from None
    if len(ds) == 0:
        raise PeftkitError(f"{key}: {path} has no rows")
    return ds


def _load_hub(repo_id: str, split: str, key: str) -> Any:
    import datasets

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return datasets.load_dataset(repo_id, split=split)
    except Exception as exc:
        why = "HF_HUB_OFFLINE=1 and it is not cached" if offline else type(exc).__name__
        raise PeftkitError(
            f"{key}: {repo_id!r} is not a local file and could not be loaded from the hub ({why}); "
            "point it at a local csv/tsv/json/jsonl/parquet/txt file"
        ) from None


def load_rows(location: str, data: DataSection, key: str, split: str) -> Any:
    path = Path(location).expanduser()
    if path.is_file():
        return _load_file(path, data, key)
    if path.exists():
        raise PeftkitError(f"{key}: {location} is a folder; name a data file")
    if location.startswith((".", "/", "~")) or path.suffix.lower() in _BUILDERS:
        raise PeftkitError(f"{key}: file {location} does not exist; check the path")
    return _load_hub(location, split, key)


def _to_roles(ds: Any, columns: dict[str, str]) -> Any:
    ds = ds.select_columns(list(dict.fromkeys(columns.values())))
    renames = {column: role for role, column in columns.items() if column != role}
    one_to_one = len(set(columns.values())) == len(columns)
    if one_to_one and not set(renames.values()) & (set(ds.column_names) - set(renames)):
        return ds.rename_columns(renames) if renames else ds
    return ds.map(lambda row: {role: row[col] for role, col in columns.items()}, remove_columns=ds.column_names)


def load_task_data(data: DataSection, task: TaskHead, seed: int) -> RawData:
    """Train and eval rows with columns renamed to the task's roles, and the task fitted to them."""
    train = load_rows(data.train, data, "data.train", data.split)
    columns = task.resolve_columns(train.column_names, data.columns, data.train)
    if data.eval is not None:
        eval_ = load_rows(data.eval, data, "data.eval", data.eval_split or data.split)
        eval_columns = task.resolve_columns(eval_.column_names, data.columns, data.eval)
        eval_source = data.eval
    else:
        if len(train) < 2:
            raise PeftkitError(f"data.train: {data.train} has {len(train)} row; give data.eval or more rows")
        split = train.train_test_split(test_size=data.eval_fraction, seed=seed)
        train, eval_ = split["train"], split["test"]
        eval_columns = columns
        eval_source = f"{data.train} (eval split of {data.eval_fraction:g})"
    train = _to_roles(train, columns)
    eval_ = _to_roles(eval_, eval_columns)
    if data.max_train_samples and len(train) > data.max_train_samples:
        train = train.shuffle(seed=seed).select(range(data.max_train_samples))
    if data.max_eval_samples and len(eval_) > data.max_eval_samples:
        eval_ = eval_.shuffle(seed=seed).select(range(data.max_eval_samples))
    task.fit(train, eval_, eval_source)
    return RawData(train, eval_, data.train, eval_source)


def encode(rows: Any, task: TaskHead, tokenizer: Any, max_length: int) -> Any:
    """Tokenize role-named rows into model features (cached by ``datasets`` between runs)."""
    encoded = rows.map(
        lambda batch: task.encode(batch, tokenizer, max_length),
        batched=True,
        remove_columns=rows.column_names,
        desc="tokenizing",
    )
    if len(encoded) == 0:
        raise PeftkitError("data: no rows left after tokenizing; raise data.max_length or check the columns")
    return encoded


def plan_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool,
                 num_processes: int = 1) -> list[list[int]]:
    """The batches (lists of row indices) of one epoch, the same on every process for the same seed.

    With several processes the list is cut to a multiple of ``num_processes``; process ``r`` takes every
    ``num_processes``-th batch starting at ``r``, so all processes run the same number of steps.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * 64
        grouped: list[int] = []
        for start in range(0, len(order), window):
            grouped.extend(sorted(order[start : start + window], key=lambda i: -lengths[i]))
        order = grouped
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    usable = len(batches) - len(batches) % num_processes
    if usable == 0:
        raise PeftkitError(
            f"train.batch_size: {len(lengths)} training rows make {len(batches)} batches, fewer than the "
            f"{num_processes} processes; lower the batch size"
        )
    return batches[:usable]


def eval_batches(n_rows: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, n_rows))) for i in range(0, n_rows, batch_size)]


def steps_per_epoch(n_batches: int, grad_accum: int, num_processes: int = 1) -> int:
    per_process = n_batches // num_processes
    return max(1, -(-per_process // grad_accum))


def total_steps(n_rows: int, batch_size: int, grad_accum: int, epochs: float, max_steps: Optional[int],
                num_processes: int = 1) -> int:
    """Optimizer steps of a run: what AdaLoRA's schedule and the LR schedule are laid over."""
    if max_steps:
        return max_steps
    n_batches = -(-n_rows // batch_size)
    n_batches -= n_batches % num_processes
    per_epoch = steps_per_epoch(n_batches, grad_accum, num_processes)
    return max(1, int(round(per_epoch * epochs)))
