"""What a peftkit run does at Trainer's events: when to log, evaluate and save; what it prints; what it records.

``RunFlow`` takes the place of Trainer's ``DefaultFlowCallback`` (the run's TrainingArguments set every strategy to
"no"), because peftkit's schedule is not one of Trainer's: evaluate every ``train.eval_every`` steps or else at each
epoch's end, and always after the last step (once, where Trainer's epoch strategy evaluates at epoch ends only,
and a ``max_steps`` run may stop inside one); save likewise but never after the last step, where the adapter itself
is saved. ``RunReport`` is the progress bar and the eval lines, in place of Trainer's ``ProgressCallback`` and
``PrinterCallback``, which print each log as a Python dict. ``RunRecord`` makes a checkpoint complete (see
:mod:`peftkit.train.checkpoint`) and carries what a resumed run adds to: its history, time and examples.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

from transformers import TrainerCallback

from . import checkpoint


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


class RunFlow(TrainerCallback):
    def __init__(self, total: int, per_epoch: int, log_every: int, eval_every: Optional[int],
                 save_every: Optional[int]):
        self.total, self.per_epoch, self.log_every = total, per_epoch, log_every
        self.eval_every, self.save_every = eval_every, save_every

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        end_of_epoch = step % self.per_epoch == 0
        if step % self.log_every == 0 or step == self.total:
            control.should_log = True
        if (self.eval_every and step % self.eval_every == 0) or (not self.eval_every and end_of_epoch) \
                or step == self.total:
            control.should_evaluate = True
        if step < self.total and ((self.save_every and step % self.save_every == 0)
                                  or (not self.save_every and end_of_epoch)):
            control.should_save = True
        if step >= self.total:
            control.should_training_stop = True


class RunReport(TrainerCallback):
    """The progress bar (main process, ``train.progress``), one line per evaluation, and the eval history."""

    def __init__(self, say: Callable[[str], None], total: int, progress: bool, history: list[dict[str, Any]]):
        self.say, self.total, self.progress = say, total, progress
        self.history = history
        self.bar: Any = None
        self.budget: Optional[int] = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Optional[dict] = None,
                    **kwargs: Any) -> None:
        values = {k.removeprefix("eval_"): v for k, v in (metrics or {}).items()}
        self.history.append({"step": state.global_step, **values})
        line = f"step {state.global_step}/{self.total} eval: {format_metrics(values)}"
        if self.bar is not None:
            self.bar.write(line)
        elif state.is_world_process_zero:
            self.say(line)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunRecord(TrainerCallback):
    """Writes each checkpoint's record last (what makes it complete), prunes to ``keep``, and keeps the time and
    examples a resumed run adds to."""

    def __init__(self, output_dir: Path, recipe_fields: dict[str, Any], keep: int, history: list[dict[str, Any]],
                 examples: Callable[[], int], before: Optional[dict[str, Any]] = None):
        self.output_dir, self.recipe_fields, self.keep = output_dir, recipe_fields, keep
        self.history, self.examples = history, examples
        self.seconds_before = float((before or {}).get("train_seconds", 0.0))
        self.examples_before = int((before or {}).get("train_examples", 0))
        self.started = time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    @property
    def total_examples(self) -> int:
        return self.examples_before + self.examples()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch

        # every process has written its random generators (Trainer's rng_state_<rank>.pth) before the record
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if not state.is_world_process_zero:
            return
        folder = self.output_dir / f"checkpoint-{state.global_step}"
        checkpoint.write_record(folder, {"recipe": self.recipe_fields, "step": state.global_step,
                                         "history": self.history, "train_seconds": self.seconds,
                                         "train_examples": self.total_examples})
        checkpoint.prune(self.output_dir, self.keep)
