"""How far one model's outputs move from another's on the same sample: the number every merge reports.

For logits ``ref`` (the adapter on its base, as trained) and ``got`` (the merged or exported model), over
every scored position (each row for classification; each non-padding token for a causal LM)::

    max_rel_diff  = max |got - ref| / max |ref|
    mean_rel_diff = mean |got - ref| / mean |ref|
    label_agreement = fraction of positions where argmax(got) == argmax(ref)

Relative to the logits' own scale, so the figures read the same for a 2-way classifier and a 49k-token vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import PeftkitError


@dataclass
class Sample:
    """Padded model inputs over ``rows`` examples of ``source``, in batches."""

    source: str
    rows: int
    batches: list[dict[str, torch.Tensor]]


def sample_inputs(loaded: Any, data_file: Optional[str] = None, n_rows: int = 64, batch_size: int = 16) -> Sample:
    """The first ``n_rows`` examples of ``data_file`` (read with the adapter's recipe settings, like
    ``peftkit eval``), or of the adapter's recipe eval data when no file is given."""
    from .data import _to_roles, encode, load_rows, load_task_data

    if n_rows < 1:
        raise PeftkitError(f"--rows: {n_rows} rows cannot show a drift; give 1 or more")
    recipe, task = loaded.recipe, loaded.task
    if data_file is None:
        raw = load_task_data(recipe.data, task, recipe.train.seed)
        rows, source = raw.eval, raw.eval_source
    else:
        table = load_rows(data_file, recipe.data, "--data", recipe.data.split)
        rows = _to_roles(table, task.resolve_columns(table.column_names, recipe.data.columns, data_file))
        task.fit(None, rows, data_file)  # checks the file's labels against the adapter's label map
        source = data_file
    rows = rows.select(range(min(n_rows, len(rows))))
    encoded = encode(rows, task, loaded.tokenizer, recipe.data.max_length)
    batches = []
    for start in range(0, len(encoded), batch_size):
        features = [encoded[i] for i in range(start, min(start + batch_size, len(encoded)))]
        batches.append(task.model_inputs(task.collate(features, loaded.tokenizer)))
    return Sample(source, len(encoded), batches)


@torch.no_grad()
def scored_logits(model: Any, sample: Sample) -> torch.Tensor:
    """Float32 logits of every scored position, ``(positions, classes)``, on the CPU."""
    device = next(model.parameters()).device
    parts = []
    for batch in sample.batches:
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        if logits.dim() == 3:  # token logits: padding positions say nothing about the model
            # an encoder-decoder's logits are the decoder's positions, masked by its own mask
            logits = logits[batch.get("decoder_attention_mask", batch["attention_mask"]).bool()]
        parts.append(logits)
    return torch.cat(parts)


def compare(reference: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """The drift figures of ``got`` against ``reference`` (see the module docstring)."""
    diff = (got - reference).abs()
    return {
        "max_rel_diff": float(diff.max() / reference.abs().max().clamp(min=1e-12)),
        "mean_rel_diff": float(diff.mean() / reference.abs().mean().clamp(min=1e-12)),
        "max_abs_diff": float(diff.max()),
        "label_agreement": float((got.argmax(-1) == reference.argmax(-1)).float().mean()),
        "positions": int(reference.shape[0]),
    }


def describe(drift: dict[str, float]) -> str:
    return (f"max relative difference {drift['max_rel_diff']:.2e}, mean {drift['mean_rel_diff']:.2e}, "
            f"same label on {100 * drift['label_agreement']:.1f}% of {drift['positions']} positions")
