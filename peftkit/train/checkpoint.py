"""Training checkpoints: Trainer's, made complete by a record, checked before ``--resume`` reads them.

``<runs>/<name>/checkpoints/checkpoint-<N>/`` is what ``transformers.Trainer`` writes (the adapter, the optimizer
and scheduler states, every process's random generators as ``rng_state_<rank>.pth``, ``trainer_state.json``),
plus AdaLoRA's allocator (:data:`peftkit.train.adalora_callback.ALLOCATOR_FILE`) and peftkit's record
(:data:`RECORD_FILE`: the recipe the run computes, its eval history, time and examples so far). The record is
written last, whole (a temporary file renamed into place), after every process has written its part, so a folder
without one is a checkpoint a killed run left half-written: ``--resume`` never picks it, and the next save of
that step replaces it. Trainer's own pruning (``save_total_limit``) is off because it would count such folders;
:func:`prune` keeps the last ``train.keep_checkpoints`` complete ones.

Trainer loads its ``.pt``/``.pth`` files with ``torch.load(weights_only=True)``, which refuses a pickle that
would run code; :func:`check_readable` reads every file the same way before anything heavy, so a crafted or
broken checkpoint is refused with one line naming it, and the pickled format of peftkit before it ran on Trainer
is refused unread.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..errors import PeftkitError

if TYPE_CHECKING:
    from ..config.recipe import Recipe

RECORD_FILE = "peftkit_run.json"
# Trainer pickles its TrainingArguments here and never loads it back on resume; neither does peftkit
_ARGS_FILE = "training_args.bin"
_FOLDER = re.compile(r"checkpoint-(\d+)")
# what peftkit wrote before it ran on Trainer: step-<N>/ with these files (training.pt: a pickle, never read)
_OLD_FILES = ("training.json", "training.pt")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _step(folder: Path) -> Optional[int]:
    match = _FOLDER.fullmatch(folder.name)
    return int(match.group(1)) if match and folder.is_dir() else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _step(p) is not None and (p / RECORD_FILE).is_file()]
    return sorted(found, key=_step)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def old_format_checkpoints(run_dir: Path) -> list[Path]:
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if any((p / f).is_file() for f in _OLD_FILES))


def write_record(folder: Path, record: dict[str, Any]) -> None:
    temporary = folder / f".{RECORD_FILE}.tmp"
    temporary.write_text(json.dumps(record, indent=2, default=str))
    os.replace(temporary, folder / RECORD_FILE)


def read_record(folder: Path) -> dict[str, Any]:
    try:
        record = json.loads((folder / RECORD_FILE).read_text())
        if not isinstance(record, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError) as exc:
        raise _unreadable(folder, RECORD_FILE, exc) from None
    return record


def prune(output_dir: Path, keep: int) -> None:
    """Keep the last ``keep`` complete checkpoints; drop older ones and half-written ones older than those."""
    complete = list_checkpoints(output_dir.parent)
    kept = complete[-keep:]
    oldest_kept = _step(kept[0]) if kept else None
    for folder in output_dir.iterdir():
        step = _step(folder)
        if step is None or folder in kept:
            continue
        if folder in complete or (oldest_kept is not None and step < oldest_kept):
            shutil.rmtree(folder, ignore_errors=True)


def _unreadable(folder: Path, name: str, exc: Exception) -> PeftkitError:
    return PeftkitError(f"checkpoint {folder} is unreadable ({name}: {type(exc).__name__}); delete it to resume from "
                        "an earlier one, or start over with --overwrite")


def check_readable(folder: Path) -> None:
    """Read every file of a checkpoint as Trainer will, safely, before the run builds anything."""
    import torch
    from safetensors import safe_open
    from transformers.trainer_pt_utils import safe_globals

    for path in sorted(folder.iterdir()):
        if path.name == _ARGS_FILE:
            continue
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt"):
                    pass
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix in (".pt", ".pth", ".bin"):
                # numpy's generator state allowed, as Trainer's own _load_rng_state does; mmap: the pickle is
                # checked without reading the tensors (a full fine-tune's optimizer state is GBs, loaded again
                # by Trainer right after)
                with safe_globals():
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise _unreadable(folder, path.name, exc) from None


def refuse_old_format(run_dir: Path) -> None:
    old = old_format_checkpoints(run_dir)
    if old:
        pickled = " (its training.pt is a pickle, which can run code when loaded, and is not read)" \
            if (old[-1] / "training.pt").is_file() else ""
        raise PeftkitError(f"checkpoint {old[-1]} was written by an earlier peftkit, before it trained on "
                           f"transformers' Trainer{pickled}; it cannot be resumed: start over with --overwrite")


# Fields that may change between a run and its resumption: they do not change what is computed.
_FREE_ON_RESUME = {"train": {"progress", "eval_every", "log_every", "save_every", "keep_checkpoints", "eval_batch_size",
                             "eval_at_start", "device"}, "output": {"registry"}}


def resume_relevant(recipe: "Recipe") -> dict[str, Any]:
    data = recipe.to_dict()
    for section, keys in _FREE_ON_RESUME.items():
        for key in keys:
            data.get(section, {}).pop(key, None)
    return data


def check_same_run(saved: Optional[dict[str, Any]], current: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume with a recipe that would compute something else than the checkpoint's run."""
    if saved is None:
        return
    for section in sorted(set(saved) | set(current)):
        before, now = saved.get(section) or {}, current.get(section) or {}
        if not isinstance(before, dict) or not isinstance(now, dict):
            before, now = {"": before}, {"": now}
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                where = f"{section}.{key}".rstrip(".")
                raise PeftkitError(
                    f"--resume: {where} was {before.get(key)!r} when {checkpoint} was written and is "
                    f"{now.get(key)!r} now; resume with the original value, or start over with --overwrite"
                )
