"""The engine seam: executes write and read plans; knows nothing of DCP, dtypes or tensors.

Two implementations share this contract and every test:

* ``native``: ``dcp_native._C`` (C++ threads, pread/pwrite loops), see csrc/.
* ``python``: :mod:`dcp_native._engine_python` (os.pwritev/os.preadv on threads).

Both return the same results and the same stats for the same plan.

What crosses the seam is plain data: paths, byte offsets, lengths and raw
addresses as integers (``tensor.data_ptr()``). The caller keeps the memory
behind every address alive and unchanged until the call returns.

Write plan (one :class:`WriteFile` per data file)
    ``segments`` is a flat ``array('q')`` of 4-tuples
    ``(file_offset, kind, source, length)``:

    * ``kind == SRC_BLOB`` (0): ``source`` is an offset into the file's ``blob``
      (item framing, pickled objects);
    * ``kind == SRC_HOST`` (1): ``source`` is a host address.

    The file is created (or truncated) and every segment is written at its
    offset. Contiguous segments are gathered into one ``pwritev`` of at most
    1024 iovecs and ``chunk_bytes`` bytes; longer segments are split into
    ``chunk_bytes`` pieces. The pieces of all files are spread over
    ``threads`` threads. With ``sync`` each file is fsynced before the call
    returns.

    Block checksums: with ``crc_block > 0`` the file's non-empty segments must
    cover ``[0, size)`` without holes (``ValueError`` before any I/O
    otherwise), and the result holds the CRC32C (Castagnoli, as
    :func:`dcp_native._crc32c.crc32c`) of every block
    ``[k * crc_block, min((k + 1) * crc_block, size))`` of the file's content,
    headers and payloads alike, as ``array('I')``. Each write call (and each
    device piece) checksums the range it writes, on its thread, while the
    bytes are hot; the parts of a block that several ranges share are joined
    with ``crc32c_combine``. Reads check with the same ranges (below).

    Returns :class:`WriteStats`: the bytes written per file and, per file, its
    block CRCs (``None`` where ``crc_block`` is 0).

Read plan (one :class:`ReadFile` per data file)
    ``copies`` is a flat ``array('q')`` of variable-length records
    ``(file_offset, dest_addr, inner_bytes, ndim, counts[ndim],
    file_strides[ndim], dest_strides[ndim])``: an ``ndim``-dimensional box of
    runs. For every index ``i`` in ``ndindex(counts)`` the engine copies
    ``inner_bytes`` bytes from ``file_offset + sum(i * file_strides)`` to
    ``dest_addr + sum(i * dest_strides)``. ``ndim == 0`` is a single run.
    Strides are in bytes and non-negative.

    The file must be at least ``min_size`` bytes long; otherwise, or if it
    ends before a run does, :class:`~dcp_native.TruncatedFileError` names the
    file, the size needed and the size found. Runs are sorted by file offset
    and read with ``preadv``; two neighbouring runs of lengths ``a`` and ``b``
    separated by a gap of ``g`` bytes share one call (the gap read into a
    scratch buffer) when ``0 <= g <= max_gap`` and either ``8 * g <= min(a, b)``
    or ``a + g + b <= 4096``: so coalescing costs at most 1/8 extra bytes except
    for runs so small that a syscall each would cost more than the bytes. A
    call holds at most 1024 iovecs and ``chunk_bytes`` bytes; longer runs are
    split.

    Checks: ``table`` (optional) is the checksum table the save wrote for
    the file (:class:`dcp_native.integrity.Table`: ``block``, the file's
    ``size`` and one CRC32C per block in ``crcs``). Runs must then lie within
    ``size``. Every group of coalesced runs is widened to the blocks it
    touches (the bytes around the runs read into scratch) and runs that share
    a block always share a group, so every block a run touches is read whole;
    each call checksums what it read, on its thread, the parts of a block
    that calls share are joined with ``crc32c_combine``, and each block is
    compared with the table. A mismatch does not raise:
    :attr:`ReadStats.failed_blocks` lists ``(file index in the call, block
    index)``, sorted. The widened bytes count towards ``bytes_read``.

    Returns :class:`ReadStats`.

Device memory (CUDA; see "GPU path" in DESIGN.md)
    Neither engine links the CUDA runtime. Each finds the runtime torch has
    already loaded (``dlopen`` with ``RTLD_NOLOAD``: ``libcudart.so.13``, then
    ``.12``, then any ``libcudart.so*`` mapped into the process), or the library
    ``DCP_NATIVE_CUDART=/path/to/lib.so`` names (the fake runtime of the tests),
    and resolves the functions it needs. :meth:`Engine.cuda_status` says whether
    that worked and why not.

    Writes: ``kind == SRC_DEVICE`` (2): ``source`` is a device address on
    ``WriteFile.device``. Before its first copy the engine records an event on
    ``WriteFile.stream`` (the producer's ``cudaStream_t`` as an integer; 0 is
    the legacy default stream) and its own copy stream waits on it, so work
    queued before the call that writes the memory completes first. Device
    bytes are copied in pieces of at most ``pool.chunk_bytes`` into pinned
    buffers of ``pool`` on a dedicated stream; each piece is written to the
    file once its copy has completed, while later pieces are being copied.
    Block CRCs (``crc_block``) cover device bytes too (computed from the
    pinned copies), identical to those of the same content on the host.

    Reads: ``ReadFile.device >= 0`` makes every ``dest_addr`` of ``copies`` a
    device address on that device. Before the first copy the engine records
    an event on ``ReadFile.stream`` (the consumer's stream) and its copy
    stream waits on it, so kernels queued before the call that write the
    destinations (the fill of a fresh tensor, an optimizer step) complete
    first. Runs are read into pinned buffers and
    copied to the device (``cudaMemcpy2DAsync`` for runs of one box of equal
    length at regular strides, pitches up to 2 GiB), overlapped with the reads of later pieces; the engine's
    stream is synchronized before the call returns, so the memory is ready for
    any stream. With a ``table``, each call's blocks are checked in its
    pinned buffer before the copy to the device.

    ``pool`` (optional, from :meth:`Engine.pinned_pool`) bounds and reuses the
    pinned memory across calls; without one a call with device memory uses a
    temporary pool of ``DEFAULT_STAGING_BYTES``. A pool's buffers are
    page-aligned, allocated on first use (never more than ``capacity``
    bytes), reused by later calls, and freed by ``close()``; a call waits for
    a free buffer rather than allocating beyond the bound.

    ``direct_io=True`` lets the engine use ``O_DIRECT`` for the pieces that
    go through pinned buffers when offsets and lengths are 4 KiB aligned and
    the filesystem accepts it, and silently use buffered I/O otherwise.

    CUDA failures raise :class:`~dcp_native.CudaError` naming the operation
    and the runtime's error string; the other workers stop and the call
    returns (no worker waits forever on a failed copy).

Errors
    I/O failures raise ``OSError`` (the subclass errno selects) with
    ``filename`` set and the operation and offset in the message; malformed
    plans raise ``ValueError``. When one piece fails, the others stop early and
    every file descriptor is closed before the error is raised; nothing waits
    on a failed piece, so a failing call always returns.

Testing hooks (:mod:`dcp_native.config` reads them at every engine call, so tests can set
them with monkeypatch; engines receive them as arguments)
    ``DCP_NATIVE_TEST_SHORT_IO=N`` (N > 0) makes every pread/pwrite/preadv/
    pwritev transfer at most N bytes, so the loops that resume short transfers
    are exercised on any filesystem.

    ``DCP_NATIVE_FAULT=op:errno:nth[,op:errno:nth...]`` makes the ``nth``
    (1-based) system call of ``op`` within one engine call fail with
    ``errno``, as if the kernel had returned it, and the normal error path
    runs (``OSError`` with errno, filename, operation and offset; the other
    workers stop; every descriptor is closed). ``op`` is one of ``open``,
    ``read`` (pread/preadv), ``write`` (pwrite/pwritev), ``fsync``,
    ``close`` or ``rename`` (the commit's renames, see :mod:`dcp_native.commit`); ``errno`` a name (``ENOSPC``, ``EIO``, ``EFBIG``, ``EACCES``,
    ...) or a positive number. Counting is atomic per operation, so exactly
    one call fails whatever the threads do, though which file and offset it
    hits depends on their interleaving when several threads share the work.
    Every attempt counts: each piece of a transfer split by
    DCP_NATIVE_TEST_SHORT_IO, an open that another thread retries after a
    failed one. Closes of files opened for reading count too, but a failed
    one is ignored, as a real failure is (nothing can be lost); closes on
    error paths are not counted. A malformed value raises ``ValueError``
    naming DCP_NATIVE_FAULT.

    ``DCP_NATIVE_CRC32C=auto|portable`` selects the native CRC32C
    implementation (see :mod:`dcp_native._crc32c`).
"""

from __future__ import annotations

import dataclasses
from array import array
from typing import Any, Optional, Protocol, Sequence

SRC_BLOB = 0
SRC_HOST = 1
SRC_DEVICE = 2

#: Pinned staging memory of a pool made for one call (writer/reader default too).
DEFAULT_STAGING_BYTES = 256 << 20
#: Largest piece of device memory one pinned buffer holds.
DEFAULT_DEVICE_CHUNK_BYTES = 32 << 20

#: Default size of one unit of work (one pwritev/preadv call at most).
DEFAULT_CHUNK_BYTES = 8 << 20
#: Default largest gap between two runs that one read may cover.
DEFAULT_MAX_GAP = 64 << 10
#: Runs this small are merged regardless of the 1/8 rule (see module docs).
TINY_SPAN = 4096
#: Most iovecs in one pwritev/preadv call (Linux IOV_MAX).
MAX_IOVECS = 1024



@dataclasses.dataclass
class WriteFile:
    path: str
    blob: bytes | bytearray | memoryview
    segments: array  # array('q'), 4 per segment
    #: > 0: return the CRC32C of every block of this many bytes (see module docs).
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
    #: The file's checksum table (block, size, crcs; see module docs), or None.
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

    @property
    def bytes_held(self) -> int:
        """Pinned bytes allocated now (grows on use up to ``capacity``, 0 after close)."""
        ...

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
    """The coalescing rule shared by both engines (see module docs)."""
    if gap < 0 or gap > max_gap:
        return False
    return 8 * gap <= min(prev_len, next_len) or prev_len + gap + next_len <= TINY_SPAN
