"""Every error leaves as an OpenAI error body; this module is the one place that decides how.

`APIError` carries an HTTP status and the body. `api_error` maps the engine's typed errors to it:
the class decides the status, the type and the code (never the message), and `field` renames the
engine's logical field names to the ones the client sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ling_runtime.engine.errors import (
    EngineError,
    EngineFailed,
    EngineShuttingDown,
    EngineUnavailable,
    InvalidRequest,
    Overloaded,
    PromptTooLong,
    QueueTimeout,
)

INVALID = "invalid_request_error"
UNAVAILABLE = "service_unavailable_error"

# Engine error class -> (HTTP status, OpenAI error type, code, Retry-After seconds); the most
# specific class wins. Retry-After: a full queue drains in seconds; a draining replica is gone for
# good (the client or the Service should pick another one at once); a failed group restarts.
_ENGINE_ERRORS: dict[type[EngineError], tuple[int, str, str | None, int | None]] = {
    PromptTooLong: (400, INVALID, "context_length_exceeded", None),
    InvalidRequest: (400, INVALID, None, None),
    EngineShuttingDown: (503, UNAVAILABLE, "shutting_down", 1),
    QueueTimeout: (503, UNAVAILABLE, "queue_timeout", 5),
    Overloaded: (503, UNAVAILABLE, "overloaded", 2),
    EngineFailed: (503, UNAVAILABLE, "engine_failed", 10),
    EngineUnavailable: (503, UNAVAILABLE, None, 5),
    EngineError: (500, "internal_error", None, None),
}

# Other statuses the HTTP layer itself answers -> (OpenAI error type, code).
HTTP_ERRORS: dict[int, tuple[str, str | None]] = {
    401: (INVALID, "invalid_api_key"),
    404: (INVALID, "not_found"),
    405: (INVALID, "method_not_allowed"),
    413: (INVALID, "request_too_large"),
    422: (INVALID, None),
}


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = INVALID,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def http_error(status: int, message: str) -> APIError:
    """An error the HTTP layer answers by itself (404, 405, 413, ...), in the OpenAI shape."""
    type_, code = HTTP_ERRORS.get(status, (INVALID if status < 500 else "internal_error", None))
    return APIError(status, message, type_, code=code)


def not_supported(param: str, detail: str = "not supported") -> APIError:
    return APIError(400, f"{param}: {detail}", param=param)


def same_name(param: str) -> str:
    return param


def api_error(exc: EngineError, field: Callable[[str], str] = same_name) -> APIError:
    """The HTTP answer to an engine error; `field` maps a logical field name to the client's."""
    status, type_, code, retry = next(_ENGINE_ERRORS[c] for c in type(exc).__mro__ if c in _ENGINE_ERRORS)
    if isinstance(exc, InvalidRequest):
        name = field(exc.param)
        return APIError(status, exc.message_for(name), type_, param=name, code=code)
    return APIError(status, str(exc), type_, code=code, retry_after=retry)


# Segments pydantic adds to an error location for the member of a union that failed ("str",
# "list[int]", "function-after[...]", a model's class name): not the client's field names.
_UNION_MEMBERS = {"str", "int", "float", "bool", "none", "dict", "list"}


def field_path(loc: Sequence[Any]) -> str | None:
    """A pydantic error location as the client's field path: `messages.0.content`."""
    parts = []
    for p in loc:
        if p == "body":
            continue
        if isinstance(p, str) and (p in _UNION_MEMBERS or "[" in p or p[:1].isupper()):
            continue
        parts.append(str(p))
    return ".".join(parts) or None


def validation_error(errors: Sequence[Any]) -> APIError:
    """A body that does not parse into the route's request type: 400 naming the first bad field
    (pydantic's or FastAPI's `errors()`); a field we do not know or support says so. Of the errors
    of a union's members, the one reaching deepest into the body names the field best."""
    first = max(errors, key=lambda e: len(field_path(e.get("loc", ())) or ""), default={})
    param = field_path(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return not_supported(param or "body")
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param)
