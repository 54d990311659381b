"""What a trained adapter is on disk, and how it gets there without ever being half-written.

``<registry>/<name>/`` holds:

* ``adapter_config.json`` and ``adapter_model.safetensors``: plain peft format, the task head's weights
  included (peft's ``modules_to_save``), so ``PeftModel.from_pretrained`` loads it without peftkit;
  for full fine-tuning, a transformers model folder instead;
* ``peftkit.json``: the metadata that makes the folder self-describing (:func:`build_metadata`), with the
  sha256 of every other file so that a corrupt copy is detected on load, and a digest of its own; its schema
  (:mod:`peftkit.config.metadata`) is checked before it is written and every time it is read.

Everything is written into a hidden staging folder beside the target and moved into place with one
``rename`` (:mod:`peftkit.store.staging`); a crash leaves at most a ``.staging-*`` folder, never a partial adapter,
and the next write into the same folder sweeps it away.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import uuid
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .staging import staged_folder  # noqa: F401  (writers import it from here)

if TYPE_CHECKING:
    from ..config.metadata import StoredMetadata
    from ..config.recipe import Recipe

METADATA_FILE = "peftkit.json"
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


def unreadable_file(name: str, head: bytes, size: int) -> Optional[str]:
    """Why a recorded file cannot be what its name says, judged from its first bytes (None: it can be).

    Checked before any loader sees it: a checksum can be recomputed by whoever swapped the file, and the
    loaders (safetensors, json) answer a wrong file with a traceback rather than a line. A safetensors file
    opens with its header's length (8 bytes, little-endian) and that many bytes of JSON.
    """
    if name.endswith(".safetensors"):
        length = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
        if not 0 < length <= size - 8:
            return "not a safetensors file"
        try:
            header = json.loads(head[8:8 + length])
        except ValueError:
            return "not a safetensors file (its header is not JSON)"
        return None if isinstance(header, dict) else "not a safetensors file"
    if name.endswith(".json"):
        try:
            json.loads(head)
        except ValueError:
            return "not valid JSON"
    return None


def check_readable(path: Path, head: bytes, size: int) -> None:
    """Refuse a recorded file that is not what its name says, in one line (see :func:`unreadable_file`)."""
    problem = unreadable_file(path.name, head, size)
    if problem:
        from ..errors import PeftkitError

        raise PeftkitError(f"{path} is {problem}, though its checksum was recorded so: the folder was tampered "
                           "with; restore the adapter from a source you trust, or retrain it")


def file_head(path: Path, name: str) -> bytes:
    """As much of ``path`` as :func:`unreadable_file` needs: a safetensors header, or a whole JSON file."""
    with path.open("rb") as fh:
        if not name.endswith(".safetensors"):
            return fh.read() if name.endswith(".json") else b""
        first = fh.read(8)
        length = int.from_bytes(first, "little") if len(first) == 8 else 0
        return first + fh.read(min(length, 100 * 2**20))  # a real header is kilobytes; never read a bogus GB


def build_metadata(**fields: Any) -> dict[str, Any]:
    from ..config.metadata import FORMAT_VERSION

    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    return {"format_version": FORMAT_VERSION, "created": now, "versions": library_versions(), **fields}


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n")
    os.replace(tmp, path)


def seal(folder: Path, metadata: dict[str, Any]) -> "StoredMetadata":
    """Write ``peftkit.json`` with the checksums of the folder's files and its own digest; the last file written.
    Returns what a reader of the folder will get back.

    It is checked against the schema first, so that peftkit never writes metadata it would refuse to read.
    """
    from ..config.metadata import DIGEST, digest, parse
    from ..errors import PeftkitError

    # as it will be read back (tuples become lists); the digest is filled in once the rest is known to be valid
    metadata = json.loads(json.dumps({**metadata, "files": file_checksums(folder), DIGEST: "0" * 64}))
    model, found = parse(metadata)
    if model is None:
        raise PeftkitError(f"nothing was saved: the metadata of {metadata.get('name')} would not be valid "
                           f"({'; '.join(found[:3])})")
    metadata[DIGEST] = digest(metadata)
    write_json_atomic(folder / METADATA_FILE, metadata)
    return model.model_copy(update={DIGEST: metadata[DIGEST]})


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def read_metadata(folder: Path) -> "StoredMetadata":
    """The folder's ``peftkit.json``, validated (:func:`peftkit.config.metadata.validate`); one line when it is not."""
    from ..config.metadata import validate
    from ..errors import PeftkitError

    path = folder / METADATA_FILE
    if not path.is_file():
        raise PeftkitError(f"{folder} has no {METADATA_FILE}: it is not a peftkit adapter (or was not finished)")
    try:
        metadata = json.loads(path.read_text(), parse_constant=_no_constant)  # NaN and Infinity are not JSON
    except ValueError:  # UnicodeDecodeError included
        raise PeftkitError(f"{path} is corrupt (not valid JSON); retrain or restore the adapter") from None
    return validate(metadata, path)


def derived_lora_recipe(parent_recipe: "Recipe", name: str, r: int, lora_alpha: float, lora_dropout: float,
                        target_modules: list[str]) -> dict[str, Any]:
    """The recipe recorded for a LoRA adapter made from stored ones (converted, combined): the parent's, with the
    adapter the new one holds and its own name, so `peftkit adapters show` and retraining read true settings."""
    recipe = parent_recipe.to_dict()
    recipe["adapter"] = {"method": "lora", "r": r, "lora_alpha": float(lora_alpha), "lora_dropout": lora_dropout,
                         "target_modules": target_modules}
    recipe["output"] = {**recipe["output"], "name": name}
    return recipe


def register_derived(target: Path, weights: dict[str, Any], peft_config: dict[str, Any], metadata: dict[str, Any],
                     overwrite: bool) -> Path:
    """Write an adapter made from stored ones into the registry folder ``target``: its weights, its peft config
    and its sealed metadata, appearing whole (staged, then renamed into place)."""
    from safetensors.torch import save_file

    with staged_folder(target, overwrite=overwrite) as folder:
        save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(peft_config, indent=2, default=list) + "\n")
        seal(folder, metadata)
    return target
