"""`WriteFailure`: a write the API refused or never answered. Plain data, below both the pure core,
whose status reports it (reconcile.with_write_failures), and the writer that records it (writes.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WriteFailure:
    """A write the API refused or never answered, as status and events report it."""

    verb: str  # create, delete, patch
    kind: str  # pod, Service
    name: str
    reason: str  # api.Reason: QuotaExceeded, AdmissionDenied, Forbidden, ...
    code: str  # the HTTP code, or timeout / connection
    message: str  # the API server's words
    group: int | None = None
    retry_at: float = 0.0  # monotonic time of the next try

    @property
    def cause(self) -> tuple[str, str, str]:
        """What one Warning event is posted for: the same cause on other objects or retries is not news."""
        return (self.reason, self.verb, self.kind)

    def describe(self) -> str:
        return f"cannot {self.verb} {self.kind} {self.name}: {self.message}"
