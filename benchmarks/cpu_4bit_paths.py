"""bitsandbytes' two CPU paths for 4-bit layers, on a trained adapter: inference speed and what the packed one costs.

    python benchmarks/cpu_4bit_paths.py                       # sst2-qlora from adapters/, the SST-2 dev set
    python benchmarks/cpu_4bit_paths.py --adapter NAME --registry DIR --rows 256 --repeats 5

On a CPU with AVX512-BF16 a 4-bit layer can run ``dequantized`` (float32, as in training) or ``packed-bf16``
(bitsandbytes' fused bfloat16 kernel, what plain transformers + peft runs there in no-grad eval): see
``peftkit/core/cpu_paths.py``. The adapter is loaded twice in this process, once per path (``load_trained(...,
packed_inference=...)``); the two are timed in turns on the same batches (one warm-up pass each, which is
when bitsandbytes repacks), so machine load hits both alike and the ratio is measured within one run. Then the
logits of every eval row are compared: max and mean relative difference, same label, and the task metric on
each path. Where the CPU lacks AVX512-BF16 both loads take the dequantized path and the script says so.

Results: ``benchmarks/results/cpu_4bit_paths/`` (JSON with every timing, Markdown).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Optional

from common import describe_machine, fail, fmt, machine_info, markdown_table, results_dir, write_results


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", default="sst2-qlora", help="A registered adapter trained on a 4-bit base.")
    p.add_argument("--registry", default="adapters")
    p.add_argument("--data", default=None, help="Labelled rows (default: the adapter's recipe eval data).")
    p.add_argument("--rows", type=int, default=0, help="Rows to use (0: all).")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="Timed passes over the rows, per path, in turns.")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.rows < 0 or args.batch_size < 1 or args.repeats < 1:
        fail("--rows must be >= 0, --batch-size and --repeats >= 1")
    return args


def _pass(model: Any, batches: list[dict[str, Any]]) -> tuple[Any, float]:
    from peftkit.core.drift import Sample, scored_logits

    start = time.perf_counter()
    logits = scored_logits(model, Sample("", 0, batches))
    return logits, time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from peftkit.core.cpu_paths import DEQUANTIZED, PACKED_BF16, path_ran
    from peftkit.core.drift import compare, sample_inputs
    from peftkit.errors import PeftkitError
    from peftkit.core.evaluation import evaluate_file
    from peftkit.store.loading import load_trained
    from peftkit.store.registry import Registry

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        folder = Registry(args.registry).folder(args.adapter)
        loaded = {path: load_trained(folder, device="cpu", packed_inference=path == PACKED_BF16)
                  for path in (DEQUANTIZED, PACKED_BF16)}
    except PeftkitError as exc:
        fail(str(exc))
    first = loaded[DEQUANTIZED]
    if first.recipe.quantization.bits != 4:
        fail(f"{args.adapter} was trained on a {first.recipe.quantization.bits or 'float'} base; name a 4-bit one")
    sample = sample_inputs(first, args.data, args.rows or 10**9, args.batch_size)
    timings: dict[str, list[float]] = {path: [] for path in loaded}
    logits = {}
    for path, adapter in loaded.items():  # warm-up: the packed path repacks its weights here
        logits[path], _ = _pass(adapter.model, sample.batches)
    ran = {path: path_ran(adapter.model) for path, adapter in loaded.items()}  # what bitsandbytes really did
    for _ in range(args.repeats):
        for path, adapter in loaded.items():
            _, seconds = _pass(adapter.model, sample.batches)
            timings[path].append(seconds)
    data_file = args.data or first.recipe.data.eval
    metrics = {path: evaluate_file(adapter, data_file)["metrics"] for path, adapter in loaded.items()} \
        if data_file else None
    drift = compare(logits[DEQUANTIZED], logits[PACKED_BF16])
    best = {path: min(ts) for path, ts in timings.items()}
    return {
        "adapter": args.adapter, "source": sample.source, "rows": sample.rows, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "paths_ran": ran, "timings_s": timings,
        "rows_per_s": {path: sample.rows / s for path, s in best.items()},
        "speedup_packed_over_dequantized": best[DEQUANTIZED] / best[PACKED_BF16],
        "metrics_file": data_file, "metrics": metrics,
        "packed_against_dequantized": drift,
    }


def report(result: dict[str, Any], machine: dict[str, Any]) -> str:
    rows = [{"path": path, "ran": result["paths_ran"][path], "rows_s": result["rows_per_s"][path],
             "metrics": (result["metrics"] or {}).get(path) or {}} for path in result["rows_per_s"]]
    names = sorted({k for r in rows for k in r["metrics"]})
    table = markdown_table(rows, [("asked for", lambda r: r["path"]), ("ran", lambda r: r["ran"]),
                                  ("rows/s (best pass)", lambda r: fmt(r["rows_s"], 1))]
                           + [(f"{n} on {result['metrics_file']}", lambda r, n=n: fmt(r["metrics"].get(n), 4))
                              for n in names])
    drift = result["packed_against_dequantized"]
    return "\n".join([
        f"# bitsandbytes' 4-bit CPU paths: {result['adapter']} on {result['rows']} rows of `{result['source']}`",
        "", describe_machine(machine), "", table, "",
        f"packed-bf16 over dequantized: {result['speedup_packed_over_dequantized']:.2f}x the rows per second "
        f"(best of {len(result['timings_s']['dequantized'])} passes each, in turns, batch {result['batch_size']}, "
        f"{result['threads']} threads)",
        f"logits, packed-bf16 against dequantized: max relative difference {drift['max_rel_diff']:.2e}, mean "
        f"{drift['mean_rel_diff']:.2e}, same label on {100 * drift['label_agreement']:.1f}% of {drift['positions']} "
        "rows",
    ])


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    machine = machine_info()
    result = measure(args)
    markdown = report(result, machine)
    write_results(results_dir("cpu_4bit_paths", args.out), {"machine": machine, "settings": vars(args),
                                                            "result": result}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
