"""Reusable byte buffers, lent by exact size: no fresh pages (or fresh pinned memory) per tensor read."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class BufferPool:
    """Byte buffers handed out by exact size and taken back once their contents are no longer needed.

    A fresh buffer costs a page fault on the first touch of every page (under gVisor that was as much
    time as the reading itself) and a pinned one a cudaHostAlloc; a converter that reads the same few
    shapes thousands of times needs only a handful of buffers. Sizes are exact so that a buffer viewed
    as a tensor owns all of its storage (torch's checkpoint writer clones tensors that do not). Idle
    buffers are kept up to `idle_limit` bytes, the least recently returned dropped first. Thread-safe.
    """

    def __init__(self, idle_limit: int, pin_memory: bool = False) -> None:
        self.idle_limit = idle_limit
        self.pin_memory = pin_memory
        self._idle: OrderedDict[int, tuple[int, torch.Tensor]] = OrderedDict()  # data_ptr -> (nbytes, buffer)
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr -> buffer
        self._idle_bytes = 0
        self._lock = threading.Lock()
        self.allocated = 0  # buffers made (the rest of the takes were reuses)
        self.reused = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of exactly `nbytes` bytes, contents undefined."""
        with self._lock:
            for pointer, (size, buffer) in self._idle.items():
                if size == nbytes:
                    del self._idle[pointer]
                    self._idle_bytes -= size
                    self._lent[pointer] = buffer
                    self.reused += 1
                    return buffer
        buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)
        with self._lock:
            self._lent[buffer.data_ptr()] = buffer
            self.allocated += 1
        return buffer

    def give(self, tensor: torch.Tensor) -> None:
        """Take back the buffer under `tensor` (any view of one from `take`); other tensors are ignored."""
        pointer = tensor.untyped_storage().data_ptr()
        with self._lock:
            buffer = self._lent.pop(pointer, None)
            if buffer is None or buffer.numel() > self.idle_limit:
                return
            self._idle[pointer] = (buffer.numel(), buffer)
            self._idle_bytes += buffer.numel()
            while self._idle_bytes > self.idle_limit:
                _, (size, _) = self._idle.popitem(last=False)
                self._idle_bytes -= size
