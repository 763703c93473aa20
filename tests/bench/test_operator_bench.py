"""The operator benchmark's pure helpers: audit-log counting, /proc parsing, the table and ratios."""

from __future__ import annotations

import json
from pathlib import Path

from bench.operator import controllers, measure, workloads


def _event(
    audit_id: str, user: str, verb: str, resource: str, at: str, stage: str = "ResponseComplete", **ref: str
) -> str:
    return json.dumps(
        {
            "kind": "Event",
            "level": "Metadata",
            "auditID": audit_id,
            "stage": stage,
            "verb": verb,
            "user": {"username": user},
            "objectRef": {"resource": resource, **ref},
            "requestReceivedTimestamp": at,
            "stageTimestamp": at,
        }
    )


def test_read_audit_counts_each_request_once_and_only_wanted_users() -> None:
    lines = [
        # A watch logs ResponseStarted and later ResponseComplete under one auditID: one request.
        _event("w1", "bench:ours", "watch", "pods", "2026-11-29T01:00:00.000000Z", stage="ResponseStarted"),
        _event("w1", "bench:ours", "watch", "pods", "2026-11-29T01:00:00.000000Z"),
        _event("c1", "bench:ours", "create", "pods", "2026-11-29T01:00:01.500000Z"),
        _event("s1", "bench:ours", "patch", "lingdeployments", "2026-11-29T01:00:02Z", subresource="status"),
        _event("l1", "bench:ours", "update", "leases", "2026-11-29T01:00:03Z"),
        _event("x1", "bench:kuberay", "create", "pods", "2026-11-29T01:00:01Z"),
        "{not json",
    ]
    reqs = measure.read_audit(lines, ["bench:ours"])
    assert [r.verb for r in reqs] == ["watch", "create", "patch", "update"]
    start = measure.parse_time("2026-11-29T01:00:00Z")
    c = measure.count(reqs, "bench:ours", start, start + 10)
    assert (c["total"], c["reads"], c["writes"], c["lease_writes"]) == (4, 1, 2, 1)
    assert c["by_kind"]["patch lingdeployments/status"] == 1
    # The window is half-open on received time.
    assert measure.count(reqs, "bench:ours", start + 1.5, start + 3)["total"] == 2


def test_read_audit_file_from_offset(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    first = _event("a", "bench:lws", "get", "pods", "2026-11-29T01:00:00Z") + "\n"
    log.write_text(first + _event("b", "bench:lws", "delete", "pods", "2026-11-29T01:00:01Z") + "\n")
    assert [r.verb for r in measure.read_audit_file(log, ["bench:lws"], offset=len(first))] == ["delete"]


def test_parse_stat_handles_spaces_and_parens_in_the_name() -> None:
    fields = ["S", "41"] + ["0"] * 9 + ["150", "50", "30", "20"] + ["0"] * 30
    stat = f"1234 (my (weird) proc) {' '.join(fields)}"
    s = measure.parse_stat(stat, "1000 256 0 0 0 0 0")
    assert (s.pid, s.ppid) == (1234, 41)
    assert s.cpu_seconds == (150 + 50 + 30 + 20) / measure.CLOCK_TICKS
    assert s.rss_bytes == 256 * measure.PAGE_SIZE


def test_tree_collects_descendants_only() -> None:
    stats = {
        p: measure.ProcStat(p, pp, 1.0, 10)
        for p, pp in [(1, 0), (10, 1), (11, 10), (12, 10), (20, 1), (30, 5)]
    }
    assert sorted(s.pid for s in measure.tree(10, stats)) == [10, 11, 12]


def _run(kind: str, n: int, t: float, req: int, cpu: float, rss: float) -> measure.Run:
    return measure.Run(kind, n, t / 2, t, req, req // 2, cpu, rss, 0, 12, req, 60.0, status_ready_s=t + 1)


def test_ratios_and_table() -> None:
    runs = [
        _run("ours", 100, 10.0, 600, 5.0, 150.0),
        _run("kuberay", 100, 20.0, 300, 2.0, 75.0),
        _run("lws", 100, 5.0, 1200, 0.0, 50.0),
        _run("ours", 1000, 100.0, 6000, 50.0, 250.0),
    ]
    r = measure.ratios(runs)
    assert set(r) == {"100"}  # N = 1000 has no peer to compare with
    assert r["100"]["ours/kuberay"] == {
        "pods_exist_s": 0.5,
        "pods_running_s": 0.5,
        "status_ready_s": 0.524,
        "api_requests": 2.0,
        "cpu_s": 2.5,
        "peak_rss_mib": 2.0,
    }
    assert r["100"]["ours/lws"]["cpu_s"] is None  # no ratio against zero
    text = measure.table(runs)
    assert text.count("\n") == 2 + 3 + 2 + 1
    assert "| 100 | *ours/kuberay* | 0.50 | 0.50 | 0.52 | 2.00 |" in text
    assert "| 1000 | ours | 50.0 | 100.0 | 101.0 | 6000 | 3000 | 50.0 | 250 | 0 | 12 | 6000 |" in text


def test_lws_webhooks_point_at_loopback(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests.yaml"
    manifests.write_text(
        "apiVersion: admissionregistration.k8s.io/v1\nkind: MutatingWebhookConfiguration\n"
        "metadata: {name: m}\nwebhooks:\n- name: mpod.kb.io\n  clientConfig:\n"
        "    service: {name: webhook-service, namespace: system, path: /mutate--v1-pod}\n"
    )
    (doc,) = controllers.lws_webhooks(manifests, "Q0E=", 29443)
    hook = doc["webhooks"][0]
    assert doc["metadata"]["name"] == "bench-lws-m"
    assert hook["clientConfig"] == {"url": "https://127.0.0.1:29443/mutate--v1-pod", "caBundle": "Q0E="}
    assert hook["namespaceSelector"] == {"matchLabels": {controllers.LWS_NS_LABEL: "true"}}


def test_is_ready_reads_each_controllers_own_status() -> None:
    assert workloads.is_ready("kuberay", {"status": {"state": "ready"}})
    assert not workloads.is_ready("kuberay", {"status": {}})
    assert workloads.is_ready("lws", {"spec": {"replicas": 1}, "status": {"readyReplicas": 1}})
    assert not workloads.is_ready("ours", {"spec": {"replicas": 2}, "status": {"readyReplicas": 1}})


def test_every_workload_is_one_group_of_two_one_gpu_pods() -> None:
    ld = workloads.lingdeployment("a", "ns")["spec"]
    assert (ld["replicas"], ld["parallelism"]) == (1, {"tensor": 2, "gpusPerPod": 1})
    rc = workloads.raycluster("a", "ns")["spec"]
    assert rc["workerGroupSpecs"][0]["replicas"] == 1
    lws = workloads.leaderworkerset("a", "ns")["spec"]
    assert (lws["replicas"], lws["leaderWorkerTemplate"]["size"]) == (1, 2)
    assert workloads.RESOURCES["requests"]["nvidia.com/gpu"] == "1"


def test_profile_shares_counts_samples_under_the_anchor() -> None:
    io = "thread (0x1);_worker (concurrent/futures/thread.py:1);create_pod (ling_operator/kube.py:80)"
    loop = "thread (0x2);_run_once (asyncio/base_events.py:1);sync (ling_operator/controller.py:200)"
    lines = [
        f"{io};create_namespaced_pod (kubernetes/api.py:5);recv_into (ssl.py:1) 30",
        f"{loop};reconcile (ling_operator/reconcile.py:400) 10",
        "thread (0x2);process_resource_event (kopf/_core/reactor/processing.py:31) 20",
        "thread (0x3);select (selectors.py:1) 40",
        "garbage",
    ]
    p = measure.profile_shares(lines)
    assert (p["samples"], p["anchor_samples"], p["kopf_samples"]) == (100, 40, 20)
    assert p["shares"]["create pods"] == 0.75
    assert p["shares"]["waiting on the socket"] == 0.75
    assert p["shares"]["reconcile.reconcile (pure)"] == 0.25
    assert p["shares"]["patch status"] == 0.0


def test_combine_takes_medians_of_the_timed_part_and_keeps_the_quiet_window() -> None:
    first = measure.Run("ours", 100, 10.0, 11.0, 2000, 900, 4.0, 150.0, 0, 12, 600, 60.0, {"a": 1})
    extras = [_run("ours", 100, 20.0, 1000, 2.0, 160.0), _run("ours", 100, 8.0, 3000, 6.0, 140.0)]
    r = measure.combine(first, extras)
    assert (r.pods_running_s, r.api_requests, r.cpu_s, r.peak_rss_mib) == (11.0, 2000, 4.0, 160.0)
    assert (r.steady_requests, r.steady_window_s, r.detail["a"]) == (600, 60.0, 1)
    assert len(r.detail["repetitions"]) == 3
    timed_out = measure.Run("ours", 100, None, None, 0, 0, 0.0, 0.0, 0, 0, 0, 0.0)
    assert measure.combine(first, [timed_out]).pods_running_s is None
    assert measure.combine(first, []) is first


def test_read_audit_since_spans_a_rotation(tmp_path: Path) -> None:
    rotated = tmp_path / "audit-2026-11-29T01-52-40.657.log"
    rotated.write_text(
        _event("old", "bench:ours", "get", "pods", "2026-11-29T01:00:00Z")
        + "\n"
        + _event("a", "bench:ours", "create", "pods", "2026-11-29T01:50:00Z")
        + "\n"
    )
    (tmp_path / "audit.log").write_text(
        _event("b", "bench:ours", "patch", "pods", "2026-11-29T01:53:00Z") + "\n"
    )
    since = measure.parse_time("2026-11-29T01:30:00Z")
    reqs = measure.read_audit_since(tmp_path / "audit.log", ["bench:ours"], since=0)
    assert [r.verb for r in reqs if r.received >= since] == ["create", "patch"]
    # A byte offset from before the rotation is past the end of the new file: read it whole.
    assert [
        r.verb for r in measure.read_audit_file(tmp_path / "audit.log", ["bench:ours"], offset=10**9)
    ] == ["patch"]
