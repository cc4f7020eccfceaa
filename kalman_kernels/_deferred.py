"""Host-side reactions (warnings, counters) to device flags, without stalling the device.

A step is sync-free (docs/design.md, 4.2): whether it was skipped is a 0-d bool tensor on the
parameters' device. Reading it on the host would stall a GPU stream, so a warning that
depends on it is deferred: on CPU tensors the value is read at once (it is already on the
host); on CUDA tensors it is copied into pinned host memory without blocking and read once
the copy has completed (checked at the next step, or when the user reads the value); on
other devices (``meta``) and while ``torch.compile`` traces, nothing is read at all.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch


def compiling() -> bool:
    """True while torch.compile traces (no host reads, no Python side effects then)."""
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - very old torch
        return False


def readable_now(t: torch.Tensor) -> bool:
    """Whether reading ``t`` on the host costs no device synchronisation (eager CPU)."""
    return t.device.type == "cpu" and not compiling()


class PendingFlag:
    """A device flag whose host value is wanted later, without waiting for it now."""

    __slots__ = ("_host", "_event", "_callback")

    def __init__(self, flag: torch.Tensor, callback: Callable[[bool], None]):
        self._callback = callback
        self._event = None
        if flag.device.type == "cpu":
            self._host = flag
        elif flag.device.type == "cuda":
            host = torch.empty((), dtype=flag.dtype, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._host = host
        else:                       # meta and friends: there is no value to read
            self._host = None

    def poll(self, wait: bool = False) -> bool:
        """Run the callback if the value has arrived (or, with ``wait``, once it does).
        Returns True when the flag is settled (handled or unreadable)."""
        if self._host is None:
            return True
        if self._event is not None and not self._event.query():
            if not wait:
                return False
            self._event.synchronize()
        self._callback(bool(self._host))
        return True


class PendingFlags:
    """A queue of :class:`PendingFlag`, polled in order."""

    def __init__(self):
        self._items: List[PendingFlag] = []

    def add(self, flag: Optional[torch.Tensor], callback: Callable[[bool], None]) -> None:
        if flag is None or compiling():
            return
        item = PendingFlag(flag.detach(), callback)
        if not item.poll():
            self._items.append(item)

    def poll(self, wait: bool = False) -> None:
        while self._items and self._items[0].poll(wait):
            self._items.pop(0)
