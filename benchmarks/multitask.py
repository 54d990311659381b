"""One adapter with a head per data set against one adapter per data set (issue 16, part 5): RTE and MRPC.

    python benchmarks/multitask.py --rows 1000 --epochs 4 --seeds 42 1 2

Three arms per seed, each from ``recipes/rte-mrpc-qlora.yaml`` (4-bit MiniLM, LoRA r=8) with the same rows of
each data set (``max_train_samples``: the first ``--rows`` of a seeded shuffle, as peftkit cuts), the same epochs
and hyperparameters: ``rte`` alone, ``mrpc`` alone, and ``rte+mrpc``, one adapter and a head each (the multi-task
run sees every row of both, so each data set as often as alone; it takes the sum of their steps). Each run is its
own process (``run_peftkit.py``) and stored under ``benchmarks/results/multitask/runs/``; the summary gives each
data set's dev accuracy alone and in the multi-task adapter, mean and spread over seeds, and the difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from common import (BENCH_DIR, REPO, describe_machine, fail, machine_info, markdown_table, mean_spread, results_dir,
                    run_measured, write_results)

RECIPE = REPO / "recipes" / "rte-mrpc-qlora.yaml"
ARMS = {"rte": ["rte"], "mrpc": ["mrpc"], "rte+mrpc": ["rte", "mrpc"]}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1000, help="training rows of each data set")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--out", help="results folder (default benchmarks/results/multitask)")
    p.add_argument("--report-only", action="store_true", help="rebuild the summary from the stored runs")
    args = p.parse_args(argv)
    if args.rows < 10 or args.epochs < 1:
        fail("--rows: give at least 10; --epochs: at least 1")
    return args


def overrides(arm: str, rows: int, epochs: int, seed: int, out: Path) -> list[str]:
    sets = [f"train.seed={seed}", f"train.epochs={epochs}", f"output.name={arm.replace('+', '-')}-{seed}",
            f"output.registry={out / 'adapters'}", f"output.runs={out / 'runs'}", "train.progress=false",
            f"data.max_train_samples={rows}"]
    if arm == "mrpc":  # the second data set alone: moved into the first place, with the head MRPC gets there
        sets += ["data.name=mrpc", "data.train=../shared/data/glue/MRPC/train.tsv",
                 "data.eval=../shared/data/glue/MRPC/dev.tsv",
                 'data.columns={text: "#1 String", text_pair: "#2 String", label: Quality}', "task.labels=null",
                 "data.also=[]"]
    elif arm == "rte":
        sets += ["data.also=[]"]
    else:
        sets += [f"data.also=[{{name: mrpc, train: ../shared/data/glue/MRPC/train.tsv, eval: "
                 f"../shared/data/glue/MRPC/dev.tsv, max_train_samples: {rows}, columns: "
                 f"{{text: '#1 String', text_pair: '#2 String', label: Quality}}}}]"]
    return [item for s in sets for item in ("--set", s)]


def accuracy(result: dict[str, Any], arm: str, task: str) -> Optional[float]:
    metrics = result["metrics"]
    return metrics.get(f"{task}/accuracy") if "+" in arm else metrics.get("accuracy")


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for task in ("rte", "mrpc"):
        alone = [accuracy(r["result"], r["arm"], task) for r in runs if r["ok"] and r["arm"] == task]
        multi = [accuracy(r["result"], r["arm"], task) for r in runs if r["ok"] and r["arm"] == "rte+mrpc"]
        pairs = {r["seed"]: accuracy(r["result"], r["arm"], task) for r in runs if r["ok"] and r["arm"] == task}
        gains = [accuracy(r["result"], r["arm"], task) - pairs[r["seed"]] for r in runs
                 if r["ok"] and r["arm"] == "rte+mrpc" and r["seed"] in pairs]
        rows.append({"task": task, "alone": mean_spread(100 * a for a in alone),
                     "multi_task": mean_spread(100 * m for m in multi),
                     "difference": mean_spread(100 * g for g in gains), "seeds": len(gains)})
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    folder = results_dir("multitask", args.out)
    runs_dir = folder / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(describe_machine(info), flush=True)
    if not args.report_only:
        work = Path(tempfile.mkdtemp(prefix="peftkit-multitask-"))
        for seed in args.seeds:
            for arm in args.arms:
                stored = runs_dir / f"{arm}-rows{args.rows}-epochs{args.epochs}-seed{seed}.json"
                if stored.exists():
                    continue
                command = [sys.executable, BENCH_DIR / "run_peftkit.py", RECIPE,
                           *overrides(arm, args.rows, args.epochs, seed, work)]
                run = run_measured(command, work / f"{stored.stem}.log", timeout=7200)
                record = {"arm": arm, "seed": seed, "rows": args.rows, "epochs": args.epochs, "ok": run["ok"],
                          "result": run["result"], "wall_seconds": run["wall_seconds"], "machine": info,
                          "command": " ".join(str(c) for c in command)}
                stored.write_text(json.dumps(record, indent=1) + "\n")
                shown = {k: round(v, 4) for k, v in (run["result"] or {}).get("metrics", {}).items()
                         if k.endswith("accuracy")}
                print(f"{arm} seed {seed}: {'ok' if run['ok'] else 'FAILED, see ' + run['log']} {shown}", flush=True)
    runs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob(f"*-rows{args.rows}-epochs{args.epochs}-*.json"))]
    summary = summarize(runs)
    fmt_ms = lambda m: "-" if m["mean"] is None else f"{m['mean']:.1f} ± {m['std'] or 0:.1f}"  # noqa: E731
    table = markdown_table(summary, [("task", lambda s: s["task"]), ("alone", lambda s: fmt_ms(s["alone"])),
                                     ("multi-task", lambda s: fmt_ms(s["multi_task"])),
                                     ("multi - alone", lambda s: fmt_ms(s["difference"])),
                                     ("seeds", lambda s: s["seeds"])])
    text = (f"# Multi-task (a head per data set) against one adapter per data set\n\n{describe_machine(info)}\n\n"
            f"{args.rows} training rows of each data set, {args.epochs} epochs, dev accuracy in points "
            f"(mean ± std over seeds).\n\n{table}\n")
    print(text)
    write_results(folder, {"machine": info, "settings": vars(args), "summary": summary, "runs": len(runs)}, text)


if __name__ == "__main__":
    main()
