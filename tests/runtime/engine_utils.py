"""Driving an Engine synchronously from a test (no HTTP)."""

from __future__ import annotations

import threading
from typing import Any

from ling_runtime.distributed.executor import LocalExecutor
from ling_runtime.engine.engine import Engine
from ling_runtime.engine.request import TokenEvent
from ling_runtime.engine.sampling import SamplingParams
from ling_runtime.runner.build import build_runner
from ling_runtime.settings import Settings


def mtp(steps: int) -> dict[str, Any]:
    """The Settings fields of `--speculative-algorithm NEXTN --speculative-num-steps steps` (0: off)."""
    return {"speculative_algorithm": "NEXTN", "speculative_num_steps": steps} if steps else {}


def make_engine(model_dir: str, tokenizer, **settings_fields: Any) -> Engine:
    settings = Settings(model_path=str(model_dir), **settings_fields).resolve(str(model_dir))
    runner, _ = build_runner(settings)
    engine = Engine(LocalExecutor(runner), tokenizer, settings)
    engine.start()
    return engine


def generate_all(
    engine: Engine, prompts: list[list[int]], params: list[SamplingParams], timeout: float = 120
):
    """Submit every prompt at once (so they batch) and return each one's events."""
    events: dict[int, list[TokenEvent]] = {i: [] for i in range(len(prompts))}
    done = threading.Semaphore(0)

    def emitter(i: int):
        def emit(event: TokenEvent) -> None:
            events[i].append(event)
            if event.finished:
                done.release()

        return emit

    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.submit(engine.prepare(prompt, p), emitter(i))
    for _ in prompts:
        assert done.acquire(timeout=timeout), f"engine did not finish (failed: {engine.failed})"
    return [events[i] for i in range(len(prompts))]


def output_ids(events: list[TokenEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]
