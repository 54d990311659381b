"""Exact conversion of a trained AdaLoRA adapter into a plain LoRA adapter with a per-module rank.

peft's AdaLoRA layer adds ``B diag(E) A x * alpha / (r0 + 1e-5)`` (``r0`` = ``init_r``, ``E`` masked to the
surviving singular values). Keeping only the surviving indices ``k``, the same update is a LoRA update
``B' A' x * scaling`` with::

    A' = E[k] * A[k, :] * alpha / (r0 + 1e-5)      (rank_k x in)
    B' = B[:, k]                                    (out x rank_k)
    scaling = lora_alpha / r = 1                    (lora_alpha = r = rank_k per module)

so a LoRA adapter with ``rank_pattern`` = ``alpha_pattern`` = the surviving ranks gives the same outputs, can
be loaded by anything that knows LoRA (plain peft, vLLM, mixed batches), and has no ``E`` to carry. A module
pruned to rank 0 adds nothing and is left out of the LoRA adapter.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import PeftkitError
from ..finite import check_finite
from ..store.artifacts import build_metadata, derived_lora_recipe, register_derived
from ..store.registry import Registry

PREFIX = "base_model.model."


def _adalora_modules(weights: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[len(PREFIX):-len(".lora_E")] for k in weights if k.endswith(".lora_E"))


def convert_weights(weights: dict[str, torch.Tensor], alpha: float, init_r: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """LoRA tensors and per-module ranks from a saved AdaLoRA state dict (peft's on-disk names)."""
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    # peft's ranknum is a float32 parameter: divide by the same float32 value it does
    scale = torch.tensor(alpha, dtype=torch.float32) / (torch.tensor(float(init_r), dtype=torch.float32) + 1e-5)
    for module in _adalora_modules(weights):
        A = weights[f"{PREFIX}{module}.lora_A"].float()
        B = weights[f"{PREFIX}{module}.lora_B"].float()
        E = weights[f"{PREFIX}{module}.lora_E"].float()
        keep = (E.view(-1) != 0).nonzero().view(-1)
        ranks[module] = int(keep.numel())
        if keep.numel() == 0:
            continue
        out[f"{PREFIX}{module}.lora_A.weight"] = (A[keep] * E[keep] * scale).contiguous()
        out[f"{PREFIX}{module}.lora_B.weight"] = B[:, keep].contiguous()
    lora_keys = (".lora_A", ".lora_B", ".lora_E")
    for key, tensor in weights.items():  # the task head (modules_to_save) travels unchanged
        if not key.endswith(lora_keys):
            out[key] = tensor
    return out, ranks


def lora_config_for(adalora_config: dict[str, Any], ranks: dict[str, int]) -> dict[str, Any]:
    from peft import LoraConfig

    kept = {m: r for m, r in ranks.items() if r > 0}
    if not kept:
        raise PeftkitError("the AdaLoRA adapter kept no rank in any module: there is nothing to convert")
    common_r = Counter(kept.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=common_r,
        lora_alpha=common_r,
        target_modules=sorted(kept),
        rank_pattern=dict(kept),
        alpha_pattern=dict(kept),  # scaling = alpha / r = 1 in every module: alpha is folded into A
        lora_dropout=adalora_config.get("lora_dropout", 0.0),
        task_type=adalora_config.get("task_type"),
        modules_to_save=sorted(set(adalora_config.get("modules_to_save") or [])) or None,
        base_model_name_or_path=adalora_config.get("base_model_name_or_path"),
    )
    return config.to_dict()


def to_lora(registry: Registry, source: str, name: str, overwrite: bool = False,
            warn: Callable[[str], None] = lambda message: warnings.warn(message, stacklevel=2)) -> Path:
    """Convert registered AdaLoRA adapter ``source`` into a LoRA adapter registered as ``name``."""
    from ..store.snapshot import read_snapshot

    # read once, verified: the metadata checked here and the weights converted come from the same bytes
    entry = read_snapshot(registry, source, "`adalora to-lora` converts AdaLoRA adapters only")
    if entry.metadata.adapter.method != "adalora":
        raise PeftkitError(
            f"{source} is a {entry.metadata.adapter.method} adapter; `adalora to-lora` converts AdaLoRA "
            "adapters only"
        )
    target = registry.target(name)
    if not overwrite:
        registry.refuse_existing(name, "choose another --name or pass --overwrite")
    info = entry.metadata.adapter.adalora
    if info is not None and info.final_budget != info.target_budget:
        warn(f"{source} stopped before its final budget ({info.final_budget} ranks kept, target "
             f"{info.target_budget}); converting the {info.final_budget} ranks it kept")
    adalora_config, weights = entry.config, entry.weights
    lora_weights, ranks = convert_weights(weights, adalora_config["lora_alpha"], adalora_config["init_r"])
    config = lora_config_for(adalora_config, ranks)
    check_finite(lora_weights.items(), f"{source} converted to LoRA", f"{source} itself is damaged (check it with "
                 f"`peftkit adapters show {source}`) or diverged in training; nothing was registered")

    kept = {m: r for m, r in ranks.items() if r > 0}
    recipe = derived_lora_recipe(entry.metadata.recipe, name, config["r"], config["r"], config["lora_dropout"],
                                 sorted(kept))
    metadata = build_metadata(**{
        **{k: v for k, v in entry.metadata.to_json().items()
           if k not in ("format_version", "created", "versions", "files")},
        "name": name,
        "recipe": recipe,
        "adapter": {
            "method": "lora",
            "targets": sorted(kept),
            "head_modules": entry.metadata.adapter.head_modules,
            "rank_pattern": kept,
            "trainable_parameters": sum(t.numel() for t in lora_weights.values()),
            "total_parameters": entry.metadata.adapter.total_parameters,
        },
        "provenance": {
            "converted_from": source,
            "conversion": "adalora-to-lora (exact)",
            "source_files": entry.metadata.files,
            "source_created": entry.metadata.created,
            "dropped_modules": sorted(m for m, r in ranks.items() if r == 0),
        },
    })
    return register_derived(target, lora_weights, config, metadata, overwrite)


def measure_conversion(registry: Registry, source: str, name: str, n_rows: int = 64,
                       **trust: bool) -> dict[str, float]:
    """Largest difference between the two adapters' outputs on ``n_rows`` of the source's eval data
    (``trust``: ``trust_remote_code`` / ``allow_pickle``, the caller's, as for ``load_trained``)."""
    from ..core.data import encode, load_task_data
    from ..core.evaluation import device_batch
    from ..store.loading import load_trained

    before, after = load_trained(registry.folder(source), **trust), load_trained(registry.folder(name), **trust)
    raw = load_task_data(before.recipe.data, before.task, before.recipe.train.seed)
    rows = encode(raw.eval.select(range(min(n_rows, len(raw.eval)))), before.task, before.tokenizer,
                  before.recipe.data.max_length)
    batch = device_batch(before.task, before.tokenizer, rows, list(range(len(rows))), before.model.device)
    inputs = before.task.model_inputs(batch)
    with torch.no_grad():
        expected = before.model(**inputs).logits.float()
        got = after.model(**inputs).logits.float()
    return {
        "rows": len(rows),
        "max_abs_diff": float((got - expected).abs().max()),
        "max_rel_diff": float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-12)),
        "same_argmax": float((got.argmax(-1) == expected.argmax(-1)).float().mean()),
    }
