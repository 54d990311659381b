"""Start a new adapter from registered ones: ``adapter.init_from`` (its adapter weights, and its task head when
the new task can use it) and ``adapter.rank_pattern_from`` (the per-module ranks an AdaLoRA run learned). The
lineage is recorded in the new adapter's ``provenance``. This is where a run reads the adapter store; the model
code it calls (:mod:`peftkit.core.build`) is handed what was read."""

from __future__ import annotations

from typing import Any, Optional

from ..config.metadata import AdapterMetadata
from ..config.recipe import Recipe
from ..core.build import BuiltModel, Plan, build_model, plan_run
from ..errors import PeftkitError
from ..finite import check_finite
from ..store.registry import Registry
from ..tasks import TaskHead


def prepare_run(recipe: Recipe, device: Any, num_processes: int = 1) -> tuple[Plan, BuiltModel]:
    """The run's plan and built model, with what the recipe takes from stored adapters."""
    if getattr(recipe.adapter, "init_from", None):  # fail before the data and the model load
        try:
            Registry(recipe.output.registry).folder(recipe.adapter.init_from)
        except PeftkitError as exc:
            raise PeftkitError(f"adapter.init_from: {exc}") from None
    plan = plan_run(recipe, num_processes, learned_rank_pattern(recipe))

    def start(model: Any, head_modules: list[str]) -> dict[str, Any]:
        return initialise_from(model, recipe, plan.task, head_modules)

    return plan, build_model(plan, device, start)


def learned_rank_pattern(recipe: Recipe) -> Optional[dict[str, int]]:
    """Per-module ranks of ``adapter.rank_pattern_from`` (modules AdaLoRA pruned to rank 0 left out)."""
    source = getattr(recipe.adapter, "rank_pattern_from", None)
    if source is None:
        return None
    try:
        entry = Registry(recipe.output.registry).get(source)
    except PeftkitError as exc:
        raise PeftkitError(f"adapter.rank_pattern_from: {exc}") from None
    adapter = entry.metadata.adapter
    ranks = (adapter.adalora.final_ranks if adapter.adalora else None) or adapter.rank_pattern
    if not ranks:
        raise PeftkitError(
            f"adapter.rank_pattern_from: {source} is a {adapter.method} adapter without learned ranks; "
            "name an AdaLoRA adapter or its LoRA conversion"
        )
    return {module: rank for module, rank in ranks.items() if rank > 0}



def initialise_from(model: Any, recipe: Recipe, task: TaskHead, head_modules: list[str]) -> dict[str, Any]:
    """Copy the weights of ``recipe.adapter.init_from`` into ``model``; return the provenance to record."""
    from peft.utils import set_peft_model_state_dict

    from ..store.snapshot import read_snapshot

    source = recipe.adapter.init_from
    key = "adapter.init_from"
    try:
        snapshot = read_snapshot(Registry(recipe.output.registry), source,
                                 "only an adapter can start another; name a LoRA or AdaLoRA adapter")
    except PeftkitError as exc:
        raise PeftkitError(f"{key}: {exc}") from None
    metadata = snapshot.metadata
    if metadata.adapter.method != recipe.adapter.method:
        raise PeftkitError(
            f"{key}: {source} is a {metadata.adapter.method} adapter and this recipe trains "
            f"{recipe.adapter.method}; use the same adapter.method (an AdaLoRA adapter can become LoRA with "
            "`peftkit adalora to-lora`)"
        )
    weights = snapshot.weights
    check_finite(weights.items(), f"{key}: {source}", "it cannot start another adapter; retrain it")
    head = _head_decision(recipe.adapter.init_head, metadata, task, source)
    if head == "reinit":  # peft loads the head with the adapter: hand it this model's fresh head instead
        # the parent's head goes too: a masked LM's transform has no place in a classifier, nor its classifier here
        dropped = {*head_modules, *metadata.adapter.head_modules}
        weights = {k: v for k, v in weights.items() if not any(f".{h}." in k for h in dropped)}
        for name, p in model.named_parameters():
            if ".modules_to_save.default." in name:
                weights[name.replace(".modules_to_save.default", "")] = p.detach().clone()
    expected = {n.replace(".default", ""): p.shape for n, p in model.named_parameters()}
    for name, tensor in sorted(weights.items()):  # the first mismatch by name, whatever the file order
        if name in expected and tuple(expected[name]) != tuple(tensor.shape):
            raise PeftkitError(
                f"{key}: {source}'s {name} has shape {tuple(tensor.shape)}, this adapter's is "
                f"{tuple(expected[name])}; use the same rank and target modules as {source}"
            )
    result = set_peft_model_state_dict(model, weights, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        kin = metadata.task.type == task.name
        why = "it was trained on another architecture" if kin else \
            f"its {metadata.task.type} model has modules a {task.name} model lacks"
        raise PeftkitError(f"{key}: {source} adapts modules this model does not have ({sorted(unexpected)[0]}); {why}")
    return {"init_from": source, "head": "kept" if head == "keep" else "reinitialised",
            "parent_created": metadata.created, "parent_files": metadata.files}


def _head_decision(choice: str, parent: AdapterMetadata, task: TaskHead, source: str) -> str:
    # the whole state, not only labels: a regressor's head is fitted to its targets' scale (mean, std)
    same = parent.task.type == task.name and parent.task.state.to_json() == task.state
    if choice == "keep" and not same:
        theirs, ours = parent.task.state.to_json(), task.state
        if parent.task.type != task.name:
            theirs, ours = f"a {parent.task.type} head", f"a {task.name} head"
        raise PeftkitError(f"adapter.init_head: keep needs the same task and labels as {source} ({theirs} there, "
                           f"{ours} here); set adapter.init_head: reinit")
    if choice == "auto":
        return "keep" if same else "reinit"
    return choice
