"""The operator's API calls, in one place: JSON in, JSON out.

Every call asks for the raw reply (`_preload_content=False`): the kubernetes client would otherwise build
its model classes from each answer, which costs more CPU than the request itself, and the operator
keeps only a few fields of what comes back (cache.py). These calls block; the controller runs them on
its I/O threads.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from ling_operator import api, resources

# Threads that carry one pass's concurrent writes (and the leader loop, scrapes and LISTs). The client's
# urllib3 pool must hold as many connections, or it drops the extra ones after each request.
IO_THREADS = 16
MANAGED = f"{resources.LABEL_MANAGED_BY}={resources.MANAGED_BY}"


def api_client(kubeconfig: str | None) -> client.ApiClient:
    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            config.load_kube_config(client_configuration=cfg)
    cfg.connection_pool_maxsize = IO_THREADS + 4
    return client.ApiClient(cfg)


def read_body(resp: Any) -> bytes:
    """Read a raw reply whole and hand its connection back to the pool. Without this a raw reply keeps
    its connection, and the next request opens a new one: a TLS handshake per request."""
    try:
        return resp.data
    finally:
        resp.release_conn()


def _json(resp: Any) -> dict[str, Any]:
    return json.loads(read_body(resp))


class Kube:
    def __init__(self, api_client_: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api_client_)
        self.custom = client.CustomObjectsApi(api_client_)
        self.coordination = client.CoordinationV1Api(api_client_)

    # -- LISTs (the leader's seeding and resyncs) ---------------------------------------------------------

    def list_deployments(self, ns: str | None) -> dict[str, Any]:
        if ns is None:
            return _json(
                self.custom.list_cluster_custom_object(
                    api.GROUP, api.VERSION, api.PLURAL, _preload_content=False
                )
            )
        return _json(
            self.custom.list_namespaced_custom_object(
                api.GROUP, api.VERSION, ns, api.PLURAL, _preload_content=False
            )
        )

    def list_pods(self, ns: str | None) -> dict[str, Any]:
        kw: dict[str, Any] = {"label_selector": MANAGED, "_preload_content": False}
        if ns is None:
            return _json(self.core.list_pod_for_all_namespaces(**kw))
        return _json(self.core.list_namespaced_pod(ns, **kw))

    def list_services(self, ns: str | None) -> dict[str, Any]:
        kw: dict[str, Any] = {"label_selector": MANAGED, "_preload_content": False}
        if ns is None:
            return _json(self.core.list_service_for_all_namespaces(**kw))
        return _json(self.core.list_namespaced_service(ns, **kw))

    # -- writes --------------------------------------------------------------------------------------------

    def create_service(self, ns: str, svc: dict[str, Any]) -> None:
        """Create a Service; one that exists already is fine."""
        try:
            read_body(self.core.create_namespaced_service(ns, svc, _preload_content=False))
        except ApiException as exc:
            if exc.status != 409:
                raise

    def create_pod(self, ns: str, pod: dict[str, Any]) -> dict[str, Any] | None:
        """The created pod, or None when one of that name exists (the watch brings it)."""
        try:
            return _json(self.core.create_namespaced_pod(ns, pod, _preload_content=False))
        except ApiException as exc:
            if exc.status != 409:
                raise
            return None

    def delete_pod(self, ns: str, name: str) -> bool:
        """True when the delete was accepted, False when the pod was already gone."""
        try:
            read_body(self.core.delete_namespaced_pod(name, ns, _preload_content=False))
        except ApiException as exc:
            if exc.status != 404:
                raise
            return False
        return True

    def patch_status(self, ns: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch the status subresource; returns the object as stored after the patch."""
        return _json(
            self.custom.patch_namespaced_custom_object_status(
                api.GROUP,
                api.VERSION,
                ns,
                api.PLURAL,
                name,
                {"status": patch},
                _content_type="application/merge-patch+json",
                _preload_content=False,
            )
        )

    def scale(self, ns: str, name: str, replicas: int) -> dict[str, Any]:
        """Set spec.replicas through the scale subresource; returns the object as stored afterwards."""
        read_body(
            self.custom.patch_namespaced_custom_object_scale(
                api.GROUP,
                api.VERSION,
                ns,
                api.PLURAL,
                name,
                {"spec": {"replicas": replicas}},
                _content_type="application/merge-patch+json",
                _preload_content=False,
            )
        )
        # The reply is a Scale, not the object: read the object back so the next pass (often before the
        # watch event) starts from the new spec.replicas instead of deciding the same step again.
        return _json(
            self.custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, ns, api.PLURAL, name, _preload_content=False
            )
        )

    def create_event(self, ns: str, event: dict[str, Any]) -> None:
        read_body(self.core.create_namespaced_event(ns, event, _preload_content=False))

    def read_secret(self, ns: str, name: str, key: str) -> str:
        secret = _json(self.core.read_namespaced_secret(name, ns, _preload_content=False))
        data = (secret.get("data") or {}).get(key)
        if data is None:
            raise ValueError(
                f"spec.autoscaling.source.prometheus.authSecretRef: Secret {name} has no key {key}"
            )
        return base64.b64decode(data).decode()
