"""The alerts, the recording rules and the dashboard's queries, checked by Prometheus' own promtool: every
expression parses, each alert fires on the series that should fire it, and only then, and the recording
rules turn each engine's own metric names (native, SGLang, vLLM) into the same ling:* series
(`promtool test rules`)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.utils import floatToGoString

from . import engine_metric_names as em
from .chart_tools import MATRIX, NAMESPACE, RELEASE, ROOT, one, render

JOB = f"{RELEASE}-ling-operator-metrics"
DEPLOYMENT = {"namespace": "team-a", "deployment": "chat"}


def promtool() -> str:
    """Debian's prometheus package ships promtool; hack/prometheus.sh installs it when it is missing."""
    found = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").is_file() else None)
    if found is None:
        subprocess.run(
            ["bash", str(ROOT / "hack" / "prometheus.sh"), "install"], check=True, capture_output=True
        )
        found = shutil.which("promtool") or "/usr/bin/promtool"
    return found


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def rule_groups() -> list[dict[str, Any]]:
    return one(render(MATRIX["monitoring"]), "PrometheusRule")["spec"]["groups"]


def test_alert_rules_and_their_annotation_templates_are_valid(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    proc = run_promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    count = sum(len(g["rules"]) for g in rule_groups())
    assert f"SUCCESS: {count} rules found" in proc.stdout


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    dashboard = json.loads(one(render({}), "ConfigMap")["data"]["ling-serving.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    # Grafana substitutes its variables before Prometheus sees the query.
    substituted = [
        e.replace("$__rate_interval", "5m").replace("$namespace", ".*").replace("$deployment", ".*")
        for e in exprs
    ]
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(substituted)]
    (tmp_path / "dashboard.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    proc = run_promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{inner}}}", "values": values}


def _alert(name: str, at: str, labels: dict[str, str] | None) -> dict[str, Any]:
    """An alert_rule_test entry: `labels` None means the alert must not be firing at `at`."""
    expected = [] if labels is None else [{"exp_labels": {"team": "ml-platform", **labels}}]
    return {"eval_time": at, "alertname": name, "exp_alerts": expected}


# --- Serving pods of the three engines, each in its own metric names -------------------------------------
# The labels the PodMonitor puts on a rank-0 pod's series, plus what each engine adds itself.
POD = {
    "namespace": "team-a",
    "ling_deployment": "chat",
    "ling_group": "0",
    "ling_rank": "0",
    "ling_role": "head",
    "pod": "chat-0-0",
}
GROUP = {"namespace": "team-a", "ling_deployment": "chat", "ling_group": "0"}
ENGINES = ("native", "sglang", "vllm")
OWN_LABELS = {
    "native": [{"model_name": "ling"}],
    # Two schedulers export under DP attention (one per attention-TP group): gauges sum / max over them.
    "sglang": [
        {"model_name": "ling", "engine_type": "unified", "tp_rank": "0", "pp_rank": "0"},
        {"model_name": "ling", "engine_type": "unified", "tp_rank": "2", "pp_rank": "0"},
    ],
    # Two engine cores under data parallelism.
    "vllm": [{"model_name": "ling", "engine": "0"}, {"model_name": "ling", "engine": "1"}],
}
NAMES = {
    "native": {
        "queue": "ling_runtime_num_queue_reqs",
        "running": "ling_runtime_num_running_reqs",
        "kv": "ling_runtime_kv_cache_usage_ratio",
        "prompt": "ling_runtime_prompt_tokens_total",
        "generation": "ling_runtime_generation_tokens_total",
        "ttft": "ling_runtime_time_to_first_token_seconds",
        "itl": "ling_runtime_inter_token_latency_seconds",
        "e2e": "ling_runtime_e2e_request_latency_seconds",
    },
    "sglang": {
        "queue": "sglang:num_queue_reqs",
        "running": "sglang:num_running_reqs",
        "kv": "sglang:token_usage",
        "prompt": "sglang:prompt_tokens_total",
        "generation": "sglang:generation_tokens_total",
        "ttft": "sglang:time_to_first_token_seconds",
        "itl": "sglang:inter_token_latency_seconds",
        "e2e": "sglang:e2e_request_latency_seconds",
    },
    "vllm": {
        "queue": "vllm:num_requests_waiting",
        "running": "vllm:num_requests_running",
        "kv": "vllm:kv_cache_usage_perc",
        "prompt": "vllm:prompt_tokens_total",
        "generation": "vllm:generation_tokens_total",
        "ttft": "vllm:time_to_first_token_seconds",
        "itl": "vllm:inter_token_latency_seconds",
        "e2e": "vllm:e2e_request_latency_seconds",
    },
}


def _native_bounds(histogram: str) -> tuple[float, ...]:
    """Bucket bounds of a native histogram, read from the runtime's own registry."""
    from ling_runtime.telemetry import RuntimeMetrics

    for family in RuntimeMetrics("ling-test").registry.collect():
        if family.name == histogram:
            les = [s.labels["le"] for s in family.samples if s.name.endswith("_bucket")]
            return tuple(float(le) for le in les if le != "+Inf")
    raise KeyError(histogram)


BOUNDS: dict[str, dict[str, tuple[float, ...]]] = {
    "native": {k: _native_bounds(NAMES["native"][k]) for k in ("ttft", "itl", "e2e")},
    "sglang": {"ttft": em.SGLANG_TTFT_BUCKETS, "itl": em.SGLANG_ITL_BUCKETS, "e2e": em.SGLANG_E2E_BUCKETS},
    "vllm": {"ttft": em.VLLM_TTFT_BUCKETS, "itl": em.VLLM_ITL_BUCKETS, "e2e": em.VLLM_E2E_BUCKETS},
}


def _histogram(
    name: str, labels: dict[str, str], bounds: tuple[float, ...], per_minute: dict[float, int], minutes: int
) -> list[dict[str, str]]:
    """Bucket series of a histogram that observes `per_minute` {value: count} every minute."""
    series = []
    for bound in (*bounds, float("inf")):
        step = sum(n for value, n in per_minute.items() if value <= bound)
        le = floatToGoString(bound)
        series.append(_series(f"{name}_bucket", {**labels, "le": le}, f"0+{step}x{minutes}"))
    return series


FAST = {0.05: 120}  # 2 requests a second, all fast
SLOW_TAIL = {0.05: 96, 15.0: 24}  # 20% of requests wait 15 s: p95 above 10 s on every engine


def _spec_series(engine: str, accept: float, minutes: int) -> list[dict[str, str]]:
    """MTP metrics of a group drafting 4 tokens a second (1 draft), `accept` of them accepted."""
    labels = {**POD, **OWN_LABELS[engine][0]}
    accepted = 4 * accept * 60
    if engine == "native":
        return [
            _series("ling_runtime_spec_draft_tokens_total", labels, f"0+240x{minutes}"),
            _series("ling_runtime_spec_accepted_tokens_total", labels, f"0+{accepted:g}x{minutes}"),
            _series("ling_runtime_spec_accept_length_count", labels, f"0+60x{minutes}"),
            _series("ling_runtime_spec_accept_length_sum", labels, f"0+{60 + accepted:g}x{minutes}"),
        ]
    if engine == "vllm":
        return [
            _series("vllm:spec_decode_num_drafts_total", labels, f"0+60x{minutes}"),
            _series("vllm:spec_decode_num_draft_tokens_total", labels, f"0+240x{minutes}"),
            _series("vllm:spec_decode_num_accepted_tokens_total", labels, f"0+{accepted:g}x{minutes}"),
        ]
    return [
        _series("sglang:spec_accept_rate", labels, f"{accept:g}x{minutes}"),
        _series("sglang:spec_accept_length", labels, f"{1 + 4 * accept:g}x{minutes}"),
    ]


def engine_series(
    engine: str,
    *,
    queue: float = 3,
    kv: float = 0.5,
    ttft: dict[float, int] | None = None,
    accept: float | None = None,
    minutes: int = 60,
) -> list[dict[str, str]]:
    """One rank-0 pod of `engine`, in that engine's metric names: `queue` waiting requests, `kv` cache
    usage, 5 running, 40 prompt and 20 generated tokens a second, latency histograms, and MTP with
    acceptance `accept` when given."""
    names, own = NAMES[engine], OWN_LABELS[engine]
    first, last = {**POD, **own[0]}, {**POD, **own[-1]}
    # Gauges are split over the engine's exporters where it has several (sum for counts, max for usage).
    split = [(first, queue - 1), (last, 1)] if len(own) > 1 else [(first, queue)]
    series = [_series(names["queue"], labels, f"{value:g}x{minutes}") for labels, value in split]
    series += [_series(names["running"], first, f"5x{minutes}")]
    series += [_series(names["kv"], first, f"{kv:g}x{minutes}")]
    if len(own) > 1:
        series += [_series(names["kv"], last, f"{kv / 2:g}x{minutes}")]
    series += [
        _series(names["prompt"], first, f"0+2400x{minutes}"),
        _series(names["generation"], first, f"0+1200x{minutes}"),
    ]
    for kind in ("ttft", "itl", "e2e"):
        observed = (ttft or FAST) if kind == "ttft" else FAST
        series += _histogram(names[kind], first, BOUNDS[engine][kind], observed, minutes)
    if engine == "native":
        series += [
            _series("ling_runtime_model_load_seconds", first, f"120x{minutes}"),
            _series("ling_runtime_ranks_alive", first, f"4x{minutes}"),
            _series("ling_runtime_linear_state_slots_used", first, f"12x{minutes}"),
        ]
    if engine == "sglang":
        series += [
            _series("sglang:engine_load_weights_time", first, f"120x{minutes}"),
            _series("sglang:mamba_usage", first, f"0.25x{minutes}"),
        ]
    if accept is not None:
        series += _spec_series(engine, accept, minutes)
    return series


def _serving_alert(name: str, engine: str, at: str, fires: bool, per_group: bool = True) -> dict[str, Any]:
    labels = {**GROUP} if per_group else {k: v for k, v in GROUP.items() if k != "ling_group"}
    return _alert(name, at, {"severity": "warning", **labels, "ling_engine": engine} if fires else None)


def _serving_scenarios() -> dict[str, tuple[list[dict[str, str]], list[dict[str, Any]]]]:
    """Each serving alert, for each engine, fed that engine's own metric names."""
    out: dict[str, tuple[list[dict[str, str]], list[dict[str, Any]]]] = {}
    for e in ENGINES:
        ttft = "LingTimeToFirstTokenHigh"
        out[f"ttft-high-{e}"] = (
            engine_series(e, ttft=SLOW_TAIL),
            [_serving_alert(ttft, e, "8m", False, False), _serving_alert(ttft, e, "20m", True, False)],
        )
        out[f"ttft-fast-{e}"] = (engine_series(e), [_serving_alert(ttft, e, "30m", False, False)])
        kv = "LingKVCacheExhausted"
        out[f"kv-full-and-waiting-{e}"] = (
            engine_series(e, kv=0.97, queue=4),
            [_serving_alert(kv, e, "25m", True)],
        )
        out[f"kv-full-no-queue-{e}"] = (
            engine_series(e, kv=0.97, queue=0),
            [_serving_alert(kv, e, "25m", False)],
        )
        mtp = "LingMTPAcceptanceLow"
        out[f"mtp-low-{e}"] = (
            engine_series(e, accept=0.25),
            [_serving_alert(mtp, e, "20m", False), _serving_alert(mtp, e, "40m", True)],
        )
        out[f"mtp-good-{e}"] = (engine_series(e, accept=0.75), [_serving_alert(mtp, e, "40m", False)])
        out[f"metrics-scraped-{e}"] = (
            [_series("ling_operator_groups_ready", DEPLOYMENT, "1x30"), *engine_series(e, minutes=30)],
            [_alert("LingServingMetricsAbsent", "20m", None)],
        )
    # SGLang without speculative decoding still exports spec_accept_rate 0 (and length 0): not a low rate.
    no_spec = [
        _series("sglang:spec_accept_rate", {**POD, **OWN_LABELS["sglang"][0]}, "0x60"),
        _series("sglang:spec_accept_length", {**POD, **OWN_LABELS["sglang"][0]}, "0x60"),
    ]
    out["mtp-off-sglang"] = (
        engine_series("sglang") + no_spec,
        [_alert("LingMTPAcceptanceLow", "40m", None)],
    )
    # An idle SGLang group keeps its last batch's gauges: no verdict on a stale value.
    idle = [s for s in engine_series("sglang", accept=0.25) if "generation_tokens" not in s["series"]]
    out["mtp-low-but-idle-sglang"] = (idle, [_alert("LingMTPAcceptanceLow", "40m", None)])
    out["metrics-absent"] = (
        [_series("ling_operator_groups_ready", DEPLOYMENT, "1x30")],
        [
            _alert("LingServingMetricsAbsent", "5m", None),  # not for 10m yet
            _alert("LingServingMetricsAbsent", "20m", {"severity": "warning", **DEPLOYMENT}),
        ],
    )
    return out


# name -> (input series, expectations). Samples are one a minute; "AxN" holds A for N minutes and
# "A+BxN" grows by B a minute.
SCENARIOS: dict[str, tuple[list[dict[str, str]], list[dict[str, Any]]]] = {
    "group-stuck": (
        [
            _series("ling_operator_groups_desired", DEPLOYMENT, "2x40"),
            _series("ling_operator_groups_ready", DEPLOYMENT, "1x40"),
        ],
        [
            _alert("LingGroupRendezvousStuck", "10m", None),  # not for 15m yet
            _alert("LingGroupRendezvousStuck", "20m", {"severity": "warning", **DEPLOYMENT}),
        ],
    ),
    "groups-ready": (
        [
            _series("ling_operator_groups_desired", DEPLOYMENT, "2x40"),
            _series("ling_operator_groups_ready", DEPLOYMENT, "2x40"),
        ],
        [_alert("LingGroupRendezvousStuck", "30m", None)],
    ),
    "group-pending": (
        [
            _series("ling_operator_groups_waiting", {**DEPLOYMENT, "reason": "WaitingForVolume"}, "1x40"),
            _series("ling_operator_groups_waiting", {**DEPLOYMENT, "reason": "ImagePullFailed"}, "1x5 0x35"),
        ],
        [
            _alert("LingGroupPending", "10m", None),  # not for 15m yet
            _alert(
                "LingGroupPending", "20m", {"severity": "warning", "reason": "WaitingForVolume", **DEPLOYMENT}
            ),
        ],
    ),
    "restart-loop": (
        [_series("ling_operator_group_restarts_total", DEPLOYMENT, "0+0.2x60")],  # 6 restarts per 30 min
        [_alert("LingGroupRestartLoop", "40m", {"severity": "critical", **DEPLOYMENT})],
    ),
    "one-restart": (
        [_series("ling_operator_group_restarts_total", DEPLOYMENT, "0x10 1x50")],
        [_alert("LingGroupRestartLoop", "40m", None)],
    ),
    "pinned-at-max": (
        [
            _series("ling_operator_autoscaler_desired_replicas", DEPLOYMENT, "3x60"),
            _series("ling_operator_autoscaler_max_replicas", DEPLOYMENT, "3x60"),
            _series("ling_operator_autoscaler_queue_depth", DEPLOYMENT, "10+2x60"),
        ],
        [_alert("LingAutoscalerPinnedAtMax", "40m", {"severity": "warning", **DEPLOYMENT})],
    ),
    "room-to-scale": (
        [
            _series("ling_operator_autoscaler_desired_replicas", DEPLOYMENT, "2x60"),
            _series("ling_operator_autoscaler_max_replicas", DEPLOYMENT, "3x60"),
            _series("ling_operator_autoscaler_queue_depth", DEPLOYMENT, "10+2x60"),
        ],
        [_alert("LingAutoscalerPinnedAtMax", "40m", None)],
    ),
    "at-max-but-draining": (
        [
            _series("ling_operator_autoscaler_desired_replicas", DEPLOYMENT, "3x60"),
            _series("ling_operator_autoscaler_max_replicas", DEPLOYMENT, "3x60"),
            _series("ling_operator_autoscaler_queue_depth", DEPLOYMENT, "200-2x60"),
        ],
        [_alert("LingAutoscalerPinnedAtMax", "40m", None)],
    ),
    "no-leader": (
        [
            _series("ling_operator_leader", {"job": JOB, "namespace": NAMESPACE, "pod": "a"}, "0x20"),
            _series("ling_operator_leader", {"job": JOB, "namespace": NAMESPACE, "pod": "b"}, "0x20"),
        ],
        [_alert("LingOperatorDown", "10m", {"severity": "critical", "job": JOB, "namespace": NAMESPACE})],
    ),
    "operator-not-scraped": (
        # Only another release's operator is scraped: this release's is absent.
        [_series("ling_operator_leader", {"job": "other-metrics", "namespace": "other", "pod": "x"}, "1x20")],
        [_alert("LingOperatorDown", "10m", {"severity": "critical", "job": JOB, "namespace": NAMESPACE})],
    ),
    "one-leader": (
        [
            _series("ling_operator_leader", {"job": JOB, "namespace": NAMESPACE, "pod": "a"}, "1x20"),
            _series("ling_operator_leader", {"job": JOB, "namespace": NAMESPACE, "pod": "b"}, "0x20"),
        ],
        [_alert("LingOperatorDown", "10m", None)],
    ),
    "reconcile-errors": (
        [
            _series("ling_operator_reconcile_total", {"namespace": NAMESPACE, "result": "error"}, "0+1x60"),
            _series("ling_operator_reconcile_total", {"namespace": NAMESPACE, "result": "ok"}, "0+2x60"),
        ],
        [_alert("LingReconcileErrors", "40m", {"severity": "warning", "namespace": NAMESPACE})],
    ),
    "writes-refused": (
        # Passes whose writes the API refuses (a quota, a webhook) count like failed ones.
        [
            _series(
                "ling_operator_reconcile_total", {"namespace": NAMESPACE, "result": "write_error"}, "0+1x60"
            ),
            _series("ling_operator_reconcile_total", {"namespace": NAMESPACE, "result": "ok"}, "0+2x60"),
        ],
        [_alert("LingReconcileErrors", "40m", {"severity": "warning", "namespace": NAMESPACE})],
    ),
    "rare-errors": (
        [
            _series(
                "ling_operator_reconcile_total", {"namespace": NAMESPACE, "result": "error"}, "0+0.01x60"
            ),
            _series("ling_operator_reconcile_total", {"namespace": NAMESPACE, "result": "ok"}, "0+2x60"),
        ],
        [_alert("LingReconcileErrors", "40m", None)],
    ),
}


SCENARIOS.update(_serving_scenarios())


def test_every_alert_has_a_firing_and_a_quiet_scenario() -> None:
    alerts = {r["alert"] for g in rule_groups() for r in g["rules"] if "alert" in r}
    fired = {e["alertname"] for _, exps in SCENARIOS.values() for e in exps if e["exp_alerts"]}
    quiet = {e["alertname"] for _, exps in SCENARIOS.values() for e in exps if not e["exp_alerts"]}
    assert fired == alerts and quiet == alerts


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_alert_fires_exactly_when_it_should(scenario: str, tmp_path: Path) -> None:
    # Annotations are templates checked above; the unit test compares labels, so it drops them.
    groups = [
        {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
        for g in rule_groups()
    ]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    series, expectations = SCENARIOS[scenario]
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": expectations}],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    proc = run_promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_serving_alert_fires_for_every_engine() -> None:
    serving = {r["alert"] for g in rule_groups() if g["name"] == "ling-serving.runtime" for r in g["rules"]}
    per_engine = serving - {"LingServingMetricsAbsent"}  # reads the operator's groups, not an engine's names
    fired = {
        (e["alertname"], label["exp_labels"]["ling_engine"])
        for _, exps in SCENARIOS.values()
        for e in exps
        for label in e["exp_alerts"]
        if "ling_engine" in label["exp_labels"]
    }
    assert {(a, engine) for a in per_engine for engine in ENGINES} <= fired


# --- Recording rules: each engine's names become the same ling:* series ----------------------------------
# Every engine's pod above yields these values; None: the engine exports nothing for it (documented in
# docs/observability.md).
RECORDED: dict[str, dict[str, float | None]] = {
    "ling:num_queue_reqs": {"native": 3, "sglang": 3, "vllm": 3},
    "ling:num_running_reqs": {"native": 5, "sglang": 5, "vllm": 5},
    "ling:kv_cache_usage_ratio": {"native": 0.5, "sglang": 0.5, "vllm": 0.5},
    "ling:prompt_tokens:rate2m": {"native": 40, "sglang": 40, "vllm": 40},
    "ling:generation_tokens:rate2m": {"native": 20, "sglang": 20, "vllm": 20},
    "ling:spec_accept_rate": {"native": 0.75, "sglang": 0.75, "vllm": 0.75},
    "ling:spec_accept_length": {"native": 4, "sglang": 4, "vllm": 4},
    "ling:model_load_seconds": {"native": 120, "sglang": 120, "vllm": None},
    "ling:ranks_alive": {"native": 4, "sglang": None, "vllm": None},
    "ling:linear_state_slots_used": {"native": 12, "sglang": None, "vllm": None},
    "ling:linear_state_usage_ratio": {"native": None, "sglang": 0.25, "vllm": None},
}
HISTOGRAMS = {
    "ttft": "ling:time_to_first_token_seconds_bucket:rate2m",
    "itl": "ling:inter_token_latency_seconds_bucket:rate2m",
    "e2e": "ling:e2e_request_latency_seconds_bucket:rate2m",
}


def _sample(name: str, labels: dict[str, str], value: float) -> dict[str, Any]:
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"labels": f"{name}{{{inner}}}", "value": value}


def _expr_test(expr: str, samples: list[dict[str, Any]], at: str = "10m") -> dict[str, Any]:
    return {"expr": expr, "eval_time": at, "exp_samples": samples}


def _histogram_tests(engine: str, bounds: dict[str, int]) -> list[dict[str, Any]]:
    """Each recorded histogram has one series per bucket of the engine's layout, +Inf = 2 requests/s."""
    tests = []
    for kind, record in HISTOGRAMS.items():
        selector = f'{record}{{ling_engine="{engine}"}}'
        tests.append(_expr_test(f"count({selector})", [{"labels": "{}", "value": bounds[kind] + 1}]))
        inf = {**GROUP, "ling_engine": engine, "le": "+Inf"}
        tests.append(_expr_test(f'{record}{{ling_engine="{engine}", le="+Inf"}}', [_sample(record, inf, 2)]))
    return tests


def _run_expr_tests(series: list[dict[str, str]], tests: list[dict[str, Any]], tmp_path: Path) -> None:
    groups = [g for g in rule_groups() if g["name"] == "ling-serving.engine-metrics"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    unit = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(unit))
    proc = run_promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_rules_record_every_series_the_tests_expect() -> None:
    recorded = {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}
    assert recorded == set(RECORDED) | set(HISTOGRAMS.values())


@pytest.mark.parametrize("engine", ENGINES)
def test_recording_rules_map_the_engines_names_onto_one_series_set(engine: str, tmp_path: Path) -> None:
    tests = []
    for record, values in RECORDED.items():
        value = values[engine]
        selector = f'{record}{{ling_engine="{engine}"}}'
        expected = [] if value is None else [_sample(record, {**GROUP, "ling_engine": engine}, value)]
        tests.append(_expr_test(selector, expected))
    tests += _histogram_tests(engine, {k: len(v) for k, v in BOUNDS[engine].items()})
    # A standalone server of the same engine elsewhere in the cluster (no ling_deployment) is not counted.
    outsider = {"namespace": "ml", "pod": "other-vllm", **OWN_LABELS[engine][0]}
    series = [*engine_series(engine, accept=0.75), _series(NAMES[engine]["queue"], outsider, "7x60")]
    tests.append(_expr_test("count(ling:num_queue_reqs)", [{"labels": "{}", "value": 1}]))
    _run_expr_tests(series, tests, tmp_path)


def _renamed(series: list[dict[str, str]], old: str, new: str) -> list[dict[str, str]]:
    return [{**s, "series": s["series"].replace(old, new)} for s in series]


def test_vllm_before_the_renames_fills_the_same_series(tmp_path: Path) -> None:
    # vLLM < 0.9 / < 0.11: gpu_cache_usage_perc and time_per_output_token_seconds only.
    series = _renamed(engine_series("vllm"), "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    series = _renamed(series, "vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")
    kv = _sample("ling:kv_cache_usage_ratio", {**GROUP, "ling_engine": "vllm"}, 0.5)
    tests = [_expr_test("ling:kv_cache_usage_ratio", [kv])]
    tests += _histogram_tests("vllm", {k: len(v) for k, v in BOUNDS["vllm"].items()})
    _run_expr_tests(series, tests, tmp_path)


def test_vllm_exporting_old_and_new_names_is_counted_once(tmp_path: Path) -> None:
    # vLLM 0.9 to 0.11 export both names with the same values (and the same buckets).
    series = engine_series("vllm")
    series += _renamed(
        [
            s
            for s in series
            if s["series"].startswith(("vllm:kv_cache_usage_perc", "vllm:inter_token_latency"))
        ],
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
    )
    series = series + _renamed(
        [s for s in series if s["series"].startswith("vllm:inter_token_latency")],
        "vllm:inter_token_latency_seconds",
        "vllm:time_per_output_token_seconds",
    )
    kv = _sample("ling:kv_cache_usage_ratio", {**GROUP, "ling_engine": "vllm"}, 0.5)
    tests = [_expr_test("ling:kv_cache_usage_ratio", [kv])]
    tests += _histogram_tests("vllm", {k: len(v) for k, v in BOUNDS["vllm"].items()})
    _run_expr_tests(series, tests, tmp_path)


def test_sglang_legacy_bucket_layout_never_mixes_with_the_current_one(tmp_path: Path) -> None:
    # A group exporting both inter-token names, with different bounds: only the current layout counts.
    labels = {**POD, **OWN_LABELS["sglang"][0]}
    legacy = _histogram("sglang:time_per_output_token_seconds", labels, (0.005, 0.05, 0.5, 5.0), FAST, 60)
    tests = _histogram_tests("sglang", {k: len(v) for k, v in BOUNDS["sglang"].items()})
    _run_expr_tests(engine_series("sglang") + legacy, tests, tmp_path)


def test_default_ttft_threshold_is_a_bucket_bound_of_every_engine() -> None:
    # At a shared bound, "p95 above the threshold" means exactly "over 5% of requests slower than it".
    threshold = yaml.safe_load((ROOT / "charts" / "ling-operator" / "values.yaml").read_text())[
        "prometheusRule"
    ]["ttftP95Seconds"]
    for engine in ENGINES:
        assert float(threshold) in BOUNDS[engine]["ttft"], engine
