"""The picture of ``peftkit eval --group-by COLUMN --plot FILE.png``: per-group metrics as bars, the value over
all rows as a dashed line of the same colour, the gaps in the title. matplotlib (the ``plots`` extra) is
imported only here, and only when a plot is asked for."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional

from ..errors import PeftkitError

# a panel: (title, {series: {group: value}}, {series: value over all rows})
Panel = tuple[str, dict[str, dict[str, Optional[float]]], dict[str, Optional[float]]]
_RATES = ("selection_rate", "true_positive_rate", "false_positive_rate")


def check_plot_target(path: str) -> None:
    """Refuse ``--plot`` before any evaluation runs: no matplotlib, or no folder to write the file into."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PeftkitError('--plot: drawing needs matplotlib; pip install "peftkit[plots]", or leave --plot out')
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise PeftkitError(f"--plot: folder {folder} does not exist; create it or pick another path")


def _panels(result: dict[str, Any], key: str) -> list[Panel]:
    fairness = result["fairness"]
    if "per_group" in fairness:  # fairlearn's per-group metrics (accuracy; MAE and r)
        per_group, overall = fairness["per_group"], fairness["overall"]
        panels: list[Panel] = [(name, {name: {g: m[name] for g, m in per_group.items()}}, {name: overall[name]})
                               for name in overall]
    else:  # multi-label, no fairlearn, or a head without class decisions: the head's key metric
        panels = [(key, {key: {g: m.get(key) for g, m in result["groups"].items()}}, {key: result["metrics"].get(key)})]
    for label, entry in fairness.get("by_label", {}).items():
        panels.append((f"label {label} (one-vs-rest)",
                       {r: {g: m[r] for g, m in entry["per_group"].items()} for r in _RATES},
                       {r: entry["overall"][r] for r in _RATES}))
    return panels


def gap_summary(gaps: dict[str, Optional[float]]) -> str:
    """``accuracy: difference 0.031, ratio 0.963; ...``: each gap's defined numbers, in the report's order."""
    parts: dict[str, list[str]] = {}
    for name, value in gaps.items():
        metric, _, kind = name.rpartition("_")
        parts.setdefault(metric.replace("_", " "), []).append(f"{kind} {'n/a' if value is None else f'{value:.3f}'}")
    return "; ".join(f"{metric}: {', '.join(found)}" for metric, found in parts.items())


def plot_groups(result: dict[str, Any], key_metric: str, path: str, title: str) -> Path:
    """Write the PNG of an ``evaluate_file`` result with groups to ``path``; returns the path written."""
    check_plot_target(path)
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window: eval runs on servers without a display
    import matplotlib.pyplot as plt

    panels = _panels(result, key_metric)
    columns = min(len(panels), 4)
    n_rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(4.2 * columns, 3.6 * n_rows + 0.8), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, series, overall) in zip(axes.flat, panels):
        groups = list(next(iter(series.values())))
        width = 0.8 / len(series)
        for k, (label, values) in enumerate(series.items()):
            colour = colours[k % len(colours)]
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
            kept = [(x, values[g]) for x, g in zip(xs, groups) if values[g] is not None]  # undefined: no bar
            ax.bar([x for x, _ in kept], [v for _, v in kept], width, color=colour, label=label.replace("_", " "))
            if overall.get(label) is not None:
                ax.axhline(overall[label], color=colour, linestyle="--", linewidth=1)
        ax.set_xticks(range(len(groups)))
        # a group's size beside its name: a gap between groups of 8 and 700 rows is mostly noise
        ax.set_xticklabels([f"{g}\n({result['groups'][g]['rows']} rows)" for g in groups],
                           rotation=20 if len(groups) > 4 else 0, fontsize=8)
        ax.set_title(f"{name.replace('_', ' ')} (dashed: all rows)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if len(series) > 1:  # below the panel, where it covers no bar
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(series), frameon=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    summary = gap_summary(result["fairness"]["gaps"])
    # the gaps can be long: one line per metric keeps the title readable
    fig.suptitle(title + "\n" + summary.replace("; ", "\n"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
