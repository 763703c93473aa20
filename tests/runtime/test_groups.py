"""Tensor-parallel groups as real processes: TP 2 with the mp launcher, and TP 2 split over two Ray
nodes on loopback (node rank 0 = Ray head + HTTP, node rank 1 = `ray start --address` + /health).
Killing one rank's process must turn /health to 503 within seconds.

Ray's gcs_server and raylet listen on every interface whatever `--node-ip-address` says, so every test
here that starts Ray runs its runtime processes in a private network namespace with only loopback
(tests/netns.py) and makes its HTTP calls from a thread inside that namespace."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import torch
from ling_runtime.model import LingForCausalLM, greedy_generate

from tests.netns import NetNamespace
from tests.waiting import wait_for

from .conftest import free_port

pytestmark = pytest.mark.slow
PROMPT = list(range(20, 60))
T = TypeVar("T")
# Ray's listening daemons by the names `ss -p` shows.
RAY_DAEMONS = ("gcs_server", "raylet")


def host(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run an HTTP call in the test's own (host) namespace; `NetNamespace.run` is the other `via`."""
    return fn(*args, **kwargs)


def spawn(argv: list[str], log: Path, ns: NetNamespace | None = None) -> subprocess.Popen:
    """Start `ling-runtime serve argv`, inside `ns` when given (required for anything that starts Ray)."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ling_runtime", "serve", *argv]
    with open(log, "wb") as out:
        # start_new_session: its own process group, so cleanup never touches anything else.
        kwargs: dict[str, Any] = {
            "stdout": out,
            "stderr": subprocess.STDOUT,
            "env": env,
            "start_new_session": True,
        }
        return ns.popen(cmd, **kwargs) if ns is not None else subprocess.Popen(cmd, **kwargs)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_healthy(
    url: str, procs: list[subprocess.Popen], logs: list[Path], timeout: float, via: Callable = host
) -> None:
    def healthy() -> bool:
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                pytest.fail(f"runtime exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return via(httpx.get, f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(f"{url}/health to answer 200", healthy, timeout=timeout)
    except AssertionError as exc:
        pytest.fail(f"{exc}:\n" + "\n".join(log.read_text()[-2000:] for log in logs))


def wait_503(url: str, within_s: float, via: Callable = host) -> float:
    started = time.monotonic()
    wait_for(
        f"{url}/health to turn 503 after a rank died",
        lambda: via(httpx.get, f"{url}/health", timeout=2).status_code == 503,
        timeout=within_s,
        every=0.2,
    )
    return time.monotonic() - started


def expected(url: str, via: Callable = host) -> list[int]:
    """Greedy decode by the model itself from the checkpoint the server loaded (TP 1)."""
    model_dir = via(httpx.get, f"{url}/get_model_info", timeout=10).json()["model_path"]
    oracle = LingForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return greedy_generate(oracle, PROMPT, 10)


def generate(url: str, via: Callable = host) -> dict:
    body = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True},
    }
    return via(httpx.post, f"{url}/generate", json=body, timeout=60).json()


@pytest.fixture
def mp_group(tmp_path: Path, builtin_dir) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    port = free_port()
    log = tmp_path / "mp.log"
    argv = ["--tp-size", "2", "--launcher", "mp", "--dist-init-addr", f"127.0.0.1:{free_port()}"]
    proc = spawn([*argv, "--host", "127.0.0.1", "--port", str(port)], log)
    try:
        yield f"http://127.0.0.1:{port}", proc, log
    finally:
        stop(proc)


def test_mp_tp2_group_answers_and_fails_health_when_a_rank_dies(mp_group) -> None:
    url, proc, log = mp_group
    wait_healthy(url, [proc], [log], timeout=120)
    assert generate(url)["output_ids"] == expected(url)
    info = httpx.get(f"{url}/get_server_info", timeout=10).json()
    assert info["tp_size"] == 2 and info["ranks_alive"] == 2 and len(info["worker_pids"]) == 1
    os.kill(info["worker_pids"][0], signal.SIGKILL)
    assert wait_503(url, within_s=5) < 5
    assert "1 of 2 ranks are down" in httpx.get(f"{url}/health", timeout=5).json()["reason"]


def listening_processes(ss_output: str) -> set[tuple[str, int]]:
    """(name, pid) of every process in `ss -ltnp` output: `users:(("raylet",pid=12,fd=30),...)`."""
    return {(m[1], int(m[2])) for m in re.finditer(r'\("([^"]+)",pid=(\d+),', ss_output)}


def assert_ray_confined(ns: NetNamespace) -> None:
    """Ray's daemons listen inside the namespace (so the check below is not vacuous), and no process of
    the namespace listens in the host namespace (`ss` there shows only host-namespace sockets).
    Matched by pid, not by name: another Ray on this machine (a parallel e2e run, say) may
    legitimately show a `raylet` in the host namespace."""
    inside = ns.listeners()
    ours = set(ns.pids())
    daemons = {(name, pid) for name, pid in listening_processes(inside) if name in RAY_DAEMONS}
    assert {name for name, _ in daemons} == set(RAY_DAEMONS), inside
    assert {pid for _, pid in daemons} <= ours, (daemons, ours)
    host = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True, check=True, timeout=30).stdout
    leaked = {(name, pid) for name, pid in listening_processes(host) if pid in ours}
    assert not leaked, host


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    with NetNamespace() as ns:
        yield ns


@pytest.fixture
def ray_group(
    tmp_path: Path, builtin_dir, netns: NetNamespace
) -> Iterator[tuple[str, str, list[subprocess.Popen], list[Path]]]:
    ray_port, dist_port, head_http, worker_http = free_port(), free_port(), free_port(), free_port()
    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    ray_tmp = Path(f"/tmp/lrt{os.getpid()}")
    common = ["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{dist_port}"]
    common += ["--ray-port", str(ray_port), "--rendezvous-timeout", "150"]
    logs = [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    worker = spawn(
        [
            *common,
            "--node-rank",
            "1",
            "--host",
            "127.0.0.2",
            "--port",
            str(worker_http),
            "--ray-temp-dir",
            f"{ray_tmp}/1",
        ],
        logs[1],
        netns,
    )
    head = spawn(
        [
            *common,
            "--node-rank",
            "0",
            "--host",
            "127.0.0.1",
            "--port",
            str(head_http),
            "--ray-temp-dir",
            f"{ray_tmp}/0",
        ],
        logs[0],
        netns,
    )
    try:
        yield f"http://127.0.0.1:{head_http}", f"http://127.0.0.2:{worker_http}", [head, worker], logs
    finally:
        stop(head)
        stop(worker)
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)


def test_ray_tp2_over_two_nodes_answers_and_detects_a_dead_rank(ray_group, netns: NetNamespace) -> None:
    head_url, worker_url, procs, logs = ray_group
    via = netns.run
    wait_healthy(head_url, procs, logs, timeout=180, via=via)
    assert via(httpx.get, f"{worker_url}/health", timeout=5).status_code == 200
    assert_ray_confined(netns)
    assert generate(head_url, via)["output_ids"] == expected(head_url, via)
    info = via(httpx.get, f"{head_url}/get_server_info", timeout=10).json()
    assert info["ranks_alive"] == 2 and len(info["worker_pids"]) == 1
    # SIGKILL node rank 1's runtime process (what a pod crash is): its Ray node and the TP actor on it
    # must go down with it, and the head must notice.
    os.kill(procs[1].pid, signal.SIGKILL)
    assert wait_503(head_url, within_s=15, via=via) < 15
    pid = info["worker_pids"][0]
    wait_for(
        f"the TP actor (pid {pid}) to die with its node's runtime process", lambda: not _alive(pid), 15, 0.2
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_rendezvous_deadline_names_the_missing_node_rank(
    tmp_path: Path, builtin_dir, netns: NetNamespace
) -> None:
    argv = [
        "--tp-size",
        "2",
        "--nnodes",
        "2",
        "--node-rank",
        "0",
        "--dist-init-addr",
        f"127.0.0.1:{free_port()}",
    ]
    argv += [
        "--ray-port",
        str(free_port()),
        "--rendezvous-timeout",
        "8",
        "--ray-temp-dir",
        f"/tmp/lrr{os.getpid()}",
    ]
    argv += ["--host", "127.0.0.1", "--port", str(free_port())]
    log = tmp_path / "rank0.log"
    proc = spawn(argv, log, netns)
    try:
        assert proc.wait(timeout=120) == 3
    finally:
        stop(proc)
        subprocess.run(["rm", "-rf", f"/tmp/lrr{os.getpid()}"], check=False)
    assert "node rank(s) [1] did not join the Ray cluster" in log.read_text()


def test_sigterm_drains_running_requests_then_exits(tmp_path: Path, builtin_dir) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    proc = spawn(["--host", "127.0.0.1", "--port", str(port)], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc], [log], timeout=60)
        body = {"prompt": [1, 2, 3], "max_tokens": 300, "temperature": 0, "stream": True, "ignore_eos": True}
        texts, finish = [], None
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    if not texts:
                        os.kill(proc.pid, signal.SIGTERM)  # mid-stream
                    choice = __import__("json").loads(line[6:])["choices"][0]
                    texts.append(choice["text"])
                    finish = choice["finish_reason"] or finish
        assert finish == "length"  # the running request ran to its end
        assert proc.wait(timeout=60) == 0
    finally:
        stop(proc)
