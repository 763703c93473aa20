"""Faults for the operator's cluster tests: a TCP proxy on loopback that can delay, freeze and cut the
operator's connection to the API server, and a recorder of every version of an object.

The proxy stands between one operator process and the API server (its kubeconfig points at the proxy;
TLS passes through untouched, the server certificate names 127.0.0.1). It is the network, not a mock:
- `reply_delay` holds every chunk the server sends for that long (constant latency, no pile-up), which
  stretches a pass between its requests and their replies so a test can act in between;
- `freeze()` black-holes the connection: nothing moves either way, what was sent waits in the proxy
  (as in the buffers of a stalled network path), and `thaw()` delivers it late, in order;
- `reset()` cuts every open connection (RST), as a middlebox that lost its state would.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Proxy:
    def __init__(self, target: tuple[str, int], reply_delay: float = 0.0) -> None:
        self.target, self.reply_delay = target, reply_delay
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._closed = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def address(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def reset(self) -> None:
        """Cut every open connection with a RST (new ones are accepted as before)."""
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for sock in conns:
            _abort(sock)

    def close(self) -> None:
        self._closed = True
        self.thaw()
        self.listener.close()
        self.reset()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                _abort(client)
                continue
            with self._lock:
                self._conns.update((client, server))
            self._pipe(client, server, 0.0)
            self._pipe(server, client, self.reply_delay)

    def _pipe(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        """Two threads per direction: one reads at once (stamping each chunk), one sends each chunk `delay`
        after it came, and only while the proxy is not frozen."""
        chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

        def read() -> None:
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                chunks.put((time.monotonic(), data))
                if not data:
                    return

        def send() -> None:
            while True:
                stamp, data = chunks.get()
                wait = stamp + delay - time.monotonic()
                if wait > 0:
                    time.sleep(wait)  # the latency this direction simulates, per chunk
                self._flowing.wait()
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=read, name="proxy-read", daemon=True).start()
        threading.Thread(target=send, name="proxy-send", daemon=True).start()


def _abort(sock: socket.socket) -> None:
    """Cut a connection: shutdown wakes the thread blocked reading it (a bare close would not, and the
    connection would linger half-alive), then close with linger 0 sends a RST."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class History:
    """Every version of one object that a watch delivers from `start()` on: (when seen, the object)."""

    list_fn: Callable[..., Any]
    args: tuple[Any, ...]
    name: str
    versions: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, resource_version: str) -> None:
        self._thread = threading.Thread(target=self._run, args=(resource_version,), daemon=True)
        self._thread.start()

    def _run(self, resource_version: str) -> None:
        from kubernetes import watch

        rv = resource_version
        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for event in w.stream(
                    self.list_fn,
                    *self.args,
                    field_selector=f"metadata.name={self.name}",
                    resource_version=rv,
                    timeout_seconds=5,
                ):
                    obj = event["object"]
                    rv = obj["metadata"]["resourceVersion"]
                    self.versions.append((time.monotonic(), obj))
                    if self._stop.is_set():
                        w.stop()
            except Exception:  # the watch ended (timeout, network): carry on from the last version
                if self._stop.wait(0.2):
                    return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
