"""Every metric the dashboard and the alerts query is one the operator or the runtime really exports.

The exported names come from the real registries (the runtime's RuntimeMetrics, the operator's metrics
module), expanded the way prometheus-client exposes them (counters as _total, histograms as
_bucket/_sum/_count), so a renamed metric or a typo in a panel fails here, not on a blank dashboard.
The serving panels and alerts read the ling:* series of the chart's recording rules; each rule reads
only names its engine exports: the native runtime's registry, or SGLang's and vLLM's names kept as
data with their source (engine_metric_names.py).
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from . import engine_metric_names
from .chart_tools import MATRIX, one, render

# Words of PromQL that look like metric names but are not.
_PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on", "ignoring"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (strings, matchers, ranges, grouping lists and calls removed)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        is_call = text[match.end() :].lstrip().startswith("(")
        if not is_call and match.group().lower() not in _PROMQL_WORDS:
            names.add(match.group())
    return names


def exposed_names(registry: CollectorRegistry) -> set[str]:
    """The sample names a registry exposes, whether or not a labelled metric has a child yet."""
    return {family.name + suffix for family in registry.collect() for suffix in _SUFFIXES[family.type]}


def runtime_metric_names() -> set[str]:
    from ling_runtime.telemetry import RuntimeMetrics

    return exposed_names(RuntimeMetrics("ling-test").registry)


def operator_metric_names() -> set[str]:
    module = importlib.import_module("ling_operator.metrics")
    registries = [v for v in vars(module).values() if isinstance(v, CollectorRegistry)]
    names: set[str] = set()
    for registry in registries:
        names |= exposed_names(registry)
    # Metrics registered on the global default registry are module-level wrappers.
    for value in vars(module).values():
        if isinstance(value, MetricWrapperBase):
            names |= {value._name + s for s in _SUFFIXES[value._type]}
    return names


def dashboard_expressions() -> list[str]:
    configmap = one(render({}), "ConfigMap")
    dashboard = json.loads(configmap["data"]["ling-serving.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    # Grafana's label_values(<series selector>, <label>): only the selector is PromQL.
    variables = [
        v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)
    ]
    exprs += [re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", q) for q in variables]
    return exprs


def _rules() -> list[dict[str, Any]]:
    rule: dict[str, Any] = one(render(MATRIX["monitoring"]), "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def alert_expressions() -> dict[str, str]:
    return {r["alert"]: r["expr"] for r in _rules() if "alert" in r}


def recording_rules() -> list[dict[str, Any]]:
    return [r for r in _rules() if "record" in r]


def engine_exported_names(engine: str) -> set[str]:
    if engine == "native":
        return runtime_metric_names()
    return exposed_names(engine_metric_names.registry(engine))


# The labels every recorded ling:* series keeps (histogram buckets add le).
RECORDED_LABELS = {"namespace", "ling_deployment", "ling_group", "ling_engine", "le"}


def test_the_promql_reader_finds_exactly_the_metric_names() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, pod) (rate(a_seconds_bucket{job="x", le!="+Inf"}[5m])))'
        ' / on (pod) group_left (node) b_total offset 5m > bool 0.5 and absent(c{d=~"$ns"})'
        " or 1e3 * e_info"
    )
    assert promql_metric_names(expr) == {"a_seconds_bucket", "b_total", "c", "e_info"}


def test_the_registries_expose_the_architecture_names() -> None:
    runtime = runtime_metric_names()
    assert {"ling_runtime_num_queue_reqs", "ling_runtime_time_to_first_token_seconds_bucket"} <= runtime
    operator = operator_metric_names()
    assert {"ling_operator_reconcile_total", "ling_operator_leader"} <= operator


def test_every_dashboard_metric_is_exported() -> None:
    recorded = {r["record"] for r in recording_rules()}
    exported = runtime_metric_names() | operator_metric_names() | recorded
    used = set().union(*(promql_metric_names(e) for e in dashboard_expressions()))
    assert used, "the dashboard queries nothing"
    assert not used - exported, f"dashboard queries metrics nobody exports: {sorted(used - exported)}"
    # Serving panels read the recorded series, so they work for every engine.
    raw = {n for n in used if n.startswith(("ling_runtime_", "sglang:", "vllm:"))}
    assert not raw, f"dashboard reads one engine's names instead of ling:* series: {sorted(raw)}"


def test_recording_rules_read_only_names_their_engine_exports() -> None:
    engines: set[str] = set()
    for rule in recording_rules():
        engine = rule["labels"]["ling_engine"]
        engines.add(engine)
        used = promql_metric_names(rule["expr"])
        assert used, f"{rule['record']} ({engine}) reads no metric"
        foreign = used - engine_exported_names(engine)
        assert not foreign, (
            f"{rule['record']} ({engine}) reads {sorted(foreign)}, which {engine} does not export"
        )
    assert engines == {"native", "sglang", "vllm"}


def test_every_engine_name_kept_as_data_is_read_by_a_rule() -> None:
    # The data file lists what the rules read, no more: a stale entry would hide a dropped mapping.
    read = set().union(*(promql_metric_names(r["expr"]) for r in recording_rules()))
    for engine in ("sglang", "vllm"):
        families = {
            family.name: {family.name + s for s in _SUFFIXES[family.type]}
            for family in engine_metric_names.registry(engine).collect()
        }
        unread = [name for name, samples in families.items() if not samples & read]
        assert not unread, f"{engine} metrics no rule reads: {unread}"


def test_recorded_series_are_read_with_the_labels_the_rules_keep() -> None:
    recorded = {r["record"] for r in recording_rules()}
    for expr in dashboard_expressions() + list(alert_expressions().values()):
        if promql_metric_names(expr) & recorded:
            # label_replace's target may be grouped on; the operator metric's labels are checked below.
            extra = promql_label_names(expr) - RECORDED_LABELS - {"deployment"}
            assert not extra, f"{expr} uses labels the recording rules drop: {sorted(extra)}"


def test_every_alert_metric_is_exported() -> None:
    recorded = {r["record"] for r in recording_rules()}
    exported = runtime_metric_names() | operator_metric_names() | recorded
    for alert, expr in alert_expressions().items():
        used = promql_metric_names(expr)
        assert used, f"{alert} queries no metric"
        assert not used - exported, f"{alert} queries metrics nobody exports: {sorted(used - exported)}"


def _operator_labelnames() -> dict[str, set[str]]:
    """Exposed sample name -> the label names the operator's code gives it."""
    module = importlib.import_module("ling_operator.metrics")
    names: dict[str, set[str]] = {}
    for value in vars(module).values():
        if isinstance(value, MetricWrapperBase):
            for suffix in _SUFFIXES[value._type]:
                names[value._name + suffix] = set(value._labelnames)
    return names


def promql_label_names(expr: str) -> set[str]:
    """Label names an expression groups by or matches on."""
    labels = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return labels


def test_operator_labels_the_queries_use_are_labels_the_operator_sets() -> None:
    # `namespace`, `job`, `pod` also come from the scrape target; the others only from the operator.
    labelnames = _operator_labelnames()
    own = set().union(*labelnames.values()) - {"namespace"}
    for expr in dashboard_expressions() + list(alert_expressions().values()):
        used = promql_label_names(expr) & own
        for metric in promql_metric_names(expr) & labelnames.keys():
            missing = used - labelnames[metric]
            assert not missing, f"{metric} has no label {sorted(missing)}, which this query uses: {expr}"


def test_the_label_reader_finds_grouping_and_matcher_labels() -> None:
    expr = 'sum by (namespace, deployment) (rate(x_total{result="error", le!~"1"}[5m])) / on(pod) y'
    assert promql_label_names(expr) == {"namespace", "deployment", "result", "le", "pod"}
