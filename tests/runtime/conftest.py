"""Runtime fixtures: the built-in tiny checkpoint, and in-process servers on 127.0.0.1 free ports."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def builtin_dir() -> Path:
    from ling_runtime.builtin import builtin_model_dir

    return builtin_model_dir()


@pytest.fixture(scope="session")
def tokenizer(builtin_dir: Path):
    from ling_runtime.text.tokenizer import TokenizerBundle

    return TokenizerBundle.from_dir(builtin_dir)


class RunningServer:
    def __init__(self, argv: list[str]) -> None:
        from ling_runtime.cli import parse_serve_args
        from ling_runtime.server.app import build_app
        from ling_runtime.server.launch import BackgroundServer, build_engine

        self.port = free_port()
        self.args = parse_serve_args([*argv, "--host", "127.0.0.1", "--port", str(self.port)])
        self.engine, self.ctx = build_engine(self.args)
        self.http = BackgroundServer(build_app(self.ctx), "127.0.0.1", self.port)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RunningServer:
        self.http.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.http.__exit__(*exc)
        self.engine.stop()

    def openai(self, api_key: str = "none"):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def server(builtin_dir: Path) -> Iterator[RunningServer]:
    """The built-in tiny model served with no --model-path (TP 1, in this process)."""
    with RunningServer(
        ["--served-model-name", "ling-tiny", "--tool-call-parser", "qwen25", "--chunked-prefill-size", "48"]
    ) as s:
        yield s
