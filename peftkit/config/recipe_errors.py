"""Pydantic's validation errors, rewritten as one line per problem: key path, what is wrong, how to fix it.

Unknown keys get the closest known key of their section ("did you mean `lora_alpha`?"), found by walking the
recipe schema along the error's location; a LoRA key under an AdaLoRA adapter (or the reverse) says which
method it belongs to.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any, Optional

from pydantic import BaseModel


class SectionProblems(ValueError):
    """Problems a section finds across its fields, each reported under its own key: ``(key, message)``."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{key}: {message}" for key, message in problems))


class Refused:
    """A recipe value refused before pydantic sees it, with the reason to report."""

    def __init__(self, reason: str):
        self.reason = reason


def _model_for_path(schema: type[BaseModel], loc: tuple) -> tuple[Optional[type[BaseModel]], tuple]:
    """Walk the schema along an error location; return the section class holding the last key."""
    cls: Any = schema
    rest = list(loc[:-1])
    while rest:
        key = rest.pop(0)
        field = cls.model_fields.get(key) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None, loc
        annotation = field.annotation
        candidates = _model_classes(annotation)
        if len(candidates) == 1:
            cls = candidates[0]
        elif candidates and rest:
            tag = rest.pop(0)  # discriminated unions put the tag in the location
            loc = tuple(x for x in loc if x != tag)
            matching = [c for c in candidates if tag in typing.get_args(c.model_fields["method"].annotation)]
            cls = matching[0] if matching else None
        else:
            return None, loc
    return cls, loc


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_model_classes(arg))
    return found


def describe_error(error: dict[str, Any], schema: type[BaseModel],
                   adapter_sections: tuple[type[BaseModel], ...]) -> list[str]:
    """One pydantic error of ``schema`` (the recipe) as problem lines, each starting with its key path;
    ``adapter_sections``: the adapter methods' sections, to say which method a misplaced key belongs to."""
    loc = tuple(str(x) for x in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        cls, loc = _model_for_path(schema, loc)
        key = loc[-1]
        path = ".".join(loc)
        hint = ""
        if cls is not None:
            close = difflib.get_close_matches(key, list(cls.model_fields), n=1, cutoff=0.6)
            belongs = _where_key_belongs(key, adapter_sections) if loc[0] == "adapter" else "remove it"
            if belongs != "remove it":  # a real option of the other method beats a look-alike of this one
                hint = f"; {belongs}"
            elif close:
                hint = f"; did you mean `{close[0]}`?"
        return [f"{path}: unknown key{hint or '; remove it'}"]
    if kind == "union_tag_invalid":
        path = ".".join(loc)
        return [f"{path}.method: {error['ctx'].get('tag')!r} is not a method; use lora or adalora"]
    if kind == "union_tag_not_found":
        return [f"{'.'.join(loc)}.method: missing; set method: lora or method: adalora"]
    if len(loc) >= 2 and loc[0] == "adapter" and loc[1] in ("lora", "adalora"):
        loc = (loc[0], *loc[2:])
    path = ".".join(loc) or "recipe"
    message = error["msg"]
    if kind == "missing":
        return [f"{path}: required, but missing"]
    if kind == "value_error":
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, SectionProblems):
            prefix = "" if path == "recipe" else f"{path}."
            return [f"{prefix}{key}: {text}" for key, text in cause.problems]
        message = message.removeprefix("Value error, ")
        return [f"{path}: {message}"]
    value = error.get("input")
    if isinstance(value, Refused):
        return [f"{path}: {value.reason}"]
    shown = f" (got {value!r})" if not isinstance(value, (dict, list)) else ""
    return [f"{path}: {message[0].lower()}{message[1:]}{shown}"]


def _where_key_belongs(key: str, adapter_sections: tuple[type[BaseModel], ...]) -> str:
    for cls in adapter_sections:
        if key in cls.model_fields:
            other = typing.get_args(cls.model_fields["method"].annotation)[0]
            article = "an" if other[0] in "aeiou" else "a"
            return f"`{key}` is {article} {other} option: set method: {other}"
    return "remove it"
