"""The watches' stream handling, and their loop of LIST, WATCH, reopen and relist (against streams built
here; against the API server in every cluster test)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from ling_operator import metrics
from ling_operator.watch import Gone, Watch, line_batches, parse

from tests.waiting import wait_for


def _event(kind: str, rv: str, **extra: object) -> bytes:
    return json.dumps({"type": kind, "object": {"metadata": {"resourceVersion": rv}, **extra}}).encode()


def test_lines_that_span_chunks_come_out_whole_one_batch_per_chunk() -> None:
    a, b, c = _event("ADDED", "1"), _event("MODIFIED", "2"), _event("DELETED", "3")
    stream = [a[:5], a[5:] + b"\n" + b[:7], b[7:] + b"\n" + c + b"\n", b"\n"]
    assert list(line_batches(stream)) == [[a], [b, c]]
    # A last line without its newline (the server ended the stream) is still read.
    assert list(line_batches([a + b"\n" + b])) == [[a], [b]]


def test_parse_gives_type_object_and_version() -> None:
    kind, obj, rv = parse(_event("MODIFIED", "42", status={"phase": "Running"}))
    assert (kind, rv, obj["status"]["phase"]) == ("MODIFIED", "42", "Running")
    assert parse(_event("BOOKMARK", "50"))[::2] == ("BOOKMARK", "50")


def test_a_410_error_event_means_list_again_and_other_errors_raise() -> None:
    gone = json.dumps({"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}})
    with pytest.raises(Gone, match="too old"):
        parse(gone.encode())
    other = json.dumps({"type": "ERROR", "object": {"code": 500, "message": "etcd is sad"}})
    with pytest.raises(ApiException) as info:
        parse(other.encode())
    assert info.value.status == 500 and "etcd" in str(info.value.reason)


def test_a_line_that_is_not_a_watch_event_is_refused() -> None:
    for line in (b"[]", b'{"type": "ADDED"}', b'{"type": "ADDED", "object": 3}'):
        with pytest.raises(ValueError, match="not a watch event"):
            parse(line)


class Stream:
    """What `open_` returns: an urllib3 reply's `stream` and `release_conn`."""

    def __init__(self, lines: list[bytes], hold: threading.Event | None = None) -> None:
        self.lines, self.hold, self.released = lines, hold, False

    def stream(self, amt: Any, decode_content: bool) -> Iterator[bytes]:
        yield b"".join(line + b"\n" for line in self.lines)
        if self.hold is not None:
            self.hold.wait(10)

    def shutdown(self) -> None:
        if self.hold is not None:
            self.hold.set()

    def release_conn(self) -> None:
        self.released = True


def test_the_loop_reopens_from_the_last_version_and_lists_again_after_410() -> None:
    pod = {"metadata": {"name": "p", "resourceVersion": "11"}}
    gone = json.dumps({"type": "ERROR", "object": {"code": 410, "message": "too old"}}).encode()
    hold = threading.Event()
    streams = [
        Stream([json.dumps({"type": "ADDED", "object": pod}).encode(), _event("BOOKMARK", "15")]),
        Stream([gone]),
        Stream([], hold),
    ]
    opened: list[str | None] = []
    listed: list[tuple[str | None, Any]] = []
    delivered: list[Any] = []

    def open_(ns: str | None, rv: str | None, seconds: int, timeout: tuple[float, float]) -> Stream:
        opened.append(rv)
        return streams[len(opened) - 1]

    lists = 0

    def list_(ns: str | None) -> dict[str, Any]:
        nonlocal lists
        lists += 1
        return {"metadata": {"resourceVersion": str(10 * lists)}, "items": []}

    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    before = metrics.watch_restarts_total.labels("things")._value.get()
    watch = Watch(
        "things",
        list_,
        open_,
        ["ns"],
        loop,
        lambda ns, result: listed.append((ns, result)),
        delivered.extend,
    )
    watch.start()
    try:
        wait_for("the third WATCH", lambda: len(opened) == 3 and len(listed) == 2, timeout=10, every=0.05)
    finally:
        watch.stop()
        watch.threads[0].join(5)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
    # LIST (rv 10) -> WATCH from 10 -> reopened from the bookmark's 15 -> 410 -> LIST (rv 20) -> WATCH from 20.
    assert opened == ["10", "15", "20"]
    assert listed == [("ns", ([], 10)), ("ns", ([], 20))]
    assert delivered == [("ADDED", pod)]  # bookmarks move the version, they are not events
    assert all(s.released for s in streams)
    assert metrics.watch_restarts_total.labels("things")._value.get() == before + 2
