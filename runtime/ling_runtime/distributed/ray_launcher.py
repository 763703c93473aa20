"""Ray-backed tensor-parallel groups across pods.

Node rank 0 starts the Ray head (or joins `--ray-address`), waits for `--nnodes` nodes with a
deadline that names the missing ranks, reserves one placement-group bundle per shard (pinned to its
node by the `ling_node_<r>` resource), and starts one `TPWorker` actor per shard 1..T-1; shard 0 is
this process (it also serves HTTP and broadcasts each step's plan). All shards then meet in
`torch.distributed` at `--dist-init-addr`. Node ranks > 0 only run a Ray worker node and a small
/health endpoint, and exit when the head is gone so their pod restarts with the group.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from pathlib import Path

import torch.distributed as torch_dist

from ling_runtime.cli import ServeArgs
from ling_runtime.distributed.executor import GroupExecutor, control_group
from ling_runtime.distributed.ray_node import RayNode, free_ports, node_resource, port_open, ray_start_argv
from ling_runtime.engine.setup import RuntimeSpec, build_runner

log = logging.getLogger("ling_runtime.ray")
PING_INTERVAL_S = 0.5
PING_TIMEOUT_S = 3.0


class RendezvousTimeout(RuntimeError):
    pass


def missing_node_ranks(alive_resources: list[dict[str, float]], nnodes: int) -> list[int]:
    """Node ranks with no alive Ray node carrying their `ling_node_<r>` resource (pure)."""
    present = {key for res in alive_resources for key in res}
    return [r for r in range(nnodes) if node_resource(r) not in present]


def _node_log(args: ServeArgs) -> Path:
    base = Path(args.ray_temp_dir or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    return base / f"ling-ray-node{args.node_rank}.log"


def _cpus_for(args: ServeArgs) -> int | None:
    # On CPU each shard is one bundle of 1 CPU; Ray must see at least that many on the node.
    return max(args.shards_per_node, 1) if args.device == "cpu" else None


def start_node(args: ServeArgs) -> RayNode:
    head_host = args.dist_host_port[0]
    head = args.node_rank == 0 and not args.ray_address
    address = args.ray_address or f"{head_host}:{args.ray_port}"
    argv = ray_start_argv(
        args.node_rank,
        args.host,
        args.ray_port,
        head=head,
        head_address=None if head else address,
        num_cpus=_cpus_for(args),
        temp_dir=args.ray_temp_dir,
        ports=free_ports(args.host),
    )
    if not head:
        # The head may still be starting (pods come up in any order): wait for its GCS port.
        host, _, port = address.rpartition(":")
        deadline = time.monotonic() + args.rendezvous_timeout
        while not port_open(host, int(port)):
            if time.monotonic() > deadline:
                raise RendezvousTimeout(f"node rank {args.node_rank}: Ray head {address} unreachable")
            time.sleep(0.5)
    log.info("starting Ray node: %s", " ".join(argv))
    return RayNode(argv, _node_log(args))


def wait_for_nodes(nnodes: int, timeout_s: float, address: str) -> None:
    import ray

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


def launch_ray_group(args: ServeArgs, spec: RuntimeSpec):
    """Node rank 0: bring up the group; returns (executor, seconds from start to loaded)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from ling_runtime.distributed.parallel import init_process_group
    from ling_runtime.distributed.ray_worker import TPWorker

    started = time.monotonic()
    node = start_node(args)
    address = args.ray_address or f"{args.dist_host_port[0]}:{args.ray_port}"
    deadline = time.monotonic() + args.rendezvous_timeout
    while not port_open(*_split(address)):
        if not node.alive() or time.monotonic() > deadline:
            node.stop()
            raise RendezvousTimeout(f"Ray head did not come up at {address} (see {_node_log(args)})")
        time.sleep(0.2)
    ray.init(address=address, _node_ip_address=args.host, namespace="ling", log_to_driver=False)
    try:
        wait_for_nodes(args.nnodes, max(1.0, deadline - time.monotonic()), address)
        per_node = args.shards_per_node
        unit = {"CPU": 1} if args.device == "cpu" else {"GPU": 1}
        bundles = [{**unit, node_resource(r // per_node): 1} for r in range(args.tp_size)]
        pg = placement_group(bundles, strategy="PACK")
        ray.get(pg.ready(), timeout=max(1.0, deadline - time.monotonic()))
        host, port = args.dist_host_port
        workers = []
        setups = []
        for rank in range(1, args.tp_size):
            actor = TPWorker.options(
                num_cpus=1 if args.device == "cpu" else 0,
                num_gpus=1 if args.device == "cuda" else 0,
                max_concurrency=4,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote()
            workers.append(actor)
            setups.append(actor.setup.remote(spec, rank, args.tp_size, host, port, args.rendezvous_timeout))
        backend = "nccl" if args.device == "cuda" else "gloo"
        tp = init_process_group(0, args.tp_size, host, port, backend, args.rendezvous_timeout)
        group = control_group(args.rendezvous_timeout)
        runner, _ = build_runner(spec, 0, args.tp_size, tp.group, local_device=_driver_gpu(args, workers))
        ray.get(setups, timeout=args.rendezvous_timeout)
        ray.get([w.start_loop.remote() for w in workers], timeout=30)
    except BaseException:
        ray.shutdown()
        node.stop()
        raise
    monitor = _Liveness(workers, args.tp_size)
    monitor.start()

    def stop() -> None:
        monitor.stop()
        for w in workers:
            with contextlib.suppress(Exception):  # already dead
                ray.kill(w)
        ray.shutdown()
        node.stop()
        with contextlib.suppress(Exception):
            torch_dist.destroy_process_group()

    executor = GroupExecutor(runner, group, monitor.alive, stop)
    executor.worker_pids = ray.get([w.pid.remote() for w in workers])  # type: ignore[attr-defined]
    log.info("Ray TP group of %d shards over %d nodes ready", args.tp_size, args.nnodes)
    return executor, time.monotonic() - started


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _driver_gpu(args: ServeArgs, workers) -> int:
    """The local GPU left for shard 0 after Ray assigned GPUs to the actors on this node."""
    if args.device != "cuda":
        return 0
    import ray
    import torch

    infos = ray.get([w.placement.remote() for w in workers])
    taken = {int(g) for ip, gpus in infos if ip == args.host for g in gpus}
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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ling-ray-liveness", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def alive(self) -> tuple[int, int]:
        return self._alive, self.tp_size

    def _run(self) -> None:
        import ray

        while not self._stop.is_set():
            count = 1
            for w in self.workers:
                try:
                    ray.get(w.ping.remote(), timeout=PING_TIMEOUT_S)
                    count += 1
                except Exception:  # RayActorError, GetTimeoutError, a failed step loop
                    pass
            self._alive = count
            self._stop.wait(PING_INTERVAL_S)


def run_worker_node(args: ServeArgs) -> int:
    """Node rank > 0: join the head's Ray cluster, answer /health, exit when the head is gone."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    node = start_node(args)
    head = args.ray_address or f"{args.dist_host_port[0]}:{args.ray_port}"
    state = {"head_lost_since": None}
    app = FastAPI(docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = node.alive() and state["head_lost_since"] is None
        reason = "ok" if ok else ("Ray node exited" if not node.alive() else f"Ray head {head} unreachable")
        return JSONResponse(
            {"status": "ok" if ok else "unhealthy", "reason": reason}, status_code=200 if ok else 503
        )

    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))

    def watch() -> None:
        while not server.should_exit:
            if not node.alive():
                log.error("Ray node exited; stopping")
                server.should_exit = True
                break
            if port_open(*_split(head)):
                state["head_lost_since"] = None
            elif state["head_lost_since"] is None:
                state["head_lost_since"] = time.monotonic()
            elif time.monotonic() - state["head_lost_since"] > 15:
                log.error("Ray head %s unreachable for 15s; stopping so the group restarts", head)
                server.should_exit = True
                break
            time.sleep(1)

    threading.Thread(target=watch, daemon=True).start()
    from ling_runtime.server.launch import ignore_reraised_signals

    ignore_reraised_signals()
    try:
        server.run()
    finally:
        node.stop()
    return 0 if state["head_lost_since"] is None and node.alive() else 1
