"""Compare fine-tuning methods, peftkit against the hand-written peers, each run in its own process.

    python benchmarks/compare_methods.py --model minilm --task sst2 --seeds 3
    python benchmarks/compare_methods.py --tasks sst2 rte mrpc agnews alpaca --seeds-for sst2=3 --rows 1000

For every task, method and seed, peftkit (``run_peftkit.py``) and the hand-written peers (``baseline_hf.py``:
plain peft + ``Trainer`` + bitsandbytes) train on the same rows, back to back (which goes first alternates), so
drift in the machine's speed hits all alike. Two peers, two rows (``--peers``): ``peer``, the careful one, with
every hyperparameter of peftkit's recipe (``bench_tasks.baseline_flags``), and ``naive``, the original baseline
(random batches, peft's AdaLoRA defaults, nothing reallocating ranks). Per run: the task metric on the eval rows,
trainable parameters (AdaLoRA before and after pruning), base-model memory, peak memory (the child's peak
resident set from ``os.wait4``; on a GPU the allocator's peak), training seconds (the training loop alone, for
every tool) and examples per second. The summary gives mean and spread over seeds and every row's ratios
against the careful peer.
``--ablation`` adds peftkit runs without length-grouped batches; the padding table counts the tokens each way
of batching computes on. Results: ``benchmarks/results/compare_methods/`` (JSON, Markdown, PNG).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import bench_tasks
from bench_tasks import METHODS, TASKS, Method, Prepared, baseline_flags, peftkit_recipe, prepare
from common import (BENCH_DIR, child_env, describe_machine, fail, fmt, last_lines, machine_info, markdown_table,
                    mean_spread, mib, results_dir, run_measured, write_results)

SEED_LIST = [42, 1, 2, 3, 4, 5, 6, 7]
# baseline_hf.py's --peer -> the tool a run is reported as; ratios are taken against the first
PEERS = {"careful": "peer", "naive": "naive"}
REFERENCE = PEERS["careful"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="minilm, smollm2-135m or a model folder; default each task's own model")
    p.add_argument("--task", "--tasks", dest="tasks", nargs="+", default=["sst2"], metavar="TASK",
                   help=f"among {', '.join(TASKS)}")
    p.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD", help=f"among {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=1, help="seeds per task (42, 1, 2, ...)")
    p.add_argument("--seeds-for", action="append", default=[], metavar="TASK=N", help="seeds for one task")
    p.add_argument("--rows", type=int, help="training rows per task (default: the task's own)")
    p.add_argument("--rows-for", action="append", default=[], metavar="TASK=N", help="training rows for one task")
    p.add_argument("--eval-rows", type=int, help="eval rows per task (default: the task's own)")
    p.add_argument("--max-length", type=int, help="token limit per row (default: the task's own)")
    p.add_argument("--max-steps", type=int, help="optimizer steps for step-limited tasks (alpaca)")
    p.add_argument("--batch-size", type=int, help="training batch size (default: the task's own)")
    p.add_argument("--batch-size-for", action="append", default=[], metavar="TASK=N", help="batch size for one task")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per run (OMP_NUM_THREADS; 0: torch's default). One by default: on a shared "
                        "machine, OpenMP threads that spin-wait for a busy core make runs 3-4x slower and erratic")
    p.add_argument("--concurrent", action="store_true",
                   help="run peftkit and the peers of a task, method and seed two at a time (one thread each on 2 "
                        "cores): peftkit and the careful peer together, the naive peer when one of them ends")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild table and plots from the results.json in --out (an interrupted run's too)")
    p.add_argument("--no-baseline", action="store_true", help="peftkit runs only")
    p.add_argument("--peers", nargs="+", choices=list(PEERS), default=list(PEERS),
                   help="which hand-written peers run beside peftkit (default both)")
    p.add_argument("--ablation", action="store_true",
                   help="also run peftkit without length-grouped batches (first task, LoRA fp32, first seed)")
    p.add_argument("--data-root", help="folder laid out like ../shared/data (default: that folder)")
    p.add_argument("--out", help="results folder (default benchmarks/results/compare_methods)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a run is killed")
    args = p.parse_args(argv)
    for name in args.tasks:
        if name not in TASKS:
            fail(f"--tasks: unknown task {name!r}; choose among {', '.join(TASKS)}")
    for name in args.methods:
        if name not in METHODS:
            fail(f"--methods: unknown method {name!r}; choose among {', '.join(METHODS)}")
    if args.model in ("minilm", "smollm2-135m"):
        wrong = [t for t in args.tasks if TASKS[t].model != args.model]
        if wrong:
            fail(f"--model {args.model}: task {wrong[0]} runs on {TASKS[wrong[0]].model}; drop --model or the task")
    args.seeds_by_task = _per_task(args.seeds_for, "--seeds-for")
    args.rows_by_task = _per_task(args.rows_for, "--rows-for")
    args.batch_by_task = _per_task(args.batch_size_for, "--batch-size-for")
    if args.data_root:
        if not Path(args.data_root).is_dir():
            fail(f"--data-root: {args.data_root} is not a folder; point it at a copy of ../shared/data")
        bench_tasks.DATA_ROOT[0] = Path(args.data_root)
    return args


def _per_task(items: list[str], flag: str) -> dict[str, int]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in TASKS or not value.isdigit() or int(value) < 1:
            fail(f"{flag}: {item!r} is not TASK=N with TASK among {', '.join(TASKS)} and N >= 1")
        out[name] = int(value)
    return out


def model_folder(model: str) -> Path:
    """The folder both tools load: peftkit's packaged copy (dequantized once for GGUF), or the folder given."""
    from peftkit.errors import PeftkitError
    from peftkit.core.models import resolve_base
    from peftkit.config.recipe import BaseModelSection

    try:
        return resolve_base(BaseModelSection(model=model)).path
    except PeftkitError as exc:
        fail(f"--model: {exc}")
        raise


def run_pair(prepared: Prepared, method: Method, seed: int, model: str, model_dir: Path, work: Path,
             args: argparse.Namespace, peftkit_first: bool, variant: str = "", epochs: float = 1,
             tools: Optional[set[str]] = None) -> list[dict[str, Any]]:
    """peftkit and the peers on one task, method and seed, back to back; one record each. ``epochs`` over the
    rows for every tool; ``tools`` (peftkit, peer, naive) keeps only those runs (the sweep's retries)."""
    import yaml

    tag = f"{prepared.task.name}-{method.name}-{seed}{'-' + variant if variant else ''}"
    recipe = peftkit_recipe(prepared, method, seed, work, epochs)
    recipe["base"]["model"] = model
    if variant == "ungrouped":
        recipe["train"]["group_by_length"] = False
    recipe_path = work / "recipes" / f"{tag}.yaml"
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    commands = {"peftkit": [sys.executable, BENCH_DIR / "run_peftkit.py", recipe_path]}
    for peer in ([] if args.no_baseline or variant else args.peers):
        commands[PEERS[peer]] = [sys.executable, BENCH_DIR / "baseline_hf.py", *baseline_flags(recipe, model_dir, peer),
                                 "--out", work / "hf" / f"{tag}-{peer}"]
    if tools is not None:
        commands = {tool: command for tool, command in commands.items() if tool in tools}
    order = list(commands)  # peftkit, the careful peer, the naive peer: the first two swap places every other pair
    if not peftkit_first and len(order) > 1:
        order[:2] = order[1::-1]

    def measure(tool: str) -> dict[str, Any]:
        return run_measured(commands[tool], work / "logs" / f"{tag}-{tool}.log", threaded_env(args.threads),
                            timeout=args.timeout)

    if args.concurrent:  # two at once: whatever else loads the machine meanwhile loads both alike
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            done = dict(zip(order, pool.map(measure, order)))
    else:
        done = {tool: measure(tool) for tool in order}
    records = []
    for tool in order:
        measured = done[tool]
        record = {"task": prepared.task.name, "method": method.name, "seed": seed, "tool": tool,
                  "variant": variant or None, **measured}
        status = "ok" if measured["ok"] else f"FAILED (exit {measured['returncode']}), see {measured['log']}"
        result = measured["result"] or {}
        metric = (result.get("metrics") or {}).get(prepared.task.metric)
        print(f"  {tag:<28} {tool:<8} {status}  {prepared.task.metric} {fmt(metric, 4)}  "
              f"train {fmt(result.get('train_seconds'))} s  {fmt(result.get('examples_per_second'))} ex/s  "
              f"peak {mib(measured['peak_rss_bytes'])} MiB", flush=True)
        if not measured["ok"]:
            print(last_lines(measured["log"]), flush=True)
        records.append(record)
    return records


def threaded_env(threads: int) -> dict[str, str]:
    if threads <= 0:
        return child_env()
    return child_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def peak_bytes(record: dict[str, Any]) -> Optional[float]:
    """The memory a run peaked at: the GPU allocator's peak on a GPU, else the process's peak RSS."""
    result = record.get("result") or {}
    return result.get("gpu_peak_bytes") or record.get("peak_rss_bytes")


def summarize(records: list[dict[str, Any]], tasks: list[str], methods: list[str]) -> list[dict[str, Any]]:
    rows = []
    for task in tasks:
        metric = TASKS[task].metric
        for method in methods:
            by_tool: dict[str, dict[str, Any]] = {}
            for tool, variant in (("peftkit", None), ("peftkit", "ungrouped"), *((t, None) for t in PEERS.values())):
                runs = [r for r in records if r["task"] == task and r["method"] == method and _tool(r) == tool
                        and r["variant"] == variant and r["ok"]]
                if not runs:
                    continue
                res = [r["result"] for r in runs]
                name = tool if variant is None else f"{tool} ({variant})"
                by_tool[name] = row = {
                    "task": task, "method": method, "tool": name, "metric_name": metric,
                    "metric": mean_spread(x["metrics"].get(metric) for x in res),
                    "train_seconds": mean_spread(x["train_seconds"] for x in res),
                    "examples_per_second": mean_spread(x["examples_per_second"] for x in res),
                    "peak_bytes": mean_spread(peak_bytes(r) for r in runs),
                    "base_memory_bytes": res[0]["base_memory_bytes"],
                    "trainable_start": res[0]["trainable_start"],
                    "trainable_final": mean_spread(x["trainable_final"] for x in res)["mean"],
                    "seeds": [r["seed"] for r in runs],
                }
                rows.append(row)
            base = by_tool.get(REFERENCE)
            for name, row in by_tool.items():
                if base is None or name == REFERENCE:
                    continue
                row["vs_peer"] = {
                    "speedup": _ratio(row["examples_per_second"]["mean"], base["examples_per_second"]["mean"]),
                    "memory_ratio": _ratio(row["peak_bytes"]["mean"], base["peak_bytes"]["mean"]),
                    "time_ratio": _ratio(row["train_seconds"]["mean"], base["train_seconds"]["mean"]),
                    "metric_difference": None if None in (row["metric"]["mean"], base["metric"]["mean"])
                    else row["metric"]["mean"] - base["metric"]["mean"],
                }
    return rows


def _tool(record: dict[str, Any]) -> str:
    # results.json files written before the careful peer call the naive one "baseline"
    return "naive" if record["tool"] == "baseline" else record["tool"]


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def _metric_cell(row: dict[str, Any]) -> str:
    m = row["metric"]
    if m["mean"] is None:
        return ""
    scale, digits = (100.0, 1) if row["metric_name"] == "accuracy" else (1.0, 3)
    unit = " %" if row["metric_name"] == "accuracy" else ""
    spread = f" ± {m['std'] * scale:.{digits}f}" if m["n"] > 1 else ""
    return f"{m['mean'] * scale:.{digits}f}{spread}{unit} (n={m['n']})"


def _trainable_cell(row: dict[str, Any]) -> str:
    start, final = row["trainable_start"], row["trainable_final"]
    return f"{start:,}" if final is None or round(final) == start else f"{start:,} → {round(final):,}"


def summary_table(rows: list[dict[str, Any]]) -> str:
    vs = lambda r, k, d=2: fmt((r.get("vs_peer") or {}).get(k), d)  # noqa: E731
    return markdown_table(rows, [
        ("task", lambda r: r["task"]), ("method", lambda r: METHODS[r["method"]].label), ("tool", lambda r: r["tool"]),
        ("metric", lambda r: f"{r['metric_name']} {_metric_cell(r)}"),
        ("trainable params", _trainable_cell), ("base MiB", lambda r: mib(r["base_memory_bytes"])),
        ("peak MiB", lambda r: mib(r["peak_bytes"]["mean"])), ("train s", lambda r: fmt(r["train_seconds"]["mean"])),
        ("examples/s", lambda r: fmt(r["examples_per_second"]["mean"])),
        ("speed vs peer", lambda r: vs(r, "speedup")), ("memory vs peer", lambda r: vs(r, "memory_ratio")),
        ("metric − peer", lambda r: fmt((r.get("vs_peer") or {}).get("metric_difference"),
                                        1 if r["metric_name"] == "accuracy" else 3,
                                        100.0 if r["metric_name"] == "accuracy" else 1.0)),
    ])


def padding_table(padding: dict[str, Any]) -> str:
    rows = [{"task": k, **v} for k, v in padding.items()]
    return markdown_table(rows, [
        ("task", lambda r: r["task"]), ("rows", lambda r: r["rows"]), ("mean tokens", lambda r: r["mean_tokens"]),
        ("real share, pad to max_length", lambda r: f"{100 * r['real_share']['max_length']:.0f} %"),
        ("real share, random batches (naive peer)", lambda r: f"{100 * r['real_share']['random']:.0f} %"),
        ("real share, peftkit batches", lambda r: f"{100 * r['real_share']['peftkit']:.0f} %"),
        ("tokens computed, naive / peftkit", lambda r: f"{r['random_over_peftkit']:.2f}"),
    ])


def plot(rows: list[dict[str, Any]], folder: Path) -> list[str]:
    from plots import grouped_bars

    paths = []
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        methods = list(dict.fromkeys(r["method"] for r in task_rows))
        tools = list(dict.fromkeys(r["tool"] for r in task_rows))
        metric = task_rows[0]["metric_name"]
        scale = 100.0 if metric == "accuracy" else 1.0

        def series(key: str, sub: Optional[str] = "mean", factor: float = 1.0) -> dict[str, Any]:
            out = {}
            for tool in tools:
                vals, errs = [], []
                for m in methods:
                    row = next((r for r in task_rows if r["tool"] == tool and r["method"] == m), None)
                    value = None if row is None else row[key]
                    mean = value.get(sub) if isinstance(value, dict) else value
                    std = value.get("std") if isinstance(value, dict) else None
                    vals.append(None if mean is None else mean * factor)
                    errs.append(None if std is None else std * factor)
                out[tool] = (vals, errs)
            return out

        path = folder / f"{task}.png"
        grouped_bars(path, f"{task}: peftkit against the hand-written peers (mean ± std over seeds)",
                     [METHODS[m].label for m in methods],
                     [(f"{metric}{' %' if metric == 'accuracy' else ''}", series("metric", factor=scale)),
                      ("training examples / s", series("examples_per_second")),
                      ("peak memory MiB", series("peak_bytes", factor=1 / 2**20))])
        paths.append(path.name)
    ratios = ratio_plot(rows, folder)
    return paths + ([ratios] if ratios else [])


def ratio_plot(rows: list[dict[str, Any]], folder: Path) -> Optional[str]:
    """Every task and method in one picture: peftkit's speed and peak memory over the careful peer's, against
    the issue's targets (at least 1.3x the speed, at most 1.0x the memory). None when no run had a peer."""
    from plots import grouped_bars

    paired = [r for r in rows if r["tool"] == "peftkit" and r.get("vs_peer")]
    if not paired:
        return None
    tasks = list(dict.fromkeys(r["task"] for r in paired))
    methods = [m for m in METHODS if any(r["method"] == m for r in paired)]

    def series(key: str) -> dict[str, Any]:
        out = {}
        for task in tasks:
            by_method = {r["method"]: r["vs_peer"][key] for r in paired if r["task"] == task}
            out[task] = ([by_method.get(m) for m in methods], [None] * len(methods))
        return out

    path = folder / "ratios.png"
    grouped_bars(path, "peftkit over the careful hand-written peer (mean over seeds)",
                 [METHODS[m].label for m in methods], [("training speed vs peer (x)", series("speedup")),
                                                       ("peak memory vs peer (x)", series("memory_ratio"))],
                 targets=[1.3, 1.0])
    return path.name


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    folder = results_dir("compare_methods", args.out)
    if args.report_only:
        saved = folder / "results.json"
        if not saved.is_file():
            fail(f"--report-only: {saved} does not exist; run the benchmark first or point --out at its folder")
        raise SystemExit(1 if report(folder, json.loads(saved.read_text())) else 0)
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="peftkit-compare-"))
    print(f"work folder (recipes, logs, adapters): {work}", flush=True)
    records: list[dict[str, Any]] = []
    settings: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else argv, "tasks": {}}
    padding: dict[str, Any] = {}
    payload: dict[str, Any] = {"machine": machine, "settings": settings, "padding": padding, "runs": records}
    for task_name in args.tasks:
        task = TASKS[task_name]
        model = args.model or task.model
        model_dir = model_folder(model)
        n_seeds = args.seeds_by_task.get(task_name, args.seeds)
        prepared = prepare(task, work / "data", args.rows_by_task.get(task_name, args.rows), args.eval_rows)
        batch_size = args.batch_by_task.get(task_name, args.batch_size)
        if args.max_length or args.max_steps or batch_size:
            from dataclasses import replace

            prepared.task = task = replace(task, max_length=args.max_length or task.max_length,
                                           batch_size=batch_size or task.batch_size,
                                           max_steps=(args.max_steps or task.max_steps) if task.max_steps else None)
        settings["tasks"][task_name] = {
            "model": model, "train_rows": prepared.n_train, "eval_rows": prepared.n_eval, "seeds": SEED_LIST[:n_seeds],
            "threads": args.threads or "default", "concurrent_pairs": args.concurrent, "peers": args.peers,
            "max_length": task.max_length,
            "batch_size": task.batch_size, "lr": task.lr, "full_lr": task.full_lr,
            "r": task.r, "epochs": 1, "max_steps": task.max_steps, "metric": task.metric, "labels": prepared.labels,
        }
        padding[task_name] = _padding(prepared, model_dir)
        print(f"{task_name}: {prepared.n_train} train rows, {prepared.n_eval} eval rows, max length "
              f"{task.max_length}, seeds {SEED_LIST[:n_seeds]}, model {model}", flush=True)
        for s, seed in enumerate(SEED_LIST[:n_seeds]):
            for m, method_name in enumerate(args.methods):
                first = (s + m) % 2 == 0
                records += run_pair(prepared, METHODS[method_name], seed, model, model_dir, work, args, first)
                write_results(folder, payload, "(in progress)")
            if args.ablation and task_name == args.tasks[0] and s == 0 and "lora" in args.methods:
                records += run_pair(prepared, METHODS["lora"], seed, model, model_dir, work, args, True, "ungrouped")
    import shutil

    for bulky in ("adapters", "runs", "hf"):  # trained weights; the logs and recipes stay for reference
        shutil.rmtree(work / bulky, ignore_errors=True)
    if report(folder, payload):
        raise SystemExit(1)


def report(folder: Path, payload: dict[str, Any]) -> int:
    """Summary, table and plots from the runs in ``payload``; written beside it and printed. Returns the number
    of failed runs. Also what ``--report-only`` does with a saved (possibly interrupted) results.json."""
    records, settings, machine = payload["runs"], payload["settings"], payload["machine"]
    tasks = list(dict.fromkeys(r["task"] for r in records))
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    rows = summarize(records, tasks, methods)
    payload["summary"] = rows
    payload["plots"] = plot(rows, folder) if rows else []
    failed = [r for r in records if not r["ok"]]
    first = next(iter(settings["tasks"].values()), {})
    threads, concurrent = first.get("threads", "default"), first.get("concurrent_pairs", False)
    markdown = "\n\n".join([
        f"Machine: {describe_machine(machine)}.",
        f"Settings ({threads} CPU thread(s) per run; peftkit and the peers run "
        f"{'two at a time' if concurrent else 'back to back'}): "
        + "; ".join(f"{k}: {v['train_rows']} train rows, {v['eval_rows']} eval rows, max length {v['max_length']}, "
                    f"batch {v['batch_size']}, seeds {[s for s in v['seeds'] if any(r['seed'] == s and r['task'] == k for r in records)]}"
                    + (f", {v['max_steps']} steps" if v["max_steps"] else "")
                    for k, v in settings["tasks"].items()) + ".",
        summary_table(rows),
        "Padding (share of computed tokens that are real tokens, one epoch):\n\n" + padding_table(payload["padding"]),
        *([f"{len(failed)} run(s) failed: " + ", ".join(f"{r['task']}-{r['method']}-{r['seed']} {r['tool']} "
                                                       f"({r['log']})" for r in failed)] if failed else []),
    ])
    write_results(folder, payload, markdown)
    print(markdown)
    print(f"\nwrote {folder}/results.json, results.md, {', '.join(payload['plots'])}")
    return len(failed)


def _padding(prepared: Prepared, model_dir: Path) -> dict[str, Any]:
    from padding import padding_report, token_lengths
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in prepared.train_file.read_text().splitlines()]
    lengths = token_lengths(rows, prepared.task.kind, tokenizer, prepared.task.max_length)
    return padding_report(lengths, prepared.task.batch_size, prepared.task.max_length)


if __name__ == "__main__":
    main()
