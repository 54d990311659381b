"""Does domain pre-training on a task's own unlabelled text help its small-data fine-tuning? (issue 16, part 4)

    python benchmarks/domain_pretrain.py                       # pre-train once, then every run not yet stored
    python benchmarks/domain_pretrain.py --rows 250 --seeds 42  # a part of the grid
    python benchmarks/domain_pretrain.py --report-only          # the table from the runs stored so far

MiniLM is pre-trained once with masked language modelling on SST-2's train sentences, labels ignored
(``recipes/sst2-mlm.yaml``: 8,000 sentences, one epoch, LoRA r=8 on every linear layer). Then the SST-2 LoRA
classifier (``recipes/sst2-base.yaml``) is fine-tuned on 250, 500 and 1,000 labelled rows twice with the same
hyperparameters and the same rows: from scratch (``plain``) and starting from the masked-LM adapter
(``from-mlm``, ``adapter.init_from``: its LoRA weights, a new head). Training length follows the sweep's rule
(``sweep.py``): whole epochs, ``max(1, ceil(128 * 32 / rows))``, so each run takes at least 128 optimizer steps;
evaluated once, at the end, on SST-2's 872 dev rows. The rows of a run are drawn by its seed (the recipe's
``max_train_samples``), the same for both arms.

One process at a time, one thread (``OMP_NUM_THREADS=1``). Each run is one JSON file in
``benchmarks/results/domain-pretrain/runs/`` with its command, CPU, seed and metrics; a run already stored is not
run again, so the grid can be run in pieces. The report gives each arm's accuracy and the gain (``from-mlm`` minus
``plain`` on the same seed and rows) as mean +- sample std over the seeds, in accuracy points.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from common import REPO, RESULTS, git_commit_short, machine_info, write_whole  # noqa: E402

OUT = RESULTS / "domain-pretrain"
PRETRAINED = "sst2-mlm"
ARMS = ("plain", "from-mlm")
MIN_STEPS, BATCH = 128, 32


def epochs_for(rows: int) -> int:
    """The sweep's rule: whole epochs, at least MIN_STEPS optimizer steps."""
    return max(1, math.ceil(MIN_STEPS * BATCH / rows))


def run_name(rows: int, arm: str, seed: int) -> str:
    return f"sst2-{rows}rows-{arm}-seed{seed}"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[250, 1000, 500],
                        help="labelled training rows (run in this order)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--out", type=Path, default=OUT, help="results folder (runs/ and results.md inside)")
    parser.add_argument("--registry", type=Path, default=REPO / "adapters" / "domain-pretrain",
                        help="where the adapters go (git-ignored by default)")
    parser.add_argument("--pretrain-rows", type=int, default=8000)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    bad = [r for r in args.rows if r < 1] + [args.pretrain_rows] * (args.pretrain_rows < 1)
    if bad:
        parser.error(f"row counts must be 1 or more (got {bad[0]})")
    return args


def overrides(args: argparse.Namespace, name: str, extra: list[str]) -> list[str]:
    return [f"output.registry={args.registry}", f"output.runs={args.registry / 'runs'}", f"output.name={name}",
            "train.progress=false", *extra]


def train_stored(args: argparse.Namespace, recipe: str, name: str, extra: list[str], record: dict[str, Any]) -> dict:
    """Train ``recipe`` with ``extra`` overrides; store and return the run's record."""
    import torch

    from peftkit.config.recipe import load_recipe
    from peftkit.train.training import train

    torch.set_num_threads(1)
    sets = overrides(args, name, extra)
    command = " ".join(["peftkit", "train", recipe, *(f"--set {s}" for s in sets), "--overwrite"])
    start = time.time()
    result = train(load_recipe(REPO / recipe, sets), overwrite=True, echo=lambda line: print(f"  {line}", flush=True))
    record.update(ok=True, command=command, seconds=round(time.time() - start, 1), metrics=result.metrics,
                  optimizer_steps=result.metadata.training.optimizer_steps,
                  train_rows=result.metadata.training.train_rows,
                  provenance={k: v for k, v in result.metadata.provenance.items() if k != "parent_files"},
                  machine=machine_info(), commit=git_commit_short())
    return record


def pretrain(args: argparse.Namespace) -> None:
    path = args.out / "runs" / "pretrain.json"
    if path.is_file() and (args.registry / PRETRAINED).is_dir():
        return
    print(f"pre-training {PRETRAINED} on {args.pretrain_rows} SST-2 sentences", flush=True)
    record = train_stored(args, "recipes/sst2-mlm.yaml", PRETRAINED,
                          [f"data.max_train_samples={args.pretrain_rows}"], {"name": PRETRAINED, "seed": 42})
    write_whole(path, json.dumps(record, indent=2) + "\n")


def fine_tune(args: argparse.Namespace, rows: int, arm: str, seed: int) -> None:
    name = run_name(rows, arm, seed)
    path = args.out / "runs" / f"{name}.json"
    if path.is_file() and json.loads(path.read_text()).get("ok"):
        return
    print(f"{name}", flush=True)
    extra = [f"data.max_train_samples={rows}", f"train.seed={seed}", f"train.epochs={epochs_for(rows)}",
             "train.eval_every=1000000"]
    if arm == "from-mlm":
        extra.append(f"adapter.init_from={PRETRAINED}")
    record = train_stored(args, "recipes/sst2-base.yaml", name, extra,
                          {"name": name, "rows": rows, "arm": arm, "seed": seed})
    write_whole(path, json.dumps(record, indent=2) + "\n")


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):+.1f} ± {std:.1f}" if len(values) > 1 else f"{values[0]:+.1f}"


def report(out: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("sst2-*rows-*.json"))]
    runs = [r for r in runs if r.get("ok")]
    by = {(r["rows"], r["arm"], r["seed"]): 100 * r["metrics"]["accuracy"] for r in runs}
    lines = ["| rows | seeds | plain accuracy | from-mlm accuracy | gain (points) |", "|---|---|---|---|---|"]
    summary = {}
    for rows in sorted({r for r, _, _ in by}):
        seeds = sorted({s for r, a, s in by if r == rows and (r, "plain", s) in by and (r, "from-mlm", s) in by})
        plain = [by[(rows, "plain", s)] for s in seeds]
        mlm = [by[(rows, "from-mlm", s)] for s in seeds]
        gains = [m - p for m, p in zip(mlm, plain)]
        summary[rows] = {"seeds": seeds, "plain": plain, "from_mlm": mlm, "gain": gains}
        lines.append(f"| {rows:,} | {', '.join(map(str, seeds))} | {mean_std(plain).lstrip('+')} | "
                     f"{mean_std(mlm).lstrip('+')} | {mean_std(gains)} |")
    pre = out / "runs" / "pretrain.json"
    head = []
    if pre.is_file():
        p = json.loads(pre.read_text())
        m = p["metrics"]
        head = [f"Pre-training ({p['train_rows']:,} SST-2 train sentences, {p['optimizer_steps']} steps, "
                f"{p['seconds']:.0f} s on {p['machine'].get('cpu', 'the CPU')}): SST-2 dev masked-token loss "
                f"{m['loss']:.3f}, perplexity {m['perplexity']:.1f}, accuracy {100 * m['accuracy']:.1f} %.", ""]
    text = "\n".join(head + lines) + "\n"
    write_whole(out / "results.md", text)
    write_whole(out / "results.json", json.dumps({"summary": summary}, indent=2) + "\n")
    return text


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        pretrain(args)
        for rows in args.rows:
            for seed in args.seeds:
                for arm in ARMS:
                    fine_tune(args, rows, arm, seed)
    print(report(args.out))


if __name__ == "__main__":
    main()
