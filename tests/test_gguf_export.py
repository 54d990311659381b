"""GGUF export for llama.cpp: the file follows llama.cpp's adapter rules, and the update llama.cpp applies from it
(read here independently: gguf's reader, transformers' own un-permutation of Q/K, llama.cpp's alpha / r) is the
update the adapter makes in peft, for LoRA (rsLoRA) and AdaLoRA on 4-bit and float bases; the rest is refused in
one line."""

from __future__ import annotations

import gguf
import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from peftkit.cli import main
from peftkit.config.recipe import build_recipe
from peftkit.errors import PeftkitError
from peftkit.ops.export import GGUF_FILE, export
from peftkit.ops.gguf_export import LoraFactors, gguf_tensors, lora_factors, permute_rows, unpermute_rows
from peftkit.store.loading import load_trained
from peftkit.store.registry import Registry
from peftkit.train.training import train
from tests import tiny
from tests.conftest import make_recipe

HEADS, KV_HEADS = 4, 2  # grouped-query attention: Q and K rows are permuted by different head counts


def _gqa_llama(folder):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=4, bos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny.build_tokenizer(folder, chat_template=True)
    return folder


@pytest.fixture(scope="module")
def registries(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    base = {"model": str(_gqa_llama(root / "llama-gqa"))}
    runs = {
        "lora4": dict(task="causal_lm", quant="4bit", adapter="lora", base=base,
                      adapter_overrides={"use_rslora": True}),
        "ada": dict(task="causal_lm", quant="fp32", adapter="adalora", base=base, adapter_overrides={}),
        "cls": dict(task="classification", quant="fp32", adapter="lora", adapter_overrides={}),
    }
    out = {}
    for name, run in runs.items():
        extra = run.pop("adapter_overrides")
        data = make_recipe(tiny_dir, root / name, **run, train={"max_steps": 6, "eval_at_start": False, "lr": 3e-2},
                           output={"name": name})
        data["adapter"].update(extra)
        out[name] = Registry(train(build_recipe(data), echo=lambda line: None).adapter_dir.parent)
    return out


def _llama_cpp_updates(path, config):
    """GGUF tensor name -> the weight update llama.cpp adds (alpha / r * B @ A, r from lora_b), in transformers'
    row order (transformers' GGUF loader un-permutes Q and K), checking llama.cpp's shape rules on the way."""
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f.contents() for f in reader.fields.values()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    alpha = fields["adapter.lora.alpha"]
    tensors = {t.name: t for t in reader.tensors}
    processor = LlamaTensorProcessor(config={"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    updates = {}
    for name in {n.rsplit(".", 1)[0] for n in tensors}:  # blk.0.attn_q.weight
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        assert a.shape[1] == b.shape[0], name  # ggml order: a is [in, r], b is [r, out]
        B = processor.process(b.data.copy(), name).weights
        updates[name] = alpha / b.shape[0] * torch.from_numpy(B) @ torch.from_numpy(a.data.copy())
    return updates


def _peft_updates(registry, name):
    loaded = load_trained(registry.folder(name))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    updates = {}
    for path, module in loaded.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            plain = path.removeprefix("base_model.model.")
            updates[f"{names.get_name(plain)}.weight"] = module.get_delta_weight("default").float()
    return updates


@pytest.mark.parametrize("name", ["lora4", "ada"])
def test_llama_cpp_applies_the_adapters_own_update(registries, name, tmp_path):
    registry = registries[name]
    result = export(registry, name, "gguf", tmp_path / "out", check_rows=4)
    config = LlamaConfig.from_pretrained(load_trained(registry.folder(name)).recipe.base.model)
    got = _llama_cpp_updates(tmp_path / "out" / GGUF_FILE, config)
    expected = {k: v for k, v in _peft_updates(registry, name).items() if v.abs().max() > 0}
    assert set(got) == set(expected) and len(got) >= 10  # AdaLoRA: the modules it pruned to rank 0 are left out
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)
    # the export's own check: the file's updates on the plain base against peftkit's adapter, on sample rows
    assert result["check"]["rows"] == 4 and result["check"]["max_rel_diff"] < 1e-3
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: gguf" in card and f"--lora {tmp_path / 'out' / GGUF_FILE}" in card


def test_permutation_is_llama_cpps_and_transformers_undoes_it():
    B = torch.randn(KV_HEADS * 16, 3)
    permuted = permute_rows(B, KV_HEADS)
    assert not torch.equal(permuted, B)
    processor = LlamaTensorProcessor(config={"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    back = processor.process(permuted.numpy(), "blk.0.attn_k.weight").weights
    assert torch.equal(torch.from_numpy(back), B) and torch.equal(unpermute_rows(permuted, KV_HEADS), B)


def test_per_module_ranks_and_alphas_are_folded_into_lora_b():
    """One file-wide alpha, yet every module keeps its scale: rank_pattern, alpha_pattern and rsLoRA."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2)
    prefix = "base_model.model.model.layers.0."
    weights = {f"{prefix}mlp.up_proj.lora_A.weight": torch.randn(2, 64),
               f"{prefix}mlp.up_proj.lora_B.weight": torch.randn(128, 2),
               f"{prefix}mlp.down_proj.lora_A.weight": torch.randn(8, 128),
               f"{prefix}mlp.down_proj.lora_B.weight": torch.randn(64, 8)}
    for rslora in (False, True):
        peft_config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"up_proj": 2}, "alpha_pattern": {"up_proj": 6},
                       "use_rslora": rslora}
        factors = lora_factors(weights, peft_config)
        root = (lambda r: r ** 0.5) if rslora else (lambda r: r)
        assert factors["model.layers.0.mlp.up_proj"].scale == pytest.approx(6 / root(2))
        assert factors["model.layers.0.mlp.down_proj"].scale == pytest.approx(16 / root(8))
        tensors = gguf_tensors(factors, config, alpha=16.0)
        for module, gguf_name in [("mlp.up_proj", "blk.0.ffn_up"), ("mlp.down_proj", "blk.0.ffn_down")]:
            f: LoraFactors = factors[f"model.layers.0.{module}"]
            A, B = tensors[f"{gguf_name}.weight.lora_a"], tensors[f"{gguf_name}.weight.lora_b"]
            torch.testing.assert_close(16.0 / B.shape[1] * B @ A, f.scale * f.B @ f.A)


def test_adapters_llama_cpp_cannot_hold_are_refused_in_one_line(registries, tmp_path):
    with pytest.raises(PeftkitError, match=r"--format gguf: cls is a classification adapter") as caught:
        export(registries["cls"], "cls", "gguf", tmp_path / "cls")
    assert "\n" not in str(caught.value) and not (tmp_path / "cls").exists()
    result = CliRunner().invoke(main, ["export", "cls", "--format", "gguf", "--out", str(tmp_path / "x"),
                                       "--registry", str(registries["cls"].root)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and "causal_lm" in result.output
