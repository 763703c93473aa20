"""`ling-runtime serve`: resolve the model, start the tensor-parallel group, serve HTTP, drain on exit."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

import uvicorn

from ling_runtime.cli import ServeArgs
from ling_runtime.engine.engine import Engine
from ling_runtime.engine.setup import RuntimeSpec, runtime_spec
from ling_runtime.server.app import ServerContext, build_app
from ling_runtime.server.metrics import RuntimeMetrics
from ling_runtime.server.tokenizer import TokenizerBundle

log = logging.getLogger("ling_runtime")
DRAIN_TIMEOUT_S = 30.0


def resolve_model_dir(args: ServeArgs) -> str:
    if args.model_path:
        return args.model_path
    from ling_runtime.builtin import builtin_model_dir

    log.info("no --model-path: serving the built-in tiny model")
    return str(builtin_model_dir())


def start_executor(args: ServeArgs, spec: RuntimeSpec):
    if args.launcher == "ray":
        from ling_runtime.distributed.ray_launcher import launch_ray_group

        return launch_ray_group(args, spec)
    from ling_runtime.distributed.mp_launcher import launch_mp

    host, port = args.dist_host_port
    return launch_mp(spec, args.tp_size, host, port, args.rendezvous_timeout)


def build_engine(args: ServeArgs) -> tuple[Engine, ServerContext]:
    """Everything but the HTTP server: model, group, engine (started), and the route context."""
    model_dir = resolve_model_dir(args)
    tokenizer = TokenizerBundle.from_dir(args.tokenizer_path or model_dir)
    spec = runtime_spec(args, model_dir)
    metrics = RuntimeMetrics(args.model_name if args.model_path or args.served_model_name else "ling-tiny")
    executor, load_seconds = start_executor(args, spec)
    metrics.model_load_seconds.set(load_seconds)
    engine = Engine(executor, tokenizer, spec.engine_config(), metrics)
    engine.start()
    ctx = ServerContext(
        engine=engine,
        model_name=args.model_name,
        context_length=spec.context_length,
        metrics=metrics,
        api_key=args.api_key,
        tool_call_parser=args.tool_call_parser,
        created=int(time.time()),
        model_dir=model_dir,
    )
    log.info("engine ready in %.1fs (tp=%d, mtp steps=%d)", load_seconds, args.tp_size, spec.num_draft_steps)
    return engine, ctx


class _DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: refuse new requests at once (503), let running ones finish, then exit."""

    engine: Engine | None = None

    def handle_exit(self, sig, frame) -> None:  # type: ignore[override]
        if self.engine is not None:
            self.engine.draining = True
        super().handle_exit(sig, frame)


def ignore_reraised_signals() -> None:
    """Uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, restoring the previous handler;
    with the default one the process would die before draining the engine and stopping Ray."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


def run_serve(args: ServeArgs) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.node_rank > 0:
        from ling_runtime.distributed.ray_launcher import run_worker_node

        return run_worker_node(args)
    try:
        engine, ctx = build_engine(args)
    except Exception as exc:  # rendezvous timeout, bad checkpoint, TP size the model cannot take
        log.error("could not start: %s", exc)
        print(f"ling-runtime: error: {exc}", file=sys.stderr)
        return 3
    app = build_app(ctx)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=DRAIN_TIMEOUT_S,
    )
    server = _DrainingServer(config)
    server.engine = engine
    ignore_reraised_signals()
    try:
        server.run()
    finally:
        engine.drain(DRAIN_TIMEOUT_S)
        engine.stop()
    return 0


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
