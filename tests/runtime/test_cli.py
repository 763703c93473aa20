"""The serve CLI: SGLang's flag names and meanings, validated before anything heavy starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ling_runtime.cli import build_parser, parse_serve_args, validate
from ling_runtime.settings import SettingsError

YARN = (
    '{"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 6000000, '
    '"partial_rotary_factor": 0.5, "original_max_position_embeddings": 131072}}'
)
SEED_STANDARD = [
    "--model-path", "/models/ling", "--tp-size", "4", "--pp-size", "1", "--dp-size", "1",
    "--trust-remote-code", "--context-length", "262144", "--tool-call-parser", "qwen25",
    "--json-model-override-args", YARN, "--dist-init-addr", "10.0.0.1:2345", "--port", "8000", "--nnodes", "1",
]  # fmt: skip
SEED_MTP = [
    "--model-path", "/models/ling", "--tp-size", "4", "--pp-size", "1", "--dp-size", "1",
    "--context-length", "262144", "--mamba-scheduler-strategy", "extra_buffer",
    "--speculative-algorithm", "NEXTN", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
    "--speculative-num-draft-tokens", "4", "--mem-fraction-static", "0.75", "--max-running-requests", "64",
    "--max-mamba-cache-size", "256", "--tool-call-parser", "qwen25", "--json-model-override-args", YARN,
    "--trust-remote-code", "--dist-init-addr", "10.0.0.1:2345", "--port", "8000", "--nnodes", "1",
]  # fmt: skip


def test_seed_recipe_without_mtp_parses_with_sglang_meanings() -> None:
    args = parse_serve_args(SEED_STANDARD)
    assert args.tp_size == 4 and args.context_length == 262144 and args.port == 8000
    assert args.json_model_override_args["rope_scaling"]["factor"] == 2.0
    assert args.tool_call_parser == "qwen25" and args.trust_remote_code
    assert args.dist_host_port == ("10.0.0.1", 2345)
    assert not args.speculative and args.launcher == "mp"


def test_seed_recipe_with_mtp_parses() -> None:
    args = parse_serve_args(SEED_MTP)
    assert args.speculative_algorithm == "NEXTN"
    assert (args.speculative_num_steps, args.speculative_eagle_topk, args.speculative_num_draft_tokens) == (
        3,
        1,
        4,
    )
    assert args.max_mamba_cache_size == 256 and args.max_running_requests == 64
    assert args.mem_fraction_static == 0.75 and args.mamba_scheduler_strategy == "extra_buffer"


def test_operator_generated_command_parses() -> None:
    # docs/architecture.md: the native command the operator puts in every pod.
    argv = [
        "serve", "--model-path", "/models/ling", "--served-model-name", "ling", "--tp-size", "4",
        "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "ling-0-0.ling-ranks.default.svc:2345",
        "--host", "10.1.2.3", "--port", "30000", "--device", "cuda",
    ]  # fmt: skip
    ns = build_parser().parse_args(argv)
    args = validate(ns)
    assert args.launcher == "ray" and args.shards_per_node == 2 and args.node_rank == 1
    assert args.dist_host_port == ("ling-0-0.ling-ranks.default.svc", 2345)
    assert args.model_name == "ling" and args.device == "cuda" and args.host == "10.1.2.3"


def test_nextn_defaults_follow_sglang() -> None:
    args = parse_serve_args(["--speculative-algorithm", "NEXTN"])
    assert (args.speculative_num_steps, args.speculative_eagle_topk, args.speculative_num_draft_tokens) == (
        3,
        1,
        4,
    )
    args = parse_serve_args(["--speculative-algorithm", "NEXTN", "--speculative-num-steps", "2"])
    assert args.speculative_num_draft_tokens == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--tp"], "unrecognized arguments: --tp"),  # no abbreviations: a typo never guesses
        (["--tp-size", "0"], "--tp-size 0: expected a positive integer"),
        (["--pp-size", "2"], "--pp-size 2: only 1 is supported"),
        (["--dp-size", "2"], "--dp-size 2: only 1 is supported"),
        (["--speculative-algorithm", "EAGLE"], "invalid choice: 'EAGLE'"),
        (["--speculative-algorithm", "NEXTN", "--speculative-eagle-topk", "2"], "--speculative-eagle-topk 2"),
        (
            [
                "--speculative-algorithm",
                "NEXTN",
                "--speculative-num-steps",
                "3",
                "--speculative-num-draft-tokens",
                "3",
            ],
            "must equal --speculative-num-steps + 1 = 4",
        ),
        (["--speculative-num-steps", "3"], "only valid with --speculative-algorithm NEXTN"),
        (["--json-model-override-args", "{nope"], "--json-model-override-args: invalid JSON"),
        (["--json-model-override-args", "[1]"], "expected a JSON object"),
        (["--nnodes", "2", "--tp-size", "2"], "--dist-init-addr: required when --nnodes > 1"),
        (["--nnodes", "2", "--node-rank", "2", "--tp-size", "2", "--dist-init-addr", "h:1"], "--node-rank 2"),
        (["--nnodes", "2", "--tp-size", "3", "--dist-init-addr", "h:1"], "divisible by --nnodes 2"),
        (["--nnodes", "2", "--tp-size", "2", "--dist-init-addr", "h:1", "--launcher", "mp"], "--launcher mp"),
        (["--dist-init-addr", "nohost"], "--dist-init-addr 'nohost': expected HOST:PORT"),
        (["--tool-call-parser", "llama3"], "invalid choice: 'llama3'"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
        (["--mem-fraction-static", "1.5"], "--mem-fraction-static 1.5"),
        (["--mamba-scheduler-strategy", "weird"], "invalid choice: 'weird'"),
    ],
)
def test_bad_flags_fail_with_a_message_naming_them(argv: list[str], message: str) -> None:
    with pytest.raises(SettingsError) as err:
        parse_serve_args(argv)
    assert message in str(err.value)


def test_cli_exits_2_with_the_message_on_stderr() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ling_runtime", "serve", "--tp-size", "4", "--speculative-num-steps", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--speculative-num-steps: only valid with --speculative-algorithm NEXTN" in proc.stderr
