"""``peftkit predict``'s input and output: rows from a data file (or the command line), routed to adapters,
and predictions out as JSON lines.

Which column holds a row's text is found as in training: the adapter's ``data.columns`` first, then the
task's usual names (``sentence``, ``text``, ...; a seq2seq adapter's ``source``, ``input``, ...); ``--column
text=body`` overrides. An ``adapter`` column, when
the file has one, sends each row to the adapter it names; otherwise every row goes to every adapter.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import PeftkitError
from ..finite import dumps
from .serving import BASE, Server

ROUTE_COLUMN = "adapter"
TEXT_COLUMNS = ("text", "sentence", "content", "document", "prompt")  # tried after the task's own names


def parse_columns(pairs: Sequence[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        role, sep, column = pair.partition("=")
        if not sep or not role or not column:
            raise PeftkitError(f"--column {pair!r}: write ROLE=COLUMN, e.g. --column text=review")
        mapping[role.strip()] = column.strip()
    return mapping


def read_input(path: str) -> Any:
    from ..config.recipe import DataSection
    from ..core.data import load_rows

    if not Path(path).is_file():
        raise PeftkitError(f"--input: file {path} does not exist; check the path")
    return load_rows(path, DataSection(train=path), "--input", "train")


def _columns_for(server: Server, name: str, available: list[str], overrides: dict[str, str], source: str
                 ) -> dict[str, str]:
    served = server.served(name)
    roles = dict(served.task.roles) if served is not None else {}
    # a row's text is what its head reads first: a classifier's text, a seq2seq head's source
    first = served.task.required_roles[0] if served is not None and served.task.required_roles else "text"
    roles["text"] = tuple(dict.fromkeys([*roles.get(first, ()), *roles.get("text", ()), *TEXT_COLUMNS]))
    wanted = served.task.serve_fields if served is not None else ("text",)
    mapping = {} if served is None else dict(served.recipe.data.columns)
    if first in mapping:
        mapping.setdefault("text", mapping[first])
    mapping.update(overrides)
    found: dict[str, str] = {}
    for role in wanted:
        if role in mapping and mapping[role] in available:
            found[role] = mapping[role]
            continue
        if role in overrides:
            raise PeftkitError(f"--column {role}={overrides[role]}: {source} has no column {overrides[role]!r} "
                               f"(its columns: {', '.join(available)})")
        column = next((c for c in roles.get(role, ()) if c in available), None)
        if column is not None:
            found[role] = column
    if "text" not in found:
        tried = ", ".join(dict.fromkeys([*([mapping["text"]] if "text" in mapping else []), *roles.get("text", ())]))
        raise PeftkitError(f"--input: {source} has no text column for {name} (tried {tried}; its columns: "
                           f"{', '.join(available)}); rename one or pass --column text=COLUMN")
    return found


def route(server: Server, names: Sequence[str], rows: Any, source: str, overrides: dict[str, str]
          ) -> tuple[list[dict[str, Any]], list[str], list[int]]:
    """(row fields, adapter, input row number) for every prediction to make, in output order."""
    available = list(rows.column_names)
    per_row: Optional[list[str]] = None
    if ROUTE_COLUMN in available:
        per_row = [str(v) for v in rows[ROUTE_COLUMN]]
        unknown = sorted(set(per_row) - set(names) - {BASE})
        if unknown:
            raise PeftkitError(f"--input: {source} routes rows to {unknown[0]!r}, which is not among the --adapter "
                               f"names ({', '.join(names)}); add --adapter {unknown[0]} or fix the column")
    columns = {name: _columns_for(server, name, available, overrides, source)
               for name in (dict.fromkeys(per_row) if per_row is not None else names)}
    fields, adapters, numbers = [], [], []
    for i, row in enumerate(rows):
        for name in ([per_row[i]] if per_row is not None else names):
            fields.append({role: row[column] for role, column in columns[name].items()})
            adapters.append(name)
            numbers.append(i)
    return fields, adapters, numbers


def write_lines(records: list[dict[str, Any]], output: Optional[str]) -> None:
    """JSON lines to ``output`` (written whole, then moved into place) or to stdout."""
    text = "".join(dumps(r, ensure_ascii=False) + "\n" for r in records)  # a NaN probability prints as null
    if output is None:
        import click

        click.echo(text, nl=False)
        return
    path = Path(output)
    if path.is_dir():
        raise PeftkitError(f"--output: {output} is a folder; name a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:6]}")
    tmp.write_text(text)
    os.replace(tmp, path)
