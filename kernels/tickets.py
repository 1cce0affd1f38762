"""The atomic tickets with which a kernel's last program to finish is found (batch_stats.py's
_take_last_ticket), kept so that CUDA graphs can capture and replay the kernels.

A kernel whose programs each write a partial, and whose last program merges them, counts finished
programs with an int32 ticket per merge; the last program sets its ticket back to 0, so a buffer zeroed
once serves every later launch with no fill. Launches on one stream never overlap, so one buffer per
(device, stream) is enough; two streams get two buffers, so concurrent kernels never share a ticket.

CUDA graphs: a graph captures a kernel's pointer to its ticket buffer, so
  - buffers are allocated and zeroed outside any capture: each device keeps SPARES zeroed buffers made
    with its first buffer, and a stream first seen while capturing (torch.cuda.graph's capture stream)
    takes a spare; nothing is allocated or filled inside the capture;
  - a buffer is never freed or replaced while a graph may hold it: a launch that needs more tickets than
    its stream's buffer holds gets a new, larger buffer, and the old one is kept alive (`_RETIRED`);
    inside a capture that is an error with the fix, never a silent reallocation.
SLOTS tickets per buffer (256 KiB of int32) cover every grid the kernels launch for realistic shapes
(a 4096 x 4096 1x1 conv's dW needs 4096 at 64 x 64 tiles).
"""
from __future__ import annotations

import torch

from .tracing import _ACTIVE as _TRACED

__all__ = ["tickets", "prepare", "SLOTS", "SPARES"]

SLOTS = 1 << 16
SPARES = 4
_BUFFERS: dict = {}   # (device, stream id) -> int32 tickets, all 0 between launches
_SPARE: dict = {}     # device -> [zeroed buffers no stream uses yet]
_RETIRED: list = []   # buffers replaced by larger ones: kept alive for the graphs that hold them


def _stream_of(device: torch.device):
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _zeros(device, size):
    """A zeroed buffer, made outside any dispatch mode (a fake or tracing mode would hand out a tensor
    that does not exist on the device)."""
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes():
        return torch.zeros(size, dtype=torch.int32, device=device)


def tickets(device, count: int) -> torch.Tensor:
    """At least `count` int32 tickets at 0 for kernels launched on `device`'s current stream. While an
    operator is traced into its kernels (tracing.py), `count` fresh ones: the graph allocates and zeroes
    them itself (a buffer made outside the graph would be a constant of it)."""
    if _TRACED[0]:
        return torch.zeros(count, dtype=torch.int32, device=device)
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, _stream_of(device))
    buf = _BUFFERS.get(key)
    if buf is not None and buf.numel() >= count:
        return buf
    if _capturing(device):
        return _for_capture(device, key, buf, count)
    size = max(SLOTS, 1 << (int(count) - 1).bit_length())
    if buf is not None:
        _RETIRED.append(buf)
    _BUFFERS[key] = _zeros(device, size)
    spares = _SPARE.setdefault(device, [])
    while len(spares) < SPARES and device.type == "cuda":
        spares.append(_zeros(device, size))
    return _BUFFERS[key]


def _for_capture(device, key, buf, count):
    spares = [s for s in _SPARE.get(device, []) if s.numel() >= count]
    if buf is None and spares:
        _SPARE[device].remove(spares[0])
        _BUFFERS[key] = spares[0]
        return spares[0]
    need = "more tickets than its buffer holds" if buf is not None else "a ticket buffer and none is spare"
    raise RuntimeError(
        f"fastpreact: a kernel captured in a CUDA graph on {device} needs {need} ({count}); run the captured "
        "code once eagerly on the same device first, or call fastpreact.kernels.tickets.prepare(device, "
        "stream, count) before the capture")


def prepare(device, stream=None, count: int = SLOTS) -> torch.Tensor:
    """Allocate and zero the tickets of `stream` (default: the current one) on `device` now, outside any
    capture, for code that will be captured on that stream."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if stream is None or device.type != "cuda":
        return tickets(device, count)
    with torch.cuda.stream(stream):
        return tickets(device, count)
