"""Issue 15: does peftkit on transformers' Trainer train what the hand-written loop trained, bit for bit?

    python benchmarks/results/trainer-port/equivalence.py OLD_CHECKOUT NEW_CHECKOUT

Trains three recipes on the tests' tiny models with each checkout's peftkit (each in its own process, its checkout
first on PYTHONPATH), with and without dropout (the model's 0.1 and the adapter's 0.1), and prints the largest
relative difference of any trained tensor: LoRA on a 4-bit base (4 steps, lr 2e-2), AdaLoRA with accumulation 2
(12 steps, pruning included), a causal LM with accumulation 2 (token-normalized loss). The old checkout used here
is 9f4c589, the last commit of the hand-written loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    "lora-4bit": dict(quant="4bit", train={"max_steps": 4, "eval_at_start": False, "lr": 2e-2}),
    "adalora-fp32-accum2": dict(adapter="adalora", train={"max_steps": 12, "eval_at_start": False, "grad_accum": 2,
                                                          "batch_size": 8}),
    "causal-lm-accum2": dict(task="causal_lm", train={"max_steps": 6, "eval_at_start": False, "grad_accum": 2,
                                                      "batch_size": 4}),
}

WORKER = r'''
import json, sys, torch
from pathlib import Path
sys.path.insert(1, sys.argv[4])  # the tests' helpers, from the new checkout
from tests import tiny
from tests.conftest import make_recipe
try:  # the layout since the subpackages; the old checkout has its modules at the top
    from peftkit.config.recipe import build_recipe
    from peftkit.train.training import train
except ImportError:
    from peftkit.recipe import build_recipe
    from peftkit.training import train
root, out, dropout = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "dropout"
cases = json.loads(sys.argv[5])
if not (root / "bert").exists():
    tiny.build_bert(root / "bert"); tiny.build_llama(root / "llama")
    tiny.write_tsv(root / "cls_train.tsv", tiny.sentiment_rows(256, seed=1))
    tiny.write_tsv(root / "cls_dev.tsv", tiny.sentiment_rows(64, seed=2))
    tiny.write_instructions(root / "instruct.json", 96, seed=3)
    if not dropout:
        for m in ("bert", "llama"):
            c = json.loads((root / m / "config.json").read_text())
            for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout"):
                if k in c: c[k] = 0.0
            (root / m / "config.json").write_text(json.dumps(c))
result = {}
for name, kw in cases.items():
    data = make_recipe(root, out / name, **kw)
    if dropout and data["adapter"]:
        data["adapter"]["lora_dropout"] = 0.1
    r = train(build_recipe(data), echo=lambda l: None)
    result[name] = {n: p.detach().clone() for n, p in r.model.named_parameters() if p.requires_grad}
torch.save(result, out / "weights.pt")
'''


def run(checkout: Path, models: Path, out: Path, dropout: str, new: Path) -> dict:
    import torch

    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", WORKER, str(models), str(out), dropout, str(new), json.dumps(CASES)],
                   env=env, check=True, capture_output=True)
    return torch.load(out / "weights.pt", weights_only=True)


def main() -> None:
    old, new = (Path(p).resolve() for p in sys.argv[1:3])
    work = Path(tempfile.mkdtemp(prefix="trainer-port-"))
    lines = ["| case | dropout | largest relative difference of a trained tensor |", "|---|---|---|"]
    for dropout in ("none", "dropout"):
        models = work / f"models-{dropout}"
        a = run(old, models, work / f"old-{dropout}", dropout, new)
        b = run(new, models, work / f"new-{dropout}", dropout, new)
        for case in CASES:
            diff = max(float((a[case][n] - b[case][n]).abs().max() / a[case][n].abs().max().clamp(min=1e-12))
                       for n in a[case])
            lines.append(f"| {case} | {'0.1 (model and adapter)' if dropout == 'dropout' else 'off'} | {diff:.3g} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
