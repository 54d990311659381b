"""A registered adapter read into memory in one go, every file checked against its recorded sha256.

Serving, ``adapter.init_from``, ``adalora to-lora`` and ``combine`` read adapters this way rather than opening
the files after a check: the bytes that were verified are the bytes that get used, so a concurrent ``peftkit
adapters rm`` or a file replaced mid-load cannot slip a half-read or different adapter past the check; either
the whole adapter is read or the load fails with a one-line error naming it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.metadata import StoredMetadata
from ..errors import PeftkitError
from .artifacts import check_readable, read_metadata
from .registry import Registry

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class AdapterSnapshot:
    name: str
    folder: Path
    metadata: StoredMetadata
    config: dict[str, Any]  # adapter_config.json
    weights: dict[str, Any]  # peft's on-disk tensor names -> tensors
    size_bytes: int


def _removed(registry: Registry, name: str) -> PeftkitError:
    return PeftkitError(f"adapter {name!r} was removed from {registry.root}/ while it was being loaded; "
                        "register it again or leave it out")


def read_verified(folder: Path, metadata: StoredMetadata) -> dict[str, bytes]:
    """Every file ``metadata`` records, read once and checked against its sha256: relative path -> bytes."""
    try:
        blobs = {relative: (folder / relative).read_bytes() for relative in metadata.files}
    except FileNotFoundError:
        missing = [r for r in metadata.files if not (folder / r).is_file()]
        if missing and folder.exists():
            raise PeftkitError(f"{folder}: {missing[0]} is missing; restore it or retrain the adapter") from None
        raise
    for relative, blob in blobs.items():
        if hashlib.sha256(blob).hexdigest() != metadata.files[relative]:
            raise PeftkitError(f"{folder / relative} is corrupt (its checksum differs from the one saved); "
                               "restore it or retrain")
        check_readable(folder / relative, blob, len(blob))
    return blobs


def read_snapshot(registry: Registry, name: str,
                  not_an_adapter: str = "it cannot share a base with others; use `peftkit eval NAME` for it alone"
                  ) -> AdapterSnapshot:
    """Adapter ``name`` read once, every file checked; what each consumer of a stored adapter reads (serving,
    transfer, conversion, combination). ``not_an_adapter``: what to say when ``name`` is a full fine-tune."""
    not_an_adapter = not_an_adapter.replace("NAME", name)
    folder = registry.folder(name)
    try:
        metadata = read_metadata(folder)
        blobs = read_verified(folder, metadata)
    except FileNotFoundError:
        raise _removed(registry, name) from None
    except PeftkitError:
        if not folder.exists():
            raise _removed(registry, name) from None
        raise
    if metadata.recipe.adapter is None:
        raise PeftkitError(f"{name} is a fully fine-tuned model, not an adapter; {not_an_adapter}")
    if ADAPTER_WEIGHTS not in blobs or ADAPTER_CONFIG not in blobs:
        raise PeftkitError(f"{folder} lacks {ADAPTER_WEIGHTS} or {ADAPTER_CONFIG}; retrain the adapter")
    from safetensors.torch import load as load_safetensors

    return AdapterSnapshot(
        name=name,
        folder=folder,
        metadata=metadata,
        config=json.loads(blobs[ADAPTER_CONFIG]),
        weights=load_safetensors(blobs[ADAPTER_WEIGHTS]),
        size_bytes=sum(len(b) for b in blobs.values()),
    )
