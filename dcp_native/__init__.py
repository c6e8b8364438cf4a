"""dcp_native: a faster storage layer for PyTorch Distributed Checkpoint.

Swap one argument and keep everything else::

    import torch.distributed.checkpoint as dcp
    import dcp_native

    dcp.save(state_dict, storage_writer=dcp_native.FileSystemWriter(path, thread_count=8))
    dcp.load(state_dict, storage_reader=dcp_native.FileSystemReader(path))

Checkpoints are stock DCP checkpoints (stock reads ours, we read stock's).
``DCP_NATIVE_BACKEND=auto|native|python`` picks the engine; :func:`backend`
says which is active.
"""

from ._api import async_save, load, load_state_dict, save, save_state_dict
from ._backend import backend
from ._errors import (
    BackendUnavailableError,
    CheckpointBusyError,
    CheckpointError,
    CooperativeLoadError,
    CorruptCheckpointError,
    CudaError,
    IncompleteCheckpointError,
    IntegrityError,
    RefusedObjectError,
    TruncatedFileError,
)
from .planners import CachingLoadPlanner, CachingSavePlanner
from .reader import FileSystemReader
from .staging import StagingBusyError
from .writer import FileSystemWriter

__version__ = "0.1.0"

__all__ = [
    "FileSystemWriter",
    "FileSystemReader",
    "CachingSavePlanner",
    "CachingLoadPlanner",
    "save",
    "load",
    "async_save",
    "save_state_dict",
    "load_state_dict",
    "backend",
    "CheckpointError",
    "CooperativeLoadError",
    "CorruptCheckpointError",
    "CudaError",
    "IncompleteCheckpointError",
    "IntegrityError",
    "RefusedObjectError",
    "CheckpointBusyError",
    "TruncatedFileError",
    "BackendUnavailableError",
    "StagingBusyError",
]
