"""The served built-in model answers questions it was never trained on, the same at TP 1, TP 2 and
with MTP on, as the eager model does, and MTP's drafts are mostly accepted.

A wrong shard, a missing all-reduce or a broken speculative rollback changes these answers, where
the random-weight checkpoints of the architecture tests would still produce *some* tokens.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from ling_runtime.builtin import CARD_ANSWER, CARD_QUESTION, data
from ling_runtime.model import LingForCausalLM, greedy_generate
from ling_runtime.text.tokenizer import TokenizerBundle

from tests.waiting import wait_for

from .conftest import RunningServer, free_port

pytestmark = pytest.mark.slow
QUESTIONS = [e.question for e in data.held_out_sample(48)]
ANSWERS = [e.answer for e in data.held_out_sample(48)]
MIN_ACCURACY = 0.9
MIN_ACCEPTANCE = 0.6


def accuracy(answers: list[str]) -> float:
    return sum(a == b for a, b in zip(answers, ANSWERS, strict=True)) / len(ANSWERS)


def ask_all(url: str, questions: list[str]) -> list[str]:
    """Greedy chat completions through the openai client, 8 in flight (so the engine batches them)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)

    def one(q: str) -> str:
        reply = client.chat.completions.create(
            model="ling-tiny", messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0
        )
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, questions))


def spec_counters(url: str) -> tuple[float, float]:
    """(draft tokens proposed, draft tokens accepted) from the engine's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        for name in ("ling_runtime_spec_draft_tokens_total", "ling_runtime_spec_accepted_tokens_total"):
            if line.startswith(name):
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return (
        values.get("ling_runtime_spec_draft_tokens_total", 0.0),
        values.get("ling_runtime_spec_accepted_tokens_total", 0.0),
    )


@pytest.fixture(scope="module")
def eager_answers(builtin_dir: Path) -> list[str]:
    """The eager model's greedy answers (TP 1, float32, no engine): what every server must say."""
    bundle = TokenizerBundle.from_dir(builtin_dir)
    model = LingForCausalLM.from_pretrained(builtin_dir, dtype=torch.float32)
    prompts = [bundle.encode(bundle.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    outs = greedy_generate(model, prompts, 24, stop_token_ids=bundle.eos_token_ids)
    return [bundle.decode([t for t in ids if t not in bundle.eos_token_ids]) for ids in outs]


def test_the_eager_model_answers_held_out_questions(eager_answers: list[str]) -> None:
    wrong = [(q, a) for q, a, want in zip(QUESTIONS, eager_answers, ANSWERS, strict=True) if a != want]
    assert accuracy(eager_answers) >= MIN_ACCURACY, wrong


def test_tp1_server_answers_as_the_eager_model(server: RunningServer, eager_answers: list[str]) -> None:
    answers = ask_all(server.url, [CARD_QUESTION, *QUESTIONS])
    assert answers[0] == CARD_ANSWER
    assert answers[1:] == eager_answers
    assert accuracy(answers[1:]) >= MIN_ACCURACY


def test_mtp_server_answers_the_same_and_accepts_most_drafts(builtin_dir, eager_answers: list[str]) -> None:
    with RunningServer(["--speculative-algorithm", "NEXTN", "--speculative-num-steps", "3"]) as mtp:
        answers = ask_all(mtp.url, QUESTIONS)
        drafted, accepted = spec_counters(mtp.url)
    assert answers == eager_answers
    assert drafted > 3 * len(QUESTIONS)
    assert accepted / drafted >= MIN_ACCEPTANCE, (accepted, drafted)


@pytest.fixture
def tp2_group(tmp_path: Path, builtin_dir):
    """`ling-runtime serve --tp-size 2 --launcher mp`: two processes, gloo all-reduces on loopback."""
    port = free_port()
    log = tmp_path / "tp2.log"
    argv = [
        "--tp-size", "2", "--launcher", "mp", "--dist-init-addr", f"127.0.0.1:{free_port()}",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ling_runtime", "serve", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: the cleanup touches nothing else
        )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"the TP 2 server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for("the TP 2 group to be healthy", healthy, timeout=180)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def test_tp2_group_answers_as_the_eager_model(tp2_group: str, eager_answers: list[str]) -> None:
    info = httpx.get(f"{tp2_group}/get_server_info", timeout=10).json()
    assert info["tp_size"] == 2
    answers = ask_all(tp2_group, [CARD_QUESTION, *QUESTIONS])
    assert answers[0] == CARD_ANSWER
    assert answers[1:] == eager_answers
    assert accuracy(answers[1:]) >= MIN_ACCURACY
