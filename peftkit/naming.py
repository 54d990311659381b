"""Adapter names: they become folder names under the registry root, so they are checked before use."""

import re

from .errors import PeftkitError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_adapter_name(name: str) -> str:
    """Return ``name`` if it is a safe adapter name, else raise with the rule it broke."""
    if not _NAME.match(name) or ".." in name:
        raise PeftkitError(
            f"adapter name {name!r} is not allowed: use letters, digits, '.', '_' and '-', start with a letter "
            "or digit, no path separators or '..', at most 128 characters"
        )
    return name
