"""Where AdaLoRA put its rank: per-module final ranks, totals by layer and module kind, and a heatmap PNG."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Optional

from ..config.metadata import AdapterMetadata
from ..errors import PeftkitError

HEATMAP_FILE = "rank_heatmap.png"
_LAYER = re.compile(r"\.(\d+)\.")


def split_module(name: str) -> tuple[Optional[int], str]:
    """(layer index, module kind): ``bert.encoder.layer.3.attention.self.query`` -> (3, attention.self.query)."""
    match = _LAYER.search(f".{name}.")
    if match is None:
        return None, name
    return int(match.group(1)), f".{name}."[match.end():].strip(".") or name


def rank_grid(ranks: dict[str, int]) -> tuple[list[Optional[int]], list[str], dict[tuple[Optional[int], str], int]]:
    cells = {split_module(name): rank for name, rank in ranks.items()}
    layers = sorted({layer for layer, _ in cells if layer is not None})
    if any(layer is None for layer, _ in cells):
        layers.append(None)  # modules outside the layer stack (a pooler), in a row of their own
    kinds = list(dict.fromkeys(kind for _, kind in cells))
    return layers, kinds, cells


def report(metadata: AdapterMetadata) -> str:
    """A plain-text rank report of an AdaLoRA adapter's metadata (``Registry(...).get(name).metadata``)."""
    info = metadata.adapter.adalora
    if info is None:
        raise PeftkitError(f"{metadata.name} is a {metadata.adapter.method} adapter; only AdaLoRA adapters have a "
                           "rank report")
    ranks = info.final_ranks
    lines = [
        f"AdaLoRA ranks: {info.final_budget} kept of {info.init_r * len(ranks)} "
        f"(target budget {info.target_budget}: {info.target_r} per module on average, "
        f"from {info.init_r}), {info.reallocations} reallocations",
    ]
    if info.final_budget != info.target_budget:
        lines.append("  the budget was not reached: training stopped before the final phase")
    by_kind: dict[str, int] = defaultdict(int)
    by_layer: dict[str, int] = defaultdict(int)
    for name, rank in ranks.items():
        layer, kind = split_module(name)
        by_kind[kind] += rank
        by_layer["-" if layer is None else str(layer)] += rank
    total = max(sum(ranks.values()), 1)
    lines.append("by module kind: " + ", ".join(f"{k} {v} ({100 * v / total:.0f}%)" for k, v in by_kind.items()))
    lines.append("by layer: " + ", ".join(f"{k}: {v}" for k, v in by_layer.items()))
    layers, kinds, cells = rank_grid(ranks)
    header = "layer".ljust(6) + " ".join(k.rjust(max(len(k), 3)) for k in kinds)
    lines.append(header)
    for layer in layers:
        row = ("-" if layer is None else str(layer)).ljust(6)
        row += " ".join(str(cells.get((layer, k), "")).rjust(max(len(k), 3)) for k in kinds)
        lines.append(row)
    return "\n".join(lines)


def save_heatmap(ranks: dict[str, int], init_r: int, path: Path, title: str) -> Optional[Path]:
    """Layers x module kinds, colour = final rank. None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import numpy as np

    layers, kinds, cells = rank_grid(ranks)
    grid = np.full((len(layers), len(kinds)), np.nan)
    for i, layer in enumerate(layers):
        for j, kind in enumerate(kinds):
            if (layer, kind) in cells:
                grid[i, j] = cells[(layer, kind)]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(kinds), 1.2 + 0.45 * len(layers)))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=init_r, aspect="auto")
    for i in range(len(layers)):
        for j in range(len(kinds)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, int(grid[i, j]), ha="center", va="center",
                        color="white" if grid[i, j] < init_r * 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(kinds)), [k.replace("attention.", "attn.") for k in kinds], rotation=35, ha="right")
    ax.set_yticks(range(len(layers)), ["other" if layer is None else str(layer) for layer in layers])
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=f"final rank (of {init_r})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
