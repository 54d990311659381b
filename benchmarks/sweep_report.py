"""The sweep's report, from whatever runs ``OUT/runs/`` holds (``sweep.py`` writes them; a partial sweep too).

Per task, training size, method and tool: the task metric's mean ± standard deviation over seeds, with the
count; issue 14's targets judged at every task and size; one plot per task (metric against training rows,
log scale, a line per method and tool, the peers dashed, seed spread as error bars). Written to
``results.md`` and ``summary.json``, plots beside them.

Points are percentage points of the task's metric: accuracy, Matthews correlation and macro F1 are all shown
x 100. A target compares two means (or two seed spreads) over seeds at the same task and size, and is judged
only where both sides have 3 seeds or more ("n<3, not judged" otherwise); its margin is how far it is met
(positive) or missed (negative), in points:

* a   peftkit LoRA >= the careful peer's LoRA - 0.5;
* a'  peftkit LoRA's seed std <= the careful peer's + 1;
* b   peftkit AdaLoRA >= peftkit LoRA - 0.5 (the same final budget: AdaLoRA pruned to LoRA's rank);
* c   peftkit QLoRA NF4 >= peftkit LoRA fp32 - 1;
* d   peftkit LoRA >= peftkit full fine-tuning - 1, from 2,000 rows up, where full fine-tuning ran.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from bench_tasks import METHODS
from common import fail, fmt, markdown_table, mean_spread, write_whole

FORMAT = 1  # of a stored run file
TASK_ORDER = ["sst2", "agnews", "cola", "sms", "rte", "mrpc"]  # the sweep's default tasks, in the order they run
MIN_SEEDS = 3
TIMING_NOTE = ("Timings here are not speed figures: the two runs of a cell share the machine's 2 cores, one "
               "thread each, and the processes of other work share them too; compare_methods.py measures speed.")


@dataclass(frozen=True)
class Target:
    key: str
    text: str
    left: tuple[str, str]  # (method, tool)
    right: tuple[str, str]
    tolerance: float  # points
    statistic: str = "mean"  # mean: left >= right - tolerance; std: left <= right + tolerance
    min_rows: int = 0


TARGETS = [
    Target("a", "peftkit LoRA >= peer LoRA - 0.5", ("lora", "peftkit"), ("lora", "peer"), 0.5),
    Target("a'", "peftkit LoRA seed std <= peer's + 1", ("lora", "peftkit"), ("lora", "peer"), 1.0, "std"),
    # "adalora" is the default recipe (dropout 0.05 since ba24ebc); the older dropout-0 runs are "adalora-dropout0"
    Target("b", "peftkit AdaLoRA >= peftkit LoRA - 0.5", ("adalora", "peftkit"), ("lora", "peftkit"), 0.5),
    Target("c", "peftkit QLoRA NF4 >= peftkit LoRA fp32 - 1", ("qlora", "peftkit"), ("lora", "peftkit"), 1.0),
    Target("d", "peftkit LoRA >= full fine-tuning - 1 (2,000 rows up)", ("lora", "peftkit"), ("full", "peftkit"),
           1.0, min_rows=2000),
]


def points(metric: str) -> float:
    """The factor that turns a metric into the report's points (the loss is kept as it is)."""
    return 1.0 if metric == "loss" else 100.0


def load_runs(folder: Path) -> list[dict[str, Any]]:
    runs = []
    for path in sorted((folder / "runs").glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT:
            fail(f"{path}: run format {record.get('format')!r}, this report reads format {FORMAT}; rerun that cell "
                 "(delete the file) or use the sweep.py it came from")
        runs.append({**record, "file": path.name})
    return runs


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task, rows, method and tool: the metric in points over the seeds that ran ok."""
    keys = dict.fromkeys((r["task"], r["rows"], r["method"], r["tool"]) for r in runs)
    methods, tasks = {m: i for i, m in enumerate(METHODS)}, {t: i for i, t in enumerate(TASK_ORDER)}
    rows = []
    for task, n_rows, method, tool in sorted(keys, key=lambda k: (tasks.get(k[0], len(tasks)), k[0], k[1],
                                                                  methods.get(k[2], len(methods)),
                                                                  k[3] != "peftkit", k[3])):
        group = [r for r in runs if (r["task"], r["rows"], r["method"], r["tool"]) == (task, n_rows, method, tool)]
        ok = [r for r in group if r["ok"] and r.get("metric") is not None]
        metric = group[0]["metric_name"]
        rows.append({
            "task": task, "rows": n_rows, "method": method, "tool": tool, "metric_name": metric,
            "points": mean_spread(r["metric"] * points(metric) for r in ok),
            "seeds": sorted(r["seed"] for r in ok),
            "epochs": sorted({r.get("epochs") for r in ok} - {None}),
            "optimizer_steps": sorted({r.get("optimizer_steps") for r in ok} - {None}),
            "train_seconds": mean_spread(r.get("train_seconds") for r in ok)["mean"],
        })
    return rows


def judge(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target at every task and size where both of its sides ran at least once."""
    found = {(r["task"], r["rows"], r["method"], r["tool"]): r for r in summary}
    verdicts = []
    for task, n_rows, metric in dict.fromkeys((r["task"], r["rows"], r["metric_name"]) for r in summary):
        sign = -1.0 if metric == "loss" else 1.0
        for target in TARGETS:
            left, right = found.get((task, n_rows, *target.left)), found.get((task, n_rows, *target.right))
            if n_rows < target.min_rows or left is None or right is None:
                continue
            a, b = left["points"], right["points"]
            verdict: dict[str, Any] = {"task": task, "rows": n_rows, "target": target.key, "text": target.text,
                                       "n": [a["n"], b["n"]], "left": a[target.statistic],
                                       "right": b[target.statistic], "margin": None}
            if min(a["n"], b["n"]) < MIN_SEEDS:
                verdict["verdict"] = f"n<{MIN_SEEDS}, not judged"
            else:
                if target.statistic == "std":
                    margin = b["std"] + target.tolerance - a["std"]
                else:
                    margin = sign * (a["mean"] - b["mean"]) + target.tolerance
                verdict.update(margin=margin, verdict="met" if margin >= 0 else "missed")
            verdicts.append(verdict)
    return verdicts


def _cell(row: Optional[dict[str, Any]]) -> str:
    if row is None or row["points"]["n"] == 0:
        return ""
    p = row["points"]
    return f"{p['mean']:.1f} ± {p['std']:.1f} (n={p['n']})"


def task_table(summary: list[dict[str, Any]], task: str) -> str:
    rows = [r for r in summary if r["task"] == task]
    tools = list(dict.fromkeys(r["tool"] for r in sorted(rows, key=lambda r: r["tool"] != "peftkit")))
    found = {(r["rows"], r["method"], r["tool"]): r for r in rows}
    lines = [{"rows": n, "method": m} for n, m in dict.fromkeys((r["rows"], r["method"]) for r in rows)]

    def steps(line: dict[str, Any]) -> str:
        seen = sorted({s for t in tools for s in (found.get((line["rows"], line["method"], t)) or {})
                       .get("optimizer_steps", [])})
        return "/".join(str(s) for s in seen)

    return markdown_table(lines, [
        ("rows", lambda l: f"{l['rows']:,}"), ("method", lambda l: METHODS[l["method"]].label),
        *((tool, lambda l, t=tool: _cell(found.get((l["rows"], l["method"], t)))) for tool in tools),
        ("epochs", lambda l: "/".join(str(e) for e in sorted({e for t in tools for e in (
            found.get((l["rows"], l["method"], t)) or {}).get("epochs", [])}))),
        ("optimizer steps", steps),
        ("train s " + " / ".join(tools), lambda l: " / ".join(
            fmt((found.get((l["rows"], l["method"], t)) or {}).get("train_seconds"), 0) or "–" for t in tools)),
    ])


def targets_table(verdicts: list[dict[str, Any]], task: str) -> str:
    rows = [v for v in verdicts if v["task"] == task]
    return markdown_table(rows, [
        ("rows", lambda v: f"{v['rows']:,}"), ("target", lambda v: f"{v['target']}: {v['text']}"),
        ("verdict", lambda v: v["verdict"]), ("margin (points)", lambda v: fmt(v["margin"], 1)),
        ("left / right", lambda v: f"{fmt(v['left'], 1) or '–'} / {fmt(v['right'], 1) or '–'}"),
        ("n", lambda v: f"{v['n'][0]} / {v['n'][1]}"),
    ])


def plot(summary: list[dict[str, Any]], folder: Path) -> list[str]:
    from plots import spread_lines

    names = []
    for task in dict.fromkeys(r["task"] for r in summary):
        series = {}
        for method, tool in dict.fromkeys((r["method"], r["tool"]) for r in summary if r["task"] == task):
            line = sorted((r for r in summary if (r["task"], r["method"], r["tool"]) == (task, method, tool)
                           and r["points"]["n"]), key=lambda r: r["rows"])
            if line:
                series[f"{METHODS[method].label}, {tool}"] = (
                    [r["rows"] for r in line], [r["points"]["mean"] for r in line],
                    [r["points"]["std"] for r in line], method, tool != "peftkit")
        if not series:
            continue
        metric = next(r["metric_name"] for r in summary if r["task"] == task)
        path = folder / f"{task}.png"
        spread_lines(path, f"{task}: {metric} against training rows (mean ± std over seeds; peers dashed)",
                     "training rows", f"{metric} ({'points' if points(metric) == 100 else 'as is'})", series,
                     log_x=True)
        names.append(path.name)
    return names


def machine_lines(runs: list[dict[str, Any]]) -> list[str]:
    """One line per machine and software stack, with its number of runs: the descriptions differ only by the
    load average and the time at each run's start, which would repeat the same machine once per piece."""
    counts: dict[str, int] = {}
    for r in runs:
        text = (r.get("machine") or {}).get("description", "unknown")
        text = re.sub(r", load average [^;]* at the start", "", text)
        text = re.sub(r" \(\d{4}-\d\d-\d\d \d\d:\d\d UTC\)$", "", text)
        counts[text] = counts.get(text, 0) + 1
    return [f"{text} ({n} runs)" for text, n in sorted(counts.items())]


def report(folder: Path, progress: Optional[tuple[int, int]] = None) -> str:
    """``results.md`` and ``summary.json`` (and the plots) in ``folder`` from its stored runs; returns the
    Markdown. ``progress``: (cells complete, cells in the grid) of the invocation that asks."""
    runs = load_runs(folder)
    summary = summarize(runs)
    verdicts = judge(summary)
    plots = plot(summary, folder) if summary else []
    failed = [r["file"] for r in runs if not r["ok"]]
    off_rule = [r["file"] for r in runs if r["ok"] and r.get("optimizer_steps") != r.get("rule_steps")]
    machines = machine_lines(runs)
    rule = next((r["rule"] for r in runs if r.get("rule")), None)
    counts = {v: sum(x["verdict"] == v for x in verdicts) for v in ("met", "missed", f"n<{MIN_SEEDS}, not judged")}
    parts = [
        "# Data-size sweep: peftkit against the careful hand-written peer",
        f"{len(runs)} stored runs ({len(failed)} failed)"
        + (f"; {progress[0]} of {progress[1]} cells of the last invocation's grid complete" if progress else "")
        + f". Training length: {rule or 'no runs yet'}. Points: the task metric x 100.",
        TIMING_NOTE,
        "Targets: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + ".",
    ]
    for task in dict.fromkeys(r["task"] for r in summary):
        metric = next(r["metric_name"] for r in summary if r["task"] == task)
        parts += [f"## {task} ({metric})", task_table(summary, task)]
        if any(v["task"] == task for v in verdicts):
            parts.append(targets_table(verdicts, task))
        if f"{task}.png" in plots:
            parts.append(f"![{task}: metric against training rows]({task}.png)")
    if failed:
        parts.append("Failed runs (retried by the next invocation; each file holds its log's tail): "
                     + ", ".join(failed))
    if off_rule:
        parts.append("Runs whose optimizer steps differ from the rule's: " + ", ".join(off_rule))
    parts.append("Machines (each run's load average at its start is in its file): " + "; ".join(machines))
    markdown = "\n\n".join(parts) + "\n"
    payload = {"format": FORMAT, "generated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "rule": rule, "points": "task metric x 100 (loss as is)", "runs": len(runs), "failed": failed,
               "off_rule": off_rule, "progress": progress, "summary": summary, "targets": verdicts, "plots": plots,
               "machines": machines}
    write_whole(folder / "summary.json", json.dumps(payload, indent=2) + "\n")
    write_whole(folder / "results.md", markdown)
    return markdown
