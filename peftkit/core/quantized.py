"""Keep a bitsandbytes-quantized base bit-for-bit frozen, whatever mode its forward pass runs in.

bitsandbytes' layers change their own state as a side effect of ``forward`` (bitsandbytes 0.50, read in
``bitsandbytes/nn/modules.py``):

* ``Linear4bit.forward`` on a CPU with AVX512-BF16, in eval mode without grad, repacks ``weight.data`` and its
  quant state into a CPU inference layout and keeps it (see :mod:`peftkit.core.cpu_paths`). A training step taken
  after an evaluation pass then runs on the repacked weights, in bfloat16: its gradients differ from those of a
  model that never evaluated, and anything that reads ``weight.data`` directly (dequantizing, merging) reads
  the packed layout.
* ``Linear4bit`` and ``Linear8bitLt`` cast ``bias.data`` in place to the compute dtype on every call, so a
  float32 bias becomes bfloat16 for good after one forward pass with ``compute_dtype: bfloat16``.

:func:`freeze_quantized_layers` turns the first off and makes the second act on a throw-away alias of the
bias, so every forward computes the same numbers as before and the stored weights never change. peft and
transformers do not guard against either; this is why peftkit does it here.

A model that only ever predicts may keep the packed path (``packed_inference=True``): it is bitsandbytes'
faster CPU kernel and what a plain peft user's model runs on such a CPU. Nothing may train, merge or save the
base afterwards: taking its state dict unpacks the 4-bit codes byte for byte but re-quantizes double-quantized
block scales (measured in tests/test_cpu_paths.py), so peftkit only ever saves adapters from such a model.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def _quantized_linear_types() -> tuple[type, ...]:
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes, nothing quantized to protect
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def _alias_bias(module: nn.Module, args: tuple) -> None:
    bias = module.bias
    if bias is not None:
        object.__setattr__(module, "_peftkit_bias", bias)  # a plain attribute, not a registered parameter
        # A new Parameter over the same storage: bitsandbytes rebinds *its* .data, not the stored bias.
        module.bias = nn.Parameter(bias.detach(), requires_grad=False)


def _restore_bias(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    stored = module.__dict__.pop("_peftkit_bias", None)
    if stored is not None:
        module.bias = stored


def freeze_quantized_layers(model: nn.Module, packed_inference: bool = False) -> int:
    """Stop every bitsandbytes layer in ``model`` from rewriting its weights in forward; return how many.

    ``packed_inference`` leaves bitsandbytes' packed bfloat16 CPU path on for 4-bit layers (inference only).
    """
    types_ = _quantized_linear_types()
    count = 0
    for module in model.modules():
        if not types_ or not isinstance(module, types_) or getattr(module, "_peftkit_frozen", False):
            continue
        if hasattr(module, "support_avx512bf16_for_cpu") and not packed_inference:
            module.support_avx512bf16_for_cpu = False
        if module.bias is not None:
            module.register_forward_pre_hook(_alias_bias)
            module.register_forward_hook(_restore_bias, always_call=True)
        module._peftkit_frozen = True
        count += 1
    return count


def _plain_save(module: nn.Module, destination: dict, prefix: str, keep_vars: bool) -> None:
    nn.Module._save_to_state_dict(module, destination, prefix, keep_vars)  # the tensors as they are, not unpacked


@contextmanager
def packed_kept(model: nn.Module) -> Iterator[None]:
    """Inside, reading ``model.state_dict()`` leaves 4-bit layers on the packed CPU path as they are.

    bitsandbytes unpacks such a layer whenever its state dict is taken, and the unpacking re-quantizes its
    block scales (see above): the model then computes slightly different numbers. peft's
    ``set_peft_model_state_dict`` takes the whole model's state dict (for its key names) to load one adapter, so
    an adapter added to a server that has already predicted would otherwise shift every other adapter's
    outputs (``tests/test_http_serve.py``). Inside, packed layers list their weights without their quant state:
    right for reading key names, wrong for saving the model.
    """
    packed = [m for m in model.modules() if isinstance(m, _quantized_linear_types())
              and getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)]
    for module in packed:
        module._save_to_state_dict = types.MethodType(_plain_save, module)  # shadows the class's method
    try:
        yield
    finally:
        for module in packed:
            module.__dict__.pop("_save_to_state_dict", None)
