"""Data-parallel training under torchrun on the CPU (gloo): same result as one process, one writer.

Two processes with batch b each see the same global batches as one process with gradient accumulation 2
(process r takes every other batch), so their adapters must agree to float tolerance; AdaLoRA's rank masks
must be identical on both ranks after every reallocation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, make_recipe, write_recipe

WORKER = textwrap.dedent('''
    import json, os, sys
    from peftkit.core import adalora
    from peftkit.config.recipe import load_recipe
    from peftkit.train.training import train

    log, original = [], adalora.AdaLoraDriver.after_optimizer_step

    def recording(self, step):
        budget = original(self, step)
        log.append([step, adalora.final_ranks(self.tuner)])
        return budget

    adalora.AdaLoraDriver.after_optimizer_step = recording
    train(load_recipe(sys.argv[1]), echo=lambda line: None)
    with open(os.path.join(sys.argv[2], f"masks-{os.environ.get('RANK', '0')}.json"), "w") as fh:
        json.dump(log, fh)
''')


@pytest.fixture
def dropout_free_bert(tiny_dir, tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(tiny_dir / "bert", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # dropout draws differ per process
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def assert_same_adapter_weights(folder_a, folder_b) -> None:
    """Two adapter folders hold the same tensors, to the float tolerance of a different reduction order."""
    a = load_file(str(folder_a / "adapter_model.safetensors"))
    b = load_file(str(folder_b / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def _run(command, cwd):
    # PYTHONPATH: the workers import this checkout, whatever the editable install points at
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_match_one_with_accumulation(tiny_dir, tmp_path, dropout_free_bert):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    runs = {}
    for label, processes, accum in (("two", 2, 1), ("one", 1, 2)):
        out = tmp_path / label
        out.mkdir()
        data = make_recipe(tiny_dir, out, adapter="adalora",
                           train={"max_steps": 8, "batch_size": 8, "grad_accum": accum, "save_every": 4,
                                  "eval_at_start": False})
        data["base"]["model"] = str(dropout_free_bert)
        recipe = write_recipe(out / "recipe.yaml", data)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_port", str(29500 + processes)]
        _run([*launcher, str(worker), str(recipe), str(out)], cwd=tmp_path)
        runs[label] = out

    two, one = runs["two"], runs["one"]
    masks = [json.loads((two / f"masks-{r}.json").read_text()) for r in (0, 1)]
    assert len(masks[0]) == 8 and masks[0] == masks[1]  # every reallocation, identical on both ranks
    assert masks[0] == json.loads((one / "masks-0.json").read_text())

    adapters = list((two / "adapters").iterdir())
    assert [p.name for p in adapters] == ["tiny"]  # written once, by the main process
    assert [p.name for p in (two / "runs" / "tiny" / "checkpoints").iterdir()] == ["checkpoint-4"]
    assert_same_adapter_weights(two / "adapters" / "tiny", one / "adapters" / "tiny")
    meta = json.loads((two / "adapters" / "tiny" / "peftkit.json").read_text())
    assert meta["training"]["num_processes"] == 2 and meta["training"]["optimizer_steps"] == 8
    info = meta["adapter"]["adalora"]
    assert info["final_budget"] == info["target_budget"] and info["reallocations"] == 8
