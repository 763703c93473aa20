"""The pydantic API models: defaults, aliases, derived values and the same validation rules as the CRD."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from api_cases import BAD_CASES, BadCase, valid_manifest
from ling_operator import api
from ling_operator.api import (
    LingDeployment,
    LingDeploymentSpec,
    LingDeploymentStatus,
    ValidationError,
    parse_quantity,
    validate_name,
)

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "crds" / "examples").glob("*.yaml"))


def test_the_valid_base_manifest_is_accepted() -> None:
    d = LingDeployment.model_validate(valid_manifest())
    assert d.spec.pods_per_group == 2
    assert d.name == "ling-case"


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.id for c in BAD_CASES])
def test_bad_manifest_is_rejected_naming_the_field(case: BadCase) -> None:
    with pytest.raises(ValidationError) as err:
        LingDeployment.model_validate(case.manifest())
    text = str(err.value)
    for expected in case.expect:
        assert expected in text, f"{expected!r} not in {text}"


def test_bad_cases_are_distinct_and_enough() -> None:
    ids = [c.id for c in BAD_CASES]
    assert len(set(ids)) == len(ids) >= 15
    manifests = [yaml.safe_dump(c.manifest()) for c in BAD_CASES]
    assert len(set(manifests)) == len(manifests)


def test_spec_from_api_server_dict_uses_camel_case_and_defaults() -> None:
    spec = LingDeploymentSpec.model_validate(
        {"model": {"source": {"pvc": {"claimName": "w"}}}, "parallelism": {"tensor": 4, "gpusPerPod": 2}}
    )
    assert spec.parallelism.gpus_per_pod == 2
    assert spec.pods_per_group == 2
    assert spec.model.name == "ling-2.6-flash"
    assert spec.model.source.kind == "pvc"
    assert spec.engine.type == "native" and spec.engine.device == "cuda"
    assert (spec.speculative.num_steps, spec.speculative.top_k, spec.speculative.num_draft_tokens) == (
        3,
        1,
        4,
    )
    assert spec.autoscaling.scale_down_stabilization_seconds == 300
    assert spec.autoscaling.source.type == "engine"
    assert spec.runtime.tool_call_parser == "qwen25"
    assert spec.runtime.startup_timeout_seconds == 1800
    assert spec.failure_policy.rendezvous_timeout_seconds == 900


def test_snake_case_names_are_accepted_and_dump_is_camel_case() -> None:
    spec = LingDeploymentSpec(
        model=api.ModelSpec(source=api.ModelSource(builtin=api.BuiltinSource())),
        parallelism=api.ParallelismSpec(tensor=2, gpus_per_pod=1),
    )
    out = spec.to_k8s()
    assert out["parallelism"] == {"tensor": 2, "gpusPerPod": 1}
    assert out["model"]["source"] == {"builtin": {}}
    assert "contextLength" not in out["model"]  # unset optionals are left out, as the API server stores
    assert LingDeploymentSpec.model_validate(out) == spec


def test_scale_to_zero_allows_zero_replicas() -> None:
    m = valid_manifest()
    m["spec"]["replicas"] = 0
    m["spec"]["autoscaling"]["scaleToZero"] = {"enabled": True}
    assert LingDeployment.model_validate(m).spec.replicas == 0


def test_topk_above_one_frees_draft_tokens_on_sglang() -> None:
    # SGLang's EAGLE trees (topK > 1) verify more drafts than steps; the native engine refuses topK > 1.
    m = valid_manifest()
    m["spec"]["model"]["source"] = {"pvc": {"claimName": "w"}}
    m["spec"]["engine"] = {"type": "sglang", "image": "lmsysorg/sglang:v0.5.10.post1"}
    m["spec"]["speculative"].update(topK=4, numDraftTokens=8)
    assert LingDeployment.model_validate(m).spec.speculative.num_draft_tokens == 8


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_other_engines_may_use_larger_tensor(engine: str) -> None:
    m = valid_manifest()
    m["spec"]["model"]["source"] = {"pvc": {"claimName": "w"}}
    m["spec"]["engine"] = {"type": engine, "image": f"{engine}:v1"}
    m["spec"]["speculative"]["enabled"] = engine == "sglang"  # vLLM has no MTP for this model
    m["spec"]["parallelism"] = {"tensor": 8, "gpusPerPod": 4}
    assert LingDeployment.model_validate(m).spec.pods_per_group == 2


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_are_valid(path: Path) -> None:
    d = LingDeployment.model_validate(yaml.safe_load(path.read_text()))
    assert d.kind == api.KIND and d.api_version == api.API_VERSION


def test_examples_cover_the_documented_uses() -> None:
    by_name = {p.stem: LingDeployment.model_validate(yaml.safe_load(p.read_text())).spec for p in EXAMPLES}
    assert by_name["tp4-single-pod"].parallelism.tensor == 4 and by_name["tp4-single-pod"].pods_per_group == 1
    assert by_name["tp4-two-pods"].pods_per_group == 2
    assert by_name["mtp"].speculative.enabled
    assert by_name["autoscaling"].autoscaling.enabled
    assert by_name["sglang"].engine.type == "sglang"
    assert by_name["vllm"].engine.type == "vllm"
    tiny = by_name["tiny-cpu"]
    assert tiny.model.source.kind == "builtin" and tiny.engine.device == "cpu"
    assert tiny.pods_per_group == 2 and tiny.speculative.enabled
    assert (tiny.autoscaling.min_replicas, tiny.autoscaling.max_replicas) == (1, 3)


@pytest.mark.parametrize(
    ("text", "value"),
    [("4", Decimal(4)), (2, Decimal(2)), ("500m", Decimal("0.5")), ("16Gi", Decimal(16 * 2**30)),
     ("1e3", Decimal(1000)), ("1k", Decimal(1000)), ("-1Gi", Decimal(-(2**30)))],
)  # fmt: skip
def test_parse_quantity(text: int | str, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["lots", "", "1.2.3Gi", "5Xi"])
def test_parse_quantity_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity(text)


def test_validate_name_bounds() -> None:
    validate_name("l" * api.MAX_NAME_LENGTH)
    longest_pod = f"{'l' * api.MAX_NAME_LENGTH}-{api.MAX_GROUPS - 1}-{api.MAX_TENSOR - 1}"
    assert len(longest_pod) == 63
    with pytest.raises(ValueError, match=r"metadata\.name"):
        validate_name("l" * (api.MAX_NAME_LENGTH + 1))
    with pytest.raises(ValueError, match="DNS-1035"):
        validate_name("9ling")


def test_status_round_trip_serializes_times_and_aliases() -> None:
    t = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    status = LingDeploymentStatus(
        observed_generation=3,
        replicas=2,
        ready_replicas=1,
        selector="serving.ling.dev/deployment=x,serving.ling.dev/rank=0",
        conditions=[api.Condition(type=api.ConditionType.READY, status="False", reason=api.Reason.GROUPS_NOT_READY,
                                  last_transition_time=t)],
        groups=[api.GroupStatus(index=0, phase="Forming", ranks=[api.RankStatus(rank=0, pod="x-0-0")])],
        autoscaler=api.AutoscalerStatus(history=[api.ScaleEvent(time=t, from_=1, to=2, reason="queue 37 > 8 x 4")]),
    )  # fmt: skip
    out = status.to_k8s()
    assert out["readyReplicas"] == 1
    assert out["conditions"][0]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert out["autoscaler"]["history"][0]["from"] == 1
    assert out["groups"][0]["ranks"][0] == {"rank": 0, "pod": "x-0-0", "ready": False}
    back = LingDeploymentStatus.model_validate(out)
    assert back.condition("Ready") is not None and back.condition("Degraded") is None
    assert back.autoscaler is not None and back.autoscaler.history[0].from_ == 1


def test_status_rejects_unknown_phase() -> None:
    with pytest.raises(ValidationError, match="phase"):
        LingDeploymentStatus.model_validate({"groups": [{"index": 0, "phase": "Running"}]})


def test_autoscaler_history_is_bounded() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    events = [{"time": t, "from": i, "to": i + 1} for i in range(11)]
    with pytest.raises(ValidationError, match="history"):
        api.AutoscalerStatus.model_validate({"history": events})


def test_template_items_need_names() -> None:
    m = valid_manifest()
    m["spec"]["template"]["env"] = [{"value": "1"}]
    with pytest.raises(ValidationError, match=r"spec.template.env\[0\].name"):
        LingDeployment.model_validate(m)


def test_every_condition_type_and_reason_is_mapped_once() -> None:
    assert tuple(api.REASONS_BY_CONDITION) == api.ConditionType.ALL
    mapped = [r for reasons in api.REASONS_BY_CONDITION.values() for r in reasons]
    declared = [v for k, v in vars(api.Reason).items() if k.isupper()]
    assert sorted(mapped) == sorted(declared)
    assert len(set(mapped)) == len(mapped)
