"""Why the engine does not serve a request, as types: callers branch on the class, never on a message.

Two families. `InvalidRequest`: the request can never be served as asked (a client error; `param`
names the field). `EngineUnavailable`: the engine cannot take it now (shutting down, failed,
overloaded); the same request may succeed later or on another replica. The HTTP layer maps each
class to a status and an OpenAI error body in one place (server/errors.py).
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of everything the engine reports about a request it does not serve."""


class InvalidRequest(EngineError, ValueError):
    """A request field the engine cannot honour; `param` is its logical name ("prompt",
    "max_tokens", "temperature", ...) and the message reads "<param>: <detail>"."""

    def __init__(self, param: str, detail: str) -> None:
        super().__init__(f"{param}: {detail}")
        self.param = param
        self.detail = detail

    def message_for(self, field: str) -> str:
        """The message naming the field as the client spelled it (`messages`, `sampling_params.x`)."""
        return f"{field}: {self.detail}"


class PromptTooLong(InvalidRequest):
    """Prompt + max_tokens exceed the context length."""

    def __init__(self, detail: str) -> None:
        super().__init__("prompt", detail)

    def message_for(self, field: str) -> str:
        return self.detail  # OpenAI's wording for this error names no field


class EngineUnavailable(EngineError):
    """The engine cannot take the request now; retrying later (or elsewhere) may succeed."""


class EngineShuttingDown(EngineUnavailable):
    """The server is draining (SIGTERM): no new requests; at the drain deadline, running ones are cut."""


class EngineFailed(EngineUnavailable):
    """The step loop died or hung (a rank is gone or stopped, a collective failed or passed
    --watchdog-timeout); the group must be restarted. The message names the rank, never a path or
    a port."""


class Overloaded(EngineUnavailable):
    """The waiting queue is full (--max-queued-requests)."""


class QueueTimeout(Overloaded):
    """The request waited longer than --queue-timeout for admission."""
