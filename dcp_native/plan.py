"""Read and write planning: DCP items -> byte-level plans for the engine. Pure functions.

Read side: a :class:`ReadItem` asks for a box (``storage_offsets``/``lengths``)
of a saved chunk, to be placed in a destination view. With the saved chunk's
layout (dtype, stride, storage offset, where its payload lies in the file)
that box is one strided copy: file offsets and destination addresses advance
by per-dimension byte strides. :func:`read_box` builds it and collapses it to
the fewest dimensions, so a contiguous item is one run and a column slice of
a row-major chunk is one run per row.

Write side: :class:`FileLayout` assigns every item of a data file its offset
and collects the segments (inline bytes, host or device memory) the engine writes.
"""

from __future__ import annotations

import dataclasses
import itertools
from array import array
from typing import Sequence

from .engine import SRC_BLOB, SRC_DEVICE, SRC_HOST


@dataclasses.dataclass(frozen=True)
class Box:
    """One strided copy from a file into memory (see :mod:`dcp_native.engine`)."""

    file_offset: int
    dest_addr: int
    inner_bytes: int
    counts: tuple[int, ...] = ()
    file_strides: tuple[int, ...] = ()
    dest_strides: tuple[int, ...] = ()
    #: The checkpoint key the box reads (to name it in errors); not part of the plan.
    key: str | None = dataclasses.field(default=None, compare=False)

    @property
    def runs(self) -> int:
        n = 1
        for c in self.counts:
            n *= c
        return n

    @property
    def nbytes(self) -> int:
        return self.runs * self.inner_bytes

    @property
    def file_span(self) -> tuple[int, int]:
        """``[start, end)`` of the file bytes the box touches."""
        end = self.file_offset + self.inner_bytes
        for c, s in zip(self.counts, self.file_strides):
            end += (c - 1) * s
        return self.file_offset, end

    def runs_iter(self):
        """Yield ``(file_offset, dest_addr)`` of every run, in index order."""
        if not self.counts:
            yield self.file_offset, self.dest_addr
            return
        for idx in itertools.product(*[range(c) for c in self.counts]):
            f, d = self.file_offset, self.dest_addr
            for i, fs, ds in zip(idx, self.file_strides, self.dest_strides):
                f += i * fs
                d += i * ds
            yield f, d

    def encode(self, out: array) -> None:
        out.append(self.file_offset)
        out.append(self.dest_addr)
        out.append(self.inner_bytes)
        out.append(len(self.counts))
        out.extend(self.counts)
        out.extend(self.file_strides)
        out.extend(self.dest_strides)


def collapse(
    itemsize: int,
    counts: Sequence[int],
    file_strides: Sequence[int],
    dest_strides: Sequence[int],
) -> tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """Collapse a box given in elements to ``(inner_bytes, counts, file_strides, dest_strides)`` in bytes.

    Dimensions of extent 1 are dropped, the innermost dimensions that are
    contiguous on both sides become the run, and neighbouring dimensions that
    are contiguous with each other on both sides are merged. Returns None for
    an empty box (some extent is 0).
    """
    dims = []
    for c, fs, ds in zip(counts, file_strides, dest_strides):
        if c == 0:
            return None
        if c != 1:
            dims.append([c, fs * itemsize, ds * itemsize])
    inner = itemsize
    while dims and dims[-1][1] == inner and dims[-1][2] == inner:
        inner *= dims.pop()[0]
    merged: list[list[int]] = []
    for dim in dims:
        if merged:
            prev = merged[-1]
            if prev[1] == dim[0] * dim[1] and prev[2] == dim[0] * dim[2]:
                prev[0] *= dim[0]
                prev[1] = dim[1]
                prev[2] = dim[2]
                continue
        merged.append(dim)
    return (
        inner,
        tuple(d[0] for d in merged),
        tuple(d[1] for d in merged),
        tuple(d[2] for d in merged),
    )


def read_box(
    payload_offset: int,
    itemsize: int,
    saved_stride: Sequence[int],
    saved_storage_offset: int,
    storage_offsets: Sequence[int],
    lengths: Sequence[int],
    dest_addr: int,
    dest_strides: Sequence[int],
) -> Box | None:
    """The strided copy that narrows a saved chunk by ``storage_offsets``/``lengths``.

    ``payload_offset`` is the file offset of the saved storage's first byte;
    strides and offsets are in elements. The result reads exactly the bytes of
    ``narrow_tensor_by_index(saved, storage_offsets, lengths)`` into the
    destination whose first element is at ``dest_addr``. None if the box is empty.
    """
    start = saved_storage_offset
    for o, s in zip(storage_offsets, saved_stride):
        start += o * s
    collapsed = collapse(itemsize, lengths, saved_stride, dest_strides)
    if collapsed is None:
        return None
    inner, counts, fstrides, dstrides = collapsed
    return Box(payload_offset + start * itemsize, dest_addr, inner, counts, fstrides, dstrides)


def encode_boxes(boxes: Sequence[Box]) -> array:
    out = array("q")
    for box in boxes:
        box.encode(out)
    return out


class FileLayout:
    """Lays out one data file: items back to back, segments for the engine."""

    def __init__(self, path: str, relative_path: str) -> None:
        self.path = path
        self.relative_path = relative_path
        self.size = 0
        self._blob = bytearray()
        self.segments = array("q")
        #: Bytes of the file that come from device memory (add_device).
        self.device_bytes = 0

    def add_bytes(self, data: bytes | bytearray | memoryview) -> int:
        """Append inline bytes; return their file offset."""
        offset = self.size
        n = len(data)
        if n:
            self.segments.extend((offset, SRC_BLOB, len(self._blob), n))
            self._blob += data
            self.size += n
        return offset

    def add_host(self, address: int, nbytes: int) -> int:
        """Append ``nbytes`` from host memory at ``address``; return their file offset."""
        offset = self.size
        if nbytes:
            self.segments.extend((offset, SRC_HOST, address, nbytes))
            self.size += nbytes
        return offset

    def add_device(self, address: int, nbytes: int) -> int:
        """Append ``nbytes`` from device memory at ``address``; return their file offset.

        The device is the file's (``WriteFile.device``): one per file.
        """
        offset = self.size
        if nbytes:
            self.segments.extend((offset, SRC_DEVICE, address, nbytes))
            self.size += nbytes
            self.device_bytes += nbytes
        return offset

    @property
    def blob(self) -> bytes:
        return bytes(self._blob)
