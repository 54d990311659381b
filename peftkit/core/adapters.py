"""Inject LoRA or AdaLoRA adapters into a frozen base through peft, and resolve what they target.

``target_modules`` is resolved here, against the loaded model, rather than left to peft: names that match
nothing become an error naming what the model does have, and ``all-linear`` becomes the explicit list of
linear layers outside the task head and the output layer, for LoRA and AdaLoRA alike (peft expands
``all-linear`` only for some tuners).
"""

from __future__ import annotations

import difflib
from typing import Any, Optional, Union

from torch import nn

from ..config.recipe import AdaLoraSection, LoraSection
from ..errors import PeftkitError
from ..tasks.base import TaskHead

AdapterSection = Union[LoraSection, AdaLoraSection]
ADAPTER_NAME = "default"


def _linear_names(model: nn.Module, exclude: tuple[str, ...]) -> dict[str, list[str]]:
    """Leaf names of linear layers (bitsandbytes layers subclass nn.Linear) -> their full module names."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found: dict[str, list[str]] = {}
    for full_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is output:
            continue
        parts = full_name.split(".")
        if any(p in exclude for p in parts):
            continue
        found.setdefault(parts[-1], []).append(full_name)
    return found


def resolve_target_modules(model: nn.Module, spec: Union[str, list[str]], head_modules: tuple[str, ...]) -> list[str]:
    """The module names (leaf names, as peft matches them) an adapter section targets on ``model``."""
    linear = _linear_names(model, head_modules)
    if spec == "all-linear":
        if not linear:
            raise PeftkitError("adapter.target_modules: the model has no linear layers to adapt")
        return sorted(linear)
    missing = [name for name in spec if name not in linear]
    if missing:
        name = missing[0]
        close = difflib.get_close_matches(name, list(linear), n=1)
        hint = f"did you mean `{close[0]}`?" if close else "use all-linear or one of them"
        raise PeftkitError(
            f"adapter.target_modules: the model has no linear layer named {name!r} (it has: "
            f"{', '.join(sorted(linear))}); {hint}"
        )
    return list(spec)


def resolve_module_paths(model: nn.Module, paths: list[str], key: str) -> list[str]:
    """Full module paths (``bert.encoder.layer.0.attention.self.query``) checked against ``model``."""
    present = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = [p for p in paths if p not in present]
    if missing:
        raise PeftkitError(
            f"{key}: this model has no linear layer {missing[0]!r} ({len(missing)} of {len(paths)} modules "
            "missing); the ranks come from an adapter of another architecture"
        )
    return sorted(paths)


def _layers_kwargs(section: AdapterSection, model: nn.Module) -> dict[str, Any]:
    if section.layers is None:
        return {}
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if n_layers is not None:
        bad = [i for i in section.layers if not 0 <= i < n_layers]
        if bad:
            raise PeftkitError(f"adapter.layers: {bad[0]} is out of range; the model has layers 0..{n_layers - 1}")
    return {"layers_to_transform": list(section.layers)}


def peft_config(section: AdapterSection, task: TaskHead, targets: list[str], modules_to_save: list[str],
                model: nn.Module, total_step: Optional[int] = None, schedule: Optional[tuple[int, int]] = None,
                rank_pattern: Optional[dict[str, int]] = None) -> Any:
    """The peft config for an adapter section. AdaLoRA needs its resolved schedule (``tinit``, ``tfinal``)."""
    from peft import AdaLoraConfig, LoraConfig

    common = dict(
        target_modules=targets,
        lora_alpha=section.lora_alpha,
        lora_dropout=section.lora_dropout,
        task_type=task.peft_task_type,
        modules_to_save=list(modules_to_save) or None,  # a copy: peft extends this list in place for SEQ_CLS
        exclude_modules=base_head_linears(model, task) or None,  # leaf names such as `dense` also match there
        **_layers_kwargs(section, model),
    )
    if isinstance(section, LoraSection):
        from .lora_init import peft_init_lora_weights

        return LoraConfig(r=section.r, use_rslora=section.use_rslora, use_dora=section.use_dora,
                          rank_pattern=rank_pattern or {}, init_lora_weights=peft_init_lora_weights(section.init),
                          **common)
    assert total_step is not None and schedule is not None, "AdaLoRA needs the run's step count"
    tinit, tfinal = schedule
    return AdaLoraConfig(
        init_r=section.init_r,
        target_r=section.target_r,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=section.interval,
        beta1=section.beta1,
        beta2=section.beta2,
        orth_reg_weight=section.orth_reg_weight,
        total_step=total_step,
        **common,
    )


def base_head_linears(model: nn.Module, task: TaskHead) -> list[str]:
    """Full names of the linear layers inside the base's own output head (``task.unquantized_modules``), which
    no adapter targets."""
    heads = set(task.unquantized_modules)
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and heads & set(name.split("."))]


def present_head_modules(model: nn.Module, task: TaskHead) -> list[str]:
    names = {full.split(".")[-1] for full, _ in model.named_modules()}
    return [n for n in task.head_module_names if n in names]


def inject(model: nn.Module, config: Any, quantized: bool, gradient_checkpointing: bool) -> Any:
    """Wrap ``model`` with its adapter; only adapter and head parameters stay trainable."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        # casts norms to float32 and lets gradients flow into the first adapted layer's input
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return get_peft_model(model, config, adapter_name=ADAPTER_NAME)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the parameters they stand for."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state"):  # Params4bit packs two 4-bit values per uint8
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
