"""From a validated recipe to the objects a run needs: task head, tokenized data, base model with adapter.

Ordered so that the cheap steps that can fail on user input (data files, columns, labels, AdaLoRA's schedule)
run before the base model is loaded. What a recipe takes from stored adapters (``adapter.init_from``'s weights,
``adapter.rank_pattern_from``'s ranks) is read by :mod:`peftkit.train.transfer` and handed in: model code does not
reach into the adapter store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pydantic import ValidationError

from ..config.recipe import AdaLoraSection, Recipe
from ..errors import PeftkitError
from ..tasks import TaskHead, make_task
from .adalora import orthogonal_init, resolve_schedule
from .adapters import (ADAPTER_NAME, count_parameters, inject, peft_config, present_head_modules, resolve_module_paths,
                       resolve_target_modules)
from .augment import Augmentation, augment_rows
from .data import encode, load_task_data, total_steps
from .models import BaseRef, load_base_for_task, load_tokenizer, memory_footprint, resolve_base


@dataclass
class Plan:
    """Everything decided before the model loads."""

    recipe: Recipe
    task: TaskHead
    base: BaseRef
    tokenizer: Any
    train_rows: Any  # encoded datasets.Dataset
    eval_rows: Any
    total_steps: int
    schedule: Optional[tuple[int, int]]  # AdaLoRA (tinit, tfinal)
    rank_pattern: Optional[dict[str, int]] = None  # LoRA ranks learned by an AdaLoRA adapter
    eval_parts: list[tuple[str, int]] = field(default_factory=list)  # (data set, its encoded eval rows), several
    augmentation: Optional[Augmentation] = None  # what data.augment added to the training rows


def plan_run(recipe: Recipe, num_processes: int = 1, rank_pattern: Optional[dict[str, int]] = None) -> Plan:
    """``rank_pattern``: LoRA ranks per module (``adapter.rank_pattern_from``, read by
    :func:`peftkit.train.transfer.learned_rank_pattern`)."""
    task = recipe_head(recipe)
    raw = load_task_data(recipe.data, task, recipe.train.seed)
    augmentation = None
    if recipe.data.augment is not None:
        # after load_task_data cut max_train_samples (it counts original rows), and to the training rows only
        raw.train, augmentation = augment_rows(raw.train, recipe.data.augment, recipe.train.seed)
    base = resolve_base(recipe.base)
    tokenizer = load_tokenizer(base, recipe.base)
    train_rows = encode(raw.train, task, tokenizer, recipe.data.max_length)
    eval_rows, eval_parts = _encode_eval(raw, task, tokenizer, recipe.data.max_length)
    t = recipe.train
    steps = total_steps(len(train_rows), t.batch_size, t.grad_accum, t.epochs, t.max_steps, num_processes)
    schedule = resolve_schedule(recipe.adapter, steps) if isinstance(recipe.adapter, AdaLoraSection) else None
    if getattr(recipe.adapter, "init", None) == "loftq":  # fail before the model loads
        from .lora_init import loftq_weights_file

        problem = loftq_weights_file(base.path)
        if problem:
            raise PeftkitError(problem)
    return Plan(recipe, task, base, tokenizer, train_rows, eval_rows, steps, schedule, rank_pattern, eval_parts,
                augmentation)


def recipe_head(recipe: Recipe) -> TaskHead:
    """The head a recipe trains: its task section's, or with several data sets and ``data.heads: per_dataset``
    one head per data set (``tasks/multi_task.py``), the others' from ``data.also[i].task`` (default: the task
    section's type, fitted to that data set's own labels)."""
    from ..tasks import task_types
    from ..tasks.pooled import PooledHead

    data = recipe.data
    head = task_types().get(recipe.task.type)
    # a language model's rows have no labels to keep apart: its data sets share the one head it has
    pooled = head is not None and issubclass(head, PooledHead)
    if not data.also or data.heads == "shared" or (not pooled and all(s.task is None for s in data.also)):
        return make_task(recipe.task.type, recipe.task.options())
    sections = [recipe.task, *(source.task for source in data.also)]
    tasks = [{"name": source.label(), "type": section.type if section else recipe.task.type,
              "options": section.options() if section else {}} for source, section in zip(data.sources(), sections)]
    try:
        return make_task("multi_task", {"tasks": tasks})
    except ValidationError as exc:
        raise PeftkitError(f"data.also: {exc.errors()[0]['msg'].removeprefix('Value error, ')}; or set data.heads: "
                           "shared for one head over the union of the labels") from None


def _encode_eval(raw: Any, task: TaskHead, tokenizer: Any, max_length: int) -> tuple[Any, list[tuple[str, int]]]:
    """The eval rows encoded, and with several data sets how many encoded rows each one has, in order
    (encoding can change a data set's row count: packed text, say)."""
    if len(raw.eval_parts) <= 1:
        return encode(raw.eval, task, tokenizer, max_length), []
    import datasets

    parts = [(name, encode(rows, task, tokenizer, max_length)) for name, rows in raw.eval_parts]
    return datasets.concatenate_datasets([rows for _, rows in parts]), [(name, len(rows)) for name, rows in parts]


@dataclass
class BuiltModel:
    model: Any  # a PeftModel, or the plain model for full fine-tuning
    base_bytes: int
    trainable: int
    total: int
    targets: list[str]
    head_modules: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)  # where the adapter's start came from


# start(model, head_modules) -> provenance: sets the adapter's first weights from elsewhere (adapter.init_from)
Start = Callable[[Any, list[str]], dict[str, Any]]


def build_model(plan: Plan, device: Any, start: Optional[Start] = None) -> BuiltModel:
    recipe = plan.recipe
    model = load_base_for_task(recipe, plan.task, plan.base, plan.tokenizer, device)
    base_bytes = memory_footprint(model)
    heads = present_head_modules(model, plan.task)
    if recipe.adapter is None:
        for p in model.parameters():
            p.requires_grad_(True)
        if recipe.train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        trainable, total = count_parameters(model)
        return BuiltModel(model, base_bytes, trainable, total, [], heads)
    if plan.rank_pattern is not None:
        targets = resolve_module_paths(model, list(plan.rank_pattern), "adapter.rank_pattern_from")
    else:
        targets = resolve_target_modules(model, recipe.adapter.target_modules, tuple(heads))
    config = peft_config(recipe.adapter, plan.task, targets, heads, model, plan.total_steps, plan.schedule,
                         plan.rank_pattern)
    model = inject(model, config, quantized=recipe.quantization.bits is not None,
                   gradient_checkpointing=recipe.train.gradient_checkpointing)
    if isinstance(recipe.adapter, AdaLoraSection) and recipe.adapter.orthogonal_init:
        orthogonal_init(model)
    provenance: dict[str, Any] = {}
    if getattr(recipe.adapter, "init", None) == "loftq":  # the adapter then starts at a non-zero output
        from .lora_init import apply_loftq

        provenance["loftq_layers"] = apply_loftq(model, plan.base.path, ADAPTER_NAME)
    if recipe.adapter.init_from:
        if start is None:
            raise PeftkitError("adapter.init_from: this model was built without the adapter it starts from; build "
                               "it with peftkit.train.transfer.prepare_run")
        provenance = start(model, heads)
    if plan.rank_pattern:
        provenance["rank_pattern_from"] = recipe.adapter.rank_pattern_from
    trainable, total = count_parameters(model)
    return BuiltModel(model, base_bytes, trainable, total, targets, heads, provenance)
