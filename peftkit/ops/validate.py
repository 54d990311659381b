"""``peftkit validate``: what can be checked without loading the model, data included."""

from __future__ import annotations

from typing import Any

from ..config.recipe import AdaLoraSection, Recipe
from ..core.adalora import resolve_schedule
from ..core.augment import Augmentation, preview
from ..core.build import recipe_head
from ..core.data import load_task_data, total_steps


def check_base(recipe: Recipe) -> str:
    """Find base.model's files without loading them (offline, no network wait); return a summary line."""
    from ..core.models import PACKAGED, installed_folder, resolve_base

    name = recipe.base.model
    if name in PACKAGED:  # resolve_base would dequantize a packaged GGUF; being installed is what can go wrong
        installed_folder(name)
        return f"base: {name} (packaged {PACKAGED[name].pip})"
    ref = resolve_base(recipe.base)
    return f"base: {ref.identity} ({ref.source}" + (f", {ref.path})" if str(ref.path) != ref.identity else ")")


def check_data(recipe: Recipe) -> str:
    """Read the data files, map their columns, check labels and AdaLoRA's schedule; return a summary line."""
    task = recipe_head(recipe)
    raw = load_task_data(recipe.data, task, recipe.train.seed)
    t = recipe.train
    n_train, before, examples = len(raw.train), "", []
    if recipe.data.augment is not None:
        augmentation, examples = augment_examples(raw.train, recipe)
        n_train, before = augmentation.rows_after, f" ({augmentation.rows_before:,} before data.augment)"
    summary = f"data: {n_train:,} train rows{before}, {len(raw.eval):,} eval rows"
    if getattr(recipe.adapter, "rank_pattern_from", None):
        from ..train.transfer import learned_rank_pattern

        ranks = learned_rank_pattern(recipe) or {}
        summary += f"; ranks of {recipe.adapter.rank_pattern_from}: {len(ranks)} modules, {sum(ranks.values())} in all"
    if task.state.get("labels"):
        summary += f", labels {task.state['labels']}"
    packed = task.state.get("format") == "text" and getattr(task.options, "pack", False)
    if not packed:
        steps = total_steps(n_train, t.batch_size, t.grad_accum, t.epochs, t.max_steps)
        summary += f"; {steps} optimizer steps"
        if isinstance(recipe.adapter, AdaLoraSection):
            tinit, tfinal = resolve_schedule(recipe.adapter, steps)
            summary += f" (AdaLoRA warm-up {tinit}, final {tfinal})"
    return "\n".join([summary, *examples])


def augment_examples(rows: Any, recipe: Recipe) -> tuple[Augmentation, list[str]]:
    """What data.augment does to the training rows, and a variant by each operation (original -> augmented), the
    ones training makes from those rows; without making every variant."""
    augmentation, shown = preview(rows, recipe.data.augment, recipe.train.seed)
    lines = [f"augment: {augmentation.describe()}; for example (original -> augmented):"]
    for operation, original, variant in shown:
        label = f"  {operation}: "
        lines += [label + " ".join(original.split()), " " * (len(label) - 3) + "-> " + variant]
    return augmentation, lines
