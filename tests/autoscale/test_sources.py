"""The metric sources against real loopback HTTP servers (engine /metrics) and Prometheus API payloads."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from ling_operator.autoscale_sources import (
    EngineSource,
    ObservedGroup,
    PrometheusSource,
    SourceConfigError,
    SourceError,
    authorization_header,
    parse_engine_metrics,
    parse_prometheus_response,
)

from tests.autoscale.exporter import EngineMetrics, serve_metrics


@pytest.mark.parametrize("engine", ["native", "sglang", "vllm"])
def test_parse_each_engines_exposition(engine: str) -> None:
    metrics = EngineMetrics(engine)
    metrics.set(waiting=7, running=3)
    assert parse_engine_metrics(metrics.render().decode(), engine) == (7.0, 3.0)


def test_parse_falls_back_to_another_engines_names() -> None:
    metrics = EngineMetrics("vllm")
    metrics.set(5, 2)
    assert parse_engine_metrics(metrics.render().decode(), "native") == (5.0, 2.0)


def test_parse_sums_label_sets() -> None:
    text = (
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{model_name="a",engine="0"} 2\n'
        'vllm:num_requests_waiting{model_name="a",engine="1"} 3\n'
    )
    assert parse_engine_metrics(text, "vllm") == (5.0, None)


def test_parse_without_queue_metric_names_what_was_looked_for() -> None:
    with pytest.raises(SourceError, match=r"sglang:num_queue_reqs.*--enable-metrics"):
        parse_engine_metrics("# TYPE foo gauge\nfoo 1\n", "sglang")
    with pytest.raises(SourceConfigError, match=r"spec\.engine\.type"):
        parse_engine_metrics("", "tgi")


@pytest.fixture
def two_groups() -> Iterator[tuple[int, list[EngineMetrics]]]:
    # Two rank-0 "pods" on their own loopback addresses and the same port, as in a cluster.
    metrics = [EngineMetrics("native"), EngineMetrics("native")]
    with ExitStack() as stack:
        first = stack.enter_context(serve_metrics(metrics[0], "127.0.0.1"))
        port = first.server_address[1]
        stack.enter_context(serve_metrics(metrics[1], "127.0.0.2", port))
        yield port, metrics


def test_engine_source_sums_ready_groups(two_groups: tuple[int, list[EngineMetrics]]) -> None:
    port, metrics = two_groups
    metrics[0].set(10, 4)
    metrics[1].set(3, 5)
    groups = [
        ObservedGroup(0, "127.0.0.1", ready=True),
        ObservedGroup(1, "127.0.0.2", ready=True),
        ObservedGroup(2, None, ready=False),
    ]
    reading = EngineSource(port=port, timeout_seconds=2).read(groups)
    assert reading.error is None
    assert (reading.total_waiting, reading.total_running) == (13.0, 9.0)
    assert [(g.index, g.ready, g.waiting) for g in reading.groups] == [
        (0, True, 10.0),
        (1, True, 3.0),
        (2, False, None),
    ]


def test_engine_source_reports_an_unreachable_group(two_groups: tuple[int, list[EngineMetrics]]) -> None:
    port, metrics = two_groups
    metrics[0].set(6, 1)
    groups = [ObservedGroup(0, "127.0.0.1", ready=True), ObservedGroup(1, "127.0.0.9", ready=True)]
    reading = EngineSource(port=port, timeout_seconds=1).read(groups)
    assert reading.error is None and reading.total_waiting == 6.0
    bad = reading.groups[1]
    assert bad.waiting is None and bad.error is not None and "127.0.0.9" in bad.error


def test_engine_source_times_out_and_errors_when_no_group_is_readable() -> None:
    metrics = EngineMetrics("sglang")
    with serve_metrics(metrics) as server:
        server.delay = 1.0
        source = EngineSource(engine="sglang", port=server.server_address[1], timeout_seconds=0.2)
        reading = source.read([ObservedGroup(0, "127.0.0.1", ready=True)])
    assert reading.total_waiting is None
    assert reading.error is not None and "timed out" in reading.error and "group 0" in reading.error


def test_engine_source_http_error_is_reported() -> None:
    with serve_metrics(EngineMetrics("vllm")) as server:
        server.status = 503
        source = EngineSource(engine="vllm", port=server.server_address[1])
        reading = source.read([ObservedGroup(0, "127.0.0.1", ready=True)])
    assert reading.error is not None and "HTTP 503" in reading.error


def test_engine_source_with_no_ready_group_sees_zero() -> None:
    reading = EngineSource().read([ObservedGroup(0, None, ready=False)])
    assert (reading.error, reading.total_waiting, reading.total_running) == (None, 0.0, 0.0)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "12"]}}, 12.0),
        (
            {
                "status": "success",
                "data": {
                    "resultType": "vector",
                    "result": [
                        {"metric": {"pod": "a"}, "value": [1.0, "3"]},
                        {"metric": {}, "value": [1, "4.5"]},
                    ],
                },
            },
            7.5,
        ),
        ({"status": "success", "data": {"resultType": "vector", "result": []}}, 0.0),
    ],
)
def test_parse_prometheus_response(payload: dict, expected: float) -> None:
    assert parse_prometheus_response(json.dumps(payload).encode()) == expected


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"<html>", "non-JSON"),
        (b'{"status":"error","errorType":"bad_data","error":"parse error at char 3"}', "parse error"),
        (b'{"status":"success","data":{"resultType":"matrix","result":[]}}', "scalar or an instant vector"),
        (b'{"status":"success","data":{"resultType":"scalar","result":[1,"NaN"]}}', "nan"),
    ],
)
def test_parse_prometheus_errors(payload: bytes, match: str) -> None:
    with pytest.raises(SourceError, match=match):
        parse_prometheus_response(payload)


def test_authorization_header_forms() -> None:
    assert authorization_header("abc\n") == "Bearer abc"
    assert authorization_header("Basic dXNlcjpwYXNz") == "Basic dXNlcjpwYXNz"
    assert authorization_header("Bearer t0k") == "Bearer t0k"
    with pytest.raises(SourceConfigError, match="authSecretRef"):
        authorization_header("  ")


def test_prometheus_source_rejects_bad_url_naming_the_field() -> None:
    with pytest.raises(SourceConfigError, match=r"source\.prometheus\.url"):
        PrometheusSource(url="prometheus:9090", query="sum(x)")


def test_prometheus_source_sends_auth_and_query_over_http() -> None:
    # An HTTP endpoint speaking the Prometheus query API's answer format; the real Prometheus server is
    # exercised in tests/autoscale/test_prometheus_real.py.
    seen: dict[str, str] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen["path"] = self.path
            seen["auth"] = self.headers.get("Authorization", "")
            body = json.dumps({"status": "success", "data": {"resultType": "scalar", "result": [0, "9"]}})
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/prom/"
        source = PrometheusSource(url=url, query='sum(q{a="b"})', authorization="Bearer s3cret")
        reading = source.read([ObservedGroup(0, "10.0.0.1", ready=True)])
    finally:
        server.shutdown()
        server.server_close()
    assert reading.error is None and reading.total_waiting == 9.0 and reading.total_running is None
    assert seen["path"] == "/prom/api/v1/query?query=sum%28q%7Ba%3D%22b%22%7D%29"
    assert seen["auth"] == "Bearer s3cret"
    # A ready group with no per-group value is not "unreadable": the source reads totals.
    assert reading.groups[0].error is None


def test_prometheus_source_unreachable_is_an_error_of_the_reading() -> None:
    reading = PrometheusSource(url="http://127.0.0.1:9", query="sum(x)", timeout_seconds=1).read([])
    assert reading.total_waiting is None and reading.error is not None and "127.0.0.1:9" in reading.error
