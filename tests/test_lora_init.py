"""issue 14's levers: ``adapter.init`` (peft's default, gaussian, LoftQ on a 4-bit base) and LoRA+
(``adapter.loraplus_lr_ratio``), each checked by the numbers it must change, on the tiny BERT."""

from __future__ import annotations

import pytest
import torch

from peftkit.config.recipe import build_recipe
from peftkit.core.build import build_model, plan_run
from peftkit.errors import RecipeError
from peftkit.train.trainer import build_optimizer as _optimizer
from peftkit.train.training import train
from tests.conftest import make_recipe


def _recipe(tiny_dir, tmp_path, quant="4bit", **adapter):
    data = make_recipe(tiny_dir, tmp_path, quant=quant)
    data["adapter"].update(adapter)
    return data


def _built(tiny_dir, tmp_path, quant="4bit", **adapter):
    plan = plan_run(build_recipe(_recipe(tiny_dir, tmp_path, quant, **adapter)))
    torch.manual_seed(0)
    return plan, build_model(plan, torch.device("cpu"))


def _last_hidden(plan, model) -> torch.Tensor:
    """The encoder's last hidden states on 16 eval rows: the base with its adapter, the head left out."""
    batch = plan.task.collate([plan.eval_rows[i] for i in range(16)], plan.tokenizer)
    model.eval()
    with torch.no_grad():
        return model(**plan.task.model_inputs(batch), output_hidden_states=True).hidden_states[-1]


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_loftq_brings_the_4bit_model_closer_to_float32_at_step_0(tiny_dir, tmp_path):
    # rank 16 of the tiny model's 64 dimensions, alpha 2 r as peftkit's default: measured 0.45 % -> 0.28 %
    adapter = {"r": 16, "lora_alpha": 32}
    plan, fp32 = _built(tiny_dir, tmp_path, "fp32", **adapter)
    reference = _last_hidden(plan, fp32.model)
    default = _relative(_last_hidden(plan, _built(tiny_dir, tmp_path, **adapter)[1].model), reference)
    plan4, loftq = _built(tiny_dir, tmp_path, init="loftq", **adapter)
    corrected = _relative(_last_hidden(plan4, loftq.model), reference)
    assert corrected < 0.8 * default, (corrected, default)
    assert loftq.provenance["loftq_layers"] == 13  # 2 layers x 6 linear layers + the pooler

    # each layer adds the best rank-16 approximation of its own rounding error, computed here independently
    from peft.utils.integrations import dequantize_module_weight

    floats = _lora_layers(fp32.model)
    for name, layer in _lora_layers(loftq.model).items():
        error = floats[name].get_base_layer().weight - dequantize_module_weight(layer.get_base_layer()).float()
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        best = u[:, :16] @ torch.diag(s[:16]) @ vh[:16]
        added = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert torch.allclose(added, best, atol=1e-6), name
        assert added.norm() > 0.2 * error.norm()  # the adapter's starting output is not zero


def test_loftq_without_the_scaling_correction_gains_nothing():
    """Why peftkit divides peft's LoftQ factors by sqrt(alpha / r) (peft issue #1982): added at scale 2, the
    rank-r correction leaves an error of exactly the norm of the rounding error."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    torch.manual_seed(0)
    error = torch.randn(64, 64)
    low = _low_rank_decomposition(error, reduced_rank=8)
    correction = low["L"] @ low["R"]
    assert torch.allclose((error - 2 * correction).norm(), error.norm(), rtol=1e-5)
    assert (error - correction).norm() < 0.95 * error.norm()


def test_gaussian_init_draws_a_from_peft_normal_and_leaves_the_output_unchanged(tiny_dir, tmp_path):
    r = 4
    plan, default = _built(tiny_dir, tmp_path, r=r)
    _, gaussian = _built(tiny_dir, tmp_path, init="gaussian", r=r)
    a = {init: torch.cat([m.lora_A["default"].weight.detach().flatten() for m in _lora_layers(built.model).values()])
         for init, built in (("default", default), ("gaussian", gaussian))}
    # peft: gaussian A ~ N(0, (1/r)^2); default A Kaiming-uniform on [-1/sqrt(64), 1/sqrt(64)] (std 0.072)
    assert float(a["gaussian"].std()) == pytest.approx(1 / r, rel=0.05)
    assert float(a["default"].abs().max()) <= 0.125 < float(a["gaussian"].abs().max())
    for layer in _lora_layers(gaussian.model).values():
        assert not layer.lora_B["default"].weight.any()
    # B = 0: the adapter adds nothing, bit for bit
    assert torch.equal(_last_hidden(plan, gaussian.model), _last_hidden(plan, default.model))
    assert gaussian.model.peft_config["default"].init_lora_weights == "gaussian"


@pytest.mark.parametrize("quant, adapter, message", [
    ("fp32", {"init": "loftq"}, "adapter.init: loftq corrects the rounding error of 4-bit weights and a float base "
                                "has none; use init: default, or quantization.bits: 4"),
    ("8bit", {"init": "loftq"}, "adapter.init: loftq needs a 4-bit base (peft's replace_lora_weights_loftq supports "
                                "only bitsandbytes 4-bit layers); use init: default, or quantization.bits: 4"),
    ("4bit", {"init": "loftq", "use_dora": True}, "adapter.init: loftq with use_dora is not supported"),
    ("4bit", {"init": "olora"}, "adapter.init: olora is not supported on a 4-bit base: peft's OLoRA rewrites each "
                                "base weight as W - B A"),
    ("fp32", {"init": "pissa"}, "adapter.init: pissa is not supported on a float base: peft's PiSSA rewrites"),
    ("4bit", {"init": "gaussian", "init_from": "other"}, "adapter.init: gaussian and init_from both set the "
                                                         "adapter's starting weights; drop one of them"),
    ("4bit", {"loraplus_lr_ratio": 0}, "adapter.loraplus_lr_ratio:"),
])
def test_levers_refused_in_one_line_naming_the_key(tiny_dir, tmp_path, quant, adapter, message):
    with pytest.raises(RecipeError) as exc:
        build_recipe(_recipe(tiny_dir, tmp_path, quant, **adapter))
    assert len(exc.value.problems) == 1 and "\n" not in str(exc.value)
    assert exc.value.problems[0].startswith(message), exc.value.problems[0]


def test_loftq_needs_the_bases_safetensors(tiny_dir, tmp_path):
    from peftkit.core.lora_init import loftq_weights_file

    assert loftq_weights_file(tiny_dir / "bert") is None
    assert loftq_weights_file(tmp_path) == (
        f"adapter.init: loftq reads the base's unquantized weights from model.safetensors (or its sharded index), "
        f"and {tmp_path} has neither; use a base stored as safetensors, or init: default")


def _groups(model, optimizer) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("dora", [False, True])
def test_loraplus_puts_b_at_ratio_times_lr_and_the_head_at_head_lr(tiny_dir, tmp_path, dora):
    data = _recipe(tiny_dir, tmp_path, "fp32", loraplus_lr_ratio=16, use_dora=dora)
    data["train"].update(lr=1e-3, head_lr=3e-3)
    recipe = build_recipe(data)
    plan = plan_run(recipe)
    built = build_model(plan, torch.device("cpu"))
    lrs = _groups(built.model, _optimizer(built.model, recipe, built.head_modules))
    assert set(lrs) == {n for n, p in built.model.named_parameters() if p.requires_grad}
    for name, lr in lrs.items():
        if "classifier" in name:
            assert lr == 3e-3, name  # weight and bias, though peft's rule would put the 1-d bias at the ratio
        elif "lora_B" in name or "lora_magnitude_vector" in name:  # peft: "lora_B" in name or ndim == 1
            assert lr == pytest.approx(16e-3), name
        else:
            assert "lora_A" in name and lr == 1e-3, name
    assert any("lora_magnitude_vector" in n for n in lrs) == dora
    # off by default: every adapter matrix at lr
    plain = build_recipe(_recipe(tiny_dir, tmp_path, "fp32"))
    assert {lr for n, lr in _groups(built.model, _optimizer(built.model, plain, built.head_modules)).items()
            if "lora_" in n} == {plain.train.lr}


def test_a_loftq_adapter_loads_in_plain_peft_with_the_same_logits(tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    data = _recipe(tiny_dir, tmp_path, init="loftq")
    data["train"].update(max_steps=2, eval_at_start=False)
    result = train(build_recipe(data), echo=lambda line: None)
    assert result.metadata.recipe.adapter.init == "loftq"  # the stored recipe records the lever

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier"])
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dir / "bert", num_labels=2,
                                                              quantization_config=quant)
    plain = PeftModel.from_pretrained(base, result.adapter_dir)
    for module in plain.modules():  # the 4-bit path peftkit trains on (see peftkit/core/quantized.py)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    plan = plan_run(build_recipe(data))
    batch = plan.task.collate([plan.eval_rows[i] for i in range(16)], plan.tokenizer)
    inputs = plan.task.model_inputs(batch)
    result.model.eval()
    plain.eval()
    with torch.no_grad():
        expected, got = result.model(**inputs).logits, plain(**inputs).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (got - expected).abs().max()
