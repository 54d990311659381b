"""AdaLoRA driven by peftkit: schedule, one reallocation per optimizer step, final budget, regularization."""

from __future__ import annotations

import pytest
import torch

from peftkit.config.recipe import AdaLoraSection, build_recipe
from peftkit.core import adalora
from peftkit.core.build import build_model, plan_run
from peftkit.errors import PeftkitError
from peftkit.train.training import train

QUIET = {"echo": lambda line: None}


@pytest.mark.parametrize("grad_accum", [1, 4])
def test_reallocates_once_per_optimizer_step_and_meets_the_budget(recipe_for, grad_accum, monkeypatch):
    calls = []
    original = adalora.AdaLoraDriver.after_optimizer_step

    def counting(self, step):
        calls.append(step)
        return original(self, step)

    monkeypatch.setattr(adalora.AdaLoraDriver, "after_optimizer_step", counting)
    recipe = build_recipe(recipe_for(adapter="adalora", data={"max_train_samples": 128},
                                     train={"batch_size": 8, "grad_accum": grad_accum, "epochs": 2,
                                            "eval_at_start": False}))
    result = train(recipe, **QUIET)

    steps = result.metadata.training.optimizer_steps
    assert steps == -(-(128 // 8) // grad_accum) * 2  # 128 rows, batches of 8, two epochs
    assert calls == list(range(1, steps + 1))
    info = result.metadata.adapter.adalora
    assert info.reallocations == steps
    n_modules = len(info.final_ranks)
    assert info.target_budget == n_modules * 3
    assert info.final_budget == info.target_budget == sum(adalora.final_ranks(result.model).values())
    assert info.budget_history[0][1] == n_modules * 6  # nothing pruned in the warm-up
    assert max(info.final_ranks.values()) <= 6


def test_orthogonal_regularization_matches_peft(recipe_for):
    """peft adds the same term to ``outputs.loss`` when the model computes its loss; ours must agree."""
    recipe = build_recipe(recipe_for(adapter="adalora"))
    plan = plan_run(recipe)
    model = build_model(plan, torch.device("cpu")).model
    with torch.no_grad():  # move A and B away from their near-zero init so the term is not trivial
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0, 0.3)
    rows = [plan.train_rows[i] for i in range(4)]
    batch = plan.task.collate(rows, plan.tokenizer)
    model.train()
    torch.manual_seed(0)
    with_peft = model(**batch)  # labels included: peft adds orth_reg_weight * R to the loss
    torch.manual_seed(0)
    task_loss = plan.task.loss(model(**plan.task.model_inputs(batch)), batch)
    ours = recipe.adapter.orth_reg_weight * adalora.orthogonal_regularization(model, form="norm")
    assert float(ours) > 0.01
    torch.testing.assert_close(with_peft.loss, task_loss + ours, rtol=1e-5, atol=1e-6)


def test_squared_regularizer_does_not_push_orthonormal_matrices_and_peft_form_does(recipe_for):
    """The root cause of AdaLoRA at chance on short runs (peftkit.core.adalora.orthogonal_regularization): at the
    orthonormal start, peft's unsquared norm still has a gradient of fixed length; the paper's squared one has
    none, and pulls back in proportion to the drift."""
    recipe = build_recipe(recipe_for(adapter="adalora"))
    assert recipe.adapter.orth_reg_form == "squared"
    model = build_model(plan_run(recipe), torch.device("cpu")).model
    matrices = [p for n, p in model.named_parameters() if ("lora_A" in n or "lora_B" in n) and p.requires_grad]

    def gradient_norm(form: str) -> float:
        model.zero_grad()
        adalora.orthogonal_regularization(model, form=form).backward()
        return float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in matrices])))

    assert gradient_norm("squared") < 1e-5
    at_start = gradient_norm("norm")
    assert at_start > 0.05  # about 2 / sqrt(matrices): the same however small the drift
    with torch.no_grad():
        drift = [torch.randn_like(p) for p in matrices]
        for p, d in zip(matrices, drift):
            p.add_(1e-3 * d)
    small = gradient_norm("squared")
    with torch.no_grad():
        for p, d in zip(matrices, drift):
            p.add_(9e-3 * d)
    assert 5 < gradient_norm("squared") / small < 20  # ten times the drift, about ten times the pull
    assert 0.5 < gradient_norm("norm") / at_start < 2
    with pytest.raises(ValueError, match="form must be"):
        adalora.orthogonal_regularization(model, form="frobenius")


def test_orthogonal_regularization_reaches_a_classification_head_run(recipe_for):
    """The classifier computes its own loss (peft never sees labels); the term must still train A and B."""
    def final_regularization(weight: float) -> float:
        data = recipe_for(adapter="adalora", train={"eval_at_start": False, "lr": 2e-2},
                          output={"name": f"orth-{weight}"})
        data["adapter"]["orth_reg_weight"] = weight
        result = train(build_recipe(data), **QUIET)
        return float(adalora.orthogonal_regularization(result.model))

    assert final_regularization(1.0) < 0.8 * final_regularization(0.0)


def test_schedule_that_leaves_no_pruning_step_is_refused():
    section = AdaLoraSection(warmup=5, final=5)
    with pytest.raises(PeftkitError, match=r"leaves no step to prune ranks in a run of 10 optimizer steps"):
        adalora.resolve_schedule(section, 10)
    assert adalora.resolve_schedule(AdaLoraSection(warmup=0.1, final=0.3), 100) == (10, 30)


def test_rank_pattern_from_starts_lora_with_adalora_ranks(recipe_for):
    source = train(build_recipe(recipe_for(adapter="adalora", train={"eval_at_start": False, "max_steps": 10},
                                           output={"name": "ranks"})), **QUIET)
    ranks = {m: r for m, r in source.metadata.adapter.adalora.final_ranks.items() if r > 0}
    data = recipe_for(adapter="lora", train={"eval_at_start": False, "max_steps": 2}, output={"name": "reuse"})
    data["adapter"]["rank_pattern_from"] = "ranks"
    result = train(build_recipe(data), **QUIET)

    assert result.metadata.adapter.rank_pattern == ranks
    assert result.metadata.provenance == {"rank_pattern_from": "ranks"}
    shapes = {n: p.shape for n, p in result.model.named_parameters() if "lora_A" in n}
    for module, rank in ranks.items():
        assert shapes[f"base_model.model.{module}.lora_A.default.weight"][0] == rank
    assert len(shapes) == len(ranks)

    data["adapter"]["rank_pattern_from"] = "rnaks"
    data["output"]["name"] = "typo"
    with pytest.raises(PeftkitError, match=r"^adapter.rank_pattern_from: no adapter named 'rnaks' in .*; did you mean ranks\?$"):
        train(build_recipe(data), **QUIET)


@pytest.mark.parametrize("quant", ["fp32", "4bit"])
def test_weights_leave_their_init_within_the_warm_up(recipe_for, quant, monkeypatch):
    """Before the first pruning step (``tinit``) lambda grows from zero and P, Q turn away from orthonormal.

    The allocator ranks singular values by ``|w * grad|``; if lambda were still ~0 at ``tinit`` (issue 14's
    suspect for AdaLoRA at chance on short runs) the first pruning would rank noise. Measured here (train.lr
    1e-3 as the shipped recipes, adapter lr 2e-3, 6 warm-up steps, lr x steps = 0.012): RMS change per module
    lambda 0.0021 to 0.0051, P and Q 0.0006 to 0.0014 (0.5 % of their norm and up), fp32 and NF4 alike; a
    frozen adapter moves 0.
    """
    from tests.test_training import record_initial_adapter

    initial = record_initial_adapter(monkeypatch)
    at_tinit: dict[str, torch.Tensor] = {}
    budgets = []
    original = adalora.AdaLoraDriver.after_optimizer_step

    def snapshot(self, step):
        if step == self.tuner.peft_config["default"].tinit:  # after its optimizer step, before any reallocation
            budgets.append(sum(adalora.final_ranks(self.tuner).values()))
            at_tinit.update({f"base_model.{n}": p.detach().clone() for n, p in self.tuner.named_parameters()
                             if "lora_" in n})
        return original(self, step)

    monkeypatch.setattr(adalora.AdaLoraDriver, "after_optimizer_step", snapshot)
    data = recipe_for(adapter="adalora", quant=quant, train={"max_steps": 8, "eval_at_start": False, "lr": 1e-3},
                      output={"name": "warm-up"})
    data["adapter"].update({"warmup": 6, "final": 1})
    recipe = build_recipe(data)
    result = train(recipe, **QUIET)

    tinit = result.metadata.adapter.adalora.schedule["tinit"]
    n_modules = len(result.metadata.adapter.adalora.final_ranks)
    assert tinit == 6 and budgets == [n_modules * recipe.adapter.init_r]  # nothing pruned yet
    scale = recipe.train.lr * recipe.adapter.lr_scale * tinit  # about the most Adam can move a parameter
    for kind, floor in (("E", 0.05), ("A", 0.02), ("B", 0.02)):
        names = [n for n in initial if f".lora_{kind}." in n]
        assert len(names) == n_modules
        moved = {n: float((at_tinit[n] - initial[n]).pow(2).mean().sqrt()) for n in names}
        still = {n: m for n, m in moved.items() if m < floor * scale}
        assert not still, f"lora_{kind} barely moved in {tinit} warm-up steps (RMS change; lr x steps {scale:g}): " \
                          f"{still}"
    assert all(not initial[n].any() for n in initial if ".lora_E." in n)  # lambda starts at zero
