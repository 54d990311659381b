"""AdaLoRA driven for the user: schedule, per-step reallocation, orthogonal regularization, final ranks.

AdaLoRA (Zhang et al., ICLR 2023) writes each update as ``W + P diag(lambda) Q * alpha / r`` and prunes the
singular values ``lambda`` to a shrinking budget by an importance score made from ``|w * grad|``. peft holds
the maths (``peft.tuners.adalora``) but leaves the driving to the user: computing ``total_step``, calling
``update_and_allocate`` once per optimizer step while the gradients are still there, and adding the
orthogonal regularization ``R = mean over A, B of ||A A^T - I||_F`` (or ``||B^T B - I||_F``) to the loss,
which peft only does when the model computes its own loss. :class:`AdaLoraDriver` does all three.

Why peftkit's defaults differ from LoRA's (measured on MiniLM / SST-2, dev accuracy; the hand-written runs
are ``benchmarks/baseline_hf.py --peer naive``, 4,000 rows, one epoch, lr 5e-4, the same 37 modules):

* Written by hand with peft + ``Trainer`` at peft's defaults (P, Q ~ N(0, 0.02), lambda = 0,
  ``orth_reg_weight`` 0.5), AdaLoRA stays at chance: 50.9 %, where LoRA reaches 82.2 %. The gradient clip is
  not the cause (50.9 % without clipping too); the regularizer is: with ``orth_reg_weight`` 0 the same run
  reaches 78.0 %. At that init ``||A A^T - I||`` is about sqrt(r) per matrix, so the regularizer's gradient
  dominates A and B for the whole run, and the eval loss stays at ln 2 (peftkit's own loop with peft's init and
  weight 0.5 stays at chance as well). Why that is fatal here: MiniLM's pooled output hardly varies between
  sentences (std 0.035 across a batch; sentence-transformers never trained its pooler), so the head cannot
  separate the classes until the adapters reshape the features. Adam normalizes each parameter's step, so A and
  B follow the regularizer's direction, not the task's, while lambda (from zero) stays near 0.02 after 60
  steps: the features, and the logits (about 0.05), barely move.
* An AdaLoRA update is a product of three factors, one of them a scalar per rank: under Adam, which moves
  every parameter by about the learning rate, lambda grows more slowly than a LoRA ``B`` column.

So peftkit starts P and Q orthonormal (:func:`orthogonal_init`: the regularizer is zero at step 0 and the
adapter's first output is still exactly zero since lambda is), keeps a light regularizer (0.1) in the paper's
squared form, uses alpha 128 and trains the adapter at twice ``train.lr``. It also adds the regularizer's
gradient after the task gradient is clipped, so the clip measures the task alone. On 8,000 rows (rank 12 -> 8
against LoRA r=8, float32 base): peft's init with alpha 32 and a light regularizer reached 81.5 % (seed 42);
these defaults reached 82.6, 83.8 and 84.1 % (seeds 42, 1, 2) with the unsquared regularizer and 83.5, 83.8 %
(seeds 42, 1) squared, where LoRA reaches 84.5, 84.8 and 83.8 %.

Short runs (issue 14; benchmarks/results/adalora-short-run/): with the unsquared regularizer, 64 steps on 500
SST-2 rows stayed at chance (see :func:`orthogonal_regularization`); squared, 76.5 / 75.0 %. At 128 steps both
forms land at 75.5-76.6 % (seed 42) where LoRA reaches 79.5 %, and no single knob closes that gap: 4x or 8x the
adapter's learning rate, alpha 512 or 1024, dropout 0.05, peft's init, no pruning (target_r 11), or a LoRA-like
start (P = 0, lambda = 0.1) all give 75.5-77.4 %. That gap turned out to be seed noise (3 seeds at 500 rows:
AdaLoRA 78.2 %, LoRA 78.1 %); the real one, 2.3 points at 250 rows, was dropout: AdaLoRA had none, LoRA 0.05.
With LoRA's 0.05 (now the default) AdaLoRA reaches 75.9 % on 250 rows (LoRA 75.9) and 83.6 % on 4,000 (LoRA 83.6).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import torch

from ..config.recipe import AdaLoraSection
from ..errors import PeftkitError


def phase_steps(value: Union[int, float], total: int) -> int:
    return value if isinstance(value, int) else int(round(value * total))


def resolve_schedule(section: AdaLoraSection, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) in optimizer steps; raises if no step is left for pruning."""
    tinit = phase_steps(section.warmup, total_steps)
    tfinal = phase_steps(section.final, total_steps)
    if tinit + tfinal >= total_steps:
        raise PeftkitError(
            f"adapter.warmup/final: the AdaLoRA schedule ({tinit} warm-up + {tfinal} final steps) leaves no "
            f"step to prune ranks in a run of {total_steps} optimizer steps; lower adapter.warmup or "
            "adapter.final, or train longer (train.epochs, more data, smaller train.batch_size)"
        )
    return tinit, tfinal


def orthogonal_regularization(model: torch.nn.Module, adapter_name: str = "default",
                              form: str = "squared") -> torch.Tensor:
    """The mean over the adapter's AdaLoRA matrices of ``||A A^T - I||_F^2`` and ``||B^T B - I||_F^2``.

    ``form="squared"`` is the paper's regularizer (Zhang et al. 2023, eq. 4); ``form="norm"`` is peft's and the
    authors' code's, the unsquared norm. The unsquared norm is why AdaLoRA stayed at chance on short runs
    (64 steps on 500 SST-2 rows: 55.0 / 52.0 / 56.0 % with it at weight 0.1, 76.5 / 75.0 % squared, 76.0 / 76.5
    % with no regularizer; benchmarks/results/adalora-short-run/): its gradient ``2 (C - I) A / ||C - I||_F``
    has the same length however close A is to orthonormal, and points nowhere in particular once it is
    close. peftkit starts P and Q exactly orthonormal (:func:`orthogonal_init`), where that gradient is at its
    cusp, and Adam, which scales each entry's step to about the learning rate whatever the gradient's size,
    turns it into learning-rate-sized noise on every entry of P and Q while the task gradient on them is
    still small (it is proportional to lambda, which starts at zero). On a long run lambda grows and the
    task gradient wins, which is why 0.1 looked harmless at 8,000 rows. The squared form's gradient
    ``4 (C - I) A`` vanishes at orthonormality and grows with the drift, so it only pulls when there is
    something to pull back: 83.5 % at 8,000 rows (seed 42) against 82.6 % unsquared.
    """
    if form not in ("squared", "norm"):
        raise ValueError(f"form must be 'squared' or 'norm', not {form!r}")
    total = None
    count = 0
    for name, p in model.named_parameters():
        if not p.requires_grad or not name.endswith((f"lora_A.{adapter_name}", f"lora_B.{adapter_name}")):
            continue
        cov = p @ p.T if ".lora_A." in name else p.T @ p
        eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
        # squared without a square root: its gradient at exactly orthonormal matrices is 0, not nan
        term = (cov - eye).square().sum() if form == "squared" else torch.linalg.matrix_norm(cov - eye, ord="fro")
        total = term if total is None else total + term
        count += 1
    if total is None:
        return torch.zeros((), device=next(model.parameters()).device)
    return total / count


def final_ranks(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """Module name -> ranks kept by AdaLoRA's mask (all of ``init_r`` before the first pruning).

    Read from peft's ``rank_pattern`` (one bool per singular value) rather than from non-zero ``lambda``:
    ``lambda`` starts at zero, so counting non-zeros would report rank 0 for modules nothing pruned.
    """
    config = getattr(model, "peft_config", {}).get(adapter_name)
    pattern = getattr(config, "rank_pattern", None) or {}
    ranks = {}
    suffix = f".lora_E.{adapter_name}"
    for name, p in model.named_parameters():
        if name.endswith(suffix):
            module = name[: -len(suffix)].removeprefix("base_model.").removeprefix("model.")
            # peft keys the pattern with the adapter name in memory and without it once saved
            mask = pattern.get(f"{module}.lora_E.{adapter_name}", pattern.get(f"{module}.lora_E"))
            ranks[module] = int(sum(bool(x) for x in mask)) if mask is not None else p.shape[0]
    return ranks


def orthogonal_init(model: torch.nn.Module, adapter_name: str = "default") -> int:
    """Re-initialise every AdaLoRA ``P`` (lora_B) and ``Q`` (lora_A) with orthonormal columns / rows.

    AdaLoRA's update ``P diag(lambda) Q`` is an SVD only when P and Q are orthonormal; the regularizer pulls
    them there. Starting there makes the regularizer zero at step 0 instead of about ``sqrt(r)`` per matrix,
    and gives each singular value a unit-scale direction, so ``lambda`` (still zero: the adapter's first
    output is still exactly the base's) learns at LoRA's pace. Returns the number of matrices set.
    """
    count = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((f"lora_A.{adapter_name}", f"lora_B.{adapter_name}")) and p.numel() > 0:
                torch.nn.init.orthogonal_(p)
                count += 1
    return count


@dataclass
class AdaLoraDriver:
    """Calls peft's allocator once per optimizer step and keeps the budget history."""

    tuner: Any  # peft's AdaLoraModel (``peft_model.base_model``)
    target_budget: int
    adapter_name: str = "default"
    reallocations: int = 0
    budget_history: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def for_model(cls, peft_model: Any, section: AdaLoraSection) -> "AdaLoraDriver":
        n_modules = len(final_ranks(peft_model))
        return cls(tuner=peft_model.base_model, target_budget=n_modules * section.target_r)

    def after_optimizer_step(self, step: int) -> int:
        """Reallocate ranks for optimizer step ``step`` (1-based); call before ``zero_grad``. Returns the budget."""
        self.tuner.update_and_allocate(step)
        self.reallocations += 1
        budget = sum(final_ranks(self.tuner, self.adapter_name).values())
        self.budget_history.append((step, budget))
        return budget

    def allocator_state(self) -> dict[str, Any]:
        allocator = self.tuner.rankallocator
        return {
            "ipt": dict(allocator.ipt),
            "exp_avg_ipt": dict(allocator.exp_avg_ipt),
            "exp_avg_unc": dict(allocator.exp_avg_unc),
            "reallocations": self.reallocations,
            "budget_history": list(self.budget_history),
            "rank_pattern": self.tuner.peft_config[self.adapter_name].rank_pattern,
        }

    def load_allocator_state(self, state: dict[str, Any]) -> None:
        allocator = self.tuner.rankallocator
        allocator.ipt = dict(state["ipt"])
        allocator.exp_avg_ipt = dict(state["exp_avg_ipt"])
        allocator.exp_avg_unc = dict(state["exp_avg_unc"])
        self.reallocations = state["reallocations"]
        self.budget_history = [tuple(x) for x in state["budget_history"]]
        self.tuner.peft_config[self.adapter_name].rank_pattern = state["rank_pattern"]
