"""The HTTP API against the real `openai` client: a server on 127.0.0.1 serving the built-in model."""

from __future__ import annotations

import asyncio
import itertools
import json

import httpx
import openai
import pytest
import torch
from ling_runtime.model import LingForCausalLM, greedy_generate

from tests.waiting import wait_for

from .conftest import RunningServer

MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def oracle(server: RunningServer) -> LingForCausalLM:
    # The checkpoint the server resolved with no --model-path (the built-in one).
    return LingForCausalLM.from_pretrained(server.ctx.settings.model_dir, dtype=torch.float32)


def expected_text(tokenizer, oracle, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    ids = greedy_generate(oracle, prompt_ids, max_tokens, stop_token_ids=tokenizer.eos_token_ids)
    if ids[-1] in tokenizer.eos_token_ids:
        ids = ids[:-1]
    return ids, tokenizer.decode(ids)


def test_models_lists_the_served_name(server: RunningServer) -> None:
    models = server.openai().models.list()
    assert [m.id for m in models.data] == ["ling-tiny"]


def test_chat_completion_is_the_greedy_continuation_of_the_template(server, tokenizer, oracle) -> None:
    reply = server.openai().chat.completions.create(
        model="ling-tiny", messages=MESSAGES, max_tokens=12, temperature=0
    )
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES))
    _, text = expected_text(tokenizer, oracle, prompt_ids, 12)
    assert reply.choices[0].message.content == text
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_chat_streaming_equals_non_streaming_and_reports_usage(server) -> None:
    client = server.openai()
    full = client.chat.completions.create(model="ling-tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="ling-tiny",
            messages=MESSAGES,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_with_tools_renders_them_into_the_prompt(server) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    client = server.openai()
    plain = client.chat.completions.create(model="ling-tiny", messages=MESSAGES, max_tokens=4, temperature=0)
    with_tools = client.chat.completions.create(
        model="ling-tiny", messages=MESSAGES, tools=tools, max_tokens=4, temperature=0
    )
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 40
    assert with_tools.choices[0].message.role == "assistant"


def test_completions_accept_token_ids_and_match_generate(server, tokenizer, oracle) -> None:
    prompt = [72, 101, 108, 108, 111]
    reply = server.openai().completions.create(model="ling-tiny", prompt=prompt, max_tokens=10, temperature=0)
    _, text = expected_text(tokenizer, oracle, prompt, 10)
    assert reply.choices[0].text == text
    native = httpx.post(
        f"{server.url}/generate",
        json={"input_ids": prompt, "sampling_params": {"max_new_tokens": 10, "temperature": 0}},
        timeout=60,
    ).json()
    # output_ids keep the EOS token that ended the request (as SGLang's do); the text does not.
    assert native["output_ids"] == greedy_generate(oracle, prompt, 10, stop_token_ids=tokenizer.eos_token_ids)
    assert native["text"] == text


def test_generate_greedy_equals_the_models_greedy_decode(server, oracle) -> None:
    prompt = list(range(30, 90))
    body = {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True},
    }
    reply = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    assert reply["output_ids"] == greedy_generate(oracle, prompt, 16)
    meta = reply["meta_info"]
    assert meta["prompt_tokens"] == 60 and meta["completion_tokens"] == 16
    assert meta["finish_reason"] == {"type": "length", "length": 16}


def test_generate_streams_cumulative_text(server) -> None:
    body = {
        "text": "Hi",
        "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
        "stream": True,
    }
    with httpx.stream("POST", f"{server.url}/generate", json=body, timeout=60) as resp:
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert len(chunks[-1]["output_ids"]) == 6
    assert all(b["text"].startswith(a["text"]) for a, b in itertools.pairwise(chunks))


def test_32_concurrent_streams_get_their_own_tokens(server, tokenizer, oracle) -> None:
    prompts = [[(7 * i + j) % 250 + 1 for j in range(3 + i % 5)] for i in range(32)]
    expected = greedy_generate(oracle, prompts, 8)

    async def one(client: openai.AsyncOpenAI, prompt: list[int]) -> str:
        stream = await client.completions.create(
            model="ling-tiny",
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def run_all() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        return await asyncio.gather(*(one(client, p) for p in prompts))

    texts = asyncio.run(run_all())
    assert texts == [tokenizer.decode(ids) for ids in expected]


@pytest.mark.parametrize(
    ("kwargs", "status", "param", "fragment"),
    [
        ({"temperature": -1}, 400, "temperature", "temperature"),
        ({"top_p": 0}, 400, "top_p", "top_p"),
        ({"max_tokens": 100000}, 400, "messages", "maximum context length is 4096 tokens"),
        ({"n": 2}, 400, "n", "n: only 1"),
        ({"model": "gpt-4"}, 404, "model", "does not exist"),
    ],
)
def test_bad_requests_get_openai_error_bodies(server, kwargs, status, param, fragment) -> None:
    request = {"model": "ling-tiny", "messages": MESSAGES, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as err:
        server.openai().chat.completions.create(**request)
    assert err.value.status_code == status
    body = err.value.body
    assert body["param"] == param and fragment in body["message"] and "type" in body
    if "context length" in fragment:
        assert body["code"] == "context_length_exceeded"


def test_malformed_bodies_are_400_naming_the_field(server) -> None:
    reply = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": "hi"}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
    reply = httpx.post(f"{server.url}/generate", json={"input_ids": [1], "text": "x"}, timeout=30)
    assert reply.status_code == 400 and "exactly one" in reply.json()["error"]["message"]
    reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": [10**7]}, timeout=30)
    assert reply.status_code == 400 and "outside the vocabulary" in reply.json()["error"]["message"]


def test_draining_server_answers_503(server) -> None:
    server.engine.draining = True
    try:
        with pytest.raises(openai.APIStatusError) as err:
            server.openai().chat.completions.create(model="ling-tiny", messages=MESSAGES, max_tokens=2)
    finally:
        server.engine.draining = False
    assert err.value.status_code == 503 and err.value.body["code"] == "shutting_down"


def test_client_disconnect_cancels_generation(server) -> None:
    body = {"model": "ling-tiny", "prompt": [1, 2, 3], "max_tokens": 3000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                break
    # The server notices the closed connection at its next disconnect poll (1 s) and aborts.
    wait_for(
        "the aborted request to leave the running set", lambda: server.engine.idle, timeout=10, every=0.05
    )
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert 'ling_runtime_requests_total{finish_reason="abort",model_name="ling-tiny"}' in metrics


def test_health_metrics_and_health_generate(server) -> None:
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{server.url}/health_generate", timeout=30).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    for name in (
        "ling_runtime_num_queue_reqs",
        "ling_runtime_num_running_reqs",
        "ling_runtime_time_to_first_token_seconds_bucket",
        "ling_runtime_inter_token_latency_seconds_bucket",
        "ling_runtime_e2e_request_latency_seconds_bucket",
        "ling_runtime_prompt_tokens_total",
        "ling_runtime_generation_tokens_total",
        "ling_runtime_kv_cache_usage_ratio",
        "ling_runtime_linear_state_slots_used",
        "ling_runtime_spec_draft_tokens_total",
        "ling_runtime_spec_accepted_tokens_total",
        "ling_runtime_spec_accept_length_bucket",
        "ling_runtime_model_load_seconds",
        "ling_runtime_ranks_alive",
    ):
        assert name in metrics, name
    generated = [
        line for line in metrics.splitlines() if line.startswith("ling_runtime_generation_tokens_total")
    ]
    assert float(generated[0].split()[-1]) > 0


def test_api_key_is_required_when_set(builtin_dir) -> None:
    with RunningServer(["--api-key", "sekret", "--max-running-requests", "2"]) as keyed:
        with pytest.raises(openai.AuthenticationError) as err:
            keyed.openai(api_key="wrong").models.list()
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
        assert [m.id for m in keyed.openai(api_key="sekret").models.list().data] == ["ling-tiny"]
        assert httpx.get(f"{keyed.url}/health", timeout=30).status_code == 200  # probes need no key


def test_mtp_server_gives_identical_greedy_text(builtin_dir, server) -> None:
    body = {
        "input_ids": list(range(40, 80)),
        "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True},
    }
    plain = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    with RunningServer(["--speculative-algorithm", "NEXTN", "--speculative-num-steps", "2"]) as mtp:
        spec = httpx.post(f"{mtp.url}/generate", json=body, timeout=60).json()
        metrics = httpx.get(f"{mtp.url}/metrics", timeout=30).text
    assert spec["output_ids"] == plain["output_ids"] and spec["text"] == plain["text"]
    assert spec["meta_info"]["spec_verify_ct"] > 0
    drafted = [
        line for line in metrics.splitlines() if line.startswith("ling_runtime_spec_draft_tokens_total")
    ]
    assert float(drafted[0].split()[-1]) >= 2 * spec["meta_info"]["spec_verify_ct"]


def test_logprobs_in_chat_and_completions(server) -> None:
    client = server.openai()
    chat = client.chat.completions.create(
        model="ling-tiny", messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(item.logprob <= 0 and len(item.top_logprobs) == 2 for item in content)
    # Greedy: the chosen token is the most likely one.
    assert all(item.top_logprobs[0].logprob == pytest.approx(item.logprob) for item in content)
    completion = client.completions.create(
        model="ling-tiny",
        prompt=[1, 2, 3],
        max_tokens=3,
        temperature=0,
        logprobs=1,
        extra_body={"ignore_eos": True},
    )
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 3 and len(logprobs.top_logprobs) == 3


def test_stop_strings_cut_the_text(server, tokenizer, oracle) -> None:
    prompt = [72, 101, 108, 108, 111]
    ids = greedy_generate(oracle, prompt, 12)
    full = tokenizer.decode(ids)
    stop = full[4:6] if len(full) > 6 else None
    if not stop or not stop.strip():
        stop = full[-2:]
    reply = server.openai().completions.create(
        model="ling-tiny",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].text == full[: full.index(stop)] and reply.choices[0].finish_reason == "stop"
