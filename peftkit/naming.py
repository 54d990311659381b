"""Adapter names: they become folder names under the registry root, so they are checked before use."""

import re

from .errors import PeftkitError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# the name predict/generate/serving give the base model without adapter (peftkit.serve.serving uses this one)
BASE = "base"
# names with a meaning of their own: an adapter called so could never be asked for
RESERVED = {BASE: "it stands for the base model without adapter in predict, generate and serving"}


def check_adapter_name(name: str) -> str:
    """Return ``name`` if it is a safe adapter name, else raise with the rule it broke."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise PeftkitError(
            f"adapter name {name!r} is not allowed: use letters, digits, '.', '_' and '-', start with a letter "
            "or digit, no path separators or '..', at most 128 characters"
        )
    return name


def check_new_adapter_name(name: str) -> str:
    """``check_adapter_name``, and not one of the names peftkit reserves: for an adapter about to be created."""
    check_adapter_name(name)
    if name in RESERVED:
        raise PeftkitError(f"adapter name {name!r} is reserved: {RESERVED[name]}; choose another name")
    return name
