"""Ray-backed tensor-parallel groups across pods.

Node rank 0 starts the Ray head (or joins `--ray-address`), waits for `--nnodes` nodes with a
deadline that names the missing ranks, reserves one placement-group bundle per shard (pinned to its
node by the `ling_node_<r>` resource), and starts one `TPWorker` actor per shard 1..T-1; shard 0 is
this process (it also serves HTTP and broadcasts each step's plan). All shards then meet in
`torch.distributed` at `--dist-init-addr`. Node ranks > 0 only run a Ray worker node (`WorkerNode`;
server/launch.py answers /health for it), and exit when the head is gone so their pod restarts with
the group.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch
import torch.distributed as torch_dist
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ling_runtime.distributed.executor import Executor, GroupExecutor, RankState, control_group
from ling_runtime.distributed.ray_node import RayNode, free_ports, node_resource, port_open, ray_start_argv
from ling_runtime.distributed.ray_worker import TPWorker
from ling_runtime.model.parallel import backend_for, init_process_group
from ling_runtime.runner.build import build_runner
from ling_runtime.settings import Settings

log = logging.getLogger("ling_runtime.ray")
PING_INTERVAL_S = 0.5
PING_TIMEOUT_S = 3.0
# A ping that times out is late, not dead: on a loaded node (2 shared cores, a long prefill) one ping can
# take seconds. A rank is declared hung only after its pings have failed for this long without a break;
# an actor Ray reports dead (killed, crashed) is declared dead at once.
HUNG_AFTER_S = 15.0


def rank_alive(now: float, late_since: float | None, died: bool) -> bool:
    """Whether a rank whose last ping failed still counts as alive (pure): not when Ray says its actor
    died, nor when its pings have failed for HUNG_AFTER_S since `late_since`."""
    return not died and late_since is not None and now - late_since < HUNG_AFTER_S


class RendezvousTimeout(RuntimeError):
    pass


def missing_node_ranks(alive_resources: list[dict[str, float]], nnodes: int) -> list[int]:
    """Node ranks with no alive Ray node carrying their `ling_node_<r>` resource (pure)."""
    present = {key for res in alive_resources for key in res}
    return [r for r in range(nnodes) if node_resource(r) not in present]


def _node_log(settings: Settings) -> Path:
    base = Path(settings.ray_temp_dir or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    return base / f"ling-ray-node{settings.node_rank}.log"


def _cpus_for(settings: Settings) -> int | None:
    # On CPU each shard is one bundle of 1 CPU; Ray must see at least that many on the node.
    return max(settings.shards_per_node, 1) if settings.device == "cpu" else None


def head_address(settings: Settings) -> str:
    """HOST:PORT of the Ray head's GCS: --ray-address, else rank 0's host at --ray-port."""
    return settings.ray_address or f"{settings.dist_host_port[0]}:{settings.ray_port}"


def start_node(settings: Settings) -> RayNode:
    head = settings.node_rank == 0 and not settings.ray_address
    address = head_address(settings)
    argv = ray_start_argv(
        settings.node_rank,
        settings.host,
        settings.ray_port,
        head=head,
        head_address=None if head else address,
        num_cpus=_cpus_for(settings),
        temp_dir=settings.ray_temp_dir,
        ports=free_ports(settings.host),
    )
    if not head:
        # The head may still be starting (pods come up in any order): wait for its GCS port.
        deadline = time.monotonic() + settings.rendezvous_timeout
        while not port_open(*_split(address)):
            if time.monotonic() > deadline:
                raise RendezvousTimeout(f"node rank {settings.node_rank}: Ray head {address} unreachable")
            time.sleep(0.5)
    log.info("starting Ray node: %s", " ".join(argv))
    return RayNode(argv, _node_log(settings))


def wait_for_nodes(nnodes: int, timeout_s: float, address: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        missing = missing_node_ranks(alive, nnodes)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RendezvousTimeout(
                f"rendezvous timed out after {timeout_s:.0f}s: node rank(s) {missing} did not join the "
                f"Ray cluster at {address}"
            )
        time.sleep(0.5)


def launch_ray_group(settings: Settings) -> tuple[Executor, float]:
    """Node rank 0: bring up the group; returns (executor, seconds from start to loaded)."""
    started = time.monotonic()
    node = start_node(settings)
    address = head_address(settings)
    deadline = time.monotonic() + settings.rendezvous_timeout
    while not port_open(*_split(address)):
        if not node.alive() or time.monotonic() > deadline:
            node.stop()
            raise RendezvousTimeout(f"Ray head did not come up at {address} (see {_node_log(settings)})")
        time.sleep(0.2)
    ray.init(address=address, _node_ip_address=settings.host, namespace="ling", log_to_driver=False)
    try:
        wait_for_nodes(settings.nnodes, max(1.0, deadline - time.monotonic()), address)
        per_node = settings.shards_per_node
        unit = {"CPU": 1} if settings.device == "cpu" else {"GPU": 1}
        bundles = [{**unit, node_resource(r // per_node): 1} for r in range(settings.tp_size)]
        pg = placement_group(bundles, strategy="PACK")
        ray.get(pg.ready(), timeout=max(1.0, deadline - time.monotonic()))
        host, port = settings.dist_host_port
        workers = []
        setups = []
        for rank in range(1, settings.tp_size):
            actor = TPWorker.options(
                num_cpus=1 if settings.device == "cpu" else 0,
                num_gpus=1 if settings.device == "cuda" else 0,
                max_concurrency=4,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote()
            workers.append(actor)
            setups.append(
                actor.setup.remote(settings, rank, settings.tp_size, host, port, settings.rendezvous_timeout)
            )
        tp = init_process_group(
            0, settings.tp_size, host, port, backend_for(settings.device), settings.rendezvous_timeout
        )
        group = control_group(settings.rendezvous_timeout)
        runner, _ = build_runner(
            settings, 0, settings.tp_size, tp.group, local_device=_driver_gpu(settings, workers)
        )
        ray.get(setups, timeout=settings.rendezvous_timeout)
        ray.get([w.start_loop.remote() for w in workers], timeout=30)
    except BaseException:
        ray.shutdown()
        node.stop()
        raise
    monitor = _Liveness(workers, settings.tp_size)
    monitor.start()

    def stop(graceful: bool) -> None:
        monitor.stop()
        for w in workers:
            with contextlib.suppress(Exception):  # already dead
                ray.kill(w)
        ray.shutdown()
        node.stop()
        if graceful:  # not after a failure: a collective may still hang in this process
            with contextlib.suppress(Exception):
                torch_dist.destroy_process_group()

    pids = ray.get([w.pid.remote() for w in workers])
    executor = GroupExecutor(runner, group, monitor.alive, stop, worker_pids=pids, ranks=monitor.ranks)
    log.info("Ray TP group of %d shards over %d nodes ready", settings.tp_size, settings.nnodes)
    return executor, time.monotonic() - started


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _driver_gpu(settings: Settings, workers) -> int:
    """The local GPU left for shard 0 after Ray assigned GPUs to the actors on this node."""
    if settings.device != "cuda":
        return 0
    infos = ray.get([w.placement.remote() for w in workers])
    taken = {int(g) for ip, gpus in infos if ip == settings.host for g in gpus}
    free = [i for i in range(torch.cuda.device_count()) if i not in taken]
    if not free:
        raise RuntimeError("no GPU left on the head node for tensor-parallel rank 0")
    return free[0]


class _Liveness:
    """Pings every actor a few times a second (not per token): a dead rank shows in /health at once."""

    def __init__(self, workers, tp_size: int) -> None:
        self.workers = workers
        self.tp_size = tp_size
        self._alive = tp_size
        self._states = [RankState(rank, True) for rank in range(1, tp_size)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ling-ray-liveness", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def alive(self) -> tuple[int, int]:
        return self._alive, self.tp_size

    def ranks(self) -> list[RankState]:
        return list(self._states)

    def _run(self) -> None:
        late_since: dict[int, float] = {}
        while not self._stop.is_set():
            states = []
            for rank, w in enumerate(self.workers, start=1):
                try:
                    steps = ray.get(w.ping.remote(), timeout=PING_TIMEOUT_S)
                    late_since.pop(rank, None)
                    states.append(RankState(rank, True, steps=int(steps)))
                except Exception as exc:
                    now = time.monotonic()
                    since = late_since.setdefault(rank, now)
                    # No answer in time (a busy or stopped process) or Ray's "unreachable for now" is
                    # late; an actor Ray reports dead, or a ping that raised (the step loop failed), is not.
                    late = isinstance(
                        exc, (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError)
                    )
                    if late:
                        log.warning(
                            "rank %d: no answer to pings for %.1f s", rank, now - since + PING_TIMEOUT_S
                        )
                    died = not late
                    states.append(RankState(rank, rank_alive(now, since, died)))
            self._states = states
            self._alive = 1 + sum(s.alive for s in states)
            self._stop.wait(PING_INTERVAL_S)


class WorkerNode:
    """Node rank > 0: this pod's Ray node, joined to the head's cluster. The group can use it while
    the node runs and the head answers; `check` (called about once a second) says when the process
    should end so that its pod restarts with the group."""

    HEAD_LOST_S = 15.0

    def __init__(self, settings: Settings) -> None:
        self.node = start_node(settings)
        self.head = head_address(settings)
        self.head_lost_since: float | None = None

    def health(self) -> tuple[bool, str]:
        if not self.node.alive():
            return False, "Ray node exited"
        if self.head_lost_since is not None:
            return False, f"Ray head {self.head} unreachable"
        return True, "ok"

    def check(self) -> bool:
        """Probe the head; False when this node should stop (its Ray node exited, or the head has
        been unreachable for HEAD_LOST_S)."""
        if not self.node.alive():
            log.error("Ray node exited; stopping")
            return False
        if port_open(*_split(self.head)):
            self.head_lost_since = None
        elif self.head_lost_since is None:
            self.head_lost_since = time.monotonic()
        elif time.monotonic() - self.head_lost_since > self.HEAD_LOST_S:
            log.error(
                "Ray head %s unreachable for %.0fs; stopping so the group restarts",
                self.head,
                self.HEAD_LOST_S,
            )
            return False
        return True

    def stop(self) -> None:
        self.node.stop()
