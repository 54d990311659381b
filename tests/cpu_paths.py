"""The two bitsandbytes CPU paths a 4-bit layer can take, for tests that compare peftkit with plain peft.

A comparison is only exact when both sides run the same path (see :mod:`peftkit.core.cpu_paths`): tests take
``path`` from :data:`PATHS`, put the plain side on it with :func:`put_on_path`, ask peftkit for it with
``packed_inference=(path == PACKED_BF16)``, and say in their assertion message which path ran
(:func:`path_ran`). The packed cases carry the ``packed_cpu_4bit`` marker: skipped, with the missing flag named,
on a CPU without AVX512-BF16.
"""

from __future__ import annotations

import pytest
from torch import nn

from peftkit.core import cpu_paths
from peftkit.core.cpu_paths import DEQUANTIZED, PACKED_BF16, path_ran  # noqa: F401 - tests take it from here
from peftkit.core.quantized import freeze_quantized_layers

PATHS = [DEQUANTIZED, pytest.param(PACKED_BF16, marks=pytest.mark.packed_cpu_4bit)]


def put_on_path(model: nn.Module, path: str) -> nn.Module:
    """A plain transformers/peft model takes the packed path by itself where it can; keep it off otherwise."""
    if path == DEQUANTIZED:
        freeze_quantized_layers(model)
    return model


def packed_skip_reason() -> "str | None":
    """Why this machine skips the packed path's cases (None: it runs them), naming the missing CPU flag."""
    if cpu_paths.packed_4bit_available():
        return None
    return (f"bitsandbytes' packed 4-bit CPU path needs AVX512-BF16; this CPU ({cpu_paths.cpu_model()}) lacks the "
            "avx512_bf16 flag")
