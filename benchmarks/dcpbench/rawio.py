"""The raw baseline (plain sequential pwrite / pread on threads) and page-cache control.

The raw baseline is what this machine does with the same bytes and no
checkpoint format: each thread writes its own file, or reads its own
contiguous range of the data files, with plain ``pwrite``/``preadv`` calls of
``RAW_CHUNK`` bytes, into or out of preallocated memory. With ``direct`` the
reads use ``O_DIRECT`` (page-aligned buffer, offsets and lengths), bypassing
the page cache.

Page cache: :func:`evict` drops a directory's files from the page cache with
``posix_fadvise(POSIX_FADV_DONTNEED)`` and, when pages survive that and this
process may, ``/proc/sys/vm/drop_caches``; :func:`resident_fraction` measures
what is cached with ``mincore`` so every cold figure records how cold it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
from typing import Callable, Sequence

from .common import RAW_CHUNK

#: O_DIRECT needs buffers, offsets and lengths aligned to the logical block size; 4 KiB covers every common one.
DIRECT_ALIGN = 4096


def host_view(t) -> memoryview:
    """A writable memoryview over a CPU tensor's bytes (no numpy needed)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def run_threads(fns: Sequence[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    pos = 0
    while pos < len(view):
        n = os.pwrite(fd, view[pos : pos + RAW_CHUNK], offset + pos)
        if n <= 0:
            raise OSError(f"pwrite returned {n}")
        pos += n


def pread_all(fd: int, view: memoryview, offset: int, path: str, allow_eof: bool = False) -> int:
    """Read ``len(view)`` bytes at ``offset``; with ``allow_eof`` stop quietly at the end of the file."""
    pos = 0
    while pos < len(view):
        n = os.preadv(fd, [view[pos : pos + RAW_CHUNK]], offset + pos)
        if n <= 0:
            if allow_eof:
                break
            raise OSError(f"{path}: unexpected end of file at {offset + pos}")
        pos += n
    return pos


def split_groups(sizes: Sequence[int], bins: int) -> list[list[int]]:
    """Indices of ``sizes`` in ``bins`` groups of about equal total size (largest first, greedy)."""
    groups: list[list[int]] = [[] for _ in range(max(1, bins))]
    totals = [0] * len(groups)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        g = min(range(len(groups)), key=totals.__getitem__)
        groups[g].append(i)
        totals[g] += sizes[i]
    return [sorted(g) for g in groups if g]


def write_files(directory: str, views: Sequence[memoryview], threads: int, sync: bool) -> list[Callable[[], None]]:
    """One function per thread: write its share of ``views`` back to back into its own file (+ fsync)."""
    os.makedirs(directory, exist_ok=True)
    groups = split_groups([len(v) for v in views], threads)

    def write_file(n: int, group: list[int]) -> None:
        fd = os.open(os.path.join(directory, f"raw_{n}.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            off = 0
            for i in group:
                pwrite_all(fd, views[i], off)
                off += len(views[i])
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    return [lambda n=n, g=g: write_file(n, g) for n, g in enumerate(groups)]


def data_files(directory: str) -> list[tuple[str, int]]:
    names = sorted(n for n in os.listdir(directory) if n.endswith(".distcp"))
    return [(n, os.path.getsize(os.path.join(directory, n))) for n in names]


def read_layout(files: Sequence[tuple[str, int]]) -> tuple[dict[str, int], int]:
    """Where each file goes in one buffer, and the buffer's size.

    Every file starts page-aligned (as O_DIRECT needs; it also keeps payloads
    aligned in the buffer, so the check can view them as their dtype), and
    each is followed by room to read its last block whole.
    """
    bases, pos = {}, 0
    for name, size in files:
        bases[name] = pos
        pos = -(-(pos + size) // DIRECT_ALIGN) * DIRECT_ALIGN
    return bases, pos + DIRECT_ALIGN


def read_files(
    directory: str, files: Sequence[tuple[str, int]], bases: dict[str, int], view: memoryview,
    threads: int, direct: bool = False,
) -> list[Callable[[], None]]:
    """One function per thread: read its contiguous share of the files' bytes into ``view``.

    The bytes of all files are split into ``threads`` ranges of about equal
    size (at page boundaries); each thread reads its range in order, file by
    file. With ``direct`` every file is opened with ``O_DIRECT``, ``view`` must
    be page-aligned, and the last block of a file is read whole (the kernel
    stops at the end of the file).
    """
    total = sum(s for _, s in files)
    per = -(-total // max(1, threads))
    per = -(-per // DIRECT_ALIGN) * DIRECT_ALIGN
    # Pieces (file, offset, length) of each thread's range.
    plans: list[list[tuple[str, int, int]]] = [[]]
    room = per
    for name, size in files:
        off = 0
        while off < size:
            if room <= 0:
                plans.append([])
                room = per
            n = min(room, size - off)
            if off + n < size:
                # A cut inside a file: the next piece must start page-aligned (O_DIRECT).
                n -= n % DIRECT_ALIGN
                if n == 0:
                    room = 0
                    continue
            plans[-1].append((name, off, n))
            off += n
            room -= n
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)

    def read_range(pieces: list[tuple[str, int, int]]) -> None:
        for name, off, n in pieces:
            full = os.path.join(directory, name)
            fd = os.open(full, flags)
            try:
                base = bases[name] + off
                if direct:
                    length = -(-n // DIRECT_ALIGN) * DIRECT_ALIGN
                    got = pread_all(fd, view[base : base + length], off, full, allow_eof=True)
                    if got < n:
                        raise OSError(f"{full}: unexpected end of file at {off + got}")
                else:
                    pread_all(fd, view[base : base + n], off, full)
            finally:
                os.close(fd)

    return [lambda p=p: read_range(p) for p in plans if p]


def direct_io_supported(directory: str) -> str | None:
    """None when an O_DIRECT read works on files in ``directory``, else why not."""
    if not hasattr(os, "O_DIRECT"):
        return "this platform has no O_DIRECT"
    path = os.path.join(directory, ".odirect_probe")
    try:
        with open(path, "wb") as f:
            f.write(b"\0" * DIRECT_ALIGN)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, DIRECT_ALIGN)  # page-aligned
            try:
                os.preadv(fd, [buf], 0)
            finally:
                buf.close()
        finally:
            os.close(fd)
    except OSError as exc:
        return f"O_DIRECT read failed on this filesystem: {os.strerror(exc.errno or errno.EINVAL)}"
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    return None


# ----------------------------------------------------------------------------- page cache


_libc = None


def _mincore():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        _libc.mincore.restype = ctypes.c_int
    return _libc.mincore


def resident_pages(path: str) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages of ``path``), by ``mincore`` on a mapping."""
    size = os.path.getsize(path)
    if size == 0:
        return 0, 0
    page = mmap.PAGESIZE
    pages = -(-size // page)
    with open(path, "rb") as f:
        # A private writable mapping (never written) so ctypes can take its address;
        # mincore reports on the file's pages without touching them.
        mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        anchor = ctypes.c_char.from_buffer(mm)
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _mincore()(ctypes.addressof(anchor), size, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore: {os.strerror(err)}", path)
            return sum(v & 1 for v in vec), pages
        finally:
            del anchor
    finally:
        mm.close()


def resident_fraction(directory: str) -> float:
    """Fraction of the pages of the directory's files that are in the page cache."""
    cached = total = 0
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            c, t = resident_pages(path)
            cached += c
            total += t
    return cached / total if total else 0.0


def evict(directory: str) -> dict[str, object]:
    """Drop the directory's files from the page cache; returns how, and what stayed resident."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    how = "posix_fadvise(POSIX_FADV_DONTNEED)"
    left = resident_fraction(directory)
    if left > 0.01 and os.access("/proc/sys/vm/drop_caches", os.W_OK):
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        how += " + drop_caches"
        left = resident_fraction(directory)
    return {"method": how, "resident_after": left}
