"""Entity F1 of a tagging recipe, one seed a run, each run's result in its own JSON file.

    python benchmarks/tagging.py recipes/wnut16-lora.yaml --seed 42 [--seed 1 ...]

Each seed trains ``peftkit train RECIPE --set train.seed=S`` in a child process (one at a time, one torch
thread) into a scratch registry, and writes ``benchmarks/results/tagging/<recipe>-seed<S>.json``: the command,
the machine (CPU model, load), the seed, the eval metrics peftkit saved with the adapter and the wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, RESULTS, child_env, machine_info, run_measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--seed", type=int, action="append", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    stem = Path(args.recipe).stem
    folder = RESULTS / "tagging"
    folder.mkdir(parents=True, exist_ok=True)
    for seed in args.seed:
        with tempfile.TemporaryDirectory() as scratch:
            name = f"{stem}-seed{seed}"
            command = [sys.executable, "-m", "peftkit", "train", args.recipe, "--set", f"train.seed={seed}",
                       "--set", f"output.name={name}", "--set", "train.progress=false", *sum(
                           (["--set", o] for o in args.overrides), [])]
            shown = " ".join(["peftkit", *command[3:]])
            scratch_sets = ["--set", f"output.registry={scratch}/adapters", "--set", f"output.runs={scratch}/runs"]
            info = machine_info()
            started = time.perf_counter()
            measured = run_measured([*command, *scratch_sets], folder / f"{name}.log",
                                    env=child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
            seconds = time.perf_counter() - started
            if measured["returncode"] != 0:
                raise SystemExit(f"seed {seed}: training failed (exit {measured['returncode']}); see {measured['log']}")
            saved = json.loads((Path(scratch) / "adapters" / name / "peftkit.json").read_text())
        result = {"command": shown, "seed": seed, "recipe": args.recipe, "machine": info,
                  "metrics": saved["metrics"], "history": saved.get("history"), "wall_seconds": round(seconds, 1),
                  "peak_rss_bytes": measured.get("peak_rss_bytes")}
        (folder / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"seed {seed}: entity F1 {100 * saved['metrics']['entity_f1']:.1f} in {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
