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

import torch
from safetensors.torch import load_file

from peftkit.recipe import build_recipe
from peftkit.training import train
from tests.conftest import REPO, make_recipe, write_recipe
from tests.test_distributed import dropout_free_bert  # noqa: F401 (fixture)

DDP_CONFIG = REPO / "docs" / "accelerate" / "ddp.yaml"

KILLED_WORKER = textwrap.dedent('''
    import os, signal, sys
    from peftkit import adalora
    from peftkit.recipe import load_recipe
    from peftkit.training import train

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


def test_killed_two_process_run_resumes_to_the_one_process_result(tiny_dir, tmp_path, dropout_free_bert):
    reference = train(build_recipe(_recipe(tiny_dir, tmp_path / "one", dropout_free_bert, 2)),
                      echo=lambda line: None)

    two = tmp_path / "two"
    recipe = write_recipe(tmp_path / "recipe.yaml", _recipe(tiny_dir, two, dropout_free_bert, 1))
    worker = tmp_path / "killed_worker.py"
    worker.write_text(KILLED_WORKER)
    killed = _launch([str(worker), str(recipe)], cwd=tmp_path)
    assert killed.returncode != 0, killed.stdout[-2000:]
    checkpoints = two / "runs" / "tiny" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-4"]
    assert not (two / "adapters").exists()

    resumed = _launch(["-m", "peftkit", "train", str(recipe), "--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resumed from") == 1  # said once: only the main process talks
    assert [p.name for p in (two / "adapters").iterdir()] == ["tiny"]

    a = load_file(str(two / "adapters" / "tiny" / "adapter_model.safetensors"))
    b = load_file(str(reference.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    meta = json.loads((two / "adapters" / "tiny" / "peftkit.json").read_text())
    assert meta["training"]["num_processes"] == 2 and meta["training"]["optimizer_steps"] == 8
    info = meta["adapter"]["adalora"]
    assert info["final_budget"] == info["target_budget"] == reference.metadata["adapter"]["adalora"]["final_budget"]
    assert info["final_ranks"] == reference.metadata["adapter"]["adalora"]["final_ranks"]
    assert info["reallocations"] == 8 and [s for s, _ in info["budget_history"]] == list(range(1, 9))
