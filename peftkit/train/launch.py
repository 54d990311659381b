"""What the launcher (accelerate, torchrun) set up, checked against what peftkit's training can do.

peftkit has no launcher of its own: the processes, their group, FSDP and DeepSpeed come from the user's
accelerate or torchrun command, and Trainer runs them. This module only reads that setup, refuses the
combinations peftkit cannot train correctly, each in one line naming the key, and fits accelerate's FSDP plugin
to a peft model the way transformers' Trainer does.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..config.recipe import AdaLoraSection, Recipe
from ..core.models import torch_dtype
from ..errors import PeftkitError


def refuse_fsdp_without_gpu() -> None:
    """One line where accelerate would raise a traceback from inside Trainer: its FSDP plugin needs an accelerator
    (a GPU); on CPUs it refuses to start, whatever the number of processes (accelerate 1.x)."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not torch.accelerator.is_available():
        from ..errors import PeftkitError

        raise PeftkitError("the accelerate config asks for FSDP, which runs on GPUs only, and this machine has none; "
                           "on CPUs launch with --config_file docs/accelerate/ddp.yaml (data-parallel) instead")


def check_launch(accelerator: Any, recipe: Recipe, say: Callable[[str], None]) -> bool:
    """Whether the weights are sharded across processes (FSDP, DeepSpeed ZeRO-3), so that every process must
    take part in every forward pass and the final state dict is gathered; refuse what peftkit cannot train."""
    import os

    from accelerate.utils import DistributedType

    # accelerate's single-process launcher sets ACCELERATE_USE_CPU, and MASTER_ADDR when asked for several
    simple_launcher = "ACCELERATE_USE_CPU" in os.environ and os.environ.get("MASTER_ADDR")
    if accelerator.num_processes == 1 and simple_launcher and "WORLD_SIZE" not in os.environ:
        say("note: accelerate started one process of the several asked for; with fewer than 2 GPUs, "
            "`accelerate launch` needs --multi_gpu (or --config_file docs/accelerate/ddp.yaml) to start several")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return check_deepspeed(accelerator.state.deepspeed_plugin, recipe)
    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    plugin = accelerator.state.fsdp_plugin
    problems = []
    if plugin.fsdp_version != 1:
        problems.append("fsdp_version: peftkit runs FSDP 1, the version its configuration was written for; set "
                        "fsdp_version: 1 in the accelerate config, as docs/accelerate/fsdp-qlora.yaml does")
    elif not plugin.use_orig_params:
        problems.append("fsdp_use_orig_params: peftkit gives the head, biases and norms their own learning rate "
                        "and weight decay by parameter name, which FSDP keeps only with fsdp_use_orig_params: true")
    if isinstance(recipe.adapter, AdaLoraSection):
        problems.append("adapter.method: adalora reallocates ranks from whole weights and gradients, which FSDP "
                        "splits across processes; launch it with docs/accelerate/ddp.yaml, or use lora")
    quant = recipe.quantization
    if quant.bits == 8 or (quant.bits == 4 and quant.quant_storage == "uint8"):
        problems.append("quantization: FSDP shards floating tensors only; use bits: 4 with quant_storage and "
                        "base.dtype both bfloat16 (or float16 / float32)")
    if problems:
        raise PeftkitError("under FSDP: " + "; ".join(problems))
    return True


def check_deepspeed(plugin: Any, recipe: Recipe) -> bool:
    """Refuse what DeepSpeed cannot train with peftkit; True under ZeRO-3 (the parameters partitioned)."""
    stage = int(plugin.zero_stage or 0)
    zero = (plugin.deepspeed_config or {}).get("zero_optimization", {})
    problems = []
    if isinstance(recipe.adapter, AdaLoraSection):
        # under every ZeRO stage DeepSpeed keeps the gradients in its own buffers, not in each parameter's .grad
        problems.append("adapter.method: adalora reallocates ranks from each parameter's gradient, which DeepSpeed "
                        "keeps in its own buffers; launch it with docs/accelerate/ddp.yaml, or use lora")
    if (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None):
        problems.append("offload_optimizer: peftkit hands DeepSpeed its own AdamW (a learning rate per group: head, "
                        "AdaLoRA, LoRA+), and ZeRO-Offload runs only DeepSpeed's CPU Adam; remove offload_optimizer "
                        "from the DeepSpeed config")
    quant = recipe.quantization
    if stage == 3 and (quant.bits == 8 or (quant.bits == 4 and quant.quant_storage == "uint8")):
        problems.append("quantization: ZeRO-3 partitions floating tensors only; use bits: 4 with quant_storage and "
                        "base.dtype both bfloat16 (or float16 / float32), or ZeRO-2")
    if problems:
        raise PeftkitError(f"under DeepSpeed ZeRO-{stage}: " + "; ".join(problems))
    return stage == 3


def fit_fsdp_plugin(accelerator: Any, model: torch.nn.Module, recipe: Recipe) -> None:
    """What transformers' Trainer does for peft models under FSDP (peft's docs, "Use PEFT QLoRA and FSDP")."""
    from peft.utils.other import fsdp_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    # adapter layers wrapped apart from the frozen base, so no flat parameter mixes trainable and frozen ones
    plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    if recipe.quantization.bits == 4:  # compute in the dtype the 4-bit weights are packed in
        plugin.set_mixed_precision(torch_dtype(recipe.quantization.quant_storage), override=True)
