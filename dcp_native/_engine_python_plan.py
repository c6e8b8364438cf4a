"""The Python engine's planning: plans validated and packed into calls, and block checksums.

It mirrors csrc/ decision for decision (call_plan.hpp's CallBuilder, the
planning of write_engine.cpp and read_engine.cpp, block_crc.hpp), so both
engines refuse the same plans and report the same stats.
"""

from __future__ import annotations

import ctypes
from array import array
from itertools import repeat
from typing import NamedTuple

from ._crc32c import crc32c, crc32c_combine
from .engine import MAX_IOVECS, SRC_BLOB, SRC_DEVICE, SRC_HOST, should_merge

#: Most dimensions of one box (as csrc/read_engine.hpp).
MAX_NDIM = 64
_INT64_MAX = (1 << 63) - 1
#: Why the Python engine has no GPU path (cuda_status().reason, and the refusal of device plans).
HOST_ONLY = (
    "the Python engine moves host memory only (CUDA tensors reach it as host copies "
    "made by torch; DCP_NATIVE_BACKEND=native is the GPU path)"
)


class Call(NamedTuple):
    """One preadv/pwritev: ``nbytes`` bytes at ``offset`` of file ``file``.

    ``parts`` is flat ``(view_index, start, length)`` triples, one per iovec,
    ``view_index`` -1 for a gap (read into the thread's scratch buffer). Plain
    ints rather than memoryviews: a plan can hold millions of parts, and
    short-lived views made when the call runs cost the garbage collector far
    less than long-lived ones. A call without parts only opens its file.
    """

    file: int
    offset: int
    nbytes: int
    parts: list

    def buffers(self, views: list, scratch: memoryview | None) -> list:
        """The call's memory, each gap its own part of ``scratch`` (checks read them)."""
        p = self.parts
        out, used = [], 0
        for v, s, n in zip(p[0::3], p[1::3], p[2::3]):
            if v >= 0:
                out.append(views[v][s : s + n])
            else:
                out.append(scratch[used : used + n])
                used += n
        return out


def interleave_files(calls: list, file_count: int, wave: int) -> list:
    """Spread workers over files, as csrc's interleave_files (see call_plan.hpp).

    Threads writing one file contend for its inode lock; files go in waves of
    ``wave`` and within a wave their calls alternate.
    """
    per_file: list[list] = [[] for _ in range(file_count)]
    for call in calls:
        per_file[call.file].append(call)
    out = []
    wave = max(wave, 1)
    for start in range(0, file_count, wave):
        group = per_file[start : start + wave]
        for round_ in range(max((len(g) for g in group), default=0)):
            out.extend(g[round_] for g in group if round_ < len(g))
    return out


def pack(runs: list, file: int, chunk_bytes: int, max_gap: int, calls: list, table=None) -> int:
    """Packs one file's runs into calls, appended to ``calls``; returns the most scratch a call
    needs.

    ``runs`` are ``(file_offset, length, view_index, view_start)`` tuples.
    This is CallBuilder (csrc/call_plan.hpp) with pack_runs (csrc/read_engine.cpp),
    kept decision for decision the same so both engines report the same stats.
    ``max_gap < 0`` (writes) never bridges gaps: only contiguous ranges share
    a call. With a checksum ``table``, groups of runs are widened to whole
    blocks (see "Checks" in dcp_native.engine).
    """
    # Plain tuple order is (offset, length, ...): ties on offset go by length,
    # as in csrc, so the merge decisions do not depend on the record order.
    runs.sort()
    first_call = len(calls)
    call: list = [None, 0, 0, 0]  # parts (None: no open call), iovecs, offset, nbytes

    def add(offset: int, view_index: int, start: int, length: int) -> None:
        parts, iovecs, call_offset, nbytes = call
        while length > 0:
            if parts is not None and (
                iovecs == MAX_IOVECS or nbytes == chunk_bytes or call_offset + nbytes != offset
            ):
                calls.append(Call(file, call_offset, nbytes, parts))
                parts = None
            if parts is None:
                parts, iovecs, call_offset, nbytes = [], 0, offset, 0
            take = min(chunk_bytes - nbytes, length)
            parts += (view_index, start, take)
            iovecs += 1
            nbytes += take
            offset += take
            start += take if view_index >= 0 else 0
            length -= take
        call[:] = parts, iovecs, call_offset, nbytes

    def flush() -> None:
        if call[0] is not None:
            calls.append(Call(file, call[2], call[3], call[0]))
            call[0] = None

    if table is not None:
        block, size = table.block, table.size

        def block_end(pos: int) -> int:
            return min(-(-pos // block) * block, size)

    group = False  # a group is open (files with a table)
    prev_length = 0
    for offset, length, view_index, start in runs:
        parts, iovecs, call_offset, nbytes = call
        if (group if table is not None else parts is not None) and max_gap >= 0:
            end = call_offset + nbytes
            gap = offset - end
            if table is not None:
                merge = gap >= 0 and (
                    offset // block * block < block_end(end)
                    or should_merge(prev_length, gap, length, max_gap)
                )
            else:
                merge = (
                    should_merge(prev_length, gap, length, max_gap)
                    and iovecs + (2 if gap > 0 else 1) <= MAX_IOVECS
                    and gap < chunk_bytes - nbytes
                )
            if merge:
                add(end, -1, 0, gap)  # the call has room (unchecked) or splits (checked)
            else:
                if table is not None:
                    add(end, -1, 0, block_end(end) - end)
                flush()
                group = False
        if table is not None and not group:
            add(offset // block * block, -1, 0, offset % block)
            group = True
        add(offset, view_index, start, length)
        prev_length = length
    if table is not None and group:
        end = call[2] + call[3]
        add(end, -1, 0, block_end(end) - end)
    flush()
    if len(calls) == first_call:
        # Nothing to move: the call still opens the file (creates it for
        # writes, checks its size for reads).
        calls.append(Call(file, 0, 0, []))
    # Scratch a call needs: its gaps, each with bytes of its own.
    return max((sum(n for v, n in zip(c.parts[0::3], c.parts[2::3]) if v < 0)
                for c in calls[first_call:]), default=0)


def int64_values(buffer, what: str) -> list[int]:
    """array('q') (or any 1-D C-contiguous int64 buffer) as a list of ints."""
    view = memoryview(buffer)
    fmt = view.format.lstrip("@=<")
    if view.itemsize != 8 or fmt not in ("q", "l") or view.ndim != 1 or not view.c_contiguous:
        raise ValueError(
            f"{what} must be a 1-D int64 buffer such as array('q'), got format "
            f"{view.format!r} with itemsize {view.itemsize}"
        )
    return view.tolist()


def byte_view(buffer, what: str) -> memoryview:
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise ValueError(f"{what} must be a C-contiguous buffer")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def host_view(address: int, length: int) -> memoryview:
    """``length`` bytes of memory at ``address``, writable, without copying."""
    return memoryview((ctypes.c_char * length).from_address(address)).cast("B")


def collect_segments(path: str, blob, segments, contiguous: bool) -> tuple[list, list, int]:
    """Validates a file's segments; returns the non-empty ones as runs for :func:`pack`, their
    views and the total length. ``contiguous``: the runs must cover the file without holes (files
    with block CRCs)."""
    values = int64_values(segments, "segments")
    if len(values) % 4:
        raise ValueError(
            f"write plan for {path}: segments has {len(values)} values, not a multiple of 4 "
            "(file_offset, kind, source, length)"
        )
    blob_view = byte_view(blob, "blob")
    blob_length = len(blob_view)
    views = [blob_view]
    runs = []
    total = 0
    for i in range(0, len(values), 4):
        offset, kind, source, length = values[i : i + 4]
        where = f"write plan for {path}: segment {i // 4}"
        if offset < 0 or length < 0 or offset + length > _INT64_MAX:
            raise ValueError(f"{where}: file range [{offset}, +{length}) is negative or overflows")
        if kind == SRC_BLOB:
            if source < 0 or source > blob_length or length > blob_length - source:
                raise ValueError(f"{where}: blob range [{source}, +{length}) is outside the blob "
                                 f"of {blob_length} bytes")
            if length:
                runs.append((offset, length, 0, source))
        elif kind == SRC_HOST:
            if source < 0 or source + length > _INT64_MAX or (source == 0 and length > 0):
                raise ValueError(f"{where}: host address {source} is invalid")
            if length:
                runs.append((offset, length, len(views), 0))
                views.append(host_view(source, length))
        elif kind == SRC_DEVICE:
            raise ValueError(f"{where}: SRC_DEVICE: {HOST_ONLY}")
        else:
            raise ValueError(f"{where}: unknown source kind {kind}")
        total += length
    runs.sort()
    covered = 0  # end of the previous run
    for run in runs:
        # Overlapping segments would race between threads: the plan is wrong.
        if run[0] < covered:
            raise ValueError(f"write plan for {path}: segments overlap at file offset {run[0]}")
        # A hole's bytes come from no memory, so no CRC could cover them.
        if contiguous and run[0] > covered:
            raise ValueError(
                f"write plan for {path}: crc_block needs segments that cover the file, but "
                f"nothing covers [{covered}, {run[0]})"
            )
        covered = run[0] + run[1]
    return runs, views, total


def collect_runs(path: str, copies) -> tuple[list, list, int]:
    """Validates a file's box records; returns its runs for :func:`pack`, one view per box, and
    the end offset of the furthest run."""
    values = int64_values(copies, "copies")
    n = len(values)
    runs: list = []
    views: list = []
    furthest = 0
    pos = 0
    while pos < n:
        where = f"read plan for {path}: copy record at index {pos}"
        if n - pos < 4:
            raise ValueError(f"{where}: truncated header (need 4 values, {n - pos} left)")
        file_offset, dest, inner, ndim = values[pos : pos + 4]
        if ndim < 0 or ndim > MAX_NDIM:
            raise ValueError(f"{where}: ndim {ndim} is outside [0, {MAX_NDIM}]")
        if (n - pos - 4) // 3 < ndim:
            raise ValueError(f"{where}: truncated: ndim {ndim} needs {3 * ndim} more values")
        counts = values[pos + 4 : pos + 4 + ndim]
        file_strides = values[pos + 4 + ndim : pos + 4 + 2 * ndim]
        dest_strides = values[pos + 4 + 2 * ndim : pos + 4 + 3 * ndim]
        pos += 4 + 3 * ndim
        if file_offset < 0 or dest < 0 or inner < 0:
            raise ValueError(f"{where}: negative file offset, destination address or inner_bytes")
        box_runs = 1
        for d in range(ndim):
            if counts[d] < 0 or file_strides[d] < 0 or dest_strides[d] < 0:
                raise ValueError(f"{where}: negative count or stride in dimension {d}")
            box_runs *= counts[d]
            if box_runs > _INT64_MAX:
                raise ValueError(f"{where}: the number of runs overflows int64")
        if box_runs == 0 or inner == 0:
            continue  # an empty box copies nothing
        if dest == 0:
            raise ValueError(f"{where}: null destination address")
        file_span = sum((c - 1) * s for c, s in zip(counts, file_strides)) + inner
        dest_span = sum((c - 1) * s for c, s in zip(counts, dest_strides)) + inner
        if file_offset + file_span > _INT64_MAX or dest + dest_span > _INT64_MAX:
            raise ValueError(f"{where}: the box's file or memory range overflows int64")
        furthest = max(furthest, file_offset + file_span)
        # One view over the box's whole destination; runs are slices of it.
        box = len(views)
        views.append(host_view(dest, dest_span))
        if ndim == 0:
            runs.append((file_offset, inner, box, 0))
            continue
        # Start offsets over the outer dimensions, then the innermost one with
        # C-level iterators (range/repeat/zip): no Python code per run.
        starts = [(file_offset, 0)]
        for count, fs, ds in zip(counts[:-1], file_strides[:-1], dest_strides[:-1]):
            starts = [(f + k * fs, m + k * ds) for f, m in starts for k in range(count)]
        count, fs, ds = counts[-1], file_strides[-1], dest_strides[-1]
        for f, m in starts:
            runs.extend(
                zip(
                    range(f, f + count * fs, fs) if fs else repeat(f, count),
                    repeat(inner, count),
                    repeat(box, count),
                    range(m, m + count * ds, ds) if ds else repeat(m, count),
                )
            )
    return runs, views, furthest


class Table(NamedTuple):
    """A block grid and its CRCs (what ReadFile.table holds)."""

    block: int
    size: int
    crcs: array


def check_table(path: str, table, furthest: int) -> None:
    """csrc's check_table: the table describes the file, and the runs lie within it."""
    block, size = table.block, table.size
    view = memoryview(table.crcs)
    if view.itemsize != 4 or view.format.lstrip("@=<") not in ("I", "L") or view.ndim != 1:
        raise ValueError(
            f"crcs must be a 1-D 32-bit buffer such as array('I'), got format {view.format!r} "
            f"with itemsize {view.itemsize}"
        )
    count = len(view)
    if block <= 0 or size < 0 or count != -(-size // block):
        raise ValueError(
            f"read plan for {path}: a checksum table of {count} CRCs does not describe a file "
            f"of {size} bytes in blocks of {block}"
        )
    if furthest > size:
        raise ValueError(
            f"read plan for {path}: a run ends at {furthest}, past the {size} bytes the "
            "checksum table describes"
        )


def compare(f: int, table, failed: list):
    """``whole`` for :func:`checksum_range`: records ``(f, k)`` of every block that differs."""
    crcs = table.crcs

    def compare(k: int, crc: int) -> None:
        if crc != crcs[k]:
            failed.append((f, k))

    return compare


def checksum_range(table, offset: int, buffers: list, pieces: list, whole, portable: bool) -> None:
    """csrc's checksum_range (block_crc.hpp): the file bytes from ``offset`` held in order by
    ``buffers``. ``whole(k, crc)`` for every block they hold whole; ``(k, start, length, crc)``
    of the blocks they hold in part go to ``pieces``."""
    block, size = table.block, table.size
    end = offset + sum(map(len, buffers))
    i = used = 0
    pos = offset
    while pos < end:
        k, start = divmod(pos, block)
        length = min(block, size - k * block)
        stop = min(end, pos - start + length)
        crc = 0
        need = stop - pos
        while need:
            while used == len(buffers[i]):
                i, used = i + 1, 0
            take = min(need, len(buffers[i]) - used)
            crc = crc32c(buffers[i][used : used + take], crc, portable)
            used += take
            need -= take
        if start == 0 and stop - pos == length:
            whole(k, crc)
        else:
            pieces.append((k, start, stop - pos, crc))
        pos = stop


def join_pieces(table, pieces: list, done) -> None:
    """csrc's join_pieces: the CRC of every block the pieces tile, through ``done(k, crc)``;
    of the chains that tile a block (reads of overlapping runs) the first found is used."""
    pieces.sort()
    i = 0
    while i < len(pieces):
        k = pieces[i][0]
        length = min(table.block, table.size - k * table.block)
        pos = crc = 0
        while i < len(pieces) and pieces[i][0] == k:
            _, start, n, piece = pieces[i]
            if start == pos and pos < length:
                crc = piece if pos == 0 else crc32c_combine(crc, piece, n)
                pos += n
            i += 1
        if pos != length:
            raise AssertionError(f"block {k} is not covered by its pieces")
        done(k, crc)
