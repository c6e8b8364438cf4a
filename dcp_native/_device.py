"""Which tensors the writer and reader hand to the engine as device memory.

One place for the two questions the storage layer asks torch about CUDA
tensors: on which device a tensor's memory lives (-1: host memory), and which
stream the caller's work on it is queued on (the engine orders its copies
after that work). The GPU-path tests without a GPU replace these two
functions to make CPU tensors stand for device tensors, so the writer's and
reader's device plumbing runs end to end against the fake CUDA runtime.
"""

from __future__ import annotations

import torch


def cuda_index(tensor: torch.Tensor) -> int:
    """The CUDA device holding ``tensor``'s memory, or -1 for any other device."""
    if tensor.device.type != "cuda":
        return -1
    index = tensor.device.index
    return index if index is not None else torch.cuda.current_device()


def current_stream(device: int) -> int:
    """The current stream of ``device`` as an integer ``cudaStream_t`` (work queued on it precedes the copies)."""
    return torch.cuda.current_stream(device).cuda_stream
