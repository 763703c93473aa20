"""Bad LingDeployment manifests, shared by tests/test_api.py (pydantic) and tests/cluster/test_crd_validation.py
(the real API server): each one must be rejected by both, with an error naming the field.

Every case starts from `valid_manifest()` (accepted by both) and changes one thing, so a rejection can
only come from that change.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Manifest = dict[str, Any]


def valid_manifest(name: str = "ling-case") -> Manifest:
    """A small valid LingDeployment: the built-in model on CPU, TP 2 over 2 pods, MTP on."""
    return {
        "apiVersion": "serving.ling.dev/v1alpha1",
        "kind": "LingDeployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "model": {"source": {"builtin": {}}},
            "engine": {"type": "native", "device": "cpu"},
            "parallelism": {"tensor": 2, "gpusPerPod": 1},
            "speculative": {"enabled": True, "numSteps": 3, "topK": 1, "numDraftTokens": 4},
            "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3},
            "template": {"resources": {"requests": {"cpu": "100m", "memory": "256Mi"}}},
        },
    }


@dataclass(frozen=True)
class BadCase:
    id: str
    change: Callable[[Manifest], None]
    # Every string must appear in the error (the field's path first).
    expect: tuple[str, ...]

    def manifest(self, name: str = "ling-case") -> Manifest:
        m = copy.deepcopy(valid_manifest(name))
        self.change(m)
        return m


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    """A change that sets a dotted path (creating maps on the way)."""

    def change(m: Manifest) -> None:
        *parents, last = path.split(".")
        node = m
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return change


def _all(*changes: Callable[[Manifest], None]) -> Callable[[Manifest], None]:
    def change(m: Manifest) -> None:
        for c in changes:
            c(m)

    return change


def _delete(path: str) -> Callable[[Manifest], None]:
    def change(m: Manifest) -> None:
        *parents, last = path.split(".")
        node = m
        for key in parents:
            node = node[key]
        del node[last]

    return change


BAD_CASES: tuple[BadCase, ...] = (
    BadCase(
        "tensor-not-divisible",
        _set("spec.parallelism", {"tensor": 4, "gpusPerPod": 3}),
        ("spec.parallelism.tensor", "divisible"),
    ),
    BadCase(
        "native-tensor-8",
        _set("spec.parallelism", {"tensor": 8, "gpusPerPod": 8}),
        ("spec.parallelism.tensor", "1, 2 or 4"),
    ),
    BadCase(
        "autoscaling-min-above-max",
        _set("spec.autoscaling", {"enabled": False, "minReplicas": 5, "maxReplicas": 2}),
        ("spec.autoscaling.minReplicas",),
    ),
    BadCase(
        "replicas-above-autoscaling-max",
        _set("spec.replicas", 5),
        ("spec.replicas", "maxReplicas"),
    ),
    BadCase(
        "replicas-zero-without-scale-to-zero",
        _set("spec.replicas", 0),
        ("spec.replicas", "minReplicas"),
    ),
    BadCase(
        "mtp-draft-tokens-inconsistent",
        _set("spec.speculative.numDraftTokens", 5),
        ("spec.speculative.numDraftTokens", "numSteps + 1"),
    ),
    BadCase(
        "two-model-sources",
        _set("spec.model.source", {"builtin": {}, "hostPath": {"path": "/models/ling"}}),
        ("spec.model.source", "exactly one"),
    ),
    BadCase(
        "no-model-source",
        _set("spec.model.source", {}),
        ("spec.model.source", "exactly one"),
    ),
    BadCase(
        "model-missing",
        _delete("spec.model"),
        ("spec.model",),
    ),
    BadCase(
        "name-too-long",
        _set("metadata.name", "l" * 57),
        ("metadata.name", "56"),
    ),
    BadCase(
        "name-with-dot",
        _set("metadata.name", "ling.tiny"),
        ("metadata.name", "DNS-1035"),
    ),
    BadCase(
        "engine-type-enum",
        _set("spec.engine.type", "tgi"),
        ("spec.engine.type", "native"),
    ),
    BadCase(
        "dtype-enum",
        _set("spec.model.dtype", "fp16"),
        ("spec.model.dtype", "bf16"),
    ),
    BadCase(
        "negative-memory-limit",
        _set("spec.template.resources.limits", {"memory": "-1Gi"}),
        ("spec.template.resources.limits", "positive"),
    ),
    BadCase(
        "zero-cpu-request",
        _set("spec.template.resources.requests", {"cpu": "0"}),
        ("spec.template.resources.requests", "positive"),
    ),
    BadCase(
        "malformed-quantity",
        _set("spec.template.resources.requests", {"memory": "lots"}),
        ("spec.template.resources.requests",),
    ),
    BadCase(
        "unknown-field-nested",
        _set("spec.engine.tensorParallel", 4),
        ("spec.engine.tensorParallel",),
    ),
    BadCase(
        "unknown-field-typo",
        _set("spec.replica", 2),
        ("spec.replica",),
    ),
    BadCase(
        "negative-replicas",
        _all(_set("spec.replicas", -1), _set("spec.autoscaling.enabled", False)),
        ("spec.replicas",),
    ),
    BadCase(
        "sglang-without-image",
        _all(
            _set("spec.engine", {"type": "sglang"}),
            _set("spec.model.source", {"pvc": {"claimName": "weights"}}),
        ),
        ("spec.engine.image",),
    ),
    BadCase(
        "prometheus-source-without-settings",
        _set("spec.autoscaling.source", {"type": "prometheus"}),
        ("spec.autoscaling.source.prometheus",),
    ),
    BadCase(
        "rollout-no-progress",
        _set("spec.rollout", {"maxUnavailable": 0, "maxSurge": 0}),
        ("spec.rollout.maxUnavailable",),
    ),
    BadCase(
        "backoff-above-max",
        _set("spec.failurePolicy", {"backoffSeconds": 600, "maxBackoffSeconds": 300}),
        ("spec.failurePolicy.backoffSeconds",),
    ),
    BadCase(
        "mem-fraction-above-one",
        _set("spec.runtime.memFractionStatic", 1.5),
        ("spec.runtime.memFractionStatic",),
    ),
    BadCase(
        "cpu-device-with-vllm",
        _all(
            _set("spec.engine", {"type": "vllm", "image": "vllm/vllm-openai:latest", "device": "cpu"}),
            _set("spec.model.source", {"pvc": {"claimName": "weights"}}),
        ),
        ("spec.engine.device",),
    ),
    BadCase(
        "builtin-with-sglang",
        _set("spec.engine", {"type": "sglang", "image": "lmsysorg/sglang:latest"}),
        ("spec.model.source.builtin",),
    ),
    BadCase(
        "extra-args-as-string",
        _set("spec.engine.extraArgs", "--trust-remote-code --foo"),
        ("spec.engine.extraArgs",),
    ),
    BadCase(
        "host-path-relative",
        _set("spec.model.source", {"hostPath": {"path": "models/ling"}}),
        ("spec.model.source.hostPath.path",),
    ),
    BadCase(
        "yarn-factor-below-one",
        _set("spec.model.ropeScaling", {"factor": 0.5}),
        ("spec.model.ropeScaling.factor",),
    ),
    BadCase(
        "yarn-partial-rotary-above-one",
        _set("spec.model.ropeScaling", {"factor": 2.0, "partialRotaryFactor": 1.5}),
        ("spec.model.ropeScaling.partialRotaryFactor",),
    ),
    # Fields an engine cannot honour: refused at apply, never dropped, never a crash loop.
    BadCase(
        "native-mtp-topk-above-one",
        _set("spec.speculative", {"enabled": True, "topK": 2, "numSteps": 3, "numDraftTokens": 6}),
        ("spec.speculative.topK", "native"),
    ),
    BadCase(
        "native-tool-parser-not-qwen25",
        _set("spec.runtime.toolCallParser", "llama3"),
        ("spec.runtime.toolCallParser", "qwen25"),
    ),
    BadCase(
        "vllm-with-mtp",
        _all(
            _set("spec.engine", {"type": "vllm", "image": "vllm/vllm-openai:v0.21.0"}),
            _set("spec.model.source", {"pvc": {"claimName": "weights"}}),
        ),
        ("spec.speculative.enabled", "vllm"),
    ),
    BadCase(
        "vllm-max-mamba-cache-size",
        _all(
            _set("spec.engine", {"type": "vllm", "image": "vllm/vllm-openai:v0.21.0"}),
            _set("spec.model.source", {"pvc": {"claimName": "weights"}}),
            _set("spec.speculative.enabled", False),
            _set("spec.runtime.maxMambaCacheSize", 256),
        ),
        ("spec.runtime.maxMambaCacheSize", "vllm"),
    ),
    BadCase(
        "vllm-watchdog",
        _all(
            _set("spec.engine", {"type": "vllm", "image": "vllm/vllm-openai:v0.21.0"}),
            _set("spec.model.source", {"pvc": {"claimName": "weights"}}),
            _set("spec.speculative.enabled", False),
            _set("spec.runtime.watchdogTimeoutSeconds", 600),
        ),
        ("spec.runtime.watchdogTimeoutSeconds", "vllm"),
    ),
    BadCase(
        "vllm-max-queued-requests",
        _all(
            _set("spec.engine", {"type": "vllm", "image": "vllm/vllm-openai:v0.21.0"}),
            _set("spec.model.source", {"pvc": {"claimName": "weights"}}),
            _set("spec.speculative.enabled", False),
            _set("spec.runtime.maxQueuedRequests", 100),
        ),
        ("spec.runtime.maxQueuedRequests", "vllm"),
    ),
    BadCase(
        "sglang-api-key-secret",
        _all(
            _set("spec.engine", {"type": "sglang", "image": "lmsysorg/sglang:v0.5.10.post1"}),
            _set("spec.model.source", {"pvc": {"claimName": "weights"}}),
            _set("spec.runtime.apiKeySecretRef", {"name": "api", "key": "key"}),
        ),
        ("spec.runtime.apiKeySecretRef", "sglang"),
    ),
    BadCase(
        "gang-without-queue",
        _set("spec.placement.gang", {"enabled": True}),
        ("spec.placement.gang.queueName",),
    ),
    BadCase(
        "placement-key-not-a-label",
        _set("spec.placement.groupTopologyKey", "rack id"),
        ("spec.placement.groupTopologyKey",),
    ),
    BadCase(
        "hugging-face-endpoint-not-http",
        _set("spec.model.source", {"huggingFace": {"repo": "org/name", "endpoint": "ftp://mirror"}}),
        ("spec.model.source.huggingFace.endpoint",),
    ),
    BadCase(
        "drain-timeout-zero",
        _set("spec.runtime.drainTimeoutSeconds", 0),
        ("spec.runtime.drainTimeoutSeconds",),
    ),
)
