#!/bin/bash
# Issue 15, part 7: speed and accuracy of peftkit against the careful peer, before (the hand-written loop,
# commit 9f4c589, from a git worktree) and after (peftkit train on transformers' Trainer), in one session on the
# same machine, one after the other, nothing else running. Usage: run.sh OLD_CHECKOUT NEW_CHECKOUT
set -euo pipefail
old=$1 new=$2
here=$(cd "$(dirname "$0")" && pwd)
for code in old new; do
  root=${!code}
  # benchmarks put their own checkout first on PYTHONPATH, so each side imports its own peftkit
  (cd "$root" && python benchmarks/compare_methods.py --tasks sst2 --methods lora adalora qlora --rows 1000 \
     --seeds 1 --peers careful --concurrent --out "$here/$code")
done
