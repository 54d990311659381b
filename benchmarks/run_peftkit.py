"""One peftkit training run, measured from inside its own process (the child compare_methods starts).

    python benchmarks/run_peftkit.py RECIPE.yaml [--set KEY=VALUE ...]

Trains through ``peftkit.train.training.train`` exactly as ``peftkit train`` does and prints one ``BENCH_RESULT``
line. Three measurements peftkit does not save, or not exactly, are taken here: the training rows seen (it
saves examples/s rounded to 0.01), the time spent in evaluation (peftkit's ``training.seconds`` includes the
evaluation at the end of each epoch, the baseline's ``trainer.train()`` does not, so it is timed and
subtracted) and, on a GPU, the allocator's peak. Effective trainable parameters after
AdaLoRA's pruning are counted from the model: each kept rank costs one row of A, one column of B and one
singular value.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from common import emit_result


def adapter_parameters_kept(model: Any, ranks: dict[str, int]) -> int:
    """Parameters a pruned AdaLoRA adapter still uses: rank x (in + out + 1) per module."""
    total = 0
    for name, module in model.named_modules():
        key = name.removeprefix("base_model.").removeprefix("model.")
        if key in ranks and hasattr(module, "lora_A"):
            a, b = module.lora_A["default"], module.lora_B["default"]
            total += ranks[key] * (a.shape[1] + b.shape[0] + 1)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    import torch

    from peftkit.train import training
    from peftkit.core.adalora import final_ranks
    from peftkit.errors import PeftkitError
    from peftkit.config.recipe import load_recipe

    eval_seconds = [0.0]
    evaluate = training.Evaluator.__call__

    def timed_evaluate(self: Any, model: Any) -> dict[str, float]:
        started = time.perf_counter()
        try:
            return evaluate(self, model)
        finally:
            eval_seconds[0] += time.perf_counter() - started

    training.Evaluator.__call__ = timed_evaluate  # type: ignore[method-assign]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        result = training.train(recipe, overwrite=True, echo=lambda line: print(line, file=sys.stderr))
    except PeftkitError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    meta = result.metadata.to_json()  # the figures as peftkit.json holds them
    run = meta["training"]
    adapter = meta["adapter"]
    train_seconds = run["seconds"] - eval_seconds[0]
    trainable = adapter["trainable_parameters"]
    out: dict[str, Any] = {
        "tool": "peftkit",
        "metrics": meta["metrics"],
        "trainable_start": trainable,
        "trainable_final": trainable,
        "total_parameters": adapter["total_parameters"],
        "base_memory_bytes": meta["base"]["memory_bytes"],
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds[0], 3),
        "examples": run["examples"],  # training rows seen, exactly (examples/s in the metadata is rounded)
        "examples_per_second": round(run["examples"] / train_seconds, 3) if train_seconds > 0 else None,
        "optimizer_steps": run["optimizer_steps"],
        "device": run["device"],
        "gpu_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "augmentation": run.get("augmentation"),  # data.augment as applied: copies, rows before and after
    }
    if "adalora" in adapter:
        ranks = final_ranks(result.model)
        initial = adapter["adalora"]["init_r"] * len(ranks)
        start_adapter = adapter_parameters_kept(result.model, {k: adapter["adalora"]["init_r"] for k in ranks})
        kept = adapter_parameters_kept(result.model, ranks)
        out["trainable_final"] = trainable - start_adapter + kept
        out["adalora"] = {"initial_budget": initial, "final_budget": sum(ranks.values()),
                          "target_budget": adapter["adalora"]["target_budget"]}
    emit_result(out)


if __name__ == "__main__":
    main()
