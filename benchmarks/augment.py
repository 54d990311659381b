"""Does EDA (``data.augment``) help LoRA on small training sets? Issue 19, part 4: SST-2 and AG News, 3 seeds.

    python benchmarks/augment.py --dry-run          # every cell of the grid, and how many runs remain
    python benchmarks/augment.py                    # run every cell not stored yet, then the report
    python benchmarks/augment.py --max-cells 4      # the next 4 cells, then the report
    python benchmarks/augment.py --report-only      # the report from the runs stored so far

A cell is one task, training size and seed: LoRA fp32 on MiniLM (``bench_tasks``' "lora" method, the sweep's
settings) trained twice on the same rows (``bench_tasks.prepare``, data seed 0), once as they are ("plain") and
once with ``data.augment`` ("eda": the recipe defaults, copies auto = 16 at 250 and 500 rows and 8 at 1,000, each
rate 0.1; ``--copies``/``--alpha`` give another variant, stored under its own name). The two run at the same
time, one thread each, so whatever else loads the 2 cores loads both alike. The default grid is the issue's:
SST-2 and AG News at 250, 500 and 1,000 training rows, seeds 42, 1 and 2 (18 cells, 36 runs; on 2 idle cores an
SST-2 cell takes about 2 minutes, an AG News cell about 6, so about 75 minutes in all).

Fair, here, means the same training: the same optimizer steps, batch size, learning rate and schedule, so about
the same number of training examples, that is equal epochs counted over the original rows. The plain run trains by
the sweep's rule (``sweep.epochs_for``: whole epochs, at least 128 steps; 250 rows at batch 32 train 17 epochs,
136 steps, 4,250 examples); the eda run takes the same 136 steps over its 4,250 augmented rows (about 4,350
examples: one pass and 3 batches; plain's last batch of each epoch is short), so each original row is seen about
as often as in the plain run, as itself or as a variant, in place of its repeats.
Training eda for plain's 17 epochs over 17x the rows would give it 17x the steps, and a gain could not be told
from training longer. The paper compared neither way: its CNN and RNN trained each set to early stopping
(patience 3 epochs). The paper also expects little from EDA on a pre-trained model ("models that have been
pre-trained on massive datasets probably don't need EDA", its section 10.2): this measures that, for LoRA.

Resumable: each run is one JSON file in ``OUT/runs/`` (``sst2-250rows-lora-eda-seed42.json``), written whole; a
stored run with ``ok: true`` is not run again, a failed one is retried. The report (``results.md``,
``results.json``) gives per task and size the accuracy of each variant (mean and spread over seeds) and the
paired difference eda - plain per seed, from whatever runs exist. ``--max-steps`` and ``--eval-rows`` shorten
runs to check the script end to end; such runs measure nothing, so they need their own ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import bench_tasks
from bench_tasks import METHODS, TASKS, Prepared, peftkit_recipe, prepare
from common import (BENCH_DIR, describe_machine, fail, fmt, last_lines, machine_info, markdown_table, mean_spread,
                    results_dir, run_measured, write_results, write_whole)
from compare_methods import SEED_LIST, model_folder, threaded_env
from sweep import _git_dirty, epochs_for, steps_for

FORMAT = 1
DEFAULT_TASKS = ["sst2", "agnews"]
DEFAULT_ROWS = [250, 500, 1000]
METHOD = METHODS["lora"]
COMMAND = "python benchmarks/augment.py"


@dataclass(frozen=True)
class Cell:
    task: str
    rows: int
    seed: int

    def stem(self, variant: str) -> str:
        return f"{self.task}-{self.rows}rows-{METHOD.name}-{variant}-seed{self.seed}"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, metavar="TASK",
                   help=f"classification tasks of bench_tasks (default {' '.join(DEFAULT_TASKS)})")
    p.add_argument("--rows", nargs="+", type=int, default=DEFAULT_ROWS, metavar="N",
                   help="training sizes (default 250 500 1000)")
    p.add_argument("--seeds", type=int, default=3, help=f"seeds per cell: the first N of {SEED_LIST}")
    p.add_argument("--copies", type=int, help="data.augment.copies (default auto: the paper's Table 3)")
    p.add_argument("--alpha", type=float, help="every EDA rate (alpha_sr, alpha_ri, alpha_rs, p_rd; default 0.1)")
    p.add_argument("--model", help="a model folder in place of each task's own (tests use a tiny one)")
    p.add_argument("--data-root", help="folder laid out like ../shared/data (default: that folder)")
    p.add_argument("--out", help="results folder (default benchmarks/results/augment)")
    p.add_argument("--max-cells", type=int, metavar="N", help="stop after running N cells (stored ones not counted)")
    p.add_argument("--max-steps", type=int, metavar="N", help="train every run N steps (a check, not a measurement)")
    p.add_argument("--eval-rows", type=int, metavar="N", help="evaluate on N rows (a check, not a measurement)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed (stored as failed)")
    p.add_argument("--dry-run", action="store_true", help="print the cells and how many runs remain; run nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the stored runs")
    args = p.parse_args(argv)
    for name in args.tasks:
        if name not in TASKS or TASKS[name].kind != "classification":
            fail(f"--tasks: {name!r} is not a classification task; choose among "
                 f"{', '.join(n for n, t in TASKS.items() if t.kind == 'classification')}")
    if any(n < 1 for n in args.rows):
        fail("--rows: every size must be at least 1")
    if not 1 <= args.seeds <= len(SEED_LIST):
        fail(f"--seeds: give 1 to {len(SEED_LIST)}")
    if args.copies is not None and args.copies < 1:
        fail("--copies: give 1 or more")
    if args.alpha is not None and not 0 < args.alpha <= 1:
        fail("--alpha: give a rate in (0, 1]")
    for flag in ("max_cells", "max_steps", "eval_rows"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')}: give 1 or more")
    if (args.max_steps or args.eval_rows) and not args.out:
        fail("--max-steps/--eval-rows: shortened runs measure nothing; give --out so that they are not stored "
             "among the grid's runs")
    if args.data_root:
        if not Path(args.data_root).is_dir():
            fail(f"--data-root: {args.data_root} is not a folder; point it at a copy of ../shared/data")
        bench_tasks.DATA_ROOT[0] = Path(args.data_root)
    return args


def augment_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if args.copies is not None:
        settings["copies"] = args.copies
    if args.alpha is not None:
        settings.update(alpha_sr=args.alpha, alpha_ri=args.alpha, alpha_rs=args.alpha, p_rd=args.alpha)
    return settings


def eda_variant(args: argparse.Namespace) -> str:
    """The augmented run's name: "eda" for the recipe defaults, else the settings that differ."""
    return "eda" + (f"-copies{args.copies}" if args.copies is not None else "") + \
        (f"-alpha{args.alpha:g}" if args.alpha is not None else "")


def grid(args: argparse.Namespace, available: Any) -> list[Cell]:
    """Task by task, size by size (smallest first), then seed."""
    return [Cell(task, rows, seed) for task in args.tasks
            for rows in sorted(dict.fromkeys(min(n, available(task)) for n in args.rows))
            for seed in SEED_LIST[:args.seeds]]


def run_path(runs: Path, cell: Cell, variant: str) -> Path:
    return runs / f"{cell.stem(variant)}.json"


def to_run(runs: Path, cell: Cell, variants: list[str]) -> list[str]:
    """The variants of ``cell`` with no stored run, or a failed one."""
    return [v for v in variants if not (json.loads(run_path(runs, cell, v).read_text())
                                        if run_path(runs, cell, v).is_file() else {}).get("ok")]


def recipe_for(prepared: Prepared, cell: Cell, variant: str, args: argparse.Namespace, steps: int,
               model: str, work: Path) -> dict[str, Any]:
    """The sweep's LoRA recipe for the cell, ``steps`` optimizer steps for both variants (see the docstring)."""
    recipe = peftkit_recipe(prepared, METHOD, cell.seed, work, epochs_for(prepared.n_train, prepared.task.batch_size))
    recipe["base"]["model"] = model
    recipe["train"].update(max_steps=steps, eval_every=steps, save_every=steps)
    recipe["output"]["name"] = cell.stem(variant)
    if variant != "plain":
        recipe["data"]["augment"] = augment_settings(args)
    return recipe


def run_cell(cell: Cell, variants: list[str], prepared: Prepared, args: argparse.Namespace, model: str,
             work: Path, provenance: dict[str, Any]) -> list[dict[str, Any]]:
    import yaml

    steps = args.max_steps or steps_for(prepared.n_train, prepared.task.batch_size)
    commands = {}
    for variant in variants:
        path = work / "recipes" / f"{cell.stem(variant)}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe_for(prepared, cell, variant, args, steps, model, work), sort_keys=False))
        commands[variant] = [sys.executable, BENCH_DIR / "run_peftkit.py", path]

    def measure(variant: str) -> dict[str, Any]:
        return run_measured(commands[variant], work / "logs" / f"{cell.stem(variant)}.log", threaded_env(1),
                            timeout=args.timeout)

    with ThreadPoolExecutor(2) as pool:  # the two variants at once: the machine's load falls on both alike
        measured = dict(zip(variants, pool.map(measure, variants)))
    records = []
    for variant, raw in measured.items():
        result = raw["result"] or {}
        metrics = result.get("metrics") or {}
        records.append({
            "format": FORMAT, "task": cell.task, "rows": prepared.n_train, "eval_rows": prepared.n_eval,
            "method": METHOD.name, "variant": variant, "seed": cell.seed, "ok": raw["ok"], "model": model,
            "metric_name": prepared.task.metric, "metric": metrics.get(prepared.task.metric), "metrics": metrics,
            "batch_size": prepared.task.batch_size, "steps": steps, "optimizer_steps": result.get("optimizer_steps"),
            "examples": result.get("examples"), "augmentation": result.get("augmentation"),
            "train_seconds": result.get("train_seconds"), **provenance,
            "utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "run": raw,
            **({} if raw["ok"] else {"log_tail": last_lines(raw["log"], 30)}),
        })
    return records


def summarize(runs: Path) -> list[dict[str, Any]]:
    """Per task, size and eda variant: each variant's metric over seeds, and eda - plain paired by seed."""
    stored = [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))] if runs.is_dir() else []
    ok = [r for r in stored if r.get("ok") and r.get("format") == FORMAT and r.get("metric") is not None]
    by_key = {(r["task"], r["rows"], r["variant"], r["seed"]): r["metric"] for r in ok}
    rows = []
    order = {task: i for i, task in enumerate(DEFAULT_TASKS)}
    for task, size in sorted({(r["task"], r["rows"]) for r in ok}, key=lambda k: (order.get(k[0], len(order)), k)):
        plain = {seed: m for (t, n, v, seed), m in by_key.items() if (t, n, v) == (task, size, "plain")}
        for variant in sorted({v for (t, n, v, _) in by_key if (t, n) == (task, size) and v != "plain"}):
            eda = {seed: m for (t, n, v, seed), m in by_key.items() if (t, n, v) == (task, size, variant)}
            paired = [eda[s] - plain[s] for s in sorted(eda) if s in plain]
            copies = next((r["augmentation"]["copies"] for r in ok if (r["task"], r["rows"], r["variant"]) ==
                           (task, size, variant) and r.get("augmentation")), None)
            rows.append({"task": task, "rows": size, "variant": variant, "copies": copies,
                         "plain": mean_spread(plain.values()), "eda": mean_spread(eda.values()),
                         "difference": mean_spread(paired), "better": sum(d > 0 for d in paired),
                         "worse": sum(d < 0 for d in paired)})
    return rows


def _points(stats: dict[str, Any]) -> Optional[str]:
    if stats["mean"] is None:
        return None
    return f"{fmt(stats['mean'], 1, 100)} ± {fmt(stats['std'], 1, 100)} (n={stats['n']})"


def report(folder: Path, progress: Optional[tuple[int, int]] = None) -> str:
    summary = summarize(folder / "runs")
    columns = [
        ("task", lambda r: r["task"]), ("rows", lambda r: f"{r['rows']:,}"), ("variant", lambda r: r["variant"]),
        ("copies", lambda r: r["copies"]), ("plain, accuracy %", lambda r: _points(r["plain"])),
        ("with EDA, accuracy %", lambda r: _points(r["eda"])),
        ("EDA - plain, points (paired by seed)", lambda r: None if r["difference"]["mean"] is None else
         f"{r['difference']['mean'] * 100:+.1f} (from {r['difference']['min'] * 100:+.1f} to "
         f"{r['difference']['max'] * 100:+.1f})"),
        ("seeds better / worse", lambda r: f"{r['better']} / {r['worse']}"),
    ]
    done = f" ({progress[0]} of {progress[1]} cells stored)" if progress else ""
    markdown = "\n\n".join([
        f"# EDA (data.augment) against plain LoRA fp32, MiniLM{done}",
        f"Reproduce: `{COMMAND}` (resumable; `--report-only` rebuilds this from `runs/`). Both variants train the "
        "same optimizer steps (the sweep's rule for the plain rows), batch 32, lr 1e-3; see the script's "
        "docstring for why equal steps.",
        markdown_table(summary, columns) if summary else "No runs stored yet.",
    ])
    write_results(folder, {"format": FORMAT, "summary": summary}, markdown)
    return markdown


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    folder = results_dir("augment", args.out)
    runs = folder / "runs"
    if args.report_only:
        print(report(folder))
        return
    sizes: dict[str, int] = {}

    def available(task: str) -> int:
        if task not in sizes:
            sizes[task] = len(TASKS[task].read("train"))
        return sizes[task]

    variants = ["plain", eda_variant(args)]
    cells = grid(args, available)
    pending = [(cell, missing) for cell in cells if (missing := to_run(runs, cell, variants))]
    if args.dry_run:
        waiting = dict(pending)
        for cell in cells:
            state = f"to run: {', '.join(waiting[cell])}" if cell in waiting else "stored"
            print(f"{cell.task:<7} {cell.rows:>5} rows  seed {cell.seed:<3} "
                  f"{args.max_steps or steps_for(cell.rows, TASKS[cell.task].batch_size):>4} steps each  {state}")
        print(f"{len(cells)} cells ({len(cells) * 2} runs: {', '.join(variants)}); {len(pending)} cells remain "
              f"({sum(len(m) for _, m in pending)} runs)")
        return
    runs.mkdir(exist_ok=True)
    machine = machine_info()
    provenance = {"machine": {"cpu": machine["cpu"], "description": describe_machine(machine)},
                  "git_commit": machine["git_commit"], "git_dirty": _git_dirty()}
    print(f"machine: {describe_machine(machine)}; {len(cells)} cells, {len(pending)} to run", flush=True)
    work = Path(tempfile.mkdtemp(prefix="peftkit-augment-"))
    print(f"work folder (data, recipes, logs): {work}", flush=True)
    prepared_for: dict[tuple[str, int], Prepared] = {}
    checked: set[str] = set()
    failed = 0
    try:
        for done, (cell, missing) in enumerate(pending[:args.max_cells]):
            task = TASKS[cell.task]
            model = args.model or task.model
            if (cell.task, cell.rows) not in prepared_for:
                prepared_for[cell.task, cell.rows] = prepare(task, work / f"{cell.task}-{cell.rows}" / "data",
                                                             cell.rows, args.eval_rows)
            if model not in checked:  # one line, before any run, when the model is not installed
                model_folder(model)
                checked.add(model)
            print(f"[{done + 1}/{min(len(pending), args.max_cells or len(pending))}] {cell.task} {cell.rows} rows "
                  f"seed {cell.seed}: running {', '.join(missing)}", flush=True)
            for record in run_cell(cell, missing, prepared_for[cell.task, cell.rows], args, model, work, provenance):
                write_whole(run_path(runs, cell, record["variant"]), json.dumps(record, indent=2, default=str) + "\n")
                failed += not record["ok"]
                print(f"  {record['variant']:<12} {'ok' if record['ok'] else 'FAILED, see ' + record['run']['log']}  "
                      f"{record['metric_name']} {fmt(record['metric'], 4)}  steps {record['optimizer_steps']}  "
                      f"examples {record['examples']}", flush=True)
            for bulky in ("adapters", "runs"):  # trained weights; the logs and recipes stay for reference
                shutil.rmtree(work / bulky, ignore_errors=True)
    finally:
        complete = sum(not to_run(runs, cell, variants) for cell in cells)
        print(report(folder, progress=(complete, len(cells))))
    if failed:
        print(f"{failed} run(s) failed; they are stored with ok=false and the next invocation retries them",
              file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
