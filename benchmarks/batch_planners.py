"""Batch planners: the positions each computes per real token, on the benchmark tasks (issue 15, part 1).

peftkit plans its own length-grouped batches (``peftkit.core.data.plan_batches``: windows of 64 batches, sorted by
length, batches shuffled). transformers' ``Trainer`` has ``LengthGroupedSampler`` (mega-batches of at most 50
batches, at least 4 of them, sorted). Whether peftkit keeps its planner when its training runs on ``Trainer`` is
decided by this measurement: a batch computes ``rows x longest row`` positions, and the ratio to the real tokens
is the compute spent on padding. Random batches (no grouping) are the third row.

    python benchmarks/batch_planners.py [--tasks sst2 agnews ...] [--rows 250 1000 4000 0] [--seeds 3]

Rows are drawn as the sweep draws them (``random.Random(0)``), tokenized with MiniLM's tokenizer at each task's
max length. Nothing trains; it takes about a minute. Writes ``benchmarks/results/batch_planners/results.md`` and
``results.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tasks import TASKS  # noqa: E402
from common import markdown_table, write_whole  # noqa: E402
from padding import padded_tokens, token_lengths  # noqa: E402

SEEDS = [42, 1, 2, 3, 4]
CLASSIFICATION = ["sst2", "agnews", "cola", "sms", "rte", "mrpc"]


def trainer_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """The batches ``Trainer`` cuts from ``LengthGroupedSampler`` (consecutive indices, ``batch_size`` each)."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator()
    generator.manual_seed(seed)
    order = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=generator))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def measure(lengths: list[int], batch_size: int, seed: int) -> dict[str, float]:
    from peftkit.core.data import plan_batches

    real = sum(lengths)
    planners = {
        "random": plan_batches(lengths, batch_size, seed, 0, False),
        "peftkit": plan_batches(lengths, batch_size, seed, 0, True),
        "trainer": trainer_batches(lengths, batch_size, seed),
    }
    for name, batches in planners.items():  # every planner takes every row once
        assert sorted(i for b in batches for i in b) == list(range(len(lengths))), name
    return {name: padded_tokens(lengths, batches) / real for name, batches in planners.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=CLASSIFICATION, choices=CLASSIFICATION)
    p.add_argument("--rows", nargs="+", type=int, default=[250, 1000, 4000, 0], help="0: every training row")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "batch_planners")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from compare_methods import model_folder

    tokenizer = AutoTokenizer.from_pretrained(model_folder("minilm"))
    records = []
    for name in args.tasks:
        task = TASKS[name]
        train = task.read("train")
        sizes = sorted({len(train) if rows == 0 else min(rows, len(train)) for rows in args.rows})
        for n in sizes:
            sample = random.Random(0).sample(train, n) if n < len(train) else train
            lengths = token_lengths(sample, task.kind, tokenizer, task.max_length)
            per_seed = [measure(lengths, task.batch_size, seed) for seed in SEEDS[: args.seeds]]
            record = {"task": name, "rows": n, "batch_size": task.batch_size, "max_length": task.max_length,
                      "mean_length": sum(lengths) / n, "seeds": SEEDS[: args.seeds],
                      **{k: mean(s[k] for s in per_seed) for k in ("random", "peftkit", "trainer")}}
            records.append(record)
            print(f"{name:7s} {n:6,d} rows: positions per real token: random {record['random']:.3f}, "
                  f"peftkit {record['peftkit']:.3f}, Trainer {record['trainer']:.3f}", flush=True)

    table = markdown_table(records, [
        ("task", lambda r: r["task"]), ("rows", lambda r: f"{r['rows']:,}"),
        ("mean tokens", lambda r: f"{r['mean_length']:.1f}"), ("random", lambda r: f"{r['random']:.3f}"),
        ("peftkit", lambda r: f"{r['peftkit']:.3f}"),
        ("Trainer's LengthGroupedSampler", lambda r: f"{r['trainer']:.3f}"),
        ("Trainer / peftkit", lambda r: f"{r['trainer'] / r['peftkit']:.2f}x")])
    text = (f"# Positions computed per real token, batch 32 (mean of seeds {', '.join(map(str, SEEDS[: args.seeds]))})"
            "\n\n`python benchmarks/batch_planners.py`: one epoch's batches from each planner; a batch computes rows x its "
            "longest row. Nothing is trained.\n\n" + table + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    write_whole(args.out / "results.md", text)
    write_whole(args.out / "results.json", json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
