"""The prometheus source against a real Prometheus (Debian's package) scraping a real /metrics endpoint."""

from __future__ import annotations

import time

from ling_operator.autoscale_sources import ObservedGroup, PrometheusSource, SourceReading

from tests.autoscale.exporter import EngineMetrics, serve_metrics
from tests.autoscale.prometheus import run_prometheus

QUERY = "sum(ling_runtime_num_queue_reqs)"


def read_until(source: PrometheusSource, want: float, timeout: float = 20.0) -> SourceReading:
    deadline = time.monotonic() + timeout
    while True:
        reading = source.read([ObservedGroup(0, "127.0.0.1", ready=True)])
        if reading.total_waiting == want or time.monotonic() > deadline:
            return reading
        time.sleep(0.3)


def test_prometheus_source_reads_a_real_prometheus_with_basic_auth() -> None:
    metrics = EngineMetrics("native")
    metrics.set(waiting=12, running=4)
    with serve_metrics(metrics) as exporter:
        target = f"127.0.0.1:{exporter.server_address[1]}"
        with run_prometheus([target], password="s3cret") as prom:
            assert prom.authorization is not None
            source = PrometheusSource(
                url=prom.url, query=QUERY, timeout_seconds=3, authorization=prom.authorization
            )
            first = read_until(source, 12.0)
            assert (first.error, first.total_waiting) == (None, 12.0)
            metrics.set(waiting=3)
            assert read_until(source, 3.0).total_waiting == 3.0
            # Without credentials the same query is refused, and the reading says so.
            anonymous = PrometheusSource(url=prom.url, query=QUERY, timeout_seconds=3)
            refused = anonymous.read([])
            assert refused.total_waiting is None and refused.error is not None and "401" in refused.error
            # A PromQL error is reported, not read as zero.
            broken = PrometheusSource(url=prom.url, query="sum(", authorization=prom.authorization).read([])
            assert broken.total_waiting is None and broken.error is not None
            assert "HTTP 400" in broken.error and "parse error" in broken.error
