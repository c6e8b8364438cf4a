"""The pure-Python engine: the contract of :mod:`dcp_native.engine` with os.pwritev/os.preadv.

It is the fallback where the extension is not built, and the reference the
native engine is tested against, so it plans exactly as csrc/ does (same
validation, same call packing, hence the same read stats). The system calls
release the GIL, so a few threads still overlap I/O; memory at raw addresses
is reached through ctypes views, one per box or segment, never per byte.
Checksums go through :mod:`dcp_native._crc32c` (native when the extension
imports, which releases the GIL for large buffers).

It moves host memory only: the native engine is the one GPU path. Without
it, the writer and reader hand CUDA tensors over as host copies made by torch
(``.cpu()``, ``copy_``), so this engine's ``cuda_status()`` says it is not
usable and plans with device memory are refused.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from array import array
from itertools import repeat
from typing import Callable, NamedTuple, Sequence

from . import config
from ._crc32c import crc32c, crc32c_combine
from ._errors import CudaError, TruncatedFileError
from ._fileio import CLOSE as _CLOSE
from ._fileio import FSYNC as _FSYNC
from ._fileio import READ as _READ
from ._fileio import WRITE as _WRITE
from ._fileio import Faults as _Faults
from ._fileio import close_quietly as _close_quietly
from ._fileio import open_regular as _open_regular
from ._fileio import os_call as _os_call
from ._fileio import os_error as _os_error
from .engine import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_DEVICE_CHUNK_BYTES,
    DEFAULT_MAX_GAP,
    DEFAULT_STAGING_BYTES,
    MAX_IOVECS,
    SRC_BLOB,
    SRC_DEVICE,
    SRC_HOST,
    CudaStatus,
    ReadFile,
    ReadStats,
    WriteFile,
    WriteStats,
    should_merge,
)

#: Most dimensions of one box (as csrc/read_engine.hpp).
MAX_NDIM = 64
_INT64_MAX = (1 << 63) - 1
# What _fileio.open_regular calls the files it refuses (as csrc/file_io.cpp).
_DATA_FILE = "data file"
#: Why this engine has no GPU path (cuda_status().reason, and the refusal of device plans).
HOST_ONLY = (
    "the Python engine moves host memory only (CUDA tensors reach it as host copies "
    "made by torch; DCP_NATIVE_BACKEND=native is the GPU path)"
)


class PythonEngine:
    """Executes write and read plans with os.pwritev/os.preadv on threads."""

    name = "python"

    def write(
        self,
        files: Sequence[WriteFile],
        *,
        threads: int,
        sync: bool,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        pool: object = None,
        direct_io: bool = True,
    ) -> WriteStats:
        settings = config.current()
        faults = _Faults(settings.fault_triples())
        cap, portable = settings.short_io, settings.portable_crc32c
        _check_positive("threads", threads)
        _check_positive("chunk_bytes", chunk_bytes)
        _refuse_pool(pool)
        paths = [os.fsdecode(f.path) for f in files]
        calls: list[_Call] = []
        views: list[list[memoryview]] = []
        written = []
        tables: list = []  # per file: its block grid, or None
        pieces: list[list] = []  # per file: the pieces of blocks its calls share
        for index, (path, f) in enumerate(zip(paths, files)):
            crc_block = f.crc_block
            if crc_block < 0:
                raise ValueError(f"write plan for {path}: negative crc_block {crc_block}")
            if f.device >= 0:
                raise ValueError(f"write plan for {path}: device {f.device}: {HOST_ONLY}")
            runs, file_views, total = _collect_segments(path, f.blob, f.segments, crc_block > 0)
            views.append(file_views)
            written.append(total)
            _pack(runs, index, chunk_bytes, -1, calls)
            size = runs[-1][0] + runs[-1][1] if runs else 0
            grid = _Table(crc_block, size, array("I", bytes(4 * -(-size // crc_block)))) if crc_block else None
            tables.append(grid)
            pieces.append([])

        def open_file(index: int) -> int:
            # O_NOFOLLOW, O_NONBLOCK, O_CLOEXEC and the regular-file check come with it.
            return _open_regular(paths[index], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644,
                                 faults=faults, what=_DATA_FILE)

        def run_call(fd: int, call: _Call, scratch: memoryview | None) -> None:
            buffers = call.buffers(views[call.file], None)
            path, table = paths[call.file], tables[call.file]
            if table is not None:
                # Checksummed first, as csrc does: the write then copies hot bytes.
                _checksum_range(table, call.offset, buffers, pieces[call.file],
                                table.crcs.__setitem__, portable)
            _transfer(os.pwritev, "pwritev", fd, buffers, call.offset, call.nbytes, path, 0, cap,
                      faults)
            if sync:
                _start_writeback(fd, call.offset, call.nbytes)

        def finish_file(index: int, fd: int) -> None:
            if sync:
                try:
                    _os_call(faults, _FSYNC, os.fsync, "fsync", paths[index], -1, fd)
                except BaseException:
                    _close_quietly(fd)  # as csrc's FdGuard: an error path, not a hooked close
                    raise
            _os_call(faults, _CLOSE, os.close, "close", paths[index], -1, fd)

        calls = _interleave_files(calls, len(files), threads)
        _execute(calls, len(files), threads, 0, open_file, run_call, finish_file)
        for table, shared in zip(tables, pieces):
            if table is not None:
                _join_pieces(table, shared, table.crcs.__setitem__)
        return WriteStats(bytes_written=written, block_crcs=[t and t.crcs for t in tables])

    def read(
        self,
        files: Sequence[ReadFile],
        *,
        threads: int,
        max_gap: int = DEFAULT_MAX_GAP,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        pool: object = None,
        direct_io: bool = True,
    ) -> ReadStats:
        settings = config.current()
        faults = _Faults(settings.fault_triples())
        cap, portable = settings.short_io, settings.portable_crc32c
        _check_positive("threads", threads)
        _check_positive("chunk_bytes", chunk_bytes)
        if max_gap < 0:
            raise ValueError(f"max_gap must be non-negative, got {max_gap}")
        _refuse_pool(pool)
        paths = [os.fsdecode(f.path) for f in files]
        calls: list[_Call] = []
        views: list[list[memoryview]] = []
        required = []
        scratch = 0
        for index, (path, f) in enumerate(zip(paths, files)):
            if f.min_size < 0:
                raise ValueError(f"read plan for {path}: negative min_size {f.min_size}")
            if f.device >= 0:
                raise ValueError(f"read plan for {path}: device {f.device}: {HOST_ONLY}")
            runs, file_views, furthest = _collect_runs(path, f.copies)
            views.append(file_views)
            required.append(max(f.min_size, furthest))
            if f.table is not None:
                _check_table(path, f.table, furthest)
            scratch = max(scratch, _pack(runs, index, chunk_bytes, max_gap, calls, f.table))
        pieces: list[list] = [[] for _ in files]
        failed: list = []

        stats = ReadStats(
            bytes_read=sum(c.nbytes for c in calls),
            calls=sum(1 for c in calls if c.parts),
        )

        def open_file(index: int) -> int:
            path = paths[index]
            fd = _open_regular(path, os.O_RDONLY, faults=faults, what=_DATA_FILE)
            try:
                # Checking the size up front fails fast, with the size the
                # plan needs rather than the first run that fails.
                size = _os_call(None, 0, os.fstat, "fstat", path, -1, fd).st_size
                if size < required[index]:
                    raise TruncatedFileError(path, required[index], size)
            except BaseException:
                _close_quietly(fd)
                raise
            return fd

        def run_call(fd: int, call: _Call, scratch: memoryview | None) -> None:
            f = call.file
            table = files[f].table
            buffers = call.buffers(views[f], scratch, table is not None)
            _transfer(os.preadv, "preadv", fd, buffers, call.offset, call.nbytes, paths[f],
                      required[f], cap, faults)
            if table is not None:
                _checksum_range(table, call.offset, buffers, pieces[f], _compare(f, table, failed),
                                portable)

        def finish_file(index: int, fd: int) -> None:
            # Nothing read can be lost: a failed close (real or injected) is
            # ignored, as in csrc's close_read_only.
            faults.next(_CLOSE)
            _close_quietly(fd)

        _execute(calls, len(files), threads, scratch, open_file, run_call, finish_file)
        for f, shared in enumerate(pieces):
            if shared:
                _join_pieces(files[f].table, shared, _compare(f, files[f].table, failed))
        # A block two overlapping runs both read whole is checked twice.
        stats.failed_blocks = sorted(set(failed))
        return stats

    def cuda_status(self) -> CudaStatus:
        """Never usable: this engine moves host memory only (see the module docs)."""
        return CudaStatus(False, HOST_ONLY)

    def pinned_pool(
        self,
        device: int,
        capacity: int = DEFAULT_STAGING_BYTES,
        chunk_bytes: int = DEFAULT_DEVICE_CHUNK_BYTES,
    ) -> object:
        """Refused: this engine has no pinned pools (CudaError, as when CUDA is not usable)."""
        raise CudaError(f"CUDA is not usable: {HOST_ONLY}", operation="pinned_pool")


def _refuse_pool(pool: object) -> None:
    if pool is not None:
        raise ValueError(f"a pinned pool was passed to a plan, but {HOST_ONLY}")


# --------------------------------------------------------------------------- planning


class _Call:
    """One preadv/pwritev: ``nbytes`` bytes at ``offset`` of file ``file``.

    ``parts`` is flat ``(view_index, start, length)`` triples, one per iovec,
    ``view_index`` -1 for a gap (read into the thread's scratch buffer). Plain
    ints rather than memoryviews: a plan can hold millions of parts, and
    short-lived views made when the call runs cost the garbage collector far
    less than long-lived ones. A call without parts only opens its file.
    """

    __slots__ = ("file", "offset", "nbytes", "parts")

    def __init__(self, file: int, offset: int, nbytes: int, parts: list) -> None:
        self.file = file
        self.offset = offset
        self.nbytes = nbytes
        self.parts = parts

    def buffers(self, views: list, scratch: memoryview | None, own_gaps: bool = False) -> list:
        """The call's memory; with ``own_gaps`` each gap gets its own part of ``scratch``."""
        p = self.parts
        if not own_gaps:
            return [
                views[v][s : s + n] if v >= 0 else scratch[:n]
                for v, s, n in zip(p[0::3], p[1::3], p[2::3])
            ]
        out, used = [], 0
        for v, s, n in zip(p[0::3], p[1::3], p[2::3]):
            if v >= 0:
                out.append(views[v][s : s + n])
            else:
                out.append(scratch[used : used + n])
                used += n
        return out


def _interleave_files(calls: list, file_count: int, wave: int) -> list:
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


def _pack(runs: list, file: int, chunk_bytes: int, max_gap: int, calls: list, table=None) -> int:
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
    scratch = 0
    first_call = len(calls)
    call: list = [None, 0, 0, 0]  # parts (None: no open call), iovecs, offset, nbytes

    def add(offset: int, view_index: int, start: int, length: int) -> None:
        parts, iovecs, call_offset, nbytes = call
        while length > 0:
            if parts is not None and (
                iovecs == MAX_IOVECS or nbytes == chunk_bytes or call_offset + nbytes != offset
            ):
                calls.append(_Call(file, call_offset, nbytes, parts))
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
            calls.append(_Call(file, call[2], call[3], call[0]))
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
            if merge and gap > 0:
                if table is not None:
                    add(end, -1, 0, gap)
                else:
                    parts += (-1, 0, gap)
                    call[1:] = iovecs + 1, call_offset, nbytes + gap
                scratch = max(scratch, gap)
            elif not merge:
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
        calls.append(_Call(file, 0, 0, []))
    if table is not None:
        # Gaps of checked calls each keep their bytes.
        for c in calls[first_call:]:
            scratch = max(scratch, sum(c.parts[2::3][i] for i, v in enumerate(c.parts[0::3]) if v < 0))
    return scratch


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _int64_values(buffer, what: str) -> list[int]:
    """array('q') (or any 1-D C-contiguous int64 buffer) as a list of ints."""
    view = memoryview(buffer)
    fmt = view.format.lstrip("@=<")
    if view.itemsize != 8 or fmt not in ("q", "l") or view.ndim != 1 or not view.c_contiguous:
        raise ValueError(
            f"{what} must be a 1-D int64 buffer such as array('q'), got format "
            f"{view.format!r} with itemsize {view.itemsize}"
        )
    return view.tolist()


def _byte_view(buffer, what: str) -> memoryview:
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise ValueError(f"{what} must be a C-contiguous buffer")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _host_view(address: int, length: int) -> memoryview:
    """``length`` bytes of memory at ``address``, writable, without copying."""
    return memoryview((ctypes.c_char * length).from_address(address)).cast("B")


def _collect_segments(path: str, blob, segments, contiguous: bool) -> tuple[list, list, int]:
    """Validates a file's segments; returns the non-empty ones as runs for :func:`_pack`, their
    views and the total length. ``contiguous``: the runs must cover the file without holes (files
    with block CRCs)."""
    values = _int64_values(segments, "segments")
    if len(values) % 4:
        raise ValueError(
            f"write plan for {path}: segments has {len(values)} values, not a multiple of 4 "
            "(file_offset, kind, source, length)"
        )
    blob_view = _byte_view(blob, "blob")
    blob_length = len(blob_view)
    views = [blob_view]
    runs = []
    total = 0
    for i in range(0, len(values), 4):
        offset, kind, source, length = values[i : i + 4]
        if offset < 0 or length < 0 or offset + length > _INT64_MAX:
            raise ValueError(
                f"write plan for {path}: segment {i // 4}: file range [{offset}, +{length}) "
                "is negative or overflows"
            )
        if kind == SRC_BLOB:
            if source < 0 or source > blob_length or length > blob_length - source:
                raise ValueError(
                    f"write plan for {path}: segment {i // 4}: blob range [{source}, +{length}) "
                    f"is outside the blob of {blob_length} bytes"
                )
            if length:
                runs.append((offset, length, 0, source))
        elif kind == SRC_HOST:
            if source < 0 or source + length > _INT64_MAX or (source == 0 and length > 0):
                raise ValueError(
                    f"write plan for {path}: segment {i // 4}: host address {source} is invalid"
                )
            if length:
                runs.append((offset, length, len(views), 0))
                views.append(_host_view(source, length))
        elif kind == SRC_DEVICE:
            raise ValueError(f"write plan for {path}: segment {i // 4}: SRC_DEVICE: {HOST_ONLY}")
        else:
            raise ValueError(f"write plan for {path}: segment {i // 4}: unknown source kind {kind}")
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


def _collect_runs(path: str, copies) -> tuple[list, list, int]:
    """Validates a file's box records; returns its runs for :func:`_pack`, one view per box, and
    the end offset of the furthest run."""
    values = _int64_values(copies, "copies")
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
        views.append(_host_view(dest, dest_span))
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


class _Table(NamedTuple):
    """A block grid and its CRCs (what ReadFile.table holds)."""

    block: int
    size: int
    crcs: array


def _check_table(path: str, table, furthest: int) -> None:
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


def _compare(f: int, table, failed: list):
    """``whole`` for :func:`_checksum_range`: records ``(f, k)`` of every block that differs."""
    crcs = table.crcs

    def compare(k: int, crc: int) -> None:
        if crc != crcs[k]:
            failed.append((f, k))

    return compare


def _checksum_range(table, offset: int, buffers: list, pieces: list, whole, portable: bool) -> None:
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


def _join_pieces(table, pieces: list, done) -> None:
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


# --------------------------------------------------------------------------- execution


def _execute(
    work: list,
    file_count: int,
    threads: int,
    scratch_bytes: int,
    open_file: Callable[[int], int] | None,
    run_call: Callable[[int, _Call, "memoryview | None"], None] | None,
    finish_file: Callable[[int, int], None] | None,
) -> None:
    """Runs the work on up to ``threads`` threads (the caller is one of them).

    ``work`` holds calls and plain callables (checksum work), in the order the
    threads take them. A file is opened by the first call that needs it and
    finished (synced, closed) by whichever thread completes its last one, so
    few descriptors are open at once. The first error stops the other threads
    and is raised here, after every descriptor is closed.
    """
    pieces = [0] * file_count
    for call in work:
        if type(call) is _Call:
            pieces[call.file] += 1
    fds: list[int | None] = [None] * file_count
    file_locks = [threading.Lock() for _ in range(file_count)]
    lock = threading.Lock()
    state = {"next": 0, "error": None}

    def acquire(index: int) -> int:
        fd = fds[index]
        if fd is not None:
            return fd
        with file_locks[index]:
            if fds[index] is None:
                fds[index] = open_file(index)
            return fds[index]

    def fail(exc: BaseException) -> None:
        with lock:
            if state["error"] is None:
                state["error"] = exc

    def worker() -> None:
        try:
            scratch = memoryview(bytearray(scratch_bytes)) if scratch_bytes else None
            while True:
                with lock:
                    i = state["next"]
                    if state["error"] is not None or i >= len(work):
                        return
                    state["next"] = i + 1
                call = work[i]
                if type(call) is not _Call:
                    call()
                    continue
                fd = acquire(call.file)
                if call.parts:
                    run_call(fd, call, scratch)
                with lock:
                    pieces[call.file] -= 1
                    last = pieces[call.file] == 0
                    if last:
                        fds[call.file] = None
                if last:
                    finish_file(call.file, fd)
        except BaseException as exc:  # noqa: BLE001 - rethrown by the caller
            fail(exc)

    helpers = []
    try:
        for _ in range(min(threads, len(work)) - 1):
            thread = threading.Thread(target=worker, name="dcp_native-io", daemon=True)
            try:
                thread.start()
            except RuntimeError:
                break  # out of threads: fewer workers are still correct (as in csrc)
            helpers.append(thread)
        worker()
    finally:
        # Descriptors are closed only once no thread can use them, so a
        # Ctrl-C during the wait stops the workers instead of abandoning them.
        for thread in helpers:
            while thread.is_alive():
                try:
                    thread.join()
                except BaseException as exc:  # noqa: BLE001 - rethrown below
                    fail(exc)
        for fd in fds:
            if fd is not None:
                _close_quietly(fd)
    error = state["error"]
    if error is not None:
        state["error"] = None  # no reference cycle through the traceback
        raise error


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writeback of a written range without waiting (sync_file_range, Linux), as csrc does.

    Saves with fsync call it after each write, so the disk works while later
    pieces are written rather than all at the final fsync. A hint: errors and
    platforms without the call change nothing (the fsync makes the data durable).
    """
    global _sync_file_range
    if _sync_file_range is None:
        try:
            function = ctypes.CDLL(None, use_errno=True).sync_file_range
            function.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
            function.restype = ctypes.c_int
        except (AttributeError, OSError):
            function = False
        _sync_file_range = function
    if _sync_file_range:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _transfer(
    syscall,
    operation: str,
    fd: int,
    buffers: list,
    offset: int,
    nbytes: int,
    path: str,
    required: int,
    cap: int,
    faults: _Faults,
) -> None:
    """Moves exactly ``nbytes`` bytes with preadv/pwritev, resuming short transfers.

    EINTR is retried by Python itself (PEP 475). ``cap`` > 0 limits every call
    to ``cap`` bytes (DCP_NATIVE_TEST_SHORT_IO); every call, resumed or not,
    counts for DCP_NATIVE_FAULT.
    """
    op = _WRITE if syscall is os.pwritev else _READ
    while nbytes > 0:
        request = buffers
        if cap and nbytes > cap:
            request = []
            want = cap
            for b in buffers:
                if len(b) >= want:
                    request.append(b[:want])
                    break
                request.append(b)
                want -= len(b)
        try:
            injected = faults.next(op)
            if injected:
                raise OSError(injected, os.strerror(injected))
            done = syscall(fd, request, offset)
        except OSError as exc:
            # Named as csrc names it: one buffer goes through pread/pwrite there.
            name = operation[:-1] if len(request) == 1 else operation
            raise _os_error(exc, name, path, offset) from None
        if done == 0:
            if syscall is os.pwritev:
                # pwritev may not return 0 for a non-empty request; looping would spin.
                name = operation[:-1] if len(request) == 1 else operation
                message = f"{os.strerror(errno.EIO)} ({name} at offset {offset})"
                raise OSError(errno.EIO, message, path)
            # EOF: the file ends before this run (see csrc/file_io.cpp for `actual`).
            size = os.fstat(fd).st_size
            raise TruncatedFileError(path, required, min(offset, size))
        nbytes -= done
        offset += done
        if nbytes == 0:
            return
        # Drop what was transferred, possibly ending inside a buffer.
        i = 0
        while done >= len(buffers[i]):
            done -= len(buffers[i])
            i += 1
        buffers = [buffers[i][done:], *buffers[i + 1 :]] if done else buffers[i:]
