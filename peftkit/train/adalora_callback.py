"""``AdaLoraCallback``: AdaLoRA for any ``transformers.Trainer`` user, with no peftkit recipe.

peft holds AdaLoRA's maths but leaves the driving to the user, and ``Trainer`` does none of it: nothing calls
``update_and_allocate``, so no rank is ever pruned (peft issue #1327), and peft adds its regularizer only inside
``model(**batch, labels=...)``, so a ``compute_loss`` of the user's own (label smoothing, a loss outside the model)
silently drops it. One callback does all of it::

    model = get_peft_model(base, AdaLoraConfig(init_r=12, target_r=8, total_step=1, ...))
    Trainer(model=model, args=args, train_dataset=..., callbacks=[AdaLoraCallback()]).train()

What it does, at the two places Trainer 5.x offers (``on_pre_optimizer_step`` runs after the gradient clip,
``on_optimizer_step`` after ``optimizer.step()`` and before ``zero_grad``):

* the schedule from the Trainer's own step count: ``total_step`` is set to ``state.max_steps`` (so the value given
  to ``AdaLoraConfig`` does not matter), and ``warmup``/``final`` may be fractions of it, as in peftkit's recipes;
* ``update_and_allocate`` once per optimizer step, whatever ``gradient_accumulation_steps`` is;
* the orthogonal regularizer in the paper's squared form (see :func:`peftkit.core.adalora.orthogonal_regularization`
  for why the unsquared one holds short runs at chance), its gradient added after the clip, as peftkit's training
  does, whatever computed the loss. peft's in-loss regularizer is switched off while the callback trains (the
  config's ``orth_reg_weight`` is the callback's weight) and the saved configs say the weight the user gave;
* P and Q start orthonormal (``orthogonal_init``; peft's N(0, 0.02) start left AdaLoRA at chance on SST-2, see
  :mod:`peftkit.core.adalora`), broadcast from the first process so every process starts from the same matrices;
* under DDP the masks are the same on every process: the sensitivities come from the all-reduced gradients, and
  the regularizer's gradient is computed with ``torch.autograd.grad`` (which fires none of DDP's gradient hooks)
  from parameters that are equal everywhere;
* checkpoints carry the allocator (importance EMAs, the rank pattern, the budget history) in
  ``adalora_allocator.pt`` beside Trainer's own files, and ``train(resume_from_checkpoint=...)`` restores it, so a
  resumed run prunes as the uninterrupted one.

DeepSpeed and FSDP shard the parameters the regularizer and the allocator read whole; the callback refuses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import TrainerCallback

from ..core import adalora

ALLOCATOR_FILE = "adalora_allocator.pt"


class AdaLoraCallback(TrainerCallback):
    """Drives a peft AdaLoRA model under ``transformers.Trainer`` (see the module's docstring).

    ``warmup``/``final``: the steps before pruning starts and at the end with ranks fixed, as optimizer steps
    (int) or fractions of the run (float); None keeps the config's ``tinit``/``tfinal``. ``orth_reg_weight``:
    None takes the config's. ``resume_from``: the checkpoint folder a resumed run restarts from, when it is not
    ``output_dir/checkpoint-<step>`` (``resume_from_checkpoint=True`` and a path inside ``output_dir`` need none).
    """

    def __init__(self, *, warmup: Optional[Union[int, float]] = None, final: Optional[Union[int, float]] = None,
                 orth_reg_weight: Optional[float] = None, orth_reg_form: str = "squared",
                 orthogonal_init: bool = True, adapter_name: str = "default",
                 resume_from: Optional[Union[str, Path]] = None):
        if orth_reg_form not in ("squared", "norm"):
            raise ValueError(f"AdaLoraCallback: orth_reg_form must be 'squared' or 'norm', not {orth_reg_form!r}")
        if orth_reg_weight is not None and orth_reg_weight < 0:
            raise ValueError(f"AdaLoraCallback: orth_reg_weight must be >= 0, not {orth_reg_weight}")
        self.warmup, self.final = warmup, final
        self.orth_reg_weight, self.orth_reg_form = orth_reg_weight, orth_reg_form
        self.orthogonal_init, self.adapter_name = orthogonal_init, adapter_name
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.driver: Optional[adalora.AdaLoraDriver] = None
        self._config: Any = None
        self._weight = 0.0
        self._configured_weight = 0.0

    # ---- Trainer events -------------------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        tuner = self._adalora_tuner(model)
        # args.deepspeed_plugin: DeepSpeed started by `accelerate launch`, with no args.deepspeed
        if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) or getattr(args, "fsdp", None):
            raise ValueError("AdaLoraCallback: DeepSpeed and FSDP shard the AdaLoRA matrices that the allocator and "
                             "the regularizer read whole; train AdaLoRA with DDP or one process")
        config = tuner.peft_config[self.adapter_name]
        total = int(state.max_steps)
        config.total_step = total
        if self.warmup is not None:
            config.tinit = adalora.phase_steps(self.warmup, total)
        if self.final is not None:
            config.tfinal = adalora.phase_steps(self.final, total)
        if config.tinit + config.tfinal >= total:
            raise ValueError(f"AdaLoraCallback: the schedule ({config.tinit} warm-up + {config.tfinal} final steps) "
                             f"leaves no step to prune ranks in a run of {total} optimizer steps; lower warmup or "
                             "final (tinit/tfinal), or train longer")
        self._config = config
        self._configured_weight = config.orth_reg_weight
        self._weight = self._configured_weight if self.orth_reg_weight is None else self.orth_reg_weight
        config.orth_reg_weight = 0.0  # peft's forward would add its own, unsquared, into the loss
        # the rank allocator was built with the config's target_r and the modules present at injection
        self.driver = adalora.AdaLoraDriver(tuner=tuner, target_budget=tuner.rankallocator.target_bgt,
                                            adapter_name=self.adapter_name)
        if state.global_step == 0:
            if self.orthogonal_init:
                adalora.orthogonal_init(model, self.adapter_name)
                _broadcast_adapter(model, self.adapter_name)
        else:
            self._restore(args, state)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self._weight <= 0:
            return
        matrices = [p for n, p in model.named_parameters() if p.requires_grad
                    and n.endswith((f"lora_A.{self.adapter_name}", f"lora_B.{self.adapter_name}"))]
        if not matrices:
            return
        with torch.enable_grad():
            regularization = adalora.orthogonal_regularization(model, self.adapter_name, self.orth_reg_form)
            grads = torch.autograd.grad(self._weight * regularization, matrices, allow_unused=True)
        for p, g in zip(matrices, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Trainer counts the step after this event; peft's schedule is 1-based
        self.driver.after_optimizer_step(state.global_step + 1)

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
        # beside the training loss, for the callbacks after this one (peftkit's TensorBoard writer among them)
        if logs is not None and "loss" in logs and self.driver is not None and self.driver.budget_history:
            logs["adalora_total_rank"] = self.driver.budget_history[-1][1]

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.driver is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return
        torch.save(self.driver.allocator_state(), folder / ALLOCATOR_FILE)
        # Trainer saved the adapter as peft saves a finished one: cut to the kept ranks by the config's
        # rank_pattern, and with the weight the callback holds (0). Resuming then fails ("size mismatch ...
        # torch.Size([4, 64]) ... torch.Size([6, 64])"): Trainer reloads it into a model of init_r ranks. The
        # checkpoint keeps every rank instead (the pruned ones are zero in lora_E, so it computes the same
        # adapter), the rank pattern goes to ALLOCATOR_FILE, and the config says the user's weight.
        config = self._config
        pattern, config.rank_pattern, config.orth_reg_weight = config.rank_pattern, None, self._configured_weight
        try:
            model.save_pretrained(folder, selected_adapters=[self.adapter_name])
        finally:
            config.rank_pattern, config.orth_reg_weight = pattern, 0.0

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._config is not None:
            self._config.orth_reg_weight = self._configured_weight

    # ---- what it reads and writes --------------------------------------------------------------------------

    @property
    def final_ranks(self) -> dict[str, int]:
        """Module name -> ranks kept so far (all of ``init_r`` before the first pruning)."""
        if self.driver is None:
            raise RuntimeError("AdaLoraCallback: no training has started")
        return adalora.final_ranks(self.driver.tuner, self.adapter_name)

    def _adalora_tuner(self, model: Any) -> Any:
        from peft.tuners.adalora import AdaLoraModel

        tuner = getattr(model, "base_model", None)
        if not isinstance(tuner, AdaLoraModel):
            raise ValueError(f"AdaLoraCallback drives a peft AdaLoRA model (get_peft_model with an AdaLoraConfig); "
                             f"this Trainer's model is a {type(model).__name__}")
        if self.adapter_name not in tuner.peft_config:
            raise ValueError(f"AdaLoraCallback: the model has no adapter {self.adapter_name!r} (it has "
                             f"{', '.join(tuner.peft_config)}); pass adapter_name=")
        return tuner

    def _restore(self, args: Any, state: Any) -> None:
        folder = self.resume_from or Path(args.output_dir) / f"checkpoint-{state.global_step}"
        path = folder / ALLOCATOR_FILE
        if not path.is_file():
            raise ValueError(f"AdaLoraCallback: resuming at step {state.global_step} needs {path}, which a "
                             "checkpoint saved with AdaLoraCallback holds; pass resume_from=<that checkpoint folder>")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        device = next(self.driver.tuner.parameters()).device
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            saved[key] = {name: t.to(device) for name, t in saved[key].items()}
        self.driver.load_allocator_state(saved)
        if saved["rank_pattern"]:  # the masks a pruned run had applied, on the weights Trainer reloaded
            self.driver.tuner.rankallocator.mask_using_rank_pattern(self.driver.tuner.model, saved["rank_pattern"])


def _broadcast_adapter(model: torch.nn.Module, adapter_name: str) -> None:
    """Every process takes the first one's P and Q (DDP broadcast the weights before this callback changed them)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((f"lora_A.{adapter_name}", f"lora_B.{adapter_name}")):
                torch.distributed.broadcast(p.data, src=0)
