"""`ling-operator` (also `python -m ling_operator`): run the LingDeployment operator."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import uuid

DEFAULT_METRICS_PORT = 8080
DEFAULT_HEALTH_PORT = 8081


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ling-operator",
        description="Reconcile LingDeployments into rendezvous-gated serving groups.",
    )
    parser.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG") or None,
        help="kubeconfig file (default: in-cluster config, then $KUBECONFIG / ~/.kube/config)",
    )
    parser.add_argument(
        "--namespace",
        action="append",
        default=[],
        dest="namespaces",
        help="namespace to watch (repeatable; default: all namespaces)",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=DEFAULT_METRICS_PORT, help="Prometheus port (0: off)"
    )
    parser.add_argument(
        "--metrics-address", default="0.0.0.0", help="address of the metrics and health endpoints"
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=DEFAULT_HEALTH_PORT,
        help="liveness endpoint /healthz port (0: off)",
    )
    parser.add_argument(
        "--runtime-image",
        default=os.environ.get("LING_RUNTIME_IMAGE") or None,
        help="image of the native engine when spec.engine.image is unset",
    )
    parser.add_argument("--lease-name", default="ling-operator", help="leader-election Lease name")
    parser.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE") or None,
        help="namespace of the Lease (default: $POD_NAMESPACE, else the first --namespace, else default)",
    )
    parser.add_argument("--lease-duration", type=float, default=15.0, help="seconds a leader holds the Lease")
    parser.add_argument(
        "--renew-deadline",
        type=float,
        default=None,
        help="seconds after its last renewal that a leader may still act (default: 2/3 of --lease-duration; "
        "must be shorter: a leader that cannot renew stops this much before a standby may take over)",
    )
    parser.add_argument(
        "--max-retry-seconds",
        type=float,
        default=60.0,
        help="longest backoff of a write the API refused (quota, webhook, RBAC) or of a failed pass",
    )
    parser.add_argument(
        "--resync-seconds", type=float, default=30.0, help="seconds between full resyncs of every deployment"
    )
    parser.add_argument(
        "--identity",
        default=None,
        help="this replica's name in the Lease (default: $POD_NAME or hostname, plus a random suffix)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for port_flag in ("metrics_port", "health_port"):
        if not 0 <= getattr(args, port_flag) <= 65535:
            raise SystemExit(f"--{port_flag.replace('_', '-')} must be 0..65535")
    if args.lease_duration < 2:
        raise SystemExit("--lease-duration must be at least 2 seconds")
    if args.renew_deadline is not None and not 0 < args.renew_deadline < args.lease_duration:
        raise SystemExit("--renew-deadline must be positive and shorter than --lease-duration")
    if args.max_retry_seconds < 1:
        raise SystemExit("--max-retry-seconds must be at least 1")
    if args.resync_seconds <= 0:
        raise SystemExit("--resync-seconds must be positive")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kopf's per-event "Handler succeeded" lines would drown what the operator decides and why.
    if not args.verbose:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # kopf logs in through the kubernetes client's default config: point it at the same file.
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig

    # Imported late so `--help` works without a cluster library import cost.
    import kopf

    from ling_operator import (
        controller,
        handlers,  # noqa: F401  (importing it registers the kopf handlers)
        kube,
        metrics,
        resources,
    )

    identity = args.identity or f"{os.environ.get('POD_NAME') or socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    settings = controller.Settings(
        namespaces=list(args.namespaces),
        kubeconfig=args.kubeconfig,
        default_image=args.runtime_image or resources.DEFAULT_RUNTIME_IMAGE,
        lease_name=args.lease_name,
        lease_namespace=args.lease_namespace or (args.namespaces[0] if args.namespaces else "default"),
        lease_duration=args.lease_duration,
        identity=identity,
        resync_seconds=args.resync_seconds,
        renew_deadline=args.renew_deadline,
        retry_max_seconds=args.max_retry_seconds,
    )
    operator = controller.Controller(settings, kube.api_client(args.kubeconfig))
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
    liveness = f"http://{args.metrics_address}:{args.health_port}/healthz" if args.health_port else None
    logging.getLogger("ling_operator").info(
        "starting as %s; watching %s; Lease %s/%s",
        identity,
        ", ".join(settings.namespaces) or "all namespaces",
        settings.lease_namespace,
        settings.lease_name,
    )
    kopf.run(
        standalone=True,  # no kopf peering: the Lease decides who acts (see leader.py)
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=liveness,
        memo=kopf.Memo(controller=operator),
    )
    return 0
