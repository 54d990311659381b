"""Which bitsandbytes code path a 4-bit layer takes on this machine, and how to say so to a user.

bitsandbytes 0.50 has two CPU paths for a 4-bit ``Linear4bit`` (read in ``bitsandbytes/nn/modules.py`` and
``bitsandbytes/backends/cpu/ops.py``):

* **dequantized**: the weight is dequantized and multiplied in the layer's compute dtype (float32 here). Every
  CPU takes it for training, and peftkit keeps it for training's evaluation passes too
  (:mod:`peftkit.core.quantized`), so training computes the same numbers whatever CPU it runs on.
* **packed-bf16**: on a CPU with AVX512-BF16 (bitsandbytes asks the CPU itself: ``has_avx512bf16``), the first
  forward pass in eval mode without gradients repacks the weight for a fused kernel that computes in
  bfloat16. A plain transformers + peft user on such a CPU gets it without asking. peftkit lets it run where
  nothing trains afterwards (predict, generate, eval, serving) because it is faster (measured in
  ``benchmarks/cpu_4bit_paths.py``); its logits differ from the dequantized path's by bfloat16 rounding.

Intel Xeons from Cooper Lake on (Sapphire Rapids adds AMX) and AMD EPYC from Zen 4 on report AVX512-BF16; older
CPUs do not, and take the dequantized path everywhere.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEQUANTIZED = "dequantized"
PACKED_BF16 = "packed-bf16"

# bfloat16 keeps 8 significant bits: one rounding moves a value by at most 2**-9 of itself
BF16_UNIT_ROUNDOFF = 2.0**-9

# Measured on all-MiniLM-L6-v2 in NF4 with the sst2-qlora adapter, the 872 SST-2 dev sentences, AMD EPYC
# (Zen 4, AVX512-BF16), 2026-12-01: benchmarks/results/cpu_4bit_paths/. Quoted to users beside their own figure.
MEASURED_PACKED_DIFFERENCE = "max relative logit difference 1.0e-2, same label on 99.8% of rows, accuracy unchanged"

_FLAG_PREFIXES = ("avx512", "amx")


def cpu_model() -> str:
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's AVX512 and AMX flags (from ``/proc/cpuinfo``; empty where that file is absent)."""
    for line in _cpuinfo_lines():
        if line.startswith("flags"):
            return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(_FLAG_PREFIXES))
    return []


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


@functools.lru_cache(maxsize=1)
def packed_4bit_available() -> bool:
    """Whether bitsandbytes runs 4-bit layers through its packed bfloat16 kernel in no-grad eval on this CPU."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def inference_path(packed_allowed: bool) -> str:
    """The path a 4-bit layer's no-grad forward takes on the CPU here, given what the caller allows."""
    return PACKED_BF16 if packed_allowed and packed_4bit_available() else DEQUANTIZED


def plain_peft_path() -> str:
    """The path a plain transformers + peft user's 4-bit model takes on this CPU in no-grad inference."""
    return inference_path(packed_allowed=True)


def describe_path(path: str) -> str:
    """One phrase for users: which path ran, on which CPU, and what difference to expect from it."""
    if path == PACKED_BF16:
        return (f"4-bit layers ran on bitsandbytes' packed bfloat16 CPU kernel ({cpu_model()} has AVX512-BF16), "
                f"as plain transformers + peft does on this CPU; against training's float32 path expect bfloat16 "
                f"rounding (on MiniLM: {MEASURED_PACKED_DIFFERENCE})")
    return (f"4-bit layers ran dequantized in float32 on {cpu_model()}, as in training"
            + ("" if not packed_4bit_available() else
               "; plain transformers + peft on this CPU (AVX512-BF16) takes bitsandbytes' packed bfloat16 kernel "
               f"instead (on MiniLM: {MEASURED_PACKED_DIFFERENCE})"))


def path_ran(model: "torch.nn.Module") -> str:
    """Which path ``model``'s 4-bit layers took in their last no-grad forward: bitsandbytes keeps a packed
    layer packed until its state dict is taken, and marks it in the layer's quant state."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            return PACKED_BF16
    return DEQUANTIZED


def path_for(bits: "int | None", device: str, packed_allowed: bool) -> "str | None":
    """The 4-bit path a model quantized to ``bits`` on ``device`` takes; None where the question does not arise."""
    if bits != 4 or device != "cpu":
        return None
    return inference_path(packed_allowed)


class _KernelHubNotice(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning, and only it.

    bitsandbytes logs it at import on every AVX512-BF16 CPU without the optional ``kernels`` package (which would
    fetch a kernel from the hub at run time, impossible offline). Nothing has failed: bitsandbytes then uses
    its own built-in packed bfloat16 kernel, the path :func:`describe_path` names. A user cannot act on it, and
    it was the first line of every peftkit command on such a CPU.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def silence_kernel_hub_notice() -> None:
    """Install the filter on bitsandbytes' CPU-ops logger (before or after bitsandbytes is imported)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _KernelHubNotice) for f in logger.filters):
        logger.addFilter(_KernelHubNotice())
