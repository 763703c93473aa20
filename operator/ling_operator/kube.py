"""The operator's API calls, in one place: JSON in, JSON out, each with a timeout, each counted.

Every call asks for the raw reply (`_preload_content=False`): the kubernetes client would otherwise build
its model classes from each answer, which costs more CPU than the request itself, and the operator
keeps only a few fields of what comes back (cache.py). These calls block; the controller runs them on
its I/O threads.

Every call has a timeout (`timeout` seconds for the whole request): a black-holed connection must turn
into an error the operator can act on (stop leading, record a failed write), never a pass that hangs and
finishes its writes long after the Lease moved. urllib3 retries nothing: a retry would multiply the
timeout the caller chose (the writer derives it from the time left on the Lease). An answer that never
came raises `Unreachable`, a subclass of `ApiException` (status 0), so callers handle both alike.
Every request is counted in `ling_operator_api_requests_total{verb,resource,code}`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from ling_operator import api, metrics, resources

# Threads that carry one pass's concurrent writes (and the leader loop, scrapes and LISTs). The client's
# urllib3 pool must hold as many connections, or it drops the extra ones after each request.
IO_THREADS = 16
MANAGED = f"{resources.LABEL_MANAGED_BY}={resources.MANAGED_BY}"
# Seconds a read (LIST, GET) may take; writes get theirs from the writer (at most the Lease's time left).
READ_TIMEOUT = 30.0


class Unreachable(ApiException):
    """No HTTP answer: the request timed out or the connection failed (`code` is timeout or connection)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(status=0, reason=f"{code}: {detail}")
        self.code = code


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
    # No urllib3 retries: each would get the whole timeout again (see the module docstring). A pooled
    # connection the server closed is still replaced before use (urllib3 checks it is not dropped).
    cfg.retries = False
    return client.ApiClient(cfg)


def read_body(resp: Any) -> bytes:
    """Read a raw reply whole and hand its connection back to the pool. Without this a raw reply keeps
    its connection, and the next request opens a new one: a TLS handshake per request."""
    try:
        return resp.data
    finally:
        resp.release_conn()


@contextlib.contextmanager
def _counted(verb: str, resource: str) -> Iterator[list[str]]:
    """Count one request by verb, resource and code (the caller sets `code[0]` from the reply) and turn
    an answer that never came into `Unreachable`."""
    started = time.monotonic()
    code = ["unknown"]
    try:
        yield code
    except Unreachable:
        raise
    except ApiException as exc:
        if not exc.status:  # the client's own wrapping of a TLS failure: no answer either
            code[0] = "connection"
            raise Unreachable(code[0], str(exc.reason)) from exc
        code[0] = str(exc.status)
        raise
    except (urllib3.exceptions.TimeoutError, TimeoutError) as exc:
        code[0] = "timeout"
        raise Unreachable(code[0], "the API server did not answer in time") from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        code[0] = "connection"
        raise Unreachable(code[0], str(exc) or type(exc).__name__) from exc
    finally:
        metrics.api_requests_total.labels(verb, resource, code[0]).inc()
        metrics.api_request_duration_seconds.labels(verb).observe(time.monotonic() - started)


def request(
    verb: str, resource: str, call: Callable[..., Any], *args: Any, timeout: float, **kw: Any
) -> bytes:
    """One API request with a timeout, counted by verb, resource and code; the reply's body."""
    with _counted(verb, resource) as code:
        resp = call(*args, _preload_content=False, _request_timeout=max(timeout, 0.05), **kw)
        code[0] = str(resp.status)  # 2xx: the client raises for anything else
        return read_body(resp)


def open_stream(
    verb: str,
    resource: str,
    call: Callable[..., Any],
    *args: Any,
    timeout: tuple[float, float],
    **kw: Any,
) -> Any:
    """A streamed request (a WATCH), counted like `request`: the open urllib3 reply, to be read and then
    released by the caller. `timeout` is (connect, read): the read timeout bounds each silence."""
    with _counted(verb, resource) as code:
        resp = call(*args, _preload_content=False, _request_timeout=timeout, **kw)
        code[0] = str(resp.status)
        return resp


def _json(body: bytes) -> dict[str, Any]:
    return json.loads(body)


def api_message(exc: ApiException) -> str:
    """What the API server said (its Status message), else the HTTP reason."""
    try:
        message = json.loads(exc.body or "").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or exc.reason or f"HTTP {exc.status}")


def _watch_args(rv: str | None, seconds: int, timeout: tuple[float, float], **kw: Any) -> dict[str, Any]:
    return {
        "watch": True,
        "allow_watch_bookmarks": True,
        "timeout_seconds": seconds,
        "resource_version": rv,
        "timeout": timeout,
        **kw,
    }


class Kube:
    def __init__(self, api_client_: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api_client_)
        self.custom = client.CustomObjectsApi(api_client_)
        self.coordination = client.CoordinationV1Api(api_client_)

    # The call that LISTs (or, with watch=True, WATCHes) a kind in `ns` (None: every namespace), and its
    # positional arguments; the operator's pods and Services carry the managed-by label.

    def _deployments(self, ns: str | None) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        if ns is None:
            return self.custom.list_cluster_custom_object, (api.GROUP, api.VERSION, api.PLURAL)
        return self.custom.list_namespaced_custom_object, (api.GROUP, api.VERSION, ns, api.PLURAL)

    def _pods(self, ns: str | None) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (
            (self.core.list_pod_for_all_namespaces, ())
            if ns is None
            else (self.core.list_namespaced_pod, (ns,))
        )

    # -- LISTs (the leader's seeding and resyncs, and each watch's start) ---------------------------------

    def list_deployments(self, ns: str | None) -> dict[str, Any]:
        call, args = self._deployments(ns)
        return _json(request("list", api.PLURAL, call, *args, timeout=READ_TIMEOUT))

    def list_pods(self, ns: str | None) -> dict[str, Any]:
        call, args = self._pods(ns)
        return _json(request("list", "pods", call, *args, label_selector=MANAGED, timeout=READ_TIMEOUT))

    def list_services(self, ns: str | None) -> dict[str, Any]:
        call, args = (
            (self.core.list_service_for_all_namespaces, ())
            if ns is None
            else (self.core.list_namespaced_service, (ns,))
        )
        return _json(request("list", "services", call, *args, label_selector=MANAGED, timeout=READ_TIMEOUT))

    # -- WATCHes (watch.py): the open stream, from `rv`, bookmarks on, ended by the server after `seconds`

    def watch_deployments(
        self, ns: str | None, rv: str | None, seconds: int, timeout: tuple[float, float]
    ) -> Any:
        call, args = self._deployments(ns)
        return open_stream("watch", api.PLURAL, call, *args, **_watch_args(rv, seconds, timeout))

    def watch_pods(self, ns: str | None, rv: str | None, seconds: int, timeout: tuple[float, float]) -> Any:
        call, args = self._pods(ns)
        kw = _watch_args(rv, seconds, timeout, label_selector=MANAGED)
        return open_stream("watch", "pods", call, *args, **kw)

    # -- writes (the writer passes the timeout: at most the time left on the Lease) --------------------------

    def create_service(self, ns: str, svc: dict[str, Any], timeout: float) -> None:
        """Create a Service; one that exists already is fine."""
        try:
            request("create", "services", self.core.create_namespaced_service, ns, svc, timeout=timeout)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def create_pod(self, ns: str, pod: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """The created pod, or None when one of that name exists (the watch brings it)."""
        try:
            return _json(request("create", "pods", self.core.create_namespaced_pod, ns, pod, timeout=timeout))
        except ApiException as exc:
            if exc.status != 409:
                raise
            return None

    def delete_pod(self, ns: str, name: str, uid: str | None, timeout: float) -> bool:
        """True when the delete was accepted, False when that pod was already gone.

        With `uid` the delete is preconditioned on it: a pod of the same name created since (by another
        replica, after this one's decision) is never deleted in its place; the API answers 409."""
        body = {"preconditions": {"uid": uid}} if uid else None
        try:
            request("delete", "pods", self.core.delete_namespaced_pod, name, ns, body=body, timeout=timeout)
        except ApiException as exc:
            if exc.status == 404 or (uid and exc.status == 409):
                return False
            raise
        return True

    def patch_status(
        self, ns: str, name: str, patch: dict[str, Any], resource_version: int | None, timeout: float
    ) -> dict[str, Any]:
        """Merge-patch the status subresource; returns the object as stored after the patch.

        With `resource_version` the patch applies only to that version of the object (409 otherwise):
        a status computed from an older object (a pass that was held up) never overwrites a newer one."""
        body: dict[str, Any] = {"status": patch}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": str(resource_version)}
        return _json(
            request(
                "patch", f"{api.PLURAL}/status", self.custom.patch_namespaced_custom_object_status,
                api.GROUP, api.VERSION, ns, api.PLURAL, name, body,
                _content_type="application/merge-patch+json", timeout=timeout,
            )
        )  # fmt: skip

    def scale(self, ns: str, name: str, replicas: int, timeout: float) -> dict[str, Any]:
        """Set spec.replicas through the scale subresource; returns the object as stored afterwards."""
        request(
            "patch", f"{api.PLURAL}/scale", self.custom.patch_namespaced_custom_object_scale,
            api.GROUP, api.VERSION, ns, api.PLURAL, name, {"spec": {"replicas": replicas}},
            _content_type="application/merge-patch+json", timeout=timeout,
        )  # fmt: skip
        # The reply is a Scale, not the object: read the object back so the next pass (often before the
        # watch event) starts from the new spec.replicas instead of deciding the same step again.
        return _json(
            request(
                "get", api.PLURAL, self.custom.get_namespaced_custom_object,
                api.GROUP, api.VERSION, ns, api.PLURAL, name, timeout=READ_TIMEOUT,
            )
        )  # fmt: skip

    def create_event(self, ns: str, event: dict[str, Any], timeout: float) -> None:
        request("create", "events", self.core.create_namespaced_event, ns, event, timeout=timeout)

    def read_secret(self, ns: str, name: str, key: str) -> str:
        secret = _json(
            request("get", "secrets", self.core.read_namespaced_secret, name, ns, timeout=READ_TIMEOUT)
        )
        data = (secret.get("data") or {}).get(key)
        if data is None:
            raise ValueError(
                f"spec.autoscaling.source.prometheus.authSecretRef: Secret {name} has no key {key}"
            )
        return base64.b64decode(data).decode()

    # -- the Lease (leader.py) ---------------------------------------------------------------------------

    def read_lease(self, ns: str, name: str, timeout: float) -> dict[str, Any]:
        return _json(
            request("get", "leases", self.coordination.read_namespaced_lease, name, ns, timeout=timeout)
        )

    def replace_lease(self, ns: str, name: str, lease: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Write the Lease back; its metadata.resourceVersion makes this fail (409) if it moved since."""
        return _json(
            request(
                "update",
                "leases",
                self.coordination.replace_namespaced_lease,
                name,
                ns,
                lease,
                timeout=timeout,
            )
        )

    def create_lease(self, ns: str, lease: dict[str, Any], timeout: float) -> dict[str, Any]:
        return _json(
            request("create", "leases", self.coordination.create_namespaced_lease, ns, lease, timeout=timeout)
        )
