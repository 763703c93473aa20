"""A step's inputs in one host-to-device copy, and its outputs in one non-blocking device-to-host copy.

`StepBuffers` owns one device byte buffer and (on CUDA) a ring of pinned host buffers of the same
size. A `Layout` names typed segments at fixed offsets (token ids, positions, slots, block tables,
per-row sampling parameters, ...); the host fills a segment through a numpy view of the current ring
buffer, then `upload` copies the used bytes in one `copy_(non_blocking=True)`, on the current stream.
The device views of a layout never move, so a CUDA graph captured over them reads each step's inputs
with no copy of its own.

Ring reuse: a pinned buffer is written again only after the copy that read it has run (an event per
buffer), so the host may prepare step n+1 while step n's copy still waits in the stream (the overlap
scheduler; ranks > 0 never wait for results, only here when they are two steps ahead).

On CPU the host views are the device buffer itself and `upload` copies nothing.

`HostCopy` is the way back: device tensors copied into pinned host memory without blocking, with an
event; `wait()` blocks only until that copy has run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_ALIGN = 8  # bytes: every segment starts on an 8-byte boundary (int64 / float32 views)


@dataclass(frozen=True)
class Segment:
    name: str
    dtype: torch.dtype
    numel: int


class Layout:
    """Typed segments at fixed offsets of a `StepBuffers`' memory (see the module docstring)."""

    def __init__(self, buffers: StepBuffers, segments: list[Segment]) -> None:
        self.buffers = buffers
        self.offsets: dict[str, tuple[int, torch.dtype, int]] = {}
        at = 0
        for s in segments:
            self.offsets[s.name] = (at, s.dtype, s.numel)
            size = s.numel * torch.empty((), dtype=s.dtype).element_size()
            at += -(-size // _ALIGN) * _ALIGN
        self.nbytes = at
        buffers.reserve(at)
        self.dev = {name: self._view(buffers.device_bytes, name) for name in self.offsets}
        self._host: list[dict[str, np.ndarray]] = []

    def _view(self, raw: torch.Tensor, name: str) -> torch.Tensor:
        at, dtype, numel = self.offsets[name]
        size = numel * torch.empty((), dtype=dtype).element_size()
        return raw[at : at + size].view(dtype)

    def host(self) -> dict[str, np.ndarray]:
        """numpy views of the ring buffer the next `upload` sends (waits until it is free)."""
        i = self.buffers.acquire()
        while len(self._host) <= i:
            raw = self.buffers.host_bytes[len(self._host)]
            self._host.append({name: self._view(raw, name).numpy() for name in self.offsets})
        return self._host[i]

    def upload(self) -> None:
        """Send what `host()` returned: one copy of this layout's bytes."""
        self.buffers.upload(self.nbytes)


class StepBuffers:
    """One device byte buffer and its pinned host ring (see the module docstring)."""

    def __init__(self, device: torch.device, ring: int = 2) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self.ring = ring if self.pinned else 1
        self.capacity = 0
        self.device_bytes = torch.empty(0, dtype=torch.uint8, device=device)
        self.host_bytes: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event | None] = []
        self._next = 0
        self._frozen = False

    def reserve(self, nbytes: int) -> None:
        """Grow to `nbytes` (before any layout's device views are taken: layouts are made up front)."""
        if nbytes <= self.capacity:
            return
        if self._frozen:
            raise RuntimeError("StepBuffers: every layout must be made before the first view is used")
        self.capacity = nbytes
        self.device_bytes = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
        if self.pinned:
            self.host_bytes = [torch.zeros(nbytes, dtype=torch.uint8).pin_memory() for _ in range(self.ring)]
            self._events = [None] * self.ring
        else:
            self.host_bytes = [self.device_bytes]
            self._events = [None]

    def layouts(self, specs: dict[object, list[Segment]]) -> dict[object, Layout]:
        """Make every layout at once (the buffer is sized for the largest), then freeze the memory."""
        top = max(
            (sum(-(-s.numel * _size(s.dtype) // _ALIGN) * _ALIGN for s in segs) for segs in specs.values()),
            default=0,
        )
        self.reserve(top)
        out = {key: Layout(self, segs) for key, segs in specs.items()}
        self._frozen = True
        return out

    def acquire(self) -> int:
        """The ring buffer the next upload uses, once the copy that last read it has run."""
        i = self._next
        event = self._events[i]
        if event is not None:
            event.synchronize()
            self._events[i] = None
        return i

    def upload(self, nbytes: int) -> None:
        i = self._next
        if self.pinned:
            self.device_bytes[:nbytes].copy_(self.host_bytes[i][:nbytes], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._events[i] = event
        self._next = (i + 1) % self.ring


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class HostCopy:
    """Device tensors on their way to the host: pinned, non-blocking, one event (see the module doc).
    On CPU the tensors are already on the host."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.event: torch.cuda.Event | None = None
        if tensors and tensors[0].device.type == "cuda":
            self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(self.host, tensors, strict=True):
                h.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = list(tensors)

    def wait(self) -> list[torch.Tensor]:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.host


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of ``values`` on ``device``. On CUDA through pinned memory and a non-blocking
    copy: a copy from pageable memory makes the host wait for everything queued on the stream, which
    would undo the overlap of the next step with this one."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


def pinned(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor | list:
    """``values`` as a pinned host tensor on CUDA (for callees that move it with a non-blocking
    copy, e.g. LingCache's index arguments), as they are elsewhere."""
    return torch.tensor(values, dtype=dtype).pin_memory() if device.type == "cuda" else values
