"""GGUF export of causal-LM LoRA adapters, for llama.cpp (``peftkit export NAME --format gguf``).

llama.cpp loads a LoRA adapter as a GGUF file beside its base model (``llama-cli -m base.gguf --lora a.gguf``):
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and for each adapted weight two
tensors ``blk.N.attn_q.weight.lora_a`` / ``.lora_b`` of numpy shapes (r, in) and (out, r). At run time it adds
``alpha / r * B @ A`` to the weight, ``r`` read from each ``lora_b``. This writes what llama.cpp's own
``convert_lora_to_gguf.py`` writes for a Llama base (tensor names from gguf's tensor map; the rows of Q and K
permuted as llama.cpp's conversion of the base permutes them), and more adapters come out right: that script
takes one ``lora_alpha`` for the whole file, which gives a wrong scale to modules with their own rank or alpha
(``rank_pattern`` / ``alpha_pattern``: AdaLoRA converted to LoRA, pruned adapters) and to rsLoRA's
``alpha / sqrt(r)``. Here each module's true scale is folded into its ``lora_b``, so the file-wide alpha gives
every module its own scale. AdaLoRA is converted to LoRA first (:mod:`peftkit.ops.convert`, exact).

Refused, each in one line: adapters with a task head (llama.cpp has none), DoRA and LoRA biases (no GGUF form),
LoRA on the embeddings or the output layer, and bases that are not Llama-architecture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import PeftkitError

PREFIX = "base_model.model."
ARCHITECTURES = {"llama": "LLAMA"}  # transformers model_type -> gguf.MODEL_ARCH member


@dataclass
class LoraFactors:
    """One adapted linear layer: its update is ``scale * B @ A``."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float


def lora_factors(weights: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, LoraFactors]:
    """Module path (``model.layers.0.self_attn.q_proj``) -> its LoRA factors and scale, from a saved peft LoRA
    adapter; the scale as peft computes it (``rank_pattern``, ``alpha_pattern``, rsLoRA)."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    factors = {}
    for key in sorted(k for k in weights if k.endswith(".lora_A.weight")):
        module = key[len(PREFIX):-len(".lora_A.weight")]
        A, B = weights[key].float(), weights[f"{PREFIX}{module}.lora_B.weight"].float()
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"])
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
        if A.shape[0] != r:
            raise PeftkitError(f"adapter_config.json: {module} has rank {A.shape[0]} but the config gives {r}")
        scale = alpha / r ** 0.5 if config.get("use_rslora") else alpha / r
        factors[module] = LoraFactors(A, B, float(scale))
    return factors


def refusal(name: str, task_type: str, config: dict[str, Any], weights: dict[str, torch.Tensor],
            model_type: str) -> str | None:
    """Why ``name`` cannot become a llama.cpp adapter, in one line; None when it can."""
    if task_type != "causal_lm":
        return (f"{name} is a {task_type} adapter: llama.cpp adapters are for text generation and carry no task "
                "head; export a causal_lm adapter, or use --format peft")
    if model_type not in ARCHITECTURES:
        return (f"{name}'s base is a {model_type!r} model: the GGUF export supports Llama-architecture bases "
                f"({', '.join(ARCHITECTURES)}); use --format peft")
    if config.get("use_dora"):
        return f"{name} is a DoRA adapter: llama.cpp has no DoRA form; train a plain LoRA or use --format peft"
    if config.get("lora_bias"):
        return f"{name} trains LoRA biases: llama.cpp adapters have none; use --format peft"
    others = sorted({k[len(PREFIX):].split(".lora_")[0] for k in weights
                     if not k.endswith((".lora_A.weight", ".lora_B.weight"))})
    if others:
        return (f"{name} adapts {others[0]} in a way llama.cpp adapters cannot hold (trained embeddings or "
                "saved modules); use --format peft")
    return None


def permute_rows(B: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the output rows of a Q or K update as llama.cpp's conversion reorders the base's Q and K weights
    (its rotary embedding pairs dimensions differently from transformers'): ``convert_hf_to_gguf.py``'s
    ``LlamaModel.permute``. Only the rows move, so permuting B permutes ``B @ A``."""
    return B.reshape(heads, 2, B.shape[0] // heads // 2, *B.shape[1:]).swapaxes(1, 2).reshape(B.shape)


def unpermute_rows(B: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_rows` (transformers' GGUF loader undoes the permutation the same way)."""
    return B.reshape(heads, B.shape[0] // heads // 2, 2, *B.shape[1:]).swapaxes(1, 2).reshape(B.shape)


def _heads(module: str, base_config: Any) -> int | None:
    """How many heads the rows of ``module``'s output are permuted by: Q by the attention heads, K by the
    key-value heads (as llama.cpp's conversion), None for the other layers."""
    if module.endswith("self_attn.q_proj"):
        return base_config.num_attention_heads
    if module.endswith("self_attn.k_proj"):
        return getattr(base_config, "num_key_value_heads", None) or base_config.num_attention_heads
    return None


def _tensor_map(base_config: Any) -> Any:
    import gguf

    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[base_config.model_type])
    return arch, gguf.get_tensor_name_map(arch, base_config.num_hidden_layers)


def gguf_tensors(factors: dict[str, LoraFactors], base_config: Any, alpha: float) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor name -> float32 tensor, for a file whose ``adapter.lora.alpha`` is ``alpha``: each
    module's B times ``scale * r / alpha``, so llama.cpp's ``alpha / r`` gives back the module's own scale."""
    _, names = _tensor_map(base_config)
    tensors = {}
    for module, f in factors.items():
        gguf_name = names.get_name(module)
        if gguf_name is None:
            raise PeftkitError(f"{module}: llama.cpp has no tensor for this module of a "
                               f"{base_config.model_type} model; use --format peft")
        B = f.B * (f.scale * f.A.shape[0] / alpha)
        heads = _heads(module, base_config)
        if heads:
            B = permute_rows(B, heads)
        tensors[f"{gguf_name}.weight.lora_a"] = f.A.contiguous()
        tensors[f"{gguf_name}.weight.lora_b"] = B.contiguous()
    return tensors


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], base_config: Any, alpha: float, name: str) -> None:
    import gguf

    arch, _ = _tensor_map(base_config)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name)
    for tensor_name, tensor in tensors.items():
        writer.add_tensor(tensor_name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_deltas(path: Path, base_config: Any) -> dict[str, torch.Tensor]:
    """Module path -> the weight update llama.cpp applies from the GGUF adapter at ``path`` (``alpha / r * B @ A``,
    r read from ``lora_b`` as llama.cpp reads it), in transformers' row order. Checks what llama.cpp checks when
    it loads an adapter: the file type, the architecture, and each pair's shapes against the base weight's."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in reader.fields.values()}

    def value(key: str) -> Any:
        field = fields.get(key)
        if field is None:
            raise PeftkitError(f"{path}: no {key} in the GGUF file")
        return field.contents()

    arch, names = _tensor_map(base_config)
    if value(gguf.Keys.General.TYPE) != "adapter" or value(gguf.Keys.Adapter.TYPE) != "lora":
        raise PeftkitError(f"{path}: not a GGUF LoRA adapter")
    if value(gguf.Keys.General.ARCHITECTURE) != gguf.MODEL_ARCH_NAMES[arch]:
        raise PeftkitError(f"{path}: architecture {value(gguf.Keys.General.ARCHITECTURE)!r} is not the base's")
    alpha = float(value(gguf.Keys.Adapter.LORA_ALPHA))
    tensors = {t.name: torch.from_numpy(t.data.copy()).float().reshape([int(d) for d in reversed(t.shape)])
               for t in reader.tensors}
    modules = {}
    for module, _ in _linear_shapes(base_config):
        gguf_name = names.get_name(module)
        if f"{gguf_name}.weight.lora_a" in tensors:
            modules[module] = gguf_name
    deltas = {}
    shapes = dict(_linear_shapes(base_config))
    for module, gguf_name in modules.items():
        A, B = tensors.pop(f"{gguf_name}.weight.lora_a"), tensors.pop(f"{gguf_name}.weight.lora_b")
        out_features, in_features = shapes[module]
        # llama.cpp's checks, in numpy order: a is (r, in), b is (out, r)
        if A.shape[1] != in_features or B.shape[0] != out_features or A.shape[0] != B.shape[1]:
            raise PeftkitError(f"{path}: {gguf_name} has shapes {tuple(A.shape)} and {tuple(B.shape)}, which "
                               f"llama.cpp refuses for a ({out_features}, {in_features}) weight")
        heads = _heads(module, base_config)
        if heads:
            B = unpermute_rows(B, heads)
        deltas[module] = alpha / B.shape[1] * (B @ A)
    if tensors:
        raise PeftkitError(f"{path}: tensors llama.cpp would not match to the base: {', '.join(sorted(tensors))}")
    return deltas


def _linear_shapes(base_config: Any) -> list[tuple[str, tuple[int, int]]]:
    """(module path, (out, in)) of every linear layer of a Llama decoder that llama.cpp can adapt."""
    hidden, inter = base_config.hidden_size, base_config.intermediate_size
    head_dim = getattr(base_config, "head_dim", None) or hidden // base_config.num_attention_heads
    kv = (getattr(base_config, "num_key_value_heads", None) or base_config.num_attention_heads) * head_dim
    q = base_config.num_attention_heads * head_dim
    layer = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
             "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
             "mlp.down_proj": (hidden, inter)}
    return [(f"model.layers.{i}.{name}", shape) for i in range(base_config.num_hidden_layers)
            for name, shape in layer.items()]


def adapter_as_lora(files: dict[str, bytes], method: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter's weights and peft config as plain LoRA: AdaLoRA is converted exactly (its pruned ranks become
    per-module ranks)."""
    from safetensors.torch import load as load_safetensors

    weights = load_safetensors(files["adapter_model.safetensors"])
    config = json.loads(files["adapter_config.json"])
    if method == "adalora":
        from .convert import convert_weights, lora_config_for

        weights, ranks = convert_weights(weights, config["lora_alpha"], config["init_r"])
        config = lora_config_for(config, ranks)
    return weights, config
