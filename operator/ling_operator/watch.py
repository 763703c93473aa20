"""The operator's two watches, LingDeployments and its pods: LIST, then WATCH from its resourceVersion.

Each runs on a thread of its own per watched namespace (or one for all namespaces), reads the raw
stream, parses each line and hands the events to the event loop in batches; the cache and the queue stay
the loop's. kopf watched both before: its per-event machinery (a per-object worker task, its batching
window, the Body wrappers, the handler's keyword arguments) cost more CPU than the operator's own work
on the events (docs/operator.md, "Why the watches are ours").

What a watch must get right, and how:
- every request has a timeout: the LIST its read timeout, the WATCH a connect timeout and a read
  timeout longer than the API server's bookmark period (bookmarks are asked for), so a silent,
  black-holed stream is reopened instead of waited on for ever;
- a WATCH ends normally after `timeoutSeconds` (or a read timeout): it is reopened from the last
  resourceVersion it saw (bookmarks move it on without events);
- "410 Gone" (the version is too old: compacted) means LIST again; a LIST also drops from the cache
  what it no longer has (its DELETED was missed while no stream was open);
- every failure backs off (1 s doubling to 30 s) and is counted with the reopens in
  `ling_operator_watch_restarts_total{resource}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from ling_operator import metrics
from ling_operator.pods import resource_version

log = logging.getLogger("ling_operator.watch")

WATCH_SECONDS = 300  # the server ends each WATCH after this
CONNECT_TIMEOUT = 10.0
# The API server sends a bookmark about once a minute to a watch that asked for them: a longer silence
# is a dead stream.
READ_TIMEOUT = 90.0
BACKOFF_MAX = 30.0

Event = tuple[str, dict[str, Any]]  # (ADDED | MODIFIED | DELETED, the object)
Listed = tuple[list[dict[str, Any]], int | None]  # a LIST's items and its resourceVersion
OnList = Callable[[str | None, Listed], None]


class Gone(Exception):
    """The resourceVersion the watch resumed from is too old (410): LIST again."""


def line_batches(chunks: Iterable[bytes]) -> Iterator[list[bytes]]:
    """The complete newline-separated lines of a chunked stream, one list per chunk that ended any (a
    line may span chunks): each list becomes one hand-over to the event loop."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        done = [line for line in complete if line.strip()]
        if done:
            yield done
    if buffer.strip():
        yield [buffer]


def parse(line: bytes) -> tuple[str, dict[str, Any], str | None]:
    """One watch line: (type, object, its resourceVersion); raises Gone for a 410 ERROR event."""
    event = json.loads(line)
    if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
        raise ValueError(f"not a watch event: {line[:80]!r}")
    kind, obj = event.get("type"), event["object"]
    if kind == "ERROR":
        if obj.get("code") == 410:
            raise Gone(obj.get("message") or "resourceVersion too old")
        raise ApiException(status=obj.get("code") or 500, reason=obj.get("message") or "watch error")
    return str(kind), obj, (obj.get("metadata") or {}).get("resourceVersion")


ListCall = Callable[[str | None], dict[str, Any]]  # namespace (None: all) -> the LIST's reply
OpenCall = Callable[[str | None, str | None, int, tuple[float, float]], Any]  # (ns, rv, seconds, timeout)


class Watch:
    """LIST + WATCH of one resource, one thread per namespace (None: all namespaces); `on_list` and
    `on_events` are called on `loop` (never on the threads)."""

    def __init__(
        self,
        resource: str,
        list_: ListCall,
        open_: OpenCall,
        namespaces: list[str | None],
        loop: asyncio.AbstractEventLoop,
        on_list: OnList,
        on_events: Callable[[list[Event]], None],
    ) -> None:
        self.resource = resource
        self.list_ = list_
        self.open_ = open_
        self.loop = loop
        self.on_list = on_list
        self.on_events = on_events
        self.stopping = threading.Event()
        self.streams: dict[str | None, Any] = {}
        self.threads = [
            threading.Thread(
                target=self._run, args=(ns,), name=f"ling-watch-{resource}-{ns or 'all'}", daemon=True
            )
            for ns in namespaces
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for stream in list(self.streams.values()):
            with contextlib.suppress(Exception):  # already closed
                stream.shutdown()  # unblocks the thread's read

    def _hand(self, call: Callable[..., None], *args: Any) -> None:
        if not self.stopping.is_set():
            try:
                self.loop.call_soon_threadsafe(call, *args)
            except RuntimeError:  # the loop closed under us: the operator is ending
                self.stopping.set()

    def _run(self, ns: str | None) -> None:
        rv: str | None = None
        delay = 0.0
        opened = False
        while not self.stopping.is_set():
            if delay:
                self.stopping.wait(delay)
            if opened:
                metrics.watch_restarts_total.labels(self.resource).inc()
            opened = True
            try:
                if rv is None:
                    listed = self.list_(ns)
                    rv = (listed.get("metadata") or {}).get("resourceVersion")
                    self._hand(self.on_list, ns, (listed.get("items") or [], resource_version(listed)))
                rv = self._watch(ns, rv)
                delay = 0.0
            except Gone as exc:
                log.info("%s watch (%s): %s; listing again", self.resource, ns or "all namespaces", exc)
                rv, delay = None, 0.0
            except Exception as exc:  # whatever it was, the watch must go on
                if self.stopping.is_set():
                    return
                if isinstance(exc, ApiException) and exc.status == 410:
                    rv, delay = None, 0.0
                    continue
                delay = min(max(delay * 2, 1.0), BACKOFF_MAX)
                reason = exc.reason if isinstance(exc, ApiException) else (str(exc) or type(exc).__name__)
                where = ns or "all namespaces"
                log.warning("%s watch (%s) failed: %s; again in %.0f s", self.resource, where, reason, delay)

    def _watch(self, ns: str | None, rv: str | None) -> str | None:
        """Read one WATCH to its end; the last resourceVersion seen."""
        stream = self.open_(ns, rv, WATCH_SECONDS, (CONNECT_TIMEOUT, READ_TIMEOUT))
        self.streams[ns] = stream
        try:
            for batch in line_batches(stream.stream(None, decode_content=False)):
                events: list[Event] = []
                for line in batch:
                    kind, obj, seen = parse(line)
                    rv = seen or rv
                    if kind != "BOOKMARK":
                        events.append((kind, obj))
                if events:
                    self._hand(self.on_events, events)
            return rv
        except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError):
            return rv  # a silent or cut stream: reopen from where it was
        finally:
            self.streams.pop(ns, None)
            stream.release_conn()
