"""Where the autoscaler reads queue depth: engine /metrics of rank-0 pods, or a Prometheus query.

Both are plain HTTP GETs with a timeout (stdlib urllib, no proxy from the environment: rank-0 pods and an
in-cluster Prometheus are reached directly). A source never guesses: a group whose /metrics cannot be read
or does not carry a queue metric is reported with the error, and a failing Prometheus query is an error
of the whole reading.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

from ling_operator.autoscale import GroupObservation

__all__ = [
    "HTTP_PORT",
    "QUEUE_METRICS",
    "RUNNING_METRICS",
    "EngineSource",
    "MetricSource",
    "ObservedGroup",
    "PrometheusSource",
    "SourceConfigError",
    "SourceReading",
    "authorization_header",
    "parse_engine_metrics",
    "parse_mtp_acceptance",
    "parse_prometheus_response",
]

HTTP_PORT = 30000  # the runtime's HTTP port (docs/architecture.md); SGLang/vLLM images are started on it too

# Waiting and running request gauges per engine, ours first.
QUEUE_METRICS: dict[str, str] = {
    "native": "ling_runtime_num_queue_reqs",
    "sglang": "sglang:num_queue_reqs",
    "vllm": "vllm:num_requests_waiting",
}
RUNNING_METRICS: dict[str, str] = {
    "native": "ling_runtime_num_running_reqs",
    "sglang": "sglang:num_running_reqs",
    "vllm": "vllm:num_requests_running",
}

# MTP acceptance per engine: (accepted, drafted) counters, or one gauge of the rate (SGLang's, over its
# last logged batch). docs/observability.md maps the same names onto ling:spec_accept_rate.
MTP_COUNTERS: dict[str, tuple[str, str]] = {
    "native": ("ling_runtime_spec_accepted_tokens_total", "ling_runtime_spec_draft_tokens_total"),
    "vllm": ("vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_draft_tokens_total"),
}
MTP_RATE_GAUGES: dict[str, str] = {"sglang": "sglang:spec_accept_rate"}

Fetch = Callable[[str, float, dict[str, str]], bytes]


class SourceConfigError(ValueError):
    """spec.autoscaling.source cannot be used as written (the message names the field)."""


class SourceError(RuntimeError):
    """One read failed (network, HTTP status, payload)."""


@dataclass(frozen=True)
class ObservedGroup:
    """A group as the operator sees it: its index, rank-0 pod IP (None before scheduling), readiness."""

    index: int
    rank0_ip: str | None
    ready: bool


@dataclass(frozen=True)
class SourceReading:
    groups: tuple[GroupObservation, ...]
    total_waiting: float | None
    total_running: float | None
    error: str | None = None
    # group index -> rank 0's MTP acceptance (accepted / drafted tokens), where its /metrics had one.
    mtp_acceptance: dict[int, float] = field(default_factory=dict)


class MetricSource(Protocol):
    #: True when the source can see demand while no group exists (needed for scale-to-zero).
    sees_demand_at_zero: bool
    kind: str

    def read(self, groups: Sequence[ObservedGroup]) -> SourceReading: ...


def _urllib_fetch(url: str, timeout: float, headers: dict[str, str]) -> bytes:
    # An opener without ProxyHandler defaults: http_proxy in the operator's environment must not reroute
    # scrapes of pod IPs.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        # Prometheus explains a bad query in the body ({"error": "parse error ..."}): keep its start.
        detail = exc.read(300).decode("utf-8", "replace").strip() if exc.fp else ""
        raise SourceError(
            f"GET {url}: HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")
        ) from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SourceError(f"GET {url}: {reason}") from exc


def _sum_samples(text: str, name: str) -> float | None:
    total: float | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                total = (total or 0.0) + float(sample.value)
    return total


def parse_engine_metrics(text: str, engine: str = "native") -> tuple[float, float | None]:
    """(waiting, running) from a Prometheus text exposition; the engine's names first, then the others.

    Raises SourceError when no known queue metric is present (e.g. SGLang without --enable-metrics).
    """
    if engine not in QUEUE_METRICS:
        raise SourceConfigError(f"spec.engine.type must be one of {sorted(QUEUE_METRICS)}, got {engine!r}")
    order = [engine, *(e for e in QUEUE_METRICS if e != engine)]
    try:
        for name in order:
            waiting = _sum_samples(text, QUEUE_METRICS[name])
            if waiting is not None:
                return waiting, _sum_samples(text, RUNNING_METRICS[name])
    except ValueError as exc:  # the parser's error for malformed text
        raise SourceError(f"malformed metrics text: {exc}") from exc
    raise SourceError(
        f"no queue metric ({', '.join(QUEUE_METRICS[e] for e in order)}) in the exposition"
        + (" (SGLang needs --enable-metrics)" if engine == "sglang" else "")
    )


def parse_mtp_acceptance(text: str, engine: str = "native") -> float | None:
    """Rank 0's MTP acceptance from its exposition: accepted / drafted tokens since it started, or
    SGLang's rate gauge; None when nothing was drafted yet (or MTP is off, or the text is malformed)."""
    try:
        if engine in MTP_RATE_GAUGES:
            rate = _sum_samples(text, MTP_RATE_GAUGES[engine])
            return None if rate is None or math.isnan(rate) else min(max(rate, 0.0), 1.0)
        accepted_name, drafted_name = MTP_COUNTERS.get(engine, MTP_COUNTERS["native"])
        drafted = _sum_samples(text, drafted_name)
        if not drafted:
            return None
        return min((_sum_samples(text, accepted_name) or 0.0) / drafted, 1.0)
    except ValueError:
        return None


@dataclass
class EngineSource:
    """Scrape every ready group's rank-0 /metrics; not-ready groups are not scraped (they serve nothing)."""

    engine: str = "native"
    timeout_seconds: float = 2.0
    port: int = HTTP_PORT
    fetch: Fetch = _urllib_fetch
    kind: str = "engine"
    sees_demand_at_zero: bool = False

    def _scrape(self, group: ObservedGroup) -> tuple[GroupObservation, float | None]:
        """The group's queue, and its MTP acceptance from the same scrape."""
        if not group.rank0_ip:
            return GroupObservation(group.index, ready=True, error="rank-0 pod has no IP"), None
        host = f"[{group.rank0_ip}]" if ":" in group.rank0_ip else group.rank0_ip
        url = f"http://{host}:{self.port}/metrics"
        try:
            text = self.fetch(url, self.timeout_seconds, {"Accept": "text/plain"}).decode("utf-8", "replace")
            waiting, running = parse_engine_metrics(text, self.engine)
        except SourceError as exc:
            return GroupObservation(group.index, ready=True, error=str(exc)), None
        observation = GroupObservation(group.index, ready=True, waiting=waiting, running=running)
        return observation, parse_mtp_acceptance(text, self.engine)

    def read(self, groups: Sequence[ObservedGroup]) -> SourceReading:
        ready = [g for g in groups if g.ready]
        observed: dict[int, GroupObservation] = {
            g.index: GroupObservation(g.index, ready=False) for g in groups if not g.ready
        }
        acceptance: dict[int, float] = {}
        if ready:
            # Groups are scraped in parallel so one slow pod costs one timeout, not one per group.
            with ThreadPoolExecutor(max_workers=min(8, len(ready))) as pool:
                for obs, rate in pool.map(self._scrape, ready):
                    observed[obs.index] = obs
                    if rate is not None:
                        acceptance[obs.index] = rate
        ordered = tuple(observed[i] for i in sorted(observed))
        readable = [g for g in ordered if g.ready and g.waiting is not None]
        if ready and not readable:
            errors = "; ".join(f"group {g.index}: {g.error}" for g in ordered if g.error)
            return SourceReading(ordered, None, None, error=f"no group's metrics could be read ({errors})")
        waiting = sum(g.waiting or 0.0 for g in readable)
        running_values = [g.running for g in readable if g.running is not None]
        running = sum(running_values) if running_values else (0.0 if not ready else None)
        return SourceReading(ordered, waiting, running, mtp_acceptance=acceptance)


def authorization_header(secret_value: str) -> str:
    """The Authorization header for a Secret's value: "Bearer x"/"Basic x" verbatim, else a bearer token."""
    value = secret_value.strip()
    if not value:
        raise SourceConfigError("spec.autoscaling.source.prometheus.authSecretRef points at an empty value")
    scheme = value.split(" ", 1)[0].lower()
    if scheme in ("bearer", "basic") and " " in value:
        return value
    return f"Bearer {value}"


def parse_prometheus_response(payload: bytes) -> float:
    """The query's value: a scalar, or the sum of an instant vector (empty vector = 0, as KEDA's default)."""
    try:
        document = json.loads(payload)
    except ValueError as exc:
        raise SourceError(f"Prometheus answered with non-JSON: {payload[:80]!r}") from exc
    if not isinstance(document, dict) or document.get("status") != "success":
        error = document.get("error") if isinstance(document, dict) else None
        raise SourceError(f"Prometheus query failed: {error or document!r}")
    data = document.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    try:
        if kind == "scalar":
            values = [float(result[1])]
        elif kind == "vector":
            values = [float(item["value"][1]) for item in result]
        else:
            raise SourceError(f"Prometheus query must give a scalar or an instant vector, got {kind!r}")
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise SourceError(f"unexpected Prometheus result: {result!r}") from exc
    total = sum(values)
    if math.isnan(total) or math.isinf(total):
        raise SourceError(f"Prometheus query gave {total}")
    return total


@dataclass
class PrometheusSource:
    """A PromQL instant query giving the total number of waiting requests."""

    url: str
    query: str
    timeout_seconds: float = 5.0
    authorization: str | None = None  # full Authorization header value; never logged
    fetch: Fetch = _urllib_fetch
    kind: str = "prometheus"
    sees_demand_at_zero: bool = True

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise SourceConfigError(
                f"spec.autoscaling.source.prometheus.url must be http(s)://host[:port][/prefix], got {self.url!r}"
            )
        if not self.query.strip():
            raise SourceConfigError("spec.autoscaling.source.prometheus.query must not be empty")

    def read(self, groups: Sequence[ObservedGroup]) -> SourceReading:
        observed = tuple(GroupObservation(g.index, ready=g.ready) for g in groups)
        url = self.url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": self.query})
        headers = {"Accept": "application/json"}
        if self.authorization:
            headers["Authorization"] = self.authorization
        try:
            payload = self.fetch(url, self.timeout_seconds, headers)
            waiting = parse_prometheus_response(payload)
        except SourceError as exc:
            return SourceReading(observed, None, None, error=str(exc))
        return SourceReading(observed, waiting, None)
