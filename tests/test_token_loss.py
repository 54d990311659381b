"""The causal-LM loss of an accumulated step is a mean over all its tokens (issue 15, part 4).

Rows here answer with 1 to 12 words, so micro-batches hold different numbers of counted tokens: averaging each
micro-batch's mean (the loop before this test) weighs a token of a short micro-batch more than one of a long
one, and accumulating 4 batches of 2 then trains something else than one batch of 8.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from peftkit.config.recipe import build_recipe
from peftkit.train.training import train
from tests.conftest import free_port, make_recipe, write_recipe
from tests.test_distributed import _run, assert_same_adapter_weights
from tests.tiny import FILLER


@pytest.fixture
def ragged_instructions(tmp_path: Path) -> Path:
    rng = random.Random(5)
    rows = []
    for _ in range(64):
        word = rng.choice(FILLER)
        rows.append({"instruction": f"say {word} again", "input": "",
                     "output": " ".join([word] * rng.randint(1, 12))})
    path = tmp_path / "ragged.json"
    path.write_text(json.dumps(rows))
    return path


def _recipe(tiny_dir: Path, out: Path, data: Path, batch_size: int, grad_accum: int) -> dict:
    recipe = make_recipe(tiny_dir, out, task="causal_lm",
                         train={"max_steps": 4, "batch_size": batch_size, "grad_accum": grad_accum,
                                "group_by_length": False, "eval_at_start": False, "lr": 1e-2})
    recipe["data"] = {"train": str(data), "eval_fraction": 0.125, "max_length": 32}
    recipe["adapter"]["lora_dropout"] = 0.0
    return recipe


def test_accumulating_4_batches_of_2_equals_one_batch_of_8(tiny_dir: Path, tmp_path: Path,
                                                          ragged_instructions: Path) -> None:
    quiet = {"echo": lambda line: None}
    accumulated = train(build_recipe(_recipe(tiny_dir, tmp_path / "accumulated", ragged_instructions, 2, 4)),
                        **quiet)
    whole = train(build_recipe(_recipe(tiny_dir, tmp_path / "whole", ragged_instructions, 8, 1)), **quiet)
    assert_same_adapter_weights(accumulated.adapter_dir, whole.adapter_dir)


WORKER = '''
import sys
from peftkit.config.recipe import load_recipe
from peftkit.train.training import train
train(load_recipe(sys.argv[1]), echo=lambda line: None)
'''


def test_two_processes_equal_one_on_rows_of_different_lengths(tiny_dir: Path, tmp_path: Path,
                                                             ragged_instructions: Path) -> None:
    """Two processes with batch 2 see together the batches of 4 one process sees; each process's tokens count
    towards one total, gathered across the processes. (Against one process accumulating 2 batches of 2, the
    per-micro-batch mean would pass too: both weigh a token by its micro-batch alike.)"""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    runs = {}
    for label, processes, batch in (("two", 2, 2), ("one", 1, 4)):
        out = tmp_path / label
        out.mkdir()
        recipe = write_recipe(out / "recipe.yaml", _recipe(tiny_dir, out, ragged_instructions, batch, 1))
        _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
              "--master_port", str(free_port()), str(worker), str(recipe)], cwd=tmp_path)
        runs[label] = out / "adapters" / "tiny"
    assert_same_adapter_weights(runs["two"], runs["one"])
