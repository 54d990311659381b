"""Data: read files or hub data sets through ``datasets``, name columns by task role, tokenize, batch.

Local files: csv, tsv (header or not; quotes are text, as in GLUE), json (a list or JSON lines), jsonl,
parquet, txt (one paragraph a row) and CoNLL token-per-line files (``data_formats.py``, which also resolves
``pkg:PACKAGE/PATH`` to a file shipped in an installed package). Batches group rows of similar length (``train.group_by_length``):
rows are shuffled, cut into windows of 64 batches, sorted by length inside each window, and the batches
shuffled again, so padding shrinks while every epoch still sees a random order.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from ..config.recipe import DataSection, DataSource
from ..errors import PeftkitError, first_line
from ..tasks.base import TaskHead
from .data_formats import load_conll, resolve_package_path

_BUILDERS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "txt",
             ".conll": "conll"}


@dataclass
class RawData:
    train: Any  # datasets.Dataset with role-named columns
    eval: Any
    eval_source: str  # the eval file, or which split of the train file was carved off
    eval_parts: list[tuple[str, Any]] = field(default_factory=list)  # (data set name, its eval rows)


def _format_of(path: Path, data: DataSection, key: str) -> str:
    if data.format != "auto":
        return "json" if data.format == "jsonl" else data.format
    if not path.suffix:
        return "txt"  # extension-less text files (tiny-shakespeare style) are text
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        *known, last = (s.lstrip(".") for s in _BUILDERS)
        hint = ", or set data.format" if key.startswith("data") else ""
        raise PeftkitError(f"{key}: {path} ends in {path.suffix}, which is not a data format peftkit reads; give a "
                           f"{', '.join(known)} or {last} file{hint}")
    return builder


def _first_lines(path: Path, encoding: str, n: int) -> list[str]:
    """Up to ``n`` non-blank lines from the top of a text file (without reading all of it)."""
    lines: list[str] = []
    with path.open(encoding=encoding, errors="replace", newline="") as fh:
        for line in fh:
            if line.strip():
                lines.append(line.rstrip("\r\n"))
                if len(lines) == n:
                    break
    return lines


def _check_table(path: Path, data: DataSection, fmt: str, key: str) -> None:
    """Refuse a csv/tsv that has no data rows, or fewer/more columns than data.column_names names.

    pandas would otherwise turn surplus leading columns into an index (``column_names: [label, sentence]``
    on CoLA's four columns reads the *mark* column as the label) or pad missing ones with nulls.
    """
    lines = _first_lines(path, data.encoding, 2)
    if len(lines) < (2 if data.header else 1):
        raise PeftkitError(f"{key}: {path} has no rows" + (" below its header" if lines else "; it is empty"))
    if not data.header and data.column_names:
        if fmt == "tsv":
            fields = lines[0].split("\t")
        else:
            fields = next(csv.reader([lines[0]]))
        if len(fields) != len(data.column_names):
            raise PeftkitError(
                f"data.column_names: {path} has {len(fields)} columns but data.column_names names "
                f"{len(data.column_names)}; name every column, in order"
            )


def _root_message(exc: BaseException) -> str:
    # datasets wraps the parser's error ("Expected 2 fields in line 3, saw 4") in a generic one
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return first_line(exc)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets logs parse failures to stderr before raising; the error raised here says it all, once."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def _load_file(path: Path, data: DataSection, key: str) -> Any:
    import datasets

    datasets.disable_progress_bars()

    fmt = _format_of(path, data, key)
    files = {"train": str(path)}
    if fmt == "conll":
        return load_conll(path, data.encoding, key)
    try:
        if fmt in ("csv", "tsv"):
            options: dict[str, Any] = {"sep": "\t" if fmt == "tsv" else ",", "encoding": data.encoding}
            if fmt == "tsv":
                options["quoting"] = csv.QUOTE_NONE  # GLUE text holds stray quotes
            if data.header and data.column_names:
                raise PeftkitError("data.column_names: names columns of a header-less file; set data.header: false")
            if not data.header:
                if not data.column_names:
                    raise PeftkitError(
                        f"data.column_names: {path} has no header; list its columns in data.column_names"
                    )
                options["header"] = None
                options["column_names"] = data.column_names
            _check_table(path, data, fmt, key)
            with _quiet_datasets():
                ds = datasets.load_dataset("csv", data_files=files, split="train", **options)
        elif fmt == "txt":
            with _quiet_datasets():
                ds = datasets.load_dataset("text", data_files=files, split="train", sample_by="paragraph",
                                           encoding=data.encoding)
        else:
            encoding = {"encoding": data.encoding} if fmt == "json" else {}  # parquet stores its own
            with _quiet_datasets():
                ds = datasets.load_dataset(fmt, data_files=files, split="train", **encoding)
    except PeftkitError:
        raise
    except Exception as exc:  # parse errors from pandas / pyarrow carry no file name
        raise PeftkitError(
            f"{key}: could not read {path} as {fmt}: {_root_message(exc)}; check data.format and data.header"
        ) from None
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


def names_a_file(location: str) -> bool:
    """Whether ``location`` is a local path (it exists, or is written as one) rather than a hub data set id."""
    path = Path(location).expanduser()
    return path.exists() or location.startswith((".", "/", "~", "pkg:")) or path.suffix.lower() in _BUILDERS


def load_rows(location: str, data: DataSection, key: str, split: str) -> Any:
    location = resolve_package_path(location, key)
    path = Path(location).expanduser()
    if path.is_file():
        return _load_file(path, data, key)
    if path.exists():
        raise PeftkitError(f"{key}: {location} is a folder; name a data file")
    if names_a_file(location):
        raise PeftkitError(f"{key}: file {location} does not exist; check the path")
    return _load_hub(location, split, key)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and not value.strip())


def check_filled(rows: Any, columns: dict[str, str], roles: tuple[str, ...], source: str, key: str) -> None:
    """Refuse an empty cell in a column the task needs (an empty label, a row cut short), naming its row.

    Rows count from 1 below the header, as in the label errors; pandas reads an empty cell as a null, which
    would otherwise become the label ``None`` (a class of its own) or the text "None".
    """
    for role in roles:
        column = columns.get(role)
        if column is None:
            continue
        row = next((i for i, value in enumerate(rows[column]) if _missing(value)), None)
        if row is not None:
            raise PeftkitError(f"{key}: {source}: row {row + 1} has no {role} (column {column!r} is empty there, or "
                               "the row is short); fill it in or remove the row")


def _to_roles(ds: Any, columns: dict[str, str]) -> Any:
    ds = ds.select_columns(list(dict.fromkeys(columns.values())))
    renames = {column: role for role, column in columns.items() if column != role}
    one_to_one = len(set(columns.values())) == len(columns)
    if one_to_one and not set(renames.values()) & (set(ds.column_names) - set(renames)):
        return ds.rename_columns(renames) if renames else ds
    return ds.map(lambda row: {role: row[col] for role, col in columns.items()}, remove_columns=ds.column_names)


def _load_source(source: DataSource, task: TaskHead, seed: int, key: str) -> tuple[Any, Any, str, Any]:
    """(train, eval, where the eval rows came from, rows to learn the labels from), role-named, of one data set."""
    train = load_rows(source.train, source, f"{key}train", source.split)
    columns = task.resolve_columns(train.column_names, source.columns, source.train, key)
    check_filled(train, columns, task.filled_roles(), source.train, f"{key}train")
    if source.eval is not None:
        eval_ = load_rows(source.eval, source, f"{key}eval", source.eval_split or source.split)
        eval_columns = task.resolve_columns(eval_.column_names, source.columns, source.eval, key)
        check_filled(eval_, eval_columns, task.filled_roles(), source.eval, f"{key}eval")
        eval_source = source.eval
    else:
        if len(train) < 2:
            raise PeftkitError(f"{key}train: {source.train} has {len(train)} row; give {key}eval or more rows")
        n_eval = math.ceil(source.eval_fraction * len(train))
        if len(train) - n_eval < 1:
            raise PeftkitError(
                f"{key}eval_fraction: {source.eval_fraction:g} of the {len(train)} rows of {source.train} leaves "
                f"none to train on; lower {key}eval_fraction, give {key}eval, or add rows"
            )
        split = train.train_test_split(test_size=n_eval, seed=seed)
        train, eval_ = split["train"], split["test"]
        eval_columns = columns
        eval_source = f"{source.train} (eval split of {source.eval_fraction:g})"
    train = _to_roles(train, columns)
    eval_ = _to_roles(eval_, eval_columns)
    # Labels are learned from every row, before any is dropped: they do not depend on max_train_samples, and an
    # eval split carved from train learns from the whole file (a rare label that lands only in the split is
    # still one of the file's labels).
    fit_rows = train
    if source.eval is None:
        import datasets

        fit_rows = datasets.concatenate_datasets([train, eval_])
    return train, eval_, eval_source, fit_rows


def _pool(parts: list[Any]) -> Any:
    """One data set from several with the same roles; columns typed differently (0/1 vs "pos") become text."""
    if len(parts) == 1:
        return parts[0]
    import datasets

    columns = parts[0].column_names
    parts = [p.select_columns(columns) for p in parts]
    if any(p.features != parts[0].features for p in parts[1:]):
        text = datasets.Features({c: datasets.Value("string") for c in columns})
        parts = [p.cast(text) for p in parts]
    return datasets.concatenate_datasets(parts)


def load_task_data(data: DataSection, task: TaskHead, seed: int) -> RawData:
    """Train and eval rows with columns renamed to the task's roles, and the task fitted to them.

    With several data sets (``data.also``) the train rows are pooled into one adapter (each data set's share set
    by ``data.sampling``); the eval rows stay in one part per data set, so that each data set's metrics can be
    reported too. With a head per data set (``task.for_source``), each is fitted to its own data set, and every row
    carries its data set's index (``source``).
    """
    per_source = len(data.sources()) > 1 and task.for_source(1) is not task
    loaded = []
    for i, source in enumerate(data.sources()):
        key = "data." if i == 0 else f"data.also[{i - 1}]."
        head = task.for_source(i)
        before = dict(task.state)
        loaded.append(_load_source(source, head, seed, key))
        if i and before.get("format") != task.state.get("format"):
            raise PeftkitError(f"{key}train: its rows are {task.state.get('format')} but data.train's are "
                               f"{before.get('format')}; one adapter learns one format")
        roles, first = set(loaded[-1][0].column_names), set(loaded[0][0].column_names)
        if roles != first and not per_source:
            raise PeftkitError(f"{key}train: {source.train} gives the task {', '.join(sorted(roles))} but data.train "
                               f"gives {', '.join(sorted(first))}; data sets pooled into one adapter need the same "
                               f"roles (map them with {key}columns)")
    if per_source:
        for i, (_, eval_, eval_source, fit_rows) in enumerate(loaded):
            task.for_source(i).fit(fit_rows, eval_, eval_source)
        task.fit(None, None, "")  # gathers what each data set's head learned
    else:
        pooled = _pool([part[3] for part in loaded])
        for _, eval_, eval_source, _ in loaded:
            # bad eval rows are reported by their row number in their own file
            task.fit(pooled, eval_, eval_source)
    trains, evals = [], []
    for i, (source, (train, eval_, eval_source, _)) in enumerate(zip(data.sources(), loaded)):
        if source.max_train_samples and len(train) > source.max_train_samples:
            train = train.shuffle(seed=seed).select(range(source.max_train_samples))
        if source.max_eval_samples and len(eval_) > source.max_eval_samples:
            eval_ = eval_.shuffle(seed=seed).select(range(source.max_eval_samples))
        if per_source:
            train, eval_ = (part.add_column("source", [i] * len(part)) for part in (train, eval_))
        trains.append(train)
        evals.append((source.label(), eval_))
    if data.sampling == "temperature":
        trains = _temperature_sampled(trains, data.temperature, seed)
    if per_source:
        trains, evals = _same_columns(trains, evals)
    train = _pool(trains)
    eval_ = _pool([e for _, e in evals])
    eval_source = loaded[0][2] if len(loaded) == 1 else ", ".join(part[2] for part in loaded)
    return RawData(train, eval_, eval_source, evals)


def _temperature_sampled(parts: list[Any], temperature: float, seed: int) -> list[Any]:
    """Each data set's rows drawn so that its share of the pooled rows is ``size^(1/T)`` over the sum of those
    (the total stays the sum of the sizes): a data set smaller than its share is repeated (whole copies, then a
    seeded sample of the rest), a larger one is cut to a seeded sample. Drawn once per run, before the epochs."""
    sizes = [len(p) for p in parts]
    weights = [n ** (1 / temperature) for n in sizes]
    total = sum(sizes)
    out = []
    for i, (part, weight) in enumerate(zip(parts, weights)):
        want = max(1, round(total * weight / sum(weights)))
        order = [j for _ in range(want // len(part)) for j in range(len(part))]
        rest = random.Random(seed + i).sample(range(len(part)), want - len(order))
        out.append(part.select(order + sorted(rest)))
    return out


def _same_columns(trains: list[Any], evals: list[tuple[str, Any]]) -> tuple[list[Any], list[tuple[str, Any]]]:
    """Data sets with a head each may read different roles (a pair and a single sentence): each gets the columns
    it lacks, empty, so that they pool; their heads encode only the columns their rows fill."""
    columns = list(dict.fromkeys(c for part in [*trains, *(e for _, e in evals)] for c in part.column_names))

    def filled(part: Any) -> Any:
        for column in columns:
            if column not in part.column_names:
                part = part.add_column(column, [None] * len(part))
        return part.select_columns(columns)  # differently typed columns become text when they pool (_pool)

    return [filled(p) for p in trains], [(name, filled(e)) for name, e in evals]


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
        # A fixed window of 64 batches, although up to 2,048 rows it sorts the whole set and every epoch then
        # cuts nearly the same batches (in a new order). transformers' rule (at least 4 windows) was measured
        # instead (benchmarks/results/batch-windows/): LoRA on 250 SST-2 rows, 3 seeds, 75.2 % against 75.9 %
        # here, while computing 2.32x the tokens at 250 rows, 1.28x at 1,000 and 1.05x at 4,000.
        window = batch_size * 64
        grouped: list[int] = []
        for start in range(0, len(order), window):
            grouped.extend(sorted(order[start : start + window], key=lambda i: -lengths[i]))
        order = grouped
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        # The batches leave in random order, not in the window's length order as transformers'
        # LengthGroupedSampler leaves them: where length follows the label, sorted neighbours share it. Measured on
        # SMS spam (spam twice as long as ham), 4,000 rows, LoRA, 3 seeds: the careful Trainer peer with
        # group_by_length sees up to 14 batches in a row without a spam message and collapses to "ham" on every
        # seed (macro F1 46.5), with Trainer's random sampler it reaches 98.0, peftkit 97.3
        # (benchmarks/results/replay_peer/sms-4000-seed42/).
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


# Below this many optimizer steps a run says it is short. Measured on MiniLM / SST-2 (issue 14): one epoch of
# 500 rows at batch 32 (16 steps) taught neither peftkit nor a hand-written Trainer anything, 64 steps reached
# 75-80 % with LoRA and AdaLoRA; the data-size sweep trains at least 128 (benchmarks/sweep.py).
SHORT_RUN_STEPS = 64
ENOUGH_STEPS = 128


def short_run_notice(steps: int, epochs: float, max_steps: Optional[int]) -> Optional[str]:
    """A one-line note when ``steps`` optimizer steps are too few to learn much, with the setting that fixes it."""
    if steps >= SHORT_RUN_STEPS:
        return None
    fix = ("raise train.max_steps" if max_steps else
           f"train.epochs {math.ceil(ENOUGH_STEPS * epochs / steps)} gives about {ENOUGH_STEPS}")
    return (f"note: {steps} optimizer steps is a short run (on a small encoder, 16 steps learned nothing and 64 "
            f"reached 75-80 % on SST-2); {fix}, or lower train.batch_size")


def total_steps(n_rows: int, batch_size: int, grad_accum: int, epochs: float, max_steps: Optional[int],
                num_processes: int = 1) -> int:
    """Optimizer steps of a run: what AdaLoRA's schedule and the LR schedule are laid over."""
    if max_steps:
        return max_steps
    n_batches = -(-n_rows // batch_size)
    n_batches -= n_batches % num_processes
    per_epoch = steps_per_epoch(n_batches, grad_accum, num_processes)
    return max(1, int(round(per_epoch * epochs)))
