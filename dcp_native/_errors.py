"""Exceptions raised by dcp_native for checkpoints that are missing, truncated or malformed.

Every one is an ``OSError`` (a storage layer's failures are I/O failures to its
callers) with ``filename`` set when a file is involved, and carries the
checkpoint ``key`` and file ``offset`` where they are known. Plain I/O errors
from the operating system surface as the usual ``OSError`` subclasses
(``FileNotFoundError``, ``PermissionError``, ...), also with ``filename`` set.
"""

from __future__ import annotations

import errno as _errno


class CheckpointError(OSError):
    """A checkpoint on disk is not what its metadata says it is."""

    default_errno = _errno.EIO

    def __init__(
        self,
        message: str,
        *,
        filename: str | None = None,
        key: str | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(self.default_errno, message, filename)
        self.message = message
        self.key = key
        self.offset = offset

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        # Errors cross process boundaries (DCP gathers them to the coordinator).
        return (
            _rebuild_error,
            (type(self), self.message, self.filename, self.key, self.offset, self.__dict__),
        )


def _rebuild_error(cls, message, filename, key, offset, state):
    err = cls.__new__(cls)
    CheckpointError.__init__(err, message, filename=filename, key=key, offset=offset)
    err.__dict__.update(state)
    return err


class CooperativeLoadError(CheckpointError):
    """A cooperative load stopped because another rank failed (``rank``; the message holds its
    error). The failed rank raises its own error."""

    def __init__(self, message: str, *, rank: int, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.rank = rank


class IncompleteCheckpointError(CheckpointError, FileNotFoundError):
    """The directory holds no complete checkpoint (no committed metadata)."""

    default_errno = _errno.ENOENT


class CorruptCheckpointError(CheckpointError):
    """An item's bytes cannot be what the metadata declares (bad framing, bad offsets)."""


class IntegrityError(CorruptCheckpointError):
    """Bytes read do not match the checksum recorded when they were written."""


class TruncatedFileError(CorruptCheckpointError):
    """A data file is shorter than the checkpoint needs."""

    def __init__(
        self,
        filename: str,
        expected: int,
        actual: int,
        *,
        key: str | None = None,
        offset: int | None = None,
    ) -> None:
        self.expected = expected
        self.actual = actual
        where = f" (item {key!r} at offset {offset})" if key is not None else ""
        super().__init__(
            f"{filename} is truncated: the checkpoint needs at least {expected} bytes, "
            f"the file has {actual}{where}",
            filename=filename,
            key=key,
            offset=offset,
        )


class RefusedObjectError(CheckpointError):
    """A saved object would import something ``torch.load(weights_only=True)`` refuses.

    Loading it would run code the checkpoint brings along. ``key`` names the
    item, ``filename``/``offset`` where it lies, ``refused`` the global (e.g.
    ``os.system``). Allow it with ``torch.serialization.add_safe_globals`` (for
    a class you trust) or ``FileSystemReader(path, allow_pickle=True)`` (for a
    checkpoint you trust).
    """

    default_errno = _errno.EPERM

    def __init__(self, message: str, *, refused: str | None = None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.refused = refused


class CheckpointBusyError(CheckpointError):
    """Another save to the same checkpoint directory is in progress (and did not finish in time)."""

    default_errno = _errno.EBUSY


class BackendUnavailableError(ImportError):
    """DCP_NATIVE_BACKEND=native was asked for but the extension cannot be loaded."""


class CudaError(RuntimeError):
    """A CUDA runtime call made by dcp_native failed, or the runtime is not usable.

    ``operation`` is what dcp_native was doing (e.g. ``cudaMemcpyAsync D2H of
    __0_0.distcp at offset 4096``), ``code`` the runtime's error code (None when
    the runtime could not be used at all).
    """

    def __init__(self, message: str, *, operation: str = "", code: int | None = None) -> None:
        super().__init__(message)
        self.operation = operation
        self.code = code
