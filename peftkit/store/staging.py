"""Folders that appear whole or not at all, and the leftovers of writers that were killed.

A writer fills a hidden ``.staging-<name>-<pid>-<id>`` folder beside its target and moves it into place in
one rename. It holds an ``flock`` on that folder while it exists, so that :func:`sweep` can tell a live
writer's folder (locked) from a killed one's (unlocked, and older than :data:`STALE_SECONDS`: the age covers
the instant between ``mkdir`` and the lock, and writers that take no lock). Leftover names:

* ``.staging-*``: a write that never finished (or, after an exchange, the replaced adapter being deleted);
* ``.trash-*``: an adapter being deleted (``adapters rm``);
* ``.replaced-*``: only without ``RENAME_EXCHANGE``: the old adapter while an ``--overwrite`` puts the new one
  in its place. If the writer dies between its two renames the sweep moves it back.

Replacing an existing folder uses Linux's ``renameat2(RENAME_EXCHANGE)``: old and new swap names in one
atomic step, so a reader finds a complete adapter at every instant. Where the call is missing (another OS, a
file system without it) the swap takes two renames; between them a reader finds the old adapter under its
``.replaced-`` name (:func:`replaced_copy`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import PeftkitError

try:
    import fcntl
except ImportError:  # Windows: no locks, leftovers are told by their age alone
    fcntl = None  # type: ignore[assignment]

STALE_SECONDS = 3600
_LEFTOVER = re.compile(r"^\.(?P<kind>staging|trash|replaced)-(?P<name>.+?)(?:-(?P<pid>\d+))?-[0-9a-f]{8}$")
_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


@functools.cache
def _libc_renameat2() -> Any:
    return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


def _renameat2(src: Path, dst: Path, flag: int) -> bool:
    """``renameat2(src, dst, flag)``; False where the system or the file system does not offer it."""
    call = _libc_renameat2()
    if call is None:
        return False
    if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flag) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _leftover_name(kind: str, name: str) -> str:
    return f".{kind}-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _lock(folder: Path) -> Optional[int]:
    """Hold an exclusive lock on ``folder`` until the returned descriptor is closed (None: no locks here)."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _unlock(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)


def _held(folder: Path) -> bool:
    """Whether a live process holds ``folder``'s lock."""
    if fcntl is None:
        return False
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return True  # gone or unreadable: not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def sweep(parent: Path, now: Optional[float] = None) -> None:
    """Remove what killed writers left in ``parent``; put back an old adapter a killed ``--overwrite`` set aside."""
    now = time.time() if now is None else now
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        found = _LEFTOVER.match(entry.name)
        try:
            if found is None or entry.is_symlink() or not entry.is_dir():
                continue
            if found["kind"] == "staging" and now - entry.stat().st_mtime < STALE_SECONDS:
                continue
            if _held(entry):
                continue
            if found["kind"] == "replaced" and found["pid"] and _put_back(entry, parent / found["name"]):
                continue
        except OSError:
            continue  # another sweeper got there first
        shutil.rmtree(entry, ignore_errors=True)


def _put_back(replaced: Path, target: Path) -> bool:
    if target.exists():
        return False
    if not _renameat2(replaced, target, _RENAME_NOREPLACE):
        os.replace(replaced, target)
    return True


def set_aside(parent: Path) -> set[str]:
    """Names in ``parent`` whose adapter an --overwrite has set aside under ``.replaced-`` (no RENAME_EXCHANGE)."""
    found = (_LEFTOVER.match(p.name) for p in parent.glob(".replaced-*"))
    return {m["name"] for m in found if m and m["pid"]}


def replaced_copy(target: Path) -> Optional[Path]:
    """The old folder of ``target`` while a two-rename ``--overwrite`` (or a killed one) has it set aside."""
    for entry in sorted(target.parent.glob(f".replaced-{glob.escape(target.name)}-*")):
        found = _LEFTOVER.match(entry.name)
        if found and found["name"] == target.name and entry.is_dir():
            return entry
    return None


def current_umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no way to read it without setting it
    os.umask(mask)
    return mask


def share_like_umask(folder: Path) -> None:
    """Give every file the mode ``open()`` would (safetensors writes its files 0600, everything else 0644)."""
    mask = current_umask()
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    try:
        if _renameat2(staging, target, _RENAME_NOREPLACE):
            return
        if not target.exists():
            os.replace(staging, target)
            return
    except FileExistsError:
        pass
    if not overwrite:
        raise PeftkitError(f"{target} was created by another process while this one was written; nothing was "
                           "replaced: choose another name, or pass --overwrite to replace it")
    if _renameat2(staging, target, _RENAME_EXCHANGE):
        shutil.rmtree(staging, ignore_errors=True)  # it now holds the old folder
        return
    replaced = target.parent / _leftover_name("replaced", target.name)
    old = _lock(target)  # a sweep leaves it alone between the two renames, and puts it back after a kill
    try:
        os.replace(target, replaced)
        os.replace(staging, target)
    finally:
        _unlock(old)
    shutil.rmtree(replaced, ignore_errors=True)


@contextmanager
def staged_folder(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it takes ``target``'s place whole, else it is removed.

    With ``overwrite`` an existing ``target`` is replaced so that at every instant one complete folder is
    there, the old one or the new one (see the module docstring).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target.parent)
    staging = target.parent / _leftover_name("staging", target.name)
    staging.mkdir()
    held = _lock(staging)
    try:
        yield staging
        share_like_umask(staging)
        _move_into_place(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _unlock(held)


def remove_folder(folder: Path) -> None:
    """Take ``folder`` away in one rename, then delete it (a kill leaves a ``.trash-*`` for the next sweep)."""
    trash = folder.parent / _leftover_name("trash", folder.name)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
    sweep(folder.parent)


class LockHeld(Exception):
    def __init__(self, pid: int):
        self.pid = pid  # 0 when it could not be read
        super().__init__(pid)


@contextmanager
def name_lock(path: Path) -> Iterator[None]:
    """Hold the lock file ``path`` for the block; :class:`LockHeld` if a live process holds it.

    The kernel drops an ``flock`` when its process dies, so a killed holder's file does not block. The file is
    unlinked on release; a process that opened it just before finds, once locked, that the path names another
    file (or none) and tries again, so two processes never both hold the name.
    """
    if fcntl is None:
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise LockHeld(int(holder) if holder.isdigit() else 0) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
