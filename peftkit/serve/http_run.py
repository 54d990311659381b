"""``peftkit serve``: the HTTP API on uvicorn, and the one-line refusal when the ``serve`` extra is missing.

uvicorn handles SIGINT and SIGTERM: it stops accepting connections, lets the open requests (streams included)
finish, then runs the app's shutdown, which ends the model thread once its queue is empty.
"""

from __future__ import annotations

from typing import Any

from ..errors import PeftkitError

EXTRA = 'pip install "peftkit[serve]"'


def require_http() -> None:
    """Refuse, in one line naming the extra, before any model is loaded."""
    import importlib

    try:
        for module in ("fastapi", "uvicorn"):
            importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or "fastapi"
        raise PeftkitError(f"peftkit serve needs FastAPI and uvicorn ({missing} is not installed): {EXTRA}") from None


def serve_http(server: Any, host: str, port: int, max_batch: int, max_wait_ms: float,
               log_level: str = "info") -> None:
    require_http()
    import uvicorn

    from .http_app import build_app

    app = build_app(server, max_batch=max_batch, max_wait_ms=max_wait_ms)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)
