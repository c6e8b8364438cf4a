"""How the writer and reader hand device memory to the engine: on which CUDA device a tensor's
memory lives (-1: host memory), which stream the caller's work on it is queued on (the engine
orders its copies after it), and the pinned pools the copies go through. The GPU-path tests
without a GPU replace the first two so CPU tensors stand for device tensors, and the writer's and
reader's device plumbing runs end to end against the fake CUDA runtime.
"""

from __future__ import annotations

import threading
from typing import Any

import torch


def cuda_index(tensor: torch.Tensor) -> int:
    """The CUDA device holding ``tensor``'s memory, or -1 for any other device."""
    if not tensor.is_cuda:
        return -1
    index = tensor.device.index
    return index if index is not None else torch.cuda.current_device()


def current_stream(device: int) -> int:
    """The current stream of ``device`` as an integer ``cudaStream_t`` (work queued on it precedes the copies)."""
    return torch.cuda.current_stream(device).cuda_stream


class PinnedPools:
    """A writer's or reader's pinned pools, one per (engine, CUDA device), made on first use and kept
    until :meth:`close`. Pickles as an empty one: pinned memory belongs to its process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # held by a writer while the engine uses one of the pools
        self._pools: dict[tuple[str, int], Any] = {}

    def get(self, engine: Any, device: int, capacity: int) -> Any:
        key = (engine.name, device)
        if key not in self._pools:
            self._pools[key] = engine.pinned_pool(device, capacity)
        return self._pools[key]

    def __reduce__(self) -> tuple:
        return (PinnedPools, ())

    @property
    def bytes_held(self) -> int:
        # No lock: a write in progress holds it, and this is a report, not a decision.
        return sum(pool.bytes_held for pool in list(self._pools.values()))

    def close(self) -> None:
        with self.lock:
            pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()
