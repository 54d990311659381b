"""PNG plots for the benchmark scripts (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grouped_bars(path: Path, title: str, groups: Sequence[str],
                 panels: Sequence[tuple[str, dict[str, tuple[list[Optional[float]], list[Optional[float]]]]]],
                 targets: Optional[Sequence[Optional[float]]] = None) -> Path:
    """One row of bar panels; each panel is ``(y label, {series: (values per group, error bars per group)})``.

    A missing value (None) leaves a gap rather than a zero-height bar; ``targets`` draws one dashed line per
    panel (None: no line), for a target the bars are read against.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels):
        width = 0.8 / max(len(series), 1)
        for k, (name, (values, errors)) in enumerate(series.items()):
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
            keep = [j for j, v in enumerate(values) if v is not None]
            spread = [errors[j] or 0.0 for j in keep] if any(errors[j] is not None for j in keep) else None
            ax.bar([xs[j] for j in keep], [values[j] for j in keep], width, yerr=spread, capsize=3, label=name)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    for ax, target in zip(axes[0], targets or []):
        if target is not None:
            ax.axhline(target, color="black", linestyle="--", linewidth=1, label="target")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lines(path: Path, title: str, panels: Sequence[tuple[str, str, dict[str, tuple[list[float], list[Optional[float]]]]]],
          log_x: bool = False, reference: Optional[tuple[str, float]] = None) -> Path:
    """Panels of lines; each is ``(x label, y label, {series: (xs, ys)})``; ``reference`` draws a labelled
    horizontal line on every panel (a bound to compare against)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (xlabel, ylabel, series) in zip(axes[0], panels):
        for name, (xs, ys) in series.items():
            points = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        if reference is not None:
            ax.axhline(reference[1], color="grey", linestyle="--", linewidth=1, label=reference[0])
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def spread_lines(path: Path, title: str, xlabel: str, ylabel: str,
                 series: dict[str, tuple[list[float], list[float], list[float], str, bool]],
                 log_x: bool = False) -> Path:
    """One panel of lines with error bars; each series is ``(xs, means, spreads, colour key, dashed)``: series
    sharing a colour key share a colour (one method, several tools), a dashed one is drawn dashed and 3 % to the
    right, so that equal points keep both error bars in sight."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    colours: dict[str, str] = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name, (xs, means, spreads, key, dashed) in series.items():
        colour = colours.setdefault(key, cycle[len(colours) % len(cycle)])
        ax.errorbar([x * 1.03 for x in xs] if dashed else xs, means, yerr=spreads, color=colour,
                    linestyle="--" if dashed else "-", marker="o", markersize=4, capsize=3, label=name)
    if log_x:
        ax.set_xscale("log", base=2)
        ticks = sorted({x for xs, *_ in series.values() for x in xs})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{x:,}" for x in ticks], fontsize=8)
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
