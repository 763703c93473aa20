"""The LingDeployment API (serving.ling.dev/v1alpha1) as pydantic v2 models.

This module is the single source of truth: `crd.py` renders the CRD (OpenAPI schema, defaults, CEL rules,
printer columns) and docs/api.md from these classes, and the operator validates a spec with the same rules
the API server enforces. Every cross-field rule is declared once as a `CelRule` carrying both its CEL
expression (for the API server) and a Python predicate (for the operator), so the two cannot drift apart
without a test noticing.

Python field names are snake_case; the wire format is camelCase (alias generator). Models accept either
name (`validate_by_name`) and dump camelCase by default, so `LingDeploymentSpec.model_validate(cr["spec"])`
works on a spec exactly as stored by the API server, and `status.to_k8s()` gives a dict ready to patch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

from ling_operator.timeutil import format_time

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "MAX_GROUPS",
    "MAX_NAME_LENGTH",
    "MAX_TENSOR",
    "NATIVE_TENSOR_SIZES",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "VERSION",
    "CelRule",
    "ConditionType",
    "LingDeployment",
    "LingDeploymentSpec",
    "LingDeploymentStatus",
    "Reason",
    "ValidationError",
    "parse_quantity",
    "validate_name",
]

# ---------------------------------------------------------------------------------------------------------
# Names of the API.

GROUP = "serving.ling.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LingDeployment"
PLURAL = "lingdeployments"
SINGULAR = "lingdeployment"
SHORT_NAMES = ("lingd",)
CATEGORIES = ("ling",)
CRD_NAME = f"{PLURAL}.{GROUP}"

# Bounds that keep generated names valid. Pods are named `<name>-<group>-<rank>` and must be DNS-1123
# labels (63 characters): group indices stay below MAX_GROUPS (3 digits) and ranks below MAX_TENSOR
# (2 digits), so the longest suffix is `-999-63` (7 characters).
MAX_GROUPS = 1000
MAX_TENSOR = 64
MAX_NAME_LENGTH = 63 - len(f"-{MAX_GROUPS - 1}-{MAX_TENSOR - 1}")
# Pods also carry `hostname: <name>-<g>-<r>` and Services are DNS-1035 labels: no dots, start with a letter.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

# Linear-attention TP constraint of Ling-2.6 (reference/model.md §6): group_norm_size=4 must be divisible
# by the attention TP size, so our native runtime supports only these tensor-parallel sizes.
NATIVE_TENSOR_SIZES = (1, 2, 4)

EngineType = Literal["native", "sglang", "vllm"]
Device = Literal["cuda", "cpu"]
Dtype = Literal["bf16", "fp8"]
PullPolicy = Literal["Always", "IfNotPresent", "Never"]
GroupPhase = Literal["Pending", "Forming", "Loading", "Ready", "Restarting", "Failed"]
ConditionStatus = Literal["True", "False", "Unknown"]
SourceType = Literal["engine", "prometheus"]

ENGINE_TYPES: tuple[str, ...] = ("native", "sglang", "vllm")
GROUP_PHASES: tuple[str, ...] = ("Pending", "Forming", "Loading", "Ready", "Restarting", "Failed")


class ConditionType:
    """`status.conditions[].type` values."""

    READY = "Ready"
    PROGRESSING = "Progressing"
    RENDEZVOUS_READY = "RendezvousReady"
    DEGRADED = "Degraded"
    SCALING_ACTIVE = "ScalingActive"
    SCALING_LIMITED = "ScalingLimited"
    ALL: tuple[str, ...] = (READY, PROGRESSING, RENDEZVOUS_READY, DEGRADED, SCALING_ACTIVE, SCALING_LIMITED)


class Reason:
    """`status.conditions[].reason` (and event reason) values: CamelCase, one per situation a person acts on."""

    # Ready
    ALL_GROUPS_READY = "AllGroupsReady"
    GROUPS_NOT_READY = "GroupsNotReady"
    SCALED_TO_ZERO = "ScaledToZero"
    # Progressing
    ROLLING_UPDATE = "RollingUpdate"
    SCALING_UP = "ScalingUp"
    SCALING_DOWN = "ScalingDown"
    WAITING_FOR_GPUS = "WaitingForGPUs"
    # Pending in the scheduler's, kubelet's or API server's words (issue 18): each its own reason.
    WAITING_FOR_VOLUME = "WaitingForVolume"
    NO_MATCHING_NODE = "NoMatchingNode"
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_FAILED = "ImagePullFailed"
    CONTAINER_CONFIG_ERROR = "ContainerConfigError"
    PODS_NOT_ADMITTED = "PodsNotAdmitted"
    LOADING_WEIGHTS = "LoadingWeights"
    UP_TO_DATE = "UpToDate"
    # RendezvousReady
    ALL_RANKS_JOINED = "AllRanksJoined"
    WAITING_FOR_RANKS = "WaitingForRanks"
    RENDEZVOUS_TIMEOUT = "RendezvousTimeout"
    # Degraded
    RANK_FAILED = "RankFailed"
    GROUP_RESTARTING = "GroupRestarting"
    BACKING_OFF = "BackingOff"
    AS_EXPECTED = "AsExpected"
    INVALID_SPEC = "InvalidSpec"
    # A create, delete or patch the API refused or never answered (issue 18)
    QUOTA_EXCEEDED = "QuotaExceeded"
    ADMISSION_DENIED = "AdmissionDenied"
    FORBIDDEN = "Forbidden"
    INVALID_OBJECT = "InvalidObject"
    WRITE_CONFLICT = "WriteConflict"
    API_SERVER_ERROR = "APIServerError"
    API_UNREACHABLE = "APIUnreachable"
    # ScalingActive
    AUTOSCALING_DISABLED = "AutoscalingDisabled"
    METRICS_AVAILABLE = "MetricsAvailable"
    SOURCE_ERROR = "SourceError"
    # ScalingLimited
    AT_MIN_REPLICAS = "AtMinReplicas"
    AT_MAX_REPLICAS = "AtMaxReplicas"
    RATE_LIMITED = "RateLimited"
    WITHIN_BOUNDS = "WithinBounds"


# Which reasons each condition uses (docs/api.md lists them; the operator may add more, never reuse one).
REASONS_BY_CONDITION: dict[str, tuple[str, ...]] = {
    ConditionType.READY: (Reason.ALL_GROUPS_READY, Reason.GROUPS_NOT_READY, Reason.SCALED_TO_ZERO),
    ConditionType.PROGRESSING: (
        Reason.ROLLING_UPDATE,
        Reason.SCALING_UP,
        Reason.SCALING_DOWN,
        Reason.WAITING_FOR_GPUS,
        Reason.WAITING_FOR_VOLUME,
        Reason.NO_MATCHING_NODE,
        Reason.UNSCHEDULABLE,
        Reason.IMAGE_PULL_FAILED,
        Reason.CONTAINER_CONFIG_ERROR,
        Reason.PODS_NOT_ADMITTED,
        Reason.LOADING_WEIGHTS,
        Reason.UP_TO_DATE,
    ),
    ConditionType.RENDEZVOUS_READY: (
        Reason.ALL_RANKS_JOINED,
        Reason.WAITING_FOR_RANKS,
        Reason.RENDEZVOUS_TIMEOUT,
    ),
    ConditionType.DEGRADED: (
        Reason.RANK_FAILED,
        Reason.GROUP_RESTARTING,
        Reason.BACKING_OFF,
        Reason.INVALID_SPEC,
        Reason.QUOTA_EXCEEDED,
        Reason.ADMISSION_DENIED,
        Reason.FORBIDDEN,
        Reason.INVALID_OBJECT,
        Reason.WRITE_CONFLICT,
        Reason.API_SERVER_ERROR,
        Reason.API_UNREACHABLE,
        Reason.AS_EXPECTED,
    ),
    ConditionType.SCALING_ACTIVE: (
        Reason.AUTOSCALING_DISABLED,
        Reason.METRICS_AVAILABLE,
        Reason.SOURCE_ERROR,
    ),
    ConditionType.SCALING_LIMITED: (
        Reason.AT_MIN_REPLICAS,
        Reason.AT_MAX_REPLICAS,
        Reason.RATE_LIMITED,
        Reason.WITHIN_BOUNDS,
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Helpers shared by the models.

_QUANTITY_RE = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$")
_SUFFIX = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
}


def parse_quantity(value: int | float | str) -> Decimal:
    """A Kubernetes resource quantity ("500m", "16Gi", "1e3", 4) as a Decimal; ValueError when malformed."""
    if isinstance(value, bool):
        raise ValueError(f"quantity must be a number or a string like '16Gi', got {value!r}")
    if isinstance(value, int | float):
        return Decimal(str(value))
    match = _QUANTITY_RE.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (examples: 4, 500m, 16Gi)")
    number, suffix = match.group(1), match.group(2) or ""
    try:
        base = Decimal(number)
    except InvalidOperation as exc:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (examples: 4, 500m, 16Gi)") from exc
    if suffix[:1] in ("e", "E"):
        return base * (Decimal(10) ** int(suffix[1:]))
    return base * _SUFFIX[suffix]


# Kubernetes timestamps are second-precision RFC 3339 in UTC (timeutil.format_time).
Timestamp = Annotated[datetime, PlainSerializer(format_time, return_type=str, when_used="json")]
# An int-or-string Kubernetes quantity (the pattern is Kubernetes' own, as controller-gen emits it); the
# length bound keeps the CEL cost estimate of the positivity rule within the API server's budget.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|"
    r"(\.[0-9]+))))?$"
)
Quantity = int | Annotated[str, Field(max_length=64, pattern=QUANTITY_PATTERN)]
# A Kubernetes-typed object passed through as is (core/v1 Toleration, Affinity, EnvVar, ...).
K8sObject = dict[str, Any]


def validate_name(name: str) -> None:
    """Raise ValueError unless `name` can name a LingDeployment (the same rule as the CRD's CEL)."""
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(
            f"metadata.name must be at most {MAX_NAME_LENGTH} characters so that pod names "
            f"<name>-<group>-<rank> fit in 63, got {len(name)}"
        )
    if not re.match(NAME_PATTERN, name):
        raise ValueError(
            "metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a "
            f"letter) because it names pods' hostnames and Services, got {name!r}"
        )


@dataclass(frozen=True)
class CelRule:
    """One cross-field rule, enforced by the API server (CEL) and by the operator (Python).

    `rule` is the CEL expression evaluated with `self` bound to the model's object; `check` is the same
    predicate over the pydantic model; `message` names the offending field; `field_path` (relative, e.g.
    ".tensor") points the API server's error at that field.
    """

    rule: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None


class ApiModel(BaseModel):
    """Base: camelCase on the wire, snake_case in Python, unknown fields rejected (as by the CRD)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    @model_validator(mode="after")
    def _check_cel_rules(self) -> ApiModel:
        failed = [rule.message for rule in type(self).cel_rules if not rule.check(self)]
        if failed:
            raise ValueError("; ".join(failed))
        return self

    def to_k8s(self) -> dict[str, Any]:
        """A JSON-ready dict with camelCase keys, unset optional fields left out (as the API server stores)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# ---------------------------------------------------------------------------------------------------------
# spec.model


class SecretKeyRef(ApiModel):
    """A key in a Secret in the LingDeployment's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    key: str = Field(min_length=1, max_length=253, description="Key within the Secret.")


class PvcSource(ApiModel):
    """A checkpoint on a PersistentVolumeClaim (mounted read-only)."""

    claim_name: str = Field(
        min_length=1, max_length=253, description="Name of the PersistentVolumeClaim holding the checkpoint."
    )
    path: str = Field(
        default="",
        max_length=1024,
        description="Directory of the checkpoint inside the volume (config.json, *.safetensors, tokenizer); "
        "empty for the volume's root.",
    )


class HostPathSource(ApiModel):
    """A checkpoint directory on every node (pre-staged weights)."""

    path: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^/",
        description="Absolute path of the checkpoint directory on the node.",
    )


class HuggingFaceSource(ApiModel):
    """A Hugging Face repository, downloaded by an init container (once per node by default)."""

    repo: str = Field(
        min_length=1,
        max_length=256,
        pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*/[-A-Za-z0-9_.]+$",
        description="Repository id, e.g. inclusionAI/Ling-2.6-flash.",
    )
    revision: str = Field(
        default="main",
        min_length=1,
        max_length=256,
        description="Branch, tag or commit to download; pin a commit for groups spanning several nodes "
        "(each node downloads on its own).",
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the Hugging Face token (HF_TOKEN) for gated repos."
    )
    endpoint: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://",
        description="Hugging Face-compatible endpoint (HF_ENDPOINT), e.g. a mirror; default huggingface.co.",
    )
    cache: Literal["Node", "Pod"] = Field(
        default="Node",
        description="Node: one download per node into nodeCachePath (hostPath), shared by every pod there "
        "under a file lock; Pod: a per-pod emptyDir (each pod downloads; for namespaces whose Pod Security "
        "level forbids hostPath).",
    )
    node_cache_path: str = Field(
        default="/var/cache/ling/huggingface",
        min_length=2,
        max_length=1024,
        pattern=r"^/.+",
        description="Node directory of the Node cache (created when missing); checkpoints land in "
        "<path>/<org>--<name>/<revision>.",
    )


class BuiltinSource(ApiModel):
    """The runtime's built-in tiny checkpoint (deterministic random weights): for demos and tests only."""


class ModelSource(ApiModel):
    """Where the checkpoint comes from: exactly one of pvc, hostPath, huggingFace, builtin."""

    pvc: PvcSource | None = Field(default=None, description="Checkpoint on a PersistentVolumeClaim.")
    host_path: HostPathSource | None = Field(default=None, description="Checkpoint in a node directory.")
    hugging_face: HuggingFaceSource | None = Field(
        default=None, description="Checkpoint downloaded from Hugging Face by an init container."
    )
    builtin: BuiltinSource | None = Field(
        default=None,
        description="The runtime's built-in tiny checkpoint (no --model-path); only for the native engine.",
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="(has(self.pvc) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) + (has(self.huggingFace) ? 1 : 0)"
            " + (has(self.builtin) ? 1 : 0) == 1",
            message="spec.model.source must set exactly one of pvc, hostPath, huggingFace, builtin",
            check=lambda s: sum(x is not None for x in (s.pvc, s.host_path, s.hugging_face, s.builtin)) == 1,
        ),
    )

    @property
    def kind(self) -> str:
        """Which source is set: "pvc", "hostPath", "huggingFace" or "builtin"."""
        for name, value in (
            ("pvc", self.pvc),
            ("hostPath", self.host_path),
            ("huggingFace", self.hugging_face),
            ("builtin", self.builtin),
        ):
            if value is not None:
                return name
        raise ValueError("spec.model.source sets no source")


class RopeScaling(ApiModel):
    """YaRN RoPE scaling, passed to the engine as the card's --json-model-override-args rope_scaling."""

    type: Literal["yarn"] = Field(default="yarn", description="Scaling method (rope_type); only yarn.")
    factor: float = Field(gt=1, le=64, description="Context extension factor (> 1); the card uses 2.0.")
    rope_theta: float = Field(
        default=6000000,
        gt=0,
        le=1e12,
        description="RoPE base frequency (rope_theta); Ling-2.6-flash's is 6000000, as in the card.",
    )
    partial_rotary_factor: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Fraction of each head's dimensions that are rotated (partial_rotary_factor); 0.5 as in "
        "the card.",
    )
    original_max_position_embeddings: int = Field(
        default=131072,
        ge=1,
        le=16777216,
        description="Context length the model was trained with before scaling.",
    )

    def override(self) -> dict[str, Any]:
        """The card's rope_scaling object, keys in the card's order (rope_theta an integer when whole)."""
        theta: float | int = int(self.rope_theta) if float(self.rope_theta).is_integer() else self.rope_theta
        return {
            "rope_type": self.type,
            "factor": float(self.factor),
            "rope_theta": theta,
            "partial_rotary_factor": float(self.partial_rotary_factor),
            "original_max_position_embeddings": int(self.original_max_position_embeddings),
        }


class ModelSpec(ApiModel):
    """The served model."""

    name: str = Field(
        default="ling-2.6-flash",
        min_length=1,
        max_length=128,
        pattern=r"^[-A-Za-z0-9_./:]+$",
        description="Served model name (--served-model-name): what clients put in the OpenAI `model` field.",
    )
    source: ModelSource = Field(description="Where the checkpoint comes from (exactly one source).")
    dtype: Dtype = Field(
        default="bf16",
        description="Weight dtype: bf16 (the checkpoint's) or fp8 (block-scaled FP8 weights: --quantization fp8, "
        "an FP8 checkpoint as is, a bf16 one quantized on load).",
    )
    context_length: int | None = Field(
        default=None, ge=1, le=16777216, description="Maximum context length (--context-length)."
    )
    rope_scaling: RopeScaling | None = Field(
        default=None,
        description="YaRN RoPE scaling (--json-model-override-args rope_scaling) to extend the context.",
    )


# ---------------------------------------------------------------------------------------------------------
# spec.engine, spec.parallelism, spec.speculative


class EngineSpec(ApiModel):
    """Which serving engine the pods run."""

    type: EngineType = Field(
        default="native",
        description="native (this project's runtime), sglang or vllm (their images, same rendezvous).",
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        description="Container image; required for sglang and vllm, defaults to the operator's runtime "
        "image for native.",
    )
    image_pull_policy: PullPolicy | None = Field(
        default=None, description="Image pull policy: Always, IfNotPresent or Never."
    )
    device: Device = Field(
        default="cuda",
        description="cuda (GPU requests from parallelism.gpusPerPod) or cpu (no GPU requests, runtime "
        "--device cpu; native engine only).",
    )
    extra_args: list[Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=list,
        max_length=128,
        description="Extra engine arguments, appended as a list (never through a shell).",
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.type == 'native' || has(self.image)",
            message="spec.engine.image is required when spec.engine.type is sglang or vllm",
            check=lambda e: e.type == "native" or e.image is not None,
            field_path=".image",
        ),
        CelRule(
            rule="self.device == 'cuda' || self.type == 'native'",
            message="spec.engine.device cpu is supported only with spec.engine.type native",
            check=lambda e: e.device == "cuda" or e.type == "native",
            field_path=".device",
        ),
    )


class ParallelismSpec(ApiModel):
    """How one serving group is split over GPUs and pods."""

    tensor: int = Field(
        default=1,
        ge=1,
        le=MAX_TENSOR,
        description="Tensor-parallel size: GPUs (or CPU ranks) per group (--tp-size). The native engine "
        "supports 1, 2 or 4 (linear-attention norm groups).",
    )
    gpus_per_pod: int = Field(
        default=1,
        ge=1,
        le=16,
        description="GPUs (ranks) per pod; pods per group = tensor / gpusPerPod.",
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.tensor % self.gpusPerPod == 0",
            message="spec.parallelism.tensor must be divisible by spec.parallelism.gpusPerPod",
            check=lambda p: p.tensor % p.gpus_per_pod == 0,
            field_path=".tensor",
        ),
    )

    @property
    def pods_per_group(self) -> int:
        """Pods in one group (tensor / gpusPerPod)."""
        return self.tensor // self.gpus_per_pod


class SpeculativeSpec(ApiModel):
    """MTP speculative decoding (SGLang's NEXTN flags)."""

    enabled: bool = Field(default=False, description="Switch MTP speculative decoding on.")
    algorithm: Literal["NEXTN"] = Field(
        default="NEXTN",
        description="Speculative algorithm (--speculative-algorithm); NEXTN uses the MTP layer.",
    )
    num_steps: int = Field(
        default=3, ge=1, le=16, description="Draft steps per verification (--speculative-num-steps)."
    )
    top_k: int = Field(default=1, ge=1, le=16, description="Draft branching (--speculative-eagle-topk).")
    num_draft_tokens: int = Field(
        default=4,
        ge=2,
        le=64,
        description="Draft tokens verified per step (--speculative-num-draft-tokens); numSteps + 1 when "
        "topK is 1.",
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.topK != 1 || self.numDraftTokens == self.numSteps + 1",
            message="spec.speculative.numDraftTokens must equal spec.speculative.numSteps + 1 when "
            "spec.speculative.topK is 1",
            check=lambda s: s.top_k != 1 or s.num_draft_tokens == s.num_steps + 1,
            field_path=".numDraftTokens",
        ),
    )


# ---------------------------------------------------------------------------------------------------------
# spec.autoscaling


class ScaleToZeroSpec(ApiModel):
    """Scale to zero groups when idle, and back up on the first waiting request."""

    enabled: bool = Field(default=False, description="Allow zero groups when no requests wait.")
    activation_queue_depth: int = Field(
        default=1,
        ge=1,
        le=100000,
        description="Queue depth (from the prometheus source) that wakes a deployment scaled to zero.",
    )


class EngineMetricsSource(ApiModel):
    """Scrape rank-0 pods' /metrics (ling_runtime_num_queue_reqs, sglang:num_queue_reqs,
    vllm:num_requests_waiting)."""

    timeout_seconds: float = Field(default=2, gt=0, le=60, description="Timeout of one scrape.")


class PrometheusSource(ApiModel):
    """Read the total queue depth from a Prometheus query (scalar or a vector, summed)."""

    url: str = Field(
        min_length=1,
        max_length=2048,
        pattern=r"^https?://",
        description="Base URL of the Prometheus HTTP API, e.g. http://prometheus.monitoring:9090.",
    )
    query: str = Field(
        min_length=1, max_length=4096, description="PromQL giving the total number of waiting requests."
    )
    timeout_seconds: float = Field(default=5, gt=0, le=60, description="Timeout of one query.")
    auth_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding a bearer token for Prometheus."
    )


class MetricSource(ApiModel):
    """Where the queue-depth signal comes from."""

    type: SourceType = Field(
        default="engine", description="engine (scrape rank-0 pods) or prometheus (a PromQL query)."
    )
    engine: EngineMetricsSource = Field(
        default_factory=EngineMetricsSource, description="Settings of the engine source."
    )
    prometheus: PrometheusSource | None = Field(
        default=None, description="Settings of the prometheus source (required when type is prometheus)."
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.type != 'prometheus' || has(self.prometheus)",
            message="spec.autoscaling.source.prometheus is required when spec.autoscaling.source.type is "
            "prometheus",
            check=lambda s: s.type != "prometheus" or s.prometheus is not None,
            field_path=".prometheus",
        ),
    )


class AutoscalingSpec(ApiModel):
    """Queue-depth autoscaling of the number of groups (spec.replicas)."""

    enabled: bool = Field(
        default=False,
        description="Let the operator set spec.replicas from queue depth (leave off when HPA/KEDA drive "
        "the scale subresource).",
    )
    min_replicas: int = Field(default=1, ge=1, le=MAX_GROUPS, description="Fewest groups.")
    max_replicas: int = Field(default=4, ge=1, le=MAX_GROUPS, description="Most groups.")
    target_queue_depth_per_replica: int = Field(
        default=8,
        ge=1,
        le=100000,
        description="Waiting requests one group should carry: desired = ceil(total waiting / target).",
    )
    scale_up_stabilization_seconds: int = Field(
        default=0,
        ge=0,
        le=3600,
        description="Scale up only to the lowest recommendation of this window (0: at once).",
    )
    scale_down_stabilization_seconds: int = Field(
        default=300,
        ge=0,
        le=86400,
        description="Scale down only to the highest recommendation of this window; a scale-down undone "
        "within it doubles the window in force (up to 4x) while the load keeps coming back.",
    )
    max_scale_up_step: int = Field(
        default=4,
        ge=1,
        le=MAX_GROUPS,
        description="Most groups added at once (groups still starting never trigger a further scale-up).",
    )
    max_scale_down_step: int = Field(
        default=2, ge=1, le=MAX_GROUPS, description="Most groups removed at once."
    )
    interval_seconds: int = Field(
        default=15, ge=1, le=3600, description="How often the queue depth is observed."
    )
    scale_to_zero: ScaleToZeroSpec = Field(
        default_factory=ScaleToZeroSpec, description="Scale to zero groups when idle."
    )
    source: MetricSource = Field(default_factory=MetricSource, description="Where queue depth is read.")

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.minReplicas <= self.maxReplicas",
            message="spec.autoscaling.minReplicas must be less than or equal to spec.autoscaling.maxReplicas",
            check=lambda a: a.min_replicas <= a.max_replicas,
            field_path=".minReplicas",
        ),
    )


# ---------------------------------------------------------------------------------------------------------
# spec.rollout, spec.failurePolicy, spec.runtime


class RolloutSpec(ApiModel):
    """Rolling updates replace whole groups."""

    max_unavailable: int = Field(
        default=1, ge=0, le=MAX_GROUPS, description="Groups that may be down during an update."
    )
    max_surge: int = Field(
        default=0, ge=0, le=MAX_GROUPS, description="Extra groups that may be created during an update."
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.maxUnavailable > 0 || self.maxSurge > 0",
            message="spec.rollout.maxUnavailable and spec.rollout.maxSurge cannot both be 0",
            check=lambda r: r.max_unavailable > 0 or r.max_surge > 0,
            field_path=".maxUnavailable",
        ),
    )


class FailurePolicySpec(ApiModel):
    """What happens when a rank of a group fails."""

    restart_group: bool = Field(
        default=True,
        description="Restart every rank of a group when one fails (a TP group cannot survive a lost rank).",
    )
    backoff_seconds: int = Field(
        default=10, ge=0, le=3600, description="First delay before a group restart; doubles each time."
    )
    max_backoff_seconds: int = Field(
        default=300, ge=0, le=86400, description="Upper bound of the restart delay."
    )
    rendezvous_timeout_seconds: int = Field(
        default=900,
        ge=10,
        le=86400,
        description="A group whose ranks have not all joined within this time is restarted.",
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.backoffSeconds <= self.maxBackoffSeconds",
            message="spec.failurePolicy.backoffSeconds must be less than or equal to "
            "spec.failurePolicy.maxBackoffSeconds",
            check=lambda f: f.backoff_seconds <= f.max_backoff_seconds,
            field_path=".backoffSeconds",
        ),
    )


class RuntimeSpec(ApiModel):
    """Engine tuning the seed recipes use (SGLang flag names; docs/engines.md maps each to every engine)."""

    max_running_requests: int | None = Field(
        default=None,
        ge=1,
        le=100000,
        description="Concurrent requests per group (--max-running-requests; vLLM --max-num-seqs).",
    )
    mem_fraction_static: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Fraction of device memory for weights and caches (--mem-fraction-static; vLLM "
        "--gpu-memory-utilization); the native engine sizes its KV cache from it.",
    )
    tool_call_parser: str = Field(
        default="qwen25",
        min_length=1,
        max_length=64,
        pattern=r"^[a-z0-9_]+$",
        description="Tool-call parser (--tool-call-parser); the seed recipe uses qwen25 (vLLM: hermes, the "
        "same <tool_call> format, with --enable-auto-tool-choice). The native engine has qwen25 only.",
    )
    max_mamba_cache_size: int | None = Field(
        default=None,
        ge=1,
        le=100000,
        description="Linear-attention state slots per group (--max-mamba-cache-size); native and sglang.",
    )
    startup_timeout_seconds: int = Field(
        default=1800,
        ge=10,
        le=86400,
        description="Time a group may take to load weights and pass readiness before it counts as failed.",
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the API key clients must send (Authorization: Bearer); reaches the "
        "engine as an environment variable (LING_API_KEY; vLLM VLLM_API_KEY), never on a command line. "
        "native and vllm.",
    )
    drain_timeout_seconds: int = Field(
        default=30,
        ge=1,
        le=3600,
        description="On pod deletion, seconds running requests may take to finish (native --drain-timeout); "
        "terminationGracePeriodSeconds is this + 15.",
    )
    watchdog_timeout_seconds: int | None = Field(
        default=None,
        ge=1,
        le=86400,
        description="A step taking longer fails the group (--watchdog-timeout; engine default 300). native "
        "and sglang.",
    )
    max_queued_requests: int | None = Field(
        default=None,
        ge=1,
        le=1000000,
        description="Waiting requests per group beyond which new ones get 503 (--max-queued-requests). "
        "native and sglang.",
    )


# ---------------------------------------------------------------------------------------------------------
# spec.placement

# A label key (optional DNS prefix + name), or "" to switch the rule off.
LABEL_KEY_PATTERN = r"^(([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"
LabelKey = Annotated[str, Field(max_length=316, pattern=LABEL_KEY_PATTERN)]
ZONE_LABEL = "topology.kubernetes.io/zone"
HOSTNAME_LABEL = "kubernetes.io/hostname"
# NVIDIA GPU feature discovery labels the NVLink domain of multi-node NVLink systems (GB200 NVL72) with
# the clique; on HGX servers the NVLink domain is the node itself.
NVLINK_CLIQUE_LABEL = "nvidia.com/gpu.clique"


class GangSpec(ApiModel):
    """All-or-nothing admission of a group's pods through Kueue pod groups (docs/engines.md says why)."""

    enabled: bool = Field(
        default=False,
        description="Label every pod as a Kueue pod group of its group (pod-group-name <name>-<group>, "
        "total count = pods per group, not retriable alone), so Kueue admits a group's pods together or "
        "none of them.",
    )
    queue_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Kueue LocalQueue of the pods (label kueue.x-k8s.io/queue-name); required when enabled.",
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!self.enabled || has(self.queueName)",
            message="spec.placement.gang.queueName is required when spec.placement.gang.enabled is true "
            "(the Kueue LocalQueue)",
            check=lambda g: not g.enabled or g.queue_name is not None,
            field_path=".queueName",
        ),
    )


class PlacementSpec(ApiModel):
    """Where groups land: a group's pods together in one topology domain, groups apart."""

    group_topology_key: LabelKey = Field(
        default="",
        description="Required: every pod of a multi-pod group lands in one domain of this node label "
        "(required pod affinity), e.g. an NVLink-domain, rack or zone label. Default '' (none): a required "
        "key that some nodes lack would leave groups unschedulable there, so only preferences apply.",
    )
    preferred_group_topology_keys: list[LabelKey] = Field(
        default_factory=lambda: [NVLINK_CLIQUE_LABEL, HOSTNAME_LABEL, ZONE_LABEL],
        max_length=8,
        description="Preferred, in order of weight: a multi-pod group's pods share a domain of these labels "
        "whenever they can (NVLink domain, then the node, then the zone). Labels a node lacks are ignored.",
    )
    group_spread_topology_key: LabelKey = Field(
        default=HOSTNAME_LABEL,
        description="Preferred: pods of different groups avoid sharing a domain of this label, so one node "
        "(or rack, zone) failing takes down as few groups as possible; '' for no spreading.",
    )
    topology_spread_constraints: list[K8sObject] = Field(
        default_factory=list,
        max_length=16,
        description="Passed through to every pod (core/v1 TopologySpreadConstraint); a constraint without "
        "labelSelector counts this deployment's pods.",
    )
    gang: GangSpec = Field(
        default_factory=GangSpec, description="Gang admission of each group (Kueue pod groups)."
    )


# ---------------------------------------------------------------------------------------------------------
# spec.template: pass-through pod settings. Kubernetes-typed fields keep their shape (preserved unknown
# fields, K8sObject) rather than copying the whole core/v1 schema into the CRD.


class ResourceRequirements(ApiModel):
    """Container resources of every engine container (GPU requests come from parallelism.gpusPerPod)."""

    limits: dict[str, Quantity] = Field(
        default_factory=dict, max_length=32, description="Resource limits (positive quantities)."
    )
    requests: dict[str, Quantity] = Field(
        default_factory=dict, max_length=32, description="Resource requests (positive quantities)."
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!has(self.limits) || self.limits.all(k, isQuantity(string(self.limits[k])) && "
            "quantity(string(self.limits[k])).isGreaterThan(quantity('0')))",
            message="spec.template.resources.limits values must be positive quantities (e.g. 4, 500m, 16Gi)",
            check=lambda r: all(_is_positive_quantity(v) for v in r.limits.values()),
            field_path=".limits",
        ),
        CelRule(
            rule="!has(self.requests) || self.requests.all(k, isQuantity(string(self.requests[k])) && "
            "quantity(string(self.requests[k])).isGreaterThan(quantity('0')))",
            message="spec.template.resources.requests values must be positive quantities (e.g. 4, 500m, "
            "16Gi)",
            check=lambda r: all(_is_positive_quantity(v) for v in r.requests.values()),
            field_path=".requests",
        ),
    )


def _is_positive_quantity(value: int | str) -> bool:
    try:
        return parse_quantity(value) > 0
    except ValueError:
        return False


class PodTemplateSpec(ApiModel):
    """Pod settings passed through to every pod of every group."""

    resources: ResourceRequirements | None = Field(default=None, description="Engine container resources.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, max_length=64, description="Node labels the pods must match."
    )
    tolerations: list[K8sObject] = Field(
        default_factory=list, max_length=64, description="Tolerations (core/v1 Toleration)."
    )
    affinity: K8sObject | None = Field(default=None, description="Affinity (core/v1 Affinity).")
    priority_class_name: str | None = Field(
        default=None, max_length=253, description="PriorityClass of the pods."
    )
    scheduler_name: str | None = Field(
        default=None, max_length=253, description="Scheduler of the pods (e.g. a gang scheduler)."
    )
    service_account_name: str | None = Field(
        default=None, max_length=253, description="ServiceAccount of the pods."
    )
    env: list[K8sObject] = Field(
        default_factory=list, max_length=256, description="Extra environment variables (core/v1 EnvVar)."
    )
    volumes: list[K8sObject] = Field(
        default_factory=list, max_length=64, description="Extra volumes (core/v1 Volume)."
    )
    volume_mounts: list[K8sObject] = Field(
        default_factory=list,
        max_length=64,
        description="Extra volume mounts of the engine container (core/v1 VolumeMount).",
    )
    image_pull_secrets: list[K8sObject] = Field(
        default_factory=list, max_length=16, description="Image pull secrets (core/v1 LocalObjectReference)."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, max_length=64, description="Extra pod labels (the operator's own labels win)."
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, max_length=64, description="Extra pod annotations."
    )

    @model_validator(mode="after")
    def _named_items(self) -> PodTemplateSpec:
        # env, volumes and mounts are keyed by name in Kubernetes; an item without one is always a mistake.
        for field, items in (
            ("env", self.env),
            ("volumes", self.volumes),
            ("volumeMounts", self.volume_mounts),
            ("imagePullSecrets", self.image_pull_secrets),
        ):
            for i, item in enumerate(items):
                if not isinstance(item.get("name"), str) or not item["name"]:
                    raise ValueError(f"spec.template.{field}[{i}].name is required")
        return self


# ---------------------------------------------------------------------------------------------------------
# spec


class LingDeploymentSpec(ApiModel):
    """Desired state of a LingDeployment: groups of pods serving Ling-2.6-flash."""

    replicas: int = Field(
        default=1,
        ge=0,
        le=MAX_GROUPS,
        description="Number of serving groups (the scale subresource); each group is tensor GPUs.",
    )
    model: ModelSpec = Field(description="The served model and where its checkpoint comes from.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="The serving engine.")
    parallelism: ParallelismSpec = Field(
        default_factory=ParallelismSpec, description="Tensor parallelism and GPUs per pod."
    )
    speculative: SpeculativeSpec = Field(
        default_factory=SpeculativeSpec, description="MTP speculative decoding."
    )
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec, description="Queue-depth autoscaling of spec.replicas."
    )
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="Rolling update of groups.")
    failure_policy: FailurePolicySpec = Field(
        default_factory=FailurePolicySpec, description="Group restart on rank failure, with backoff."
    )
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec, description="Engine tuning.")
    placement: PlacementSpec = Field(
        default_factory=PlacementSpec,
        description="Placement of groups: a group's pods in one topology domain, groups apart, gang admission.",
    )
    template: PodTemplateSpec = Field(
        default_factory=PodTemplateSpec, description="Pod settings passed through to every pod."
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.engine.type != 'native' || self.parallelism.tensor in [1, 2, 4]",
            message="spec.parallelism.tensor must be 1, 2 or 4 for the native engine (Lightning attention "
            "norm groups)",
            check=lambda s: s.engine.type != "native" or s.parallelism.tensor in NATIVE_TENSOR_SIZES,
            field_path=".parallelism.tensor",
        ),
        CelRule(
            rule="!self.autoscaling.enabled || ((self.replicas >= self.autoscaling.minReplicas || "
            "(self.autoscaling.scaleToZero.enabled && self.replicas == 0)) && "
            "self.replicas <= self.autoscaling.maxReplicas)",
            message="spec.replicas must be within spec.autoscaling.minReplicas..maxReplicas (or 0 with "
            "scaleToZero) when autoscaling is enabled",
            check=lambda s: (
                not s.autoscaling.enabled
                or (
                    (
                        s.replicas >= s.autoscaling.min_replicas
                        or (s.autoscaling.scale_to_zero.enabled and s.replicas == 0)
                    )
                    and s.replicas <= s.autoscaling.max_replicas
                )
            ),
            field_path=".replicas",
        ),
        CelRule(
            rule="!has(self.model.source.builtin) || self.engine.type == 'native'",
            message="spec.model.source.builtin requires spec.engine.type native",
            check=lambda s: s.model.source.builtin is None or s.engine.type == "native",
            field_path=".model.source.builtin",
        ),
        # Fields an engine cannot honour are refused here, at kubectl apply, instead of being dropped from
        # the command line or making the engine exit at start (a crash loop of whole-group restarts).
        CelRule(
            rule="self.engine.type != 'native' || !self.speculative.enabled || self.speculative.topK == 1",
            message="spec.speculative.topK must be 1 for the native engine (its linear-attention state rolls "
            "back along one draft chain; SGLang's EAGLE trees need topK > 1)",
            check=lambda s: (
                s.engine.type != "native" or not s.speculative.enabled or s.speculative.top_k == 1
            ),
            field_path=".speculative.topK",
        ),
        CelRule(
            rule="self.engine.type != 'native' || self.runtime.toolCallParser == 'qwen25'",
            message="spec.runtime.toolCallParser must be qwen25 for the native engine (its only parser, the "
            "format of Ling-2.6-flash)",
            check=lambda s: s.engine.type != "native" or s.runtime.tool_call_parser == "qwen25",
            field_path=".runtime.toolCallParser",
        ),
        CelRule(
            rule="self.engine.type != 'vllm' || !self.speculative.enabled",
            message="spec.speculative.enabled must be false for the vllm engine: vLLM has no MTP for "
            "Ling-2.6-flash (use engine native or sglang for MTP)",
            check=lambda s: s.engine.type != "vllm" or not s.speculative.enabled,
            field_path=".speculative.enabled",
        ),
        CelRule(
            rule="self.engine.type != 'vllm' || !has(self.runtime.maxMambaCacheSize)",
            message="spec.runtime.maxMambaCacheSize is not supported by the vllm engine (vLLM has no such "
            "setting: its linear-attention states follow spec.runtime.maxRunningRequests)",
            check=lambda s: s.engine.type != "vllm" or s.runtime.max_mamba_cache_size is None,
            field_path=".runtime.maxMambaCacheSize",
        ),
        CelRule(
            rule="self.engine.type != 'vllm' || !has(self.runtime.watchdogTimeoutSeconds)",
            message="spec.runtime.watchdogTimeoutSeconds is not supported by the vllm engine (vLLM has no "
            "step watchdog flag); native and sglang have --watchdog-timeout",
            check=lambda s: s.engine.type != "vllm" or s.runtime.watchdog_timeout_seconds is None,
            field_path=".runtime.watchdogTimeoutSeconds",
        ),
        CelRule(
            rule="self.engine.type != 'vllm' || !has(self.runtime.maxQueuedRequests)",
            message="spec.runtime.maxQueuedRequests is not supported by the vllm engine (vLLM has no queue "
            "bound); native and sglang have --max-queued-requests",
            check=lambda s: s.engine.type != "vllm" or s.runtime.max_queued_requests is None,
            field_path=".runtime.maxQueuedRequests",
        ),
        CelRule(
            rule="self.engine.type != 'sglang' || !has(self.runtime.apiKeySecretRef)",
            message="spec.runtime.apiKeySecretRef is not supported by the sglang engine: SGLang takes its key "
            "only as --api-key on the command line, which every process listing shows (native and vllm read "
            "it from the environment)",
            check=lambda s: s.engine.type != "sglang" or s.runtime.api_key_secret_ref is None,
            field_path=".runtime.apiKeySecretRef",
        ),
    )

    # Values derived from this spec, computed once (resources.revision_of): a validated spec is never
    # changed, and the operator keeps one per generation.
    _derived: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def pods_per_group(self) -> int:
        """Pods in one group (tensor / gpusPerPod)."""
        return self.parallelism.pods_per_group


# ---------------------------------------------------------------------------------------------------------
# status


class Condition(ApiModel):
    """A condition in the Kubernetes style (metav1.Condition)."""

    type: str = Field(
        description="Ready, Progressing, RendezvousReady, Degraded, ScalingActive or ScalingLimited."
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase reason of the last transition.")
    message: str = Field(default="", description="What happened and what to do, for a person.")
    last_transition_time: Timestamp | None = Field(default=None, description="When status last changed.")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the condition was computed from."
    )


class RankStatus(ApiModel):
    """One rank (pod) of a group."""

    rank: int = Field(description="Node rank within the group (0 = head).")
    pod: str = Field(description="Pod name.")
    node: str | None = Field(default=None, description="Node the pod runs on.")
    ready: bool = Field(default=False, description="The pod passes readiness.")


class GroupStatus(ApiModel):
    """One serving group."""

    index: int = Field(description="Group index.")
    phase: GroupPhase = Field(
        default="Pending", description="Pending, Forming, Loading, Ready, Restarting or Failed."
    )
    revision: str | None = Field(default=None, description="Revision (hash of the pod-shaping spec).")
    master_address: str | None = Field(default=None, description="Rendezvous address (rank-0 pod DNS name).")
    ranks: list[RankStatus] = Field(default_factory=list, description="Ranks of the group.")
    restarts: int = Field(default=0, description="Whole-group restarts so far.")
    last_restart_time: Timestamp | None = Field(default=None, description="When the group last restarted.")
    last_restart_reason: str | None = Field(default=None, description="Why the group last restarted.")
    forming_since: Timestamp | None = Field(default=None, description="When the current rendezvous began.")
    backoff_seconds: int | None = Field(
        default=None,
        description="Delay of the last restart; the next doubles it (up to maxBackoffSeconds). Cleared once "
        "the group has been Ready for 10 minutes (or maxBackoffSeconds if longer): then backoffSeconds again.",
    )
    ready_since: Timestamp | None = Field(
        default=None, description="When the group last became Ready (absent while it is not)."
    )
    mtp_acceptance_rate: float | None = Field(
        default=None,
        description="MTP: fraction of draft tokens rank 0 accepted since it started (accepted / drafted, "
        "from its /metrics); absent while MTP is off or unread.",
    )


class ScaleEvent(ApiModel):
    """One autoscaling decision."""

    time: Timestamp = Field(description="When the decision was made.")
    from_: int = Field(alias="from", description="Groups before.")
    to: int = Field(description="Groups after.")
    reason: str = Field(default="", description="Why (e.g. queue depth 37 > 8 x 4).")


class RecommendationRun(ApiModel):
    """From `time` on, the autoscaler recommended `replicas` groups."""

    time: Timestamp = Field(description="When this recommendation began.")
    replicas: int = Field(description="Recommended groups.")


class AutoscalerStatus(ApiModel):
    """What the built-in autoscaler saw and decided."""

    observed_queue_depth: int | None = Field(default=None, description="Total waiting requests last seen.")
    observed_running: int | None = Field(default=None, description="Total running requests last seen.")
    recommendation: int | None = Field(default=None, description="Groups the policy recommends now.")
    last_scale_time: Timestamp | None = Field(default=None, description="When spec.replicas last changed.")
    last_scale_reason: str | None = Field(default=None, description="Why spec.replicas last changed.")
    last_observation_time: Timestamp | None = Field(
        default=None,
        description="When the queue was last read with a change worth writing (steady state writes nothing).",
    )
    source_error: str | None = Field(default=None, description="Last error of the metric source, if any.")
    history: list[ScaleEvent] = Field(
        default_factory=list, max_length=10, description="The last 10 scale decisions, oldest first."
    )
    # Added by the autoscaling work (issue 5): the policy's memory, persisted so that stabilization windows
    # survive an operator restart or leader change.
    recommendations: list[RecommendationRun] = Field(
        default_factory=list,
        max_length=64,
        description="Recommendation history for the stabilization windows: from time on, replicas.",
    )
    group_capacity: int | None = Field(
        default=None, description="Running requests one saturated group held (learned; bounds scale-down)."
    )
    unreadable_groups: list[int] = Field(
        default_factory=list, description="Ready groups whose metrics could not be read (no scale-down)."
    )
    scale_up_target: int | None = Field(
        default=None, description="Size the scale-up in progress aims at (never raised while groups start)."
    )
    scale_down_window_seconds: int | None = Field(
        default=None,
        description="Scale-down window in force when flap damping stretched it (absent: the spec's).",
    )
    damped_until: Timestamp | None = Field(
        default=None, description="The stretched window lapses then unless the load keeps coming back."
    )
    last_scale_down_time: Timestamp | None = Field(
        default=None, description="Last scale-down not yet followed by a scale-up."
    )
    below_since: Timestamp | None = Field(
        default=None, description="Since when the recommendation has been below spec.replicas."
    )


class LingDeploymentStatus(ApiModel):
    """Observed state of a LingDeployment."""

    observed_generation: int | None = Field(
        default=None, description="metadata.generation the status was computed from."
    )
    replicas: int = Field(default=0, description="Groups that exist (any phase).")
    ready_replicas: int = Field(default=0, description="Groups whose every rank is ready.")
    updated_replicas: int = Field(default=0, description="Groups at the current revision.")
    desired_replicas: int = Field(default=0, description="Groups wanted (spec.replicas).")
    selector: str | None = Field(
        default=None, description="Label selector of rank-0 pods (for the scale subresource and HPA)."
    )
    queue_depth: int | None = Field(default=None, description="Total waiting requests last observed.")
    pods_per_group: int | None = Field(
        default=None, description="Pods per group (spec tensor / gpusPerPod), for the printer column."
    )
    mtp_acceptance_rate: float | None = Field(
        default=None,
        description="MTP acceptance over the groups whose rank 0 was read (mean of "
        "groups[].mtpAcceptanceRate), for the printer column.",
    )
    conditions: list[Condition] = Field(default_factory=list, description="Conditions (one per type).")
    groups: list[GroupStatus] = Field(default_factory=list, description="Per-group detail.")
    autoscaler: AutoscalerStatus | None = Field(default=None, description="Autoscaler detail.")

    def condition(self, type_: str) -> Condition | None:
        """The condition of this type, if present."""
        return next((c for c in self.conditions if c.type == type_), None)


# ---------------------------------------------------------------------------------------------------------
# The whole object


class LingDeployment(ApiModel):
    """A LingDeployment object (as stored by the API server)."""

    # metadata is Kubernetes' ObjectMeta, passed through untouched (extra keys allowed by typing it as dict).
    api_version: str = Field(
        default=API_VERSION, alias="apiVersion", description="serving.ling.dev/v1alpha1."
    )
    kind: str = Field(default=KIND, description="LingDeployment.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: LingDeploymentSpec = Field(description="Desired state.")
    status: LingDeploymentStatus | None = Field(default=None, description="Observed state.")

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule=f"!has(self.metadata.name) || size(self.metadata.name) <= {MAX_NAME_LENGTH}",
            message=f"metadata.name must be at most {MAX_NAME_LENGTH} characters so that pod names "
            "<name>-<group>-<rank> fit in 63",
            check=lambda d: len(str(d.metadata.get("name", ""))) <= MAX_NAME_LENGTH,
            field_path=".metadata.name",
        ),
        CelRule(
            rule=f"!has(self.metadata.name) || self.metadata.name.matches('{NAME_PATTERN}')",
            message="metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting "
            "with a letter): it names pods' hostnames and Services",
            check=lambda d: "name" not in d.metadata or bool(re.match(NAME_PATTERN, str(d.metadata["name"]))),
            field_path=".metadata.name",
        ),
    )

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace", ""))
