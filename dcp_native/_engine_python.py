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
from typing import Callable, Sequence

from . import _fileio, config
from ._engine_python_plan import (
    HOST_ONLY,
    Call,
    Table,
    check_table,
    checksum_range,
    collect_runs,
    collect_segments,
    compare,
    interleave_files,
    join_pieces,
    pack,
)
from ._errors import CudaError, TruncatedFileError
from .engine import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_DEVICE_CHUNK_BYTES,
    DEFAULT_MAX_GAP,
    DEFAULT_STAGING_BYTES,
    CudaStatus,
    ReadFile,
    ReadStats,
    WriteFile,
    WriteStats,
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
        faults, cap, portable, paths = _begin(files, threads, chunk_bytes, pool)
        calls: list[Call] = []
        views: list[list[memoryview]] = []
        written = []
        tables: list = []  # per file: its block grid, or None
        pieces: list[list] = [[] for _ in files]  # per file: the pieces of blocks its calls share
        for index, (path, f) in enumerate(zip(paths, files)):
            crc_block = f.crc_block
            if crc_block < 0:
                raise ValueError(f"write plan for {path}: negative crc_block {crc_block}")
            if f.device >= 0:
                raise ValueError(f"write plan for {path}: device {f.device}: {HOST_ONLY}")
            runs, file_views, total = collect_segments(path, f.blob, f.segments, crc_block > 0)
            views.append(file_views)
            written.append(total)
            pack(runs, index, chunk_bytes, -1, calls)
            size = runs[-1][0] + runs[-1][1] if runs else 0
            tables.append(Table(crc_block, size, array("I", bytes(4 * -(-size // crc_block))))
                          if crc_block else None)

        def open_file(index: int) -> int:
            # O_NOFOLLOW, O_NONBLOCK, O_CLOEXEC and the regular-file check come with it.
            return _fileio.open_regular(paths[index], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644,
                                        faults=faults, what="data file")

        def run_call(fd: int, call: Call, scratch: memoryview | None) -> None:
            buffers = call.buffers(views[call.file], None)
            path, table = paths[call.file], tables[call.file]
            if table is not None:
                # Checksummed first, as csrc does: the write then copies hot bytes.
                checksum_range(table, call.offset, buffers, pieces[call.file],
                                table.crcs.__setitem__, portable)
            _transfer(os.pwritev, fd, buffers, call.offset, call.nbytes, path, 0, cap, faults)
            if sync:
                _start_writeback(fd, call.offset, call.nbytes)

        def finish_file(index: int, fd: int) -> None:
            if sync:
                try:
                    _fileio.os_call(faults, _fileio.FSYNC, os.fsync, "fsync", paths[index], -1, fd)
                except BaseException:
                    _fileio.close_quietly(fd)  # as csrc's FdGuard: an error path, not a hooked close
                    raise
            _fileio.os_call(faults, _fileio.CLOSE, os.close, "close", paths[index], -1, fd)

        calls = interleave_files(calls, len(files), threads)
        _execute(calls, len(files), threads, 0, open_file, run_call, finish_file)
        for table, shared in zip(tables, pieces):
            if table is not None:
                join_pieces(table, shared, table.crcs.__setitem__)
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
        if max_gap < 0:
            raise ValueError(f"max_gap must be non-negative, got {max_gap}")
        faults, cap, portable, paths = _begin(files, threads, chunk_bytes, pool)
        calls: list[Call] = []
        views: list[list[memoryview]] = []
        required = []
        scratch = 0
        for index, (path, f) in enumerate(zip(paths, files)):
            if f.min_size < 0:
                raise ValueError(f"read plan for {path}: negative min_size {f.min_size}")
            if f.device >= 0:
                raise ValueError(f"read plan for {path}: device {f.device}: {HOST_ONLY}")
            runs, file_views, furthest = collect_runs(path, f.copies)
            views.append(file_views)
            required.append(max(f.min_size, furthest))
            if f.table is not None:
                check_table(path, f.table, furthest)
            scratch = max(scratch, pack(runs, index, chunk_bytes, max_gap, calls, f.table))
        pieces: list[list] = [[] for _ in files]
        failed: list = []

        def open_file(index: int) -> int:
            path = paths[index]
            fd = _fileio.open_regular(path, os.O_RDONLY, faults=faults, what="data file")
            try:
                # Checking the size up front fails fast, with the size the
                # plan needs rather than the first run that fails.
                size = _fileio.os_call(None, 0, os.fstat, "fstat", path, -1, fd).st_size
                if size < required[index]:
                    raise TruncatedFileError(path, required[index], size)
            except BaseException:
                _fileio.close_quietly(fd)
                raise
            return fd

        def run_call(fd: int, call: Call, scratch: memoryview | None) -> None:
            f = call.file
            table = files[f].table
            buffers = call.buffers(views[f], scratch)
            _transfer(os.preadv, fd, buffers, call.offset, call.nbytes, paths[f], required[f], cap,
                      faults)
            if table is not None:
                checksum_range(table, call.offset, buffers, pieces[f], compare(f, table, failed),
                                portable)

        def finish_file(index: int, fd: int) -> None:
            # Nothing read can be lost: a failed close (real or injected) is
            # ignored, as in csrc's close_read_only.
            faults.next(_fileio.CLOSE)
            _fileio.close_quietly(fd)

        _execute(calls, len(files), threads, scratch, open_file, run_call, finish_file)
        for f, shared in enumerate(pieces):
            if shared:
                join_pieces(files[f].table, shared, compare(f, files[f].table, failed))
        # A block two overlapping runs both read whole is checked twice.
        return ReadStats(bytes_read=sum(c.nbytes for c in calls),
                         calls=sum(1 for c in calls if c.parts), failed_blocks=sorted(set(failed)))

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


def _begin(files: Sequence, threads: int, chunk_bytes: int, pool: object) -> tuple:
    """What both calls start with: arguments checked, settings read once, paths decoded."""
    for name, value in (("threads", threads), ("chunk_bytes", chunk_bytes)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if pool is not None:
        raise ValueError(f"a pinned pool was passed to a plan, but {HOST_ONLY}")
    settings = config.current()
    paths = [os.fsdecode(f.path) for f in files]
    faults = _fileio.Faults(settings.fault_triples())
    return faults, settings.short_io, settings.portable_crc32c, paths


# --------------------------------------------------------------------------- execution


def _execute(
    work: list[Call],
    file_count: int,
    threads: int,
    scratch_bytes: int,
    open_file: Callable[[int], int],
    run_call: Callable[[int, Call, "memoryview | None"], None],
    finish_file: Callable[[int, int], None],
) -> None:
    """Runs the calls on up to ``threads`` threads (the caller is one of them), in order.

    A file is opened by the first call that needs it and finished (synced,
    closed) by whichever thread completes its last one, so few descriptors are
    open at once. The first error stops the other threads and is raised here,
    after every descriptor is closed.
    """
    pieces = [0] * file_count
    for call in work:
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
                _fileio.close_quietly(fd)
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


def _transfer(syscall, fd: int, buffers: list, offset: int, nbytes: int, path: str, required: int,
              cap: int, faults: _fileio.Faults) -> None:
    """Moves exactly ``nbytes`` bytes with preadv/pwritev, resuming short transfers.

    EINTR is retried by Python itself (PEP 475). ``cap`` > 0 limits every call
    to ``cap`` bytes (DCP_NATIVE_TEST_SHORT_IO); every call, resumed or not,
    counts for DCP_NATIVE_FAULT.
    """
    writing = syscall is os.pwritev
    op = _fileio.WRITE if writing else _fileio.READ
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
        # Named as csrc names it: one buffer goes through pread/pwrite there.
        name = syscall.__name__[:-1] if len(request) == 1 else syscall.__name__
        try:
            injected = faults.next(op)
            if injected:
                raise OSError(injected, os.strerror(injected))
            done = syscall(fd, request, offset)
        except OSError as exc:
            raise _fileio.os_error(exc, name, path, offset) from None
        if done == 0:
            if writing:
                # pwritev may not return 0 for a non-empty request; looping would spin.
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
