"""How a LoRA adapter's A and B start (``adapter.init``), through peft's own initialisations.

* ``default``: peft's ``init_lora_weights=True``: A Kaiming-uniform, B zero; the adapter starts at zero output.
* ``gaussian``: peft's ``"gaussian"``: A ~ N(0, (1/r)^2), B zero; the adapter starts at zero output too.
* ``loftq`` (4-bit bases only): peft's :func:`peft.replace_lora_weights_loftq`, which reads each adapted layer's
  unquantized weight W from the base's safetensors file and sets B A to the best rank-r approximation of
  W - dequant(Q). The adapter's starting output is then **not** zero: it is the low-rank part of the
  quantization error, so that Q + (alpha/r) B A is closer to W than Q alone. The base stays the frozen 4-bit one.

``olora`` and ``pissa`` are refused by the recipe (``Recipe._cross_checks``): peft rewrites the base weight as a
residual W - B A (on a 4-bit base it dequantizes, subtracts and re-quantizes a new ``Params4bit``; PiSSA refuses
non-float weights outright), so the adapter would no longer apply to the base peftkit saves it for.

Two corrections to peft 0.21.2's ``replace_lora_weights_loftq`` (``peft/utils/loftq_utils.py``):

* its ``_loftq_init_new`` computes on ``"cuda"`` (or ``"xpu"``) whatever device the model is on, and fails on a
  CPU ("Torch not compiled with CUDA enabled"); on a base outside CUDA/XPU peftkit swaps in the same three steps
  (dequantize, subtract, peft's ``_low_rank_decomposition``) on the weight's own device;
* it sets B A to the residual's approximation and ignores LoRA's scaling alpha/r (peft issue #1982, open): the
  layer then adds (alpha/r) times the correction. At peftkit's default alpha = 2 r that is twice the correction,
  and the error W - Q - 2 P_r(W - Q) has exactly the norm of W - Q (Pythagoras on the SVD): LoftQ gains nothing.
  peftkit divides A and B by sqrt(alpha/r) each, so the layer adds the correction itself (at alpha = r,
  unchanged from peft).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..errors import PeftkitError

PEFT_INIT = {"default": True, "gaussian": "gaussian", "loftq": True}  # loftq replaces A and B after injection


def peft_init_lora_weights(init: str) -> Any:
    """``LoraConfig.init_lora_weights`` for ``adapter.init``."""
    return PEFT_INIT[init]


def loftq_weights_file(base_path: Path) -> Optional[str]:
    """Why ``init: loftq`` cannot read the base's unquantized weights from ``base_path`` (None: it can)."""
    if (base_path / "model.safetensors").is_file() or (base_path / "model.safetensors.index.json").is_file():
        return None
    return (f"adapter.init: loftq reads the base's unquantized weights from model.safetensors (or its sharded "
            f"index), and {base_path} has neither; use a base stored as safetensors, or init: default")


@torch.no_grad()
def _loftq_factors_on_weight_device(qweight: Any, weight: torch.Tensor, num_bits: int, reduced_rank: int) -> Any:
    """peft 0.21.2's ``_loftq_init_new``, computed where the quantized weight is rather than on "cuda"."""
    import bitsandbytes as bnb
    from peft.utils.loftq_utils import _low_rank_decomposition

    if num_bits != 4:
        raise ValueError("Only 4 bit quantization supported at the moment.")
    dequantized = bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state).to(torch.float32)
    residual = weight.to(device=dequantized.device, dtype=torch.float32) - dequantized
    output = _low_rank_decomposition(residual, reduced_rank=reduced_rank)
    return output["R"], output["L"]


@contextlib.contextmanager
def _loftq_device(model: torch.nn.Module) -> Iterator[None]:
    from peft.utils import loftq_utils

    device = next(p.device for p in model.parameters())
    if device.type in ("cuda", "xpu"):
        yield  # peft's own function, unchanged
        return
    original = loftq_utils._loftq_init_new
    loftq_utils._loftq_init_new = _loftq_factors_on_weight_device
    try:
        yield
    finally:
        loftq_utils._loftq_init_new = original


@torch.no_grad()
def apply_loftq(model: Any, base_path: Path, adapter_name: str) -> int:
    """Start every adapted 4-bit layer of ``model`` (a PeftModel) at LoftQ's correction; return how many.

    The adapter's output at step 0 is non-zero by design: (alpha/r) B A = P_r(W - dequant(Q)), see the module.
    """
    from peft import replace_lora_weights_loftq
    from peft.tuners.lora import Linear4bit

    problem = loftq_weights_file(base_path)
    if problem:
        raise PeftkitError(problem)
    with _loftq_device(model):
        replace_lora_weights_loftq(model, model_path=str(base_path), adapter_name=adapter_name)
    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and adapter_name in module.lora_A:
            root = math.sqrt(module.scaling[adapter_name])  # peft issue #1982: see the module docstring
            for linear in (module.lora_A[adapter_name], module.lora_B[adapter_name]):
                linear.weight.data = (linear.weight.data / root).contiguous()
            count += 1
    return count
