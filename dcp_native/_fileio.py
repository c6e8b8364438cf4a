"""File primitives shared by the Python engine, the commit protocol and the readers of side files.

Two rules live here so that every Python-side open follows them:

* **Only regular files are opened.** A checkpoint directory may be hostile: a
  FIFO in place of a data file or a side file would block ``open()`` forever,
  a device file would be read or truncated. :func:`open_regular` opens with
  ``O_NONBLOCK`` (a FIFO then opens at once, or fails with ``ENXIO`` for
  writing), checks ``fstat`` and refuses anything but a regular file with
  :class:`~dcp_native.CorruptCheckpointError` naming the file and its type.
* **Every system call can be failed on purpose.** ``DCP_NATIVE_FAULT`` (parsed
  by :mod:`dcp_native.config`) makes the nth call of an operation fail within
  one *scope*: one engine call, or one commit. A :class:`Faults` is such a
  scope's counters; :func:`os_call` makes a call through it.
"""

from __future__ import annotations

import itertools
import os
import stat
from array import array

from . import config
from ._errors import CorruptCheckpointError

OPEN, READ, WRITE, FSYNC, CLOSE, RENAME = range(len(config.FAULT_OPS))


class Faults:
    """One scope's DCP_NATIVE_FAULT counters (csrc/fault_injection.hpp).

    ``next(op)`` is asked before each system call of ``op`` and returns the
    errno it must fail with, or 0. itertools.count's next() is atomic under
    the GIL, so exactly one call is the nth whatever the threads do.
    """

    __slots__ = ("_specs", "_counters")

    def __init__(self, triples: array | None = None) -> None:
        if triples is None:
            triples = config.current().fault_triples()
        self._specs: dict[tuple[int, int], int] = {}
        self._counters: list = [None] * len(config.FAULT_OPS)
        for op, error, nth in zip(triples[0::3], triples[1::3], triples[2::3]):
            self._specs[(op, nth)] = error
            self._counters[op] = itertools.count(1)

    def next(self, op: int) -> int:
        counter = self._counters[op]
        if counter is None:
            return 0
        return self._specs.get((op, next(counter)), 0)


def os_error(exc: OSError, operation: str, path: str, offset: int = -1) -> OSError:
    """``exc`` as the engines raise it: errno kept, operation and offset in the message, path set."""
    where = f"{operation} at offset {offset}" if offset >= 0 else operation
    strerror = exc.strerror or os.strerror(exc.errno or 0)
    return OSError(exc.errno, f"{strerror} ({where})", path)


def close_quietly(fd: int) -> None:
    """close() on error paths (and of files only read): not a hooked call, errors ignored."""
    try:
        os.close(fd)
    except OSError:
        pass


def os_call(faults: Faults | None, op: int, function, operation: str, path: str, offset: int,
            *args):
    """Calls an os function; an OSError gets the path, operation and offset (as in csrc/).

    With ``faults``, the call is system call ``op`` of DCP_NATIVE_FAULT's count
    and fails instead of being made when its number comes up; an injected
    close still closes the descriptor, as Linux does on a failed close.
    """
    injected = faults.next(op) if faults is not None else 0
    try:
        if injected:
            if op == CLOSE:
                close_quietly(*args)
            raise OSError(injected, os.strerror(injected))
        return function(*args)
    except OSError as exc:
        raise os_error(exc, operation, path, offset) from None


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)


def not_regular(path: str, mode: int, what: str = "file") -> CorruptCheckpointError:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return CorruptCheckpointError(
        f"{path}: the checkpoint's {what} is {kind}, not a regular file; refusing to use it",
        filename=path,
    )


def open_regular(
    path: str,
    flags: int = os.O_RDONLY,
    mode: int = 0o644,
    *,
    faults: Faults | None = None,
    what: str = "file",
) -> int:
    """``os.open`` that never blocks on a FIFO and refuses anything but a regular file.

    ``O_NONBLOCK`` (see the module docs) is cleared again once ``fstat`` found a regular file.
    Writes never follow a symbolic link in the last component (``O_NOFOLLOW``): a save creates
    fresh names. ``OSError`` (with ``filename``) for what the kernel refuses.
    """
    writing = flags & (os.O_WRONLY | os.O_RDWR)
    flags |= os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if writing else 0)
    fd = os_call(faults, OPEN, os.open, "open", path, -1, path, flags, mode)
    try:
        st = os_call(None, 0, os.fstat, "fstat", path, -1, fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(path, st.st_mode, what)
        os_call(None, 0, os.set_blocking, "fcntl", path, -1, fd, True)
    except BaseException:
        close_quietly(fd)
        raise
    return fd


def check_regular(path: str, what: str = "file") -> os.stat_result:
    """``os.stat`` of ``path`` (never blocks), refusing anything but a regular file."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(path, st.st_mode, what)
    return st


def read_regular(path: str, limit: int | None, what: str = "file") -> bytes:
    """The whole of a regular file; refuses files over ``limit`` bytes (None: any) before reading."""
    limit = 1 << 62 if limit is None else limit
    fd = open_regular(path, what=what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CorruptCheckpointError(
                f"{path}: the checkpoint's {what} has {size} bytes, more than the {limit} "
                "it can have; refusing to read it",
                filename=path,
            )
        chunks = []
        got = 0
        while True:
            chunk = os.read(fd, max(size - got, 0) + 1)
            if not chunk:
                break
            got += len(chunk)
            if got > limit:
                raise CorruptCheckpointError(
                    f"{path}: the checkpoint's {what} grew past {limit} bytes while being read",
                    filename=path,
                )
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        close_quietly(fd)
