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
    assert sorted(runs) == ["naive", "peer", "peftkit"] and all(r["method"] == "adalora-4bit" for r in runs.values())
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
    # peftkit and the careful peer prune to the same budget (their effective count drops with it); the naive
    # peer, with nothing calling update_and_allocate, keeps every rank
    for pruned in (runs["peftkit"]["result"], runs["peer"]["result"]):
        budget = pruned["adalora"]
        assert budget["final_budget"] <= budget["target_budget"] < budget["initial_budget"]
        assert pruned["trainable_final"] < pruned["trainable_start"]
    assert runs["peftkit"]["result"]["adalora"]["target_budget"] == runs["peer"]["result"]["adalora"]["target_budget"]
    naive = runs["naive"]["result"]
    assert naive["trainable_final"] == naive["trainable_start"] and "adalora" not in naive

    summary = {r["tool"]: r for r in payload["summary"]}
    assert "vs_peer" not in summary["peer"]
    for tool in ("peftkit", "naive"):  # every row against the careful peer
        assert summary[tool]["vs_peer"]["speedup"] == pytest.approx(
            summary[tool]["examples_per_second"]["mean"] / summary["peer"]["examples_per_second"]["mean"])
    assert payload["padding"]["sst2"]["real_tokens"] <= payload["padding"]["sst2"]["computed_tokens"]["peftkit"]
    table = (out / "results.md").read_text()
    assert all(f"| sst2 | AdaLoRA NF4 | {tool} |" in table for tool in runs) and "speed vs peer" in table
    assert (out / "sst2.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "ratios.png").read_bytes()[:8] == PNG_MAGIC and "ratios.png" in payload["plots"]



@pytest.fixture(scope="module")
def varied_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``data_root``, but the rows run from 2 to 21 words: the order rows are batched in changes the padding."""
    import random

    rng = random.Random(5)

    def rows(n: int) -> list[dict]:
        out = []
        for _ in range(n):
            label = rng.randint(0, 1)
            words = rng.sample(tiny.FILLER, rng.randint(1, 20)) + [rng.choice(tiny.POSITIVE if label else tiny.NEGATIVE)]
            out.append({"sentence": " ".join(words), "label": label})
        return out

    root = tmp_path_factory.mktemp("varied-data")
    sst2 = root / "glue" / "SST-2"
    sst2.mkdir(parents=True)
    tiny.write_tsv(sst2 / "train.tsv", rows(256))
    tiny.write_tsv(sst2 / "dev.tsv", rows(16))
    return root


def bench_recipe(tiny_dir: Path, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
                 rows: int = 48, **train: object) -> dict:
    """compare_methods' peftkit recipe for SST-2 rows of ``root`` on the tiny BERT (batch 8, length 32)."""
    from dataclasses import replace

    import bench_tasks

    monkeypatch.setattr(bench_tasks, "DATA_ROOT", [root])
    task = replace(bench_tasks.TASKS["sst2"], batch_size=8, max_length=32)
    prepared = bench_tasks.prepare(task, tmp_path / "data", rows, 16)
    recipe = bench_tasks.peftkit_recipe(prepared, bench_tasks.METHODS[method], 42, tmp_path)
    recipe["base"]["model"] = str(tiny_dir / "bert")
    recipe["train"].update(train)
    return recipe


def peer(recipe: dict, tiny_dir: Path, tmp_path: Path, which: str = "careful", *extra: str):
    """(args, built) of baseline_hf for ``recipe``, with the flags compare_methods gives it (then ``extra``)."""
    import baseline_hf
    from bench_tasks import baseline_flags

    args = baseline_hf.parse_args([*baseline_flags(recipe, tiny_dir / "bert", which), *extra,
                                   "--out", str(tmp_path / f"hf-{which}")])
    return args, baseline_hf.build(args)


def groups_by_name(model, optimizer) -> dict[str, tuple[float, float]]:
    """Parameter name -> (learning rate, weight decay) of the optimizer group holding it."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_careful_peer_trains_with_peftkits_settings(method: str, tiny_dir: Path, varied_root: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from peftkit.config.recipe import build_recipe
    from peftkit.core.build import build_model, plan_run
    from peftkit.train import trainer

    # a head learning rate and weight decay of their own, so that every kind of group shows
    recipe = bench_recipe(tiny_dir, varied_root, tmp_path, monkeypatch, method, head_lr=3e-3, weight_decay=0.01)
    args, built = peer(recipe, tiny_dir, tmp_path)
    rec = build_recipe(recipe)
    plan = plan_run(rec)
    ours = build_model(plan, torch.device("cpu"))
    # the same tokens (max length), the same trainable parameters (targets, rank, head), the same step count
    assert built.trainer.train_dataset["input_ids"] == plan.train_rows["input_ids"]
    assert {n: p.shape for n, p in built.model.named_parameters() if p.requires_grad} == \
        {n: p.shape for n, p in ours.model.named_parameters() if p.requires_grad}
    assert built.steps == plan.total_steps == 6
    # every parameter at peftkit's learning rate and weight decay: head, adapter (AdaLoRA's at lr_scale x lr), norms
    peftkit_optimizer = trainer.build_optimizer(ours.model, rec, ours.head_modules)
    expected = groups_by_name(ours.model, peftkit_optimizer)
    assert groups_by_name(built.model, built.trainer.optimizer) == expected
    assert len(set(expected.values())) == (4 if method == "adalora" else 3)
    # the same learning rate at every step (warm-up, schedule), and the same clip and batch size
    peftkit_schedule = trainer.build_scheduler(peftkit_optimizer, rec, plan.total_steps)
    assert [built.trainer.lr_scheduler.lr_lambdas[0](s) for s in range(7)] == \
        [peftkit_schedule.lr_lambdas[0](s) for s in range(7)]
    assert built.trainer.args.max_grad_norm == rec.train.max_grad_norm
    assert built.trainer.args.per_device_train_batch_size == rec.train.batch_size
    config, theirs = built.model.peft_config["default"], ours.model.peft_config["default"]
    fields = ["target_modules", "lora_alpha", "lora_dropout"] + (
        ["init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "total_step"] if method == "adalora"
        else ["r"])
    assert {f: getattr(config, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
    if method == "adalora":
        # peft would add the regularizer to the loss; the peer adds peftkit's weight after the clip instead
        assert config.orth_reg_weight == 0 and built.driver.orth_reg_weight == theirs.orth_reg_weight == 0.1
        import baseline_hf

        for name, q in baseline_hf.adalora_matrices(built.model):  # P and Q start orthonormal, as peftkit's
            gram = q @ q.T if ".lora_A." in name else q.T @ q
            assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-5), name


def test_careful_peer_follows_the_recipes_levers(tiny_dir: Path, varied_root: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """LoftQ on the 4-bit base and LoRA+ in the recipe: the peer starts from the same A and B, written with peft's
    replace_lora_weights_loftq, and puts every parameter at the same learning rate."""
    import torch
    from bench_tasks import baseline_flags

    from peftkit.config.recipe import build_recipe
    from peftkit.core.build import build_model, plan_run
    from peftkit.train import trainer

    recipe = bench_recipe(tiny_dir, varied_root, tmp_path, monkeypatch, "qlora", head_lr=3e-3)
    assert "--init" not in baseline_flags(recipe, tiny_dir / "bert")  # a default recipe's flags are unchanged
    recipe["adapter"].update(init="loftq", loraplus_lr_ratio=16)
    flags = baseline_flags(recipe, tiny_dir / "bert")
    assert flags[flags.index("--init") + 1] == "loftq" and flags[flags.index("--loraplus-lr-ratio") + 1] == "16.0"
    args, built = peer(recipe, tiny_dir, tmp_path)
    rec = build_recipe(recipe)
    ours = build_model(plan_run(rec), torch.device("cpu"))
    theirs = {n: p for n, p in built.model.named_parameters() if "lora_" in n}
    mine = {n: p for n, p in ours.model.named_parameters() if "lora_" in n}
    assert theirs.keys() == mine.keys() and mine
    for name in mine:  # LoftQ's start, not peft's B = 0
        assert torch.allclose(theirs[name], mine[name], atol=1e-6), name
    assert all(p.any() for n, p in mine.items() if "lora_B" in n)
    expected = groups_by_name(ours.model, trainer.build_optimizer(ours.model, rec, ours.head_modules))
    assert groups_by_name(built.model, built.trainer.optimizer) == expected
    assert {lr for n, (lr, _) in expected.items() if "lora_B" in n} == {16 * rec.train.lr}
    assert {lr for n, (lr, _) in expected.items() if "classifier" in n} == {3e-3}

    recipe["adapter"].update(init="gaussian", loraplus_lr_ratio=None)
    _, built = peer(recipe, tiny_dir, tmp_path)
    assert built.model.peft_config["default"].init_lora_weights == "gaussian"


def test_lever_methods_are_their_method_plus_one_recipe_key(tmp_path: Path) -> None:
    """The sweep's lever rows (issue 14) differ from their plain row in exactly the key they measure."""
    from bench_tasks import METHODS, TASKS, Prepared, peftkit_recipe

    prepared = Prepared(TASKS["sst2"], tmp_path / "train.jsonl", tmp_path / "eval.jsonl", 1000, 872, ["0", "1"])
    levers = {"qlora-loftq": ("qlora", "init", "loftq"), "qlora-loraplus": ("qlora", "loraplus_lr_ratio", 16),
              "adalora-dropout0": ("adalora", "lora_dropout", 0.0), "adalora-lr1": ("adalora", "lr_scale", 1.0)}
    assert set(levers) == {name for name, m in METHODS.items() if m.adapter_options}
    for name, (plain, key, value) in levers.items():
        base = peftkit_recipe(prepared, METHODS[plain], 42, tmp_path)
        recipe = peftkit_recipe(prepared, METHODS[name], 42, tmp_path)
        assert recipe["adapter"].pop(key) == value and base["adapter"].pop(key, None) != value
        recipe["output"]["name"] = base["output"]["name"]
        assert recipe == base, name


def test_careful_peer_batches_rows_of_similar_length(tiny_dir: Path, varied_root: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = bench_recipe(tiny_dir, varied_root, tmp_path, monkeypatch, "lora", rows=256)

    def batches(which: str) -> tuple[int, int, int]:
        """(rows, real tokens, padding tokens) over the training batches the peer's Trainer draws."""
        _, built = peer(recipe, tiny_dir, tmp_path, which)
        rows = real = padded = 0
        for batch in built.trainer.get_train_dataloader():
            mask = batch["attention_mask"]
            rows, real, padded = rows + mask.shape[0], real + int(mask.sum()), padded + int((mask == 0).sum())
        return rows, real, padded

    careful, naive = batches("careful"), batches("naive")
    assert careful[:2] == naive[:2] == (256, careful[1])  # every row once, the same tokens
    # lengths run 4 to 23 tokens: random batches of 8 pad about 7 tokens a row, grouped ones under 2
    assert careful[2] * 3 < naive[2]


def test_careful_adalora_reallocates_ranks(tiny_dir: Path, varied_root: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import baseline_hf

    from peftkit.metrics import classification_scores

    recipe = bench_recipe(tiny_dir, varied_root, tmp_path, monkeypatch, "adalora")
    args, built = peer(recipe, tiny_dir, tmp_path)
    result = baseline_hf.train_and_evaluate(built, args)
    # scored by peftkit's own function, every metric a task may compare
    predicted = built.trainer.predict(built.dev)
    assert result["metrics"] == classification_scores(predicted.predictions.argmax(-1).tolist(),
                                                      predicted.label_ids.tolist(), 2)
    assert set(result["metrics"]) == {"accuracy", "macro_f1", "matthews"}
    budget = result["adalora"]
    assert built.driver.reallocations == result["optimizer_steps"] == 6
    assert budget["final_budget"] <= budget["target_budget"] < budget["initial_budget"]
    assert result["trainable_final"] < result["trainable_start"]
    # peft's mask fixed after step total - tfinal: the pruned singular values stay at zero to the end
    pattern = built.model.peft_config["default"].rank_pattern
    assert pattern and sum(sum(mask) for mask in pattern.values()) == budget["final_budget"]
    kept = sum(int(p.count_nonzero()) for n, p in built.model.named_parameters() if "lora_E" in n)
    assert kept <= budget["final_budget"]


@pytest.mark.parametrize("which", ["careful", "naive"])
def test_only_the_careful_peer_adds_the_regularizer_after_the_clip(which: str, tiny_dir: Path, varied_root: Path,
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With the clip at 1e-6 and peft's N(0, 0.02) init, the regularizer's gradient is far above the clip: it
    reaches the optimizer whole only when it is added after the clip."""
    import torch
    from transformers import TrainerCallback

    recipe = bench_recipe(tiny_dir, varied_root, tmp_path, monkeypatch, "adalora")
    recipe["adapter"].update(orthogonal_init=False, orth_reg_weight=0.5)
    extra = ["--max-grad-norm", "1e-6", "--max-steps", "3", "--adalora-warmup", "0", "--adalora-final", "1"]
    args, built = peer(recipe, tiny_dir, tmp_path, which, *extra, *(["--orth-reg-weight", "0.5"] * (which == "naive")))
    norms = []

    class Norm(TrainerCallback):  # added after the peer's own callbacks, so it sees what the optimizer will
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads = [p.grad for p in built.model.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    built.trainer.add_callback(Norm())
    built.trainer.train()
    assert len(norms) == 3
    if which == "careful":
        assert min(norms) > 1e-3
    else:
        assert max(norms) <= 1.01e-6


def test_naive_peer_refuses_what_only_the_careful_one_does(capsys: pytest.CaptureFixture) -> None:
    import baseline_hf

    with pytest.raises(SystemExit) as exc:
        baseline_hf.parse_args(["--peer", "naive", "--head-lr", "1e-3"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == \
        "Error: --head-lr: the naive peer has no such setting; drop it or use --peer careful"
    with pytest.raises(SystemExit):
        baseline_hf.parse_args(["--peer", "naive", "--init", "loftq"])
    assert capsys.readouterr().err.strip() == \
        "Error: --init: the naive peer has no such setting; drop it or use --peer careful"


def test_baseline_flags_refuse_a_recipe_the_careful_peer_does_not_write(tiny_dir: Path, varied_root: Path,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from bench_tasks import baseline_flags

    recipe = bench_recipe(tiny_dir, varied_root, tmp_path, monkeypatch, "lora", grad_accum=2)
    with pytest.raises(ValueError, match=r"^the careful peer does not reproduce train.grad_accum; keep"):
        baseline_flags(recipe, tiny_dir / "bert")
    assert "--peer" in baseline_flags(recipe, tiny_dir / "bert", "naive")  # the naive peer takes its own defaults


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
    (["--tasks", "nope"], "Error: --tasks: unknown task 'nope'; choose among sst2, rte, mrpc, agnews, cola, sms, "
                          "stsb, alpaca"),
    (["--model", "minilm", "--tasks", "alpaca"], "Error: --model minilm: task alpaca runs on smollm2-135m; "
                                                 "drop --model or the task"),
    (["--seeds-for", "sst2=0"], "Error: --seeds-for: 'sst2=0' is not TASK=N with TASK among sst2, rte, mrpc, "
                                "agnews, cola, sms, stsb, alpaca and N >= 1"),
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

    from peftkit.config.recipe import build_recipe
    from peftkit.core.cpu_paths import DEQUANTIZED, PACKED_BF16, packed_4bit_available
    from peftkit.train.training import train
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
    assert set(result["metrics"][DEQUANTIZED]) == {"accuracy", "macro_f1", "matthews", "loss"}
    assert "packed-bf16 over dequantized:" in (out / "results.md").read_text()


def test_cola_and_sms_readers_take_the_right_columns_and_a_fixed_held_out_split(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import bench_tasks

    cola = tmp_path / "glue" / "CoLA"
    cola.mkdir(parents=True)
    for split, n in (("train", 6), ("dev", 3)):  # GLUE's layout: no header; source, label, mark, sentence
        (cola / f"{split}.tsv").write_text("".join(f'gj04\t{i % 2}\t{"*" if i % 2 == 0 else ""}\t{split}  "row" {i}\n'
                                                   for i in range(n)))
    sms = tmp_path / "sms_spam"
    sms.mkdir()
    (sms / "SMSSpamCollection").write_text("Label\tSMS\n" + "".join(f"{'spam' if i % 3 == 0 else 'ham'}\tmessage {i}\n"
                                                                    for i in range(50)))
    monkeypatch.setattr(bench_tasks, "DATA_ROOT", [tmp_path])
    assert bench_tasks.read_cola("train")[1] == {"text": 'train "row" 1', "label": "1"}
    assert [r["label"] for r in bench_tasks.read_cola("eval")] == ["0", "1", "0"]
    train, held_out = bench_tasks.read_sms("train"), bench_tasks.read_sms("eval")
    assert len(held_out) == 10 and len(train) == 40  # a fifth of a file under 5,000 rows, else 1,000
    texts = {r["text"] for r in train} | {r["text"] for r in held_out}
    assert texts == {f"message {i}" for i in range(50)}  # every row once, the header none
    assert all(r["label"] == ("spam" if int(r["text"].split()[1]) % 3 == 0 else "ham") for r in train + held_out)
    assert bench_tasks.read_sms("eval") == held_out  # the same split every time
    assert (bench_tasks.TASKS["cola"].metric, bench_tasks.TASKS["sms"].metric) == ("matthews", "macro_f1")
    assert all(bench_tasks.TASKS[t].higher_is_better for t in ("cola", "sms"))
    assert not bench_tasks.TASKS["alpaca"].higher_is_better


@pytest.mark.parametrize("rows, epochs, steps", [
    (250, 17, 136), (500, 9, 144), (1000, 5, 160), (2490, 2, 156), (4000, 2, 250), (4095, 2, 256), (4096, 1, 128),
    (8000, 1, 250),
])
def test_sweep_training_length_rule(rows: int, epochs: int, steps: int) -> None:
    import sweep

    assert sweep.epochs_for(rows, 32) == epochs and sweep.steps_for(rows, 32) == steps
    assert steps >= sweep.MIN_STEPS == 128
    assert "epochs = max(1, ceil(MIN_STEPS * batch_size / rows)) with MIN_STEPS = 128" in sweep.RULE


def test_sweep_default_grid_is_the_issues(monkeypatch: pytest.MonkeyPatch) -> None:
    import sweep

    rows = {"sst2": 67349, "agnews": 10000, "cola": 8551, "sms": 4574, "rte": 2490, "mrpc": 3668}
    cells = sweep.grid(sweep.parse_args([]), rows.__getitem__)
    assert len(cells) == 198  # (6 + 6 sizes) x 3 methods x 3 seeds + 2 x 6 x 3 + 4 tasks x 2 x 3 x 3
    assert [c.task for c in cells[:72]] == ["sst2"] * 72 and cells[72].task == "agnews"
    assert list(dict.fromkeys(c.task for c in cells)) == ["sst2", "agnews", "cola", "sms", "rte", "mrpc"]
    assert [c.rows for c in cells[:9]] == [250] * 9 and cells[0] == sweep.Cell("sst2", 250, "lora", 42)
    assert sorted({c.rows for c in cells if c.task == "rte"}) == [1000, 2490]  # 4,000 means all its rows
    assert {(c.rows, c.method) for c in cells if c.method == "full"} == {(1000, "full"), (4000, "full")}
    assert {c.seed for c in cells} == {42, 1, 2}
    small = sweep.grid(sweep.parse_args(["--tasks", "rte", "--rows", "1000", "4000"]), lambda task: 800)
    assert {c.rows for c in small} == {800} and len(small) == 9  # two sizes collapsed onto one


def fake_run_pair(calls: list, fail: set):
    """A stand-in for compare_methods.run_pair: one record per tool asked, failing the (rows, seed, tool) in
    ``fail`` (then forgetting them, so a retry succeeds); each call is logged in ``calls``."""
    def run_pair(prepared, method, seed, model, model_dir, work, args, peftkit_first, epochs=1, tools=None):
        calls.append((prepared.n_train, method.name, seed, frozenset(tools), epochs))
        records = []
        for tool in sorted(tools):
            bad = (prepared.n_train, seed, tool) in fail
            fail.discard((prepared.n_train, seed, tool))
            log = work / "logs" / f"{tool}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("Traceback: it broke\n" if bad else "fine\n")
            steps = epochs * -(-prepared.n_train // prepared.task.batch_size)
            result = None if bad else {"metrics": {"accuracy": 0.5 + seed / 1000, "macro_f1": 0.5, "matthews": 0.0},
                                       "optimizer_steps": steps, "train_seconds": 1.0, "examples_per_second": 2.0,
                                       "trainable_start": 10, "trainable_final": 10, "gpu_peak_bytes": None}
            records.append({"task": prepared.task.name, "method": method.name, "seed": seed, "tool": tool,
                            "variant": None, "ok": not bad, "returncode": 1 if bad else 0, "wall_seconds": 1.0,
                            "peak_rss_bytes": 2**20, "ru_maxrss_bytes": 2**20, "result": result, "log": str(log)})
        return records
    return run_pair


def sweep_args(tiny_dir: Path, data_root: Path, out: Path, *extra: str) -> list[str]:
    return ["--tasks", "sst2", "--rows", "24", "48", "--methods", "lora", "--model", str(tiny_dir / "bert"),
            "--data-root", str(data_root), "--out", str(out), *extra]


def test_sweep_skips_stored_runs_and_retries_failed_ones(tiny_dir: Path, data_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import bench_tasks
    import sweep

    monkeypatch.setattr(bench_tasks, "DATA_ROOT", list(bench_tasks.DATA_ROOT))  # the sweep points it at data_root
    calls: list = []
    monkeypatch.setattr(sweep, "run_pair", fake_run_pair(calls, {(24, 42, "peer")}))
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exc:
        sweep.main(sweep_args(tiny_dir, data_root, out, "--seeds", "2"))
    assert exc.value.code == 1  # a run failed
    both = frozenset({"peftkit", "peer"})
    # 24 rows at batch 32: ceil(128 x 32 / 24) = 171 epochs of one batch; 48 rows: 86 epochs of two
    assert calls == [(24, "lora", 42, both, 171), (24, "lora", 1, both, 171), (48, "lora", 42, both, 86),
                     (48, "lora", 1, both, 86)]
    runs = out / "runs"
    failed = json.loads((runs / "sst2-24rows-lora-seed42-peer.json").read_text())
    assert failed["ok"] is False and "it broke" in failed["log_tail"] and failed["metric"] is None
    kept = (runs / "sst2-24rows-lora-seed42-peftkit.json").read_text()
    record = json.loads(kept)
    assert record["ok"] and record["rows"] == 24 and record["epochs"] == 171 == record["optimizer_steps"]
    assert record["rule_steps"] == 171 and record["rule"] == sweep.RULE and record["metric_name"] == "accuracy"
    assert record["metric"] == pytest.approx(0.542) and record["run"]["tool"] == "peftkit"
    assert record["machine"]["cpu"] and record["git_commit"] and record["utc"].endswith("Z")
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        f"sst2-{n}rows-lora-seed{s}-{t}.json" for n in (24, 48) for s in (42, 1) for t in ("peftkit", "peer"))
    assert "sst2-24rows-lora-seed42-peer.json" in json.loads((out / "summary.json").read_text())["failed"]

    del calls[:]
    sweep.main(sweep_args(tiny_dir, data_root, out, "--seeds", "2"))
    assert calls == [(24, "lora", 42, frozenset({"peer"}), 171)]  # the failed run alone
    assert (runs / "sst2-24rows-lora-seed42-peftkit.json").read_text() == kept
    assert json.loads((runs / "sst2-24rows-lora-seed42-peer.json").read_text())["ok"]
    assert not list(runs.glob(".*"))  # no temporary file left
    del calls[:]
    sweep.main(sweep_args(tiny_dir, data_root, out, "--seeds", "2"))
    assert calls == []


def test_sweep_max_cells_stops_and_dry_run_counts_what_remains(tiny_dir: Path, data_root: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    import bench_tasks
    import sweep

    monkeypatch.setattr(bench_tasks, "DATA_ROOT", list(bench_tasks.DATA_ROOT))
    calls: list = []
    monkeypatch.setattr(sweep, "run_pair", fake_run_pair(calls, set()))
    out = tmp_path / "sweep"
    sweep.main(sweep_args(tiny_dir, data_root, out, "--seeds", "2", "--max-cells", "1"))
    assert [c[:3] for c in calls] == [(24, "lora", 42)]
    assert "1 of 4 cells of the last invocation's grid complete" in (out / "results.md").read_text()
    capsys.readouterr()
    sweep.main(sweep_args(tiny_dir, data_root, out, "--seeds", "2", "--dry-run"))
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == "4 cells (8 runs: peftkit, peer); 3 cells remain (6 runs)"
    assert len(calls) == 1  # a dry run runs nothing
    sweep.main(sweep_args(tiny_dir, data_root, out, "--seeds", "2", "--max-cells", "2"))
    assert [c[:3] for c in calls[1:]] == [(24, "lora", 1), (48, "lora", 42)]


def write_fake_run(runs: Path, task: str, rows: int, method: str, tool: str, seed: int, value: float,
                   ok: bool = True, steps: int = 160, metric: str = "accuracy") -> None:
    runs.mkdir(parents=True, exist_ok=True)
    record = {"format": 1, "task": task, "rows": rows, "method": method, "seed": seed, "tool": tool, "ok": ok,
              "metric_name": metric, "metric": value if ok else None, "epochs": 5, "optimizer_steps": steps,
              "rule_steps": 160, "rule": "the rule", "train_seconds": 10.0, "machine": {"description": "a CPU"}}
    (runs / f"{task}-{rows}rows-{method}-seed{seed}-{tool}.json").write_text(json.dumps(record))


def test_sweep_report_judges_every_target_in_points(tmp_path: Path) -> None:
    import sweep_report

    runs = tmp_path / "runs"
    fake = [  # (task, rows, method, tool, metric per seed 42, 1, 2)
        ("sst2", 1000, "lora", "peftkit", [0.80, 0.81, 0.82]),    # 81.0 ± 1.0
        ("sst2", 1000, "lora", "peer", [0.81, 0.812, 0.808]),     # 81.0 ± 0.2: a met (+0.5), a' met (+0.2)
        ("sst2", 1000, "adalora", "peftkit", [0.70, 0.71, 0.72]),  # 71.0: b missed by 9.5
        ("sst2", 1000, "qlora", "peftkit", [0.80, 0.80]),         # two seeds: c not judged
        ("sst2", 1000, "full", "peftkit", [0.95, 0.95, 0.95]),    # below 2,000 rows: d not asked
        ("sst2", 4000, "lora", "peftkit", [0.83, 0.85, 0.87]),    # 85.0 ± 2.0
        ("sst2", 4000, "lora", "peer", [0.85, 0.85, 0.85]),       # a met (+0.5), a' missed by 1.0
        ("sst2", 4000, "full", "peftkit", [0.87, 0.87, 0.872]),   # 87.07: d missed by 1.07
        ("cola", 1000, "lora", "peftkit", [0.30, 0.30, 0.30]),
        ("cola", 1000, "lora", "peer", [0.31, 0.31, 0.31]),       # Matthews in points: a missed by 0.5
    ]
    for task, rows, method, tool, values in fake:
        for seed, value in zip([42, 1, 2], values):
            write_fake_run(runs, task, rows, method, tool, seed, value,
                           metric="matthews" if task == "cola" else "accuracy",
                           steps=161 if (task, method, tool, seed) == ("cola", "lora", "peer", 2) else 160)
    write_fake_run(runs, "sst2", 1000, "lora", "peer", 3, 0.1, ok=False)  # a failed run counts for nothing
    markdown = sweep_report.report(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    verdicts = {(v["task"], v["rows"], v["target"]): v for v in summary["targets"]}
    expected = {("sst2", 1000, "a"): ("met", 0.5), ("sst2", 1000, "a'"): ("met", 0.2),
                ("sst2", 1000, "b"): ("missed", -9.5), ("sst2", 1000, "c"): ("n<3, not judged", None),
                ("sst2", 4000, "a"): ("met", 0.5), ("sst2", 4000, "a'"): ("missed", -1.0),
                ("sst2", 4000, "d"): ("missed", -(87.0 + 0.2 / 3 - 85.0) + 1), ("cola", 1000, "a"): ("missed", -0.5),
                ("cola", 1000, "a'"): ("met", 1.0)}
    assert set(verdicts) == set(expected)
    for key, (verdict, margin) in expected.items():
        assert verdicts[key]["verdict"] == verdict, key
        assert verdicts[key]["margin"] == (None if margin is None else pytest.approx(margin)), key
    assert verdicts[("sst2", 1000, "c")]["n"] == [2, 3]
    peer = next(r for r in summary["summary"] if (r["task"], r["rows"], r["method"], r["tool"]) ==
                ("sst2", 1000, "lora", "peer"))
    assert peer["points"]["n"] == 3 and peer["seeds"] == [1, 2, 42]
    assert summary["failed"] == ["sst2-1000rows-lora-seed3-peer.json"]
    assert summary["off_rule"] == ["cola-1000rows-lora-seed2-peer.json"]
    assert "| 1,000 | LoRA fp32 | 81.0 ± 1.0 (n=3) | 81.0 ± 0.2 (n=3) |" in markdown
    assert "| 1,000 | c: peftkit QLoRA NF4 >= peftkit LoRA fp32 - 1 | n<3, not judged |" in markdown
    assert sweep_report.TIMING_NOTE in markdown and markdown == (tmp_path / "results.md").read_text()
    assert summary["plots"] == ["sst2.png", "cola.png"]
    assert all((tmp_path / name).read_bytes()[:8] == PNG_MAGIC for name in summary["plots"])


def test_sweep_cell_gives_peftkit_and_the_peer_the_rules_steps(tiny_dir: Path, data_root: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import bench_tasks
    import sweep

    monkeypatch.setattr(bench_tasks, "DATA_ROOT", list(bench_tasks.DATA_ROOT))
    monkeypatch.setattr(sweep, "MIN_STEPS", 16)  # the rule's shape at an eighth of its length: a faster test
    out = tmp_path / "sweep"
    sweep.main(["--tasks", "sst2", "--rows", "40", "--methods", "lora", "--seeds", "1", "--model",
                str(tiny_dir / "bert"), "--data-root", str(data_root), "--out", str(out)])
    runs = {t: json.loads((out / "runs" / f"sst2-40rows-lora-seed42-{t}.json").read_text())
            for t in ("peftkit", "peer")}
    for tool, run in runs.items():
        assert run["ok"], run.get("log_tail")
        # 40 rows at batch 32: ceil(16 x 32 / 40) = 13 epochs of 2 batches, counted by each tool itself
        assert (run["epochs"], run["rule_steps"], run["optimizer_steps"]) == (13, 26, 26), tool
        assert run["run"]["result"]["examples"] == 13 * 40
        assert set(run["metrics"]) >= {"accuracy", "macro_f1", "matthews"}
        assert run["metric"] == run["metrics"]["accuracy"]
    assert "--epochs 13.0 " in Path(runs["peer"]["run"]["log"]).read_text().splitlines()[0]
    assert json.loads((out / "summary.json").read_text())["off_rule"] == []


def test_batch_planners_counts_every_planners_positions() -> None:
    """peftkit's windows of 64 batches group 300 rows whole; Trainer's mega-batches (at least 4) hold 2 batches
    each at 300 rows, and random batches group nothing."""
    import random

    from batch_planners import measure

    rng = random.Random(7)
    lengths = [rng.randint(1, 60) for _ in range(300)]
    ratios = measure(lengths, 32, 1)
    assert 1.0 <= ratios["peftkit"] < ratios["trainer"] < ratios["random"]
    assert ratios["peftkit"] < 1.2 and ratios["random"] > 1.5
