"""What a trained adapter is on disk, and how it gets there without ever being half-written.

``<registry>/<name>/`` holds:

* ``adapter_config.json`` and ``adapter_model.safetensors``: plain peft format, the task head's weights
  included (peft's ``modules_to_save``), so ``PeftModel.from_pretrained`` loads it without peftkit;
  for full fine-tuning, a transformers model folder instead;
* ``peftkit.json``: the metadata that makes the folder self-describing (:func:`build_metadata`), with the
  sha256 of every other file so that a corrupt copy is detected on load.

Everything is written into a hidden staging folder beside the target and moved into place with one
``rename``; a crash leaves at most a ``.staging-*`` folder, never a partial adapter.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Iterator

METADATA_FILE = "peftkit.json"
FORMAT_VERSION = 1
_LIBRARIES = ("peftkit", "torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != METADATA_FILE
    }


def build_metadata(**fields: Any) -> dict[str, Any]:
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    return {"format_version": FORMAT_VERSION, "created": now, "versions": library_versions(), **fields}


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


@contextmanager
def staged_folder(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``target`` in one rename, else it is removed.

    With ``overwrite``, an existing ``target`` is moved aside first and deleted only once the new folder is
    in place, so at every instant either the old or the new adapter is there, complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".staging-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if target.exists():
            if not overwrite:
                raise FileExistsError(target)
            trash = target.parent / f".trash-{target.name}-{uuid.uuid4().hex[:8]}"
            os.replace(target, trash)
            os.replace(staging, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def seal(folder: Path, metadata: dict[str, Any]) -> None:
    """Write ``peftkit.json`` with the checksums of the folder's files; the last file written."""
    metadata = {**metadata, "files": file_checksums(folder)}
    write_json_atomic(folder / METADATA_FILE, metadata)


def read_metadata(folder: Path) -> dict[str, Any]:
    from .errors import PeftkitError

    path = folder / METADATA_FILE
    if not path.is_file():
        raise PeftkitError(f"{folder} has no {METADATA_FILE}: it is not a peftkit adapter (or was not finished)")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise PeftkitError(f"{path} is corrupt (not valid JSON); retrain or restore the adapter") from None
