"""The model card's client call and server flags, on our runtime.

- The card's curl body (`"model": "auto"`) is answered, byte for byte as the card sends it.
- `--device` defaults to auto; `--trust-remote-code` says it has no effect.
- `--mem-fraction-static` sizes the KV cache (runner/memory.py), on the real built-in model.
- The card's YaRN override carries rope_theta and partial_rotary_factor, and they are honoured.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from ling_runtime.cli import build_parser, parse_serve_args
from ling_runtime.config import LingConfig
from ling_runtime.runner.memory import DeviceMemory, device_memory, kv_cache_budget, size_kv_cache
from ling_runtime.server.launch import build_engine, resolve_device
from ling_runtime.settings import Settings, SettingsError

from tests.runtime.conftest import RunningServer

# Verbatim from the card's "Client" section (both the SGLang and the vLLM recipe send it).
CARD_CLIENT_BODY = (
    b'{"model": "auto", "messages": [{"role": "user", "content": "What is the capital of France?"}]}'
)
CARD_YARN = (
    '{"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 6000000, '
    '"partial_rotary_factor": 0.5, "original_max_position_embeddings": 131072}}'
)


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_cards_curl_body_is_answered(server: RunningServer) -> None:
    status, body = post(f"{server.url}/v1/chat/completions", CARD_CLIENT_BODY)
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["model"] == "ling-tiny"  # the answer names the model that answered
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] >= 1
    # Any other unknown name is still a 404 (a typo must not reach the wrong model).
    other = CARD_CLIENT_BODY.replace(b'"auto"', b'"gpt-4"')
    status, body = post(f"{server.url}/v1/chat/completions", other)
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_device_defaults_to_auto_and_resolves_to_what_torch_sees() -> None:
    seen = "cuda" if torch.cuda.is_available() else "cpu"
    assert parse_serve_args([]).device == seen  # the flags' default, resolved once they are valid
    assert parse_serve_args(["--device", "auto"]).device == seen
    assert parse_serve_args(["--device", "cpu"]).device == "cpu"
    # Settings built without the CLI may still say auto: the server resolves it before any use.
    assert resolve_device(Settings(device="auto")).device == seen


def test_compatibility_flags_say_what_they_do() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    helps = {a.option_strings[0]: a.help or "" for a in serve._actions if a.option_strings}
    assert "no effect" in helps["--trust-remote-code"]
    assert "SGLang compatibility" in helps["--trust-remote-code"]
    assert "KV cache" in helps["--mem-fraction-static"]


def resolved(builtin_dir: Path, *argv: str) -> Settings:
    return parse_serve_args(["--device", "cpu", *argv]).resolve(str(builtin_dir))


GIB = 2**30


def test_mem_fraction_static_divides_the_memory_as_sglang(builtin_dir: Path) -> None:
    settings = resolved(builtin_dir, "--mem-fraction-static", "0.5", "--max-running-requests", "4")
    memory = DeviceMemory(total=1 * GIB, available=1 * GIB - 100 * 2**20)  # 100 MiB in use already
    budget = kv_cache_budget(settings, memory)
    assert budget.weights > 0 and budget.fixed_cache > 0 and budget.page > 0
    # Half the device is static: what is free now, minus the other half, minus weights and slots.
    assert budget.pool == memory.available - GIB // 2 - budget.weights - budget.fixed_cache
    # The tiny model's pages are small: the cap (4 running requests x the context) decides here.
    context = settings.context_length
    assert context is not None
    assert budget.tokens == -(-4 * (context + 1) // settings.page_size) * settings.page_size

    small = DeviceMemory(total=10 * 2**20, available=10 * 2**20)  # below the cap: the pool decides
    uncapped = kv_cache_budget(settings, small)
    assert uncapped.tokens == uncapped.pool // uncapped.page * settings.page_size
    assert uncapped.tokens < budget.tokens


def test_mem_fraction_static_too_small_names_the_flag(builtin_dir: Path) -> None:
    settings = resolved(builtin_dir, "--mem-fraction-static", "0.1")
    with pytest.raises(SettingsError, match=r"--mem-fraction-static 0\.1: leaves no room"):
        kv_cache_budget(settings, DeviceMemory(total=GIB, available=GIB // 2))


def test_max_total_tokens_wins_over_the_fraction(builtin_dir: Path) -> None:
    settings = resolved(builtin_dir, "--mem-fraction-static", "0.5", "--max-total-tokens", "4096")
    assert size_kv_cache(settings, DeviceMemory(GIB, GIB)).max_total_tokens == 4096


def test_cpu_memory_is_the_process_budget() -> None:
    memory = device_memory("cpu")
    assert 0 < memory.available <= memory.total


def test_the_engine_allocates_what_the_fraction_sized(builtin_dir: Path) -> None:
    settings = parse_serve_args(
        ["--device", "cpu", "--mem-fraction-static", "0.9", "--max-running-requests", "2"]
    )
    engine, ctx = build_engine(settings)
    try:
        tokens = ctx.settings.max_total_tokens
        assert tokens is not None and tokens % ctx.settings.page_size == 0
        assert engine.scheduler.cache.num_pages == tokens // ctx.settings.page_size
        assert engine.executor.runner.cache.mla_kv.shape[1] == tokens // ctx.settings.page_size
    finally:
        engine.stop()


def test_the_cards_yarn_override_is_honoured(builtin_dir: Path) -> None:
    base = LingConfig.from_hf(str(builtin_dir))
    card = LingConfig.from_hf(str(builtin_dir), CARD_YARN)
    assert (card.rope_theta, card.partial_rotary_factor) == (6000000, 0.5)
    assert card.rope_scaling is not None and card.rope_scaling["factor"] == 2.0
    # Values set from the CR (spec.model.ropeScaling.ropeTheta / partialRotaryFactor) reach the model.
    other = json.loads(CARD_YARN)
    other["rope_scaling"]["rope_theta"] = 1000000
    changed = LingConfig.from_hf(str(builtin_dir), json.dumps(other))
    assert changed.rope_theta == 1000000
    # Nothing else moved: the lifted key is the only difference from the card's config.
    same = dataclasses.replace(changed, rope_theta=card.rope_theta, rope_scaling=card.rope_scaling, raw={})
    assert same == dataclasses.replace(card, raw={})
    assert base.rope_scaling is None  # the built-in model has no YaRN of its own
