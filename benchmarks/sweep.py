"""The data-size sweep (issue 14): peftkit against the careful hand-written peer at every training size.

    python benchmarks/sweep.py --dry-run            # every cell of the default grid, and how many remain
    python benchmarks/sweep.py --max-cells 6        # run the next 6 cells not yet stored, then report
    python benchmarks/sweep.py --tasks sst2 --rows 1000 --methods lora adalora --seeds 3
    python benchmarks/sweep.py --report-only        # tables, targets and plots from the runs stored so far

A cell is one task, training size, method and seed. peftkit (``run_peftkit.py``) and the careful peer
(``baseline_hf.py``; ``--peers careful naive`` adds the naive one) train it through ``compare_methods.run_pair``
on the same rows (``bench_tasks.prepare``: data seed 0), the two at the same time with one thread each
(``compare_methods --concurrent``): two processes on the 2 cores. The default grid is issue 14's: SST-2 and AG
News at 250, 500, 1,000, 2,000, 4,000 and 8,000 rows; CoLA, SMS spam, RTE and MRPC at 1,000 and 4,000 rows, or
all their rows when fewer (a size that collapses onto another is run once); LoRA fp32, QLoRA NF4 and AdaLoRA
fp32 everywhere, and full fine-tuning, LoRA 8-bit and AdaLoRA NF4 on SST-2 at 1,000 and 4,000 rows; seeds 42, 1
and 2. Cells run SST-2 first, smallest size first, then AG News, then the others, each size's seeds and methods
together, so a partial sweep already answers the small sizes.

Training length, the same rule for both tools (:data:`RULE`): whole epochs,
``epochs = max(1, ceil(MIN_STEPS * batch_size / rows))`` with MIN_STEPS = 128 optimizer steps, so every run takes
``epochs * ceil(rows / batch_size)`` >= 128 steps: 500 rows at batch 32 train 9 epochs (144 steps), 8,000 rows
one (250). One epoch of 500 rows (16 steps) teaches MiniLM nothing with either tool, and no user would stop
there. Both tools get the same ``--epochs`` (``bench_tasks.baseline_flags``); each stored run records the steps
it took beside the rule's, and the report lists any run whose steps differ.

Resumable in pieces: each run is one JSON file in ``OUT/runs/`` (``sst2-1000rows-lora-seed42-peftkit.json``),
written whole (a temporary file, then ``os.replace``). A run already stored with ``ok: true`` is not run again;
one stored with ``ok: false`` (failed, killed at ``--timeout``) is retried by the next invocation. Stop at any
time (``--max-cells``, Ctrl-C): the report (``sweep_report.py``) is built from whatever runs exist.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import bench_tasks
import sweep_report
from bench_tasks import METHODS, TASKS, Prepared, prepare
from common import (REPO, describe_machine, fail, git_commit_short, last_lines, machine_info, results_dir,
                    write_whole)
from compare_methods import PEERS, SEED_LIST, model_folder, peak_bytes, run_pair
from sweep_report import FORMAT, TASK_ORDER

MIN_STEPS = 128
RULE = ("whole epochs, epochs = max(1, ceil(MIN_STEPS * batch_size / rows)) with MIN_STEPS = 128 optimizer steps, "
        "the same for peftkit and the peers")

DEFAULT_TASKS = TASK_ORDER
DEFAULT_ROWS = {"sst2": [250, 500, 1000, 2000, 4000, 8000], "agnews": [250, 500, 1000, 2000, 4000, 8000]}
OTHER_ROWS = [1000, 4000]
DEFAULT_METHODS = ["lora", "qlora", "adalora"]
# (task, rows) -> the methods run there beside the default ones
EXTRA_METHODS = {("sst2", 1000): ["full", "lora-8bit", "adalora-4bit"],
                 ("sst2", 4000): ["full", "lora-8bit", "adalora-4bit"]}


def epochs_for(rows: int, batch_size: int) -> int:
    """The rule: the fewest whole epochs that give at least MIN_STEPS optimizer steps."""
    return max(1, math.ceil(MIN_STEPS * batch_size / rows))


def steps_for(rows: int, batch_size: int) -> int:
    """Optimizer steps of a run under the rule: epochs x batches per epoch (the last batch may be short)."""
    return epochs_for(rows, batch_size) * math.ceil(rows / batch_size)


@dataclass(frozen=True)
class Cell:
    task: str
    rows: int
    method: str
    seed: int

    def stem(self, tool: str) -> str:
        return f"{self.task}-{self.rows}rows-{self.method}-seed{self.seed}-{tool}"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, metavar="TASK",
                   help=f"classification or regression tasks, in the order they run (default {' '.join(DEFAULT_TASKS)})")
    p.add_argument("--rows", nargs="+", type=int, metavar="N",
                   help="training sizes for every task (default: 250 ... 8,000 for sst2 and agnews, 1,000 and "
                        "4,000 for the others); a size above a task's rows means all of them")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help=f"among {', '.join(METHODS)}, at every size (default: {' '.join(DEFAULT_METHODS)}, and "
                        "full, lora-8bit, adalora-4bit on sst2 at 1,000 and 4,000 rows)")
    p.add_argument("--seeds", type=int, default=3, help=f"seeds per cell: the first N of {SEED_LIST}")
    p.add_argument("--peers", nargs="+", choices=list(PEERS), default=["careful"],
                   help="hand-written peers beside peftkit (default: the careful one)")
    p.add_argument("--model", help="a model folder in place of each task's own (tests use a tiny one)")
    p.add_argument("--data-root", help="folder laid out like ../shared/data (default: that folder)")
    p.add_argument("--out", help="results folder (default benchmarks/results/sweep)")
    p.add_argument("--max-cells", type=int, metavar="N", help="stop after running N cells (stored ones not counted)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed (stored as failed)")
    p.add_argument("--dry-run", action="store_true", help="print the cells and how many remain; run nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the stored runs")
    args = p.parse_args(argv)
    for name in args.tasks:
        if name not in TASKS:
            fail(f"--tasks: unknown task {name!r}; choose among {', '.join(TASKS)}")
        if TASKS[name].kind not in ("classification", "regression"):
            fail(f"--tasks: {name} is a {TASKS[name].kind} task; the sweep compares classifiers and regressors")
    for name in args.methods or []:
        if name not in METHODS:
            fail(f"--methods: unknown method {name!r}; choose among {', '.join(METHODS)}")
    if any(n < 1 for n in args.rows or []):
        fail("--rows: every size must be at least 1")
    if not 1 <= args.seeds <= len(SEED_LIST):
        fail(f"--seeds: give 1 to {len(SEED_LIST)}")
    if args.max_cells is not None and args.max_cells < 1:
        fail("--max-cells: give 1 or more")
    if args.data_root:
        if not Path(args.data_root).is_dir():
            fail(f"--data-root: {args.data_root} is not a folder; point it at a copy of ../shared/data")
        bench_tasks.DATA_ROOT[0] = Path(args.data_root)
    # what run_pair reads: one thread per run, the runs of a cell at the same time
    args.threads, args.concurrent, args.no_baseline = 1, True, False
    return args


def grid(args: argparse.Namespace, available: Callable[[str], int]) -> list[Cell]:
    """The cells in the order they run: task by task, size by size, then seed, then method."""
    cells = []
    for task in args.tasks:
        asked = args.rows or DEFAULT_ROWS.get(task, OTHER_ROWS)
        for rows in sorted(dict.fromkeys(min(n, available(task)) for n in asked)):
            methods = args.methods or DEFAULT_METHODS + EXTRA_METHODS.get((task, rows), [])
            cells += [Cell(task, rows, m, seed) for seed in SEED_LIST[:args.seeds] for m in methods]
    return cells


def tools_of(args: argparse.Namespace) -> list[str]:
    return ["peftkit", *(PEERS[p] for p in args.peers)]


def stored(runs: Path, cell: Cell, tool: str) -> Optional[dict[str, Any]]:
    path = runs / f"{cell.stem(tool)}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def to_run(runs: Path, cell: Cell, tools: list[str]) -> list[str]:
    """The tools of ``cell`` with no stored run, or a failed one."""
    return [t for t in tools if not (stored(runs, cell, t) or {}).get("ok")]


def write_run(runs: Path, cell: Cell, tool: str, record: dict[str, Any]) -> Path:
    return write_whole(runs / f"{cell.stem(tool)}.json", json.dumps(record, indent=2, default=str) + "\n")


def _git_dirty() -> Optional[bool]:
    """Whether tracked files differ from the commit the runs name (None without git)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_record(cell: Cell, raw: dict[str, Any], prepared: Prepared, model: str,
               provenance: dict[str, Any]) -> dict[str, Any]:
    """What is stored for one run: run_pair's record whole (``run``), the figures the report reads, and how
    the run was set up (rows, epochs, steps, the rule, machine, commit, time)."""
    task = prepared.task
    result = raw.get("result") or {}
    metrics = result.get("metrics") or {}
    record = {
        "format": FORMAT, "task": cell.task, "rows": prepared.n_train, "eval_rows": prepared.n_eval,
        "method": cell.method, "seed": cell.seed, "tool": raw["tool"], "model": model, "ok": raw["ok"],
        "metric_name": task.metric, "metric": metrics.get(task.metric), "metrics": metrics,
        "batch_size": task.batch_size, "epochs": epochs_for(prepared.n_train, task.batch_size),
        "rule_steps": steps_for(prepared.n_train, task.batch_size), "optimizer_steps": result.get("optimizer_steps"),
        "rule": RULE, "train_seconds": result.get("train_seconds"),
        "examples_per_second": result.get("examples_per_second"), "peak_bytes": peak_bytes(raw),
        "trainable_start": result.get("trainable_start"), "trainable_final": result.get("trainable_final"),
        **provenance, "utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "run": raw,
    }
    if not raw["ok"]:
        record["log_tail"] = last_lines(raw["log"], 30)
    return record


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    folder = results_dir("sweep", args.out)
    runs = folder / "runs"
    if args.report_only:
        print(sweep_report.report(folder))
        return
    sizes: dict[str, int] = {}

    def available(task: str) -> int:
        if task not in sizes:
            sizes[task] = len(TASKS[task].read("train"))
        return sizes[task]

    cells = grid(args, available)
    tools = tools_of(args)
    pending = [(cell, to_run(runs, cell, tools)) for cell in cells]
    pending = [(cell, missing) for cell, missing in pending if missing]
    if args.dry_run:
        waiting = dict((c, m) for c, m in pending)
        for cell in cells:
            state = f"to run: {', '.join(waiting[cell])}" if cell in waiting else "stored"
            print(f"{cell.task:<7} {cell.rows:>5} rows  {cell.method:<13} seed {cell.seed:<3} "
                  f"{epochs_for(cell.rows, TASKS[cell.task].batch_size):>3} epochs "
                  f"{steps_for(cell.rows, TASKS[cell.task].batch_size):>4} steps  {state}")
        print(f"{len(cells)} cells ({len(cells) * len(tools)} runs: {', '.join(tools)}); {len(pending)} cells "
              f"remain ({sum(len(m) for _, m in pending)} runs)")
        return
    runs.mkdir(exist_ok=True)
    machine = machine_info()
    provenance = {"machine": {"cpu": machine["cpu"], "cpu_flags": machine["cpu_flags"],
                              "description": describe_machine(machine)},
                  "git_commit": machine["git_commit"], "git_dirty": _git_dirty(), "peers": args.peers}
    print(f"machine: {describe_machine(machine)}", flush=True)
    print(f"{len(cells)} cells, {len(pending)} to run{f' (at most {args.max_cells} now)' if args.max_cells else ''}; "
          f"rule: {RULE}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="peftkit-sweep-"))
    print(f"work folder (data, recipes, logs): {work}", flush=True)
    prepared_for: dict[tuple[str, int], Prepared] = {}
    folders: dict[str, Path] = {}
    failed = 0
    try:
        for done, (cell, missing) in enumerate(pending[:args.max_cells]):
            task = TASKS[cell.task]
            model = args.model or task.model
            if model not in folders:
                folders[model] = model_folder(model)
            cell_work = work / f"{cell.task}-{cell.rows}"
            if (cell.task, cell.rows) not in prepared_for:
                prepared_for[cell.task, cell.rows] = prepare(task, cell_work / "data", cell.rows)
            prepared = prepared_for[cell.task, cell.rows]
            epochs = epochs_for(prepared.n_train, task.batch_size)
            print(f"[{done + 1}/{min(len(pending), args.max_cells or len(pending))}] {cell.task} {cell.rows} rows "
                  f"{cell.method} seed {cell.seed}: {epochs} epochs, {steps_for(prepared.n_train, task.batch_size)} "
                  f"steps by the rule; running {', '.join(missing)}", flush=True)
            # read per cell, as the runs start: a long sweep outlives commits (the first one recorded the start's)
            code = {"git_commit": git_commit_short(), "git_dirty": _git_dirty()}
            records = run_pair(prepared, METHODS[cell.method], cell.seed, model, folders[model], cell_work, args,
                               peftkit_first=done % 2 == 0, epochs=epochs, tools=set(missing))
            for raw in records:
                record = run_record(cell, raw, prepared, model, {**provenance, **code})
                write_run(runs, cell, raw["tool"], record)
                failed += not record["ok"]
            print("  optimizer steps: " + ", ".join(
                f"{t} {(stored(runs, cell, t) or {}).get('optimizer_steps')}" for t in tools)
                + f" (rule {steps_for(prepared.n_train, task.batch_size)})", flush=True)
            for bulky in ("adapters", "runs", "hf"):  # trained weights; the logs and recipes stay for reference
                shutil.rmtree(cell_work / bulky, ignore_errors=True)
    finally:
        complete = sum(not to_run(runs, cell, tools) for cell in cells)
        print(sweep_report.report(folder, progress=(complete, len(cells))))
    if failed:
        print(f"{failed} run(s) failed; they are stored with ok=false and the next invocation retries them",
              file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
