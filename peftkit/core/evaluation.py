"""Evaluation: a task's metrics over encoded rows, during training or on any labelled file later.

``peftkit eval NAME --data FILE --group-by COLUMN`` also gives the metrics per group, the largest gap between
groups in the task's key metric, and the fairness gaps of ``fairness.py`` (demographic parity, equalized odds,
...): a check that a model treats groups alike.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..errors import PeftkitError
from .data import eval_batches, load_rows


def device_batch(task: Any, tokenizer: Any, rows: Any, index: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Rows ``index`` of encoded ``rows``, padded by the task and moved to ``device``."""
    return {k: v.to(device) for k, v in task.collate([rows[i] for i in index], tokenizer).items()}


@torch.no_grad()
def collect(model: torch.nn.Module, task: Any, tokenizer: Any, rows: Any, batches: list[list[int]],
            device: torch.device) -> dict[str, torch.Tensor]:
    """Per-row eval tensors (``task.eval_batch``) over ``batches`` of ``rows``, concatenated, on the CPU."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for idx in batches:
        batch = device_batch(task, tokenizer, rows, idx, device)
        # the outputs are not kept under a name: a causal LM's logits would live on through the next forward
        for key, value in task.eval_batch(model(**task.model_inputs(batch)), batch).items():
            parts.setdefault(key, []).append(value.detach().cpu())
    if was_training:
        model.train()
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def model_metrics(model: torch.nn.Module, task: Any, tokenizer: Any, rows: Any) -> dict[str, float]:
    """The head's metrics that need the model itself (``task.eval_with_model``: a seq2seq head's generations)."""
    was_training = model.training
    model.eval()
    try:
        return task.eval_with_model(model, tokenizer, rows)
    finally:
        if was_training:
            model.train()


def in_row_order(collected: dict[str, torch.Tensor], n_rows: int, batch_size: int, world: int
                 ) -> dict[str, torch.Tensor]:
    """Rows gathered from ``world`` processes (process r evaluated batches r, r + world, ...) back in file order."""
    batches = eval_batches(n_rows, batch_size)
    gathered_order = torch.tensor([i for r in range(world) for b in batches[r::world] for i in b])
    restored = {}
    for key, values in collected.items():
        out = torch.empty_like(values)
        out[gathered_order] = values
        restored[key] = out
    return restored


def metrics_by_source(task: Any, collected: dict[str, torch.Tensor], parts: list[tuple[str, int]]
                      ) -> dict[str, float]:
    """The task's metrics over all eval rows and, with several data sets, each one's as ``name/metric``."""
    metrics = task.metrics(collected)
    start = 0
    for name, count in [] if task.reports_per_source else parts:
        part = task.metrics({k: v[start:start + count] for k, v in collected.items()})
        metrics.update({f"{name}/{key}": value for key, value in part.items()})
        start += count
    return metrics


def _group_column(rows: Any, path: str, group_by: str) -> list[str]:
    """The group of every row, refused where no gap can be taken (no such column, or one group only)."""
    if group_by not in rows.column_names:
        raise PeftkitError(f"--group-by: {path} has no column {group_by!r} (its columns: "
                           f"{', '.join(rows.column_names)})")
    groups = [str(g) for g in rows[group_by]]
    if len(set(groups)) < 2:
        only = f"one group only ({groups[0]!r})" if groups else "no rows"
        raise PeftkitError(f"--group-by: column {group_by!r} of {path} holds {only}; gaps need at least two "
                           "groups: pick a column with several values")
    return groups


def evaluate_file(loaded: Any, path: str, group_by: Optional[str] = None, batch_size: int = 32,
                  positive_label: Optional[str] = None) -> dict[str, Any]:
    """The adapter's task metrics on a labelled file (read with the adapter's recipe settings); with ``group_by``,
    also per group, with the gaps between groups (``positive_label``: see ``fairness.positive_labels``)."""
    from .data import _to_roles, check_filled, encode
    from .fairness import fairness_report, positive_labels

    recipe, task = loaded.recipe, loaded.task
    if positive_label is not None and group_by is None:
        raise PeftkitError("--positive-label: only used with --group-by COLUMN; add --group-by or leave it out")
    rows = load_rows(path, recipe.data, "--data", recipe.data.split)
    columns = task.resolve_columns(rows.column_names, recipe.data.columns, path)
    check_filled(rows, columns, task.filled_roles(), path, "--data")
    groups = None if group_by is None else _group_column(rows, path, group_by)
    role_rows = _to_roles(rows, columns)
    task.fit(None, role_rows, path)
    positive = positive_labels(task, positive_label) if group_by is not None else []
    encoded = encode(role_rows, task, loaded.tokenizer, recipe.data.max_length)
    if groups is not None and len(encoded) != len(groups):
        raise PeftkitError(f"--group-by: this task turns rows into {len(encoded)} examples from {len(groups)} rows "
                           "(packing or skipped rows), so rows cannot be grouped; use an unpacked format")
    collected = collect(loaded.model, task, loaded.tokenizer, encoded, eval_batches(len(encoded), batch_size),
                        loaded.model.device)
    metrics = {**task.metrics(collected), **model_metrics(loaded.model, task, loaded.tokenizer, encoded)}
    result: dict[str, Any] = {"rows": len(encoded), "metrics": metrics}
    if groups is not None:
        per_group = {}
        for name in sorted(set(groups)):
            index = torch.tensor([i for i, g in enumerate(groups) if g == name])
            per_group[name] = {"rows": len(index), **task.metrics({k: v[index] for k, v in collected.items()})}
        metric = task.key_metric[0]
        values = [m[metric] for m in per_group.values()]
        result["groups"] = per_group
        result["largest_gap"] = {"metric": metric, "value": max(values) - min(values)}
        result["fairness"] = {"group_by": group_by,
                              **fairness_report(task, collected, groups, per_group, positive)}
    return result
