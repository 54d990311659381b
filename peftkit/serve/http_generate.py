"""``/v1/completions`` and ``/v1/chat/completions``: a request made into generation jobs, and their answers in
OpenAI's shapes, whole or streamed as server-sent events.

A completion's prompt goes to its adapter as ``Server.generate`` (and ``peftkit generate``) give it: an
instruction adapter's in the layout it was trained with. A chat's messages go through ``chat.py``.

Streaming is real: each piece of text is sent as soon as the batch's decoding step makes it (held back only
until the next whitespace, where later tokens can no longer change it; see ``streaming.py``), and the pieces
add up to the text the same request gets unstreamed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable, Optional

from ..naming import BASE
from .batcher import Batcher, GenerateJob, Generation, Sampling
from .chat import chat_prompt_ids
from .http_schema import ApiError, ChatRequest, CompletionRequest, refuse_unsupported
from .served_adapter import ServedAdapter
from .serving import Server

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default for completions
CHAT_DEFAULT_TOKENS = 256


def generating(server: Server, model: str) -> Optional[ServedAdapter]:
    """The adapter ``model`` names, if it can generate (None: the base); else a 4xx naming ``model``."""
    if model == BASE:
        if not (server.decoder or server.encoder_decoder):
            raise ApiError(400, "model: this server's base is an encoder; it generates nothing", "model")
        return None
    served = server.adapters.get(model)
    if served is None:
        loaded = ", ".join([*server.adapters, BASE])
        raise ApiError(404, f"model: {model!r} is not loaded (loaded: {loaded}); load it with POST "
                       "/v1/load_lora_adapter", "model", code="model_not_found")
    if not served.task.generates:
        raise ApiError(400, f"model: {model} is a {served.task.name} adapter and generates no text; use POST "
                       "/v1/classify", "model")
    return served


def _context_check(server: Server, ids: list[int], max_tokens: int, field: str) -> list[int]:
    config = server.model.config
    context = getattr(config, "max_position_embeddings", None)
    if server.encoder_decoder or not context:
        return ids
    if len(ids) >= context:
        raise ApiError(400, f"{field}: {len(ids)} tokens leave no room to generate in the model's context of "
                       f"{context} tokens; shorten it", field)
    if len(ids) + max_tokens > context:
        raise ApiError(400, f"max_tokens: {max_tokens} new tokens after {len(ids)} prompt tokens pass the model's "
                       f"context of {context}; ask for at most {context - len(ids)}", "max_tokens")
    return ids


def _sampling(body: Any) -> Sampling:
    top_k = body.top_k if body.top_k and body.top_k > 0 else 0
    temperature = 1.0 if body.temperature is None else body.temperature
    return Sampling(temperature, 1.0 if body.top_p is None else body.top_p, top_k, body.seed)


def completion_jobs(server: Server, body: CompletionRequest) -> list[GenerateJob]:
    refuse_unsupported(body)
    generating(server, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "prompt: give a string, or a non-empty list of strings", "prompt")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            field = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
            raise ApiError(400, f"{field}: empty prompt", field)
    if body.stream and len(prompts) > 1:
        raise ApiError(400, "prompt: stream one prompt per request", "prompt")
    max_tokens = body.max_tokens or COMPLETION_DEFAULT_TOKENS

    def prompt_for(i: int, text: str) -> Callable[[Server], list[int]]:
        field = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"

        def build(s: Server) -> list[int]:  # on the model thread, just before the batch
            generating(s, body.model)  # it may have been unloaded since the request came
            return _context_check(s, s.prompt_ids(text, body.model), max_tokens, field)

        return build

    return [GenerateJob(name=body.model, prompt=prompt_for(i, p), max_tokens=max_tokens, sampling=_sampling(body))
            for i, p in enumerate(prompts)]


def chat_job(server: Server, body: ChatRequest) -> GenerateJob:
    refuse_unsupported(body)
    generating(server, body.model)
    if server.encoder_decoder:
        raise ApiError(400, "model: a text-to-text adapter has no chat layout; use POST /v1/completions", "model")
    if not body.messages:
        raise ApiError(400, "messages: empty; give at least one user message", "messages")
    if body.messages[-1].role != "user":
        raise ApiError(400, f"messages[{len(body.messages) - 1}].role: the last message must be the user's",
                       f"messages[{len(body.messages) - 1}].role")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages]
    max_tokens = body.max_completion_tokens or body.max_tokens or CHAT_DEFAULT_TOKENS

    def prompt(s: Server) -> list[int]:
        served = generating(s, body.model)
        return _context_check(s, chat_prompt_ids(served.task if served else None, s.tokenizer, messages),
                              max_tokens, "messages")

    return GenerateJob(name=body.model, prompt=prompt, max_tokens=max_tokens, sampling=_sampling(body))


def _usage(results: list[Generation]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(model: str, results: list[Generation]) -> dict[str, Any]:
    choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
               for i, r in enumerate(results)]
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": _usage(results)}


def chat_body(model: str, result: Generation) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
              "finish_reason": result.finish_reason}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": _usage([result])}


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def stream(batcher: Batcher, job: GenerateJob, chat: bool, include_usage: bool
                 ) -> tuple[AsyncIterator[str], Callable[[], None]]:
    """Queue ``job`` and return its events, and what to call when the client goes away (stops its row)."""
    pieces: asyncio.Queue = asyncio.Queue()
    loop = job.loop

    def on_text(text: str) -> None:  # on the model thread
        try:
            loop.call_soon_threadsafe(pieces.put_nowait, text)
        except RuntimeError:  # the loop has closed: nobody is listening
            pass

    job.on_text = on_text
    batcher.enqueue(job)  # before the response starts: a server shutting down still answers 503
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": job.name}

    def chunk(text: Optional[str], finish: Optional[str] = None) -> dict[str, Any]:
        if chat:
            delta = {} if text is None else {"content": text}
            return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return {**head, "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

    async def events() -> AsyncIterator[str]:
        if chat:
            yield _event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]})
        while True:
            getter = asyncio.ensure_future(pieces.get())
            await asyncio.wait({getter, job.future}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()  # the job is done: every piece it sent is queued already (same FIFO)
                break
            yield _event(chunk(getter.result()))
        while not pieces.empty():
            yield _event(chunk(pieces.get_nowait()))
        if job.future.cancelled():  # dropped before it ran: its client has gone
            return
        try:
            result: Generation = job.future.result()
        except ApiError as exc:
            yield _event(exc.body())
        except Exception as exc:  # noqa: BLE001 - the status line has gone: the error travels as an event
            yield _event(ApiError(500, f"generation failed: {exc}", kind="server_error").body())
        else:
            yield _event(chunk(None, result.finish_reason))
            if include_usage:
                yield _event({**head, "choices": [], "usage": _usage([result])})
        yield "data: [DONE]\n\n"

    def gone() -> None:
        if not job.future.done():
            job.abandoned = True

    return events(), gone
