"""docs/observability.md's engine-metric table says what the recording rules do, and the PodMonitor
scrapes exactly the pods that serve /metrics (rank 0 of each group, as the operator labels it)."""

from __future__ import annotations

import re
from typing import Any

from ling_operator import resources

from .chart_tools import MATRIX, ROOT, one, render
from .test_metric_names import promql_metric_names, recording_rules

DOC = ROOT / "docs" / "observability.md"
ENGINE_COLUMNS = ("native", "sglang", "vllm")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def mapping_table() -> dict[str, dict[str, str]]:
    """recorded series -> {engine: table cell} from the doc's table of recorded series."""
    table: dict[str, dict[str, str]] = {}
    for line in DOC.read_text().splitlines():
        if line.startswith("| `ling:"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == 4, f"malformed row: {line}"
            table[cells[0].strip("`")] = dict(zip(ENGINE_COLUMNS, cells[1:], strict=True))
    return table


def _base(name: str) -> str:
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_the_doc_table_lists_what_each_engines_rule_reads() -> None:
    table = mapping_table()
    read: dict[tuple[str, str], set[str]] = {}
    for rule in recording_rules():
        key = (rule["record"], rule["labels"]["ling_engine"])
        read.setdefault(key, set()).update(_base(n) for n in promql_metric_names(rule["expr"]))
    assert set(table) == {record for record, _ in read}, (
        "the doc's table and the rules record different series"
    )
    for record, cells in table.items():
        for engine, cell in cells.items():
            names = read.get((record, engine))
            if names is None:
                assert cell.startswith("—"), f"{record}: no {engine} rule, but the doc says {cell!r}"
                continue
            documented = {_base(n) for n in re.findall(r"`([a-z0-9_:]+)`", cell)}
            assert documented == names, (
                f"{record} ({engine}): the doc says {sorted(documented)}, rule reads {sorted(names)}"
            )


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def _meta_label(key: str) -> str:
    # How Prometheus' Kubernetes discovery names a pod label.
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def test_pod_monitor_scrapes_rank_0_and_no_worker() -> None:
    monitor = one(render(MATRIX["monitoring"]), "PodMonitor")
    head = resources.pod_labels("chat", 0, 0, "rev")
    worker = resources.pod_labels("chat", 0, 1, "rev")
    assert _matches(monitor["spec"]["selector"], head)
    assert not _matches(monitor["spec"]["selector"], worker)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    # The group identity the recording rules keep comes from labels the operator really sets.
    sources = {s for r in endpoint["relabelings"] for s in r["sourceLabels"]}
    assert sources <= {_meta_label(k) for k in head}, sorted(sources - {_meta_label(k) for k in head})
    targets = {r["targetLabel"] for r in endpoint["relabelings"]}
    assert {"ling_deployment", "ling_group"} <= targets
