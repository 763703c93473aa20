"""Driving an Engine synchronously from a test (no HTTP)."""

from __future__ import annotations

import threading

from ling_runtime.distributed.executor import LocalExecutor
from ling_runtime.engine.engine import Engine, TokenEvent
from ling_runtime.engine.sampling import SamplingParams
from ling_runtime.engine.setup import RuntimeSpec, build_runner


def make_engine(model_dir: str, tokenizer, **spec_fields) -> Engine:
    spec = RuntimeSpec(model_dir=str(model_dir), **spec_fields)
    runner, _ = build_runner(spec)
    engine = Engine(LocalExecutor(runner), tokenizer, spec.engine_config())
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
        engine.submit(prompt, p, emitter(i), engine.new_request_id())
    for _ in prompts:
        assert done.acquire(timeout=timeout), f"engine did not finish (failed: {engine.failed})"
    return [events[i] for i in range(len(prompts))]


def output_ids(events: list[TokenEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]
