"""Checksums of data files: the CRC32C table ``<data file>.crc32c`` of every 4 KiB block, its
format ("Checksum tables" in docs/ARCHITECTURE.md) and its loading, checked against the sidecar.
"""

from __future__ import annotations

import dataclasses
import struct
from array import array

from . import _fileio, sidecar
from ._errors import CorruptCheckpointError, IntegrityError

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
    # Every supported platform has a 4-byte "I" (load_table reads the table back as one).
    body = crcs if crcs.itemsize == 4 else array("I", crcs)
    return HEADER.pack(MAGIC, block, 0, size, count) + body.tobytes()


@dataclasses.dataclass
class Table:
    """A data file's block checksums: ``crcs[k]`` is the CRC32C of block ``k`` of ``size`` bytes."""

    block: int
    size: int
    crcs: array


def load_table(path: str, info, data_path: str, data_size: int) -> Table:
    """The checksum table at ``path``, checked against the sidecar's ``info`` (its size and SHA-256)
    and ``data_size``: :class:`~dcp_native.IntegrityError` when it cannot vouch for the data file.
    """
    def refuse(why: str) -> IntegrityError:
        return IntegrityError(f"{why}; the blocks of {data_path} cannot be verified", filename=path)

    try:
        raw = _fileio.read_regular(path, info.size, what="checksum table")
    except FileNotFoundError:
        raise refuse(f"{path}: the checksum table is missing") from None
    except CorruptCheckpointError as exc:  # not a regular file, or larger than recorded
        raise refuse(str(exc)) from None
    if len(raw) != info.size or sidecar.digest(raw) != info.sha256:
        raise refuse(f"{path}: the checksum table is not the one the save wrote (its size or SHA-256 differs)")
    # The save wrote this table (its SHA-256 is the sidecar's): a bad header is the writer's bug.
    magic, block, _, size, count = HEADER.unpack_from(raw) if len(raw) >= HEADER.size else (b"", 0, 0, 0, 0)
    if magic != MAGIC or block <= 0 or count != -(-size // block) or len(raw) != HEADER.size + 4 * count:
        raise refuse(f"{path}: the file is not a dcp_native checksum table (bad header or length)")
    if size != data_size:
        raise IntegrityError(
            f"{data_path} has {data_size} bytes, but its checksum table describes {size}: "
            "the file changed after it was written",
            filename=data_path,
        )
    crcs = array("I")
    crcs.frombytes(raw[HEADER.size :])
    return Table(block, size, crcs)
