"""What every route reads: the engine, the settings it serves with, metrics, the start time, the
threads that parse and tokenize request bodies, the grammar compiler, the body size limit."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from ling_runtime.engine.engine import Engine
from ling_runtime.settings import Settings
from ling_runtime.telemetry import RuntimeMetrics
from ling_runtime.text.grammar import Grammars

# Threads that turn request bodies into token ids (JSON, chat template, tokenizer, grammars): off the
# event loop, few enough that a flood of large bodies cannot take every core from the engine.
TEXT_THREADS = 4
# JSON may spell one byte of prompt text with up to 3 bytes (a 2-byte character as a 6-byte \uXXXX
# escape, as json.dumps does by default).
JSON_BYTES_PER_TEXT_BYTE = 3
# JSON around the text, per token of the prompt: every message, tool and content part becomes at
# least one token of the rendered prompt, and none needs this many bytes of keys and quotes.
JSON_BYTES_PER_TOKEN = 64
# And the body's own fields (model, sampling parameters, ...).
BODY_FIELDS_BYTES = 1 << 16


def default_body_limit(context_length: int, max_token_bytes: int) -> int:
    """Bytes of the largest body a legal request can need: the longest prompt the context allows
    (every token the longest one, JSON-escaped, with its JSON structure), plus the other fields.
    Messages and tools are all rendered into the prompt, so the context bounds them all."""
    per_token = JSON_BYTES_PER_TEXT_BYTE * max_token_bytes + JSON_BYTES_PER_TOKEN
    return BODY_FIELDS_BYTES + context_length * per_token


@dataclass(frozen=True)
class ServerContext:
    engine: Engine
    settings: Settings  # resolved: model_dir and context_length are known
    metrics: RuntimeMetrics
    created: int = 0  # unix time the server started (the model card's `created`)
    text_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(TEXT_THREADS, thread_name_prefix="ling-text")
    )
    grammars: Grammars = field(default=None)  # type: ignore[assignment]  # set in __post_init__

    def __post_init__(self) -> None:
        if self.grammars is None:
            object.__setattr__(self, "grammars", Grammars(self.engine.tokenizer))

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    @property
    def body_limit(self) -> int:
        """--max-request-body-bytes, or enough for the longest legal prompt."""
        return self.settings.max_request_body_bytes or default_body_limit(
            self.context_length, self.engine.tokenizer.max_token_bytes
        )


def _context(request: Request) -> ServerContext:
    return request.app.state.ctx


# A route parameter of this type receives the app's ServerContext (set by build_app).
Context = Annotated[ServerContext, Depends(_context)]
