"""The adapter registry: one folder per adapter under a root (``adapters/`` by default).

A folder counts as an adapter once its ``peftkit.json`` exists; that file is written last and the folder
appears by one rename (``artifacts.staged_folder``), so a listing never shows half an adapter. Names are
checked before they touch the file system, and an unknown name is answered with the closest ones.
"""

from __future__ import annotations

import difflib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .artifacts import METADATA_FILE, read_metadata
from .errors import PeftkitError
from .naming import check_adapter_name

DEFAULT_ROOT = "adapters"


@dataclass
class Entry:
    name: str
    folder: Path
    metadata: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())


class Registry:
    def __init__(self, root: str | Path = DEFAULT_ROOT):
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / METADATA_FILE).is_file())

    def folder(self, name: str) -> Path:
        """The folder of a registered adapter; an unknown name suggests the closest registered ones."""
        check_adapter_name(name)
        folder = self.root / name
        if not (folder / METADATA_FILE).is_file():
            close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else "run `peftkit adapters list` to see them"
            raise PeftkitError(f"no adapter named {name!r} in {self.root}/; {hint}")
        return folder

    def get(self, name: str) -> Entry:
        folder = self.folder(name)
        return Entry(name, folder, read_metadata(folder))

    def entries(self) -> list[Entry]:
        found = []
        for name in self.names():
            try:
                found.append(self.get(name))
            except PeftkitError:
                continue  # a corrupt entry is reported by `show`, not allowed to break the listing
        return found

    def target(self, name: str) -> Path:
        """Where a new adapter called ``name`` would go (the name checked, nothing created)."""
        check_adapter_name(name)
        return self.root / name

    def load(self, names: list[str], **options: Any) -> Any:
        """One base model in memory serving ``names`` (see :func:`peftkit.serving.load_server`)."""
        from .serving import load_server

        return load_server(self, names, **options)

    def remove(self, name: str) -> None:
        folder = self.folder(name)
        trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
        os.replace(folder, trash)  # gone from the registry in one step, then deleted
        shutil.rmtree(trash, ignore_errors=True)


def key_metric(metadata: dict[str, Any]) -> Optional[tuple[str, float]]:
    name = metadata.get("key_metric")
    value = metadata.get("metrics", {}).get(name)
    return (name, value) if name and value is not None else None
