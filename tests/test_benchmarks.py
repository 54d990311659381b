"""The benchmark scripts on tiny models: results are produced, well formed, and agree with the models.

No figure is held to a threshold; what is checked is that every run reports, that the numbers hang together
(tokens/s = batch x length / seconds, AdaLoRA's pruned count below its start), and that the reported parameter
counts and memory equal what the models hold, counted here independently.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like ../shared/data, holding tiny SST-2-shaped files."""
    root = tmp_path_factory.mktemp("bench-data")
    sst2 = root / "glue" / "SST-2"
    sst2.mkdir(parents=True)
    tiny.write_tsv(sst2 / "train.tsv", tiny.sentiment_rows(64, seed=1))
    tiny.write_tsv(sst2 / "dev.tsv", tiny.sentiment_rows(32, seed=2))
    return root


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def tiny_adalora_start(model_dir: Path) -> tuple[int, int]:
    """(trainable parameters, base memory) of the tiny BERT on a 4-bit base with AdaLoRA at rank 12 on every
    linear layer, counted with plain peft + transformers, without peftkit or the benchmark code."""
    import torch
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier"])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, quantization_config=quant)
    memory = model.get_memory_footprint()
    config = AdaLoraConfig(init_r=12, target_r=8, target_modules=["query", "key", "value", "dense"], tinit=1,
                           tfinal=1, total_step=6, task_type="SEQ_CLS")
    model = get_peft_model(model, config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad), memory


def test_compare_methods_reports_every_run(tiny_dir: Path, data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = run_script("benchmarks/compare_methods.py", "--model", str(tiny_dir / "bert"), "--tasks", "sst2",
                      "--methods", "adalora-4bit", "--seeds", "1", "--rows", "48", "--eval-rows", "32",
                      "--batch-size", "8", "--max-length", "32", "--concurrent", "--data-root", str(data_root),
                      "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((out / "results.json").read_text())
    assert payload["machine"]["cores"] >= 1 and payload["machine"]["torch"]
    runs = {r["tool"]: r for r in payload["runs"]}
    assert sorted(runs) == ["baseline", "peftkit"] and all(r["method"] == "adalora-4bit" for r in runs.values())
    expected_trainable, expected_memory = tiny_adalora_start(tiny_dir / "bert")
    for run in runs.values():
        result = run["result"]
        assert run["ok"], run["log"]
        assert result["train_seconds"] > 0 and result["examples"] == 48
        assert 0.0 <= result["metrics"]["accuracy"] <= 1.0
        assert result["trainable_start"] == expected_trainable
        assert result["base_memory_bytes"] == expected_memory
        # the child's own high-water mark: above its model, and not the parent's, whose peak ru_maxrss carries
        assert result["base_memory_bytes"] < run["peak_rss_bytes"] == result["peak_rss_bytes"]
    peftkit, baseline = runs["peftkit"]["result"], runs["baseline"]["result"]
    # only peftkit prunes: its effective count drops with the budget, the baseline keeps every rank
    assert peftkit["adalora"]["final_budget"] < peftkit["adalora"]["initial_budget"]
    assert peftkit["trainable_final"] < peftkit["trainable_start"]
    assert baseline["trainable_final"] == baseline["trainable_start"]

    summary = {r["tool"]: r for r in payload["summary"]}
    ratio = summary["peftkit"]["vs_baseline"]["speedup"]
    assert ratio == pytest.approx(summary["peftkit"]["examples_per_second"]["mean"]
                                  / summary["baseline"]["examples_per_second"]["mean"])
    assert payload["padding"]["sst2"]["real_tokens"] <= payload["padding"]["sst2"]["computed_tokens"]["peftkit"]
    table = (out / "results.md").read_text()
    assert "| sst2 | AdaLoRA NF4 | peftkit |" in table and "speed vs baseline" in table
    assert (out / "sst2.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "ratios.png").read_bytes()[:8] == PNG_MAGIC and "ratios.png" in payload["plots"]


def test_throughput_counts_what_the_quantized_layers_hold(tiny_dir: Path, tmp_path: Path) -> None:
    import throughput
    from transformers import AutoModelForCausalLM

    out = tmp_path / "results"
    throughput.main(["--model", str(tiny_dir / "bert"), "--precisions", "fp32", "4bit", "--seq-lens", "8", "16",
                     "--batch-sizes", "2", "4", "--steps", "1", "--sizes", "64", "128", "--layers", "1",
                     "--real-models", "--device", "cpu", "--out", str(out)])
    payload = json.loads((out / "results.json").read_text())
    points = payload["throughput"]
    # lengths at the middle batch size, batch sizes at the middle length (shared point once), train + inference
    assert len(points) == 2 * 2 * 3
    for p in points:
        assert p["tokens_per_second"] == pytest.approx(p["batch"] * p["seq_len"] / p["seconds_per_step"], rel=1e-3)
    memory = {(r["model"], r["bits"]): r for r in payload["memory"]}
    assert set(memory) == {("llama-h64x1", 4), ("llama-h64x1", 8), ("llama-h128x1", 4), ("llama-h128x1", 8)}
    for hidden in (64, 128):
        fp32 = AutoModelForCausalLM.from_pretrained(throughput.synthetic_llama(tmp_path / f"m{hidden}", hidden, 1))
        linear = sum(m.weight.numel() for n, m in fp32.named_modules()
                     if type(m).__name__ == "Linear" and not n.endswith("lm_head"))
        four, eight = memory[(f"llama-h{hidden}x1", 4)], memory[(f"llama-h{hidden}x1", 8)]
        assert four["parameters"] == eight["parameters"] == linear
        assert four["weight_bytes"] == linear // 2 and eight["weight_bytes"] == linear  # 4 bits, 8 bits each
        assert four["bytes_per_parameter"] == pytest.approx((four["weight_bytes"] + four["constant_bytes"]) / linear)
        assert four["fp32_model_bytes"] == fp32.get_memory_footprint()
    for name in ("throughput_seq_len.png", "throughput_batch.png", "memory_per_parameter.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "bytes/parameter" in (out / "results.md").read_text()


def test_run_measured_reports_each_childs_own_peak(tmp_path: Path) -> None:
    from common import run_measured

    ballast = bytearray(200 * 2**20)  # this process now holds 200 MB more than any child below needs
    env = {"PYTHONPATH": str(BENCH)}
    emit = "from common import emit_result; emit_result({'n': len(b)})"
    big = run_measured([sys.executable, "-c", f"b = bytearray(300 * 2**20); {emit}"], tmp_path / "big.log", env)
    small = run_measured([sys.executable, "-c", f"b = b''; {emit}"], tmp_path / "small.log", env)
    failed = run_measured([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / "failed.log", env)
    assert big["ok"] and big["result"]["n"] == 300 * 2**20
    assert big["peak_rss_bytes"] > 300 * 2**20
    # Linux carries this process's high-water mark into every child's ru_maxrss, not into its VmHWM
    assert small["peak_rss_bytes"] < 100 * 2**20 < len(ballast) < small["ru_maxrss_bytes"]
    assert not failed["ok"] and failed["returncode"] == 3 and failed["result"] is None


@pytest.mark.parametrize("args, message", [
    (["--tasks", "nope"], "Error: --tasks: unknown task 'nope'; choose among sst2, rte, mrpc, agnews, alpaca"),
    (["--model", "minilm", "--tasks", "alpaca"], "Error: --model minilm: task alpaca runs on smollm2-135m; "
                                                 "drop --model or the task"),
    (["--seeds-for", "sst2=0"], "Error: --seeds-for: 'sst2=0' is not TASK=N with TASK among sst2, rte, mrpc, "
                                "agnews, alpaca and N >= 1"),
])
def test_compare_methods_bad_input_is_one_line(args: list[str], message: str) -> None:
    proc = run_script("benchmarks/compare_methods.py", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message


def test_gpu_checks_dry_run_names_every_step() -> None:
    proc = subprocess.run(["bash", "scripts/gpu_checks.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**__import__("os").environ, "OUT": "/tmp/gpu-out"})
    assert proc.returncode == 0, proc.stderr
    assert "benchmarks/compare_methods.py" in proc.stdout and "benchmarks/throughput.py" in proc.stdout
    assert "pytest" in proc.stdout and "/tmp/gpu-out" in proc.stdout


def test_cpu_4bit_paths_measures_both_paths_on_one_adapter(tiny_dir: Path, tmp_path: Path) -> None:
    import cpu_4bit_paths

    from peftkit.cpu_paths import DEQUANTIZED, PACKED_BF16, packed_4bit_available
    from peftkit.recipe import build_recipe
    from peftkit.training import train
    from tests.conftest import make_recipe

    data = make_recipe(tiny_dir, tmp_path, quant="4bit", train={"max_steps": 2, "eval_at_start": False},
                       output={"name": "q4"})
    train(build_recipe(data), echo=lambda line: None)
    out = tmp_path / "results"
    cpu_4bit_paths.main(["--adapter", "q4", "--registry", str(tmp_path / "adapters"), "--rows", "24",
                         "--batch-size", "8", "--repeats", "2", "--out", str(out)])
    result = json.loads((out / "results.json").read_text())["result"]
    # what bitsandbytes really did (read from the layers), not what was asked
    assert result["paths_ran"] == {DEQUANTIZED: DEQUANTIZED,
                                   PACKED_BF16: PACKED_BF16 if packed_4bit_available() else DEQUANTIZED}
    assert result["rows"] == 24 and all(len(t) == 2 for t in result["timings_s"].values())
    best = {p: min(t) for p, t in result["timings_s"].items()}
    assert result["speedup_packed_over_dequantized"] == pytest.approx(best[DEQUANTIZED] / best[PACKED_BF16])
    drift = result["packed_against_dequantized"]
    assert (drift["max_rel_diff"] > 0) == packed_4bit_available()  # the same path gives the same logits
    assert set(result["metrics"][DEQUANTIZED]) == {"accuracy", "macro_f1", "loss"}
    assert "packed-bf16 over dequantized:" in (out / "results.md").read_text()
