"""A randomly initialised model with a real model's shape and tokenizer, for speed and memory checks only.

    python benchmarks/synthetic_model.py --like FOLDER --out FOLDER

``FOLDER`` needs the model's ``config.json`` and tokenizer files, not its weights: that is how
``scripts/gpu_checks.sh`` brings MiniLM's shape to a GPU machine that cannot hold the real weights within the
transfer limit. Its compute and memory are the real model's; its task metrics mean nothing.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".onnx")


def shape_files(source: Path, target: Path) -> list[str]:
    """Copy everything but weights (config, tokenizer) from ``source`` to ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, target / path.name)
            copied.append(path.name)
    return copied


def build(like: Path, out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModel

    shape_files(like, out)
    torch.manual_seed(seed)
    AutoModel.from_config(AutoConfig.from_pretrained(like)).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--like", required=True, type=Path, help="a model folder (config.json and tokenizer)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--shape-only", action="store_true", help="copy config and tokenizer, build no weights")
    args = parser.parse_args()
    if not (args.like / "config.json").is_file():
        raise SystemExit(f"Error: --like: {args.like} has no config.json; point it at a Hugging Face model folder")
    if args.shape_only:
        print(f"copied {', '.join(shape_files(args.like, args.out))} to {args.out}")
    else:
        print(f"wrote a randomly initialised copy of {args.like} to {build(args.like, args.out)}")


if __name__ == "__main__":
    main()
