"""Non-finite numbers (NaN, infinity) stop at the door: no adapter holding one is written, none is printed as JSON.

One NaN in a LoRA matrix makes every output NaN, and a diverged run or a combination with a NaN weight
produces exactly that without any error of its own. Every writer of weights (training, combine, convert,
merge) asks :func:`first_non_finite` before its staging folder is sealed; every JSON printer passes its
payload through :func:`json_safe` and dumps with ``allow_nan=False`` (Python's ``NaN`` is not JSON).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

from .errors import PeftkitError


def first_non_finite(tensors: Iterable[tuple[str, Any]]) -> Optional[str]:
    """The name of the first floating tensor holding a NaN or an infinity, else None."""
    import torch

    for name, tensor in tensors:
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_finite(tensors: Iterable[tuple[str, Any]], what: str, fix: str) -> None:
    """Refuse ``what`` when one of its tensors is not finite; ``fix`` ends the message."""
    bad = first_non_finite(tensors)
    if bad is not None:
        raise PeftkitError(f"{what} holds NaN or infinite values (in {bad}); {fix}")


def check_weights(weights: list[float], option: str = "--weights") -> None:
    bad = next((w for w in weights if not math.isfinite(w)), None)
    if bad is not None:
        raise PeftkitError(f"{option}: {bad} is not a finite number; give finite weights, e.g. 0.5,0.5")


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so that ``json.dumps(allow_nan=False)`` holds."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """``json.dumps`` that always writes valid JSON: NaN and infinities become null."""
    import json

    return json.dumps(json_safe(value), allow_nan=False, **options)
