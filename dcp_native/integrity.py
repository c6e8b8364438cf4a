"""Checksums of data files: the CRC32C table format and the checks a read plan carries.

Every data file written with checksums gets a companion ``<data file>.crc32c``:
the CRC32C of each ``block``-byte block of the data file as written (item
framing and payloads alike; the last block may be short). Blocks are small
(4 KiB) and payloads of 64 KiB and more start on a 4 KiB boundary, so a read
of part of a tensor verifies exactly the blocks it touches: blocks it covers
whole are checked in the destination memory itself, and the few bytes a read
lacks of the blocks at its edges are read into scratch to complete them.

Table file layout (little-endian)::

    magic    8 bytes   b"DCPNCRC1"
    block    u32       block size in bytes
    reserved u32       0
    size     u64       size of the data file the table describes
    count    u64       number of blocks (= ceil(size / block))
    crc      u32 * count
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import struct
from array import array

import torch

from . import _fileio, sidecar
from ._errors import CorruptCheckpointError, IntegrityError
from .plan import Box

MAGIC = b"DCPNCRC1"
HEADER = struct.Struct("<8sIIQQ")
SUFFIX = ".crc32c"
#: Bytes per checksummed block.
DEFAULT_BLOCK = 4096


def fast_crc32c() -> bool:
    """Whether CRC32C runs at hardware speed here (the native extension's)."""
    try:
        from . import _crc32c
    except ImportError:
        return False
    return _crc32c.implementation() != "python"


def encode_table(block: int, size: int, crcs: array) -> bytes:
    """The bytes of a table file for a data file of ``size`` bytes."""
    count = -(-size // block) if size else 0
    if len(crcs) != count:
        raise ValueError(f"{len(crcs)} checksums for {count} blocks")
    body = crcs if crcs.itemsize == 4 else array("I", crcs)
    if body.itemsize != 4:  # pragma: no cover - every supported platform has a 4-byte "I"
        raise ValueError("array('I') is not 4 bytes wide here")
    return HEADER.pack(MAGIC, block, 0, size, count) + body.tobytes()


@dataclasses.dataclass
class Table:
    """A data file's block checksums (possibly only a window of them)."""

    block: int
    size: int
    #: Index of the first block in ``crcs``.
    first: int
    crcs: array

    def crc(self, k: int) -> int:
        return self.crcs[k - self.first]

    def block_end(self, k: int) -> int:
        return min((k + 1) * self.block, self.size)


def load_table(path: str, info, data_path: str, data_size: int) -> Table:
    """The checksum table at ``path``, checked against what the sidecar recorded (``info``).

    ``info`` is the sidecar's :class:`~dcp_native.sidecar.TableInfo` (size and
    SHA-256 of the table file); ``data_size`` is the size of the data file the
    table describes. Raises :class:`~dcp_native.IntegrityError` when the table
    is not the one the save wrote or does not describe the data file as it is
    now: its checksums then cannot vouch for anything.
    """
    def refuse(why: str) -> IntegrityError:
        return IntegrityError(
            f"{path}: {why}; the blocks of {data_path} cannot be verified", filename=path
        )

    try:
        raw = _fileio.read_regular(path, info.size, what="checksum table")
    except FileNotFoundError:
        raise refuse("the checksum table is missing") from None
    except CorruptCheckpointError as exc:  # not a regular file, or larger than recorded
        raise IntegrityError(
            f"{exc}; the blocks of {data_path} cannot be verified", filename=path
        ) from None
    if len(raw) != info.size or sidecar.digest(raw) != info.sha256:
        raise refuse("the checksum table is not the one the save wrote (its size or SHA-256 differs)")
    try:
        block, size, count = parse_header(raw, path)
    except ValueError as exc:
        raise refuse(str(exc)) from None
    if len(raw) != HEADER.size + 4 * count:
        raise refuse(f"the table has {len(raw)} bytes, its header implies {HEADER.size + 4 * count}")
    if size != data_size:
        raise IntegrityError(
            f"{data_path} has {data_size} bytes, but its checksum table describes {size}: "
            "the file changed after it was written",
            filename=data_path,
        )
    crcs = array("I")
    crcs.frombytes(raw[HEADER.size :])
    return Table(block, size, 0, crcs)


def parse_header(data: bytes, path: str) -> tuple[int, int, int]:
    """(block, size, count) from a table file's header; ValueError if it is not one."""
    if len(data) < HEADER.size:
        raise ValueError(f"{path} is too short to be a checksum table")
    magic, block, _, size, count = HEADER.unpack_from(data)
    if magic != MAGIC or block <= 0 or count != (-(-size // block) if size else 0):
        raise ValueError(f"{path} is not a dcp_native checksum table")
    return block, size, count


class CheckPlan:
    """Builds the checks (and the gap reads they need) for one data file's reads.

    Runs are collected with :meth:`add_run`; :meth:`finish` then checks every
    block they touch. A block inside one run is checked in that run's
    destination; a block several runs share (neighbouring small items) or a run
    only partly covers is checked piece by piece: each run's bytes where they
    landed, the bytes between them (item framing, usually read anyway by
    coalescing) through small scratch reads.
    """

    def __init__(self, table: Table) -> None:
        self.table = table
        #: Records for the engine: (expected_crc, npieces, addr, len, ...).
        self.records = array("q")
        #: For each record: the file offset of its block (to name it in errors).
        self.block_offsets: list[int] = []
        #: Extra reads of the bytes no run reads in the blocks the runs touch.
        self.gap_boxes: list[Box] = []
        self._keep: list[object] = []  # scratch memory, alive until the read is done
        self._runs: list[tuple[int, int, int, str | None]] = []
        #: (file offset, key) of each run, sorted, for naming failures.
        self._owners: list[tuple[int, int, str | None]] = []

    def add_run(self, file_offset: int, dest_addr: int, length: int, key: str | None) -> None:
        if length > 0:
            self._runs.append((file_offset, length, dest_addr, key))

    def finish(self) -> None:
        t = self.table
        runs = sorted(self._runs)
        # Keep the first of overlapping runs (the same bytes read to two places):
        # its destination is what the checks look at.
        kept: list[tuple[int, int, int, str | None]] = []
        end = -1
        for run in runs:
            if run[0] >= end:
                kept.append(run)
                end = run[0] + run[1]
        self._owners = [(a, a + n, key) for a, n, _, key in kept]
        starts = [a for a, _, _, _ in kept]
        edge_blocks: list[int] = []
        for a, n, d, _ in kept:
            b = a + n
            k0, k1 = a // t.block, (b - 1) // t.block
            first_full = k0 if a == k0 * t.block else k0 + 1
            last_full = k1 if b == t.block_end(k1) else k1 - 1
            if first_full <= last_full:
                self._full_blocks(first_full, last_full, a, d)
            if k0 < first_full:
                edge_blocks.append(k0)
            if last_full < k1 and (k1 != k0 or k0 >= first_full):
                edge_blocks.append(k1)
        for k in sorted(set(edge_blocks)):
            self._edge(k, kept, starts)

    def _full_blocks(self, first: int, last: int, a: int, dest_addr: int) -> None:
        t = self.table
        if last - first < 16:
            for k in range(first, last + 1):
                n = t.block_end(k) - k * t.block
                self.records.extend((t.crc(k), 1, dest_addr + (k * t.block - a), n))
                self.block_offsets.append(k * t.block)
            return
        n = last - first + 1
        rows = torch.empty((n, 4), dtype=torch.int64)
        crc = torch.frombuffer(t.crcs, dtype=torch.int32)[first - t.first : last - t.first + 1]
        rows[:, 0] = crc.to(torch.int64) & 0xFFFFFFFF
        rows[:, 1] = 1
        rows[:, 2] = torch.arange(first, last + 1, dtype=torch.int64) * t.block - a + dest_addr
        rows[:, 3] = t.block
        if t.block_end(last) != (last + 1) * t.block:  # a short last block of the file
            rows[-1, 3] = t.block_end(last) - last * t.block
        self.records.frombytes(ctypes.string_at(rows.data_ptr(), rows.nbytes))
        self.block_offsets.extend(range(first * t.block, (last + 1) * t.block, t.block))

    def _edge(self, k: int, runs: list, starts: list[int]) -> None:
        t = self.table
        pos, be = k * t.block, t.block_end(k)
        i = max(0, bisect.bisect_right(starts, pos) - 1)
        pieces: list[tuple[int, int]] = []
        while pos < be:
            while i < len(runs) and runs[i][0] + runs[i][1] <= pos:
                i += 1
            if i < len(runs) and runs[i][0] <= pos:
                a, n, d, _ = runs[i]
                stop = min(a + n, be)
                pieces.append((d + (pos - a), stop - pos))
            else:
                stop = min(runs[i][0], be) if i < len(runs) else be
                pieces.append(self._read_scratch(pos, stop - pos))
            pos = stop
        self.records.extend((t.crc(k), len(pieces)))
        for addr, n in pieces:
            self.records.extend((addr, n))
        self.block_offsets.append(k * t.block)

    def _read_scratch(self, file_offset: int, n: int) -> tuple[int, int]:
        buf = (ctypes.c_char * n)()
        self._keep.append(buf)
        addr = ctypes.addressof(buf)
        self.gap_boxes.append(Box(file_offset, addr, n))
        return addr, n

    def owner(self, record: int) -> str | None:
        """The key of a run inside the block of check ``record`` (None: framing only)."""
        lo = self.block_offsets[record]
        hi = min(lo + self.table.block, self.table.size)
        for a, b, key in self._owners:
            if a < hi and b > lo and key is not None:
                return key
        return None
