"""What killed writers leave is cleaned, a live writer's folder never is, and an --overwrite killed at any point
leaves a complete adapter readable; files get the umask's modes; broken folders can be removed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.store import staging
from peftkit.store.registry import Registry
from peftkit.store.staging import STALE_SECONDS, staged_folder, sweep


def _adapter(root: Path, name: str, content: str) -> Path:
    """A stand-in adapter: a weights file and a peftkit.json (what makes a folder an adapter), written whole."""
    with staged_folder(root / name, overwrite=True) as folder:
        (folder / "weights").write_text(content)
        (folder / "peftkit.json").write_text("{}")
    return root / name


def _old(path: Path) -> Path:
    past = time.time() - STALE_SECONDS - 60
    os.utime(path, (past, past))
    return path


def test_stale_leftovers_are_swept_and_a_live_writer_is_not(tmp_path):
    killed = tmp_path / ".staging-a-4242-0badc0de"
    killed.mkdir()
    _old(killed)
    trash = tmp_path / ".trash-b-4242-deadbeef"
    trash.mkdir()
    legacy_trash = tmp_path / ".trash-b-0ddba115"  # as peftkit named it before the pid was in the name
    legacy_trash.mkdir()
    fresh = tmp_path / ".staging-c-4242-12345678"  # just made: its writer may be between mkdir and lock
    fresh.mkdir()
    live = tmp_path / ".staging-d-4242-87654321"
    live.mkdir()
    _old(live)
    other = tmp_path / ".staging-notes"  # not a name peftkit makes
    other.mkdir()
    held = staging._lock(live)
    try:
        _adapter(tmp_path, "e", "new")  # every write sweeps its folder first
    finally:
        staging._unlock(held)
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name, live.name, other.name, "e"]
    sweep(tmp_path)  # the writer is gone now: its folder is stale
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name, other.name, "e"]


def _killed_during(target: Path, content: str, when: str, exchange: bool = True) -> None:
    """Run an --overwrite of ``target`` in a child process that dies (os._exit, no cleanup) at ``when``."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            real_rename, real_replace = staging._renameat2, os.replace

            def rename(src, dst, flag):
                if flag == staging._RENAME_EXCHANGE:
                    if when == "before-exchange":
                        os._exit(9)
                    if not exchange:
                        return False
                    done = real_rename(src, dst, flag)
                    if when == "after-exchange":
                        os._exit(9)
                    return done
                return real_rename(src, dst, flag)

            calls = []

            def replace(src, dst):
                calls.append(dst)
                if when == "between-renames" and len(calls) == 2:
                    os._exit(9)
                return real_replace(src, dst)

            staging._renameat2 = rename
            os.replace = replace
            _adapter(target.parent, target.name, content)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


@pytest.mark.parametrize("when, exchange, expected", [
    ("before-exchange", True, "old"),
    ("after-exchange", True, "new"),
    ("between-renames", False, "old"),  # no RENAME_EXCHANGE: the old copy waits under .replaced-*
])
def test_an_overwrite_killed_at_any_point_leaves_a_complete_adapter(tmp_path, when, exchange, expected):
    registry = Registry(tmp_path)
    target = _adapter(tmp_path, "a", "old")
    _killed_during(target, "new", when, exchange)
    folder = registry.folder("a")  # a reader right after the kill
    assert (folder / "weights").read_text() == expected and (folder / "peftkit.json").is_file()
    assert registry.names() == ["a"]
    sweep(tmp_path, now=time.time() + STALE_SECONDS + 1)  # the next write, much later
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert (registry.folder("a") / "weights").read_text() == expected


def test_without_exchange_an_overwrite_still_replaces(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "_renameat2", lambda src, dst, flag: False)
    _adapter(tmp_path, "a", "old")
    _adapter(tmp_path, "a", "new")
    assert (tmp_path / "a" / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_modes_of_the_umask(tmp_path, umask):
    before = os.umask(umask)
    try:
        with staged_folder(tmp_path / "a") as folder:
            save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))  # safetensors writes 0600
            (folder / "sub").mkdir()
            (folder / "sub" / "adapter_config.json").write_text("{}")
    finally:
        os.umask(before)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "a").rglob("*")}
    assert modes == {"adapter_model.safetensors": 0o666 & ~umask, "adapter_config.json": 0o666 & ~umask,
                     "sub": 0o777 & ~umask}


def test_rm_removes_a_broken_folder(tmp_path):
    (tmp_path / "half").mkdir()  # a copy that never finished: no peftkit.json
    (tmp_path / "half" / "adapter_model.safetensors").write_bytes(b"x")
    out = CliRunner().invoke(main, ["adapters", "rm", "half", "--registry", str(tmp_path)])
    assert (out.exit_code, out.output) == (0, "removed half (an incomplete folder, without its peftkit.json)\n")
    assert list(tmp_path.iterdir()) == []


def test_a_name_is_held_by_one_process_and_freed_when_it_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from peftkit.store.registry import Registry\n"
                               f"with Registry({str(tmp_path)!r}).reserve('a', 'output.name'):\n"
                               "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PeftkitError) as refused:
            with Registry(tmp_path).reserve("a", "output.name"):
                pass
        assert str(refused.value) == (f"output.name: adapter 'a' is being written into {tmp_path}/ by another "
                                      f"process (pid {holder.pid}); wait for it to finish, or choose another name")
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".lock-a").is_file()  # the killed holder's file stays, but no one holds it
    with Registry(tmp_path).reserve("a", "output.name"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_whole_run(recipe_for, tmp_path):
    from peftkit.config.recipe import build_recipe
    from peftkit.train.training import train

    recipe = build_recipe(recipe_for(train={"max_steps": 2, "eval_at_start": False}))
    train(recipe, echo=lambda line: None)
    old_events = tmp_path / "runs" / "tiny" / "tensorboard" / "events.out.tfevents.old"
    old_events.write_bytes(b"the first run's curves")
    train(recipe, overwrite=True, echo=lambda line: None)
    assert not old_events.exists() and list(old_events.parent.glob("events.out.tfevents.*"))
