"""Task heads, one module each. A module here that defines ``TASK`` (a :class:`TaskHead` subclass) is a task
type that recipes can name in ``task.type``; adding a head is adding a file, nothing else."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from functools import cache
from typing import Any

from pydantic import ValidationError

from ..errors import PeftkitError
from .base import TaskHead


@cache
def task_types() -> dict[str, type[TaskHead]]:
    found: dict[str, type[TaskHead]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        head = getattr(module, "TASK", None)
        if head is not None:
            found[head.name] = head
    return found


def _head_class(task_type: str, key: str = "task", internal: bool = False) -> type[TaskHead]:
    known = {name: head for name, head in task_types().items() if internal or not head.internal}
    if task_type not in known:
        close = difflib.get_close_matches(task_type, list(known), n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"use one of: {', '.join(sorted(known))}"
        raise PeftkitError(f"{key}.type: unknown task {task_type!r}; {hint}")
    return known[task_type]


def validate_task_options(task_type: str, options: dict[str, Any], key: str = "task", internal: bool = False
                          ) -> list[str]:
    """Problems with a task section's options, each prefixed with its key path (empty when valid). ``internal``:
    also the heads peftkit builds itself (a trained adapter's multi-task head), never named in a recipe."""
    try:
        head = _head_class(task_type, key, internal)
    except PeftkitError as exc:
        return [str(exc)]
    try:
        head.Options.model_validate(options)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            path = ".".join([key, *(str(x) for x in error["loc"])])
            if error["type"] == "extra_forbidden":
                key = str(error["loc"][-1])
                close = difflib.get_close_matches(key, list(head.Options.model_fields), n=1, cutoff=0.6)
                hint = f"did you mean `{close[0]}`?" if close else f"{head.name} options are: " + ", ".join(
                    ["type", *head.Options.model_fields]
                )
                problems.append(f"{path}: unknown key; {hint}")
            else:
                message = error["msg"].removeprefix("Value error, ")
                value = error.get("input")
                shown = "" if error["type"] == "value_error" or isinstance(value, (dict, list)) else f" (got {value!r})"
                problems.append(f"{path}: {message[0].lower()}{message[1:]}{shown}")
        return problems
    return []


def make_task(task_type: str, options: dict[str, Any], state: dict[str, Any] | None = None) -> TaskHead:
    """A task head from its recipe options and, for a trained adapter, the state saved with it."""
    head = _head_class(task_type, internal=True)
    return head(head.Options.model_validate(options), state)


__all__ = ["TaskHead", "task_types", "validate_task_options", "make_task"]
