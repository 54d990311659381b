"""The training run: one loop for every method, task head and process count.

peftkit runs its own loop rather than transformers' ``Trainer`` for now. Three things must happen at exact points
of each optimizer step: the task gradient is clipped alone, AdaLoRA's orthogonal regularization is added after
the clip (whatever the head computes its loss with), and ``update_and_allocate`` runs once, after
``optimizer.step()`` and before ``zero_grad()``. Trainer 5.x offers both places (``on_pre_optimizer_step``,
``on_optimizer_step``), which :class:`peftkit.AdaLoraCallback` uses; moving this loop onto Trainer is issue 15.
accelerate supplies the process group, so ``accelerate launch`` and ``torchrun`` work unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import adalora
from .artifacts import build_metadata, seal, staged_folder
from .build import BuiltModel, Plan, build_model, plan_run
from .checkpoint import (STATE_FILE, check_same_run, every_rng_state, latest_checkpoint, list_checkpoints,
                         load_checkpoint, resume_relevant, save_checkpoint, training_state)
from .data import eval_batches, plan_batches, short_run_notice, steps_per_epoch
from .errors import PeftkitError
from .evaluation import collect, device_batch, in_row_order, metrics_by_source
from .finite import first_non_finite
from .launch import check_launch, fit_fsdp_plugin
from .models import describe_quantization, fingerprint, pick_device
from .rank_report import HEATMAP_FILE, save_heatmap
from .recipe import AdaLoraSection, Recipe
from .registry import Registry


@dataclass
class TrainResult:
    adapter_dir: Path
    metrics: dict[str, float]
    metadata: dict[str, Any]
    model: Any  # the trained model, adapter attached, for use in the same process


def set_seed(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_destination(recipe: Recipe, resume: bool, overwrite: bool) -> tuple[Path, Path]:
    """Refuse, before any work, a run that would clobber or ignore what is already saved."""
    registry = Registry(recipe.output.registry)
    target = registry.target(recipe.output.name)
    run_dir = Path(recipe.output.runs) / recipe.output.name
    if not overwrite:
        try:
            registry.refuse_existing(recipe.output.name, "choose another name (--set output.name=NEW) or pass "
                                                         "--overwrite to replace it")
        except PeftkitError as exc:
            raise PeftkitError(f"output.name: {exc}") from None
    checkpoints = list_checkpoints(run_dir)
    if resume and not checkpoints:
        raise PeftkitError(f"--resume: no checkpoint in {run_dir}/checkpoints; run without --resume to start")
    if resume:
        try:
            saved = json.loads((checkpoints[-1] / STATE_FILE).read_text()).get("recipe")
        except (OSError, ValueError):
            saved = None  # an unreadable checkpoint is reported when it is loaded
        check_same_run(saved, resume_relevant(recipe), checkpoints[-1])
    if checkpoints and not resume and not overwrite:
        raise PeftkitError(
            f"{run_dir} holds checkpoints of an earlier run; pass --resume to continue it or --overwrite to "
            "start over"
        )
    return target, run_dir


def loraplus_b(name: str, p: torch.nn.Parameter, is_head: bool) -> bool:
    """Whether LoRA+ trains ``name`` at ``loraplus_lr_ratio`` x lr: peft's rule (``peft.optimizers.loraplus.
    create_loraplus_optimizer``: ``"lora_B" in name or param.ndim == 1``, so DoRA's magnitudes too) for the
    adapter's parameters. The task head keeps its own learning rate (peft's rule would put the head's bias at the
    ratio and its weight at lr). peft's third group, LoRA on embeddings at ``loraplus_lr_embedding``, cannot occur:
    peftkit adapts linear layers only (``adapters.resolve_target_modules``)."""
    return not is_head and ("lora_B" in name or p.ndim == 1)


def _optimizer(model: torch.nn.Module, recipe: Recipe, head_modules: list[str]) -> torch.optim.Optimizer:
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
    # One fused kernel for every parameter (transformers' Trainer defaults to the same, adamw_torch_fused): on the
    # CPU torch's default AdamW loops over parameters one by one, which made full fine-tuning slower than Trainer.
    trainable = [p for ps in groups.values() for p in ps]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in trainable)
    return torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
                             fused=fused or None)


def _scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, total: int) -> Any:
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[recipe.train.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=int(recipe.train.warmup_ratio * total),
                         num_training_steps=total)


class Evaluator:
    """Runs the task's metrics over the eval rows; every process takes a share, results are gathered.

    Under FSDP every forward pass is collective, so each process must run as many as the others: there
    every process evaluates every row.
    """

    def __init__(self, plan: Plan, batch_size: int, device: torch.device, rank: int, world: int, sharded: bool):
        self.plan, self.device = plan, device
        self.rank, self.world = (0, 1) if sharded else (rank, world)
        self.batch_size = batch_size
        self.batches = eval_batches(len(plan.eval_rows), batch_size)[self.rank::self.world]

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        collected = collect(model, self.plan.task, self.plan.tokenizer, self.plan.eval_rows, self.batches,
                            self.device)
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(gathered, collected)
            collected = {k: torch.cat([g[k] for g in gathered if k in g]) for k in collected}
            collected = in_row_order(collected, len(self.plan.eval_rows), self.batch_size, self.world)
        return metrics_by_source(self.plan.task, collected, self.plan.eval_parts)


def _row_items(plan: Plan) -> Optional[list[int]]:
    """What each training row adds to the count the loss averages over (None: a mean over rows)."""
    if len(plan.train_rows) == 0 or plan.task.loss_items(plan.train_rows[0]) is None:
        return None
    return [plan.task.loss_items(row) for row in plan.train_rows]


def _step_items(row_items: Optional[list[int]], group: list[list[int]], world: int,
                device: torch.device) -> Optional[float]:
    """The items (tokens) of one optimizer step over its micro-batches and every process, which each
    micro-batch's summed loss is divided by: accumulating 4 batches of 2 then equals one batch of 8, and two
    processes equal one, on rows of any length. Dividing each micro-batch's mean by the micro-batch count
    instead weighed a token by the size of its micro-batch (transformers' ``num_items_in_batch`` fixed the same)."""
    if row_items is None:
        return None
    local = sum(row_items[i] for idx in group for i in idx)
    if world == 1:
        return float(max(local, 1))
    total = torch.tensor(float(local), device=device)
    torch.distributed.all_reduce(total)  # one small collective per optimizer step
    return max(float(total), 1.0)


def _format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _diverged(what: str, step: int, recipe: Recipe, total: int) -> PeftkitError:
    clip = "" if recipe.train.max_grad_norm else ", or set train.max_grad_norm to clip the gradient"
    return PeftkitError(f"step {step}/{total}: {what}: training diverged; lower train.lr ({recipe.train.lr:g}){clip}, "
                        "or check the data for extreme or empty rows; no adapter was saved")


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False,
          echo: Callable[[str], None] = print) -> TrainResult:
    """Run a recipe end to end: plan, load, train with evaluation and checkpoints, save the adapter.

    The adapter's name is reserved in the registry for the whole run (by the main process), so a second run
    of the same name fails at once instead of training to the end and finding the name taken.
    """
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun / accelerate: the main process holds the name
        return _train(recipe, resume, overwrite, echo)
    with Registry(recipe.output.registry).reserve(recipe.output.name, "output.name"):
        return _train(recipe, resume, overwrite, echo)


def _train(recipe: Recipe, resume: bool, overwrite: bool, echo: Callable[[str], None]) -> TrainResult:
    from accelerate import Accelerator

    # bitsandbytes warns on every 8-bit matmul that float32 inputs go through float16; once is enough
    warnings.filterwarnings("once", message=r"MatMul8bitLt: inputs will be cast")

    target, run_dir = check_destination(recipe, resume, overwrite)
    t = recipe.train
    device = pick_device(t.device)
    accelerator = Accelerator(cpu=device.type == "cpu")
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    say = echo if main else (lambda _: None)
    sharded = check_launch(accelerator, recipe, say)
    set_seed(t.seed)

    plan = plan_run(recipe, world)
    built = build_model(plan, device)
    model = built.model
    base_fp = fingerprint(plan.base.path)
    say(f"base: {plan.base.identity} ({describe_quantization(recipe.quantization, recipe.base.dtype)}), "
        f"{built.base_bytes / 2**20:.1f} MiB in memory, on {device}")
    say(f"adapter: {recipe.method}, trainable parameters {built.trainable:,} of {built.total:,} "
        f"({100 * built.trainable / max(built.total, 1):.2f}%)"
        + (f", targets {', '.join(built.targets)}" if built.targets else ""))
    say(f"data: {len(plan.train_rows):,} train rows, {len(plan.eval_rows):,} eval rows; "
        f"{plan.total_steps} optimizer steps" + (f"; AdaLoRA warm-up {plan.schedule[0]}, final {plan.schedule[1]} steps"
                                                  if plan.schedule else ""))
    notice = short_run_notice(plan.total_steps, t.epochs, t.max_steps)
    if notice:
        say(notice)

    driver = adalora.AdaLoraDriver.for_model(model, recipe.adapter) if isinstance(recipe.adapter, AdaLoraSection) else None
    if sharded:
        fit_fsdp_plugin(accelerator, model, recipe)
    if world > 1:
        model = accelerator.prepare_model(model, device_placement=False)
    unwrapped = accelerator.unwrap_model(model)
    # made after wrapping: FSDP replaces the parameters the optimizer must hold (DDP keeps them)
    optimizer = _optimizer(model, recipe, built.head_modules)
    scheduler = _scheduler(optimizer, recipe, plan.total_steps)

    progress = {"step": 0, "epoch": 0, "group": 0, "history": [], "train_seconds": 0.0,
                "recipe": resume_relevant(recipe)}
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        assert checkpoint is not None
        progress, extra = load_checkpoint(checkpoint, model, unwrapped, optimizer, scheduler, sharded, rank, world)
        if driver is not None and "adalora" in extra:
            driver.load_allocator_state(extra["adalora"])
        say(f"resumed from {checkpoint} at step {progress['step']}")
    elif overwrite and main and run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoints and TensorBoard events: the run is replaced

    writer = _tensorboard(run_dir) if main else None
    evaluate = Evaluator(plan, t.eval_batch_size or t.batch_size, device, rank, world, sharded)
    lengths = [len(ids) for ids in plan.train_rows["input_ids"]]
    row_items = _row_items(plan)
    n_batches = len(plan_batches(lengths, t.batch_size, t.seed, 0, t.group_by_length, world))
    per_epoch = steps_per_epoch(n_batches, t.grad_accum, world)
    bar = _progress_bar(plan.total_steps, progress["step"], enabled=main and t.progress)
    if t.eval_at_start and progress["step"] == 0:
        metrics = evaluate(model)
        progress["history"].append({"step": 0, **metrics})
        say(f"step 0/{plan.total_steps} eval: {_format_metrics(metrics)}")
    model.train()
    started = time.perf_counter()
    seconds_before = progress["train_seconds"]
    # examples trained before a --resume count too, or examples/s would be this session's over the whole time
    examples_before = progress.get("train_examples", 0)
    examples = 0
    metrics: dict[str, float] = {}
    running_loss, running_count = 0.0, 0

    while progress["step"] < plan.total_steps:
        batches = plan_batches(lengths, t.batch_size, t.seed, progress["epoch"], t.group_by_length, world)[rank::world]
        groups = [batches[i : i + t.grad_accum] for i in range(0, len(batches), t.grad_accum)]
        for group_index in range(progress["group"], len(groups)):
            group = groups[group_index]
            step_items = _step_items(row_items, group, world, device)
            for j, idx in enumerate(group):
                batch = device_batch(plan.task, plan.tokenizer, plan.train_rows, idx, device)
                sync = j == len(group) - 1 or world == 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    # no name holds the outputs: a causal LM's logits (batch x length x vocabulary) would stay
                    # alive through this backward and the next forward
                    if step_items is None:  # a mean over rows: each micro-batch weighs the same
                        loss = plan.task.loss(model(**plan.task.model_inputs(batch)), batch)
                        accelerator.backward(loss / len(group))
                    else:  # a mean over tokens: each token of the whole step weighs the same
                        summed = plan.task.loss_sum(model(**plan.task.model_inputs(batch)), batch)
                        # DDP averages the processes' gradients, hence the factor world
                        accelerator.backward(summed * (world / step_items))
                        loss = summed / max(sum(row_items[i] for i in idx), 1)
                value = float(loss.detach())  # one sync per micro-batch, which the running loss needs anyway
                if not math.isfinite(value):
                    raise _diverged(f"the loss is {value}", progress["step"] + 1, recipe, plan.total_steps)
                running_loss += value
                running_count += 1
                examples += len(idx)
            if t.max_grad_norm:  # through accelerate: under FSDP the norm is summed over every process's shard
                norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                if norm is not None and not math.isfinite(float(norm)):  # one sync per optimizer step
                    raise _diverged(f"the gradient norm is {float(norm)}", progress["step"] + 1, recipe,
                                    plan.total_steps)
            if driver is not None and recipe.adapter.orth_reg_weight > 0:
                # after the clip, so the clip measures the task gradient alone (see adalora.py)
                with accelerator.no_sync(model) if world > 1 else contextlib.nullcontext():
                    regularization = adalora.orthogonal_regularization(unwrapped, form=recipe.adapter.orth_reg_form)
                    (recipe.adapter.orth_reg_weight * regularization).backward()
            optimizer.step()
            scheduler.step()
            progress["step"] += 1
            progress["group"] = group_index + 1
            step = progress["step"]
            if driver is not None:
                budget = driver.after_optimizer_step(step)
                if writer:
                    writer.add_scalar("adalora/total_rank", budget, step)
            optimizer.zero_grad(set_to_none=True)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running_loss / max(running_count, 1):.4f}")
            if step % t.log_every == 0 or step == plan.total_steps:
                if writer:
                    writer.add_scalar("train/loss", running_loss / max(running_count, 1), step)
                    writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                running_loss, running_count = 0.0, 0
            end_of_epoch = progress["group"] == len(groups)
            if (t.eval_every and step % t.eval_every == 0) or (not t.eval_every and end_of_epoch) \
                    or step == plan.total_steps:
                metrics = evaluate(model)
                progress["history"].append({"step": step, **metrics})
                if writer:
                    for key, value in metrics.items():
                        writer.add_scalar(f"eval/{key}", value, step)
                _print_above(bar, say, f"step {step}/{plan.total_steps} eval: {_format_metrics(metrics)}")
            if step < plan.total_steps and ((t.save_every and step % t.save_every == 0) or
                                            (not t.save_every and end_of_epoch)):
                progress["train_seconds"] = seconds_before + time.perf_counter() - started
                progress["train_examples"] = examples_before + examples
                weights, optimizer_state = training_state(model, unwrapped, optimizer, sharded)  # all processes
                rng_states = every_rng_state(world)  # all processes
                if main:
                    save_checkpoint(run_dir, step, weights, optimizer_state, scheduler, _resumable(progress, groups),
                                    {"adalora": driver.allocator_state()} if driver else {}, t.keep_checkpoints,
                                    rng_states)
                accelerator.wait_for_everyone()
            if step >= plan.total_steps:
                break
        else:
            progress["epoch"] += 1
            progress["group"] = 0
            continue
        break
    if bar is not None:
        bar.close()
    seconds = seconds_before + time.perf_counter() - started
    if writer:
        writer.close()

    result_dir = target
    metadata: dict[str, Any] = {}
    # under FSDP the whole state dict is gathered to the main process, and every process must take part
    saved_state = {"state_dict": accelerator.get_state_dict(model)} if sharded else {}
    if main:
        trained = saved_state["state_dict"].items() if sharded else \
            ((n, p.detach()) for n, p in unwrapped.named_parameters() if p.requires_grad)
        bad = first_non_finite(trained)  # the last update can break the weights with no loss left to show it
        if bad is not None:
            raise _diverged(f"the trained weights hold NaN or infinite values (in {bad})", progress["step"], recipe,
                            plan.total_steps)
        metadata = _metadata(recipe, plan, built, unwrapped, driver, base_fp, metrics, progress, seconds,
                             examples_before + examples, per_epoch, world, device)
        with staged_folder(target, overwrite=overwrite) as folder, warnings.catch_warnings():
            # peft flags the zero-size tensors of modules AdaLoRA pruned to rank 0 as unsharded ZeRO-3 leftovers
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
            unwrapped.save_pretrained(folder, **saved_state)
            if driver is not None:
                save_heatmap(metadata["adapter"]["adalora"]["final_ranks"], recipe.adapter.init_r,
                             folder / HEATMAP_FILE, f"{recipe.output.name}: AdaLoRA final ranks")
            seal(folder, metadata)
        say(f"saved {target} in {seconds:.0f} s of training: {_format_metrics(metrics)}")
    accelerator.wait_for_everyone()
    return TrainResult(result_dir, metrics, metadata, unwrapped)


def _resumable(progress: dict[str, Any], groups: list) -> dict[str, Any]:
    state = dict(progress)
    if state["group"] >= len(groups):  # the epoch is done: resume at the next one
        state["epoch"] += 1
        state["group"] = 0
    return state


def _metadata(recipe: Recipe, plan: Plan, built: BuiltModel, model: Any, driver: Optional[adalora.AdaLoraDriver],
              base_fp: str, metrics: dict[str, float], progress: dict[str, Any], seconds: float, examples: int,
              per_epoch: int, world: int, device: torch.device) -> dict[str, Any]:
    adapter: dict[str, Any] = {
        "method": recipe.method,
        "targets": built.targets,
        "head_modules": built.head_modules,
        **({"rank_pattern": plan.rank_pattern} if plan.rank_pattern else {}),
        "trainable_parameters": built.trainable,
        "total_parameters": built.total,
    }
    if driver is not None:
        ranks = adalora.final_ranks(model)
        adapter["adalora"] = {
            "init_r": recipe.adapter.init_r,
            "target_r": recipe.adapter.target_r,
            "target_budget": driver.target_budget,
            "final_budget": sum(ranks.values()),
            "final_ranks": ranks,
            "reallocations": driver.reallocations,
            "budget_history": driver.budget_history,
            "schedule": {"total_step": plan.total_steps, "tinit": plan.schedule[0], "tfinal": plan.schedule[1]},
        }
    return build_metadata(
        name=recipe.output.name,
        task={"type": recipe.task.type, "options": recipe.task.options(), "state": plan.task.state},
        base={
            "identity": plan.base.identity,
            "source": plan.base.source,
            "path": str(plan.base.path),
            "fingerprint": base_fp,
            "dtype": recipe.base.dtype,
            "quantization": recipe.quantization.model_dump(mode="json"),
            "memory_bytes": built.base_bytes,
        },
        adapter=adapter,
        metrics=metrics,
        key_metric=plan.task.key_metric[0],
        history=progress["history"],
        training={
            "optimizer_steps": progress["step"],
            "steps_per_epoch": per_epoch,
            "train_rows": len(plan.train_rows),
            "eval_rows": len(plan.eval_rows),
            "seconds": round(seconds, 2),
            "examples": examples,
            "examples_per_second": round(examples / seconds, 2) if seconds > 0 else None,
            "device": str(device),
            "num_processes": world,
        },
        recipe=recipe.to_dict(),
        provenance=built.provenance,
    )


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _print_above(bar: Any, say: Callable[[str], None], line: str) -> None:
    if bar is not None:
        bar.write(line)
    else:
        say(line)


__all__ = ["train", "TrainResult", "check_destination"]
