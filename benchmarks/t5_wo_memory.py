"""What keeping T5's feed-forward output ``wo`` in float32 costs in memory on a 4-bit or 8-bit base.

transformers loads T5 with ``_keep_in_fp32_modules = ["wo"]``, and its bitsandbytes quantizers add those modules
to the ones they leave unquantized, so ``wo`` stays a float32 ``nn.Linear`` (T5 v1.1 / FLAN-T5's ``wo`` outputs
overflow half precision, and transformers' own int8 path refuses to quantize it: ``modeling_t5.py``). peftkit
keeps that choice; this script measures its price against a copy whose ``wo`` is quantized too (the class
attribute emptied for the load), on the architectures of t5-small and flan-t5-small built from their published
configurations with random weights (the memory of a layout does not depend on the values; no download needed).

    python3 benchmarks/t5_wo_memory.py            # writes benchmarks/results/t5_wo/memory.md
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import BitsAndBytesConfig, T5Config, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5PreTrainedModel

MIB = 2 ** 20
CONFIGS = {  # the fields of the hub's config.json that shape the weights
    "t5-small": dict(d_model=512, d_ff=2048, d_kv=64, num_layers=6, num_heads=8, vocab_size=32128,
                     feed_forward_proj="relu", tie_word_embeddings=True),
    "flan-t5-small": dict(d_model=512, d_ff=1024, d_kv=64, num_layers=8, num_heads=6, vocab_size=32128,
                          feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
SETUPS = {
    "float32": None,
    "8-bit LLM.int8": BitsAndBytesConfig(load_in_8bit=True),
    "4-bit NF4, double quant": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                  bnb_4bit_use_double_quant=True,
                                                  bnb_4bit_compute_dtype=torch.float32),
}


def footprint(folder: Path, quantization, keep_wo: bool) -> tuple[int, int]:
    """(model bytes, bytes of the wo layers) as loaded."""
    saved = T5PreTrainedModel._keep_in_fp32_modules  # every T5 class (and its T5Stack submodules) inherits it
    T5PreTrainedModel._keep_in_fp32_modules = saved if keep_wo else []
    try:
        model = T5ForConditionalGeneration.from_pretrained(
            folder, dtype=torch.float32, quantization_config=quantization,
            device_map={"": "cpu"} if quantization else None)
    finally:
        T5PreTrainedModel._keep_in_fp32_modules = saved
    wo = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".wo." in n)
    return int(model.get_memory_footprint()), wo


def main() -> None:
    lines = ["| architecture | weights | wo float32 (transformers, peftkit) | wo quantized too | wo's share |",
             "|---|---|---|---|---|"]
    for name, fields in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            T5ForConditionalGeneration(T5Config(**fields)).save_pretrained(tmp)
            for setup, quantization in SETUPS.items():
                kept, wo = footprint(Path(tmp), quantization, keep_wo=True)
                if quantization is None:
                    lines.append(f"| {name} | {setup} | {kept / MIB:.1f} MiB | - | {wo / MIB:.1f} MiB "
                                 f"({100 * wo / kept:.0f} %) |")
                    continue
                quantized, _ = footprint(Path(tmp), quantization, keep_wo=False)
                lines.append(f"| {name} | {setup} | {kept / MIB:.1f} MiB | {quantized / MIB:.1f} MiB | "
                             f"{wo / MIB:.1f} MiB ({100 * wo / kept:.0f} %) |")
    out = Path(__file__).parent / "results" / "t5_wo" / "memory.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
