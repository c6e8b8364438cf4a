"""Helpers the tests share: the files of a checkpoint directory, DCP's wrapped errors, and the
host memory and plan records of the engine tests.

dcp_native tags every file of a save with the save's tag
(``__0_0.1a2b3c4d.distcp``, see dcp_native.commit); stock's files have none.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import random
import re
from array import array
from typing import Callable

import pytest

from dcp_native._crc32c import _crc32c_python as ref_crc32c
from dcp_native.engine import SRC_BLOB, SRC_HOST

_DATA = re.compile(r"^__(\d+)_(\d+)(?:\.[0-9a-f]{8})?\.distcp$")


def failure(exc_info) -> BaseException:
    """The error a rank raised: DCP wraps per-rank failures in CheckpointException.

    Takes a pytest ``ExceptionInfo`` or an exception.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    exc = getattr(exc_info, "value", exc_info)
    if isinstance(exc, CheckpointException):
        return next(iter(exc.failures.values()))[0]
    return exc


def data_files(path) -> list[str]:
    """Names of the data files in ``path``, sorted by (rank, number)."""
    found = []
    for name in os.listdir(path):
        m = _DATA.match(name)
        if m:
            found.append(((int(m.group(1)), int(m.group(2))), name))
    return [name for _, name in sorted(found)]


def data_file(path, rank: int = 0, n: int = 0) -> str:
    """The full path of data file ``n`` of ``rank`` (the only one with that number)."""
    names = [
        name for name in data_files(path) if _DATA.match(name).groups()[:2] == (str(rank), str(n))
    ]
    assert len(names) == 1, (path, rank, n, sorted(os.listdir(path)))
    return os.path.join(str(path), names[0])


def sidecar_file(path) -> str:
    """The full path of the sidecar of the committed checkpoint in ``path``."""
    import io

    from dcp_native import sidecar
    from dcp_native._safe_pickle import load_metadata

    with open(os.path.join(path, ".metadata"), "rb") as f:
        md = load_metadata(io.BytesIO(f.read()), ".metadata")
    return os.path.join(str(path), sidecar.file_name(".metadata", md.storage_meta.save_id))


def in_child(fn: Callable[[], str]) -> tuple[int, str]:
    """Run ``fn()`` in a forked child; returns (exit code, what it wrote to the pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.write(w, fn().encode())
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported through the pipe
            os.write(w, repr(exc).encode()[:4000])
        finally:
            os._exit(code)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status), out.decode()


# --------------------------------------------------------------------------- engine plans

SIZES = (0, 1, 4095, 4096, 4097, (1 << 20) + 3)
THREADS = (1, 3, 16)

class Mem:
    """Host memory with a raw address: a bytearray pinned by a ctypes view."""

    def __init__(self, size: int = 0, *, data: bytes | None = None, fill: int = 0) -> None:
        if data is not None:
            size = len(data)
        self.size = size
        self.buf = bytearray(data) if data is not None else bytearray([fill]) * size
        if not self.buf:
            self.buf = bytearray(1)  # an address needs at least one byte
        self._pin = (ctypes.c_char * len(self.buf)).from_buffer(self.buf)
        self.addr = ctypes.addressof(self._pin)

    def bytes(self) -> bytes:
        return bytes(self.buf[: self.size])


def pattern(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def segments(*segs: tuple[int, int, int, int]) -> array:
    return array("q", [v for seg in segs for v in seg])


def blob_seg(offset: int, source: int, length: int) -> tuple[int, int, int, int]:
    return (offset, SRC_BLOB, source, length)


def host_seg(offset: int, address: int, length: int) -> tuple[int, int, int, int]:
    return (offset, SRC_HOST, address, length)


def box(file_offset, dest, inner, counts=(), file_strides=(), dest_strides=()) -> list[int]:
    assert len(counts) == len(file_strides) == len(dest_strides)
    return [file_offset, dest, inner, len(counts), *counts, *file_strides, *dest_strides]


def copies(*boxes: list[int]) -> array:
    return array("q", [v for b in boxes for v in b])


def apply_box(data: bytes, dest: bytearray, file_offset, dest_offset, inner, counts=(),
              file_strides=(), dest_strides=()) -> None:
    """Reference semantics of one box (dest_offset relative to ``dest``)."""
    for idx in itertools.product(*(range(c) for c in counts)):
        f = file_offset + sum(i * s for i, s in zip(idx, file_strides))
        d = dest_offset + sum(i * s for i, s in zip(idx, dest_strides))
        dest[d : d + inner] = data[f : f + inner]


def write_file(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def both_engines():
    pytest.importorskip("dcp_native._C")
    from dcp_native._engine_native import NativeEngine
    from dcp_native._engine_python import PythonEngine

    return NativeEngine(), PythonEngine()


def block_crcs(content: bytes, block: int) -> array:
    """Reference: the CRC32C of every block, by the pure-Python implementation."""
    return array("I", (ref_crc32c(content[k : k + block]) for k in range(0, len(content), block)))


def contiguous_plan(rng: random.Random, lengths, host: Mem, blob: bytes) -> tuple[array, bytes]:
    """Segments of the given lengths covering [0, sum) without holes, blob and host
    alternating at random, listed in random order; returns them and the file content."""
    segs, content, offset = [], bytearray(), 0
    for length in lengths:
        if rng.random() < 0.5:
            source = rng.randrange(0, len(blob) - length + 1)
            segs.append(blob_seg(offset, source, length))
            content += blob[source : source + length]
        else:
            source = rng.randrange(0, host.size - length + 1)
            segs.append(host_seg(offset, host.addr + source, length))
            content += host.buf[source : source + length]
        offset += length
    rng.shuffle(segs)
    return segments(*segs), bytes(content)


# name: segment lengths
