"""The HTTP app: OpenAI `/v1/*`, SGLang-native `/generate` and info, `/health`, `/health_generate`,
`/metrics`.

Routes only translate (openai_api.py, native_api.py, health.py); the completion routes share one
path (completion.py). Every error leaves as an OpenAI error body, decided in errors.py: the engine's
refusals, bad bodies, and what the HTTP layer answers itself (401, 404, 405, 413, 422, 500).

The door (`Door`) is pure ASGI middleware, not `@app.middleware("http")`: Starlette's
BaseHTTPMiddleware hides a client's disconnect from the route, and a request whose client went away
must be aborted. It checks the API key (constant time; `Bearer` in any case) and bounds the body:
a Content-Length above the limit is refused before a byte of it is read, and a body without one is
cut off where it crosses the limit.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ling_runtime.engine.errors import EngineError
from ling_runtime.server import health, native_api, openai_api
from ling_runtime.server.completion import ClientDisconnected
from ling_runtime.server.context import ServerContext
from ling_runtime.server.errors import APIError, api_error, http_error, validation_error

log = logging.getLogger("ling_runtime.server")


class BodyTooLarge(Exception):
    """A body without a Content-Length grew past the limit while it was read."""


def build_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="ling-runtime", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(EngineError)
    async def on_engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return await on_api_error(request, api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await on_api_error(request, validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = http_error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        response = await on_api_error(request, err)
        response.headers.update(exc.headers or {})  # 405's Allow
        return response

    @app.exception_handler(BodyTooLarge)
    async def on_body_too_large(request: Request, _: BodyTooLarge) -> JSONResponse:
        ctx.metrics.rejected("body_too_large")
        return await on_api_error(request, too_large(ctx.body_limit))

    @app.exception_handler(ClientDisconnected)
    async def on_disconnected(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(http_error(500, "internal server error").body(), status_code=500)

    for router in (health.router, openai_api.router, native_api.router):
        app.include_router(router)
    app.add_middleware(Door, ctx=ctx)
    return app


def too_large(limit: int) -> APIError:
    return http_error(
        413, f"body: larger than this server's limit of {limit} bytes (--max-request-body-bytes)"
    )


def authorized(header: bytes | None, key: str) -> bool:
    """`Authorization: Bearer <key>`, the scheme in any case, the key compared in constant time."""
    if not header:
        return False
    scheme, _, token = header.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("latin-1"), key.encode("utf-8"))


class Door:
    """Pure ASGI middleware: API key, then the body size limit (see the module docstring)."""

    def __init__(self, app: ASGIApp, ctx: ServerContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        key = self.ctx.settings.api_key
        if (
            key
            and scope["path"] not in health.OPEN_PATHS
            and not authorized(headers.get(b"authorization"), key)
        ):
            await _answer(send, APIError(401, "Invalid or missing API key", code="invalid_api_key"))
            return
        limit = self.ctx.body_limit
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            self.ctx.metrics.rejected("body_too_large")
            err = too_large(limit) if length.isdigit() else http_error(400, "Content-Length: not a number")
            await _answer(send, err)
            return
        await self.app(scope, _bounded(receive, limit), send)


def _bounded(receive: Receive, limit: int) -> Receive:
    """`receive` that raises BodyTooLarge once the body read so far passes `limit` bytes."""
    seen = 0

    async def bounded() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge
        return message

    return bounded


async def _answer(send: Send, err: APIError) -> None:
    """A whole JSON error response from the middleware (the route never runs). `Connection: close`:
    a refused body may still be on its way, and the connection cannot carry another request."""
    response = JSONResponse(
        err.body(), status_code=err.status, headers={**err.headers, "Connection": "close"}
    )
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
