"""The training run: a recipe planned, its model built, trained on transformers' ``Trainer``, its adapter saved.

``Trainer`` runs the loop (accumulation, clip, optimizer and scheduler steps, DDP through accelerate, checkpoints
and ``resume_from_checkpoint``); :class:`peftkit.train.trainer.PeftkitTrainer` replaces the parts peftkit does
otherwise, each with its reason; :mod:`peftkit.train.run_events` decides when to log, evaluate and save, and prints;
AdaLoRA is driven by the public :class:`peftkit.AdaLoraCallback`, the same one any Trainer user can add.
``accelerate launch`` and ``torchrun`` work unchanged: Trainer takes the process group they set up.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config.metadata import AdapterMetadata
from ..config.recipe import AdaLoraSection, Recipe
from ..core import adalora
from ..core.build import BuiltModel, Plan
from ..core.data import eval_batches, plan_batches, short_run_notice, steps_per_epoch
from ..core.evaluation import collect, in_row_order, metrics_by_source, model_metrics
from ..core.models import describe_quantization, fingerprint, pick_device
from ..core.rank_report import HEATMAP_FILE, save_heatmap
from ..errors import PeftkitError
from ..finite import first_non_finite
from ..store.artifacts import build_metadata, seal, staged_folder
from ..store.registry import Registry
from .adalora_callback import AdaLoraCallback
from .checkpoint import (check_readable, check_same_run, checkpoint_dir, latest_checkpoint, list_checkpoints,
                         read_record, refuse_old_format, resume_relevant)
from .launch import check_launch, fit_fsdp_plugin, refuse_fsdp_without_gpu
from .run_events import RunFlow, RunRecord, RunReport, format_metrics
from .trainer import PeftkitTrainer, RowIndices, diverged
from .transfer import prepare_run


@dataclass
class TrainResult:
    adapter_dir: Path
    metrics: dict[str, float]
    metadata: Optional[AdapterMetadata]  # as a reader of adapter_dir gets it; None on processes other than the main
    model: Any  # the trained model, adapter attached, for use in the same process


def set_seed(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


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
        refuse_old_format(run_dir)
        raise PeftkitError(f"--resume: no checkpoint in {run_dir}/checkpoints; run without --resume to start")
    if resume:
        check_readable(checkpoints[-1])
        check_same_run(read_record(checkpoints[-1]).get("recipe"), resume_relevant(recipe), checkpoints[-1])
    if (checkpoints or checkpoint_dir(run_dir).is_dir() and any(checkpoint_dir(run_dir).iterdir())) \
            and not resume and not overwrite:
        raise PeftkitError(
            f"{run_dir} holds checkpoints of an earlier run; pass --resume to continue it or --overwrite to "
            "start over"
        )
    return target, run_dir


class Evaluator:
    """Runs the task's metrics over the eval rows; every process takes a share, results are gathered.

    Under FSDP every forward pass is collective, so each process must run as many as the others: there
    every process evaluates every row.
    """

    def __init__(self, plan: Plan, batch_size: int, device: torch.device, rank: int, world: int, sharded: bool):
        # sharded: FSDP or DeepSpeed ZeRO-3 (check_launch), known once Trainer's accelerator exists
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
        metrics = metrics_by_source(self.plan.task, collected, self.plan.eval_parts)
        return {**metrics, **model_metrics(model, self.plan.task, self.plan.tokenizer, self.plan.eval_rows)}


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False,
          echo: Callable[[str], None] = print) -> TrainResult:
    """Run a recipe end to end: plan, load, train with evaluation and checkpoints, save the adapter.

    The adapter's name is reserved in the registry for the whole run (by the main process), so a second run
    of the same name fails at once instead of training to the end and finding the name taken.
    """
    refuse_fsdp_without_gpu()  # before anything loads
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun / accelerate: the main process holds the name
        return _train(recipe, resume, overwrite, echo)
    with Registry(recipe.output.registry).reserve(recipe.output.name, "output.name"):
        return _train(recipe, resume, overwrite, echo)


def _train(recipe: Recipe, resume: bool, overwrite: bool, echo: Callable[[str], None]) -> TrainResult:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # bitsandbytes warns on every 8-bit matmul that float32 inputs go through float16; once is enough
    warnings.filterwarnings("once", message=r"MatMul8bitLt: inputs will be cast")

    target, run_dir = check_destination(recipe, resume, overwrite)
    t = recipe.train
    device = pick_device(t.device)
    # the launcher's (torchrun, accelerate launch) process count: the plan deals the batches out by it
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    main = rank == 0
    say = echo if main else (lambda _: None)
    set_seed(t.seed)

    plan, built = prepare_run(recipe, device, world)
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
    if plan.augmentation is not None:
        say(f"augment: {plan.augmentation.describe()}")
    notice = short_run_notice(plan.total_steps, t.epochs, t.max_steps)
    if notice:
        say(notice)

    resume_from = latest_checkpoint(run_dir) if resume else None
    record = read_record(resume_from) if resume_from else {}
    if overwrite and not resume and main and run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoints and TensorBoard events: the run is replaced
    history: list[dict[str, Any]] = list(record.get("history", []))
    n_batches = len(plan_batches([len(ids) for ids in plan.train_rows["input_ids"]], t.batch_size, t.seed, 0,
                                 t.group_by_length, world))
    per_epoch = steps_per_epoch(n_batches, t.grad_accum, world)
    output_dir = checkpoint_dir(run_dir)

    adalora_events = None
    callbacks: list[Any] = []
    if isinstance(recipe.adapter, AdaLoraSection):
        # orthogonal_init=False: build_model already started P and Q orthonormal, on every process alike
        adalora_events = AdaLoraCallback(warmup=plan.schedule[0], final=plan.schedule[1],
                                         orth_reg_weight=recipe.adapter.orth_reg_weight,
                                         orth_reg_form=recipe.adapter.orth_reg_form, orthogonal_init=False,
                                         resume_from=resume_from)
        callbacks.append(adalora_events)
    report = RunReport(say, plan.total_steps, main and t.progress, history)
    callbacks += [RunFlow(plan.total_steps, per_epoch, t.log_every, t.eval_every, t.save_every), report]
    writer = _tensorboard(run_dir) if main else None
    if writer is not None:
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(writer))  # after AdaLoraCallback, which adds the rank budget to logs

    # Trainer seeds every generator again as it is made; putting them back keeps the dropout masks where they were
    # before Trainer ran peftkit's runs (a stored run, the sweep's included, reruns to the same weights)
    generators = rng_state()
    trainer = PeftkitTrainer(plan=plan, recipe=recipe, head_modules=built.head_modules,
                             rank=rank, world=world, model=model, args=_arguments(recipe, output_dir, device, plan),
                             train_dataset=RowIndices(len(plan.train_rows)), callbacks=callbacks)
    set_rng_state(generators)
    for default in (PrinterCallback, ProgressCallback):  # RunReport prints instead (see run_events.py)
        trainer.remove_callback(default)
    run_record = RunRecord(output_dir, resume_relevant(recipe), t.keep_checkpoints, history,
                           lambda: trainer.examples, record)
    trainer.add_callback(run_record)
    sharded = check_launch(trainer.accelerator, recipe, say)
    trainer.evaluator = Evaluator(plan, t.eval_batch_size or t.batch_size, device, rank, world, sharded)
    if trainer.is_fsdp_enabled:
        fit_fsdp_plugin(trainer.accelerator, model, recipe)
    if resume_from is not None:
        say(f"resumed from {resume_from} at step {record.get('step')}")
    elif t.eval_at_start:
        trainer.evaluate()  # step 0, before Trainer builds its state (which its eval_on_start would need a strategy for)
    with warnings.catch_warnings():
        # peft flags the zero-size tensors of modules AdaLoRA pruned to rank 0 as unsharded ZeRO-3 leftovers
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = run_record.seconds
    metrics = trainer.last_metrics
    if writer:
        writer.close()

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    metadata: Optional[AdapterMetadata] = None
    # under FSDP the whole state dict is gathered to the main process, and every process must take part
    saved_state = {"state_dict": trainer.accelerator.get_state_dict(trainer.model_wrapped)} if sharded else {}
    if main:
        trained = saved_state["state_dict"].items() if sharded else \
            ((n, p.detach()) for n, p in unwrapped.named_parameters() if p.requires_grad)
        bad = first_non_finite(trained)  # the last update can break the weights with no loss left to show it
        if bad is not None:
            raise diverged(f"the trained weights hold NaN or infinite values (in {bad})", trainer.state.global_step,
                           recipe, plan.total_steps)
        driver = adalora_events.driver if adalora_events else None
        progress = {"step": trainer.state.global_step, "history": history}
        written = _metadata(recipe, plan, built, unwrapped, driver, base_fp, metrics, progress, seconds,
                            run_record.total_examples, per_epoch, world, device)
        with staged_folder(target, overwrite=overwrite) as folder, warnings.catch_warnings():
            # peft flags the zero-size tensors of modules AdaLoRA pruned to rank 0 as unsharded ZeRO-3 leftovers
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
            unwrapped.save_pretrained(folder, **saved_state)
            if driver is not None:
                save_heatmap(written["adapter"]["adalora"]["final_ranks"], recipe.adapter.init_r,
                             folder / HEATMAP_FILE, f"{recipe.output.name}: AdaLoRA final ranks")
            metadata = seal(folder, written)
        say(f"saved {target} in {seconds:.0f} s of training: {format_metrics(metrics)}")
    trainer.accelerator.wait_for_everyone()
    return TrainResult(target, metrics, metadata, unwrapped)


def _arguments(recipe: Recipe, output_dir: Path, device: torch.device, plan: Plan) -> Any:
    """Trainer's arguments for a recipe. The optimizer, the schedule, the batches and when to log, evaluate and
    save are peftkit's (PeftkitTrainer, RunFlow), so their arguments here are only what Trainer reads of them."""
    from transformers import TrainingArguments

    t = recipe.train
    return TrainingArguments(
        output_dir=str(output_dir), seed=t.seed, max_steps=plan.total_steps,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, max_grad_norm=t.max_grad_norm or 0.0,
        eval_strategy="no", save_strategy="no", logging_strategy="no", save_total_limit=None,
        report_to="none", disable_tqdm=True, remove_unused_columns=False,
        use_cpu=device.type == "cpu",
        # every trainable parameter takes part in every step; DDP's search for unused ones costs a pass per step
        ddp_find_unused_parameters=False,
    )


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
        task={"type": plan.task.name, "options": plan.task.options.model_dump(mode="json", exclude_unset=True),
              "state": plan.task.state},
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
            **({"augmentation": plan.augmentation.record()} if plan.augmentation else {}),
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


__all__ = ["train", "TrainResult", "check_destination"]
