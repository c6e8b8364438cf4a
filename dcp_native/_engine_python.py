"""The pure-Python engine: the contract of :mod:`dcp_native.engine` with os.pwritev/os.preadv.

It is the fallback where the extension is not built, and the reference the
native engine is tested against, so it plans exactly as csrc/ does (same
validation, same call packing, hence the same read stats). The system calls
release the GIL, so a few threads still overlap I/O; memory at raw addresses
is reached through ctypes views, one per box or segment, never per byte.
Checksums go through :mod:`dcp_native._crc32c` (native when the extension
imports, which releases the GIL for large buffers).

Device memory (SRC_DEVICE segments, ReadFile.device) goes through pinned
buffers of a :class:`dcp_native._cudart.PinnedPool` and the CUDA runtime
reached with ctypes (:mod:`dcp_native._cudart`); the engine never imports
torch.cuda. Plans without device memory never look the runtime up: their path
is the one above, unchanged.
"""

from __future__ import annotations

import bisect
import collections
import ctypes
import errno
import itertools
import operator
import os
import threading
from array import array
from itertools import repeat
from typing import Callable, Sequence

from . import _cudart
from ._crc32c import crc32c, crc32c_combine
from ._errors import CheckpointError as _CheckpointError
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
    SHORT_IO_ENV,
    SRC_BLOB,
    SRC_DEVICE,
    SRC_HOST,
    CudaStatus,
    ReadFile,
    ReadStats,
    WriteFile,
    WriteStats,
    faults_from_env,
    should_merge,
)

#: Most dimensions of one box (as csrc/read_engine.hpp).
MAX_NDIM = 64
_INT64_MAX = (1 << 63) - 1
# Check items close at this many bytes or records (as csrc/read_engine.cpp).
_CHECK_ITEM_BYTES = 1 << 20
_CHECK_ITEM_RECORDS = 1024
# What _fileio.open_regular calls the files it refuses (as csrc/file_io.cpp).
_DATA_FILE = "data file"


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
        pool: _cudart.PinnedPool | None = None,
        direct_io: bool = True,
    ) -> WriteStats:
        faults = _Faults(faults_from_env())
        _check_positive("threads", threads)
        _check_positive("chunk_bytes", chunk_bytes)
        cap = _short_io_cap()
        refusal = _direct_refusal()
        paths = [os.fsdecode(f.path) for f in files]
        calls: list[_Call] = []
        views: list[list[memoryview]] = []
        written = []
        crc_items: list[list] = []
        block_crcs: list[array | None] = []
        device_files = []  # (index, host runs, device runs) of files with SRC_DEVICE segments
        for index, (path, f) in enumerate(zip(paths, files)):
            crc_block = f.crc_block
            if crc_block < 0:
                raise ValueError(f"write plan for {path}: negative crc_block {crc_block}")
            runs, file_views, total, device_runs = _collect_segments(
                path, f.blob, f.segments, crc_block > 0
            )
            views.append(file_views)
            written.append(total)
            if device_runs:
                if f.device < 0:
                    raise ValueError(
                        f"write plan for {path}: SRC_DEVICE segments need WriteFile.device >= 0, "
                        f"got {f.device}"
                    )
                device_files.append((index, runs, device_runs))
                block_crcs.append(None)
                crc_items.append([])
                continue
            _pack(runs, index, chunk_bytes, -1, calls)
            if crc_block > 0:
                out, items = _plan_block_crcs(runs, file_views, crc_block, chunk_bytes)
                block_crcs.append(out)
                crc_items.append(items)
            else:
                block_crcs.append(None)
                crc_items.append([])
        staging = None
        if device_files:
            # The runtime is looked up only now: plans without device memory never need it.
            staging = _DeviceWrites(
                files, paths, pool, direct_io, cap, refusal, faults, device_files, views,
                chunk_bytes, calls, crc_items, block_crcs,
            )

        def open_file(index: int) -> int:
            # O_NOFOLLOW, O_NONBLOCK, O_CLOEXEC and the regular-file check come with it.
            return _open_regular(paths[index], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644,
                                 faults=faults, what=_DATA_FILE)

        def run_call(fd: int, call: _Call, scratch: memoryview | None) -> None:
            buffers = call.buffers(views[call.file], None)
            path = paths[call.file]
            _transfer(os.pwritev, "pwritev", fd, buffers, call.offset, call.nbytes, path, 0, cap,
                      faults)
            if sync:
                _start_writeback(fd, call.offset, call.nbytes)

        def finish_file(index: int, fd: int) -> None:
            if staging is not None:
                staging.direct.close(index)
            if sync:
                try:
                    _os_call(faults, _FSYNC, os.fsync, "fsync", paths[index], -1, fd)
                except BaseException:
                    _close_quietly(fd)  # as csrc's FdGuard: an error path, not a hooked close
                    raise
            _os_call(faults, _CLOSE, os.close, "close", paths[index], -1, fd)

        calls = _interleave_files(calls, len(files), threads)
        work = _schedule(calls, crc_items)
        if staging is None:
            _execute(work, len(files), threads, 0, open_file, run_call, finish_file)
            return WriteStats(bytes_written=written, block_crcs=block_crcs)
        failed = True
        try:
            staging.start(work)
            _execute(work, len(files), threads, 0, open_file, run_call, finish_file,
                     staging.run_piece, staging.cancel)
            failed = False
        finally:
            staging.finish(failed)
        staging.finish_crcs(block_crcs)
        return WriteStats(bytes_written=written, block_crcs=block_crcs)

    def read(
        self,
        files: Sequence[ReadFile],
        *,
        threads: int,
        max_gap: int = DEFAULT_MAX_GAP,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        pool: _cudart.PinnedPool | None = None,
        direct_io: bool = True,
    ) -> ReadStats:
        faults = _Faults(faults_from_env())
        _check_positive("threads", threads)
        _check_positive("chunk_bytes", chunk_bytes)
        if max_gap < 0:
            raise ValueError(f"max_gap must be non-negative, got {max_gap}")
        cap = _short_io_cap()
        refusal = _direct_refusal()
        paths = [os.fsdecode(f.path) for f in files]
        calls: list[_Call] = []
        views: list[list[memoryview]] = []
        required = []
        largest_gap = 0
        check_items: list = []
        check_count = 0
        device_files = []
        for index, (path, f) in enumerate(zip(paths, files)):
            if f.min_size < 0:
                raise ValueError(f"read plan for {path}: negative min_size {f.min_size}")
            if f.device >= 0:
                if f.checks is not None:
                    raise ValueError(
                        f"read plan for {path}: checks must be None for a file read into device "
                        "memory (verify through host memory instead)"
                    )
                # Destinations are device addresses: kept as ints, never viewed; every call
                # fits one pinned buffer and reads its gaps there too.
                runs, file_views, furthest = _collect_runs(path, f.copies, device=True)
                views.append(file_views)
                required.append(max(f.min_size, furthest))
                _pack(runs, index, min(chunk_bytes, _staging_chunk(pool)), max_gap, calls)
                device_files.append(index)
                continue
            runs, file_views, furthest = _collect_runs(path, f.copies)
            views.append(file_views)
            required.append(max(f.min_size, furthest))
            largest_gap = max(largest_gap, _pack(runs, index, chunk_bytes, max_gap, calls))
            if f.checks is not None:
                check_count += _collect_checks(path, f.checks, index, check_items)

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
            buffers = call.buffers(views[call.file], scratch)
            path, needed = paths[call.file], required[call.file]
            _transfer(os.preadv, "preadv", fd, buffers, call.offset, call.nbytes, path, needed, cap,
                      faults)

        def finish_file(index: int, fd: int) -> None:
            if staging is not None:
                staging.direct.close(index)
            # Nothing read can be lost: a failed close (real or injected) is
            # ignored, as in csrc's close_read_only.
            faults.next(_CLOSE)
            _close_quietly(fd)

        staging = None
        if not device_files:
            _execute(calls, len(files), threads, largest_gap, open_file, run_call, finish_file)
        else:
            # The runtime is looked up only now: plans without device memory never need it.
            staging = _DeviceReads(files, paths, pool, direct_io, cap, refusal, faults, views,
                                   required)
            on_device = [f.device >= 0 for f in files]

            def run_any(fd: int, call: _Call, scratch: memoryview | None) -> None:
                if on_device[call.file]:
                    staging.run_call(fd, call)
                else:
                    run_call(fd, call, scratch)

            failed = True
            try:
                staging.wait_for_consumers([f.stream for f in files])
                _execute(calls, len(files), threads, largest_gap, open_file, run_any, finish_file,
                         None, staging.cancel)
                failed = False
            finally:
                staging.finish(failed)
        # Checks start once every read is done: a check may cover memory that
        # reads of several files fill.
        if check_items:
            failed = bytearray(check_count)
            tasks = [_check_task(item, failed) for item in check_items]
            _execute(tasks, 0, threads, 0, None, None, None)
            stats.failed_checks = [
                (item[0], item[2] + r)
                for item in check_items
                for r in range(len(item[3]))
                if failed[item[1] + r]
            ]
        return stats

    def cuda_status(self) -> CudaStatus:
        """Whether device memory can be used (the CUDA runtime found and resolved, a device)."""
        return _cudart.status()

    def pinned_pool(
        self,
        device: int,
        capacity: int = DEFAULT_STAGING_BYTES,
        chunk_bytes: int = DEFAULT_DEVICE_CHUNK_BYTES,
    ) -> _cudart.PinnedPool:
        """A pool of pinned buffers for the device memory of later calls (engine.PinnedPool)."""
        status = _cudart.status()
        if not status.usable:
            raise CudaError(f"CUDA is not usable: {status.reason}",
                            operation="find the CUDA runtime")
        return _cudart.PinnedPool(_cudart.runtime(), device, capacity, chunk_bytes)


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

    def buffers(self, views: list, scratch: memoryview | None) -> list:
        p = self.parts
        return [
            views[v][s : s + n] if v >= 0 else scratch[:n]
            for v, s, n in zip(p[0::3], p[1::3], p[2::3])
        ]


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


def _pack(runs: list, file: int, chunk_bytes: int, max_gap: int, calls: list) -> int:
    """Packs one file's runs into calls, appended to ``calls``; returns the largest gap.

    ``runs`` are ``(file_offset, length, view_index, view_start)`` tuples.
    This is CallBuilder (csrc/call_plan.hpp) with the merge loop of
    plan_reads (csrc/read_engine.cpp) inlined, kept decision for decision the
    same so both engines report the same stats. ``max_gap < 0`` (writes)
    never bridges gaps: only contiguous ranges share a call.
    """
    # Plain tuple order is (offset, length, ...): ties on offset go by length,
    # as in csrc, so the merge decisions do not depend on the record order.
    runs.sort()
    largest_gap = 0
    first_call = len(calls)
    parts: list | None = None  # of the open call; None when no call is open
    iovecs = 0
    call_offset = nbytes = 0
    prev_length = 0
    for offset, length, view_index, start in runs:
        if parts is not None and max_gap >= 0:
            gap = offset - call_offset - nbytes
            if (
                should_merge(prev_length, gap, length, max_gap)
                and iovecs + (2 if gap > 0 else 1) <= MAX_IOVECS
                and gap < chunk_bytes - nbytes
            ):
                if gap > 0:
                    parts += (-1, 0, gap)
                    iovecs += 1
                    nbytes += gap
                    if gap > largest_gap:
                        largest_gap = gap
            else:
                calls.append(_Call(file, call_offset, nbytes, parts))
                parts = None
        prev_length = length
        while length > 0:
            if parts is not None and (
                iovecs == MAX_IOVECS or nbytes == chunk_bytes or call_offset + nbytes != offset
            ):
                calls.append(_Call(file, call_offset, nbytes, parts))
                parts = None
            if parts is None:
                parts, iovecs, call_offset, nbytes = [], 0, offset, 0
            take = chunk_bytes - nbytes
            if take > length:
                take = length
            parts += (view_index, start, take)
            iovecs += 1
            nbytes += take
            offset += take
            start += take
            length -= take
    if parts is not None:
        calls.append(_Call(file, call_offset, nbytes, parts))
    if len(calls) == first_call:
        # Nothing to move: the call still opens the file (creates it for
        # writes, checks its size for reads).
        calls.append(_Call(file, 0, 0, []))
    return largest_gap


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _short_io_cap() -> int:
    value = os.environ.get(SHORT_IO_ENV, "")
    if not value:
        return 0
    # Digits only, as csrc/file_io.cpp: int() would also take signs, spaces and "_".
    if not (value.isascii() and value.isdigit()) or int(value) > _INT64_MAX:
        raise ValueError(f"{SHORT_IO_ENV}={value} is not a non-negative integer")
    return int(value)


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


def _collect_segments(path: str, blob, segments, contiguous: bool) -> tuple[list, list, int, list]:
    """Validates a file's segments; returns the non-empty host ones as runs for :func:`_pack`,
    their views, the total length, and the non-empty SRC_DEVICE ones as ``(file_offset, length,
    -1, device_address)``. ``contiguous``: the runs must cover the file without holes (files with
    block CRCs)."""
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
    device: list = []
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
            if source < 0 or source + length > _INT64_MAX or (source == 0 and length > 0):
                raise ValueError(
                    f"write plan for {path}: segment {i // 4}: device address {source} is invalid"
                )
            if length:
                device.append((offset, length, -1, source))
        else:
            raise ValueError(f"write plan for {path}: segment {i // 4}: unknown source kind {kind}")
        total += length
    runs.sort()
    covered = 0  # end of the previous run
    for run in sorted(runs + device) if device else runs:
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
    return runs, views, total, device


def _collect_runs(path: str, copies, device: bool = False) -> tuple[list, list, int]:
    """Validates a file's box records; returns its runs for :func:`_pack`, one view per box (with
    ``device``, the box's device address instead), and the end offset of the furthest run."""
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
        views.append(dest if device else _host_view(dest, dest_span))
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


class _CrcItem:
    """The CRCs of ``count`` blocks of a file from block ``first`` (csrc's CrcItem).

    ``runs`` are the file's sorted runs (``_pack``'s tuples), which cover it
    without holes; ``run`` is the index of the one holding the first byte.
    """

    __slots__ = ("start", "first", "count", "run", "runs", "views", "block", "size", "out")

    def __init__(self, first, count, run, runs, views, block, size, out) -> None:
        self.start = first * block
        self.first = first
        self.count = count
        self.run = run
        self.runs = runs
        self.views = views
        self.block = block
        self.size = size
        self.out = out

    def __call__(self) -> None:
        runs, views, block, size, out = self.runs, self.views, self.block, self.size, self.out
        r = self.run
        offset, length, view, start = runs[r]
        pos = self.start
        for b in range(self.first, self.first + self.count):
            end = min(pos + block, size)
            crc = 0
            while pos < end:
                run_end = offset + length
                take = min(end, run_end) - pos
                s = start + pos - offset
                crc = crc32c(views[view][s : s + take], crc)
                pos += take
                if pos == run_end and pos < size:
                    r += 1
                    offset, length, view, start = runs[r]
            out[b] = crc


def _plan_block_crcs(runs: list, views: list, block: int, chunk_bytes: int) -> tuple:
    """A file's CRC output array and its items of whole blocks, about chunk_bytes each."""
    size = runs[-1][0] + runs[-1][1] if runs else 0
    blocks = -(-size // block)
    out = array("I", bytes(4 * blocks))
    per_item = max(1, chunk_bytes // block)
    items = []
    r = 0
    for first in range(0, blocks, per_item):
        start = first * block
        while runs[r][0] + runs[r][1] <= start:
            r += 1
        count = min(per_item, blocks - first)
        items.append(_CrcItem(first, count, r, runs, views, block, size, out))
    return out, items


def _schedule(calls: list, crc_items: list) -> list:
    """Each file's CRC items right after the write call covering their first byte (csrc's
    schedule), then whatever is left."""
    if not any(crc_items):
        return calls
    nexts = [0] * len(crc_items)
    work: list = []
    for call in calls:
        work.append(call)
        items, i = crc_items[call.file], nexts[call.file]
        end = call.offset + call.nbytes
        while i < len(items) and items[i].start < end:
            work.append(items[i])
            i += 1
        nexts[call.file] = i
    for items, i in zip(crc_items, nexts):
        work.extend(items[i:])
    return work


def _collect_checks(path: str, checks, file: int, items: list) -> int:
    """Validates a file's check records and appends their items (csrc's CheckItem) as
    ``(file, number of the first record in the call, its ordinal in the file, records)``,
    each record ``(expected_crc, [address, length, ...])``; returns the number of records."""

    def bad(at: int, why: str):
        raise ValueError(f"read plan for {path}: check record at index {at}: {why}")

    values = _int64_values(checks, "checks")
    n = len(values)
    first = sum(len(item[3]) for item in items)  # records so far in the call
    if _single_pieces_valid(values):
        # Every record checks one piece (blocks read whole): no loop per record.
        pieces = list(zip(values[2::4], values[3::4]))
        records = list(zip(values[0::4], pieces))
        count = len(records)
        ends = list(itertools.accumulate(values[3::4]))
        start = 0
        while start < count:
            # Up to the record that brings the item to _CHECK_ITEM_BYTES, or _CHECK_ITEM_RECORDS.
            base = ends[start - 1] if start else 0
            stop = min(bisect.bisect_left(ends, base + _CHECK_ITEM_BYTES, start) + 1,
                       start + _CHECK_ITEM_RECORDS, count)
            items.append((file, first + start, start, records[start:stop]))
            start = stop
        return count
    records = []
    item_bytes = 0
    ordinal = 0
    pos = 0
    while pos < n:
        if n - pos < 2:
            bad(pos, f"truncated header (need 2 values, {n - pos} left)")
        expected, pieces = values[pos], values[pos + 1]
        if not 0 <= expected <= 0xFFFFFFFF:
            bad(pos, f"expected CRC {expected} is outside [0, 2**32)")
        if pieces < 0:
            bad(pos, f"negative piece count {pieces}")
        end = pos + 2 + 2 * pieces
        if end > n:
            bad(pos, f"truncated: {pieces} pieces need {2 * pieces} more values")
        flat = values[pos + 2 : end]
        for i in range(0, 2 * pieces, 2):
            address, length = flat[i], flat[i + 1]
            if address < 0 or length < 0 or address + length > _INT64_MAX:
                bad(pos, f"piece {i // 2} has a negative or overflowing memory range")
            if address == 0 and length > 0:
                bad(pos, f"piece {i // 2} has a null address")
            item_bytes += length
        pos = end
        records.append((expected, flat))
        if item_bytes >= _CHECK_ITEM_BYTES or len(records) == _CHECK_ITEM_RECORDS:
            items.append((file, first, ordinal, records))
            first += len(records)
            ordinal += len(records)
            records, item_bytes = [], 0
    if records:
        items.append((file, first, ordinal, records))
    return ordinal + len(records)


def _single_pieces_valid(values: list) -> bool:
    """Whether ``values`` are valid records of one piece each, checked with C-level scans."""
    n = len(values)
    if n == 0 or n % 4 or values[1::4].count(1) != n // 4:
        return False
    expected, addresses, lengths = values[0::4], values[2::4], values[3::4]
    return (
        min(expected) >= 0
        and max(expected) <= 0xFFFFFFFF
        and min(addresses) > 0  # null addresses (allowed for empty pieces) take the slow path
        and min(lengths) >= 0
        and max(map(operator.add, addresses, lengths)) <= _INT64_MAX
    )


def _check_task(item: tuple, failed: bytearray) -> Callable[[], None]:
    """Runs one item's checks, setting failed[record] for each mismatch."""

    def run() -> None:
        first, records = item[1], item[3]
        # Pieces that follow each other in memory (a tensor checked block by
        # block) share one view [low, high): a ctypes view costs far more than
        # a slice.
        low = high = -1
        view = None
        for r, (expected, flat) in enumerate(records):
            crc = 0
            for i in range(0, len(flat), 2):
                address, length = flat[i], flat[i + 1]
                if not length:
                    continue
                if address < low or address + length > high:
                    (low, high), view = _contiguous_span(flat, i, records, r)
                crc = crc32c(view[address - low : address - low + length], crc)
            if crc != expected:
                failed[first + r] = 1

    return run


def _contiguous_span(flat: list, i: int, records: list, r: int) -> tuple:
    """The memory from piece ``i`` of record ``r`` through every later piece that starts
    where the one before it ends, and a view of it."""
    start = end = flat[i]
    for _, pieces in itertools.chain([(None, flat[i:])], records[r + 1 :]):
        for k in range(0, len(pieces), 2):
            address, length = pieces[k], pieces[k + 1]
            if not length:
                continue
            if address != end:
                return (start, end), _host_view(start, end - start)
            end += length
    return (start, end), _host_view(start, end - start)


# --------------------------------------------------------------------------- device memory


class _DevicePiece:
    """At most ``pool.chunk_bytes`` of a SRC_DEVICE segment: ``nbytes`` device bytes at
    ``source``, copied into a pinned buffer and written at ``offset`` of file ``file``.
    ``index`` is its place in the order copies are issued (the order workers take pieces)."""

    __slots__ = ("file", "offset", "nbytes", "source", "index")

    def __init__(self, file: int, offset: int, nbytes: int, source: int) -> None:
        self.file = file
        self.offset = offset
        self.nbytes = nbytes
        self.source = source
        self.index = -1


class _Cancelled(Exception):
    """Raised in a worker waiting for a pinned buffer when another worker has failed (the
    first error is the one the call raises)."""


def _staging_chunk(pool) -> int:
    """The largest piece one pinned buffer of ``pool`` (or of a call's temporary pool) holds."""
    if pool is None:
        return _cudart.buffer_bytes(DEFAULT_STAGING_BYTES, DEFAULT_DEVICE_CHUNK_BYTES)
    if not isinstance(pool, _cudart.PinnedPool):
        raise TypeError(
            f"pool must come from the python engine's pinned_pool(), got {type(pool).__name__}"
        )
    return pool.chunk_bytes


#: Test hook: DCP_NATIVE_TEST_NO_DIRECT=open|transfer makes the O_DIRECT open, or the first
#: O_DIRECT transfer of each file, fail with EINVAL as a filesystem without O_DIRECT does
#: (as csrc/direct_io.hpp).
NO_DIRECT_ENV = "DCP_NATIVE_TEST_NO_DIRECT"
# Bytes this process moved with O_DIRECT (tests: evidence the direct path ran, or did not).
_direct_bytes = [0]
_direct_bytes_lock = threading.Lock()


def _direct_io_bytes() -> int:
    """Bytes the Python engine moved with O_DIRECT in this process so far (tests)."""
    return _direct_bytes[0]


def _direct_refusal() -> str:
    value = os.environ.get(NO_DIRECT_ENV, "")
    if value not in ("", "open", "transfer"):
        raise ValueError(f"{NO_DIRECT_ENV}={value} is not one of open, transfer")
    return value


class _DirectFiles:
    """O_DIRECT descriptors of one call's files, opened on first use beside the normal ones, for
    the pieces that go through pinned buffers (page-aligned, so they can move in place). A
    filesystem that refuses O_DIRECT (EINVAL at open or at the first transfer) gets buffered I/O,
    silently. A refused descriptor stays open until the file is done: another thread may be
    using it."""

    def __init__(self, paths: list, flags: int, enabled: bool, cap: int, refusal: str) -> None:
        self.paths = paths
        self.flags = flags | getattr(os, "O_DIRECT", 0)  # open_regular adds O_CLOEXEC
        # DCP_NATIVE_TEST_SHORT_IO would resume transfers at unaligned offsets.
        self.enabled = enabled and hasattr(os, "O_DIRECT") and cap % _cudart.PAGE == 0
        self.refusal = refusal
        count = len(paths)
        self.fds: list[int] = [-1] * count
        self.state = [0] * count  # 0: not tried, 1: open, 2: unavailable
        self.proven = [False] * count  # a transfer worked: a later EINVAL is a real error
        self.refused_transfer = [False] * count
        self.lock = threading.Lock()

    def fd(self, index: int) -> int:
        """The file's O_DIRECT descriptor, or -1 when it cannot use one."""
        if self.state[index] == 0:
            with self.lock:
                if self.state[index] == 0:
                    # Threads that find state 0 wait here for the outcome.
                    state = 2
                    if self.refusal != "open":
                        path = self.paths[index]
                        try:
                            # Not a counted open (as in csrc/direct_io.cpp).
                            self.fds[index] = _open_regular(path, self.flags, what=_DATA_FILE)
                            state = 1
                        except _CheckpointError:
                            raise
                        except OSError as exc:
                            if exc.errno != errno.EINVAL:
                                # open_regular names the operation "open"; say which open.
                                plain = OSError(exc.errno, os.strerror(exc.errno or 0))
                                raise _os_error(plain, "open (O_DIRECT)", path, -1) from None
                    self.state[index] = state
        return self.fds[index] if self.state[index] == 1 else -1

    def close(self, index: int) -> None:
        """Closes the file's O_DIRECT descriptor (its last piece is done)."""
        with self.lock:
            fd, self.fds[index] = self.fds[index], -1
            self.state[index] = 2
        if fd >= 0:
            _close_quietly(fd)  # its data is in the file; fsync goes through the other one

    def close_all(self) -> None:
        for index in range(len(self.fds)):
            self.close(index)

    def transfer(self, syscall, operation: str, fd: int, index: int, view: memoryview,
                 offset: int, nbytes: int, required: int, cap: int, faults: _Faults) -> None:
        """Moves ``view[:nbytes]`` at ``offset``: its whole pages through O_DIRECT where the
        offset is page-aligned and the file takes it, the rest buffered."""
        path = self.paths[index]
        direct = nbytes // _cudart.PAGE * _cudart.PAGE
        if direct and self.enabled and offset % _cudart.PAGE == 0:
            direct_fd = self.fd(index)
            if direct_fd < 0 or not self._direct(syscall, operation, direct_fd, index, view,
                                                  offset, direct, required, cap, faults):
                direct = 0
        else:
            direct = 0
        if direct < nbytes:
            _transfer(syscall, operation, fd, [view[direct:nbytes]], offset + direct,
                      nbytes - direct, path, required, cap, faults)

    def _direct(self, syscall, operation, fd, index, view, offset, nbytes, required, cap,
                faults) -> bool:
        first = not self.proven[index]
        try:
            if self.refusal == "transfer" and not self.refused_transfer[index]:
                with self.lock:
                    refuse = not self.refused_transfer[index]
                    self.refused_transfer[index] = True
                if refuse:
                    name = "pwrite (O_DIRECT)" if syscall is os.pwritev else "pread (O_DIRECT)"
                    raise _os_error(OSError(errno.EINVAL, os.strerror(errno.EINVAL)), name,
                                    self.paths[index], offset)
            _transfer(syscall, operation, fd, [view[:nbytes]], offset, nbytes,
                      self.paths[index], required, cap, faults)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not first:
                raise
            with self.lock:
                self.state[index] = 2
            return False
        self.proven[index] = True
        with _direct_bytes_lock:
            _direct_bytes[0] += nbytes
        return True


class _Staging:
    """One engine call's device state: the runtime, the pinned pool (the caller's, or a
    temporary one closed at the end), events, the copy streams used, O_DIRECT descriptors and
    the pinned buffers the call holds.

    Every runtime call is preceded by cudaSetDevice on its thread (worker threads start on
    device 0); the caller's thread gets its device back at the end, since torch keeps using it.
    """

    def __init__(self, pool, device: int, paths: list, flags: int, direct_io: bool,
                 cap: int, refusal: str) -> None:
        chunk = _staging_chunk(pool)  # TypeError for a foreign pool before anything else
        self.rt = _cudart.runtime()
        if pool is None:
            pool = _cudart.PinnedPool(self.rt, device, DEFAULT_STAGING_BYTES,
                                      DEFAULT_DEVICE_CHUNK_BYTES)
            self.temporary = True
        else:
            self.temporary = False
        pool.use()  # ValueError for a closed pool; close() refuses until finish()
        try:
            self.caller_device = self.rt.get_device()
        except BaseException:
            pool.unuse()
            raise
        self.pool = pool
        self.chunk = chunk
        self.paths = paths
        self.direct = _DirectFiles(paths, flags, direct_io, cap, refusal)
        self.cancelled = False
        self.lock = threading.Lock()
        self.free_events: dict[int, list[int]] = {}
        self.events: list[int] = []  # every event the call created
        self.streams: dict[int, int] = {}  # device -> copy stream the call used
        # Reads: (buffer, event, device, what) of copies issued and not yet waited for.
        self.inflight: collections.deque = collections.deque()
        # Buffers whose copies may still run: released after the streams are synchronized.
        self.dirty: list = []

    def cancel(self) -> None:
        """Another worker failed: wake and stop the ones waiting for buffers."""
        with self.pool.condition:
            self.cancelled = True
            self.pool.condition.notify_all()

    def stream(self, device: int) -> int:
        """The copy stream of ``device`` (this thread's device must be ``device``)."""
        stream = self.streams.get(device)
        if stream is None:
            stream = self.streams[device] = self.rt.copy_stream(device)
        return stream

    def event(self, device: int, what: str) -> int:
        """A free event of this call on ``device`` (this thread's device)."""
        with self.lock:
            free = self.free_events.get(device)
            if free:
                return free.pop()
        event = self.rt.event_create(what)
        with self.lock:
            self.events.append(event)
        return event

    def give_event(self, device: int, event: int) -> None:
        with self.lock:
            self.free_events.setdefault(device, []).append(event)

    def acquire(self, needless: Callable[[], bool] | None = None) -> _cudart.PinnedBuffer | None:
        """A pinned buffer: a free one, a new one while the pool has room, the oldest one whose
        copy is in flight once that copy completes, or else the next one released. None once
        ``needless()`` is true (checked under the pool's condition, which whoever makes it
        true must notify)."""
        pool = self.pool
        while True:
            entry = None
            with pool.condition:
                if self.cancelled:
                    raise _Cancelled
                if needless is not None and needless():
                    return None
                buffer = pool.take_locked()
                if buffer is None:
                    if not self.inflight:
                        pool.condition.wait()
                        continue
                    entry = self.inflight.popleft()
            if buffer is _cudart.ALLOCATE:
                return pool.allocate()
            if buffer is not None:
                return buffer
            return self.retire(entry)

    def try_acquire(self) -> _cudart.PinnedBuffer | None:
        """A free or new pinned buffer, or None without waiting."""
        with self.pool.condition:
            if self.cancelled:
                return None
            buffer = self.pool.take_locked()
        return self.pool.allocate() if buffer is _cudart.ALLOCATE else buffer

    def push(self, entry: tuple) -> None:
        """A buffer whose copies are queued, with the event recorded after them."""
        with self.pool.condition:
            self.inflight.append(entry)
            self.pool.condition.notify_all()

    def retire(self, entry: tuple) -> _cudart.PinnedBuffer:
        """Waits for an in-flight buffer's copies; returns the buffer, free to reuse."""
        buffer, event, device, what = entry
        try:
            self.rt.set_device(device)
            self.rt.event_synchronize(event, what)
        except BaseException:
            with self.lock:
                self.dirty.append(buffer)
            raise
        self.give_event(device, event)
        return buffer

    def add_dirty(self, buffer) -> None:
        with self.lock:
            self.dirty.append(buffer)

    def finish(self, failed: bool) -> None:
        """Waits for every copy of the call, gives its buffers back, frees its events, restores
        the caller's device, closes a temporary pool and O_DIRECT descriptors. Raises the first
        CUDA error unless the call failed already (then that error is the one raised)."""
        rt = self.rt
        error: BaseException | None = None
        try:
            self.direct.close_all()
            while self.inflight:
                entry = self.inflight.popleft()
                try:
                    self.pool.release(self.retire(entry))
                except CudaError as exc:
                    error = error or exc
            for device, stream in self.streams.items():
                try:
                    rt.set_device(device)
                    rt.stream_synchronize(
                        stream, f"cudaStreamSynchronize of the copy stream of device {device}"
                    )
                except CudaError as exc:
                    error = error or exc
            for buffer in self.dirty:
                self.pool.release(buffer)
            self.dirty.clear()
            for event in self.events:
                rt.event_destroy(event)
            self.events.clear()
            try:
                rt.set_device(self.caller_device)
            except CudaError as exc:
                error = error or exc
        finally:
            self.pool.unuse()
            if self.temporary:
                self.pool.close()
        if error is not None and not failed:
            raise error


class _DeviceWrites(_Staging):
    """The SRC_DEVICE pieces of one write call (see "Device memory" in engine.py).

    Copies are issued in the order workers take the pieces, as far ahead as the pool has
    buffers: a worker that takes piece k waits for its event, writes it and computes its
    block CRCs while the copies of the next pieces run, then gives the buffer back, which
    issues the next copy. A worker waits for a buffer only while the piece it took is not
    issued, holding no lock, and stops waiting as soon as another worker issues it; then every
    issued piece is before its own in the work order, taken by a worker that needs neither a
    buffer nor a lock held by a waiter to finish it and give its buffer back: so the workers
    always progress. (Issuing happens under a lock never held while waiting: a worker waiting
    under it would block the worker of the piece it had just issued.)
    """

    def __init__(self, files, paths, pool, direct_io, cap, refusal, faults, device_files, views,
                 chunk_bytes, calls, crc_items, block_crcs) -> None:
        super().__init__(pool, files[device_files[0][0]].device, paths, os.O_WRONLY, direct_io,
                         cap, refusal)
        self.faults = faults
        self.cap = cap
        self.devices = [f.device for f in files]
        self.streams_of = [f.stream for f in files]
        self.crcs: dict[int, _BlockCrcs] = {}
        self.pieces: list[_DevicePiece] = []
        self.slots: list = []
        self.next_issue = 0
        self.issue_lock = threading.Lock()
        try:
            self._plan(files, device_files, views, chunk_bytes, calls, crc_items, block_crcs)
        except BaseException:
            self.finish(True)  # the pool is released before the error goes up
            raise

    def _plan(self, files, device_files, views, chunk_bytes, calls, crc_items,
              block_crcs) -> None:
        """The device pieces and the host calls of the files with device memory, and their
        block CRC work."""
        chunk = self.chunk
        for index, runs, device_runs in device_files:
            file_calls: list = []
            if runs:
                _pack(runs, index, chunk_bytes, -1, file_calls)
            for offset, length, _, source in device_runs:
                for start in range(0, length, chunk):
                    file_calls.append(
                        _DevicePiece(index, offset + start, min(chunk, length - start),
                                     source + start)
                    )
            file_calls.sort(key=operator.attrgetter("offset"))
            calls.extend(file_calls)
            block = files[index].crc_block
            if block > 0:
                crcs = self.crcs[index] = _BlockCrcs(runs, device_runs, block)
                crc_items[index] = crcs.host_items(runs, views[index], chunk_bytes)
                block_crcs[index] = crcs.out

    def start(self, work: list) -> None:
        """Numbers the pieces in work order, makes the copy streams wait for the producers'
        streams, and issues the first copies."""
        for item in work:
            if type(item) is _DevicePiece:
                item.index = len(self.pieces)
                self.pieces.append(item)
        self.slots = [None] * len(self.pieces)
        rt = self.rt
        waited = set()
        for piece in self.pieces:
            device, producer = self.devices[piece.file], self.streams_of[piece.file]
            if (device, producer) in waited:
                continue
            waited.add((device, producer))
            # Work queued on the producer's stream before this call (the kernels
            # that wrote the memory) completes before the first copy.
            where = (f"the producer stream {producer:#x} of device {device} "
                     f"(writing {self.paths[piece.file]})")
            rt.set_device(device)
            stream = self.stream(device)
            # Not given back to the call's free events: the wait refers to it.
            event = self.event(device, f"cudaEventCreateWithFlags for {where}")
            rt.event_record(event, producer, f"cudaEventRecord on {where}")
            rt.stream_wait_event(stream, event,
                                 f"cudaStreamWaitEvent of the copy stream on {where}")
        self.pump()

    def _issue(self, buffer: _cudart.PinnedBuffer) -> None:
        """Queues the copy of the next piece into ``buffer`` (the issue lock held)."""
        i = self.next_issue
        piece = self.pieces[i]
        device = self.devices[piece.file]
        path = self.paths[piece.file]
        rt = self.rt
        try:
            rt.set_device(device)
            stream = self.stream(device)
            event = self.event(device, f"cudaEventCreateWithFlags for the D2H copy of {path}")
        except BaseException:
            self.pool.release(buffer)
            raise
        try:
            rt.memcpy_async(buffer.address, piece.source, piece.nbytes, _cudart.DEVICE_TO_HOST,
                            stream, _d2h_operation(path, piece, device))
            rt.event_record(
                event, stream,
                f"cudaEventRecord after the D2H copy of {path} at offset {piece.offset}",
            )
        except BaseException:
            self.add_dirty(buffer)  # an earlier copy may still be running into it
            raise
        self.slots[i] = (buffer, event)
        with self.pool.condition:
            self.next_issue = i + 1
            # The worker of this piece may be waiting for a buffer to issue it.
            self.pool.condition.notify_all()

    def pump(self) -> None:
        """Issues copies while the pool has a buffer free, without waiting."""
        with self.issue_lock:
            while self.next_issue < len(self.pieces):
                buffer = self.try_acquire()
                if buffer is None:
                    return
                self._issue(buffer)

    def run_piece(self, fd: int, piece: _DevicePiece) -> None:
        i = piece.index
        while self.next_issue <= i:
            # Waiting for a buffer holds no lock, and ends when another worker has issued the
            # piece: the workers of issued pieces must go on and release theirs (class docs).
            buffer = self.acquire(lambda: self.next_issue > i)
            if buffer is None:
                break
            with self.issue_lock:
                if self.next_issue < len(self.pieces):
                    self._issue(buffer)
                    continue
            self.pool.release(buffer)
        buffer, event = self.slots[i]
        device = self.devices[piece.file]
        path = self.paths[piece.file]
        self.rt.set_device(device)
        # A failed copy leaves its buffer in the slot: finish() releases it after the streams.
        self.rt.event_synchronize(
            event, f"cudaEventSynchronize after the {_d2h_operation(path, piece, device)}"
        )
        self.slots[i] = None
        try:
            self.direct.transfer(os.pwritev, "pwritev", fd, piece.file, buffer.view,
                                 piece.offset, piece.nbytes, 0, self.cap, self.faults)
            crcs = self.crcs.get(piece.file)
            if crcs is not None:
                crcs.feed(piece.offset, (buffer.view[: piece.nbytes],))
        finally:
            self.give_event(device, event)
            self.pool.release(buffer)
        self.pump()

    def finish(self, failed: bool) -> None:
        for slot in self.slots:
            if slot is not None:
                self.add_dirty(slot[0])
        self.slots = []
        super().finish(failed)

    def finish_crcs(self, block_crcs: list) -> None:
        for crcs in self.crcs.values():
            crcs.finish()


class _DeviceReads(_Staging):
    """The files of one read call whose destinations are device memory.

    Each call of such a file is read (preadv) into a pinned buffer, then copied to the device
    (cudaMemcpy2DAsync for runs of equal length at regular strides, cudaMemcpyAsync for the
    others), and an event is recorded after the copies; the buffer is waited for only when
    a later read needs it, so the reads of later pieces overlap the copies of earlier ones.
    """

    def __init__(self, files, paths, pool, direct_io, cap, refusal, faults, views,
                 required) -> None:
        first = next(f.device for f in files if f.device >= 0)
        super().__init__(pool, first, paths, os.O_RDONLY, direct_io, cap, refusal)
        self.faults = faults
        self.cap = cap
        self.devices = [f.device for f in files]
        self.views = views
        self.required = required

    def wait_for_consumers(self, streams: list) -> None:
        """Makes the copy streams wait for the work queued so far on the consumers' streams
        (kernels still writing the destinations), before any copy writes them."""
        rt = self.rt
        for device, consumer in sorted({(d, s) for d, s in zip(self.devices, streams) if d >= 0}):
            where = f"the consumer stream {consumer:#x} of device {device}"
            rt.set_device(device)
            stream = self.stream(device)
            # Not given back to the call's free events: the wait refers to it.
            event = self.event(device, f"cudaEventCreateWithFlags for {where}")
            rt.event_record(event, consumer, f"cudaEventRecord on {where}")
            rt.stream_wait_event(stream, event, f"cudaStreamWaitEvent of the copy stream on {where}")

    def run_call(self, fd: int, call: _Call) -> None:
        index = call.file
        path = self.paths[index]
        buffer = self.acquire()
        queued = False
        try:
            self.direct.transfer(os.preadv, "preadv", fd, index, buffer.view, call.offset,
                                 call.nbytes, self.required[index], self.cap, self.faults)
            device = self.devices[index]
            rt = self.rt
            rt.set_device(device)
            stream = self.stream(device)
            queued = True
            _copy_to_device(rt, stream, buffer.address, call, self.views[index], path, device)
            event = self.event(device, f"cudaEventCreateWithFlags for the H2D copies of {path}")
            rt.event_record(
                event, stream,
                f"cudaEventRecord after the H2D copies of {path} at offset {call.offset}",
            )
            what = f"cudaEventSynchronize after the H2D copies of {path} to device {device}"
        except BaseException:
            if queued:
                self.add_dirty(buffer)
            else:
                self.pool.release(buffer)
            raise
        self.push((buffer, event, device, what))


#: Largest pitch cudaMemcpy2DAsync takes on current GPUs (cudaDevAttrMaxPitch).
_MAX_PITCH = (1 << 31) - 1


def _copy_to_device(rt, stream: int, host: int, call: _Call, boxes: list, path: str,
                    device: int) -> None:
    """Queues the copies of one call's runs from its pinned buffer at ``host`` (the call's file
    bytes from ``call.offset``) to their device destinations. A series of runs of one box with
    equal lengths at constant strides in the buffer and on the device is one copy: 2-D, or 1-D
    when the runs are dense at both ends."""
    p = call.parts
    runs = []  # (buffer position, device address, length, box)
    pos = 0
    for v, s, n in zip(p[0::3], p[1::3], p[2::3]):
        if v >= 0:
            runs.append((pos, boxes[v] + s, n, v))
        pos += n
    i = 0
    count = len(runs)
    while i < count:
        pos, dest, width, box = runs[i]
        j = i + 1
        if j < count and runs[j][2] == width and runs[j][3] == box:
            spitch = runs[j][0] - pos
            dpitch = runs[j][1] - dest
            if width <= spitch <= _MAX_PITCH and width <= dpitch <= _MAX_PITCH:
                while (
                    j < count
                    and runs[j][2] == width
                    and runs[j][3] == box
                    and runs[j][0] - runs[j - 1][0] == spitch
                    and runs[j][1] - runs[j - 1][1] == dpitch
                ):
                    j += 1
        rows = j - i
        where = f" of {path} at offset {call.offset + pos} to device {device} address {dest:#x}"
        if rows == 1 or (spitch == width and dpitch == width):
            rt.memcpy_async(dest, host + pos, width * rows, _cudart.HOST_TO_DEVICE, stream,
                            f"cudaMemcpyAsync H2D{where} ({width * rows} bytes)")
        else:
            rt.memcpy_2d_async(dest, dpitch, host + pos, spitch, width, rows,
                               _cudart.HOST_TO_DEVICE, stream,
                               f"cudaMemcpy2DAsync H2D{where} ({rows} rows of {width} bytes)")
        i = j


def _d2h_operation(path: str, piece: _DevicePiece, device: int) -> str:
    return (
        f"cudaMemcpyAsync D2H of {path} at offset {piece.offset} ({piece.nbytes} bytes from "
        f"device {device} address {piece.source:#x})"
    )


class _BlockCrcs:
    """Block CRCs of a file whose bytes are checksummed range by range, where a block may
    straddle ranges: device pieces are checksummed from their pinned copies, which are reused
    as soon as they are written, and host bytes by work items of whole blocks. A block inside
    one range gets its CRC there; a straddling one collects the CRCs of its fragments, combined
    at the end (crc32c_combine)."""

    def __init__(self, runs: list, device_runs: list, block: int) -> None:
        ends = [r[0] + r[1] for r in runs] + [r[0] + r[1] for r in device_runs]
        self.size = max(ends, default=0)
        self.block = block
        self.out = array("I", bytes(4 * -(-self.size // block)))
        self.partials: dict[int, list] = {}

    def host_items(self, runs: list, views: list, chunk_bytes: int) -> list:
        """Work items for the host runs (sorted): whole blocks of about chunk_bytes each within
        every stretch of contiguous runs, in file order."""
        items = []
        block = self.block
        per_item = max(1, chunk_bytes // block) * block
        i = 0
        while i < len(runs):
            # One stretch of contiguous runs [start, end).
            start = runs[i][0]
            j = i
            end = runs[i][0] + runs[i][1]
            while j + 1 < len(runs) and runs[j + 1][0] == end:
                j += 1
                end = runs[j][0] + runs[j][1]
            pos = start
            r = i
            while pos < end:
                stop = min(end, (pos // block * block) + per_item)
                while runs[r][0] + runs[r][1] <= pos:
                    r += 1
                items.append(_HostCrcItem(self, pos, stop, r, runs, views))
                pos = stop
            i = j + 1
        return items

    def feed(self, start: int, chunks) -> None:
        """The CRCs of the blocks that file bytes from ``start`` on, given as consecutive
        buffers, touch."""
        block, size, out = self.block, self.size, self.out
        b = start // block
        fragment = pos = start
        block_end = min((b + 1) * block, size)
        crc = 0
        for chunk in chunks:
            n = len(chunk)
            i = 0
            while i < n:
                take = min(n - i, block_end - pos)
                crc = crc32c(chunk[i : i + take], crc)
                i += take
                pos += take
                if pos == block_end:
                    if fragment == b * block:
                        out[b] = crc
                    else:
                        self.partials.setdefault(b, []).append((fragment, crc, pos - fragment))
                    b += 1
                    fragment = pos
                    block_end = min(pos + block, size)
                    crc = 0
        if pos > fragment:
            self.partials.setdefault(b, []).append((fragment, crc, pos - fragment))

    def finish(self) -> None:
        for b, parts in self.partials.items():
            parts.sort()
            crc = parts[0][1]
            for _, fragment_crc, length in parts[1:]:
                crc = crc32c_combine(crc, fragment_crc, length)
            self.out[b] = crc
        self.partials.clear()


class _HostCrcItem:
    """Block CRCs of the host bytes ``[start, end)`` of a file with device pieces."""

    __slots__ = ("crcs", "start", "end", "run", "runs", "views")

    def __init__(self, crcs: _BlockCrcs, start: int, end: int, run: int, runs: list,
                 views: list) -> None:
        self.crcs = crcs
        self.start = start
        self.end = end
        self.run = run
        self.runs = runs
        self.views = views

    def __call__(self) -> None:
        self.crcs.feed(self.start, self._chunks())

    def _chunks(self):
        pos, end, runs, views = self.start, self.end, self.runs, self.views
        r = self.run
        while pos < end:
            offset, length, view, start = runs[r]
            take = min(end, offset + length) - pos
            s = start + pos - offset
            yield views[view][s : s + take]
            pos += take
            r += 1


# --------------------------------------------------------------------------- execution


def _execute(
    work: list,
    file_count: int,
    threads: int,
    scratch_bytes: int,
    open_file: Callable[[int], int] | None,
    run_call: Callable[[int, _Call, "memoryview | None"], None] | None,
    finish_file: Callable[[int, int], None] | None,
    run_piece: Callable[[int, "_DevicePiece"], None] | None = None,
    on_error: Callable[[], None] | None = None,
) -> None:
    """Runs the work on up to ``threads`` threads (the caller is one of them).

    ``work`` holds calls, device pieces (run by ``run_piece``) and plain
    callables (checksum work), in the order the threads take them. A file is
    opened by the first call or piece that needs it and finished (synced,
    closed) by whichever thread completes its last one, so few descriptors are
    open at once. The first error stops the other threads (``on_error`` wakes
    those waiting for pinned buffers) and is raised here, after every
    descriptor is closed.
    """
    pieces = [0] * file_count
    for call in work:
        if type(call) is _Call or type(call) is _DevicePiece:
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
            first = state["error"] is None
            if first:
                state["error"] = exc
        if first and on_error is not None:
            on_error()

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
                kind = type(call)
                if kind is not _Call and kind is not _DevicePiece:
                    call()
                    continue
                fd = acquire(call.file)
                if kind is _DevicePiece:
                    run_piece(fd, call)
                elif call.parts:
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
