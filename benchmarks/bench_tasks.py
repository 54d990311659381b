"""The benchmark tasks and methods: the same rows and settings for peftkit and for the hand-written peers.

Each task's rows are drawn once (data seed 0, independent of the training seed) and written as JSON lines into
the run's work folder, so both tools train and evaluate on exactly the same examples; the training seed
varies the initialisation, dropout and batch order only. A method is a quantization plus an adapter, written
once here and turned into a peftkit recipe, from which the peers' flags are read.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from common import SHARED_DATA

# where the readers look; compare_methods --data-root points it elsewhere (tests use tiny files)
DATA_ROOT = [SHARED_DATA]


def _tsv(path: Path, header: bool = True) -> list[list[str]]:
    # GLUE's files hold bare quotes as text; MRPC's dev file starts with a byte-order mark
    with path.open(encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r for r in (rows[1:] if header else rows) if r]


def _clean(text: str) -> str:
    return " ".join(text.split())


def read_sst2(split: str) -> list[dict[str, str]]:
    rows = _tsv(DATA_ROOT[0] / "glue" / "SST-2" / f"{'train' if split == 'train' else 'dev'}.tsv")
    return [{"text": _clean(r[0]), "label": r[1]} for r in rows]


def read_rte(split: str) -> list[dict[str, str]]:
    rows = _tsv(DATA_ROOT[0] / "glue" / "RTE" / f"{'train' if split == 'train' else 'dev'}.tsv")
    return [{"text": _clean(r[1]), "text_pair": _clean(r[2]), "label": r[3]} for r in rows]


def read_mrpc(split: str) -> list[dict[str, str]]:
    rows = _tsv(DATA_ROOT[0] / "glue" / "MRPC" / f"{'train' if split == 'train' else 'dev'}.tsv")
    return [{"text": _clean(r[3]), "text_pair": _clean(r[4]), "label": r[0]} for r in rows]


def read_stsb(split: str) -> list[dict[str, str]]:
    # columns: index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score (0-5)
    rows = _tsv(DATA_ROOT[0] / "glue" / "STS-B" / f"{'train' if split == 'train' else 'dev'}.tsv")
    return [{"text": _clean(r[7]), "text_pair": _clean(r[8]), "label": r[9]} for r in rows]


def read_agnews(split: str) -> list[dict[str, str]]:
    rows = _tsv(DATA_ROOT[0] / "agnews" / f"{'train' if split == 'train' else 'test'}.tsv", header=False)
    return [{"text": _clean(r[0]), "label": r[1]} for r in rows]


def read_cola(split: str) -> list[dict[str, str]]:
    # no header; columns: source, label, the original author's mark, sentence
    rows = _tsv(DATA_ROOT[0] / "glue" / "CoLA" / f"{'train' if split == 'train' else 'dev'}.tsv", header=False)
    return [{"text": _clean(r[3]), "label": r[1]} for r in rows]


def read_sms(split: str) -> list[dict[str, str]]:
    # one file (header "Label SMS", labels ham/spam), no dev split: 1,000 rows held out (a fifth of a smaller file).
    # The file repeats some messages: 90 of the held-out texts also stand among the training rows
    rows = _tsv(DATA_ROOT[0] / "sms_spam" / "SMSSpamCollection")
    return [{"text": _clean(rows[i][1]), "label": rows[i][0]} for i in _held_out(len(rows), min(1000, len(rows) // 5),
                                                                                 split)]


def read_alpaca(split: str) -> list[dict[str, str]]:
    rows = json.loads((DATA_ROOT[0] / "instruct" / "alpaca_en_demo.json").read_text())
    return [{"instruction": rows[i]["instruction"], "input": rows[i].get("input", ""), "output": rows[i]["output"]}
            for i in _held_out(len(rows), max(1, len(rows) // 20), split)]


def _held_out(n_rows: int, n_eval: int, split: str) -> list[int]:
    """One fixed held-out split of a file without one: the first ``n_eval`` of a seeded shuffle are the eval rows."""
    order = list(range(n_rows))
    random.Random(0).shuffle(order)
    return order[:n_eval] if split == "eval" else order[n_eval:]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "classification", "regression" or "causal_lm"
    model: str  # a packaged peftkit model name
    read: Callable[[str], list[dict[str, str]]]
    metric: str  # what the tables compare: accuracy, matthews, macro_f1, pearson (higher is better), loss (lower)
    train_rows: int
    eval_rows: Optional[int]
    max_length: int
    batch_size: int
    lr: float  # the adapters' learning rate; full fine-tuning uses full_lr
    full_lr: float
    r: int = 8
    max_steps: Optional[int] = None
    eval_batch_size: int = 64

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "loss"


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", "classification", "minilm", read_sst2, "accuracy", 2000, None, 64, 32, 1e-3, 1e-4),
    "rte": TaskSpec("rte", "classification", "minilm", read_rte, "accuracy", 2490, None, 128, 32, 1e-3, 1e-4),
    "mrpc": TaskSpec("mrpc", "classification", "minilm", read_mrpc, "accuracy", 2000, None, 128, 32, 1e-3, 1e-4),
    "agnews": TaskSpec("agnews", "classification", "minilm", read_agnews, "accuracy", 2000, 1000, 128, 32, 1e-3,
                       1e-4),
    # MiniLM's tokenizer cuts no CoLA training row at 64 tokens (longest 30 of 8,551 rows) and 98 of the 5,574
    # SMS rows (1.8 %; median 22 tokens, longest 117)
    "cola": TaskSpec("cola", "classification", "minilm", read_cola, "matthews", 2000, None, 64, 32, 1e-3, 1e-4),
    "sms": TaskSpec("sms", "classification", "minilm", read_sms, "macro_f1", 2000, None, 64, 32, 1e-3, 1e-4),
    # STS-B's pairs: 2 of the 5,749 training pairs pass 128 MiniLM tokens
    "stsb": TaskSpec("stsb", "regression", "minilm", read_stsb, "pearson", 2000, None, 128, 32, 1e-3, 1e-4),
    "alpaca": TaskSpec("alpaca", "causal_lm", "smollm2-135m", read_alpaca, "loss", 999, 24, 96, 4, 2e-4, 2e-5,
                       r=16, max_steps=8, eval_batch_size=8),
}


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    bits: Optional[int]  # None: float32 base
    adapter: Optional[str]  # None: full fine-tuning
    # adapter keys beyond peftkit's defaults: the levers issue 14 asks to measure before any becomes a default
    adapter_options: tuple[tuple[str, Any], ...] = ()
    task_options: tuple[tuple[str, Any], ...] = ()  # task keys beyond the head's defaults (a regressor's start)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("full", "full fine-tuning", None, None),
    Method("lora", "LoRA fp32", None, "lora"),
    Method("lora-8bit", "LoRA 8-bit", 8, "lora"),
    Method("qlora", "QLoRA NF4", 4, "lora"),
    Method("adalora", "AdaLoRA fp32", None, "adalora"),
    Method("adalora-4bit", "AdaLoRA NF4", 4, "adalora"),
    Method("qlora-loftq", "QLoRA NF4, LoftQ init", 4, "lora", (("init", "loftq"),)),
    # LoRA+'s published ratio (Hayou et al. 2024, and peft's create_loraplus_optimizer example): B at 16x A's lr
    Method("qlora-loraplus", "QLoRA NF4, LoRA+ 16", 4, "lora", (("loraplus_lr_ratio", 16),)),
    # AdaLoRA's levers on the smallest sizes, where it trailed LoRA (issue 14): its dropout before 0.05 became the
    # default (commit ba24ebc; the sweep's "adalora" runs are at 0.05), and no 2x lr
    Method("adalora-dropout0", "AdaLoRA fp32, dropout 0 (the default before ba24ebc)", None, "adalora",
           (("lora_dropout", 0.0),)),
    Method("adalora-lr1", "AdaLoRA fp32, adapter at 1x lr", None, "adalora", (("lr_scale", 1.0),)),
    # a regressor's output bias at 0 instead of the training targets' mean (peftkit/tasks/regression.py)
    Method("lora-start0", "LoRA fp32, regressor starting at 0", None, "lora", task_options=(("start_at_mean", False),)),
]}


@dataclass
class Prepared:
    """A task's data written for one invocation: both tools read these files whole."""

    task: TaskSpec
    train_file: Path
    eval_file: Path
    n_train: int
    n_eval: int
    labels: list[str] = field(default_factory=list)


def prepare(task: TaskSpec, folder: Path, train_rows: Optional[int] = None,
            eval_rows: Optional[int] = None) -> Prepared:
    train = task.read("train")
    evaluation = task.read("eval")
    rng = random.Random(0)
    n_train = min(train_rows or task.train_rows, len(train))
    train = rng.sample(train, n_train) if n_train < len(train) else train
    n_eval = eval_rows or task.eval_rows
    if n_eval and n_eval < len(evaluation):
        evaluation = rng.sample(evaluation, n_eval)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, rows in (("train", train), ("eval", evaluation)):
        path = folder / f"{task.name}-{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    labels = sorted({r["label"] for r in train}) if task.kind == "classification" else []
    return Prepared(task, paths[0], paths[1], len(train), len(evaluation), labels)


def peftkit_recipe(prepared: Prepared, method: Method, seed: int, out: Path, epochs: float = 1) -> dict[str, Any]:
    """The peftkit recipe (as a dict) for one run of ``epochs`` over the rows (a step-limited task's
    ``max_steps`` overrides it); :func:`baseline_flags` reads the peers' settings from it.

    It evaluates once, at the end, and keeps no checkpoint on the way, as the peers' ``Trainer`` does: left at
    peftkit's defaults (each epoch), a 17-epoch run would evaluate 17 times and save 16 checkpoints inside its
    training time, and neither changes what is learned.
    """
    from peftkit.core.data import total_steps

    task = prepared.task
    steps = total_steps(prepared.n_train, task.batch_size, 1, epochs, task.max_steps)
    adapter: Optional[dict[str, Any]] = None
    if method.adapter == "lora":
        adapter = {"method": "lora", "r": task.r, "lora_alpha": 2 * task.r, "lora_dropout": 0.05,
                   "target_modules": "all-linear"}
    elif method.adapter == "adalora":
        # rank 1.5 r pruned to an average of r: the same final budget as LoRA r; peftkit's AdaLoRA defaults
        adapter = {"method": "adalora", "init_r": task.r * 3 // 2, "target_r": task.r, "target_modules": "all-linear"}
    if adapter is not None:
        adapter.update(method.adapter_options)
    quantization: dict[str, Any] = {"bits": method.bits}
    if method.bits == 4:
        quantization.update(quant_type="nf4", double_quant=True, compute_dtype="float32")
    if task.kind == "classification":
        task_section: dict[str, Any] = {"type": "classification", "labels": prepared.labels}
        columns = {"text": "text", "label": "label", **({"text_pair": "text_pair"} if task.name in ("rte", "mrpc")
                                                         else {})}
    elif task.kind == "regression":
        task_section = {"type": "regression", **dict(method.task_options)}
        columns = {"text": "text", "text_pair": "text_pair", "label": "label"}
    else:
        task_section = {"type": "causal_lm", "format": "instruction", "mask_prompt": True}
        columns = {"prompt": "instruction", "input": "input", "response": "output"}
    return {
        "base": {"model": task.model},
        "quantization": quantization,
        "adapter": adapter,
        "task": task_section,
        "data": {"train": str(prepared.train_file), "eval": str(prepared.eval_file), "columns": columns,
                 "max_length": task.max_length},
        "train": {"epochs": epochs, "max_steps": task.max_steps, "batch_size": task.batch_size,
                  "eval_batch_size": task.eval_batch_size, "lr": task.full_lr if method.adapter is None else task.lr,
                  "head_lr": None, "warmup_ratio": 0.06, "max_grad_norm": 1.0, "weight_decay": 0.0, "seed": seed,
                  "eval_every": steps, "save_every": steps, "progress": False},
        "output": {"name": f"{task.name}-{method.name}-{seed}", "registry": str(out / "adapters"),
                   "runs": str(out / "runs")},
    }


def baseline_flags(recipe: dict[str, Any], model_dir: Path, peer: str = "careful") -> list[str]:
    """The hand-written peer's flags for the run ``recipe`` describes: the dict peftkit trains from, read as
    peftkit resolves it (its defaults included: AdaLoRA's alpha 128, adapter at twice ``train.lr``, ...).

    The careful peer gets every setting peftkit trains with; a recipe setting it cannot reproduce raises
    ValueError. The naive peer gets what the original baseline took (data, rank, learning rate, lengths, batch
    sizes, seed) and keeps its own defaults for the rest.
    """
    from peftkit.config.recipe import AdaLoraSection, build_recipe

    rec = build_recipe(recipe)
    t, adapter = rec.train, rec.adapter
    adalora = isinstance(adapter, AdaLoraSection)
    flags = ["--peer", peer, "--task", rec.task.type, "--model-dir", str(model_dir), "--train", rec.data.train,
             "--eval", str(rec.data.eval), "--method", rec.method, "--bits", str(rec.quantization.bits or 0),
             "--max-length", str(rec.data.max_length), "--batch-size", str(t.batch_size),
             "--eval-batch-size", str(t.eval_batch_size or t.batch_size), "--lr", str(t.lr), "--seed", str(t.seed),
             "--epochs", str(t.epochs)]
    if adapter is not None:
        flags += ["--r", str(adapter.target_r if adalora else adapter.r)]
    if t.max_steps:
        flags += ["--max-steps", str(t.max_steps)]
    labels = rec.task.options().get("labels")
    if labels:
        flags += ["--labels", ",".join(labels)]
    if peer == "naive":
        return flags
    if rec.task.type == "regression" and rec.task.options().get("start_at_mean", True):
        flags += ["--start-at-mean"]
    _check_reproducible(rec)
    flags += ["--weight-decay", str(t.weight_decay), "--scheduler", t.scheduler, "--warmup-ratio", str(t.warmup_ratio),
              "--max-grad-norm", str(t.max_grad_norm or 0)]
    if t.head_lr:
        flags += ["--head-lr", str(t.head_lr)]
    if adapter is None:
        return flags
    targets = adapter.target_modules
    flags += ["--lora-alpha", str(adapter.lora_alpha), "--lora-dropout", str(adapter.lora_dropout),
              "--targets", targets if isinstance(targets, str) else ",".join(targets)]
    if not adalora:  # the levers, passed only when set: a default recipe's flags are unchanged
        flags += ["--init", adapter.init] if adapter.init != "default" else []
        flags += ["--loraplus-lr-ratio", str(adapter.loraplus_lr_ratio)] if adapter.loraplus_lr_ratio else []
    else:
        flags += ["--init-r", str(adapter.init_r), "--adapter-lr-scale", str(adapter.lr_scale),
                  "--adalora-warmup", str(adapter.warmup), "--adalora-final", str(adapter.final),
                  "--adalora-interval", str(adapter.interval), "--beta1", str(adapter.beta1),
                  "--beta2", str(adapter.beta2), "--orth-reg-weight", str(adapter.orth_reg_weight),
                  "--orth-reg-form", adapter.orth_reg_form, *(["--orthogonal-init"] if adapter.orthogonal_init else [])]
    return flags


def _check_reproducible(rec: Any) -> None:
    """Refuse a recipe whose settings the careful peer does not write (it would train something else)."""
    q, adapter = rec.quantization, rec.adapter
    unsupported = {
        "train.grad_accum": rec.train.grad_accum != 1,
        "train.gradient_checkpointing": rec.train.gradient_checkpointing,
        "train.group_by_length": not rec.train.group_by_length,
        "base.dtype": rec.base.dtype != "float32",
        "data.also": bool(rec.data.also),
        "quantization": q.bits == 4 and (q.quant_type, q.double_quant, q.compute_dtype) != ("nf4", True, "float32"),
        "adapter.layers": adapter is not None and adapter.layers is not None,
        "adapter.init_from": adapter is not None and adapter.init_from is not None,
        "adapter (rslora, dora, rank_pattern_from)": adapter is not None and any(
            getattr(adapter, k, None) for k in ("use_rslora", "use_dora", "rank_pattern_from")),
    }
    refused = [key for key, bad in unsupported.items() if bad]
    if refused:
        raise ValueError(f"the careful peer does not reproduce {', '.join(refused)}; keep their defaults")
