"""The registry: concurrent registration, integrity checks, base mismatch, names."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftkit.cli import main
from peftkit.config.recipe import build_recipe
from peftkit.errors import PeftkitError
from peftkit.store.artifacts import seal
from peftkit.store.loading import load_trained
from peftkit.store.registry import Registry
from peftkit.train.training import train
from tests import tiny


def test_eight_processes_register_at_once(tmp_path):
    names = [f"adapter-{i}" for i in range(8)]
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=tiny.register_stand_in, args=(str(tmp_path), n)) for n in names]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
        assert p.exitcode == 0
    registry = Registry(tmp_path)
    assert registry.names() == sorted(names)
    for name in names:
        folder = registry.folder(name)
        assert (folder / "adapter_model.safetensors").read_bytes() == name.encode() * 100_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.fixture
def trained(recipe_for):
    return train(build_recipe(recipe_for(quant="4bit", train={"max_steps": 2, "eval_at_start": False})),
                 echo=lambda line: None)


def test_a_flipped_byte_is_detected(trained):
    weights = trained.adapter_dir / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(PeftkitError, match=r"adapter_model.safetensors is corrupt \(its checksum differs"):
        load_trained(trained.adapter_dir)
    shown = CliRunner().invoke(main, ["adapters", "show", "tiny", "--registry", str(trained.adapter_dir.parent)])
    assert "files: FAILED" in shown.output


def test_a_changed_base_is_refused(trained, tiny_dir):
    meta_path = trained.adapter_dir / "peftkit.json"
    meta = json.loads(meta_path.read_text())
    meta["base"]["fingerprint"] = "sha256:" + "0" * 64  # as if trained on other weights
    seal(meta_path.parent, meta)  # as peftkit would have written it
    with pytest.raises(PeftkitError, match=r"^tiny was trained on .* with weights sha256:000000000000, but .* now "
                                           r"has sha256:[0-9a-f]{12}; point base.model at the original weights"):
        load_trained(trained.adapter_dir)
    assert load_trained(trained.adapter_dir, check_base=False).model is not None  # the expert override


def test_remove_and_names(trained):
    registry = Registry(trained.adapter_dir.parent)
    with pytest.raises(PeftkitError, match=r"adapter name '../x' is not allowed"):
        registry.folder("../x")
    out = CliRunner().invoke(main, ["adapters", "rm", "tiny", "--registry", str(registry.root)])
    assert out.exit_code == 0 and registry.names() == []
    listed = CliRunner().invoke(main, ["adapters", "list", "--registry", str(registry.root)])
    assert listed.output.strip() == f"no adapters in {registry.root}/"
