"""The server as a careless client meets it (issue 16), in process on 127.0.0.1: bounded bodies,
strict typing, honoured or refused fields, constrained decoding, cancellation that frees the cache,
admission limits, errors in the OpenAI shape, and the API key."""

from __future__ import annotations

import http.client
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from ling_runtime.cli import API_KEY_ENV, parse_serve_args
from ling_runtime.model import LingForCausalLM
from ling_runtime.model.generate import greedy_generate
from ling_runtime.settings import SettingsError

from tests.waiting import wait_for

from .conftest import RunningServer

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
LONG = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0}


def post(server: RunningServer, path: str, body: object) -> httpx.Response:
    # json.dumps escapes lone surrogates as JSON allows (\ud800); httpx's json= cannot encode them.
    raw = json.dumps(body).encode()
    return httpx.post(
        f"{server.url}{path}", content=raw, headers={"Content-Type": "application/json"}, timeout=60
    )


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


# ---- bounded input --------------------------------------------------------------------------------
def test_a_body_above_the_limit_is_413_before_it_is_read(server: RunningServer) -> None:
    limit = server.ctx.body_limit
    body = b'{"prompt": "' + b"a" * limit + b'"}'
    resp = httpx.post(f"{server.url}/v1/completions", content=body, timeout=30)
    assert resp.status_code == 413 and error_of(resp)["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: cut where it crosses the limit
        yield b'{"prompt": "'
        for _ in range(limit // 65536 + 2):
            yield b"a" * 65536

    resp = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=30)
    assert resp.status_code == 413 and error_of(resp)["code"] == "request_too_large"
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert (
        'ling_runtime_requests_rejected_total{model_name="ling-tiny",reason="body_too_large"} 2.0' in metrics
    )


def test_the_default_limit_fits_the_longest_legal_prompt(server: RunningServer) -> None:
    tok = server.engine.tokenizer
    longest = server.ctx.context_length * tok.max_token_bytes
    assert server.ctx.body_limit > 3 * longest  # \\uXXXX-escaped, with room for the rest


def test_text_that_cannot_fit_is_refused_before_tokenizing(server: RunningServer) -> None:
    # The length check answers from the character count (its message says "characters"); the
    # engine's own check would count tokens.
    chars = server.ctx.context_length * server.engine.tokenizer.max_token_bytes + 1
    for path, body in (
        ("/v1/completions", {"prompt": "a" * chars}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * chars}]}),
        ("/generate", {"text": "a" * chars}),
    ):
        resp = post(server, path, body)
        err = error_of(resp)
        assert resp.status_code == 400 and err["code"] == "context_length_exceeded", (path, err)
        assert f"holds {chars} characters" in err["message"]


# ---- strict requests ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "param", "fragment"),
    [
        (
            "/generate",
            {"input_ids": [1, 2], "sampling_params": {"stop": 5}},
            "sampling_params.stop",
            "string",
        ),
        (
            "/generate",
            {"input_ids": [1], "sampling_params": {"stop_token_ids": ["a"]}},
            "sampling_params.stop_token_ids.0",
            "integer",
        ),
        (
            "/generate",
            {"input_ids": [1], "sampling_params": {"seed": "x"}},
            "sampling_params.seed",
            "integer",
        ),
        (
            "/generate",
            {"input_ids": [1], "sampling_params": {"max_new_tokens": "5"}},
            "sampling_params.max_new_tokens",
            "integer",
        ),
        (
            "/generate",
            {"input_ids": [1], "sampling_params": {"no_stop_trim": True}},
            "sampling_params.no_stop_trim",
            "not supported",
        ),
        ("/generate", {"text": "\ud800"}, "text", "surrogate"),
        ("/v1/chat/completions", {"messages": []}, "messages", "at least 1"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a\udfffb"}]},
            "messages.0.content",
            "surrogate",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "robot", "content": "x"}]},
            "messages.0.role",
            "user",
        ),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1.5}, "max_tokens", "integer"),
        ("/v1/chat/completions", {"messages": MESSAGES, "logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        ("/v1/chat/completions", {"messages": MESSAGES, "guided_json": {}}, "guided_json", "not supported"),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "reasoning_effort": "high"},
            "reasoning_effort",
            "not supported",
        ),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "tool_choice": "required"},
            "tool_choice",
            "requires tools",
        ),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "frequency_penalty": 3},
            "frequency_penalty",
            "-2 <=",
        ),
        ("/v1/chat/completions", {"messages": MESSAGES, "min_p": 2}, "min_p", "min_p"),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "response_format": {"type": "xml"}},
            "response_format.type",
            "json_object",
        ),
        ("/v1/completions", {"prompt": "x", "stop": [1]}, "stop.0", "string"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix", "not supported"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream", "boolean"),
    ],
)
def test_bad_fields_are_400_naming_the_field(server, path, body, param, fragment) -> None:
    resp = post(server, path, body)
    err = error_of(resp)
    assert resp.status_code == 400, err
    assert err["param"] == param and fragment in err["message"], err


def test_bodies_that_are_not_json_objects_are_400(server: RunningServer) -> None:
    for raw in (b"{bad", b"[1, 2]", b'{"prompt": "\xff"}'):
        resp = httpx.post(f"{server.url}/v1/completions", content=raw, timeout=30)
        assert resp.status_code == 400 and error_of(resp)["message"].startswith("body:"), raw


def test_http_errors_use_the_openai_shape(server: RunningServer) -> None:
    resp = httpx.get(f"{server.url}/no/such/route", timeout=30)
    assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"
    resp = httpx.get(f"{server.url}/v1/chat/completions", timeout=30)
    assert resp.status_code == 405 and error_of(resp)["code"] == "method_not_allowed"
    assert resp.headers["allow"] == "POST"
    resp = httpx.post(f"{server.url}/v1/models", timeout=30)
    assert resp.status_code == 405 and "error" in resp.json()


# ---- honoured fields ------------------------------------------------------------------------------
def test_response_format_json_schema_constrains_the_output(server: RunningServer) -> None:
    schema = {
        "type": "object",
        "properties": {"capital": {"enum": ["Paris", "Rome", "Oslo"]}, "sure": {"type": "boolean"}},
        "required": ["capital", "sure"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    for temperature in (0.0, 1.5):
        reply = server.openai().chat.completions.create(
            model="ling-tiny",
            messages=MESSAGES,
            max_tokens=40,
            temperature=temperature,
            seed=3,
            response_format=fmt,
        )
        answer = json.loads(reply.choices[0].message.content)
        assert answer["capital"] in ("Paris", "Rome", "Oslo") and answer["sure"] in (True, False)
        assert reply.choices[0].finish_reason == "stop"


def test_response_format_json_object_starts_an_object(server: RunningServer) -> None:
    reply = server.openai().chat.completions.create(
        model="ling-tiny",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        response_format={"type": "json_object"},
    )
    text = reply.choices[0].message.content
    assert text.startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_generate_regex_constrains_the_output(server: RunningServer) -> None:
    body = {"text": "Is Paris in France?", "sampling_params": {"max_new_tokens": 10, "regex": "(yes|no)[.!]"}}
    reply = post(server, "/generate", body).json()
    assert (
        reply["text"] in ("yes.", "yes!", "no.", "no!")
        and reply["meta_info"]["finish_reason"]["type"] == "stop"
    )


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("choice", "names"),
    [
        ("required", {"get_weather", "get_time"}),
        ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
    ],
)
def test_tool_choice_required_or_named_forces_a_tool_call(server, choice, names, stream) -> None:
    kwargs = {
        "model": "ling-tiny",
        "messages": MESSAGES,
        "tools": TOOLS,
        "tool_choice": choice,
        "max_tokens": 60,
    }
    client = server.openai()
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, temperature=0, stream=True))
        calls = [c for ch in chunks if ch.choices for c in ch.choices[0].delta.tool_calls or []]
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]
        assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    else:
        reply = client.chat.completions.create(**kwargs, temperature=0)
        calls, finish = reply.choices[0].message.tool_calls, reply.choices[0].finish_reason
    assert finish == "tool_calls" and calls
    for call in calls:
        assert call.function.name in names
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert args["city"] in ("Paris", "Oslo")


def test_logit_bias_and_min_p_reach_the_sampler(server: RunningServer, tokenizer) -> None:
    forced = tokenizer.encode("Z")[0]
    reply = server.openai().completions.create(
        model="ling-tiny",
        prompt="Hello",
        max_tokens=4,
        temperature=0,
        logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].text == "Z" * 4
    # min_p 1.0 keeps the most likely token only: sampling at temperature 1 is greedy then.
    greedy = server.openai().completions.create(
        model="ling-tiny", prompt="Hello", max_tokens=8, temperature=0
    )
    sampled = server.openai().completions.create(
        model="ling-tiny", prompt="Hello", max_tokens=8, temperature=1.0, extra_body={"min_p": 1.0}
    )
    assert sampled.choices[0].text == greedy.choices[0].text


def penalized_greedy(
    model: LingForCausalLM, prompt: list[int], n: int, freq: float, pres: float, rep: float
) -> list[int]:
    """The oracle: the model's greedy decode, its logits penalized as OpenAI (frequency, presence:
    output tokens) and HF (repetition: prompt and output tokens) define it, one full pass per token."""
    out: list[int] = []
    for _ in range(n):
        logits = torch.tensor(model_logits(model, prompt + out))
        for token in set(prompt + out):
            logits[token] = logits[token] / rep if logits[token] > 0 else logits[token] * rep
        for token in set(out):
            logits[token] -= freq * out.count(token) + pres
        out.append(int(torch.argmax(logits)))
    return out


def model_logits(model: LingForCausalLM, ids: list[int]) -> list[float]:
    from ling_runtime.model.batch import ForwardBatch

    cache = model.make_cache(num_slots=1, num_pages=-(-len(ids) // 16), page_size=16)
    pages = torch.arange(-(-len(ids) // 16), dtype=torch.int64).view(1, -1)
    batch = ForwardBatch.build([ids], [0], [0], pages, device=model.device)
    hidden = model(batch, cache)
    return model.compute_logits(hidden[batch.last_token_indices()])[0].tolist()


def test_penalties_match_the_oracle(server: RunningServer) -> None:
    oracle = LingForCausalLM.from_pretrained(server.ctx.settings.model_dir, dtype=torch.float32)
    # Token ids the built-in model is unsure after, so every penalty changes the greedy output.
    prompt = [694, 730, 341, 565, 823, 797, 714, 610]
    plain = penalized_greedy(oracle, prompt, 10, 0.0, 0.0, 1.0)
    assert plain == greedy_generate(oracle, prompt, 10)
    for freq, pres, rep in ((2.0, 0.0, 1.0), (0.0, 2.0, 1.0), (0.0, 0.0, 2.0), (0.7, 0.3, 1.3)):
        want = penalized_greedy(oracle, prompt, 10, freq, pres, rep)
        if (freq, pres, rep) != (0.7, 0.3, 1.3):
            assert want != plain, (freq, pres, rep)
        body = {
            "input_ids": prompt,
            "sampling_params": {
                "max_new_tokens": 10,
                "temperature": 0,
                "ignore_eos": True,
                "frequency_penalty": freq,
                "presence_penalty": pres,
                "repetition_penalty": rep,
            },
        }
        assert post(server, "/generate", body).json()["output_ids"] == want, (freq, pres, rep)


def test_without_xgrammar_constrained_requests_are_400(server: RunningServer, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # what the GPU machine has: no package
    fmt = {"type": "json_object"}
    resp = post(server, "/v1/chat/completions", {"messages": MESSAGES, "response_format": fmt})
    err = error_of(resp)
    assert resp.status_code == 400 and err["param"] == "response_format" and "xgrammar" in err["message"]
    assert post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}).status_code == 200


# ---- cancellation ---------------------------------------------------------------------------------
def send(server: RunningServer, path: str, body: dict) -> http.client.HTTPConnection:
    """A request sent and not read: closing the connection is the client going away."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn


def freed(server: RunningServer) -> bool:
    cache = server.engine.scheduler.cache
    return server.engine.idle and cache.slots_used == 0 and cache.pages_used == 0


@pytest.fixture(scope="module")
def one_at_a_time(builtin_dir: Path) -> Iterator[RunningServer]:
    """One running request at a time, one more may wait, for at most 2 s."""
    argv = ["--served-model-name", "ling-tiny", "--max-running-requests", "1", "--max-queued-requests", "1"]
    with RunningServer([*argv, "--queue-timeout", "2"]) as s:
        yield s


@pytest.mark.parametrize("stream", [False, True])
def test_a_gone_client_aborts_its_running_request_within_a_second(one_at_a_time, stream) -> None:
    s = one_at_a_time
    conn = send(s, "/v1/completions", {"prompt": "Hello", "stream": stream, **LONG})
    wait_for("the request to run", lambda: s.engine.num_running == 1, timeout=30, every=0.02)
    assert s.engine.scheduler.cache.slots_used == 1
    gone = time.monotonic()
    conn.close()
    wait_for("its slot and pages to be freed", lambda: freed(s), timeout=5, every=0.02)
    assert time.monotonic() - gone < 1.0


def test_a_gone_client_aborts_its_queued_request_within_a_second(one_at_a_time) -> None:
    s = one_at_a_time
    running = send(s, "/v1/completions", {"prompt": "Hello", **LONG})
    wait_for("the first request to run", lambda: s.engine.num_running == 1, timeout=30, every=0.02)
    queued = send(s, "/v1/chat/completions", {"messages": MESSAGES, **LONG})
    wait_for("the second to wait", lambda: s.engine.num_waiting == 1, timeout=30, every=0.02)
    gone = time.monotonic()
    queued.close()
    wait_for("the queue to empty", lambda: s.engine.num_waiting == 0, timeout=5, every=0.02)
    assert time.monotonic() - gone < 1.0 and s.engine.num_running == 1
    running.close()
    wait_for("the running one to be freed", lambda: freed(s), timeout=5, every=0.02)


def test_a_full_queue_is_503_with_retry_after_and_a_waited_out_request_too(one_at_a_time) -> None:
    s = one_at_a_time
    running = send(s, "/v1/completions", {"prompt": "Hello", **LONG})
    wait_for("the first request to run", lambda: s.engine.num_running == 1, timeout=30, every=0.02)
    queued = send(s, "/v1/completions", {"prompt": "Hi", **LONG})
    wait_for("the second to wait", lambda: s.engine.num_waiting == 1, timeout=30, every=0.02)
    resp = post(s, "/v1/completions", {"prompt": "Hey", "max_tokens": 2})
    assert resp.status_code == 503 and error_of(resp)["code"] == "overloaded"
    assert int(resp.headers["retry-after"]) >= 1
    # --queue-timeout 2: the waiting one is refused once it has waited that long.
    reply = queued.getresponse()
    assert reply.status == 503 and reply.getheader("Retry-After")
    assert json.loads(reply.read())["error"]["code"] == "queue_timeout"
    running.close()
    wait_for("the running one to be freed", lambda: freed(s), timeout=5, every=0.02)
    metrics = httpx.get(f"{s.url}/metrics", timeout=30).text
    for reason in ("queue_full", "queue_timeout"):
        assert (
            f'ling_runtime_requests_rejected_total{{model_name="ling-tiny",reason="{reason}"}} 1.0' in metrics
        )


# ---- the API key ----------------------------------------------------------------------------------
def test_api_key_from_a_file_or_the_environment(tmp_path: Path, monkeypatch) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert parse_serve_args(["--api-key-file", str(key_file)]).api_key == "from-file"
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert parse_serve_args([]).api_key == "from-env"
    assert parse_serve_args(["--api-key", "flag"]).api_key == "flag"
    assert "from-env" not in repr(parse_serve_args([]))
    with pytest.raises(SettingsError, match="give one of them"):
        parse_serve_args(["--api-key", "a", "--api-key-file", str(key_file)])
    with pytest.raises(SettingsError, match="--api-key-file"):
        parse_serve_args(["--api-key-file", str(tmp_path / "missing")])


def test_bearer_is_case_insensitive_and_the_key_exact(builtin_dir, monkeypatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "s3cret")
    with RunningServer(["--max-running-requests", "1"]) as keyed:
        for header, status in (
            ("Bearer s3cret", 200),
            ("bearer s3cret", 200),
            ("BEARER   s3cret", 200),
            ("Bearer s3cre", 401),
            ("Bearer s3cret2", 401),
            ("Basic s3cret", 401),
            ("s3cret", 401),
        ):
            resp = httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": header}, timeout=30)
            assert resp.status_code == status, header
        resp = httpx.post(f"{keyed.url}/v1/completions", json={"prompt": "x"}, timeout=30)
        assert resp.status_code == 401 and error_of(resp)["code"] == "invalid_api_key"
        assert httpx.get(f"{keyed.url}/health", timeout=30).status_code == 200
