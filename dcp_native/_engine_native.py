"""The native engine: the contract of :mod:`dcp_native.engine` executed by dcp_native._C.

A thin adapter: plans cross into C++ as they are (flat int64 buffers, blobs,
paths encoded with os.fsencode), and the C++ side validates them, releases
the GIL and does all the I/O and checksums. DCP_NATIVE_FAULT is parsed here,
by the parser both engines share. Importing this module raises ImportError
when the extension is not built, which dcp_native._backend turns into a
fallback.
"""

from __future__ import annotations

import os
from typing import Sequence

# Importing names (not `from . import _C`) goes through sys.modules even when
# the package already has a _C attribute, so a blocked or missing extension
# always raises ImportError here.
from ._C import read_files, write_files
from .engine import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_GAP,
    ReadFile,
    ReadStats,
    WriteFile,
    WriteStats,
    faults_from_env,
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
    ) -> WriteStats:
        written, crcs = write_files(
            [os.fsencode(f.path) for f in files],
            [f.blob for f in files],
            [f.segments for f in files],
            [f.crc_block for f in files],
            threads,
            bool(sync),
            chunk_bytes,
            faults_from_env(),
        )
        return WriteStats(bytes_written=written, block_crcs=crcs)

    def read(
        self,
        files: Sequence[ReadFile],
        *,
        threads: int,
        max_gap: int = DEFAULT_MAX_GAP,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> ReadStats:
        bytes_read, calls, failed = read_files(
            [os.fsencode(f.path) for f in files],
            [f.min_size for f in files],
            [f.copies for f in files],
            [f.checks for f in files],
            threads,
            max_gap,
            chunk_bytes,
            faults_from_env(),
        )
        return ReadStats(bytes_read=bytes_read, calls=calls, failed_checks=failed)
