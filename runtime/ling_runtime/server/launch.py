"""`ling-runtime serve`: resolve the model, start the tensor-parallel group, serve HTTP, drain on exit.

Node rank 0 runs the whole stack (group, engine, HTTP API); node ranks > 0 only hold a Ray node for
the group's shards and answer `/health` for their pod.

Ending (rank 0), and the exit code that says how:
- SIGTERM / SIGINT: drain. /health turns 503 at once (readiness), new requests get 503 with
  Retry-After while the server still accepts connections, running and queued requests get up to
  --drain-timeout to finish; those still running then are cut (a JSON 503, or a stream's last
  event). Then HTTP stops, the engine thread ends and the group is stopped. Exit `EXIT_OK` when
  nothing was cut, `EXIT_DRAIN_CUT` otherwise. A second signal cuts at once.
- The engine fails (a rank died, a step passed --watchdog-timeout): every request has its 503
  already; /health answers 503 for `FAILED_LINGER_S` (probes and clients see why), then the
  process ends with `EXIT_ENGINE_FAILED` without waiting for a hung rank, so the operator restarts
  the group.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from ling_runtime.builtin import builtin_model_dir
from ling_runtime.builtin.dummy import dummy_model_dir
from ling_runtime.distributed.executor import Executor
from ling_runtime.distributed.mp_launcher import launch_mp
from ling_runtime.engine.engine import Engine
from ling_runtime.runner.memory import size_kv_cache
from ling_runtime.server.app import build_app
from ling_runtime.server.context import ServerContext
from ling_runtime.server.health import health_response
from ling_runtime.settings import Settings
from ling_runtime.telemetry import RuntimeMetrics
from ling_runtime.text.tokenizer import TokenizerBundle

log = logging.getLogger("ling_runtime")

EXIT_OK = 0
EXIT_START_FAILED = 3
EXIT_ENGINE_FAILED = 4
EXIT_DRAIN_CUT = 5
# After the engine failed: how long /health keeps answering 503 before the process ends.
FAILED_LINGER_S = 1.0
# Uvicorn's own wait for open responses once the engine has answered every request.
HTTP_SHUTDOWN_S = 5.0


def resolve_model_dir(settings: Settings) -> str:
    if settings.model_path:
        return settings.model_path
    if settings.load_format == "dummy":
        log.info("--load-format dummy with no --model-path: Ling-2.6-flash's dimensions, random weights")
        return str(dummy_model_dir())
    log.info("no --model-path: serving the built-in tiny model")
    return str(builtin_model_dir())


def start_executor(settings: Settings) -> tuple[Executor, float]:
    if settings.launcher == "ray":
        # Imported here: Ray is optional (the GPU machine has none); only Ray groups need it.
        from ling_runtime.distributed.ray_launcher import launch_ray_group

        return launch_ray_group(settings)
    host, port = settings.dist_host_port
    return launch_mp(settings, settings.tp_size, host, port, settings.rendezvous_timeout)


def build_engine(settings: Settings) -> tuple[Engine, ServerContext]:
    """Everything but the HTTP server: model, group, engine (started), and the route context."""
    settings = resolve_device(settings)
    model_dir = resolve_model_dir(settings)
    tokenizer = TokenizerBundle.from_dir(settings.tokenizer_path or model_dir)
    settings = size_kv_cache(settings.resolve(model_dir))  # --mem-fraction-static -> --max-total-tokens
    metrics = RuntimeMetrics(settings.model_name)
    executor, load_seconds = start_executor(settings)
    metrics.model_load_seconds.set(load_seconds)
    engine = Engine(executor, tokenizer, settings, metrics)
    engine.start()
    ctx = ServerContext(engine=engine, settings=settings, metrics=metrics, created=int(time.time()))
    log.info(
        "engine ready in %.1fs (tp=%d, mtp steps=%d)",
        load_seconds,
        settings.tp_size,
        settings.num_draft_steps,
    )
    return engine, ctx


class _DrainingServer(uvicorn.Server):
    """Uvicorn that drains the engine on SIGTERM/SIGINT before it stops accepting connections, and
    stops when the engine fails (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self.exit_code = EXIT_OK
        self._drainer: threading.Thread | None = None
        self._signals = 0
        engine.on_failure(self._on_engine_failure)

    def handle_exit(self, sig, frame) -> None:  # type: ignore[override]
        # Runs in the signal handler: only flags and a thread start here.
        self._signals += 1
        if self._drainer is None:
            log.info("signal %d: draining (up to %gs)", sig, self.drain_timeout)
            self._drainer = threading.Thread(target=self._drain, args=(self.drain_timeout,), daemon=True)
            self._drainer.start()
        elif self._signals == 2:
            log.info("second signal: cutting the running requests now")
            threading.Thread(target=self._drain, args=(0.0,), daemon=True).start()

    def _drain(self, timeout_s: float) -> None:
        finished = self.engine.drain(timeout_s)
        if not finished and not self.engine.failed:
            log.warning("drain deadline: cut the requests still running")
            self.exit_code = max(self.exit_code, EXIT_DRAIN_CUT)
        self.should_exit = True

    def _on_engine_failure(self, reason: str) -> None:
        self.exit_code = EXIT_ENGINE_FAILED

        def stop_later() -> None:
            time.sleep(FAILED_LINGER_S)
            self.should_exit = True

        threading.Thread(target=stop_later, daemon=True).start()


def ignore_reraised_signals() -> None:
    """Uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, restoring the previous handler;
    with the default one the process would die before draining the engine and stopping Ray."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


def resolve_device(settings: Settings) -> Settings:
    """--device auto (the CLI's default): cuda when torch sees a GPU, else cpu; decided once, first."""
    if settings.device != "auto":
        return settings
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("--device auto: %s", device)
    return dataclasses.replace(settings, device=device)


def run_serve(settings: Settings) -> int:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = resolve_device(settings)
    if settings.node_rank > 0:
        return serve_worker_node(settings)
    try:
        engine, ctx = build_engine(settings)
    except Exception as exc:  # rendezvous timeout, bad checkpoint, TP size the model cannot take
        log.error("could not start: %s", exc)
        print(f"ling-runtime: error: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    config = uvicorn.Config(
        build_app(ctx),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=HTTP_SHUTDOWN_S,
    )
    server = _DrainingServer(config, engine, settings.drain_timeout)
    ignore_reraised_signals()
    try:
        server.run()
    finally:
        if not engine.failed:
            # Uvicorn ended another way (it could not bind, say): nothing new can come in.
            engine.drain(0.0 if server.exit_code == EXIT_DRAIN_CUT else settings.drain_timeout)
        engine.stop()
        ctx.text_pool.shutdown(wait=False, cancel_futures=True)
    code = EXIT_ENGINE_FAILED if engine.failed else server.exit_code
    log.info("exiting with code %d", code)
    if engine.failed:
        # The engine thread may hang in a collective with a rank that is gone or stopped: end
        # without the interpreter's teardown (which would join it, or run its destructors).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def serve_worker_node(settings: Settings) -> int:
    """Node rank > 0: join the head's Ray cluster, answer /health, exit when the head is gone."""
    # Imported here: Ray is optional (the GPU machine has none); only multi-node groups need it.
    from ling_runtime.distributed.ray_launcher import WorkerNode

    node = WorkerNode(settings)
    app = FastAPI(docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health() -> JSONResponse:
        return health_response(*node.health())

    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning"))

    def watch() -> None:
        while not server.should_exit:
            if not node.check():
                server.should_exit = True
                break
            time.sleep(1)

    threading.Thread(target=watch, name="ling-head-watch", daemon=True).start()
    ignore_reraised_signals()
    try:
        server.run()
        healthy = node.health()[0]  # judged before stopping the node, which ends it either way
    finally:
        node.stop()
    return 0 if healthy else 1


class BackgroundServer:
    """Uvicorn on a thread (tests, benchmarks): `with BackgroundServer(app, port): ...`."""

    def __init__(self, app, host: str, port: int) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
