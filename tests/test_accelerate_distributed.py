"""`accelerate launch` with two CPU processes (gloo): a killed run resumes and ends as one process would.

The config committed in docs/accelerate/ddp.yaml is the one the README documents. A first two-process run is
killed (one worker gets SIGKILL after the checkpoint at step 4); `accelerate launch -m peftkit train --resume`
then finishes it. Two processes with batch b see the same global batches as one process with gradient
accumulation 2, so the resumed adapter must equal an uninterrupted one-process run's (to float tolerance),
be written once, and AdaLoRA must end at its target budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from peftkit.config.recipe import build_recipe
from peftkit.train.training import train
from tests import tiny
from tests.conftest import REPO, make_recipe, write_recipe
from tests.test_distributed import assert_same_adapter_weights, dropout_free_bert  # noqa: F401 (fixture)

DDP_CONFIG = REPO / "docs" / "accelerate" / "ddp.yaml"

KILLED_WORKER = textwrap.dedent('''
    import os, signal, sys
    from peftkit.core import adalora
    from peftkit.config.recipe import load_recipe
    from peftkit.train.training import train

    original = adalora.AdaLoraDriver.after_optimizer_step

    def dies_at_step_6(self, step):
        if step == 6 and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, as when a machine loses a worker
        return original(self, step)

    adalora.AdaLoraDriver.after_optimizer_step = dies_at_step_6
    train(load_recipe(sys.argv[1]), echo=lambda line: None)
''')


def _launch(args, cwd):
    # PYTHONPATH: the workers import this checkout, whatever the editable install points at
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def _recipe(tiny_dir, out, bert, grad_accum):
    out.mkdir()
    data = make_recipe(tiny_dir, out, adapter="adalora",
                       train={"max_steps": 8, "batch_size": 8, "grad_accum": grad_accum, "save_every": 4,
                              "eval_at_start": False})
    data["base"]["model"] = str(bert)
    return data


def test_killed_two_process_run_resumes_to_the_one_process_result(tiny_dir, tmp_path, dropout_free_bert):  # noqa: F811
    reference = train(build_recipe(_recipe(tiny_dir, tmp_path / "one", dropout_free_bert, 2)),
                      echo=lambda line: None)

    two = tmp_path / "two"
    recipe = write_recipe(tmp_path / "recipe.yaml", _recipe(tiny_dir, two, dropout_free_bert, 1))
    worker = tmp_path / "killed_worker.py"
    worker.write_text(KILLED_WORKER)
    killed = _launch([str(worker), str(recipe)], cwd=tmp_path)
    assert killed.returncode != 0, killed.stdout[-2000:]
    checkpoints = two / "runs" / "tiny" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-4"]
    # nothing registered: the registry holds at most the name's lock file, which a dead run no longer holds
    assert [p.name for p in (two / "adapters").iterdir() if p.name != ".lock-tiny"] == []

    resumed = _launch(["-m", "peftkit", "train", str(recipe), "--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resumed from") == 1  # said once: only the main process talks
    assert [p.name for p in (two / "adapters").iterdir()] == ["tiny"]  # the resumed run took the lock and freed it

    assert_same_adapter_weights(two / "adapters" / "tiny", reference.adapter_dir)
    meta = json.loads((two / "adapters" / "tiny" / "peftkit.json").read_text())
    assert meta["training"]["num_processes"] == 2 and meta["training"]["optimizer_steps"] == 8
    info = meta["adapter"]["adalora"]
    assert info["final_budget"] == info["target_budget"] == reference.metadata.adapter.adalora.final_budget
    assert info["final_ranks"] == reference.metadata.adapter.adalora.final_ranks
    assert info["reallocations"] == 8 and [s for s, _ in info["budget_history"]] == list(range(1, 9))


def test_4bit_weights_stored_in_bfloat16_compute_what_uint8_storage_computes(tiny_dir, tmp_path):
    """quant_storage only repacks the 4-bit codes into a dtype FSDP can shard: the model computes the same."""
    from peftkit.core.build import build_model, plan_run
    from peftkit.core.evaluation import device_batch

    logits = {}
    for storage in ("uint8", "bfloat16"):
        data = make_recipe(tiny_dir, tmp_path, quant="4bit", base={"dtype": "bfloat16"})
        data["quantization"]["quant_storage"] = storage
        data["base"]["model"] = str(tiny_dir / "bert")
        plan = plan_run(build_recipe(data), 1)
        torch.manual_seed(0)  # the same fresh classification head for both
        model = build_model(plan, torch.device("cpu")).model
        packed = {p.dtype for p in model.parameters() if type(p).__name__ == "Params4bit"}
        assert packed == {getattr(torch, storage)}
        batch = device_batch(plan.task, plan.tokenizer, plan.train_rows, list(range(8)), torch.device("cpu"))
        with torch.no_grad():
            logits[storage] = model(**plan.task.model_inputs(batch)).logits
    torch.testing.assert_close(logits["bfloat16"], logits["uint8"], rtol=0, atol=0)


def _fake_accelerator(distributed_type, fsdp_version=1, use_orig_params=True):
    from types import SimpleNamespace

    plugin = SimpleNamespace(fsdp_version=fsdp_version, use_orig_params=use_orig_params)
    return SimpleNamespace(distributed_type=distributed_type, num_processes=2, state=SimpleNamespace(fsdp_plugin=plugin))


def test_fsdp_refuses_what_the_loop_cannot_shard(tiny_dir, tmp_path, monkeypatch):
    from accelerate.utils import DistributedType

    from peftkit.errors import PeftkitError
    from peftkit.train.launch import check_launch

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    lora_4bit = build_recipe({**make_recipe(tiny_dir, tmp_path, quant="4bit"), "base": {
        "model": str(tiny_dir / "bert"), "dtype": "bfloat16"}})
    said = []
    with pytest.raises(PeftkitError) as refused:
        check_launch(_fake_accelerator(DistributedType.FSDP), lora_4bit, said.append)
    assert str(refused.value) == (
        "under FSDP: quantization: FSDP shards floating tensors only; use bits: 4 with quant_storage and base.dtype "
        "both bfloat16 (or float16 / float32)")
    lora_4bit.quantization.quant_storage = "bfloat16"
    assert check_launch(_fake_accelerator(DistributedType.FSDP), lora_4bit, said.append) is True
    with pytest.raises(PeftkitError, match=r"fsdp_version: peftkit runs FSDP 1"):
        check_launch(_fake_accelerator(DistributedType.FSDP, fsdp_version=2), lora_4bit, said.append)
    with pytest.raises(PeftkitError, match=r"with fsdp_use_orig_params: true$"):
        check_launch(_fake_accelerator(DistributedType.FSDP, use_orig_params=False), lora_4bit, said.append)
    adalora = build_recipe(make_recipe(tiny_dir, tmp_path, adapter="adalora"))
    with pytest.raises(PeftkitError, match=r"adapter.method: adalora reallocates ranks .* use lora$"):
        check_launch(_fake_accelerator(DistributedType.FSDP), adalora, said.append)
    assert said == []

    # on CPUs accelerate's FSDP plugin refuses to start (a traceback from inside Trainer); peftkit says it in one
    # line before Trainer is made
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    with pytest.raises(PeftkitError, match=r"^the accelerate config asks for FSDP, which runs on GPUs only, .*"
                                           r"docs/accelerate/ddp.yaml \(data-parallel\) instead$"):
        train(lora_4bit, echo=said.append)
    assert said == []


def test_killed_two_process_run_with_dropout_resumes_to_the_uninterrupted_one(tiny_dir, tmp_path):
    """Dropout on (the tiny BERT's 0.1 and the adapter's), rows of 2 to 20 words in length-grouped batches: every
    process starts from the same seed, but draws as many random numbers as its batches have positions, so by
    the checkpoint their generators differ, and the resumed run matches only if each process gets its own back
    (restoring the main process's everywhere passes when all rows have one length, and fails here)."""
    import random

    from tests.tiny import FILLER, NEGATIVE, POSITIVE

    rng = random.Random(3)
    rows = []
    for _ in range(128):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, rng.randint(1, 19)) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rows.append({"sentence": " ".join(words), "label": label})
    train_file = tiny.write_tsv(tmp_path / "ragged.tsv", rows)
    runs = {}
    for label in ("whole", "killed"):
        out = tmp_path / label
        data = _recipe(tiny_dir, out, tiny_dir / "bert", 1)
        data["adapter"]["lora_dropout"] = 0.1
        data["data"]["train"] = str(train_file)
        recipe = write_recipe(tmp_path / f"{label}.yaml", data)
        if label == "whole":
            done = _launch(["-m", "peftkit", "train", str(recipe)], cwd=tmp_path)
            assert done.returncode == 0, done.stderr[-3000:]
        else:
            worker = tmp_path / "killed_worker.py"
            worker.write_text(KILLED_WORKER)
            assert _launch([str(worker), str(recipe)], cwd=tmp_path).returncode != 0
            resumed = _launch(["-m", "peftkit", "train", str(recipe), "--resume"], cwd=tmp_path)
            assert resumed.returncode == 0, resumed.stderr[-3000:]
        runs[label] = out / "adapters" / "tiny"
    whole = load_file(str(runs["whole"] / "adapter_model.safetensors"))
    resumed = load_file(str(runs["killed"] / "adapter_model.safetensors"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_deepspeed_refuses_what_it_cannot_train(tiny_dir, tmp_path):
    """DeepSpeed through `accelerate launch`: AdaLoRA (its gradients live in DeepSpeed's buffers), ZeRO-Offload
    (DeepSpeed's CPU Adam only, where peftkit brings its own AdamW groups) and 8-bit or uint8-packed 4-bit bases
    under ZeRO-3 are refused in one line; ZeRO-3 says the weights are sharded, ZeRO-2 that they are not."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from peftkit.errors import PeftkitError
    from peftkit.train.launch import check_launch

    def launched(stage, offload="none"):
        config = {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": offload}}}
        plugin = SimpleNamespace(zero_stage=stage, deepspeed_config=config)
        return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2,
                               state=SimpleNamespace(deepspeed_plugin=plugin))

    said = []
    lora = build_recipe(make_recipe(tiny_dir, tmp_path))
    assert check_launch(launched(2), lora, said.append) is False
    assert check_launch(launched(3), lora, said.append) is True
    with pytest.raises(PeftkitError) as refused:
        check_launch(launched(2, offload="cpu"), lora, said.append)
    assert str(refused.value).startswith("under DeepSpeed ZeRO-2: offload_optimizer: peftkit hands DeepSpeed its "
                                         "own AdamW")
    adalora = build_recipe(make_recipe(tiny_dir, tmp_path, adapter="adalora"))
    with pytest.raises(PeftkitError, match=r"^under DeepSpeed ZeRO-2: adapter.method: adalora .* or use lora$"):
        check_launch(launched(2), adalora, said.append)
    eight_bit = build_recipe(make_recipe(tiny_dir, tmp_path, quant="8bit"))
    assert check_launch(launched(2), eight_bit, said.append) is False
    with pytest.raises(PeftkitError, match=r"^under DeepSpeed ZeRO-3: quantization: ZeRO-3 partitions floating"):
        check_launch(launched(3), eight_bit, said.append)
    assert said == []
