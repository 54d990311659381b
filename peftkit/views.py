"""Text views for the CLI: the registry listing, one adapter in full, a conversion's outcome, an eval report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .config.metadata import AdapterInfo
from .config.recipe import Recipe
from .core.rank_report import HEATMAP_FILE, report
from .errors import PeftkitError
from .finite import dumps
from .store.loading import verify_files
from .store.registry import Registry, key_metric


def _size(n_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return str(n_bytes)


def _rank(adapter: AdapterInfo, recipe: Recipe) -> str:
    if adapter.adalora is not None:
        return f"{adapter.adalora.init_r}->{adapter.adalora.target_r}"
    if adapter.rank_pattern:
        ranks = adapter.rank_pattern.values()
        return f"{min(ranks)}-{max(ranks)}"
    return str(getattr(recipe.adapter, "r", "-"))


def listing(root: str | Path) -> str:
    registry = Registry(root)
    entries = registry.entries()
    if not entries:
        return f"no adapters in {registry.root}/"
    rows = [("name", "task", "base", "method", "rank", "size", "metric", "created")]
    for e in entries:
        m = e.metadata
        metric = key_metric(m)
        rows.append((
            e.name,
            m.task.type,
            m.base.identity + (f" ({m.base.quantization.bits}-bit)" if m.base.quantization.bits else ""),
            m.adapter.method,
            _rank(m.adapter, m.recipe),
            _size(e.size_bytes),
            f"{metric[0]} {metric[1]:.4f}" if metric else "-",
            m.created[:16].replace("T", " "),
        ))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def describe(root: str | Path, name: str) -> tuple[str, Optional[str]]:
    """Everything about adapter ``name``, and what is wrong with its files (None when they check out)."""
    entry = Registry(root).get(name)
    m = entry.metadata
    problem = None
    try:
        verify_files(entry.folder, m)
        integrity = f"ok ({len(m.files)} files match their checksums)"
    except PeftkitError as exc:
        problem = str(exc)
        integrity = f"FAILED: {exc}"
    shown = {k: v for k, v in m.to_json().items() if k not in ("recipe", "files", "history")}
    lines = [f"{name}  ({entry.folder}, {_size(entry.size_bytes)})", f"files: {integrity}"]
    lines.append(dumps(shown, indent=2))
    if getattr(m, "history", None):
        lines.append("eval history: " + "; ".join(
            f"step {h['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in h.items() if k != "step")
            for h in m.history))
    if m.adapter.adalora is not None:
        lines.append(report(m))
        if (entry.folder / HEATMAP_FILE).is_file():
            lines.append(f"heatmap: {entry.folder / HEATMAP_FILE}")
    return "\n".join(lines), problem


def conversion_summary(registry: Registry, source: str, name: str) -> str:
    src, dst = registry.get(source), registry.get(name)
    src_bytes = (src.folder / "adapter_model.safetensors").stat().st_size
    dst_bytes = (dst.folder / "adapter_model.safetensors").stat().st_size
    ranks = dst.metadata.adapter.rank_pattern or {}
    dropped = dst.metadata.provenance["dropped_modules"]
    return (f"registered {name}: plain LoRA, {len(ranks)} modules, ranks {min(ranks.values())}-"
            f"{max(ranks.values())} ({sum(ranks.values())} in all)"
            + (f", {len(dropped)} modules pruned to rank 0 left out" if dropped else "")
            + f"; weights {dst_bytes:,} bytes (AdaLoRA file {src_bytes:,} bytes)")


def _numbers(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "rows")


def _number(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def eval_text(name: str, data_file: str, result: dict[str, Any]) -> str:
    """``peftkit eval``'s report: overall metrics; with groups, each group's, the largest gap and the fairness gaps."""
    lines = [f"{name} on {data_file} ({result['rows']} rows): {_numbers(result['metrics'])}"]
    if "fairness" not in result:
        return "\n".join(lines)
    fairness = result["fairness"]
    column = fairness["group_by"]
    lines += [f"  {column}={group} ({metrics['rows']} rows): {_numbers(metrics)}"
              for group, metrics in result["groups"].items()]
    gap = result["largest_gap"]
    lines.append(f"largest gap in {gap['metric']} between groups: {gap['value']:.4f}")
    source = f" ({fairness['computed_with']})" if fairness["computed_with"] else ""
    positive = fairness.get("positive_labels")
    which = f", positive label {', '.join(positive)}" if positive and len(positive) == 1 else ""
    lines.append(f"gaps between {column} groups{source}{which}:")
    pairs: dict[str, list[str]] = {}
    for key, value in fairness["gaps"].items():
        metric, _, kind = key.rpartition("_")
        pairs.setdefault(metric.replace("_", " "), []).append(f"{kind} {_number(value)}")
    lines += [f"  {metric}: {', '.join(found)}" for metric, found in pairs.items()]
    for label, entry in fairness.get("by_label", {}).items():
        lines.append(f"  label {label}, one-vs-rest, per group: selection rate / true-positive rate / "
                     "false-positive rate")
        rows = {**entry["per_group"], "(all rows)": entry["overall"]}
        lines += [f"    {group}: " + " / ".join(_number(rates[r]) for r in
                                                ("selection_rate", "true_positive_rate", "false_positive_rate"))
                  for group, rates in rows.items()]
    if "note" in fairness:
        lines.append(f"note: {fairness['note']}")
    return "\n".join(lines)
