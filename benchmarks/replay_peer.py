"""Issue 14 part 4: is peftkit's LoRA the same training as the careful peer's? Replay the peer inside peftkit.

With every dropout off (MiniLM's hidden and attention dropout and the classifier's set to 0 in the model config,
``lora_dropout`` 0) both tools are deterministic, so the only differences left between a peer run and a
peftkit run are the trainable parameters' initial values (the head and LoRA A are drawn from each tool's own
RNG stream) and the batch order. This script removes those two as well and compares what is left:

1. ``peer``: ``benchmarks/baseline_hf.py --peer careful`` on the data-size sweep's data and settings
   (``bench_tasks.prepare``/``peftkit_recipe``/``baseline_flags``, the sweep's epochs rule), in process. It
   records the trainable parameters' values before the first step, the row indices of every training batch
   (the Trainer's ``LengthGroupedSampler`` wrapped; the collated batches checked against them), the loss of
   every step (``Trainer.compute_loss`` wrapped), the gradient norm before the clip, each group's learning
   rate and AdamW settings at every step, the step-1 gradients before and after the clip, a digest of every
   frozen weight, the trained values and the dev metrics.
2. ``peftkit``: ``peftkit.train.training.train`` on the same recipe, with ``build_model`` (as
   ``peftkit.train.transfer`` calls it) wrapped so that the peer's initial values are copied into the trainable
   parameters right after the model is built, and ``plan_batches`` (in ``peftkit.train.training`` and
   ``peftkit.train.trainer``) replaced by the peer's recorded batches, epoch by epoch. The same
   things are recorded (the task's loss wrapped).
3. ``compare``: per-step loss, gradient-norm and learning-rate differences, the first step-1 difference
   (inputs, frozen weights, gradients, optimizer settings), the final weights and dev metrics;
   ``results.json`` and ``results.md`` in ``--out``.

    OMP_NUM_THREADS=1 python benchmarks/replay_peer.py                      # peer, peftkit, compare
    OMP_NUM_THREADS=1 python benchmarks/replay_peer.py --stop-after 40 --out benchmarks/results/replay_peer/40-steps
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from common import describe_machine, machine_info, results_dir, write_whole  # noqa: E402

DROPOUT_OFF = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=["all", "peer", "peftkit", "compare"], default="all")
    p.add_argument("--task", default="sst2")
    p.add_argument("--rows", type=int, default=250)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop both runs after this many steps (the schedule stays the full run's); 0: run to the end")
    p.add_argument("--work", default="/tmp/peftkit-replay-peer")
    p.add_argument("--out", help="default benchmarks/results/replay_peer")
    return p.parse_args(argv)


# ---- what both runs share ------------------------------------------------------------------------------------

def setup(args: argparse.Namespace, dropout_off: bool = True) -> tuple[Any, dict[str, Any], list[str], int]:
    """The sweep's data, recipe and peer flags for (task, rows, seed), dropout off where asked."""
    from bench_tasks import METHODS, TASKS, baseline_flags, peftkit_recipe, prepare
    from compare_methods import model_folder
    from sweep import epochs_for

    task = TASKS[args.task]
    work = Path(args.work)
    prepared = prepare(task, work / "data", train_rows=args.rows)
    epochs = epochs_for(prepared.n_train, task.batch_size)
    recipe = peftkit_recipe(prepared, METHODS["lora"], args.seed, work / "peftkit", epochs=epochs)
    if dropout_off:
        recipe["adapter"]["lora_dropout"] = 0.0
    flags = baseline_flags(recipe, model_folder(task.model), "careful")
    return prepared, recipe, flags, epochs


@contextlib.contextmanager
def dropout_off() -> Iterator[None]:
    """Every ``AutoModelForSequenceClassification.from_pretrained`` in the process gets MiniLM's dropouts at 0
    (the config keys both tools' loads pass through)."""
    from transformers import AutoModelForSequenceClassification as Auto

    original = Auto.from_pretrained

    def without_dropout(*a: Any, **kw: Any) -> Any:
        return original(*a, **{**kw, **DROPOUT_OFF})

    Auto.from_pretrained = without_dropout  # type: ignore[method-assign]
    try:
        yield
    finally:
        Auto.from_pretrained = original  # type: ignore[method-assign]


def active_dropouts(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


class Recorder:
    """What one run did, step by step: hooked into the clip (accelerate) and into every AdamW step (torch)."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.lrs: list[list[float]] = []
        self.groups: list[dict[str, Any]] = []
        self.grads_before_clip: dict[str, torch.Tensor] = {}
        self.grads_after_clip: dict[str, torch.Tensor] = {}
        self.first_batch: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._restore: list[Any] = []

    def watch(self, model: torch.nn.Module) -> None:
        self.names = {id(p): n for n, p in model.named_parameters()}

    def grads(self) -> dict[str, torch.Tensor]:
        return {self.names[i]: p.grad.detach().clone() for i, p in self._params.items() if p.grad is not None}

    def install(self, model: torch.nn.Module) -> None:
        import accelerate

        self.watch(model)
        self._params = {id(p): p for p in model.parameters() if p.requires_grad}
        original = accelerate.Accelerator.clip_grad_norm_
        recorder = self

        def clip(accel: Any, parameters: Any, max_norm: float, norm_type: float = 2) -> Any:
            parameters = list(parameters)
            first = not recorder.grad_norms
            if first:
                recorder.grads_before_clip = recorder.grads()
            norm = original(accel, parameters, max_norm, norm_type)
            recorder.grad_norms.append(float(norm))
            if first:
                recorder.grads_after_clip = recorder.grads()
            return norm

        accelerate.Accelerator.clip_grad_norm_ = clip  # type: ignore[method-assign]
        self._restore.append(lambda: setattr(accelerate.Accelerator, "clip_grad_norm_", original))

        def before_step(optimizer: Any, a: Any, kw: Any) -> None:
            self.lrs.append([float(g["lr"]) for g in optimizer.param_groups])
            if not self.groups:
                self.groups = [{**{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
                                   if k != "params" and isinstance(v, (int, float, bool, tuple, type(None)))},
                                "params": sorted(self.names[id(p)] for p in g["params"])}
                               for g in optimizer.param_groups]

        self._handles.append(register_optimizer_step_pre_hook(before_step))

    def uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        for undo in self._restore:
            undo()

    def loss(self, value: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        if not self.losses:
            self.first_batch = {k: v.detach().cpu().clone() for k, v in batch.items() if torch.is_tensor(v)}
        self.losses.append(float(value.detach()))


class StopRun(Exception):
    """Raised from the loss hook to end a ``--stop-after`` run."""


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen_digests(model: torch.nn.Module) -> dict[str, str]:
    return {n: digest(p) for n, p in model.named_parameters() if not p.requires_grad}


def record_of(rec: Recorder, model: torch.nn.Module, extra: dict[str, Any]) -> dict[str, Any]:
    return {"losses": rec.losses, "grad_norms": rec.grad_norms, "lrs": rec.lrs, "groups": rec.groups,
            "grads_before_clip": rec.grads_before_clip, "grads_after_clip": rec.grads_after_clip,
            "first_batch": rec.first_batch, "final": trainable(model), **extra}


# ---- stage 1: the peer -----------------------------------------------------------------------------------------

def run_peer(args: argparse.Namespace) -> Path:
    import baseline_hf
    from transformers import TrainerCallback

    _, _, flags, epochs = setup(args)
    work = Path(args.work)
    peer_args = baseline_hf.parse_args(flags + ["--out", str(work / "peer-trainer")])
    with dropout_off():
        built = baseline_hf.build(peer_args)
    model, trainer = built.model, built.trainer
    assert not active_dropouts(model), active_dropouts(model)
    init = trainable(model)
    frozen = frozen_digests(model)
    rec = Recorder()
    rec.install(model)
    train_ids = [list(x) for x in trainer.train_dataset["input_ids"]]

    # the batch order: the sampler's indices each epoch, cut in batches as the DataLoader's BatchSampler does
    epochs_seen: list[list[int]] = []
    make_sampler = trainer._get_train_sampler

    class Recording(torch.utils.data.Sampler):
        def __init__(self, inner: Any):
            self.inner = inner

        def __len__(self) -> int:
            return len(self.inner)

        def __iter__(self) -> Iterator[int]:
            order = list(iter(self.inner))
            epochs_seen.append(order)
            return iter(order)

    trainer._get_train_sampler = lambda *a, **kw: Recording(make_sampler(*a, **kw))
    collated: list[list[list[int]]] = []
    inner_collate = built.collator.inner

    def recording_collate(features: list[dict[str, Any]]) -> Any:
        collated.append([list(f["input_ids"]) for f in features])
        return inner_collate(features)

    built.collator.inner = recording_collate
    compute_loss = trainer.compute_loss

    def recorded_loss(model_: Any, inputs: dict[str, Any], *a: Any, **kw: Any) -> Any:
        out = compute_loss(model_, inputs, *a, **kw)
        if model_.training:
            rec.loss(out[0] if isinstance(out, tuple) else out, inputs)
        return out

    trainer.compute_loss = recorded_loss

    class StopAfter(TrainerCallback):
        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            if args.stop_after and state.global_step >= args.stop_after:
                control.should_training_stop = True

    trainer.add_callback(StopAfter())
    started = time.perf_counter()
    result = baseline_hf.train_and_evaluate(built, peer_args)
    seconds = time.perf_counter() - started
    rec.uninstall()
    batch_size = peer_args.batch_size
    batches = [[order[i:i + batch_size] for i in range(0, len(order), batch_size)] for order in epochs_seen]
    flat = [b for epoch in batches for b in epoch]
    # the collator saw the same rows the sampler gave, in the same order (the loader fetches ahead: a prefix)
    steps = len(rec.losses)
    mismatched = [k for k in range(min(steps, len(collated)))
                  if collated[k] != [train_ids[i] for i in flat[k]]]
    record = record_of(rec, model, {
        "tool": "peer", "flags": flags, "epochs": epochs, "init": init, "frozen": frozen, "train_ids": train_ids,
        "batches": batches, "collated_mismatches": mismatched, "metrics": result["metrics"],
        "seconds": round(seconds, 1), "total_steps": built.steps, "config": model.config.to_dict()})
    path = work / "peer.pt"
    torch.save(record, path)
    print(f"peer: {steps} steps, {len(batches)} epochs recorded, loss[0] {rec.losses[0]:.6f}, "
          f"metrics {result['metrics']}, {seconds:.0f} s")
    return path


# ---- stage 2: peftkit on the peer's init and batches ------------------------------------------------------------

def run_peftkit(args: argparse.Namespace) -> Path:
    from peftkit.config.recipe import build_recipe
    from peftkit.train import training

    _, recipe_dict, _, epochs = setup(args)
    work = Path(args.work)
    peer = torch.load(work / "peer.pt", weights_only=False)
    rec = Recorder()
    seen: dict[str, Any] = {}
    from peftkit.train import transfer

    build_model = transfer.build_model

    def build_from_peer(plan: Any, device: Any, start: Any = None) -> Any:
        built = build_model(plan, device, start)
        model = built.model
        assert not active_dropouts(model), active_dropouts(model)
        params = dict(model.named_parameters())
        names = {n for n, p in params.items() if p.requires_grad}
        if names != set(peer["init"]):
            raise SystemExit(f"trainable parameters differ: peftkit only {sorted(names - set(peer['init']))[:5]}, "
                             f"peer only {sorted(set(peer['init']) - names)[:5]}")
        seen["init_before_copy"] = trainable(model)
        with torch.no_grad():
            for n in names:
                params[n].copy_(peer["init"][n])
        seen["frozen"] = frozen_digests(model)
        seen["train_ids"] = [list(x) for x in plan.train_rows["input_ids"]]
        seen["config"] = model.config.to_dict()
        seen["model"], seen["plan"], seen["device"] = model, plan, device
        rec.install(model)
        task_loss = plan.task.loss

        def recorded(outputs: Any, batch: dict[str, Any]) -> Any:
            if args.stop_after and len(rec.losses) >= args.stop_after:
                raise StopRun
            value = task_loss(outputs, batch)
            rec.loss(value, batch)
            return value

        plan.task.loss = recorded
        return built

    def peer_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool,
                     num_processes: int = 1) -> list[list[int]]:
        if epoch >= len(peer["batches"]):  # the peer stopped (--stop-after) before this epoch
            raise StopRun
        return peer["batches"][epoch]

    from peftkit.train import trainer

    transfer.build_model = build_from_peer
    training.plan_batches = peer_batches  # the steps per epoch
    trainer.plan_batches = peer_batches  # the batches PeftkitTrainer trains on
    recipe = build_recipe(recipe_dict)
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    try:
        with dropout_off():
            metrics = training.train(recipe, overwrite=True, echo=lambda line: print(line, file=sys.stderr)).metrics
    except StopRun:  # evaluated as the end of a run would be, on the weights after --stop-after steps
        t = recipe.train
        metrics = training.Evaluator(seen["plan"], t.eval_batch_size or t.batch_size, seen["device"], 0, 1,
                                     False)(seen["model"])
    seconds = time.perf_counter() - started
    rec.uninstall()
    record = record_of(rec, seen["model"], {
        "tool": "peftkit", "epochs": epochs, "init_before_copy": seen["init_before_copy"], "frozen": seen["frozen"],
        "train_ids": seen["train_ids"], "metrics": metrics, "seconds": round(seconds, 1), "config": seen["config"]})
    path = work / "peftkit.pt"
    torch.save(record, path)
    print(f"peftkit: {len(rec.losses)} steps, loss[0] {rec.losses[0]:.6f}, metrics {metrics}, {seconds:.0f} s")
    return path


# ---- stage 3: compare -------------------------------------------------------------------------------------------

def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def tensor_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Largest absolute and relative (to the peer's norm) difference over matching tensors, and where."""
    worst, worst_rel, where = 0.0, 0.0, None
    for n in sorted(set(a) & set(b)):
        d = float((a[n].double() - b[n].double()).abs().max())
        r = float((a[n].double() - b[n].double()).norm() / max(float(b[n].double().norm()), 1e-30))
        if r > worst_rel:
            worst_rel, where = r, n
        worst = max(worst, d)
    return {"max_abs": worst, "max_rel_norm": worst_rel, "worst": where,
            "only_a": sorted(set(a) - set(b)), "only_b": sorted(set(b) - set(a))}


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    skip = {"_name_or_path", "transformers_version", "id2label", "label2id", "dtype", "torch_dtype", "architectures"}
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if k not in skip and a.get(k) != b.get(k)}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    peer = torch.load(work / "peer.pt", weights_only=False)
    mine = torch.load(work / "peftkit.pt", weights_only=False)
    steps = min(len(peer["losses"]), len(mine["losses"]))
    per_step = []
    for k in range(steps):
        pl, ml = peer["losses"][k], mine["losses"][k]
        per_step.append({
            "step": k + 1, "peer_loss": pl, "peftkit_loss": ml, "abs_diff": abs(pl - ml), "rel_diff": rel(ml, pl),
            "peer_grad_norm": peer["grad_norms"][k], "peftkit_grad_norm": mine["grad_norms"][k],
            "grad_norm_rel_diff": rel(mine["grad_norms"][k], peer["grad_norms"][k]),
            "peer_lr": peer["lrs"][k], "peftkit_lr": mine["lrs"][k],
        })
    frozen_differ = sorted(n for n in set(peer["frozen"]) & set(mine["frozen"])
                           if peer["frozen"][n] != mine["frozen"][n])
    fb_p, fb_m = peer["first_batch"], mine["first_batch"]
    first_batch = {k: (bool(torch.equal(fb_p[k], fb_m[k])) if k in fb_m and fb_p[k].shape == fb_m[k].shape
                       else f"shapes {tuple(fb_p[k].shape)} vs {tuple(fb_m[k].shape) if k in fb_m else None}")
                   for k in fb_p}
    first_batch.update({k: "peftkit only" for k in fb_m if k not in fb_p})
    groups_p = sorted(peer["groups"], key=lambda g: g["params"])
    groups_m = sorted(mine["groups"], key=lambda g: g["params"])
    group_diffs = []
    for gp, gm in zip(groups_p, groups_m):
        diff = {k: [gp.get(k), gm.get(k)] for k in sorted(set(gp) | set(gm))
                if k not in ("params", "lr", "initial_lr") and gp.get(k) != gm.get(k)}
        if gp["params"] != gm["params"]:
            diff["params"] = "different parameter sets"
        group_diffs.append(diff)
    window = min(steps, 40)
    diffs = [s["rel_diff"] for s in per_step]
    checks = {
        "rows_identical": peer["train_ids"] == mine["train_ids"],
        "peer_collated_batches_match_sampler": not peer["collated_mismatches"],
        "config_differences": config_differences(peer["config"], mine["config"]),
        "frozen_weights_differing": frozen_differ,
        "frozen_weights_compared": len(set(peer["frozen"]) & set(mine["frozen"])),
        "first_batch_tensors_equal": first_batch,
        "init_peftkit_own_vs_peer": tensor_gap(mine["init_before_copy"], peer["init"]),
        "optimizer_group_differences": group_diffs,
        "n_groups": [len(groups_p), len(groups_m)],
        "lr_max_abs_diff": max((abs(a - b) for s in per_step for a, b in zip(s["peer_lr"], s["peftkit_lr"])),
                               default=0.0),
        "step1_grads_before_clip": tensor_gap(mine["grads_before_clip"], peer["grads_before_clip"]),
        "step1_grads_after_clip": tensor_gap(mine["grads_after_clip"], peer["grads_after_clip"]),
        "final_weights": tensor_gap(mine["final"], peer["final"]),
    }
    summary = {
        "steps_compared": steps,
        "step1_rel_diff": diffs[0] if diffs else None,
        f"max_rel_diff_first_{window}": max(diffs[:window], default=None),
        f"max_abs_diff_first_{window}": max((s["abs_diff"] for s in per_step[:window]), default=None),
        "max_rel_diff_all": max(diffs, default=None),
        "max_abs_diff_all": max((s["abs_diff"] for s in per_step), default=None),
        "max_grad_norm_rel_diff_all": max((s["grad_norm_rel_diff"] for s in per_step), default=None),
        "first_step_rel_diff_over_1e-4": next((s["step"] for s in per_step if s["rel_diff"] > 1e-4), None),
        "peer_metrics": peer["metrics"], "peftkit_metrics": mine["metrics"],
        "peer_seconds": peer["seconds"], "peftkit_seconds": mine["seconds"],
    }
    return {"per_step": per_step, "checks": checks, "summary": summary, "peer_flags": peer["flags"],
            "epochs": peer["epochs"], "total_steps": peer["total_steps"], "batches": peer["batches"]}


# ---- report -----------------------------------------------------------------------------------------------------

def write_report(args: argparse.Namespace, result: dict[str, Any], folder: Path) -> None:
    info = machine_info()
    result = {"machine": info, "machine_line": describe_machine(info), "task": args.task, "rows": args.rows,
              "seed": args.seed, "stop_after": args.stop_after, "dropout": DROPOUT_OFF | {"lora_dropout": 0.0},
              **result}
    write_whole(folder / "results.json", json.dumps(result, indent=1, default=str) + "\n")
    write_whole(folder / "results.md", markdown(result))
    print(json.dumps(result["summary"], indent=1, default=str))


def _pct(metrics: dict[str, Any]) -> str:
    return f"{100 * metrics['accuracy']:.2f} %" if metrics else "-"


def markdown(result: dict[str, Any]) -> str:
    """results.md: what was compared, the per-step table, the checks and what follows from them."""
    s, c, steps = result["summary"], result["checks"], result["per_step"]
    n = len(steps)
    shown = [st for st in steps if st["step"] <= 10 or st["step"] % 10 == 0 or st["step"] == n]
    identical = s["max_abs_diff_all"] == 0.0 and c["final_weights"]["max_abs"] == 0.0
    close = s["step1_rel_diff"] is not None and s["step1_rel_diff"] < 1e-4 and (s["max_rel_diff_all"] or 0) < 1e-3
    stop = f", stopped after {result['stop_after']} of {result['total_steps']} steps (the schedule is the full " \
           f"run's)" if result["stop_after"] else f", all {result['total_steps']} steps"
    lines = [
        f"# Replaying the careful peer inside peftkit: {result['task']}, {result['rows']} rows, LoRA, "
        f"seed {result['seed']}",
        "",
        "Made by `benchmarks/replay_peer.py` (issue 14 part 4, first bullet); every number is in `results.json`.",
        "",
        f"Machine: {result['machine_line']}.",
        "",
        "## What was compared",
        f"The data-size sweep's run (`bench_tasks.prepare`, `peftkit_recipe`, `baseline_flags`, {result['epochs']} "
        f"epochs by the sweep's rule{stop}), made deterministic: MiniLM's hidden, attention and classifier dropout "
        "at 0 in the model config for both tools, `lora_dropout` 0. The careful peer "
        "(`baseline_hf.py --peer careful`: peft `LoraConfig`, Trainer with `group_by_length`, fused AdamW groups, "
        "transformers' linear schedule) ran first and recorded its trainable parameters' initial values, the row "
        "indices of every batch (its `LengthGroupedSampler` wrapped; the collated batches checked against them), "
        "and per step the loss (`Trainer.compute_loss` wrapped), the gradient norm before the clip "
        "(`Accelerator.clip_grad_norm_` wrapped, shared by both tools) and each AdamW group's learning rate "
        "(a global optimizer step pre-hook). Then `peftkit.train.training.train` ran the same recipe with "
        "`build_model` (as `peftkit.train.transfer` calls it) wrapped to copy the peer's initial values into the "
        "trainable parameters, and `plan_batches` replaced by the peer's batches, epoch by epoch; its loss was "
        "recorded by wrapping the task's loss.",
        "",
        "## Per step",
        f"Max |loss difference| over the first {min(n, 40)} steps: {s[f'max_abs_diff_first_{min(n, 40)}']:.3g} "
        f"(relative {s[f'max_rel_diff_first_{min(n, 40)}']:.3g}); over all {n} steps: {s['max_abs_diff_all']:.3g} "
        f"(relative {s['max_rel_diff_all']:.3g}). Gradient norm before the clip, largest relative difference: "
        f"{s['max_grad_norm_rel_diff_all']:.3g}. Learning rates, largest difference over every step and group: "
        f"{c['lr_max_abs_diff']:.3g}.",
        "",
        "| step | peer loss | peftkit loss | abs. difference | peer grad norm | peftkit grad norm | lr (both) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {st['step']} | {st['peer_loss']:.7f} | {st['peftkit_loss']:.7f} | {st['abs_diff']:.2g} | "
          f"{st['peer_grad_norm']:.6f} | {st['peftkit_grad_norm']:.6f} | "
          f"{'/'.join(f'{lr:.3g}' for lr in st['peer_lr'])} |" for st in shown],
        "",
        "## Checks",
        f"- rows: the two tools tokenized the {result['rows']} rows identically: {c['rows_identical']}; the peer's "
        f"collated batches are the rows its sampler gave: {c['peer_collated_batches_match_sampler']}",
        f"- step 1 batch (input_ids, token_type_ids, attention_mask, labels) equal: {c['first_batch_tensors_equal']}",
        f"- frozen weights: {c['frozen_weights_compared']} tensors compared by digest, differing: "
        f"{c['frozen_weights_differing'] or 'none'}",
        f"- peftkit's own initial trainable values (before the copy) against the peer's: largest difference "
        f"{c['init_peftkit_own_vs_peer']['max_abs']:.3g}",
        f"- optimizer: {c['n_groups'][0]} group(s) in the peer, {c['n_groups'][1]} in peftkit; settings that "
        f"differ (betas, eps, weight decay, fused, ...): {[d for d in c['optimizer_group_differences'] if d] or 'none'}",
        f"- step-1 gradients, largest difference before the clip {c['step1_grads_before_clip']['max_abs']:.3g}, "
        f"after it {c['step1_grads_after_clip']['max_abs']:.3g}",
        f"- trained weights at the end, largest difference {c['final_weights']['max_abs']:.3g}",
        f"- model config keys that differ (read after the peer's training, before peftkit's): "
        f"{c['config_differences'] or 'none'}",
        f"- dev accuracy: peer {_pct(s['peer_metrics'])}, peftkit {_pct(s['peftkit_metrics'])}",
        "",
        "## Conclusion",
    ]
    if identical:
        lines.append(
            "Bit for bit the same training: with the same initial values, the same batches and no dropout, every "
            "step's loss and gradient norm, every learning rate and the trained weights are equal to the last bit, "
            "and so is the dev accuracy. peftkit's loop, collation, optimizer groups, clip and schedule are the "
            "peer's. At the same seed the two tools already draw the same initial values (peftkit's own start "
            "equals the peer's, above), so a gap between them in the sweep's runs comes from the batch order "
            "(peftkit's `plan_batches` draws from Python's `random`, the peer's `LengthGroupedSampler` from "
            "torch's global generator, which also moves every dropout mask after it): seed noise, not a "
            "different training. How large that noise is at this size (3 seeds of each tool, dropout on) is "
            "not measured here.")
    elif close:
        lines.append("The same training to float32 noise: no step differs by more than the tolerance above.")
    else:
        lines.append(f"The runs differ: the first step whose loss differs by more than 1e-4 relative is "
                     f"{s['first_step_rel_diff_over_1e-4']}; see the checks above for the first difference.")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    folder = results_dir("replay_peer", args.out)
    if args.stage == "all":  # each run in its own process, one after the other
        for stage in ("peer", "peftkit", "compare"):
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--stage", stage], check=True)
        return
    if args.stage == "peer":
        run_peer(args)
    elif args.stage == "peftkit":
        run_peftkit(args)
    else:
        write_report(args, compare(args), folder)


if __name__ == "__main__":
    main()
