"""The HTTP API over a :class:`Server`: FastAPI routes, OpenAI-shaped errors, request counting.

Needs the ``serve`` extra (FastAPI); imported only by ``peftkit serve`` (``http_run.py``) and the tests.
Routes never touch the model: they check the request, make jobs and await the :class:`Batcher`, whose one
thread runs every batch, load and unload.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import PeftkitError
from ..naming import BASE, check_adapter_name
from .batcher import Batcher, CallJob, ShuttingDown
from .http_classify import classify_body, classify_job
from .http_generate import chat_body, chat_job, completion_body, completion_jobs, stream
from .http_schema import ApiError, ChatRequest, ClassifyRequest, CompletionRequest, LoraRequest, validation_error
from .live import add_adapter, remove_adapter
from .metrics import Metrics
from .serving import Server

ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/classify",
             "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


class EventStream(StreamingResponse):
    """Server-sent events that call ``gone`` as soon as the client disconnects (or the stream ends), so the
    generation row behind them stops at its next decoding step instead of running to its limit for nobody."""

    def __init__(self, events: AsyncIterator[str], gone: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.gone = gone

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.gone()

        listener = asyncio.ensure_future(listen())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self.body_iterator:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while an event was being sent
            pass
        finally:
            listener.cancel()
            self.gone()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


class CountRequests:
    """ASGI middleware: every request's endpoint, status and time to its last byte (streams included)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status, start = [500], time.perf_counter()

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.in_flight -= 1
            self.metrics.request(endpoint, status[0], time.perf_counter() - start)


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def build_app(server: Server, max_batch: int = 32, max_wait_ms: float = 5.0) -> FastAPI:
    metrics = Metrics()
    batcher = Batcher(server, max_batch, max_wait_ms, metrics)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        # uvicorn calls this once its open requests are answered; queued jobs still finish before the worker ends
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="peftkit", lifespan=lifespan)
    app.state.batcher, app.state.metrics = batcher, metrics
    app.add_middleware(CountRequests, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(validation_error(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}; the endpoints: {', '.join(ENDPOINTS)}"
        return _error(ApiError(exc.status_code, message))

    @app.exception_handler(ShuttingDown)
    async def shutting_down(request: Request, exc: ShuttingDown) -> JSONResponse:
        return _error(ApiError(503, str(exc), kind="server_unavailable"))

    @app.exception_handler(PeftkitError)
    async def library_error(request: Request, exc: PeftkitError) -> JSONResponse:
        return _error(ApiError(400, " ".join(str(exc).split())))

    @app.get("/health")
    async def health() -> JSONResponse:
        if batcher.closed:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ok", "base": server.description["base"], "adapters": server.names})

    @app.get("/metrics")
    async def metrics_view() -> dict[str, Any]:
        shown = metrics.snapshot(batcher.queue_length)
        shown["in_flight"] -= 1  # not counting this request
        return shown

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        base = server.description["base"]
        entry = lambda name, **extra: {"id": name, "object": "model", "created": created,  # noqa: E731
                                       "owned_by": "peftkit", **extra}
        data = [entry(BASE, root=base, parent=None)] if server.decoder or server.encoder_decoder else []
        for name, served in list(server.adapters.items()):
            data.append(entry(name, root=name, parent=base, task=served.task.name))
            data += [entry(f"{name}:{view}", root=name, parent=base, task=served.task.name)
                     for view in served.task.serve_views()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        jobs = completion_jobs(server, body)
        if body.stream:
            events, gone = stream(batcher, jobs[0], False, bool(body.stream_options and
                                                                body.stream_options.include_usage))
            return EventStream(events, gone)
        results = await asyncio.gather(*(batcher.run(job) for job in jobs))
        return completion_body(body.model, list(results))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        job = chat_job(server, body)
        if body.stream:
            events, gone = stream(batcher, job, True, bool(body.stream_options and body.stream_options.include_usage))
            return EventStream(events, gone)
        return chat_body(body.model, await batcher.run(job))

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> Any:
        return classify_body(body.model, await batcher.run(classify_job(server, body)))

    @app.post("/v1/load_lora_adapter")
    async def load(body: LoraRequest) -> dict[str, Any]:
        registry = server.setup.registry if server.setup else None
        try:
            check_adapter_name(body.lora_name)
        except PeftkitError as exc:
            raise ApiError(400, str(exc), "lora_name") from None
        try:
            folder = registry.folder(body.lora_name) if registry else None
        except PeftkitError as exc:
            raise ApiError(404, str(exc), "lora_name", code="model_not_found") from None
        if body.lora_path is not None and (folder is None or Path(body.lora_path).resolve() != folder.resolve()):
            raise ApiError(400, f"lora_path: adapters load from this server's registry ({registry.root if registry else '-'}"
                           f"/{body.lora_name}); leave lora_path out", "lora_path")
        await _change(add_adapter, body.lora_name)
        return {"status": "loaded", "lora_name": body.lora_name, "adapters": server.names}

    @app.post("/v1/unload_lora_adapter")
    async def unload(body: LoraRequest) -> dict[str, Any]:
        await _change(remove_adapter, body.lora_name)
        return {"status": "unloaded", "lora_name": body.lora_name, "adapters": server.names}

    async def _change(change: Callable[[Server, str], None], name: str) -> None:
        try:
            await batcher.run(CallJob(fn=lambda s: change(s, name)))
        except ApiError:
            raise
        except PeftkitError as exc:
            raise ApiError(400, " ".join(str(exc).split()), "lora_name") from None

    return app
