"""The model card's three server recipes, token by token, against what the operator renders.

The card's commands are written here as data, verbatim (backslash continuations included), and parsed
the way a shell would. Each recipe is expressed by a LingDeployment in crds/examples/, and the pod
command the operator renders for it must carry every token of the card with the same value. The tokens
the operator adds are listed exactly, with the reason for each (ADDED_*): anything else that differs
fails the test.

Placeholders: the card's $MODEL_PATH, $MASTER_IP and $PORT become the pod's model mount, rank 0's stable
DNS name (through the kubelet's $(LING_MASTER_ADDR) expansion) and the contract's HTTP port.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from ling_operator import api, rendezvous
from ling_runtime import cli as runtime_cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "crds" / "examples"

# ---- the card (seed/000_0f8e4c008ee1f3f5.txt), verbatim ------------------------------------------------

CARD_SGLANG = r"""
python -m sglang.launch_server \
    --model-path $MODEL_PATH \
    --tp-size 4 \
    --pp-size 1 \
    --dp-size 1 \
    --trust-remote-code \
    --context-length 262144 \
    --tool-call-parser qwen25 \
    --json-model-override-args '{"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 6000000, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 131072}}' \
    --dist-init-addr $MASTER_IP:2345 \
    --port $PORT \
    --nnodes 1
"""

CARD_SGLANG_MTP = r"""
python -m sglang.launch_server \
    --model-path $MODEL_PATH \
    --tp-size 4 \
    --pp-size 1 \
    --dp-size 1 \
    --context-length 262144 \
    --mamba-scheduler-strategy extra_buffer \
    --speculative-algorithm NEXTN \
    --speculative-num-steps 3 \
    --speculative-eagle-topk 1 \
    --speculative-num-draft-tokens 4 \
    --mem-fraction-static 0.75 \
    --max-running-requests 64 \
    --max-mamba-cache-size 256 \
    --tool-call-parser qwen25 \
    --json-model-override-args '{"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 6000000, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 131072}}' \
    --trust-remote-code \
    --dist-init-addr $MASTER_IP:2345 \
    --port $PORT \
    --nnodes 1
"""

CARD_VLLM = r"""
vllm serve $MODEL_PATH \
    --port $PORT \
    --served-model-name my_model \
    --trust-remote-code --tensor-parallel-size 4 \
    --gpu-memory-utilization 0.85
"""

CARD_CLIENT_BODY = (
    '{"model": "auto", "messages": [{"role": "user", "content": "What is the capital of France?"}]}'
)

PLACEHOLDERS = {
    "$MODEL_PATH": rendezvous.MODEL_MOUNT_PATH,
    "$MASTER_IP:2345": f"$({rendezvous.ENV_MASTER_ADDR}):{rendezvous.DIST_PORT}",
    "$PORT": str(rendezvous.HTTP_PORT),
}

# ---- what the operator adds, and why --------------------------------------------------------------------

# SGLang, both recipes: the card runs one node by hand; a pod needs its own address and rank.
ADDED_SGLANG = {
    "--served-model-name": ["ling-2.6-flash"],  # spec.model.name (SGLang answers "auto" anyway)
    "--node-rank": ["0"],  # the pod's rank in its group (the card's single node is rank 0 by default)
    "--host": ["$(LING_POD_IP)"],  # bind the pod IP (SGLang's default is 127.0.0.1, unreachable)
    "--enable-metrics": [],  # /metrics for queue-depth autoscaling, the dashboards and MTP acceptance
}
# The card's tokens our runtime does not need (it accepts them: see the parse test below).
NATIVE_OMITS = {"--pp-size", "--dp-size", "--trust-remote-code"}
ADDED_NATIVE = {
    "--served-model-name": ["ling-2.6-flash"],
    "--node-rank": ["0"],
    "--host": ["$(LING_POD_IP)"],
    "--device": ["cuda"],  # spec.engine.device (the runtime's own default is auto)
    "--dtype": ["bf16"],  # spec.model.dtype (the card: "depends on the dtype of the model")
    "--drain-timeout": ["30"],  # spec.runtime.drainTimeoutSeconds; terminationGracePeriodSeconds is 45
}
ADDED_VLLM = {
    "--host": ["$(LING_POD_IP)"],  # vLLM binds 0.0.0.0 by default; the pod IP is the contract's choice
    "--enable-auto-tool-choice": [],  # spec.runtime.toolCallParser (qwen25 -> vLLM's hermes, same format)
    "--tool-call-parser": ["hermes"],
}
# vLLM 404s a `model` it does not serve, and the card's client sends "auto": it is served as a second name.
VLLM_SERVED_NAMES = ["my_model", "auto"]


def card_tokens(command: str) -> list[str]:
    # As a shell reads it: a backslash-newline continues the line, quotes group the JSON into one word.
    tokens = shlex.split(command.replace("\\\n", " "))
    return [_fill(t) for t in tokens]


def _fill(token: str) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        token = token.replace(placeholder, value)
    return token


def flags(args: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(positional words before the first flag, flag -> the values after it); a flag given twice fails."""
    head: list[str] = []
    out: dict[str, list[str]] = {}
    current: str | None = None
    for token in args:
        if token.startswith("--"):
            assert token not in out, f"{token} given twice in {args}"
            out[token] = []
            current = token
        elif current is None:
            head.append(token)
        else:
            out[current].append(token)
    return head, out


def example(name: str) -> api.LingDeploymentSpec:
    return api.LingDeployment.model_validate(yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())).spec


def with_engine(spec: api.LingDeploymentSpec, engine: dict[str, Any]) -> api.LingDeploymentSpec:
    return api.LingDeploymentSpec.model_validate({**spec.to_k8s(), "engine": engine})


def compare(card: dict[str, list[str]], ours: dict[str, list[str]], added: dict[str, list[str]]) -> None:
    missing = {f: v for f, v in card.items() if f not in ours}
    assert not missing, f"card tokens missing from the rendered command: {missing}"
    different = {f: (v, ours[f]) for f, v in card.items() if ours[f] != v}
    assert not different, f"card flags rendered with other values (card, ours): {different}"
    extra = {f: v for f, v in ours.items() if f not in card}
    assert extra == added, f"tokens added beyond the card: {extra}"


# ---- the tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("card", "name"), [(CARD_SGLANG, "sglang"), (CARD_SGLANG_MTP, "sglang-mtp")])
def test_sglang_recipes_render_the_cards_command(card: str, name: str) -> None:
    spec = example(name)
    card_head, card_flags = flags(card_tokens(card))
    head, ours = flags(rendezvous.sglang_command(spec, 0))
    # `python3`: the images carry python3 (and `python` is not on every image's PATH).
    assert card_head == ["python", "-m", "sglang.launch_server"]
    assert head == ["python3", "-m", "sglang.launch_server"]
    compare(card_flags, ours, ADDED_SGLANG)


@pytest.mark.parametrize(("card", "name"), [(CARD_SGLANG, "sglang"), (CARD_SGLANG_MTP, "sglang-mtp")])
def test_native_engine_renders_the_sglang_recipes_with_the_same_flags(card: str, name: str) -> None:
    spec = with_engine(example(name), {"type": "native"})
    _, card_flags = flags(card_tokens(card))
    head, ours = flags(rendezvous.native_command(spec, 0))
    assert head == ["ling-runtime", "serve"]
    kept = {f: v for f, v in card_flags.items() if f not in NATIVE_OMITS}
    if "--mamba-scheduler-strategy" in kept:
        # SGLang needs extra_buffer for MTP on this hybrid model; the runtime's default (auto) is it.
        assert kept.pop("--mamba-scheduler-strategy") == ["extra_buffer"]
    compare(kept, ours, ADDED_NATIVE)


@pytest.mark.parametrize("card", [CARD_SGLANG, CARD_SGLANG_MTP])
def test_the_cards_sglang_command_line_runs_on_our_runtime(card: str) -> None:
    """The recipe carries over: `ling-runtime serve` parses the card's flags as SGLang does, to the same
    settings as the command the operator renders for the same recipe."""
    card_args = [a.replace("$(LING_MASTER_ADDR)", "10.0.0.1") for a in card_tokens(card)[3:]]
    from_card = runtime_cli.parse_serve_args(card_args)
    spec = with_engine(example("sglang-mtp" if "NEXTN" in card else "sglang"), {"type": "native"})
    rendered = [
        a.replace("$(LING_MASTER_ADDR)", "10.0.0.1").replace("$(LING_POD_IP)", "10.0.0.2")
        for a in rendezvous.native_command(spec, 0)[2:]
    ]
    from_operator = runtime_cli.parse_serve_args(rendered)
    for field in (
        "model_path",
        "tp_size",
        "context_length",
        "json_model_override_args",
        "tool_call_parser",
        "speculative_algorithm",
        "speculative_num_steps",
        "speculative_eagle_topk",
        "speculative_num_draft_tokens",
        "mem_fraction_static",
        "max_running_requests",
        "max_mamba_cache_size",
        "mamba_scheduler_strategy" if "NEXTN" not in card else "nnodes",
        "dist_init_addr",
        "port",
    ):
        assert getattr(from_card, field) == getattr(from_operator, field), field
    assert from_card.trust_remote_code  # accepted (and documented as having no effect)


def test_vllm_recipe_renders_the_cards_command() -> None:
    spec = example("vllm")
    card_head, card_flags = flags(card_tokens(CARD_VLLM))
    head, ours = flags(rendezvous.vllm_command(spec, 0))
    assert card_head == head == ["vllm", "serve", "/models"]
    assert card_flags["--served-model-name"] == ["my_model"]
    assert ours["--served-model-name"] == VLLM_SERVED_NAMES
    ours["--served-model-name"] = ["my_model"]
    compare(card_flags, ours, ADDED_VLLM)


def test_yarn_json_is_the_cards_text_and_settable_from_the_cr() -> None:
    _, card_flags = flags(card_tokens(CARD_SGLANG))
    (card_json,) = card_flags["--json-model-override-args"]
    spec = example("sglang")
    assert rendezvous.rope_override(spec) == card_json  # byte for byte: keys, order, numbers
    rope = json.loads(card_json)["rope_scaling"]
    # Context: YaRN factor x the original window is the card's --context-length.
    assert rope["factor"] * rope["original_max_position_embeddings"] == spec.model.context_length == 262144
    changed = api.LingDeploymentSpec.model_validate(
        {
            **spec.to_k8s(),
            "model": {
                **spec.to_k8s()["model"],
                "ropeScaling": {
                    "factor": 4.0,
                    "ropeTheta": 1000000.5,
                    "partialRotaryFactor": 0.25,
                    "originalMaxPositionEmbeddings": 65536,
                },
            },
        }
    )
    assert json.loads(rendezvous.rope_override(changed) or "") == {
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "rope_theta": 1000000.5,
            "partial_rotary_factor": 0.25,
            "original_max_position_embeddings": 65536,
        }
    }


def test_the_cards_client_body_names_the_model_every_engine_answers() -> None:
    body = json.loads(CARD_CLIENT_BODY)
    assert body["model"] == rendezvous.CARD_MODEL_ALIAS
    # vLLM answers only served names: "auto" is one. SGLang ignores the field; our runtime accepts
    # "auto" (tests/runtime/test_card_client.py sends this exact body to it).
    assert rendezvous.CARD_MODEL_ALIAS in rendezvous.vllm_served_names(example("vllm"))
