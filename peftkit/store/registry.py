"""The adapter registry: one folder per adapter under a root (``adapters/`` by default).

A folder counts as an adapter once its ``peftkit.json`` exists; that file is written last and the folder
appears by one rename (:mod:`peftkit.store.staging`), so a listing never shows half an adapter. Names are
checked before they touch the file system, and an unknown name is answered with the closest ones. A name
being trained is reserved by a lock file (``.lock-<name>``) for the run's life, so a second run of the same
name is refused before it trains.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from ..config.metadata import StoredMetadata
from ..errors import PeftkitError
from ..naming import check_adapter_name, check_new_adapter_name
from .artifacts import METADATA_FILE, read_metadata
from .staging import LockHeld, name_lock, remove_folder, replaced_copy, set_aside

DEFAULT_ROOT = "adapters"


@dataclass
class Entry:
    name: str
    folder: Path
    metadata: StoredMetadata

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())


class Registry:
    def __init__(self, root: str | Path = DEFAULT_ROOT):
        self.root = Path(root)

    def _check_root(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise PeftkitError(f"registry {self.root} is a file, not a folder; point --registry (or "
                               "PEFTKIT_REGISTRY, output.registry) at the folder that holds the adapters")

    def names(self) -> list[str]:
        self._check_root()
        if not self.root.is_dir():
            return []
        found = {p.name for p in self.root.iterdir()
                 if p.is_dir() and not p.name.startswith(".") and (p / METADATA_FILE).is_file()}
        return sorted(found | set_aside(self.root))

    def folder(self, name: str) -> Path:
        """The folder of a registered adapter; an unknown name suggests the closest registered ones."""
        check_adapter_name(name)
        self._check_root()
        folder = self.root / name
        if not (folder / METADATA_FILE).is_file():
            # an --overwrite between its two renames (only where RENAME_EXCHANGE is missing) set it aside
            folder = replaced_copy(folder) or folder
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
        check_new_adapter_name(name)
        self._check_root()
        return self.root / name

    def refuse_existing(self, name: str, fix: str) -> None:
        """Refuse to create ``name`` when its folder exists, complete or not (``fix`` ends the message)."""
        folder = self.target(name)
        if (folder / METADATA_FILE).is_file():
            raise PeftkitError(f"adapter {name!r} already exists in {self.root}/; {fix}")
        if folder.exists():
            raise PeftkitError(f"{folder} exists but is not a complete adapter (no {METADATA_FILE}); remove it with "
                               f"`peftkit adapters rm {name} --registry {self.root}`, or {fix}")

    @contextmanager
    def reserve(self, name: str, key: str) -> Iterator[None]:
        """Hold ``name`` for this process during the block; another process writing it makes this one fail at once."""
        self.target(name)
        try:
            with name_lock(self.root / f".lock-{name}"):
                yield
        except LockHeld as held:
            who = f"another process (pid {held.pid})" if held.pid else "another process"
            raise PeftkitError(f"{key}: adapter {name!r} is being written into {self.root}/ by {who}; wait for it "
                               "to finish, or choose another name") from None

    def remove(self, name: str) -> bool:
        """Remove adapter ``name``, or a folder of that name left incomplete; False for the latter."""
        check_adapter_name(name)
        self._check_root()
        folder = self.root / name
        broken = folder.is_dir() and not folder.is_symlink() and not (folder / METADATA_FILE).is_file()
        if not broken:
            folder = self.folder(name)
        remove_folder(folder)  # gone from the registry in one step, then deleted
        return not broken


def key_metric(metadata: StoredMetadata) -> Optional[tuple[str, float]]:
    name = metadata.key_metric
    value = metadata.metrics.get(name) if name else None
    return (name, value) if name and value is not None else None
