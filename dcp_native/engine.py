"""The engine seam: executes write and read plans; knows nothing of DCP, dtypes or tensors.

Two implementations share this contract and every test, with the same results
and the same stats for the same plan:

* ``native``: ``dcp_native._C`` (C++ threads, pwritev/preadv loops, the GPU path), see csrc/;
* ``python``: :mod:`dcp_native._engine_python` (os.pwritev/os.preadv on threads, host memory).

The contract (write and read plans, block checksums and checked reads, device
memory, errors, test hooks) is in "The engine contract" of docs/ARCHITECTURE.md.
What crosses the seam is plain data: paths, byte offsets, lengths and raw
addresses as integers; the caller keeps the memory behind every address alive
and unchanged until the call returns.
"""

from __future__ import annotations

import dataclasses
from array import array
from typing import Any, Optional, Protocol, Sequence

SRC_BLOB = 0
SRC_HOST = 1
SRC_DEVICE = 2

#: Pinned staging memory of a pool (the writer's and reader's default).
DEFAULT_STAGING_BYTES = 256 << 20
#: Largest piece of device memory one pinned buffer holds.
DEFAULT_DEVICE_CHUNK_BYTES = 32 << 20

#: Default size of one unit of work (one pwritev/preadv call at most).
DEFAULT_CHUNK_BYTES = 8 << 20
#: Default largest gap between two runs that one read may cover.
DEFAULT_MAX_GAP = 64 << 10
#: Runs this small are merged regardless of the 1/8 rule (see the contract).
TINY_SPAN = 4096
#: Most iovecs in one pwritev/preadv call (Linux IOV_MAX).
MAX_IOVECS = 1024


@dataclasses.dataclass
class WriteFile:
    path: str
    blob: bytes | bytearray | memoryview
    segments: array  # array('q'), 4 per segment
    #: > 0: return the CRC32C of every block of this many bytes (see the contract).
    crc_block: int = 0
    #: CUDA device of the SRC_DEVICE segments (-1: none).
    device: int = -1
    #: The producer's cudaStream_t as an integer (0: the legacy default stream).
    stream: int = 0


@dataclasses.dataclass
class ReadFile:
    path: str
    min_size: int
    copies: array  # array('q'), variable-length records
    #: The file's checksum table (block, size, crcs; see the contract), or None.
    table: Optional[Any] = None
    #: >= 0: every destination address is device memory on this CUDA device.
    device: int = -1
    #: The consumer's cudaStream_t as an integer (0: the legacy default stream).
    stream: int = 0


@dataclasses.dataclass
class WriteStats:
    #: Bytes written per file (the sum of its segments' lengths).
    bytes_written: list[int]
    #: Per file: array('I') of its block CRC32Cs, or None where crc_block is 0.
    block_crcs: list[Optional[array]]


@dataclasses.dataclass
class ReadStats:
    #: Bytes read from files, coalescing gaps included.
    bytes_read: int = 0
    #: Number of preadv calls issued.
    calls: int = 0
    #: (file index, block index) of every block that failed its check, sorted.
    failed_blocks: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    #: Bytes sent to and received from other ranks (cooperative loads).
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclasses.dataclass(frozen=True)
class CudaStatus:
    #: The runtime was found and every function the engine needs resolved.
    usable: bool
    #: Why not (empty when usable).
    reason: str = ""
    #: The library in use (path or soname), when found.
    library: str = ""


class PinnedPool(Protocol):
    """Page-aligned pinned host buffers for device staging, reused across calls."""

    device: int
    #: Most bytes the pool ever holds.
    capacity: int
    #: Size of one buffer (the largest device piece one copy moves).
    chunk_bytes: int
    #: Pinned bytes allocated now (grows on use up to ``capacity``, 0 after close).
    bytes_held: int

    def close(self) -> None:
        """Free every buffer (idempotent); the pool must not be in use by a call."""
        ...


class Engine(Protocol):
    name: str

    def write(
        self,
        files: Sequence[WriteFile],
        *,
        threads: int,
        sync: bool,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        pool: Optional[PinnedPool] = None,
        direct_io: bool = True,
    ) -> WriteStats: ...

    def read(
        self,
        files: Sequence[ReadFile],
        *,
        threads: int,
        max_gap: int = DEFAULT_MAX_GAP,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        pool: Optional[PinnedPool] = None,
        direct_io: bool = True,
    ) -> ReadStats: ...

    def cuda_status(self) -> CudaStatus: ...

    def pinned_pool(
        self,
        device: int,
        capacity: int = DEFAULT_STAGING_BYTES,
        chunk_bytes: int = DEFAULT_DEVICE_CHUNK_BYTES,
    ) -> PinnedPool:
        """A pool of at most ``capacity`` bytes in buffers of ``min(chunk_bytes, capacity // 2)``
        (page-rounded; at least two buffers); ``ValueError`` for a capacity under two pages,
        ``CudaError`` when CUDA is not usable."""
        ...


def should_merge(prev_len: int, gap: int, next_len: int, max_gap: int) -> bool:
    """The coalescing rule shared by both engines (see the contract)."""
    if gap < 0 or gap > max_gap:
        return False
    return 8 * gap <= min(prev_len, next_len) or prev_len + gap + next_len <= TINY_SPAN
