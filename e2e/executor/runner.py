"""The pod executor: a tiny kubelet for the local control plane (test infrastructure, not product).

It registers Nodes (no kwok annotation, so kwok leaves them alone; a `ling.dev/local-exec` taint so
only pods that ask land there), keeps them Ready with a Lease heartbeat, and runs every pod bound to
them: each pod gets its own loopback IP, its containers run as local process groups with the env a
kubelet would give them, probes run for real, and status goes back through the status subresource.
docs/e2e.md describes what is faithful and what is not.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from e2e.executor import podspec, procs

log = logging.getLogger("ling_e2e.executor")

LABEL_LOCAL_EXEC = "ling.dev/local-exec"
TAINT_KEY = "ling.dev/local-exec"
NODE_IP = "127.0.0.1"
LEASE_SECONDS = 40
HEARTBEAT_S = 10.0
LOOP_S = 0.5
MAX_GRACE_S = 30.0
# The kubelet's restart backoff is 10s doubling to 5 min; shortened so tests see restarts quickly.
RESTART_BACKOFF_S = (1.0, 20.0)
SMP = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
# Host env that a container may inherit (a container starts from its image's env; ours is this host).
PASS_ENV = ("HOME", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "VIRTUAL_ENV", "USER", "LOGNAME", "SHELL")


@dataclass
class Settings:
    nodes: list[str]
    kubeconfig: str | None = None
    pod_cidr: str = "127.61.0.0/16"
    cpu: str = "2"
    memory: str = "24Gi"
    max_pods: int = 32
    gpus: int = 0
    state_dir: Path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ling" / "executor"
    hosts_file: Path = Path("/etc/hosts")
    delete_nodes_on_exit: bool = True
    extra_labels: dict[str, str] = field(default_factory=dict)
    exit_after_api_loss_s: float = 120.0


def new_api_client(kubeconfig: str | None) -> client.ApiClient:
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    config.load_kube_config()
    return client.ApiClient()


class IpPool:
    """Unique loopback pod IPs from a CIDR inside 127.0.0.0/8, handed out round-robin."""

    def __init__(self, cidr: str) -> None:
        net = ipaddress.ip_network(cidr)
        if not net.subnet_of(ipaddress.ip_network("127.0.0.0/8")):  # type: ignore[arg-type]
            raise ValueError(f"--pod-cidr {cidr}: must lie inside 127.0.0.0/8 (pods listen on loopback only)")
        self._hosts = [str(ip) for ip in net.hosts() if not str(ip).endswith((".0", ".255", ".1"))]
        self._used: set[str] = set()
        self._next = 0
        self._lock = threading.Lock()

    def take(self, preferred: str | None = None) -> str:
        with self._lock:
            if preferred and preferred in self._hosts and preferred not in self._used:
                self._used.add(preferred)
                return preferred
            for _ in range(len(self._hosts)):
                ip = self._hosts[self._next % len(self._hosts)]
                self._next += 1
                if ip not in self._used:
                    self._used.add(ip)
                    return ip
        raise RuntimeError("pod IP pool exhausted")

    def give_back(self, ip: str) -> None:
        with self._lock:
            self._used.discard(ip)


class HostsFile:
    """A marked block of /etc/hosts that maps pods' stable DNS names to their loopback IPs."""

    def __init__(self, path: Path, block_id: str) -> None:
        self.path = path
        self.block_id = block_id
        self._lock = threading.Lock()
        self._last: list[tuple[str, list[str]]] | None = None

    def write(self, entries: list[tuple[str, list[str]]]) -> None:
        with self._lock:
            if entries == self._last:
                return
            lock_path = self.path.with_name(self.path.name + ".ling-lock")
            with open(lock_path, "a") as lock:
                # Several executors (a test session and `make run`) may share the file: one writer at a time.
                fcntl.flock(lock, fcntl.LOCK_EX)
                current = self.path.read_text() if self.path.exists() else ""
                text = podspec.render_hosts(current, self.block_id, entries)
                tmp = self.path.with_name(f".{self.path.name}.ling-{os.getpid()}")
                try:
                    tmp.write_text(text)
                    os.chmod(tmp, 0o644)
                    os.replace(tmp, self.path)  # atomic: a resolver never reads half a file
                except OSError:
                    # A bind-mounted /etc/hosts cannot be replaced; rewrite it in place instead.
                    tmp.unlink(missing_ok=True)
                    self.path.write_text(text)
            self._last = list(entries)


@dataclass
class ContainerRun:
    """What the executor knows of one container: its process, restarts and probe state."""

    spec: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    restart_count: int = 0
    last_state: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    exit_signal: int | None = None
    finished_at: str | None = None
    waiting_reason: str | None = "ContainerCreating"
    waiting_message: str | None = None
    ready: bool = False
    started: bool = False  # the startup probe passed (or there is none)
    next_start: float = 0.0
    done: bool = False  # terminated for good (restart policy says no more)
    probes: dict[str, ProbeState] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.spec["name"])


@dataclass
class ProbeState:
    spec: dict[str, Any]
    due: float
    successes: int = 0
    failures: int = 0
    ok: bool = False


class PodWorker(threading.Thread):
    """Runs one pod from start to deletion; one thread per pod, every wait bounded."""

    def __init__(self, executor: Executor, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.ex = executor
        self.pod = pod
        self.uid = str(meta["uid"])
        self.namespace = str(meta["namespace"])
        self.pod_name = str(meta["name"])
        self.node = str(pod["spec"]["nodeName"])
        self.marker = f"{self.node}/{self.uid}/"
        self.dir = executor.settings.state_dir / "pods" / self.uid
        # The pod's /tmp. Kept short: Ray puts unix sockets under it, and their paths must stay
        # under ~107 bytes (a state dir under ~/.cache plus a UID would not).
        self.tmp = Path("/tmp/lx") / self.uid[:13]
        self.log_dir = executor.settings.state_dir / "logs"
        self.ip = ""
        self.deleting = threading.Event()
        self.gone = threading.Event()  # the API object is already gone: no final delete needed
        self.stopped = threading.Event()
        self.mains: list[ContainerRun] = []
        self.init_done = False
        self.pod_failed_reason: tuple[str, str] | None = None
        self.start_time = podspec.now_rfc3339()
        self._conditions: dict[str, tuple[str, str]] = {}
        self._last_status: str = ""

    # --- lifecycle -------------------------------------------------------------------------------
    def update(self, pod: dict[str, Any]) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s/%s: executor error", self.namespace, self.pod_name)
        finally:
            self._cleanup()

    def _run(self) -> None:
        spec = self.pod["spec"]
        previous_ip = (self.pod.get("status") or {}).get("podIP")
        self.ip = self.ex.ips.take(previous_ip)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.mains = [ContainerRun(spec=dict(c)) for c in spec.get("containers") or []]
        self._report()
        self.ex.hosts_changed()
        log.info("pod %s/%s: ip %s", self.namespace, self.pod_name, self.ip)
        try:
            volumes = self._volumes()
            for c in self.mains:
                self._prepare(c, volumes)
        except (podspec.PodSpecError, ApiException, OSError) as exc:
            for c in self.mains:
                c.waiting_reason, c.waiting_message = "CreateContainerConfigError", str(exc)
            self._report()
            self._idle_until_deleted()
            return
        if not self._run_init_containers(volumes):
            self._report()
            self._idle_until_deleted()
            return
        self.init_done = True
        while not self.deleting.is_set() and not self.ex.stopping.is_set():
            now = time.monotonic()
            for c in self.mains:
                self._tend(c, now)
            self._report()
            self.deleting.wait(LOOP_S)

    def _idle_until_deleted(self) -> None:
        while not self.deleting.is_set() and not self.ex.stopping.is_set():
            self.deleting.wait(1.0)

    def _cleanup(self) -> None:
        grace = self._grace_seconds()
        for c in self.mains:
            c.ready = False
        with contextlib.suppress(Exception):
            if not self.gone.is_set():
                self._report()
        pgids = [c.proc.pid for c in self.mains if c.proc is not None and c.proc.poll() is None]
        procs.signal_once(pgids, self.marker, signal.SIGTERM)
        procs.terminate(None, self.marker, grace, term=False)
        for pgid in pgids:
            procs.terminate(pgid, self.marker, 0)
        for c in self.mains:
            if c.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(timeout=5)
        if self.deleting.is_set() and not self.gone.is_set():
            # As the kubelet does: once the processes are gone, finish the graceful deletion.
            with contextlib.suppress(ApiException):
                self.ex.core.delete_namespaced_pod(
                    self.pod_name,
                    self.namespace,
                    grace_period_seconds=0,
                    body=client.V1DeleteOptions(
                        grace_period_seconds=0, preconditions=client.V1Preconditions(uid=self.uid)
                    ),
                )
        if self.ip:
            self.ex.ips.give_back(self.ip)
        # Logs that programs left in the pod's /tmp (e.g. the runtime's Ray node log) outlive the pod.
        for leftover in sorted(self.tmp.glob("*.log"))[:20]:
            with contextlib.suppress(OSError):
                shutil.copyfile(leftover, self._log_path(f"tmp-{leftover.stem}"))
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.stopped.set()
        self.ex.worker_done(self)
        log.info("pod %s/%s: stopped", self.namespace, self.pod_name)

    def _grace_seconds(self) -> float:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", 30)
        return min(float(grace), MAX_GRACE_S)

    # --- setup -----------------------------------------------------------------------------------
    def _volumes(self) -> dict[str, Path]:
        """emptyDir -> a directory of the pod; hostPath -> the path; configMap/secret -> files."""
        out: dict[str, Path] = {}
        for vol in self.pod["spec"].get("volumes") or []:
            name = vol["name"]
            if "emptyDir" in vol:
                out[name] = self.dir / "volumes" / name
                out[name].mkdir(parents=True, exist_ok=True)
            elif "hostPath" in vol:
                path = Path(vol["hostPath"]["path"])
                kind = vol["hostPath"].get("type") or ""
                if kind == "DirectoryOrCreate":
                    path.mkdir(parents=True, exist_ok=True)
                elif kind == "Directory" and not path.is_dir():
                    raise podspec.PodSpecError(f"volume {name}: hostPath {path} is not a directory")
                out[name] = path
            elif "configMap" in vol or "secret" in vol:
                out[name] = self.dir / "volumes" / name
                out[name].mkdir(parents=True, exist_ok=True)
                self._write_keys(vol, out[name])
            elif "projected" in vol:
                # The ServiceAccount admission adds one (token + kube-root-ca.crt) to every pod.
                out[name] = self.dir / "volumes" / name
                out[name].mkdir(parents=True, exist_ok=True)
                for source in vol["projected"].get("sources") or []:
                    if "configMap" in source or "secret" in source:
                        self._write_keys(source, out[name])
                    elif "serviceAccountToken" in source:
                        self._write_token(source["serviceAccountToken"], out[name])
            else:
                raise podspec.PodSpecError(
                    f"volume {name}: only emptyDir, hostPath, configMap and secret volumes are executed "
                    f"here (got {sorted(k for k in vol if k != 'name')})"
                )
        return out

    def _write_keys(self, vol: Mapping[str, Any], target: Path) -> None:
        kind = "ConfigMap" if "configMap" in vol else "Secret"
        ref = vol["configMap"] if "configMap" in vol else vol["secret"]
        name = ref.get("name") or ref.get("secretName")
        data = self.ex.read_data(kind, self.namespace, str(name))
        if data is None:
            if ref.get("optional"):
                return
            raise podspec.PodSpecError(f"volume source {kind} {self.namespace}/{name} not found")
        items = ref.get("items")
        pairs = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]
        for key, path in pairs:
            dest = target / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(data.get(key, ""))

    def _write_token(self, source: Mapping[str, Any], target: Path) -> None:
        account = self.pod["spec"].get("serviceAccountName") or "default"
        request = {
            "spec": {
                "audiences": [source["audience"]] if source.get("audience") else [],
                "expirationSeconds": int(source.get("expirationSeconds", 3607)),
            }
        }
        try:
            token = self.ex.core.create_namespaced_service_account_token(account, self.namespace, request)
            (target / source.get("path", "token")).write_text(token.status.token)
        except ApiException as exc:  # no token controller: the pod simply gets no token
            log.info("pod %s/%s: no service account token (%s)", self.namespace, self.pod_name, exc.reason)

    def _prepare(self, c: ContainerRun, volumes: dict[str, Path]) -> None:
        env = self._base_env(c.name)
        env.update(podspec.resolve_env(self.pod, c.spec, self.ip, NODE_IP, self.ex.read_data))
        # Containers cannot see mountPaths without mount namespaces: each mounted volume's local
        # directory is in LING_EXEC_VOLUME_<NAME> (a /dev/shm emptyDir is simply the host's /dev/shm).
        for mount in c.spec.get("volumeMounts") or []:
            if mount["name"] in volumes:
                env[podspec.volume_env_name(mount["name"])] = str(volumes[mount["name"]])
        c.env = env
        argv = podspec.command_line(c.spec, env)
        exe = shutil.which(argv[0], path=env["PATH"])
        if exe is None:
            raise podspec.PodSpecError(
                f"container {c.name!r}: command {argv[0]!r} not found on PATH ({env['PATH']})"
            )
        c.argv = [exe, *argv[1:]]
        now = time.monotonic()
        c.probes = {}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.spec.get(kind)
            if probe:
                if not any(k in probe for k in ("httpGet", "tcpSocket", "exec")):
                    raise podspec.PodSpecError(
                        f"container {c.name!r}: {kind} needs httpGet, tcpSocket or exec"
                    )
                c.probes[kind] = ProbeState(spec=probe, due=now + float(probe.get("initialDelaySeconds", 0)))

    def _base_env(self, container: str) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
        env.update(
            {
                "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "/usr/bin:/bin")]),
                "HOSTNAME": str(self.pod["spec"].get("hostname") or self.pod_name),
                # Each pod has its own /tmp, as a container would (Ray keeps its sessions there).
                "TMPDIR": str(self.tmp),
                procs.MARKER_ENV: self.marker + container,
                procs.POD_IP_ENV: self.ip,
                "LD_PRELOAD": str(self.ex.shim),
            }
        )
        return env

    def _run_init_containers(self, volumes: dict[str, Path]) -> bool:
        inits = [ContainerRun(spec=dict(c)) for c in self.pod["spec"].get("initContainers") or []]
        policy = self.pod["spec"].get("restartPolicy", "Always")
        for c in inits:
            try:
                self._prepare(c, volumes)
            except podspec.PodSpecError as exc:
                self.pod_failed_reason = ("CreateContainerConfigError", str(exc))
                return False
            for attempt in range(1000):
                if self.deleting.is_set() or self.ex.stopping.is_set():
                    return False
                c.proc = procs.spawn(c.argv, c.env, self.dir, self._log_path(c.name))
                while c.proc.poll() is None:
                    if self.deleting.wait(LOOP_S) or self.ex.stopping.is_set():
                        return False
                code = c.proc.returncode
                procs.terminate(None, self.marker + c.name, 0)  # leftovers die with the container
                if code == 0:
                    break
                if policy == "Never":
                    self.pod_failed_reason = ("InitContainerFailed", f"init container {c.name} exited {code}")
                    return False
                self.deleting.wait(min(RESTART_BACKOFF_S[1], RESTART_BACKOFF_S[0] * 2**attempt))
        return True

    def _log_path(self, container: str) -> Path:
        return self.log_dir / f"{self.namespace}_{self.pod_name}_{container}.log"

    # --- running ---------------------------------------------------------------------------------
    def _tend(self, c: ContainerRun, now: float) -> None:
        if c.done:
            return
        if c.proc is None:
            if now >= c.next_start:
                self._start(c)
            return
        code = c.proc.poll()
        if code is not None:
            self._exited(c, code, now)
            return
        self._probe(c, now)

    def _start(self, c: ContainerRun) -> None:
        c.proc = procs.spawn(c.argv, c.env, self.dir, self._log_path(c.name))
        c.started_at = podspec.now_rfc3339()
        c.exit_code = c.exit_signal = None
        c.waiting_reason = c.waiting_message = None
        c.started = "startupProbe" not in c.probes
        c.ready = False
        now = time.monotonic()
        for probe in c.probes.values():
            probe.successes = probe.failures = 0
            probe.ok = False
            probe.due = now + float(probe.spec.get("initialDelaySeconds", 0))
        log.info(
            "pod %s/%s: started %s (pid %d): %s", self.namespace, self.pod_name, c.name, c.proc.pid, c.argv
        )

    def _exited(self, c: ContainerRun, code: int, now: float) -> None:
        assert c.proc is not None
        pgid = c.proc.pid
        # The container is gone: so is everything it started (a PID namespace dies with its init).
        procs.terminate(pgid, self.marker + c.name, 0)
        sig = -code if code < 0 else None
        c.exit_code = 128 + sig if sig else code
        c.exit_signal = sig
        c.finished_at = podspec.now_rfc3339()
        c.ready = False
        c.proc = None
        log.info("pod %s/%s: %s exited %d", self.namespace, self.pod_name, c.name, c.exit_code)
        policy = self.pod["spec"].get("restartPolicy", "Always")
        if policy == "Always" or (policy == "OnFailure" and c.exit_code != 0):
            c.last_state = podspec.container_state(
                running_since=None,
                exit_code=c.exit_code,
                signal=c.exit_signal,
                started_at=c.started_at,
                finished_at=c.finished_at,
                waiting_reason=None,
            )
            delay = min(RESTART_BACKOFF_S[1], RESTART_BACKOFF_S[0] * 2**c.restart_count)
            c.restart_count += 1
            c.next_start = now + delay
            c.waiting_reason, c.waiting_message = "CrashLoopBackOff", f"back-off {delay:.0f}s restarting"
        else:
            c.done = True

    def _kill_container(self, c: ContainerRun, why: str) -> None:
        log.info("pod %s/%s: killing %s: %s", self.namespace, self.pod_name, c.name, why)
        if c.proc is not None:
            procs.terminate(c.proc.pid, self.marker + c.name, min(self._grace_seconds(), 5.0))

    def _probe(self, c: ContainerRun, now: float) -> None:
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = c.probes.get(kind)
            if probe is None or now < probe.due:
                continue
            if kind != "startupProbe" and not c.started:
                continue
            if kind == "startupProbe" and c.started:
                continue
            spec = probe.spec
            probe.due = now + float(spec.get("periodSeconds", 10))
            ok = self._probe_once(c, spec)
            if ok:
                probe.successes, probe.failures = probe.successes + 1, 0
                if probe.successes >= int(spec.get("successThreshold", 1)):
                    probe.ok = True
            else:
                probe.failures, probe.successes = probe.failures + 1, 0
                if probe.failures >= int(spec.get("failureThreshold", 3)):
                    probe.ok = False
            if kind == "startupProbe" and probe.ok:
                c.started = True
            elif (
                kind in ("startupProbe", "livenessProbe")
                and not ok
                and not probe.ok
                and probe.failures >= int(spec.get("failureThreshold", 3))
            ):
                self._kill_container(c, f"{kind} failed {probe.failures} times")
                return
        readiness = c.probes.get("readinessProbe")
        c.ready = c.started and (readiness.ok if readiness else True)

    def _probe_once(self, c: ContainerRun, spec: Mapping[str, Any]) -> bool:
        timeout = float(spec.get("timeoutSeconds", 1))
        try:
            if "httpGet" in spec:
                get = spec["httpGet"]
                host = get.get("host") or self.ip
                port = podspec.resolve_port(c.spec, get["port"])
                scheme = str(get.get("scheme", "HTTP")).lower()
                url = f"{scheme}://{host}:{port}{get.get('path', '/')}"
                request = urllib.request.Request(
                    url, headers={h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                )
                try:
                    with urllib.request.urlopen(request, timeout=timeout) as response:
                        return 200 <= response.status < 400
                except urllib.error.HTTPError as exc:
                    return 200 <= exc.code < 400
            if "tcpSocket" in spec:
                port = podspec.resolve_port(c.spec, spec["tcpSocket"]["port"])
                with socket.create_connection(
                    (spec["tcpSocket"].get("host") or self.ip, port), timeout=timeout
                ):
                    return True
            if "exec" in spec:
                argv = [podspec.expand(str(a), c.env) for a in spec["exec"].get("command") or []]
                result = subprocess.run(argv, env=c.env, cwd=self.dir, capture_output=True, timeout=timeout)
                return result.returncode == 0
        except (OSError, subprocess.TimeoutExpired, podspec.PodSpecError, ValueError):
            return False
        return False

    # --- status ----------------------------------------------------------------------------------
    def _cond(self, kind: str, ok: bool, reason: str | None = None) -> dict[str, Any]:
        status = "True" if ok else "False"
        prev = self._conditions.get(kind)
        if prev is None or prev[0] != status:
            self._conditions[kind] = (status, podspec.now_rfc3339())
        cond = podspec.condition(kind, ok, reason)
        cond["lastTransitionTime"] = self._conditions[kind][1]
        return cond

    def status(self) -> dict[str, Any]:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        statuses = []
        for c in self.mains:
            running = c.proc is not None and c.proc.poll() is None
            state = podspec.container_state(
                running_since=c.started_at if running else None,
                exit_code=c.exit_code,
                signal=c.exit_signal,
                started_at=c.started_at,
                finished_at=c.finished_at,
                waiting_reason=c.waiting_reason,
                waiting_message=c.waiting_message,
            )
            statuses.append(
                {
                    "name": c.name,
                    "image": str(c.spec.get("image", "")),
                    "imageID": "",
                    "containerID": f"ling-exec://{c.proc.pid}" if running and c.proc else "",
                    "ready": bool(c.ready and running),
                    "started": bool(running and c.started),
                    "restartCount": c.restart_count,
                    "state": state,
                    "lastState": c.last_state,
                }
            )
        if self.pod_failed_reason is not None:
            phase = "Failed"
        else:
            exits = [None if not c.done else c.exit_code for c in self.mains]
            all_started = self.init_done and all(c.started_at for c in self.mains)
            phase = podspec.pod_phase(policy, exits, all_started)
        ready = phase == "Running" and all(s["ready"] for s in statuses) and not self.deleting.is_set()
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": NODE_IP,
            "hostIPs": [{"ip": NODE_IP}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "conditions": [
                self._cond("PodScheduled", True),
                self._cond("Initialized", self.init_done),
                self._cond("ContainersReady", ready),
                self._cond("Ready", ready),
            ],
            "containerStatuses": statuses,
        }
        if self.pod_failed_reason is not None:
            status["reason"], status["message"] = self.pod_failed_reason
        return status

    def _report(self) -> None:
        status = self.status()
        # Timestamps of conditions only change with the condition, so an unchanged status is skipped.
        text = json.dumps(status, sort_keys=True)
        if text == self._last_status:
            return
        try:
            self.ex.core.patch_namespaced_pod_status(
                self.pod_name, self.namespace, {"status": status}, _content_type=SMP
            )
            self._last_status = text
            if status.get("podIP") and (self.pod.get("status") or {}).get("podIP") != status["podIP"]:
                self.pod.setdefault("status", {})["podIP"] = status["podIP"]
        except ApiException as exc:
            if exc.status == 404:
                self.gone.set()
                self.deleting.set()
            else:
                log.warning("pod %s/%s: status update failed: %s", self.namespace, self.pod_name, exc.reason)


class Executor:
    """Registers the nodes, watches their pods and runs one PodWorker per pod."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.api = new_api_client(settings.kubeconfig)
        self.core = client.CoreV1Api(self.api)
        self.coord = client.CoordinationV1Api(self.api)
        self.ips = IpPool(settings.pod_cidr)
        self.shim = procs.build_shim(settings.state_dir / "lib")
        self.hosts = HostsFile(settings.hosts_file, "-".join(settings.nodes))
        self.stopping = threading.Event()
        self.api_lost = threading.Event()  # set by the heartbeat: the caller should stop()
        self.workers: dict[str, PodWorker] = {}
        self._lock = threading.Lock()
        self._hosts_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # --- secrets/configmaps for env ---------------------------------------------------------------
    def read_data(self, kind: str, namespace: str, name: str) -> dict[str, str] | None:
        try:
            if kind == "Secret":
                data = self.core.read_namespaced_secret(name, namespace).data or {}
                values = {k: podspec.decode_secret(data, k) or "" for k in data}
            else:
                values = dict(self.core.read_namespaced_config_map(name, namespace).data or {})
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return values

    # --- nodes ------------------------------------------------------------------------------------
    def _node_body(self, name: str) -> dict[str, Any]:
        s = self.settings
        capacity = {"cpu": s.cpu, "memory": s.memory, "pods": str(s.max_pods), "ephemeral-storage": "100Gi"}
        if s.gpus:
            capacity["nvidia.com/gpu"] = str(s.gpus)
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "local-exec",
                    LABEL_LOCAL_EXEC: "true",
                    **s.extra_labels,
                },
            },
            "spec": {"taints": [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}]},
            "status": {"capacity": capacity, "allocatable": capacity, **self._node_status_live(name)},
        }

    def _node_status_live(self, name: str) -> dict[str, Any]:
        now = podspec.now_rfc3339()
        conds = [
            ("Ready", "True", "KubeletReady", "ling e2e executor is running pods as local processes"),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", ""),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", ""),
            ("PIDPressure", "False", "KubeletHasSufficientPID", ""),
        ]
        return {
            "conditions": [
                {
                    "type": t,
                    "status": st,
                    "reason": r,
                    "message": m,
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
                for t, st, r, m in conds
            ],
            "addresses": [{"type": "InternalIP", "address": NODE_IP}, {"type": "Hostname", "address": name}],
            "nodeInfo": {
                "kubeletVersion": "ling-e2e-executor",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "local-process://1",
                "osImage": "local processes",
                "kernelVersion": os.uname().release,
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }

    def register_nodes(self) -> None:
        for name in self.settings.nodes:
            body = self._node_body(name)
            try:
                self.core.create_node(body)
                log.info("node %s registered", name)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                self.core.patch_node(
                    name, {"metadata": {"labels": body["metadata"]["labels"]}, "spec": body["spec"]}
                )
            # A node's status in a create is kept by some servers and dropped by others: set it explicitly.
            self.core.patch_node_status(name, {"status": body["status"]}, _content_type=SMP)
            self._renew_lease(name)

    def _renew_lease(self, name: str) -> None:
        # A MicroTime: the typed client re-serializes it via isoformat(), which drops a zero fraction
        # that the API server's parser insists on, so the microseconds are never zero.
        stamp = datetime.now(UTC)
        now = stamp.replace(microsecond=stamp.microsecond or 1)
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now},
        }
        try:
            self.coord.patch_namespaced_lease(
                name, "kube-node-lease", {"spec": body["spec"]}, _content_type=MERGE
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coord.create_namespaced_lease("kube-node-lease", body)

    def _heartbeat(self) -> None:
        last_ok = time.monotonic()
        while not self.stopping.wait(HEARTBEAT_S):
            for name in self.settings.nodes:
                try:
                    self._renew_lease(name)
                    self.core.patch_node_status(
                        name, {"status": self._node_status_live(name)}, _content_type=SMP
                    )
                    last_ok = time.monotonic()
                except Exception as exc:  # the API may be restarting: retry on the next beat
                    log.warning("node %s heartbeat failed: %s", name, exc)
            limit = self.settings.exit_after_api_loss_s
            if limit and time.monotonic() - last_ok > limit:
                # The control plane is gone (e.g. `hack/cluster.sh down` alone): no pod may outlive it.
                log.error("API server unreachable for %.0f s: stopping every pod and exiting", limit)
                self.api_lost.set()
                return

    # --- pods ---------------------------------------------------------------------------------------
    def _dispatch(self, kind: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        with self._lock:
            worker = self.workers.get(uid)
            if kind == "DELETED":
                if worker is not None:
                    worker.gone.set()
                    worker.deleting.set()
                return
            if worker is None:
                if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    return  # finished before this executor started: nothing left to run
                worker = PodWorker(self, pod)
                if pod["metadata"].get("deletionTimestamp"):
                    worker.deleting.set()
                self.workers[uid] = worker
                worker.start()
            else:
                worker.update(pod)

    def worker_done(self, worker: PodWorker) -> None:
        with self._lock:
            if self.workers.get(worker.uid) is worker:
                del self.workers[worker.uid]
        self.hosts_changed()

    def hosts_changed(self) -> None:
        # Snapshot and write under one lock: two threads writing their snapshots out of order
        # would leave a stale file (a new pod's name missing until the next change).
        with self._hosts_lock:
            with self._lock:
                pods = [
                    {**w.pod, "status": {"podIP": w.ip}}
                    for w in self.workers.values()
                    if w.ip and not w.stopped.is_set()
                ]
            try:
                self.hosts.write(podspec.hosts_entries(pods))
            except OSError as exc:
                log.error(
                    "cannot write %s: %s (pod DNS names will not resolve)", self.settings.hosts_file, exc
                )

    def _watch_node(self, node: str) -> None:
        selector = f"spec.nodeName={node}"
        while not self.stopping.is_set():
            try:
                listing = self.core.list_pod_for_all_namespaces(
                    field_selector=selector, _preload_content=False
                )
                data = json.loads(listing.data)
                seen = set()
                for item in data.get("items") or []:
                    seen.add(item["metadata"]["uid"])
                    self._dispatch("ADDED", item)
                with self._lock:
                    vanished = [w for w in self.workers.values() if w.node == node and w.uid not in seen]
                for w in vanished:
                    self._dispatch("DELETED", w.pod)
                stream = watch.Watch()
                for event in stream.stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=data["metadata"]["resourceVersion"],
                    timeout_seconds=30,
                ):
                    if self.stopping.is_set():
                        stream.stop()
                        break
                    raw = event.get("raw_object")
                    if isinstance(raw, dict) and raw.get("kind") != "Status":
                        self._dispatch(event["type"], raw)
            except Exception as exc:
                if not self.stopping.is_set():
                    log.warning("watching pods of %s: %s; relisting", node, exc)
                    self.stopping.wait(1.0)

    # --- whole executor ------------------------------------------------------------------------------
    def start(self) -> None:
        # Processes left by an executor that died without cleaning up belong to no pod any more.
        for node in self.settings.nodes:
            procs.terminate(None, f"{node}/", 2.0)
        self.register_nodes()
        for target, name in [(self._heartbeat, "heartbeat")] + [
            (lambda n=n: self._watch_node(n), f"watch-{n}") for n in self.settings.nodes
        ]:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Kill every pod's processes, drop the hosts block and (by default) the nodes; bounded."""
        self.stopping.set()
        with self._lock:
            workers = list(self.workers.values())
        deadline = time.monotonic() + MAX_GRACE_S + 15
        for w in workers:
            w.join(timeout=max(0.1, deadline - time.monotonic()))
        for node in self.settings.nodes:
            procs.terminate(None, f"{node}/", 0)
        with contextlib.suppress(OSError):
            self.hosts.write([])
        if self.settings.delete_nodes_on_exit:
            for node in self.settings.nodes:
                with contextlib.suppress(ApiException):
                    self.core.delete_node(node)
                with contextlib.suppress(ApiException):
                    self.coord.delete_namespaced_lease(node, "kube-node-lease")
        self.api.close()
