"""`python -m e2e.executor --kubeconfig K --node NAME [...]`: run the pod executor until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from e2e.executor.runner import Executor, Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m e2e.executor", description=__doc__)
    p.add_argument("--kubeconfig", required=True, help="kubeconfig of the local control plane")
    p.add_argument(
        "--node", action="append", required=True, dest="nodes", help="node to register (repeatable)"
    )
    p.add_argument(
        "--pod-cidr", default="127.61.0.0/16", help="loopback range for pod IPs (inside 127.0.0.0/8)"
    )
    p.add_argument("--cpu", default="2", help="allocatable cpu per node")
    p.add_argument("--memory", default="24Gi", help="allocatable memory per node")
    p.add_argument("--max-pods", type=int, default=32)
    p.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu to advertise (pods still run on CPU)")
    p.add_argument("--state-dir", type=Path, default=Settings.state_dir, help="pod dirs and container logs")
    p.add_argument("--hosts-file", type=Path, default=Path("/etc/hosts"))
    p.add_argument("--label", action="append", default=[], help="extra node label KEY=VALUE (repeatable)")
    p.add_argument("--keep-nodes", action="store_true", help="leave the Node objects on exit")
    p.add_argument(
        "--exit-after-api-loss",
        type=float,
        default=120.0,
        help="stop every pod and exit when the API server is unreachable this long (0: never)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--label {item!r}: expected KEY=VALUE")
        labels[key] = value
    settings = Settings(
        nodes=args.nodes,
        kubeconfig=args.kubeconfig,
        pod_cidr=args.pod_cidr,
        cpu=args.cpu,
        memory=args.memory,
        max_pods=args.max_pods,
        gpus=args.gpus,
        state_dir=args.state_dir,
        hosts_file=args.hosts_file,
        delete_nodes_on_exit=not args.keep_nodes,
        extra_labels=labels,
        exit_after_api_loss_s=args.exit_after_api_loss,
    )
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    executor = Executor(settings)
    try:
        executor.start()
        logging.getLogger("ling_e2e.executor").info("running pods of node(s) %s", ", ".join(args.nodes))
        while not done.wait(1.0) and not executor.api_lost.is_set():
            pass
    finally:
        executor.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
