"""bench/serving: pure parts (percentiles, distributions, prompts, agent trace, SSE and /metrics
parsing, records) directly, then end to end against `ling-runtime serve` (built-in model, CPU,
127.0.0.1) started as a subprocess, as a user runs it."""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.serving import abuse, cli, runner
from bench.serving.client import chunk_output, normalize_base_url, parse_sse_line
from bench.serving.stats import (
    RequestResult,
    by_turn,
    distribution,
    metrics_report,
    parse_metrics,
    percentile,
    summarize,
)
from bench.serving.workload import (
    Calibration,
    agent_trace,
    fit_from_probes,
    fit_text,
    poisson_arrivals,
    random_lengths,
    rng_for,
    single_turn_prompts,
    words,
)


# ---- statistics ------------------------------------------------------------------------------------
def test_percentile_matches_numpy_linear_interpolation() -> None:
    rng = random.Random(1)
    for n in (1, 2, 7, 100, 1001):
        values = [rng.expovariate(3.0) for _ in range(n)]
        for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_distribution_is_in_ms_and_ordered() -> None:
    d = distribution([0.010, 0.020, 0.030, 0.040, 1.0])
    assert d["n"] == 5 and d["min"] == 10.0 and d["max"] == 1000.0 and d["mean"] == 220.0
    assert d["min"] <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"]
    assert distribution([]) == {
        "n": 0,
        "mean": None,
        "p50": None,
        "p90": None,
        "p99": None,
        "min": None,
        "max": None,
    }


def _result(i: int, ok: bool = True, **kw) -> RequestResult:
    r = RequestResult(index=i, ok=ok, **kw)
    return r


def test_summarize_counts_throughput_tpot_errors_and_cache() -> None:
    results = [
        _result(
            0, e2e=1.0, chunk_times=[0.2, 0.4, 1.0], prompt_tokens=100, completion_tokens=5, cached_tokens=60
        ),
        _result(1, e2e=2.0, chunk_times=[0.5, 2.0], prompt_tokens=300, completion_tokens=4, cached_tokens=0),
        _result(2, ok=False, status=503, error="http_503", e2e=0.1),
        _result(3, ok=False, error="timeout", e2e=5.0),
        _result(4, ok=False, status=503, error="http_503", e2e=0.1),
    ]
    s = summarize(results, duration=4.0)
    assert (s["requests"], s["completed"], s["failed"]) == (5, 2, 3)
    assert s["errors"] == {"http_503": 2, "timeout": 1}
    assert s["output_tokens"] == 9 and s["prompt_tokens"] == 400
    assert s["output_throughput"] == 2.25 and s["request_throughput"] == 0.5
    assert s["cached_tokens"] == 60 and s["cache_hit_rate"] == 0.15
    # TPOT excludes the first token: (1.0 - 0.2) / 4 and (2.0 - 0.5) / 3.
    assert s["tpot_ms"]["min"] == 200.0 and s["tpot_ms"]["max"] == 500.0
    assert s["ttft_ms"]["n"] == 2 and s["itl_ms"]["n"] == 3  # gaps between output chunks
    assert s["concurrency_achieved"] == 0.75  # (1 + 2) s of requests over 4 s


def test_summarize_without_usage_counts_chunks_and_reports_no_cache() -> None:
    s = summarize([_result(0, e2e=1.0, chunk_times=[0.1, 0.2, 0.3])], duration=1.0)
    assert s["output_tokens"] == 3 and not s["output_tokens_from_usage"]
    assert s["cached_tokens"] is None and s["cache_hit_rate"] is None


def test_by_turn_groups_agent_results() -> None:
    rs = [
        _result(0, e2e=1, chunk_times=[0.5], prompt_tokens=100, meta={"session": 0, "turn": 0}),
        _result(
            1, e2e=1, chunk_times=[0.1], prompt_tokens=300, cached_tokens=90, meta={"session": 0, "turn": 1}
        ),
        _result(2, e2e=1, chunk_times=[0.7], prompt_tokens=110, meta={"session": 1, "turn": 0}),
    ]
    turns = by_turn(rs)
    assert [t["turn"] for t in turns] == [0, 1]
    assert turns[0]["completed"] == 2 and turns[0]["prompt_tokens_mean"] == 105.0
    assert turns[0]["cached_tokens_mean"] is None and turns[1]["cached_tokens_mean"] == 90.0


# ---- workloads -------------------------------------------------------------------------------------
def test_random_lengths_bounds_and_determinism() -> None:
    a = random_lengths(rng_for(3, "x"), 500, 100, 0.25)
    assert a == random_lengths(rng_for(3, "x"), 500, 100, 0.25)
    assert a != random_lengths(rng_for(4, "x"), 500, 100, 0.25)
    assert min(a) >= 25 and max(a) <= 100 and len(set(a)) > 50
    assert set(random_lengths(rng_for(0, "x"), 20, 64, 1.0)) == {64}
    assert min(random_lengths(rng_for(0, "x"), 200, 10, 0.0)) == 1
    with pytest.raises(ValueError):
        random_lengths(rng_for(0, "x"), 1, 0, 0.5)
    with pytest.raises(ValueError):
        random_lengths(rng_for(0, "x"), 1, 10, 1.5)


def test_poisson_arrivals_mean_gap_and_infinite_rate() -> None:
    t = poisson_arrivals(rng_for(0, "arrivals"), 4000, rate=8.0)
    assert t == poisson_arrivals(rng_for(0, "arrivals"), 4000, rate=8.0)
    assert t[0] == 0.0 and all(b >= a for a, b in itertools.pairwise(t))
    assert t[-1] / (len(t) - 1) == pytest.approx(1 / 8.0, rel=0.06)
    assert poisson_arrivals(rng_for(0, "a"), 5, math.inf) == [0.0] * 5
    with pytest.raises(ValueError):
        poisson_arrivals(rng_for(0, "a"), 5, 0.0)


def test_words_exact_length_and_deterministic() -> None:
    for n in (0, 1, 7, 500):
        assert len(words(rng_for(0, "w"), n)) == n
    assert words(rng_for(1, "w"), 300) == words(rng_for(1, "w"), 300) != words(rng_for(2, "w"), 300)


def test_fit_from_probes_linear_and_tokenizer() -> None:
    cal = fit_from_probes((200, 60), (2000, 510))  # 0.25 tokens a char, 10 tokens of template
    assert cal.method == "linear" and cal.tokens_per_char == pytest.approx(0.25) and cal.overhead == 10
    texts = ("a" * 200, "a" * 2000)
    exact = fit_from_probes((200, 219), (2000, 2019), count=len, texts=texts)
    assert exact.method == "tokenizer" and exact.overhead == 19 and exact.count is len
    # A tokenizer that is not the server's: the overheads differ, so the linear fit is used.
    other = fit_from_probes((200, 219), (2000, 2019), count=lambda t: len(t) // 2, texts=texts)
    assert other.method == "linear" and "tokenizer_disagrees" in other.detail


@functools.cache
def _bpe_counter():
    """A real BPE tokenizer (`tokenizers`, byte-level, merges trained on word text in ~50 ms), so
    tokens are not characters; independent of the runtime's built-in model, which is changing."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([words(rng_for(i, "corpus"), 3000) for i in range(30)], trainer)
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def _byte_counter(text: str) -> int:
    """A byte-level tokenizer's count (the built-in model's tokenizer is one)."""
    return len(text.encode())


def test_fit_text_is_exact_with_a_tokenizer_and_close_without() -> None:
    for count, per_char in ((_byte_counter, 1.0), (_bpe_counter(), 0.38)):
        exact = Calibration("tokenizer", per_char, 0, count)
        for target in (1, 17, 256, 1024):
            assert count(fit_text(rng_for(0, "t"), target, exact)) == target
    # Word counting as a stand-in tokenizer whose tokens are not characters.
    n_words = lambda t: len(t.split())  # noqa: E731
    for target in (5, 50, 300):
        assert (
            n_words(fit_text(rng_for(0, "t"), target, Calibration("tokenizer", 0.15, 0, n_words))) == target
        )
    linear = Calibration("linear", 0.25, 0)
    assert len(fit_text(rng_for(0, "t"), 1000, linear)) == 4000
    assert fit_text(rng_for(0, "t"), 0, linear) == ""


def test_single_turn_prompts_lengths_distinct_and_shared_prefix() -> None:
    count = _bpe_counter()
    cal = Calibration("tokenizer", 0.38, 5, count)
    specs = single_turn_prompts(7, 12, 300, 20, 0.5, cal)
    assert specs == single_turn_prompts(7, 12, 300, 20, 0.5, cal)
    assert all(count(s.text) + cal.overhead == s.target_prompt_tokens for s in specs)
    assert all(150 <= s.target_prompt_tokens <= 300 and 10 <= s.output_len <= 20 for s in specs)
    assert len({s.text[:12] for s in specs}) == len(specs)  # no shared prefix by default
    shared = single_turn_prompts(7, 6, 400, 8, 1.0, cal, shared_prefix_len=200)
    prefix = shared[0].text[:200]
    assert all(s.text.startswith(prefix) for s in shared)
    assert all(abs(count(s.text) + cal.overhead - 400) <= 1 for s in shared)


def test_agent_trace_shares_the_prefix_and_appends_turns() -> None:
    cal = Calibration("tokenizer", 1.0, 19, _byte_counter)
    trace = agent_trace(5, sessions=3, turns=4, shared_len=1500, task_len=40, tool_result_len=60, cal=cal)
    again = agent_trace(5, sessions=3, turns=4, shared_len=1500, task_len=40, tool_result_len=60, cal=cal)
    assert trace == again
    assert trace != agent_trace(
        6, sessions=3, turns=4, shared_len=1500, task_len=40, tool_result_len=60, cal=cal
    )
    assert len(trace.sessions) == 3 and 1 <= len(trace.tools) <= 8
    shared = cal.count(trace.system) + sum(cal.count(json.dumps(t)) for t in trace.tools)
    assert abs(shared + cal.overhead - 1500) <= 2
    for s in trace.sessions:
        assert len(s.calls) == len(s.tool_results) == 3
        assert all(30 <= cal.count(r) <= 60 for r in s.tool_results)
    replies = ["first", "second", "third"]
    for t in range(4):
        msgs = trace.messages(1, replies[:t])
        assert [m["role"] for m in msgs] == ["system", "user"] + ["assistant", "tool"] * t
        assert msgs[0]["content"] == trace.system
        for k in range(t):
            call = msgs[2 + 2 * k]["tool_calls"][0]
            assert msgs[2 + 2 * k]["content"] == replies[k]
            assert msgs[3 + 2 * k]["tool_call_id"] == call["id"]
            assert msgs[3 + 2 * k]["content"] == trace.sessions[1].tool_results[k]
            assert call["function"]["name"] in {tool["function"]["name"] for tool in trace.tools}
            json.loads(call["function"]["arguments"])
    # Sessions differ from the task on; a turn's conversation extends the previous one.
    assert trace.messages(0, [])[1] != trace.messages(1, [])[1]
    assert trace.messages(2, replies[:2])[:4] == trace.messages(2, replies[:1])
    as_user = trace.messages(0, replies, tool_role="user")
    assert [m["role"] for m in as_user] == ["system", "user"] + ["assistant", "user"] * 3


# ---- the wire --------------------------------------------------------------------------------------
def test_sse_lines_and_chunk_output() -> None:
    assert parse_sse_line(b"data: [DONE]\n") == ("done", None)
    assert parse_sse_line(b"\n") == ("skip", None)
    assert parse_sse_line(b": keep-alive\n") == ("skip", None)
    assert parse_sse_line(b'data: {"a": 1}\r\n') == ("data", {"a": 1})
    assert parse_sse_line(b"data: {oops")[0] == "bad"
    role_only = {"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    assert chunk_output(role_only) is None
    assert chunk_output({"choices": [{"delta": {"content": "hi"}}]}) == "hi"
    assert chunk_output({"choices": [{"delta": {"reasoning_content": "hm"}}]}) == "hm"
    call = {"choices": [{"delta": {"tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}}]}
    assert chunk_output(call) == "f{}"
    assert chunk_output({"choices": [{"text": "abc", "finish_reason": None}]}) == "abc"
    assert chunk_output({"choices": [], "usage": {"prompt_tokens": 3}}) is None
    assert normalize_base_url("http://h:1/v1/") == normalize_base_url("http://h:1") == "http://h:1"


def test_request_body_sends_ignore_eos_only_when_asked() -> None:
    plain = runner.request_body("completions", "m", "hello", 8, runner.BodyOptions())
    assert plain["prompt"] == "hello" and plain["stream"] is True and "ignore_eos" not in plain
    assert plain["stream_options"] == {"include_usage": True}
    opts = runner.BodyOptions(temperature=0.5, ignore_eos=True, extra_body={"top_k": 5})
    tools = [{"type": "function", "function": {"name": "f"}}]
    chat = runner.request_body("chat", "m", "hello", 8, opts, tools)
    assert chat["messages"] == [{"role": "user", "content": "hello"}] and chat["tools"] == tools
    assert chat["ignore_eos"] is True and chat["top_k"] == 5 and chat["temperature"] == 0.5


OURS = """# HELP ling_runtime_prompt_tokens_total Prompt tokens processed
# TYPE ling_runtime_prompt_tokens_total counter
ling_runtime_prompt_tokens_total{model_name="m"} 1000.0
ling_runtime_cached_prompt_tokens_total{model_name="m"} 250.0
ling_runtime_num_queue_reqs{model_name="m"} 3.0
ling_runtime_ttft_seconds_bucket{le="0.1",model_name="m"} 4.0
ling_runtime_ttft_seconds_sum{model_name="m"} 0.5
ling_runtime_prompt_tokens_created{model_name="m"} 1.7e9
python_gc_objects_collected_total{generation="0"} 10.0
"""


def test_metrics_parse_and_report_our_cache_counters() -> None:
    before = parse_metrics(OURS)
    assert 'ling_runtime_num_queue_reqs{model_name="m"}' in before
    assert not any("_bucket" in k or "_created" in k or k.startswith("python_") for k in before)
    after = parse_metrics(
        OURS.replace("1000.0", "3000.0")
        .replace("} 250.0", "} 1250.0")
        .replace('sum{model_name="m"} 0.5', 'sum{model_name="m"} 2.5')
    )
    rep = metrics_report(before, after)
    assert rep["available"] and rep["families"] == ["ling_runtime"]
    assert rep["deltas"]['ling_runtime_prompt_tokens_total{model_name="m"}'] == 2000.0
    assert rep["deltas"]['ling_runtime_ttft_seconds_sum{model_name="m"}'] == 2.0
    assert rep["gauges"]['ling_runtime_num_queue_reqs{model_name="m"}'] == 3.0
    assert rep["cache"] == {"cached_prompt_tokens": 1000.0, "hit_rate": 0.5}
    assert metrics_report(None, None) == {"available": False}


def test_metrics_report_vllm_and_sglang_cache_figures() -> None:
    vllm = 'vllm:prefix_cache_queries_total{model_name="m"} %s\nvllm:prefix_cache_hits_total{model_name="m"} %s\n'
    rep = metrics_report(parse_metrics(vllm % (100, 10)), parse_metrics(vllm % (1100, 410)))
    assert rep["families"] == ["vllm"] and rep["cache"]["hit_rate"] == 0.4
    sglang = 'sglang:cache_hit_rate{model_name="m"} 0.75\nsglang:prompt_tokens_total{model_name="m"} 9.0\n'
    rep = metrics_report(None, parse_metrics(sglang))
    assert rep["families"] == ["sglang"] and rep["cache"] == {"hit_rate_gauge": 0.75}


def test_record_helpers() -> None:
    a = [_result(1, text="x"), _result(0, text="y")]
    assert runner.outputs_digest(a) == runner.outputs_digest(list(reversed(a)))
    assert runner.outputs_digest(a) != runner.outputs_digest([_result(1, text="x"), _result(0, text="z")])
    stream = io.StringIO()
    progress = runner.Progress(3, "t", stream=stream)
    for i in range(3):
        progress.update(_result(i, completion_tokens=2))
    assert "3/3 err 0" in stream.getvalue().splitlines()[-1]


def test_abuse_sizes_and_body() -> None:
    assert abuse.parse_size("512") == 512 and abuse.parse_size("1MB") == 10**6
    assert abuse.parse_size("20MiB") == 20 * 2**20 and abuse.parse_size("1.5KB") == 1500
    assert abuse.parse_abuse("20MB:1, 1MB:10") == [(20 * 10**6, 1), (10**6, 10)]
    assert abuse.parse_abuse("4KB") == [(4000, 1)]
    for bad in ("", "1XB:1", "1MB:0"):
        with pytest.raises(ValueError):
            abuse.parse_abuse(bad)
    for size in (1000, 250_000):
        body = abuse.abuse_body("m", size)
        assert len(body) == size and json.loads(body)["messages"][0]["role"] == "user"


# ---- end to end: `ling-runtime serve` on 127.0.0.1 -------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`ling-runtime serve` (built-in model, CPU) in a subprocess; yields its base URL."""
    port = _free_port()
    exe = Path(sys.executable).with_name("ling-runtime")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ling_runtime.cli"]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        # Healthy in ~10 s once the built-in model is cached; its one-time build on a fresh machine
        # takes minutes, hence the generous bound.
        deadline = time.monotonic() + 540
        while True:  # wait for the condition (healthy), bounded
            assert proc.poll() is None, f"server exited {proc.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"server not healthy in 540 s: {log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run(argv: list[str], out: Path) -> dict:
    assert cli.main([*argv, "--output", str(out), "--no-progress"]) == 0
    return json.loads(out.read_text())


def _ordered(d: dict) -> bool:
    return d["min"] <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"]


def test_random_workload_end_to_end(served: str, tmp_path: Path, capsys) -> None:
    rec = _run(
        ["--base-url", served, "--num-prompts", "6", "--input-len", "64", "--max-tokens", "8", "--range-ratio",
         "0.5", "--max-concurrency", "3", "--ignore-eos", "--request-rate", "50"],
        tmp_path / "r.json",
    )  # fmt: skip
    s = rec["summary"]
    assert s["requests"] == s["completed"] == len(rec["requests"]) == 6 and s["failed"] == 0
    assert s["output_tokens"] == 6 * 8 and s["output_tokens_from_usage"]  # ignore_eos: every token
    assert s["prompt_tokens"] == sum(r["prompt_tokens"] for r in rec["requests"]) > 0
    assert all(32 <= r["prompt_tokens"] <= 64 for r in rec["requests"])
    assert _ordered(s["ttft_ms"]) and _ordered(s["e2e_ms"]) and s["ttft_ms"]["max"] <= s["e2e_ms"]["max"]
    assert s["output_throughput"] > 0 and s["request_throughput"] > 0
    assert rec["server"]["model"] == "ling-tiny" and rec["calibration"]["method"] == "tokenizer"
    m = rec["server_metrics"]
    assert m["available"] and m["families"] == ["ling_runtime"]
    # The server counted the same prompt tokens as the benchmark (the warm-up was before the scrape).
    assert m["deltas"]['ling_runtime_prompt_tokens_total{model_name="ling-tiny"}'] == s["prompt_tokens"]
    # The server reports usage.prompt_tokens_details.cached_tokens; random prompts share no cached block.
    assert rec["summary"]["cached_tokens"] == 0
    line = capsys.readouterr().out
    assert "bench.serving random: 6/6 ok" in line and str(tmp_path / "r.json") in line


def test_fixed_and_agent_workloads_end_to_end(served: str, tmp_path: Path) -> None:
    rec = _run(
        ["--base-url", served, "--dataset", "fixed", "--num-prompts", "3", "--input-len", "300",
         "--max-tokens", "1", "--endpoint", "chat"],
        tmp_path / "f.json",
    )  # fmt: skip
    assert [r["prompt_tokens"] for r in rec["requests"]] == [300] * 3
    assert all(r["ttft_ms"] is not None for r in rec["requests"])
    rec = _run(
        ["--base-url", served, "--dataset", "agent", "--sessions", "2", "--turns", "3", "--shared-len", "800",
         "--task-len", "20", "--tool-result-len", "40", "--max-tokens", "6", "--ignore-eos", "--seed", "3"],
        tmp_path / "a.json",
    )  # fmt: skip
    s = rec["summary"]
    assert s["completed"] == len(rec["requests"]) == 6 and rec["agent"]["sessions_cut_short"] == 0
    assert rec["calibration"]["shared_prefix"]["measured"] == 800
    turns = rec["agent"]["by_turn"]
    assert [t["turn"] for t in turns] == [0, 1, 2] and all(t["completed"] == 2 for t in turns)
    means = [t["prompt_tokens_mean"] for t in turns]
    assert means[0] > 800 and means[0] < means[1] < means[2]  # each turn appends reply + tool result
    assert {(r["session"], r["turn"]) for r in rec["requests"]} == {(s, t) for s in (0, 1) for t in (0, 1, 2)}
    # Turns 1 and 2 of each session reuse at least the shared prefix's whole 64-token blocks (the two
    # first turns may run at once, so both can miss).
    assert s["cached_tokens"] >= 4 * (800 // 64) * 64 and 0 < s["cache_hit_rate"] < 1


def test_errors_are_counted_by_status(served: str, tmp_path: Path) -> None:
    out = tmp_path / "e.json"
    argv = ["--base-url", served, "--model", "no-such-model", "--num-prompts", "2", "--input-len", "16",
            "--max-tokens", "2", "--warmup", "0", "--output", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 1  # nothing completed
    rec = json.loads(out.read_text())
    assert rec["summary"]["completed"] == 0 and rec["summary"]["failed"] == 2
    [(kind, n)] = rec["summary"]["errors"].items()
    assert kind.startswith("http_4") and n == 2
    assert rec["calibration"]["method"] == "heuristic" and rec["warnings"]


def test_abuse_benchmark_end_to_end(served: str, tmp_path: Path) -> None:
    out = tmp_path / "abuse.json"
    argv = ["--base-url", served, "--abuse", "20KB:2", "--num-prompts", "4", "--input-len", "32",
            "--output-len", "4", "--output", str(out), "--no-progress"]  # fmt: skip
    assert abuse.main(argv) == 0
    rec = json.loads(out.read_text())
    for name in ("baseline", "abuse"):
        assert rec[name]["summary"]["completed"] == 4
        assert rec[name]["health"]["latency_ms"]["n"] >= 1 and set(rec[name]["health"]["statuses"]) == {"200"}
    sent = rec["abuse"]["abuse"]
    assert sent["sent"] == 2 and all(r["bytes"] == 20_000 for r in sent["requests"])
    # A 20 KB prompt exceeds the model's context: refused (400 today, 413 once bodies are bounded).
    assert set(sent["statuses"]) <= {"400", "413"}
    assert rec["ratios"]["e2e_ms"]["p50"] > 0
