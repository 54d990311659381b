"""Combine registered adapters into a new one with peft's ``add_weighted_adapter``.

What peftkit decides around peft's function:

* **Weights mean the same for every method.** peft weighs the *update* ``s B A`` of each adapter for the
  methods that work on updates (``cat``, ``svd`` and the ``*_svd`` variants), but for the methods that work
  on the ``A`` and ``B`` matrices entry by entry (``linear``, ``ties``, ``dare_linear``, ``dare_ties``,
  ``magnitude_prune``) it multiplies each matrix by ``sqrt(w s)``; an adapter combined with itself at
  0.5/0.5 then comes back with twice its update. peftkit hands those methods ``sign(w) w**2`` so that each
  matrix is multiplied by ``w sqrt(s)``: the matrices are averaged with the weights, and with any method an
  adapter combined with itself at weights summing to 1 gives back its own outputs (``prune`` methods aside).
* **Task heads** (``modules_to_save``, which peft refuses to combine) are averaged with the weights
  normalised to sum to 1; that needs the same task and label map in every parent, which is checked.
* **AdaLoRA parents** are first converted to the exact LoRA adapter they equal (:mod:`peftkit.ops.convert`).
* Parents of different tasks, label maps, base weights or base quantization are refused, as is a method that
  needs equal ranks when the ranks differ (``cat`` and ``svd`` take any ranks).
"""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import PeftkitError
from ..finite import check_finite, check_weights
from ..store.artifacts import build_metadata, derived_lora_recipe, register_derived
from ..store.registry import Registry
from ..store.snapshot import AdapterSnapshot

PREFIX = "base_model.model."


def methods() -> tuple[str, ...]:
    """The combination types peft's ``add_weighted_adapter`` accepts, read from its signature."""
    from peft.tuners.lora import LoraModel

    return typing.get_args(typing.get_type_hints(LoraModel.add_weighted_adapter)["combination_type"])


def factorwise(method: str) -> bool:
    """Methods that combine the A and B matrices entry by entry: equal ranks needed, weights on each factor."""
    return not (method == "cat" or method.endswith("svd"))


def uses_density(method: str) -> bool:
    return any(part in method for part in ("ties", "dare", "magnitude_prune"))


def _check_options(parents: list[str], weights: list[float], method: str, density: Optional[float]) -> None:
    known = methods()
    if method not in known:
        raise PeftkitError(f"--method: unknown combination {method!r}; use one of: {', '.join(known)}")
    if len(parents) < 2:
        raise PeftkitError("combine needs two or more adapters (an adapter may be named twice)")
    if len(weights) != len(parents):
        raise PeftkitError(f"--weights: {len(weights)} weights for {len(parents)} adapters; give one weight per "
                           "adapter, e.g. --weights " + ",".join([f"{1 / len(parents):.2g}"] * len(parents)))
    check_weights(weights)
    if uses_density(method):
        if density is None or not 0 < density <= 1:
            raise PeftkitError(f"--density: {method} prunes each adapter to a fraction of its entries; give "
                               f"--density between 0 (exclusive) and 1, e.g. 0.5 (got {density})")
    elif density is not None:
        raise PeftkitError(f"--density: {method} does not prune; drop --density or use ties, dare_linear, "
                           "dare_ties or magnitude_prune")


def _check_compatible(parents: list[AdapterSnapshot]) -> None:
    first = parents[0]
    for other in parents[1:]:
        a, b = first.metadata, other.metadata
        pairs = [
            ("task", a.task.type, b.task.type),
            ("head state", a.task.state.to_json(), b.task.state.to_json()),  # labels; a regressor's target scale
            ("base", (a.base.identity, a.base.fingerprint), (b.base.identity, b.base.fingerprint)),
            ("base quantization", a.base.quantization.model_dump(mode="json"),
             b.base.quantization.model_dump(mode="json")),
        ]
        for what, left, right in pairs:
            if left != right:
                raise PeftkitError(f"{first.name} and {other.name} have different {what}s ({_short(left)} and "
                                   f"{_short(right)}); only adapters trained for the same task on the same base "
                                   "can be combined")


def _short(value: Any) -> str:
    if isinstance(value, tuple):  # (identity, fingerprint)
        return f"{value[0]} {value[1][:19]}"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def lora_weights_and_config(snapshot: AdapterSnapshot) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
    """A parent as a LoRA adapter: weights, config dict, and whether it was converted from AdaLoRA."""
    from .convert import convert_weights, lora_config_for

    config, weights = dict(snapshot.config), snapshot.weights
    check_finite(weights.items(), snapshot.name, "it cannot be combined; retrain it (with a lower train.lr)")
    if config["peft_type"] == "ADALORA":
        weights, ranks = convert_weights(weights, config["lora_alpha"], config["init_r"])
        return weights, lora_config_for(config, ranks), True
    if config["peft_type"] != "LORA":
        raise PeftkitError(f"{snapshot.name} is a {config['peft_type']} adapter; combine takes LoRA and AdaLoRA adapters")
    if config.get("use_dora"):
        raise PeftkitError(f"{snapshot.name} is a DoRA adapter; peft's add_weighted_adapter cannot combine DoRA magnitudes")
    return weights, config, False


def module_ranks(weights: dict[str, torch.Tensor]) -> dict[str, int]:
    return {k[len(PREFIX):-len(".lora_A.weight")]: int(t.shape[0]) for k, t in weights.items()
            if k.endswith(".lora_A.weight")}


def _check_ranks(names: list[str], weights: list[dict[str, torch.Tensor]], method: str) -> None:
    if not factorwise(method):
        return
    seen: dict[int, tuple[str, str]] = {}
    for name, w in zip(names, weights):
        for module, rank in module_ranks(w).items():
            seen.setdefault(rank, (name, module))
    if len(seen) > 1:
        (r1, (n1, m1)), (r2, (n2, m2)) = list(seen.items())[:2]
        raise PeftkitError(
            f"--method {method} combines the A and B matrices entry by entry, so every module of every adapter needs "
            f"the same rank, but {n1} has rank {r1} in {m1} and {n2} rank {r2} in {m2}; use --method cat (exact, the "
            "ranks add up) or svd (re-factorised to the largest rank, or --svd-rank)")


def _split_head(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    lora = {k: v for k, v in weights.items() if ".lora_" in k}
    return lora, {k: v for k, v in weights.items() if ".lora_" not in k}


def combined_head(heads: list[dict[str, torch.Tensor]], weights: list[float], names: list[str]) -> dict[str, torch.Tensor]:
    """The task heads averaged with the weights normalised to sum to 1."""
    if not any(heads):
        return {}
    total = sum(weights)
    if total <= 0:
        raise PeftkitError(f"--weights: they sum to {total:g}, so the task heads of {', '.join(names)} cannot be "
                           "averaged with them; give weights with a positive sum")
    keys = sorted(heads[0])
    return {k: sum(h[k].float() * (w / total) for h, w in zip(heads, weights)).to(heads[0][k].dtype) for k in keys}


def combine(registry: Registry, parents: list[str], weights: list[float], method: str, name: str,
            density: Optional[float] = None, svd_rank: Optional[int] = None, majority_sign: str = "total",
            seed: int = 0, overwrite: bool = False, say: Callable[[str], None] = lambda line: None,
            trust_remote_code: bool = False, allow_pickle: bool = False) -> Path:
    """Register ``name``: the adapters ``parents`` combined by peft's ``method`` with ``weights``.

    ``trust_remote_code`` and ``allow_pickle`` are the caller's alone,
    as for :func:`peftkit.store.loading.load_trained`.
    """
    from peft import PeftConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from ..core.models import load_base_for_task, load_tokenizer, resolve_base, user_trust
    from ..store.snapshot import read_snapshot

    _check_options(parents, weights, method, density)
    target = registry.target(name)
    if not overwrite:
        registry.refuse_existing(name, "choose another --name or pass --overwrite")
    # read once, verified: the metadata checked for compatibility and the weights combined come from the same bytes
    entries = [read_snapshot(registry, p, not_an_adapter="only adapters can be combined") for p in parents]
    _check_compatible(entries)
    loaded = [lora_weights_and_config(e) for e in entries]
    split = [_split_head(w) for w, _, _ in loaded]
    _check_ranks(parents, [lora for lora, _ in split], method)
    head = combined_head([h for _, h in split], weights, parents)

    first = entries[0].metadata
    recipe = first.recipe
    recipe = recipe.model_copy(update={"base": user_trust(recipe.base, parents[0], trust_remote_code, allow_pickle)})
    # the combination only reads the adapters' matrices; a float base is enough to hold them
    recipe = recipe.model_copy(update={"quantization": recipe.quantization.model_copy(update={"bits": None})})
    task = first.task.head()
    base_ref = resolve_base(recipe.base)
    model = load_base_for_task(recipe, task, base_ref, load_tokenizer(base_ref, recipe.base), torch.device("cpu"))
    adapter_names = [f"parent{i}" for i in range(len(parents))]
    peft_model = None
    for adapter, (lora, _), (_, config, _) in zip(adapter_names, split, loaded):
        # no task type and no modules_to_save: peft would wrap the head for each parent, then refuse to combine
        peft_config = PeftConfig.from_peft_type(**{**config, "modules_to_save": None, "task_type": None,
                                                   "inference_mode": True})
        if peft_model is None:
            peft_model = get_peft_model(model, peft_config, adapter_name=adapter)
        else:
            peft_model.add_adapter(adapter, peft_config)
        result = set_peft_model_state_dict(peft_model, lora, adapter_name=adapter)
        if getattr(result, "unexpected_keys", None):
            raise PeftkitError(f"{parents[adapter_names.index(adapter)]} adapts modules its base does not have "
                               f"({result.unexpected_keys[0]}); its files do not match its metadata")
    peft_weights = [math.copysign(w * w, w) if factorwise(method) else w for w in weights]
    torch.manual_seed(seed)  # dare_* prune at random
    try:
        peft_model.add_weighted_adapter(adapter_names, peft_weights, "combined", combination_type=method,
                                        svd_rank=svd_rank, density=density, majority_sign_method=majority_sign)
    except ValueError as exc:
        raise PeftkitError(f"--method {method}: peft refused the combination: {exc}") from None
    combined = {k: v.detach().cpu().contiguous() for k, v in
                get_peft_model_state_dict(peft_model, adapter_name="combined").items()}
    combined.update(head)
    check_finite(combined.items(), f"the combination of {', '.join(parents)}", "nothing was registered")
    config = peft_model.peft_config["combined"]
    config.modules_to_save = loaded[0][1].get("modules_to_save")
    config.task_type = loaded[0][1].get("task_type")
    config.base_model_name_or_path = loaded[0][1].get("base_model_name_or_path")
    config.inference_mode = True
    config_dict = config.to_dict()
    say(f"combined {', '.join(parents)} with {method} (weights {', '.join(f'{w:g}' for w in weights)}): rank "
        f"{config.r} on {len(module_ranks(combined))} modules")

    lora_keys = module_ranks(combined)
    leaf_targets = sorted({m.split(".")[-1] for m in lora_keys})
    new_recipe = derived_lora_recipe(first.recipe, name, config.r, config.lora_alpha, config.lora_dropout,
                                     leaf_targets)
    metadata = build_metadata(
        name=name, task=first.task.to_json(), base=first.base.to_json(),
        adapter={"method": "lora", "targets": leaf_targets, "head_modules": first.adapter.head_modules,
                 "trainable_parameters": sum(t.numel() for t in combined.values()),
                 "total_parameters": first.adapter.total_parameters},
        metrics={}, key_metric=first.key_metric, recipe=new_recipe,
        provenance={
            "combined_from": parents, "weights": weights, "method": method, "density": density,
            "svd_rank": svd_rank, "majority_sign": majority_sign, "seed": seed, "peft_weights": peft_weights,
            "head": "weighted average, weights normalised to sum to 1" if head else None,
            "converted_from_adalora": [p for p, (_, _, ada) in zip(parents, loaded) if ada],
            "parents": {e.name: {"created": e.metadata.created, "files": e.metadata.files}
                        for e in entries},
        },
    )
    return register_derived(target, combined, config_dict, metadata, overwrite)
