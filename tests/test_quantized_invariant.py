"""A 4-bit base must train the same after an evaluation pass, and evaluation must not touch its weights.

bitsandbytes repacks 4-bit weights for CPU inference in eval mode on CPUs with AVX512-BF16, and casts biases
in place to the compute dtype (see peftkit/core/quantized.py). This machine may lack AVX512-BF16, so the tests
make bitsandbytes believe it has it: the repacking kernel runs either way.
"""

from __future__ import annotations

import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch

from peftkit.config.recipe import build_recipe
from peftkit.core.build import build_model, plan_run
from peftkit.train.training import train

QUANT_BF16 = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def _built(recipe_for, task):
    recipe = build_recipe(recipe_for(task=task, quantization=QUANT_BF16, adapter="lora",
                                     train={"batch_size": 8, "eval_at_start": False}))
    plan = plan_run(recipe)
    torch.manual_seed(0)
    return plan, build_model(plan, torch.device("cpu")).model


def _grads(plan, model):
    rows = [plan.train_rows[i] for i in range(8)]
    batch = plan.task.collate(rows, plan.tokenizer)
    model.train()
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout masks for both models
    plan.task.loss(model(**plan.task.model_inputs(batch)), batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _eval_pass(plan, model):
    rows = [plan.eval_rows[i] for i in range(min(8, len(plan.eval_rows)))]
    batch = plan.task.collate(rows, plan.tokenizer)
    model.eval()
    with torch.no_grad():
        model(**plan.task.model_inputs(batch))


def _frozen_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and "modules_to_save" not in k}


@pytest.mark.parametrize("task", ["classification", "causal_lm"])  # BERT layers have biases, Llama's none
def test_step_after_eval_has_the_same_gradients(recipe_for, avx512bf16_cpu, task):
    plan, never_evaluated = _built(recipe_for, task)
    _, evaluated = _built(recipe_for, task)
    before = _frozen_state(evaluated)

    _eval_pass(plan, evaluated)

    after = _frozen_state(evaluated)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype, f"{key} changed dtype in evaluation"
        assert torch.equal(before[key], after[key]), f"{key} changed in evaluation"
    expected, got = _grads(plan, never_evaluated), _grads(plan, evaluated)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_bitsandbytes_alone_does_repack_in_eval(recipe_for, avx512bf16_cpu):
    """The failure the guard prevents is real here: without it, one eval pass rewrites 4-bit weights."""
    plan, model = _built(recipe_for, "classification")
    linear4 = [m for m in model.modules() if isinstance(m, bnb_modules.Linear4bit)]
    for module in linear4:
        module.support_avx512bf16_for_cpu = True  # undo peftkit's guard
    _eval_pass(plan, model)
    assert any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linear4)


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_run_with_evaluations_trains_like_one_without(recipe_for, avx512bf16_cpu, task):
    """As a user runs it: evaluating every step, or never in the middle, ends in the same adapter."""
    results = []
    for eval_every in (1, None):
        recipe = build_recipe(recipe_for(
            task=task, quantization=QUANT_BF16, adapter="lora",
            train={"max_steps": 4, "batch_size": 8, "eval_every": eval_every, "eval_at_start": eval_every == 1},
            output={"name": f"run-{eval_every}"},
        ))
        results.append(train(recipe, echo=lambda line: None))
    evaluated, plain = ({n: p.detach() for n, p in r.model.named_parameters() if p.requires_grad} for r in results)
    assert len(results[0].metadata.history) == 5 and len(results[1].metadata.history) == 1
    for name in plain:
        assert torch.equal(evaluated[name], plain[name]), name
    assert results[0].metrics == results[1].metrics
