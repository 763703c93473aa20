"""Pure helpers of the operator benchmark: audit-log counting, /proc accounting, the results table.

Nothing here talks to a cluster, so tests/bench/test_operator_bench.py can check it on fixed inputs.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

READ_VERBS = frozenset({"get", "list", "watch"})
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
# Leader-election renewals are writes every controller makes while it leads; they are counted apart
# so that "steady-state writes" means writes to the objects the controller manages.
LEASE_RESOURCE = "leases"


def parse_time(stamp: str) -> float:
    """RFC 3339 timestamp of the audit log ("2026-11-29T01:02:03.123456Z") -> Unix seconds."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class Request:
    """One API request of the audit log (one auditID, whatever stages were logged for it)."""

    user: str
    verb: str
    resource: str
    subresource: str
    namespace: str
    received: float  # Unix seconds

    @property
    def is_write(self) -> bool:
        return self.verb in WRITE_VERBS

    @property
    def is_lease(self) -> bool:
        return self.resource == LEASE_RESOURCE


def read_audit(lines: Iterable[str], users: Iterable[str]) -> list[Request]:
    """Requests of `users`, one per auditID, from audit log lines (JSON events, any stages)."""
    wanted = set(users)
    seen: set[str] = set()
    out: list[Request] = []
    for line in lines:
        # A cheap filter first: the log also holds every other user's requests at level None (absent)
        # or Metadata, and json.loads of each line dominates the parse time at N = 1000.
        if not any(u in line for u in wanted):
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a concurrent write at the end of the file
        user = (event.get("user") or {}).get("username", "")
        audit_id = event.get("auditID", "")
        if user not in wanted or audit_id in seen:
            continue
        seen.add(audit_id)
        ref = event.get("objectRef") or {}
        out.append(
            Request(
                user=user,
                verb=event.get("verb", ""),
                resource=ref.get("resource", ""),
                subresource=ref.get("subresource", ""),
                namespace=ref.get("namespace", ""),
                received=parse_time(event["requestReceivedTimestamp"]),
            )
        )
    return out


def read_audit_file(path: Path, users: Iterable[str], offset: int = 0) -> list[Request]:
    """`read_audit` over a file from byte `offset` (0 when the file has since been rotated)."""
    with path.open("rb") as f:
        f.seek(offset if offset <= path.stat().st_size else 0)
        return read_audit((raw.decode("utf-8", "replace") for raw in f), users)


def read_audit_since(log: Path, users: Iterable[str], since: float) -> list[Request]:
    """Requests of `users` received at or after `since`, from `log` and the files the API server
    rotated it into (audit-<time>.log beside it, 100 MB each): a long run spans a rotation."""
    wanted = list(users)
    out: list[Request] = []
    for f in sorted(log.parent.glob(f"{log.stem}*{log.suffix}")):
        if f.stat().st_mtime >= since:
            out += [r for r in read_audit_file(f, wanted) if r.received >= since]
    return out


def count(requests: Iterable[Request], user: str, start: float, end: float) -> dict[str, Any]:
    """Counts of `user`'s requests received in [start, end): totals, reads, writes, by verb+resource."""
    picked = [r for r in requests if r.user == user and start <= r.received < end]
    writes = [r for r in picked if r.is_write]
    by_kind = Counter(f"{r.verb} {r.resource}{'/' + r.subresource if r.subresource else ''}" for r in picked)
    return {
        "total": len(picked),
        "reads": sum(1 for r in picked if r.verb in READ_VERBS),
        "writes": sum(1 for r in writes if not r.is_lease),
        "lease_writes": sum(1 for r in writes if r.is_lease),
        "by_kind": dict(by_kind.most_common()),
    }


# -- /proc accounting of a process tree -------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    cpu_seconds: float  # utime + stime + the reaped children's cutime + cstime
    rss_bytes: int


def parse_stat(text: str, statm: str) -> ProcStat:
    """One process from the text of /proc/<pid>/stat and /proc/<pid>/statm."""
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    pid = int(text.split(" ", 1)[0])
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): field k is rest[k - 3].
    ppid = int(rest[1])
    ticks = sum(int(rest[i]) for i in (11, 12, 13, 14))  # utime, stime, cutime, cstime
    resident_pages = int(statm.split()[1])
    return ProcStat(pid, ppid, ticks / CLOCK_TICKS, resident_pages * PAGE_SIZE)


def read_proc(pid: int, proc: Path = Path("/proc")) -> ProcStat | None:
    try:
        return parse_stat((proc / str(pid) / "stat").read_text(), (proc / str(pid) / "statm").read_text())
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None  # gone between listing and reading


def peak_rss(pid: int, proc: Path = Path("/proc")) -> int:
    """The kernel's own high-water mark of one process's RSS (VmHWM), in bytes; 0 when gone."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def tree(root: int, stats: Mapping[int, ProcStat]) -> list[ProcStat]:
    """`root` and all its descendants among `stats`."""
    children: dict[int, list[int]] = {}
    for s in stats.values():
        children.setdefault(s.ppid, []).append(s.pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out.append(stats[pid])
        todo.extend(children.get(pid, []))
    return out


def snapshot(root: int, proc: Path = Path("/proc")) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of the process tree under `root`, summed."""
    stats: dict[int, ProcStat] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            s = read_proc(int(entry.name), proc)
            if s is not None:
                stats[s.pid] = s
    members = tree(root, stats)
    return sum(s.cpu_seconds for s in members), sum(s.rss_bytes for s in members)


# -- results ----------------------------------------------------------------------------------------------

OURS = "ours"
PEERS = ("kuberay", "lws")
# (key in a run record, column title, lower is better): the metrics that get a ratio.
RATIO_METRICS: tuple[tuple[str, str], ...] = (
    ("pods_exist_s", "pods exist (s)"),
    ("pods_running_s", "pods Running (s)"),
    ("status_ready_s", "status ready (s)"),
    ("api_requests", "API requests"),
    ("cpu_s", "CPU (s)"),
    ("peak_rss_mib", "peak RSS (MiB)"),
)


@dataclass
class Run:
    """One controller at one N: what run.py measured (see README for the definitions)."""

    controller: str
    n: int
    pods_exist_s: float | None
    pods_running_s: float | None
    api_requests: int
    api_writes: int
    cpu_s: float
    peak_rss_mib: float
    steady_writes: int
    steady_lease_writes: int
    steady_requests: int
    steady_window_s: float
    detail: dict[str, Any] = field(default_factory=dict)
    status_ready_s: float | None = None  # until every object's own status said ready


def _median(values: list[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    if len(known) < len(values):
        return None  # a repetition that timed out: no honest median
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else round((known[mid - 1] + known[mid]) / 2, 2)


def combine(first: Run, extras: Sequence[Run]) -> Run:
    """One row from a full run plus timed-only repetitions: medians of the times, requests and CPU,
    the highest peak RSS; the quiet-window numbers come from the full run alone."""
    if not extras:
        return first
    every = [first, *extras]
    median_requests = _median([float(r.api_requests) for r in every])
    median_writes = _median([float(r.api_writes) for r in every])
    return Run(
        controller=first.controller,
        n=first.n,
        pods_exist_s=_median([r.pods_exist_s for r in every]),
        pods_running_s=_median([r.pods_running_s for r in every]),
        status_ready_s=_median([r.status_ready_s for r in every]),
        api_requests=round(median_requests or 0),
        api_writes=round(median_writes or 0),
        cpu_s=_median([r.cpu_s for r in every]) or 0.0,
        peak_rss_mib=max(r.peak_rss_mib for r in every),
        steady_writes=first.steady_writes,
        steady_lease_writes=first.steady_lease_writes,
        steady_requests=first.steady_requests,
        steady_window_s=first.steady_window_s,
        detail={
            **first.detail,
            "repetitions": [
                {
                    "pods_exist_s": r.pods_exist_s,
                    "pods_running_s": r.pods_running_s,
                    "status_ready_s": r.status_ready_s,
                    "api_requests": r.api_requests,
                    "cpu_s": r.cpu_s,
                    "peak_rss_mib": r.peak_rss_mib,
                }
                for r in every
            ],
        },
    )


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def ratios(runs: Sequence[Run]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{n: {"ours/kuberay": {metric: ours / peer}, "ours/lws": {...}}} for every N that has both."""
    by = {(r.controller, r.n): r for r in runs}
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for n in sorted({r.n for r in runs}):
        ours = by.get((OURS, n))
        if ours is None:
            continue
        for peer in PEERS:
            other = by.get((peer, n))
            if other is None:
                continue
            out.setdefault(str(n), {})[f"ours/{peer}"] = {
                key: ratio(getattr(ours, key), getattr(other, key)) for key, _ in RATIO_METRICS
            }
    return out


def _fmt(v: float | int | None, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def table(runs: Sequence[Run]) -> str:
    """The markdown table: one row per (N, controller), then the ratio rows of each N."""
    head = (
        "| N | controller | pods exist (s) | pods Running (s) | status ready (s) | API requests | writes | CPU (s) "
        "| peak RSS (MiB) | steady writes / min | lease writes / min | steady requests / min |"
    )
    lines = [head, "|" + "---|" * 12]
    rats = ratios(runs)
    order = {OURS: 0, **{p: i + 1 for i, p in enumerate(PEERS)}}
    for n in sorted({r.n for r in runs}):
        for r in sorted((r for r in runs if r.n == n), key=lambda r: order.get(r.controller, 9)):
            per_min = 60.0 / r.steady_window_s if r.steady_window_s else 0.0
            lines.append(
                f"| {n} | {r.controller} | {_fmt(r.pods_exist_s)} | {_fmt(r.pods_running_s)} "
                f"| {_fmt(r.status_ready_s)} "
                f"| {r.api_requests} | {r.api_writes} | {_fmt(r.cpu_s)} | {_fmt(r.peak_rss_mib, 0)} "
                f"| {_fmt(r.steady_writes * per_min, 0)} | {_fmt(r.steady_lease_writes * per_min, 0)} "
                f"| {_fmt(r.steady_requests * per_min, 0)} |"
            )
        for name, values in rats.get(str(n), {}).items():
            cells = [_fmt(values[key], 2) for key, _ in RATIO_METRICS]
            lines.append(
                f"| {n} | *{name}* | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | | {cells[4]} "
                f"| {cells[5]} | | | |"
            )
    return "\n".join(lines) + "\n"


# -- py-spy profiles ------------------------------------------------------------------------------------

# What our operator's time is made of: (label, a frame substring). Shares are of the samples whose stack
# passes through the anchor (any frame of the operator's own code: the passes on the event loop and the
# API calls on its I/O threads), idle samples included, so waiting for the API server shows up as the
# requests' share. Samples in kopf's own machinery (watch streams, per-event processing) are counted
# apart, in "kopf".
SYNC_ANCHOR = "ling_operator/"
SYNC_PARTS: tuple[tuple[str, str], ...] = (
    ("LISTs", "list_"),
    ("create pods", "create_pod (ling_operator/kube.py"),
    ("create services", "create_service (ling_operator/kube.py"),
    ("post events", "create_event (ling_operator/kube.py"),
    ("patch status", "patch_status (ling_operator/kube.py"),
    ("reconcile.reconcile (pure)", "reconcile (ling_operator/reconcile.py"),
    ("autoscale tick", "autoscale_tick (ling_operator/autoscale_controller.py"),
    ("watch cache", "ling_operator/cache.py"),
    ("waiting on the socket", "recv_into ("),
    ("TLS/HTTP client (urllib3)", "urllib3/"),
    ("JSON (de)serialisation", "json/"),
)
KOPF = "kopf/"


def profile_shares(lines: Iterable[str], anchor: str = SYNC_ANCHOR) -> dict[str, Any]:
    """Shares of py-spy `--format raw` samples (collapsed stacks: "f1;f2;... COUNT") under `anchor`."""
    total = under = kopf = 0
    parts: Counter[str] = Counter()
    for line in lines:
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count_ = int(n)
        total += count_
        if anchor not in stack:
            kopf += count_ if KOPF in stack else 0
            continue
        under += count_
        for label, needle in SYNC_PARTS:
            if needle in stack:
                parts[label] += count_
    return {
        "samples": total,
        "anchor_samples": under,
        "kopf_samples": kopf,
        "shares": {label: round(parts[label] / under, 3) if under else 0.0 for label, _ in SYNC_PARTS},
    }
