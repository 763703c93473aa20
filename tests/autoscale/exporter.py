"""Loopback /metrics servers for the autoscaler's tests: real HTTP, real exposition text.

The native engine's exposition comes from the runtime's own metrics module
(ling_runtime.telemetry.RuntimeMetrics), so a rename there breaks these tests; SGLang's and vLLM's
are built with prometheus_client under their documented names (reference/serving-anchors.md §4).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ling_runtime.telemetry import RuntimeMetrics
from prometheus_client import CollectorRegistry, Gauge, generate_latest


class EngineMetrics:
    """The queue and running gauges of one engine, rendered in its own format."""

    def __init__(self, engine: str = "native", model_name: str = "ling") -> None:
        self.engine = engine
        self.scrapes = 0  # how often it was rendered: proof that a scraper really looked
        if engine == "native":
            self._runtime = RuntimeMetrics(model_name)
            self._render: Callable[[], bytes] = self._runtime.render
            self._waiting, self._running = self._runtime.num_queue_reqs, self._runtime.num_running_reqs
            return
        names = {
            "sglang": ("sglang:num_queue_reqs", "sglang:num_running_reqs"),
            "vllm": ("vllm:num_requests_waiting", "vllm:num_requests_running"),
        }[engine]
        registry = CollectorRegistry()
        labels = ["model_name", "engine"] if engine == "vllm" else ["model_name"]
        values = [model_name, "0"] if engine == "vllm" else [model_name]
        self._waiting = Gauge(names[0], "waiting", labels, registry=registry).labels(*values)
        self._running = Gauge(names[1], "running", labels, registry=registry).labels(*values)
        self._render = lambda: generate_latest(registry)

    def set(self, waiting: float, running: float = 0) -> None:
        self._waiting.set(waiting)
        self._running.set(running)

    def render(self) -> bytes:
        self.scrapes += 1
        return self._render()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        if self.server.delay:
            time.sleep(self.server.delay)
        if self.path != "/metrics" or self.server.status != 200:
            self.send_response(404 if self.path != "/metrics" else self.server.status)
            self.end_headers()
            return
        body = self.server.metrics.render()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client gave up (the timeout test does that on purpose)

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        return


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    metrics: EngineMetrics
    delay: float = 0.0
    status: int = 200


@contextmanager
def serve_metrics(metrics: EngineMetrics, host: str = "127.0.0.1", port: int = 0) -> Iterator[_Server]:
    """Serve `metrics` at http://host:port/metrics (port 0: any free port) until the block ends."""
    server = _Server((host, port), _Handler)
    server.metrics = metrics
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"metrics-{host}", daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
