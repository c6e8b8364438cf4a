"""The native engine: the contract of :mod:`dcp_native.engine` executed by dcp_native._C.

A thin adapter: plans cross into C++ as they are (the WriteFile/ReadFile dataclasses, their
flat int64 buffers and blobs); the C++ side validates them, releases the GIL and does all the
I/O and checksums, with the :mod:`dcp_native.config` settings passed to every call. Importing
this module raises ImportError when the extension is not built (dcp_native._backend falls
back). Device memory goes through ``_C.PinnedPool`` objects (buffers allocated lazily, freed
on ``close()``); the CUDA runtime is found at every call, so ``DCP_NATIVE_CUDART`` may change.
"""

from __future__ import annotations

from typing import Optional, Sequence

# Importing names (not `from . import _C`) goes through sys.modules even when
# the package already has a _C attribute, so a blocked or missing extension
# always raises ImportError here.
from ._C import PinnedPool as _PinnedPool
from ._C import cuda_status as _cuda_status
from ._C import read_files, write_files
from . import config
from .engine import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_DEVICE_CHUNK_BYTES,
    DEFAULT_MAX_GAP,
    DEFAULT_STAGING_BYTES,
    CudaStatus,
    PinnedPool,
    ReadFile,
    ReadStats,
    WriteFile,
    WriteStats,
)


class NativeEngine:
    """Executes write and read plans with C++ threads and pwritev/preadv loops."""

    name = "native"

    def write(
        self,
        files: Sequence[WriteFile],
        *,
        threads: int,
        sync: bool,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        pool: Optional[PinnedPool] = None,
        direct_io: bool = True,
    ) -> WriteStats:
        written, crcs = write_files(
            files, threads, bool(sync), chunk_bytes, config.current().native(), pool, bool(direct_io)
        )
        return WriteStats(bytes_written=written, block_crcs=crcs)

    def read(
        self,
        files: Sequence[ReadFile],
        *,
        threads: int,
        max_gap: int = DEFAULT_MAX_GAP,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        pool: Optional[PinnedPool] = None,
        direct_io: bool = True,
    ) -> ReadStats:
        bytes_read, calls, failed = read_files(
            files, threads, max_gap, chunk_bytes, config.current().native(), pool, bool(direct_io)
        )
        return ReadStats(bytes_read=bytes_read, calls=calls, failed_blocks=failed)

    def cuda_status(self) -> CudaStatus:
        usable, reason, library = _cuda_status(config.current().cudart)
        return CudaStatus(usable=usable, reason=reason, library=library)

    def pinned_pool(
        self,
        device: int,
        capacity: int = DEFAULT_STAGING_BYTES,
        chunk_bytes: int = DEFAULT_DEVICE_CHUNK_BYTES,
    ) -> PinnedPool:
        """A ``_C.PinnedPool``: ``ValueError`` for a capacity under two pages, ``CudaError``
        when CUDA is not usable (see :meth:`cuda_status`)."""
        return _PinnedPool(device, capacity, chunk_bytes, config.current().cudart)
