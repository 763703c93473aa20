"""Operator at scale: ours vs KubeRay vs LeaderWorkerSet on one local control plane.

    python -m bench.operator.run --n 1,10,100 --ours-only 1000

For each N and controller: start the controller (its own identity), wait until it leads, create N
objects of one 2-pod group each, time until all 2N pods exist and until all are Running, let it
settle, then watch a quiet minute; count its API requests from the audit log and its CPU and peak
RSS from /proc. Writes bench/results/operator-<date>.json and bench/results/operator.md.
See bench/operator/README.md for the definitions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from bench.operator import cluster as cl
from bench.operator import controllers, measure, workloads

RESULTS = cl.ROOT / "bench" / "results"


class Sampler(threading.Thread):
    """Samples the controller's process tree: CPU seconds now, and the peak of its summed RSS."""

    def __init__(self, pid: int, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak_rss = 0
        self.stopped = threading.Event()

    def cpu(self) -> float:
        cpu, rss = measure.snapshot(self.pid)
        self.peak_rss = max(self.peak_rss, rss)
        return cpu

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            self.cpu()


class PodWatch(threading.Thread):
    """Watches the pods of one namespace; records when each pod was first seen and first Running."""

    def __init__(self, core: client.CoreV1Api, namespace: str, expected: int) -> None:
        super().__init__(daemon=True)
        self.core, self.namespace, self.expected = core, namespace, expected
        self.seen: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self.all_exist = threading.Event()
        self.all_running = threading.Event()
        self.stopped = threading.Event()

    def _note(self, pod: Any) -> None:
        now = time.time()
        name = pod.metadata.name
        self.seen.setdefault(name, now)
        if pod.status and pod.status.phase == "Running":
            self.running.setdefault(name, now)
        if len(self.seen) >= self.expected:
            self.all_exist.set()
        if len(self.running) >= self.expected:
            self.all_running.set()

    def run(self) -> None:
        rv = self.core.list_namespaced_pod(self.namespace).metadata.resource_version
        while not self.stopped.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(
                    self.core.list_namespaced_pod, self.namespace, resource_version=rv, timeout_seconds=30
                ):
                    pod = ev["object"]
                    rv = pod.metadata.resource_version
                    if ev["type"] in ("ADDED", "MODIFIED"):
                        self._note(pod)
                    if self.stopped.is_set():
                        break
            except ApiException as exc:
                if exc.status == 410:  # too old: relist
                    pods = self.core.list_namespaced_pod(self.namespace)
                    for pod in pods.items:
                        self._note(pod)
                    rv = pods.metadata.resource_version
                else:
                    raise


class ReadyWatch(threading.Thread):
    """Watches the workload objects of one namespace; records when each first says it is ready."""

    def __init__(self, custom: client.CustomObjectsApi, kind: str, namespace: str, expected: int) -> None:
        super().__init__(daemon=True)
        self.custom, self.kind, self.namespace, self.expected = custom, kind, namespace, expected
        self.ready: dict[str, float] = {}
        self.all_ready = threading.Event()
        self.stopped = threading.Event()

    def _note(self, obj: dict[str, Any]) -> None:
        if workloads.is_ready(self.kind, obj):
            self.ready.setdefault(obj["metadata"]["name"], time.time())
        if len(self.ready) >= self.expected:
            self.all_ready.set()

    def run(self) -> None:
        _, group, version, plural = workloads.OBJECTS[self.kind]
        args = (group, version, self.namespace, plural)
        rv = self.custom.list_namespaced_custom_object(*args)["metadata"]["resourceVersion"]
        while not self.stopped.is_set():
            try:
                for ev in watch.Watch().stream(
                    self.custom.list_namespaced_custom_object, *args, resource_version=rv, timeout_seconds=30
                ):
                    obj = ev["object"]
                    rv = obj["metadata"]["resourceVersion"]
                    if ev["type"] in ("ADDED", "MODIFIED"):
                        self._note(obj)
                    if self.stopped.is_set():
                        break
            except ApiException as exc:
                if exc.status != 410:
                    raise
                listed = self.custom.list_namespaced_custom_object(*args)
                for obj in listed["items"]:
                    self._note(obj)
                rv = listed["metadata"]["resourceVersion"]


def wait_for(event: threading.Event, timeout: float, alive: Callable[[], bool]) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if event.wait(1):
            return True
        if not alive():
            return False
    return False


def create_objects(api: client.CustomObjectsApi, kind: str, namespace: str, n: int) -> None:
    build, group, version, plural = workloads.OBJECTS[kind]

    def one(i: int) -> None:
        api.create_namespaced_custom_object(group, version, namespace, plural, build(f"g{i:04d}", namespace))

    # A few in parallel, as `kubectl apply -f` of many files would: the harness must not be the bottleneck.
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, range(n)))


def delete_namespace(core: client.CoreV1Api, name: str, timeout: float) -> bool:
    try:
        core.delete_namespace(name)
    except ApiException as exc:
        if exc.status != 404:
            raise
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            core.read_namespace(name)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        time.sleep(2)
    return False


def operator_fingerprint() -> str:
    """A short hash of our operator's code and CRD as the run saw them (the tree changes under us)."""
    h = hashlib.sha256()
    for f in sorted((cl.ROOT / "operator" / "ling_operator").glob("*.py")) + sorted(
        (cl.ROOT / "crds").glob("*.yaml")
    ):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def py_spy() -> str | None:
    # Beside this Python first (`pip install py-spy` into the venv), then PATH.
    beside = Path(sys.executable).with_name("py-spy")
    if beside.is_file():
        return str(beside)
    found = shutil.which("py-spy")
    if found:
        return found
    cached = sorted(cl.CACHE.glob("tools/py-spy-*/bin/py-spy"))
    return str(cached[-1]) if cached else None


def start_profile(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy on our operator (all threads, idle samples too, so waiting on the API shows)."""
    exe = py_spy()
    if exe is None:
        print("[bench] --profile: py-spy not found (pip install py-spy); not profiling")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--rate",
        "100",
        "--idle",
        "--format",
        "raw",
        "--output",
        str(out),
    ]
    return subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def stop_profile(proc: subprocess.Popen[bytes] | None, out: Path) -> dict[str, Any] | None:
    if proc is None:
        return None
    proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None
    if not out.exists():
        return None
    with out.open() as f:
        return {"file": str(out), **measure.profile_shares(f)}


def run_one(
    c: cl.Cluster, kind: str, n: int, settle_s: float, steady_s: float, logs: Path, profile: bool = False
) -> measure.Run:
    api_client = config.new_client_from_config(config_file=str(cl.KUBECONFIG))
    core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
    namespace = f"bench-{kind}-{n}-{int(time.time())}"
    labels = {controllers.LWS_NS_LABEL: "true"} if kind == "lws" else {}
    core.create_namespace({"metadata": {"name": namespace, "labels": labels}})
    ctl = controllers.FACTORIES[kind](c, logs / f"n{n}")
    offset = cl.AUDIT_LOG.stat().st_size if cl.AUDIT_LOG.exists() else 0
    started = time.time()
    pid = ctl.start()
    sampler = Sampler(pid)
    sampler.start()
    detail: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "namespace": namespace,
        "log": str(ctl.log),
    }
    if kind == "ours":
        detail["operator_fingerprint"] = operator_fingerprint()
    spy: subprocess.Popen[bytes] | None = None
    spy_out = logs / f"n{n}" / f"{kind}-py-spy.txt"
    try:
        led = controllers.wait_leading(ctl, started, offset)
        time.sleep(2)  # let its informers finish their initial lists
        detail["start_to_lead_s"] = round(led - started, 2)
        pods = PodWatch(core, namespace, 2 * n)
        pods.start()
        objects = ReadyWatch(custom, kind, namespace, n)
        objects.start()
        if profile and kind == "ours":
            spy = start_profile(pid, spy_out)
            time.sleep(1)  # py-spy attaches
        time.sleep(0.5)
        cpu0, t0 = sampler.cpu(), time.time()
        create_objects(custom, kind, namespace, n)
        detail["create_s"] = round(time.time() - t0, 2)
        limit = 120 + 1.0 * n
        exist = wait_for(pods.all_exist, limit, ctl.alive)
        t_exist = max(pods.seen.values()) if exist else None
        running = exist and wait_for(pods.all_running, limit, ctl.alive)
        t_running = max(pods.running.values()) if running else None
        cpu_running = sampler.cpu()
        # The quiet window starts only once every object's own status says ready: until then the
        # controller is still catching up, not in a steady state.
        status_ok = running and wait_for(objects.all_ready, limit, ctl.alive)
        t_status = max(objects.ready.values()) if status_ok else None
        prof = stop_profile(spy, spy_out)
        spy = None
        if prof is not None:
            detail["profile"] = prof
        detail.update(pods_seen=len(pods.seen), pods_running=len(pods.running))
        print(
            f"[bench] {kind} N={n}: pods exist {('%.1f s' % (t_exist - t0)) if t_exist else 'TIMEOUT'}, "
            f"Running {('%.1f s' % (t_running - t0)) if t_running else 'TIMEOUT'}, "
            f"status ready {('%.1f s' % (t_status - t0)) if t_status else 'TIMEOUT'}; settling {settle_s:.0f} s, "
            f"then a quiet {steady_s:.0f} s",
            flush=True,
        )
        time.sleep(settle_s)
        cpu1, t1 = sampler.cpu(), time.time()
        time.sleep(steady_s)
        cpu2, t2 = sampler.cpu(), time.time()
        pods.stopped.set()
        objects.stopped.set()
        detail["vmhwm_mib"] = round(measure.peak_rss(pid) / 2**20, 1)  # the main process alone
        reqs = measure.read_audit_since(cl.AUDIT_LOG, [ctl.user], started)
        converge = measure.count(reqs, ctl.user, t0, t1)
        steady = measure.count(reqs, ctl.user, t1, t2)
        startup = measure.count(reqs, ctl.user, started, t0)
        detail.update(
            startup_requests=startup,
            converge_requests=converge,
            steady_requests_detail=steady,
            cpu_to_running_s=round(cpu_running - cpu0, 2),
            cpu_startup_s=round(cpu0, 2),
            cpu_steady_s=round(cpu2 - cpu1, 2),
            converge_window_s=round(t1 - t0, 1),
            windows={"started": started, "first_create": t0, "quiet_from": t1, "quiet_to": t2},
        )
        result = measure.Run(
            controller=kind,
            n=n,
            pods_exist_s=round(t_exist - t0, 2) if t_exist else None,
            pods_running_s=round(t_running - t0, 2) if t_running else None,
            status_ready_s=round(t_status - t0, 2) if t_status else None,
            api_requests=converge["total"],
            api_writes=converge["writes"],
            cpu_s=round(cpu1 - cpu0, 2),
            peak_rss_mib=round(sampler.peak_rss / 2**20, 1),
            steady_writes=steady["writes"],
            steady_lease_writes=steady["lease_writes"],
            steady_requests=steady["total"],
            steady_window_s=round(t2 - t1, 1),
            detail=detail,
        )
        # Clean up while the controller still runs (a finalizer of its own could otherwise block).
        if not delete_namespace(core, namespace, timeout=300 + n):
            print(f"[bench] warning: namespace {namespace} still terminating; going on")
        return result
    finally:
        if spy is not None:
            spy.kill()
        sampler.stopped.set()
        ctl.stop(c)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.operator.run", description=__doc__.split("\n")[0])
    p.add_argument("--n", default="1,10,100", help="comma-separated N for every controller")
    p.add_argument(
        "--ours-only", default="1000", help="comma-separated N for our operator alone ('' for none)"
    )
    p.add_argument("--controllers", default="ours,kuberay,lws", help="which controllers (ours,kuberay,lws)")
    p.add_argument(
        "--settle", type=float, default=20.0, help="seconds after all pods Running before the quiet window"
    )
    p.add_argument("--steady", type=float, default=60.0, help="seconds of the quiet (steady-state) window")
    p.add_argument(
        "--port", type=int, default=cl.DEFAULT_PORT, help="API server port of the benchmark cluster"
    )
    p.add_argument(
        "--keep-cluster", action="store_true", help="leave the benchmark cluster running afterwards"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="results JSON (default bench/results/operator-<date>.json)"
    )
    p.add_argument("--repeat", type=int, default=1, help="measure the timed part this many times (median)")
    p.add_argument("--repeat-at", default="100", help="comma-separated N that --repeat applies to")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the runs of an existing --out file that this invocation does not measure again",
    )
    p.add_argument(
        "--profile", action="store_true", help="py-spy our operator from first create to all Running"
    )
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        help="only re-render bench/results/operator.md from this results JSON",
    )
    args = p.parse_args(argv)
    if args.render is not None:
        doc = json.loads(args.render.read_text())
        runs = [measure.Run(**r) for r in doc["runs"]]
        write_docs(args.render, doc, runs)
        print(doc["table"])
        return 0

    ns = [int(x) for x in args.n.split(",") if x]
    ours_only = [int(x) for x in args.ours_only.split(",") if x]
    kinds = [k for k in args.controllers.split(",") if k]
    unknown = set(kinds) - set(workloads.KINDS)
    if unknown:
        raise SystemExit(f"unknown controllers: {', '.join(sorted(unknown))}")

    cl.run(["bash", str(cl.HACK / "build-tools.sh")], timeout=3600)
    if set(kinds) - {"ours"}:
        print("[bench] building peers (hack/build-bench-peers.sh) ...", flush=True)
        cl.run(["bash", str(cl.HACK / "build-bench-peers.sh")], timeout=3600)
    c = cl.Cluster(port=args.port)
    c.up(max(ns + ours_only))
    stamp = datetime.now(UTC)
    logs = cl.WORKDIR / "runs" / stamp.strftime("%Y%m%dT%H%M%SZ")
    plan = [(k, n) for n in ns for k in kinds] + [("ours", n) for n in ours_only if "ours" in kinds]
    out = args.out or RESULTS / f"operator-{stamp.strftime('%Y-%m-%d')}.json"
    kept: list[measure.Run] = []
    if args.merge and out.exists():
        kept = [
            measure.Run(**r)
            for r in json.loads(out.read_text())["runs"]
            if (r["controller"], r["n"]) not in plan
        ]
    runs: list[measure.Run] = []
    repeat_at = [n for n in (int(x) for x in args.repeat_at.split(",") if x) if n in ns]
    try:
        for kind, n in plan:
            print(f"[bench] {kind} N={n} ...", flush=True)
            runs.append(run_one(c, kind, n, args.settle, args.steady, logs, profile=args.profile))
            write(out, stamp, kept + runs, args, merged=bool(kept))
        # Repetitions of the timed part only (no quiet window), interleaved across controllers so
        # that a burst of load from elsewhere on the machine hits all of them alike.
        extras: dict[tuple[str, int], list[measure.Run]] = {}
        for rep in range(2, args.repeat + 1):
            for n in repeat_at:
                for kind in kinds:
                    print(f"[bench] {kind} N={n} (repetition {rep}) ...", flush=True)
                    extras.setdefault((kind, n), []).append(run_one(c, kind, n, 3.0, 0.0, logs / f"rep{rep}"))
            runs = [measure.combine(r, extras.get((r.controller, r.n), [])) for r in runs]
            write(out, stamp, kept + runs, args, merged=bool(kept))
    finally:
        if not args.keep_cluster:
            c.down()
    print(measure.table(kept + runs))
    print(f"[bench] wrote {out} and its table (bench/results/operator.md, or beside a scratch --out)")
    return 0


def write(
    out: Path, stamp: datetime, runs: list[measure.Run], args: argparse.Namespace, merged: bool = False
) -> None:
    v = cl.versions()
    doc = {
        "date": stamp.isoformat(timespec="seconds"),
        "command": "python -m bench.operator.run "
        f"--n {args.n} --ours-only '{args.ours_only}' --controllers {args.controllers} "
        f"--settle {args.settle:g} --steady {args.steady:g} --repeat {args.repeat} --repeat-at {args.repeat_at}",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {k: v[k] for k in ("K8S_VERSION", "KWOK_VERSION", "KUBERAY_VERSION", "LWS_VERSION")},
        "runs": [asdict(r) for r in runs],
    }
    if merged:
        doc["merged"] = (
            "--merge: runs not re-measured by this command were kept from the earlier file (detail.measured_at)"
        )
    write_docs(out, doc, runs)


def write_docs(out: Path, doc: dict[str, Any], runs: list[measure.Run]) -> None:
    """The results JSON at `out` and bench/results/operator.md, both from `runs`."""
    doc["ratios"], doc["table"] = measure.ratios(runs), measure.table(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    notes = doc.get("notes", "")
    # The checked-in table follows the checked-in results only: a scratch --out gets its own .md.
    md = RESULTS / "operator.md" if out.parent.resolve() == RESULTS.resolve() else out.with_suffix(".md")
    md.write_text(
        f"# Operator at scale ({doc['date']})\n\n`{doc['command']}` (see bench/operator/README.md for "
        f"what each column means).\n\n{doc['table']}" + (f"\n{notes}\n" if notes else "")
    )


if __name__ == "__main__":
    raise SystemExit(main())
