"""bitsandbytes' two CPU paths for 4-bit layers (peftkit/core/cpu_paths.py): which one runs, what each costs in
precision, and that peftkit's own output does not open with bitsandbytes' kernel-hub notice."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from peftkit.core import cpu_paths
from peftkit.core.cpu_paths import (BF16_UNIT_ROUNDOFF, DEQUANTIZED, PACKED_BF16, describe_path, inference_path,
                                    packed_4bit_available, silence_kernel_hub_notice)
from peftkit.core.quantized import freeze_quantized_layers
from tests.cpu_paths import path_ran

NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install kernels`"


def _four_bit_bert(tiny_dir):
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(
        tiny_dir / "bert", num_labels=2, device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier"])).eval()


def _logits(model, n=16):
    torch.manual_seed(3)
    ids = torch.randint(5, 100, (n, 12))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _saved(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_dequantized_path_never_packs(tiny_dir):
    """peftkit's default (training, and everything that measures against training) on every CPU."""
    model = _four_bit_bert(tiny_dir)
    freeze_quantized_layers(model)
    before = _saved(model)
    _logits(model)
    assert path_ran(model) == DEQUANTIZED
    after = _saved(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.packed_cpu_4bit
def test_packed_path_runs_within_bfloat16_rounding_and_unpacks_when_saved(tiny_dir):
    exact, packed = _four_bit_bert(tiny_dir), _four_bit_bert(tiny_dir)
    freeze_quantized_layers(exact)
    freeze_quantized_layers(packed, packed_inference=True)
    before = _saved(packed)
    reference, got = _logits(exact), _logits(packed)
    assert (path_ran(exact), path_ran(packed)) == (DEQUANTIZED, PACKED_BF16)
    # Each 4-bit layer on the packed path rounds its input and its block scales to bfloat16 and returns a
    # bfloat16 result: at most ~3 roundings of 2**-9 each, compounding over at most every 4-bit layer in turn.
    layers = sum(1 for m in packed.modules() if hasattr(m, "support_avx512bf16_for_cpu"))
    bound = 3 * layers * BF16_UNIT_ROUNDOFF
    relative = float((got - reference).abs().max() / reference.abs().max())
    assert 0 < relative < bound, f"packed-bf16 against dequantized: {relative:.2e} (bound {bound:.2e})"
    # bitsandbytes unpacks when the state dict is taken: the 4-bit codes come back byte for byte, but the
    # double-quantized block scales are re-quantized on the way (so peftkit never saves or merges such a model)
    after = _saved(packed)
    assert before.keys() == after.keys()
    weights = [k for k in before if k.endswith(".weight")]
    assert weights and all(torch.equal(before[k], after[k]) for k in weights)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith(".absmax"))


def test_paths_are_named_for_users():
    assert inference_path(packed_allowed=False) == DEQUANTIZED
    assert inference_path(packed_allowed=True) == (PACKED_BF16 if packed_4bit_available() else DEQUANTIZED)
    assert "packed bfloat16" in describe_path(PACKED_BF16) and "max relative logit difference" in describe_path(
        PACKED_BF16)
    assert describe_path(DEQUANTIZED).startswith("4-bit layers ran dequantized in float32")


def test_kernel_hub_notice_is_dropped_and_other_warnings_are_kept(caplog):
    silence_kernel_hub_notice()
    silence_kernel_hub_notice()  # idempotent: one filter
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(NOTICE, "No module named 'kernels'")
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]


def test_importing_peftkit_then_bitsandbytes_prints_no_notice():
    """The notice is logged when bitsandbytes' CPU backend is imported, on CPUs with AVX512-BF16."""
    code = "import peftkit, bitsandbytes, bitsandbytes.backends.cpu.ops"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "kernels-community" not in run.stderr + run.stdout


def test_only_a_cpu_without_avx512_bf16_skips_the_packed_cases(monkeypatch):
    from tests.cpu_paths import packed_skip_reason

    monkeypatch.setattr(cpu_paths, "packed_4bit_available", lambda: True)
    assert packed_skip_reason() is None
    monkeypatch.setattr(cpu_paths, "packed_4bit_available", lambda: False)
    monkeypatch.setattr(cpu_paths, "cpu_model", lambda: "Old CPU 9000")
    assert packed_skip_reason() == ("bitsandbytes' packed 4-bit CPU path needs AVX512-BF16; this CPU (Old CPU 9000) "
                                    "lacks the avx512_bf16 flag")
