"""The HTTP server's request bodies and its errors, in OpenAI's shapes.

Every body is a pydantic model that refuses unknown fields, so a parameter the server does not implement
(``logprobs``, ``tools``, ...) is answered with a 400 naming it rather than silently ignored. OpenAI parameters
with a value that changes nothing (``n: 1``, ``stop: null``, ``presence_penalty: 0``, ...) are accepted, as
clients send them; any other value is refused (:func:`refuse_unsupported`).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..errors import PeftkitError


class ApiError(PeftkitError):
    """A request the server answers with ``status`` and OpenAI's error body naming the field at fault."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 kind: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)  # None: 1.0, OpenAI's default
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)  # vLLM's extension; 0 or -1: no top-k cut
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # accepted only at the values that change nothing (NO_EFFECT)
    n: Optional[int] = None
    stop: Any = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    logprobs: Any = None


class CompletionRequest(_Generation):
    prompt: Any  # a string, or a list of strings (one choice each); checked in the route, to name the item at fault
    best_of: Optional[int] = None
    echo: Optional[bool] = None
    suffix: Optional[str] = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: Optional[str] = None


class ChatRequest(_Generation):
    messages: list[Message]
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    top_logprobs: Optional[int] = None


class ClassifyRequest(_Body):
    model: str
    input: Any  # a string, or a list of strings and {"text", "text_pair"} / {"tokens"} objects: checked in the route


class LoraRequest(_Body):
    lora_name: str
    lora_path: Optional[str] = None  # vLLM's field; peftkit loads from its registry, so only that folder fits


NO_EFFECT: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "echo": (False,), "stop": ([], ""), "presence_penalty": (0,),
    "frequency_penalty": (0,), "logit_bias": ({},), "logprobs": (False, 0), "top_logprobs": (0,), "suffix": ("",),
}


def refuse_unsupported(body: BaseModel) -> None:
    for name, harmless in NO_EFFECT.items():
        value = getattr(body, name, None)
        if value is not None and value not in harmless:
            shown = " or ".join(repr(v) for v in harmless)
            raise ApiError(400, f"{name}: {value!r} is not supported by this server (only {shown} or null)", name)


def param_path(loc: tuple[Any, ...]) -> str:
    """pydantic's error location as a field path: ``("body", "messages", 0, "role")`` -> ``messages[0].role``."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """The first of FastAPI's validation errors as one OpenAI error."""
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    param = param_path(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON{': ' + str(detail) if detail else ''}", "body")
    if kind == "extra_forbidden":
        return ApiError(400, f"{param}: unsupported parameter; this server does not take it", param)
    if kind == "missing":
        return ApiError(400, f"{param}: required", param)
    return ApiError(400, f"{param}: {first.get('msg', 'invalid value')}", param)
