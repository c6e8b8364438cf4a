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

import ctypes
import dataclasses
import struct
from array import array

import torch

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


def parse_header(data: bytes, path: str) -> tuple[int, int, int]:
    """(block, size, count) from a table file's header; ValueError if it is not one."""
    if len(data) < HEADER.size:
        raise ValueError(f"{path} is too short to be a checksum table")
    magic, block, _, size, count = HEADER.unpack_from(data)
    if magic != MAGIC or block <= 0 or count != (-(-size // block) if size else 0):
        raise ValueError(f"{path} is not a dcp_native checksum table")
    return block, size, count


class CheckPlan:
    """Collects the checks (and the edge reads they need) for one data file's reads."""

    def __init__(self, table: Table) -> None:
        self.table = table
        #: Records for the engine: (expected_crc, npieces, addr, len, ...).
        self.records = array("q")
        #: For each record: the file offset of its block (to name it in errors).
        self.block_offsets: list[int] = []
        #: Extra reads that fetch the parts of edge blocks a read does not cover.
        self.edge_boxes: list[Box] = []
        self._keep: list[object] = []  # scratch memory, alive until the read is done
        #: (first record index, record count, key) for naming failures.
        self.owners: list[tuple[int, int, str]] = []

    def _scratch(self, n: int) -> int:
        buf = (ctypes.c_char * n)()
        self._keep.append(buf)
        return ctypes.addressof(buf)

    def add_run(self, file_offset: int, dest_addr: int, length: int, key: str) -> None:
        """Check every block that ``[file_offset, +length)`` (read to ``dest_addr``) touches."""
        if length <= 0:
            return
        t = self.table
        start_record = len(self.block_offsets)
        a, b = file_offset, file_offset + length
        k0, k1 = a // t.block, (b - 1) // t.block
        # Blocks covered whole: one piece each, straight from the destination.
        first_full = k0 if a == k0 * t.block else k0 + 1
        last_full = k1 if b == t.block_end(k1) else k1 - 1
        if k0 < first_full:
            self._edge(k0, a, b, dest_addr)
        if first_full <= last_full:
            if last_full - first_full < 16:
                for k in range(first_full, last_full + 1):
                    n = t.block_end(k) - k * t.block
                    self.records.extend((t.crc(k), 1, dest_addr + (k * t.block - a), n))
                    self.block_offsets.append(k * t.block)
            else:
                self._full_blocks(first_full, last_full, a, dest_addr)
        if last_full < k1 and k1 != k0:
            self._edge(k1, a, b, dest_addr)
        self.owners.append((start_record, len(self.block_offsets) - start_record, key))

    def _full_blocks(self, first: int, last: int, a: int, dest_addr: int) -> None:
        t = self.table
        n = last - first + 1
        rows = torch.empty((n, 4), dtype=torch.int64)
        crc = torch.frombuffer(t.crcs, dtype=torch.int32)[first - t.first : last - t.first + 1]
        rows[:, 0] = crc.to(torch.int64) & 0xFFFFFFFF
        rows[:, 1] = 1
        offsets = torch.arange(first, last + 1, dtype=torch.int64) * t.block
        rows[:, 2] = offsets - a + dest_addr
        rows[:, 3] = t.block
        if t.block_end(last) != (last + 1) * t.block:  # a short last block of the file
            rows[-1, 3] = t.block_end(last) - last * t.block
        self.records.frombytes(ctypes.string_at(rows.data_ptr(), rows.nbytes))
        self.block_offsets.extend(range(first * t.block, (last + 1) * t.block, t.block))

    def _edge(self, k: int, a: int, b: int, dest_addr: int) -> None:
        t = self.table
        bs, be = k * t.block, t.block_end(k)
        pieces: list[tuple[int, int]] = []
        if a > bs:
            pieces.append(self._read_scratch(bs, a - bs))
        lo, hi = max(a, bs), min(b, be)
        pieces.append((dest_addr + (lo - a), hi - lo))
        if b < be:
            pieces.append(self._read_scratch(b, be - b))
        self.records.extend((t.crc(k), len(pieces)))
        for addr, n in pieces:
            self.records.extend((addr, n))
        self.block_offsets.append(bs)

    def _read_scratch(self, file_offset: int, n: int) -> tuple[int, int]:
        addr = self._scratch(n)
        self.edge_boxes.append(Box(file_offset, addr, n))
        return addr, n

    def blocks_needed(self, file_offset: int, length: int) -> tuple[int, int]:
        t = self.table
        return file_offset // t.block, (file_offset + length - 1) // t.block

    def owner(self, record: int) -> str | None:
        for first, count, key in self.owners:
            if first <= record < first + count:
                return key
        return None
