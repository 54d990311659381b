"""One registered adapter made ready to share a base model: its LoRA weights and config re-keyed for the
shared base, and its task head as a module of its own.

Why peftkit holds the heads and not peft: peft keeps a classification head as ``modules_to_save``, one copy
per adapter of the *same* module, so two adapters whose heads have different shapes (2 and 4 labels) cannot
share a model, and a mixed batch would run every row through one head. Here the shared model is the base's
body (plus the LM head for decoders), every adapter's LoRA weights sit in it side by side (peft routes each
row through its own with ``adapter_names``), and each adapter's head is applied to its own rows.

AdaLoRA adapters are served as their exact LoRA equivalent (``peftkit.ops.convert``): peft's mixed batches
exist for LoRA layers only, and the conversion is exact (see ``convert.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..config.metadata import AdapterMetadata
from ..config.recipe import Recipe
from ..errors import PeftkitError
from ..ops.convert import PREFIX, convert_weights
from ..store.snapshot import AdapterSnapshot
from ..tasks import TaskHead

LORA_MARK = ".lora_"


@dataclass
class ServedAdapter:
    name: str
    metadata: AdapterMetadata
    recipe: Recipe
    task: TaskHead
    lora_config: Any  # peft LoraConfig keyed for the shared model
    lora_weights: dict[str, torch.Tensor]  # peft's on-disk names, keyed for the shared model
    head: Optional[nn.Module]  # the head's own module (TaskHead.shared_head), or None
    pooling: Optional[str]  # "pooler" (BERT-style pooled output), "last_token" (decoders) or "tokens" (taggers, masked LMs)
    use_dora: bool


def _lora_weights(snapshot: AdapterSnapshot) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """LoRA tensors (AdaLoRA converted exactly) and the config fields that shape them."""
    config = snapshot.config
    if config.get("peft_type") == "ADALORA":
        weights, ranks = convert_weights(snapshot.weights, float(config["lora_alpha"]), int(config["init_r"]))
        kept = {m: r for m, r in ranks.items() if r > 0}
        # alpha was folded into A: scaling 1 in every module
        return weights, {"alpha": {m: float(r) for m, r in kept.items()}, "rslora": False, "dora": False}
    if config.get("peft_type") != "LORA":
        raise PeftkitError(f"{snapshot.name}: a {config.get('peft_type')} adapter cannot be served; "
                           "peftkit serves LoRA and AdaLoRA adapters")
    from peft.utils.other import get_pattern_key

    alpha_pattern = config.get("alpha_pattern") or {}
    modules = sorted({k[len(PREFIX):].split(LORA_MARK)[0] for k in snapshot.weights if LORA_MARK in k})
    alphas = {}
    for module in modules:
        key = get_pattern_key(list(alpha_pattern), module) if alpha_pattern else None
        alphas[module] = float(alpha_pattern.get(key, config["lora_alpha"]) if key else config["lora_alpha"])
    return dict(snapshot.weights), {"alpha": alphas, "rslora": bool(config.get("use_rslora")),
                                    "dora": bool(config.get("use_dora"))}


def prepare(snapshot: AdapterSnapshot, shared_model: nn.Module, strip_prefix: Optional[str]) -> ServedAdapter:
    """Re-key ``snapshot`` for ``shared_model``; ``strip_prefix`` is the task model's body attribute (``bert``)
    when the shared model is that body itself."""
    from peft import LoraConfig

    metadata = snapshot.metadata
    recipe = metadata.recipe
    task = metadata.task.head()
    weights, shape = _lora_weights(snapshot)

    def rekey(module_path: str) -> str:
        if strip_prefix and module_path.startswith(strip_prefix + "."):
            return module_path[len(strip_prefix) + 1:]
        return module_path

    lora: dict[str, torch.Tensor] = {}
    head_state: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        path = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if LORA_MARK in path:
            module, rest = path.split(LORA_MARK, 1)
            lora[f"{PREFIX}{rekey(module)}{LORA_MARK}{rest}"] = tensor
        else:
            head_state[path] = tensor
    present = {name for name, _ in shared_model.named_modules()}
    ranks: dict[str, int] = {}
    for key, tensor in lora.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX):-len(".lora_A.weight")]
            if module not in present:
                raise PeftkitError(f"{snapshot.name}: adapts module {module!r}, which the base model does not have; "
                                   "it was trained on another architecture")
            ranks[module] = int(tensor.shape[0])
    if not ranks:
        raise PeftkitError(f"{snapshot.name}: its weight file holds no LoRA weights; retrain the adapter")
    alphas = {rekey(m): a for m, a in shape["alpha"].items()}
    first = next(iter(ranks))
    # full module paths as targets and patterns: exactly the modules the adapter was trained on, whatever the
    # leaf names would also match in the shared model (an LM head, say)
    config = LoraConfig(
        r=ranks[first], lora_alpha=alphas[first], target_modules=sorted(ranks),
        rank_pattern=dict(ranks), alpha_pattern={m: alphas[m] for m in ranks},
        use_rslora=shape["rslora"], use_dora=shape["dora"], lora_dropout=0.0, bias="none",
        inference_mode=True, init_lora_weights=False,
    )
    head, pooling = task.shared_head(snapshot.name, head_state, shared_model)
    return ServedAdapter(snapshot.name, metadata, recipe, task, config, lora, head, pooling, shape["dora"])
