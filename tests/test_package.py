"""The package as users meet it: cheap to import, runnable as `python -m peftkit`, atomic on disk."""

from __future__ import annotations

import subprocess
import sys

import pytest

from peftkit.errors import PeftkitError
from peftkit.store.artifacts import read_metadata, seal, staged_folder
from tests import tiny


def test_import_is_cheap():
    code = "import sys, peftkit; print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "peftkit", "--help"], capture_output=True, text=True, check=True)
    assert "validate" in out.stdout and "train" in out.stdout


def test_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "adapters" / "a"
    with pytest.raises(RuntimeError):
        with staged_folder(target) as folder:
            (folder / "adapter_model.safetensors").write_bytes(b"half")
            raise RuntimeError("crash while saving")
    assert not target.exists()
    assert list((tmp_path / "adapters").iterdir()) == []


def test_overwrite_keeps_the_old_adapter_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "a"
    with staged_folder(target) as folder:
        (folder / "weights").write_text("old")
        seal(folder, tiny.adapter_metadata("a"))
    with pytest.raises(RuntimeError):
        with staged_folder(target, overwrite=True) as folder:
            (folder / "weights").write_text("new, half written")
            raise RuntimeError("crash")
    assert (target / "weights").read_text() == "old"
    with staged_folder(target, overwrite=True) as folder:
        (folder / "weights").write_text("new")
        seal(folder, tiny.adapter_metadata("a"))
    assert (target / "weights").read_text() == "new"
    assert read_metadata(target).files == {"weights": __import__("hashlib").sha256(b"new").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_existing_target_is_refused_without_overwrite(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(PeftkitError, match=r"^.*/a was created by another process while this one was written; "
                                           r"nothing was replaced: choose another name, or pass --overwrite"):
        with staged_folder(tmp_path / "a"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_corrupt_metadata_is_one_line(tmp_path):
    (tmp_path / "peftkit.json").write_text("{not json")
    with pytest.raises(PeftkitError, match=r"peftkit.json is corrupt \(not valid JSON\); retrain or restore"):
        read_metadata(tmp_path)
