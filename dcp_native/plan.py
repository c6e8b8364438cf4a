"""Boxes: the strided copies of one tensor read, for the engine's read plan. Pure functions.

A :class:`ReadItem` asks for a box (``storage_offsets``/``lengths``) of a
saved chunk, to be placed in a destination view. With the saved chunk's
layout (dtype, stride, storage offset, where its payload lies in the file)
that box is one strided copy: file offsets and destination addresses advance
by per-dimension byte strides. :func:`read_box` builds it and collapses it to
the fewest dimensions, so a contiguous item is one run and a column slice of
a row-major chunk is one run per row. (Where a save's bytes go is
:mod:`dcp_native.layout`.)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from array import array
from typing import Sequence


@dataclasses.dataclass
class Box:
    """One strided copy from a file into memory (see :mod:`dcp_native.engine`); never changed
    once made (not frozen: a load makes one per tensor read, and a frozen one costs 3x)."""

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
        return math.prod(self.counts)

    @property
    def file_span(self) -> tuple[int, int]:
        """``[start, end)`` of the file bytes the box touches."""
        return self.file_offset, self.file_offset + self.inner_bytes + sum(
            (c - 1) * s for c, s in zip(self.counts, self.file_strides))

    def runs_iter(self):
        """Yield ``(file_offset, dest_addr)`` of every run, in index order."""
        for idx in itertools.product(*map(range, self.counts)):
            yield (self.file_offset + sum(map(operator.mul, idx, self.file_strides)),
                   self.dest_addr + sum(map(operator.mul, idx, self.dest_strides)))


_Dims = tuple[int, ...]


def collapse(itemsize: int, counts: Sequence[int], file_strides: Sequence[int],
             dest_strides: Sequence[int]) -> tuple[int, _Dims, _Dims, _Dims] | None:
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
    for c, fs, ds in dims:
        if merged and merged[-1][1] == c * fs and merged[-1][2] == c * ds:
            merged[-1] = [merged[-1][0] * c, fs, ds]
        else:
            merged.append([c, fs, ds])
    return (inner, *(tuple(d[i] for d in merged) for i in range(3)))


def read_box(payload_offset: int, itemsize: int, saved_stride: Sequence[int],
             saved_storage_offset: int, storage_offsets: Sequence[int], lengths: Sequence[int],
             dest_addr: int, dest_strides: Sequence[int], key: str | None = None) -> Box | None:
    """The strided copy that narrows a saved chunk by ``storage_offsets``/``lengths``.

    ``payload_offset`` is the file offset of the saved storage's first byte;
    strides and offsets are in elements. The result reads exactly the bytes of
    ``narrow_tensor_by_index(saved, storage_offsets, lengths)`` into the
    destination whose first element is at ``dest_addr``; ``key`` names it in errors. None if
    the box is empty.
    """
    start = saved_storage_offset + sum(map(operator.mul, storage_offsets, saved_stride))
    collapsed = collapse(itemsize, lengths, saved_stride, dest_strides)
    return None if collapsed is None else Box(payload_offset + start * itemsize, dest_addr, *collapsed, key=key)


def encode_boxes(boxes: Sequence[Box]) -> array:
    """The engine's ``ReadFile.copies`` of ``boxes`` (see the engine contract)."""
    out = array("q")
    for b in boxes:
        out.extend((b.file_offset, b.dest_addr, b.inner_bytes, len(b.counts), *b.counts,
                    *b.file_strides, *b.dest_strides))
    return out
