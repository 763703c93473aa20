"""Probes and scraping: `/health` (every rank alive, the loop stepping), `/health_generate` (one
token through the engine), `/metrics` (Prometheus). Open without an API key."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ling_runtime.engine.errors import EngineError
from ling_runtime.engine.sampling import SamplingParams
from ling_runtime.server.completion import EngineStream
from ling_runtime.server.context import Context

OPEN_PATHS = frozenset({"/health", "/health_generate", "/metrics"})
# /health_generate fails when the engine has not produced its token within this time.
GENERATE_TIMEOUT_S = 20.0

router = APIRouter()


def health_response(ok: bool, reason: str) -> JSONResponse:
    return JSONResponse(
        {"status": "ok" if ok else "unhealthy", "reason": reason}, status_code=200 if ok else 503
    )


@router.get("/health")
async def health(ctx: Context) -> Response:
    return health_response(*ctx.engine.health())


@router.get("/health_generate")
async def health_generate(ctx: Context) -> Response:
    engine = ctx.engine
    ok, reason = engine.health()
    if not ok:
        return health_response(ok, reason)
    params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    try:
        stream = EngineStream(engine, engine.prepare([engine.tokenizer.bos_token_id or 0], params), None)
        try:
            first = await asyncio.wait_for(stream.next(), timeout=GENERATE_TIMEOUT_S)
            last = [e async for e in stream.iterate(first)][-1]
        finally:
            stream.close()
    except (TimeoutError, EngineError) as exc:
        return health_response(False, str(exc) or "timed out")
    ok = last.finished and not last.error
    return health_response(ok, "ok" if ok else str(last.error))


@router.get("/metrics")
async def metrics(ctx: Context) -> Response:
    m, engine = ctx.metrics, ctx.engine
    m.num_queue_reqs.set(engine.num_waiting)
    m.num_running_reqs.set(engine.num_running)
    m.ranks_alive.set(engine.executor.ranks_alive()[0])
    return Response(m.render(), media_type="text/plain; version=0.0.4")
