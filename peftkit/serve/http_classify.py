"""``/v1/classify``: the heads no OpenAI route covers (classification, regression, multi-label, tagging, a
multi-task adapter or one of its tasks as ``ADAPTER:TASK``), answered per input with what ``Server.predict``
gives that row."""

from __future__ import annotations

from typing import Any

from ..finite import json_safe
from ..naming import BASE
from .batcher import PredictJob
from .http_schema import ApiError, ClassifyRequest
from .served_adapter import ServedAdapter
from .serving import Server


def predicting(server: Server, model: str) -> ServedAdapter:
    """The adapter ``model`` names (``ADAPTER`` or ``ADAPTER:TASK``), if it has a head to predict with."""
    if model == BASE:
        raise ApiError(400, "model: the base has no head to classify with; name an adapter", "model")
    adapter, _, task = model.partition(":")
    served = server.adapters.get(adapter)
    if served is None:
        loaded = ", ".join(n for name, a in server.adapters.items() if not a.task.generates
                           for n in [name, *(f"{name}:{view}" for view in a.task.serve_views())])
        raise ApiError(404, f"model: {model!r} is not loaded (loaded: {loaded}); load it with POST "
                       "/v1/load_lora_adapter", "model", code="model_not_found")
    if served.task.generates:
        raise ApiError(400, f"model: {adapter} is a {served.task.name} adapter, which writes text; use POST "
                       "/v1/completions or /v1/chat/completions", "model")
    views = served.task.serve_views()
    if task and task not in views:
        shown = f"its tasks: {', '.join(views)}" if views else "it has one task; name the adapter alone"
        raise ApiError(404, f"model: {adapter} has no task {task!r}; {shown}", "model", code="model_not_found")
    return served


def _row(item: Any, field: str, fields: tuple[str, ...]) -> dict[str, Any]:
    if isinstance(item, str):
        item = {"text": item}
    if not isinstance(item, dict):
        raise ApiError(400, f"{field}: give a string or an object with {', '.join(fields)}", field)
    for key, value in item.items():
        if key not in fields:
            raise ApiError(400, f"{field}.{key}: this adapter reads {', '.join(fields)}", f"{field}.{key}")
        wanted = list if key == "tokens" else str
        if not isinstance(value, wanted) and not (key == "text_pair" and value is None):
            raise ApiError(400, f"{field}.{key}: a {'list of words' if wanted is list else 'string'}", f"{field}.{key}")
    if not str(item.get("text") or "").strip() and not item.get("tokens"):
        raise ApiError(400, f"{field}: empty input", field)
    return item


def classify_job(server: Server, body: ClassifyRequest) -> PredictJob:
    served = predicting(server, body.model)
    single = isinstance(body.input, str)
    items = [body.input] if single else body.input
    if not isinstance(items, list) or not items:
        raise ApiError(400, "input: give a string, or a non-empty list of strings or objects", "input")
    names = ["input" if single else f"input[{i}]" for i in range(len(items))]
    rows = [_row(item, field, served.task.serve_fields) for item, field in zip(items, names)]

    def check(s: Server) -> None:  # on the model thread, just before the batch
        adapter = predicting(s, body.model)  # it may have been unloaded since the request came
        limit = adapter.recipe.data.max_length
        for row, field in zip(rows, names):
            # encoded one token past the limit: enough to tell an over-long row without encoding all of it
            count = len(adapter.task.serve_encode(row, s.tokenizer, limit + 1)[0])
            if count > limit:
                raise ApiError(400, f"{field}: longer than the {limit} tokens {body.model} was trained on "
                               "(its data.max_length); shorten it or split it", field)

    return PredictJob(names=[body.model] * len(rows), inputs=rows, rows=len(rows), check=check)


def classify_body(model: str, predictions: list[dict[str, Any]]) -> dict[str, Any]:
    data = [{"index": i, **{k: v for k, v in p.items() if k != "adapter"}} for i, p in enumerate(predictions)]
    return {"object": "list", "model": model, "data": json_safe(data)}  # a NaN score becomes null, as JSON allows
