"""What 4-bit quantization does to a base before any training: its features against the float32 base's.

    python benchmarks/nf4_drift.py                      # MiniLM, 512 SST-2 dev sentences, NF4 + FP4, 8-bit
    python benchmarks/nf4_drift.py --model minilm --rows 256 --data ../shared/data/agnews/test.tsv --column 0

The same sentences go through the float32 base and each quantized copy (peftkit's loader and its
``dequantized`` CPU path, as in training, so the figures are the weights' rounding and nothing else). Per
layer: the hidden states' relative error ``||h_q - h|| / ||h||`` over real tokens. For the sentence features a
classification head reads (the pooler output and the mean of the last layer): the relative error, and the
figure that matters for a head that has to separate sentences, **drift over spread**: the mean distance
between a sentence's quantized and float32 features, divided by the mean distance of the float32 features from
their own centroid. Near 0, quantization barely moves a sentence against how far sentences lie apart; near 1,
the quantized base blurs sentences as much as they differ.

Results: ``benchmarks/results/nf4_drift/`` (JSON and Markdown).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any, Optional

from common import SHARED_DATA, describe_machine, fail, fmt, machine_info, markdown_table, results_dir, write_results

SETTINGS = {
    "nf4": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"},
    "fp4": {"bits": 4, "quant_type": "fp4", "double_quant": True, "compute_dtype": "float32"},
    "int8": {"bits": 8},
}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--data", default=str(SHARED_DATA / "glue" / "SST-2" / "dev.tsv"))
    p.add_argument("--column", default="sentence", help="the text column: a header name, or an index")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.rows < 2:
        fail("--rows: give at least 2 sentences (the spread needs two)")
    if not Path(args.data).is_file():
        fail(f"--data: {args.data} is not a file")
    return args


def read_texts(path: str, column: str, n: int) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    if column.isdigit():
        return [r[int(column)] for r in rows[:n] if r]
    if column not in rows[0]:
        fail(f"--column: {column!r} is not in {path}'s header {rows[0]}")
    index = rows[0].index(column)
    return [r[index] for r in rows[1 : n + 1] if r]


def features(model: Any, batches: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    hidden: list[list[Any]] = []
    pooled, mean_last = [], []
    with torch.no_grad():
        for batch in batches:
            out = model(**batch, output_hidden_states=True)
            mask = batch["attention_mask"].unsqueeze(-1).float()
            hidden.append([h * mask for h in out.hidden_states])
            pooled.append(out.pooler_output)
            mean_last.append((out.last_hidden_state * mask).sum(1) / mask.sum(1))
    layers = [torch.cat([b[i].flatten(0, 1) for b in hidden]) for i in range(len(hidden[0]))]
    return {"layers": layers, "pooler": torch.cat(pooled), "mean_last": torch.cat(mean_last)}


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    import torch

    def rel(a: Any, b: Any) -> float:
        return float(torch.linalg.vector_norm(b - a) / torch.linalg.vector_norm(a))

    out: dict[str, Any] = {"layer_relative_error": [rel(a, b) for a, b in zip(ref["layers"], got["layers"])]}
    for key in ("pooler", "mean_last"):
        a, b = ref[key], got[key]
        drift = float((b - a).norm(dim=1).mean())
        spread = float((a - a.mean(0)).norm(dim=1).mean())
        out[key] = {"relative_error": rel(a, b), "drift": drift, "spread": spread, "drift_over_spread": drift / spread,
                    "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())}
    return out


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    import warnings

    import torch
    from transformers import AutoModel

    from peftkit.core.models import load_pretrained, load_tokenizer, resolve_base
    from peftkit.core.quantized import freeze_quantized_layers
    from peftkit.config.recipe import BaseModelSection, QuantizationSection

    base = BaseModelSection(model=args.model)
    ref = resolve_base(base)
    tokenizer = load_tokenizer(ref, base)
    texts = read_texts(args.data, args.column, args.rows)
    batches = [dict(tokenizer(texts[i : i + 64], padding=True, truncation=True, max_length=args.max_length,
                              return_tensors="pt")) for i in range(0, len(texts), 64)]
    torch.manual_seed(0)
    # bitsandbytes' 8-bit matmul says it casts to float16 on every call: the setting, not news
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")

    def load(quant: dict[str, Any]) -> Any:
        model = load_pretrained(AutoModel, ref, base, QuantizationSection(**quant), [], torch.device("cpu"))
        freeze_quantized_layers(model, packed_inference=False)
        return model.eval()

    reference = features(load({"bits": None}), batches)
    results = {name: compare(reference, features(load(SETTINGS[name]), batches)) for name in args.settings}
    info = machine_info()
    rows = [{"setting": name, **r} for name, r in results.items()]
    table = markdown_table(rows, [
        ("base", lambda r: r["setting"]),
        ("embeddings rel. error", lambda r: fmt(r["layer_relative_error"][0], 4)),
        ("last layer rel. error", lambda r: fmt(r["layer_relative_error"][-1], 4)),
        ("pooler rel. error", lambda r: fmt(r["pooler"]["relative_error"], 4)),
        ("pooler drift / spread", lambda r: fmt(r["pooler"]["drift_over_spread"], 3)),
        ("mean-pooled drift / spread", lambda r: fmt(r["mean_last"]["drift_over_spread"], 3)),
        ("mean-pooled cosine", lambda r: fmt(r["mean_last"]["cosine"], 4)),
    ])
    per_layer = markdown_table(rows, [("base", lambda r: r["setting"])] + [
        (f"layer {i}", (lambda i: lambda r: fmt(r["layer_relative_error"][i], 3))(i))
        for i in range(len(reference["layers"]))])
    markdown = (f"# {args.model}: quantized base against float32, before training\n\n{len(texts)} sentences of "
                f"{args.data}, max_length {args.max_length}; {describe_machine(info)}.\n\n{table}\n\n"
                f"Hidden states' relative error per layer (0 = embeddings):\n\n{per_layer}\n")
    folder = results_dir("nf4_drift", args.out)
    write_results(folder, {"args": vars(args), "machine": info, "results": results}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
