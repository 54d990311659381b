"""How many tokens a training epoch computes on, under three ways of batching the same rows.

A transformer's cost grows with ``batch rows x padded length``, so the share of padding is a direct, noise-free
measure of what length-grouped batches save before any timing is taken:

* ``max_length``: every row padded to ``data.max_length`` (``padding="max_length"``, run_glue.py's default);
* ``random``: rows in random order, each batch padded to its longest row (``DataCollatorWithPadding``, the
  baseline);
* ``peftkit``: peftkit's own batch plan (``peftkit.core.data.plan_batches``, length-grouped windows).
"""

from __future__ import annotations

import random
from typing import Any


def padded_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def padding_report(lengths: list[int], batch_size: int, max_length: int, seed: int = 0) -> dict[str, Any]:
    from peftkit.core.data import plan_batches

    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    random_batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    real = sum(lengths)
    computed = {
        "max_length": len(lengths) * max_length,
        "random": padded_tokens(lengths, random_batches),
        "peftkit": padded_tokens(lengths, plan_batches(lengths, batch_size, seed, 0, True)),
    }
    return {
        "rows": len(lengths),
        "mean_tokens": round(real / max(len(lengths), 1), 1),
        "real_tokens": real,
        "computed_tokens": computed,
        "real_share": {k: round(real / v, 3) for k, v in computed.items()},
        "random_over_peftkit": round(computed["random"] / computed["peftkit"], 3),
    }


def token_lengths(rows: list[dict[str, str]], kind: str, tokenizer: Any, max_length: int) -> list[int]:
    """Token counts of the rows as both tools encode them (classification: text, text_pair, truncated)."""
    if kind == "classification":
        pair = [r["text_pair"] for r in rows] if rows and "text_pair" in rows[0] else None
        enc = tokenizer([r["text"] for r in rows], pair, truncation=True, max_length=max_length)
        return [len(ids) for ids in enc["input_ids"]]
    lengths = []
    for r in rows:
        prompt = f"{r['instruction']}\n\n{r['input']}" if r.get("input") else r["instruction"]
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        lengths.append(min(len(ids), max_length))
    return lengths
