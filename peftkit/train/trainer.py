"""``PeftkitTrainer``: transformers' ``Trainer`` with the parts peftkit does differently, each said why.

Trainer runs the loop: accumulation, the gradient clip, the optimizer and scheduler steps, DDP (and FSDP and
DeepSpeed through accelerate), checkpoints with every process's random generators, and ``resume_from_checkpoint``.
peftkit replaces only these parts:

* :meth:`get_train_dataloader`: peftkit's batch planner (:func:`peftkit.core.data.plan_batches`), because it pads less
  than Trainer's ``LengthGroupedSampler``: on the six benchmark tasks the sampler computes 1.39-2.33x peftkit's
  positions at 250 rows, 1.08-1.28x at 1,000 and 1.01-1.06x on the full sets (``benchmarks/batch_planners.py``).
  Each process takes its own share (batch r, r + world, ...) itself: the plan is already cut to a multiple of
  the process count, where accelerate's ``BatchSamplerShard`` would pad a short plan with repeated batches.
* :meth:`compute_loss`: the task head computes its loss from the model's raw outputs (the model is never given
  the labels). A head whose loss is a mean over rows is scaled by Trainer (1 / micro-batches of the step); a
  head whose loss is a mean over tokens is divided by the tokens of the whole accumulated step on every process
  (:meth:`get_batch_samples` counts them with the head's ``loss_items``, or ``batch_loss_items`` for a head whose
  count is drawn with the batch: Trainer's own count reads shifted ``labels``, which only a causal LM has).
* :meth:`create_optimizer` / :meth:`create_scheduler`: one fused AdamW with a learning rate per group (the head's
  ``train.head_lr``, AdaLoRA's ``lr_scale``, LoRA+'s ratio), which Trainer's single learning rate cannot give.
* :meth:`evaluate`: the task's metrics, per eval data set too, from per-row tensors gathered across processes
  (Trainer's loop would gather a causal LM's logits, batch x length x vocabulary).
* :meth:`_get_grad_norm`: stops a diverged run at the step it diverges, with a one-line error, and checks the
  loss there once per optimizer step (Trainer only filters non-finite losses out of its log).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer

from ..config.recipe import AdaLoraSection, Recipe
from ..core.data import plan_batches
from ..errors import PeftkitError

# keys the collator adds beside the model's inputs; get_batch_samples takes them out before the forward pass
ROWS_KEY = "peftkit_rows"
ITEMS_KEY = "peftkit_loss_items"


class RowIndices(Dataset):
    """Row ``i`` is ``i``: the collator reads the encoded rows, so the batch planner deals in indices."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class PlannedBatches:
    """This process's batches of :func:`plan_batches` for the epoch Trainer sets (``set_epoch``)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool, rank: int, world: int):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.group_by_length, self.rank, self.world = group_by_length, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        plan = plan_batches(self.lengths, self.batch_size, self.seed, self.epoch, self.group_by_length, self.world)
        return plan[self.rank::self.world]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


class EpochLoader(DataLoader):
    """A DataLoader whose ``set_epoch`` reaches its batch planner (Trainer calls it at every epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def loraplus_b(name: str, p: torch.nn.Parameter, is_head: bool) -> bool:
    """Whether LoRA+ trains ``name`` at ``loraplus_lr_ratio`` x lr: peft's rule (``peft.optimizers.loraplus.
    create_loraplus_optimizer``: ``"lora_B" in name or param.ndim == 1``, so DoRA's magnitudes too) for the
    adapter's parameters. The task head keeps its own learning rate (peft's rule would put the head's bias at the
    ratio and its weight at lr). peft's third group, LoRA on embeddings at ``loraplus_lr_embedding``, cannot occur:
    peftkit adapts linear layers only (``adapters.resolve_target_modules``)."""
    return not is_head and ("lora_B" in name or p.ndim == 1)


def build_optimizer(model: torch.nn.Module, recipe: Recipe, head_modules: list[str]) -> torch.optim.Optimizer:
    t = recipe.train
    ratio = getattr(recipe.adapter, "loraplus_lr_ratio", None)
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = any(f".{h}." in f".{name}" for h in head_modules)
        lr = t.head_lr if (is_head and t.head_lr) else t.lr
        if "lora_" in name and isinstance(recipe.adapter, AdaLoraSection):
            lr = t.lr * recipe.adapter.lr_scale
        if ratio and loraplus_b(name, p, is_head):
            lr = t.lr * ratio
        no_decay = name.endswith("bias") or "norm" in name.lower() or "lora_E" in name
        groups.setdefault((lr, 0.0 if no_decay else t.weight_decay), []).append(p)
    # One fused kernel for every parameter (Trainer's default, adamw_torch_fused): on the CPU torch's default
    # AdamW loops over parameters one by one, which made full fine-tuning slower than Trainer.
    trainable = [p for ps in groups.values() for p in ps]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in trainable)
    return torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
                             fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, total: int) -> Any:
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[recipe.train.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=int(recipe.train.warmup_ratio * total),
                         num_training_steps=total)


def diverged(what: str, step: int, recipe: Recipe, total: int) -> PeftkitError:
    clip = "" if recipe.train.max_grad_norm else ", or set train.max_grad_norm to clip the gradient"
    return PeftkitError(f"step {step}/{total}: {what}: training diverged; lower train.lr ({recipe.train.lr:g}){clip}, "
                        "or check the data for extreme or empty rows; no adapter was saved")


class PeftkitTrainer(Trainer):
    """Trainer over a peftkit run plan (see the module's docstring for what differs and why)."""

    def __init__(self, *, plan: Any, recipe: Recipe, head_modules: list[str], rank: int, world: int,
                 evaluator: Optional[Callable[[Any], dict]] = None, **kwargs: Any):
        self.plan, self.recipe, self.head_modules = plan, recipe, head_modules
        self.evaluator, self.rank, self.world = evaluator, rank, world
        self.row_items = _row_items(plan)
        self.examples = 0  # rows this process trained on in this session
        self.last_metrics: dict[str, float] = {}
        super().__init__(**kwargs)
        # the head's loss is scaled here for token heads (compute_loss); for row heads Trainer divides by the
        # micro-batches of the step, as it does for any loss that is a mean over its batch
        self.loss_is_scaled_for_ga = self.row_items is not None
        self.model_accepts_loss_kwargs = False  # the model computes no loss: the head does
        self._step_loss = torch.zeros((), device=self.args.device)  # the step's micro-batch losses, summed

    # ---- data ------------------------------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        t, rows = self.recipe.train, self.plan.train_rows
        sampler = PlannedBatches([len(ids) for ids in rows["input_ids"]], t.batch_size, t.seed, t.group_by_length,
                                 self.rank, self.world)
        self.planned = sampler  # its epoch seeds the heads that draw their inputs afresh every epoch
        # a generator of its own: each epoch's iterator draws a seed from it, which from the global one would
        # shift every dropout mask after it (the batches come from the planner's own seeded generator)
        return EpochLoader(RowIndices(len(rows)), batch_sampler=sampler, collate_fn=self._collate,
                           pin_memory=self.args.device.type == "cuda",
                           generator=torch.Generator().manual_seed(t.seed))

    def _collate(self, index: list[int]) -> dict[str, Any]:
        rows, task = self.plan.train_rows, self.plan.task
        batch: dict[str, Any] = dict(task.train_collate([rows[i] for i in index], self.plan.tokenizer,
                                                        self.recipe.train.seed, self.planned.epoch, index))
        batch[ROWS_KEY] = len(index)
        items = sum(self.row_items[i] for i in index) if self.row_items is not None else task.batch_loss_items(batch)
        if items is not None:
            batch[ITEMS_KEY] = items
        return batch

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        self.examples += sum(b.pop(ROWS_KEY) for b in batches)
        if not any(ITEMS_KEY in b for b in batches):
            return batches, None
        self.loss_is_scaled_for_ga = True  # a head that counts its items per batch (batch_loss_items) is seen here
        # the items (tokens) of the whole optimizer step, over its micro-batches and every process: accumulating
        # 4 batches of 2 then equals one batch of 8, and two processes equal one, on rows of any length
        items = torch.tensor(float(sum(b.pop(ITEMS_KEY) for b in batches)), device=device)
        if self.world > 1:
            torch.distributed.all_reduce(items)  # one small collective per optimizer step
        return batches, items.clamp(min=1.0)

    # ---- loss and optimizer -----------------------------------------------------------------------------------

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        task = self.plan.task
        outputs = model(**task.model_inputs(inputs))
        if num_items_in_batch is None:  # a mean over rows: each micro-batch weighs the same
            loss = task.loss(outputs, inputs)
        else:  # a mean over the step's tokens; DDP averages the processes' gradients, hence the factor world
            loss = task.loss_sum(outputs, inputs) * (self.world / num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss += loss  # on the device: read once per optimizer step, in _get_grad_norm (nan or inf stays)
        return loss

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        # Overridden (a private hook, called once per optimizer step right after the clip) to stop a diverged run
        # there. Without a clip Trainer would take a norm over every gradient only for its log; peftkit skips it.
        step, total = self.state.global_step + 1, self.state.max_steps
        summed = float(self._step_loss)  # the one sync per step this check costs
        self._step_loss.zero_()
        if not math.isfinite(summed):
            raise diverged(f"the loss is {summed}", step, self.recipe, total)
        if grad_norm is None and not self.args.max_grad_norm:
            return None
        norm = super()._get_grad_norm(model, grad_norm)
        if norm is not None and not math.isfinite(float(norm)):
            raise diverged(f"the gradient norm is {float(norm)}", step, self.recipe, total)
        return norm

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = build_optimizer(model if model is not None else self.model, self.recipe,
                                             self.head_modules)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None) -> Any:
        if self.lr_scheduler is None:
            self.lr_scheduler = build_scheduler(optimizer or self.optimizer, self.recipe, num_training_steps)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # ---- evaluation -------------------------------------------------------------------------------------------

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        self.last_metrics = self.evaluator(self.model_wrapped if self.is_fsdp_enabled else self.model)
        logs = {f"{metric_key_prefix}_{k}": v for k, v in self.last_metrics.items()}
        self.log(logs)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, logs)
        return logs


def _row_items(plan: Any) -> Optional[list[int]]:
    """What each training row adds to the count the loss averages over (None: a mean over rows)."""
    if len(plan.train_rows) == 0 or plan.task.loss_items(plan.train_rows[0]) is None:
        return None
    return [plan.task.loss_items(row) for row in plan.train_rows]
