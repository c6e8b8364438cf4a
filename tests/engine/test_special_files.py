"""Both engines open only regular files, and never block in open().

A checkpoint directory may be hostile: a FIFO in place of a data file would
block open() forever, a device file would be read, a planted symbolic link
would redirect a write. Every case runs the engine call bounded by a timeout
(helpers.bounded_error), so a hang fails the test instead of blocking the suite.
What dcp.load and the command line do with such files: tests/test_reader.py.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from array import array

import pytest

from dcp_native._errors import CorruptCheckpointError
from dcp_native._fileio import not_regular
from dcp_native.engine import SRC_BLOB, SRC_HOST, ReadFile, WriteFile
from helpers import Mem, bounded_error

FAULT_ENV = "DCP_NATIVE_FAULT"
SIZE = 4096


# --------------------------------------------------------------------------- helpers


def read_plan(path: str, dest: Mem, size: int = SIZE) -> ReadFile:
    # One box of `size` bytes at offset 0: the file must be opened.
    return ReadFile(path, size, array("q", [0, dest.addr, size, 0]))


def write_plan(path: str, src: Mem, size: int = SIZE) -> WriteFile:
    return WriteFile(path, b"", array("q", [0, SRC_HOST, src.addr, size]))


def assert_refused(exc: BaseException | None, path: str, mode: int) -> None:
    """``exc`` is the CorruptCheckpointError both engines raise for a file of type ``mode``."""
    assert isinstance(exc, CorruptCheckpointError), repr(exc)
    assert exc.filename == path
    assert str(exc) == str(not_regular(path, mode, "data file"))


def make_fifo(tmp_path) -> str:
    path = str(tmp_path / "__0_0.distcp")
    os.mkfifo(path)
    return path


@pytest.fixture
def unix_socket(tmp_path):
    """A bound Unix socket at a data file's name (the name must fit sun_path)."""
    path = str(tmp_path / "s.distcp")
    if len(os.fsencode(path)) >= 108:
        pytest.skip("tmp_path is too long for a Unix socket address")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    yield path
    sock.close()


# --------------------------------------------------------------------------- reads


@pytest.mark.parametrize("threads", [1, 3])
def test_read_fifo_refused(engine, tmp_path, threads):
    path = make_fifo(tmp_path)
    dest = Mem(data=bytes(SIZE))
    exc = bounded_error(lambda: engine.read([read_plan(path, dest)], threads=threads), fifo=path)
    assert_refused(exc, path, stat.S_IFIFO)


def test_read_fifo_with_writer_refused(engine, tmp_path):
    """A FIFO that has a writer (bytes waiting in it) is refused all the same, unread."""
    path = make_fifo(tmp_path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # so the writer's open succeeds
    writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(writer, b"x" * 100)
        dest = Mem(data=bytes(SIZE))
        exc = bounded_error(lambda: engine.read([read_plan(path, dest)], threads=1))
        assert_refused(exc, path, stat.S_IFIFO)
        assert os.read(reader, 200) == b"x" * 100  # nothing was consumed
    finally:
        os.close(writer)
        os.close(reader)


def test_read_directory_refused(engine, tmp_path):
    path = str(tmp_path / "__0_0.distcp")
    os.mkdir(path)
    dest = Mem(data=bytes(SIZE))
    exc = bounded_error(lambda: engine.read([read_plan(path, dest)], threads=1))
    assert_refused(exc, path, stat.S_IFDIR)


def test_read_symlink_to_dev_zero_refused(engine, tmp_path):
    """Reads follow symbolic links, but a link to a device is refused by what it points to."""
    path = str(tmp_path / "__0_0.distcp")
    os.symlink("/dev/zero", path)
    dest = Mem(data=b"\xee" * SIZE)
    exc = bounded_error(lambda: engine.read([read_plan(path, dest)], threads=1))
    assert_refused(exc, path, stat.S_IFCHR)
    assert bytes(dest.buf) == b"\xee" * SIZE  # nothing was read


def test_read_symlink_to_regular_file_allowed(engine, tmp_path):
    """Only the file type counts for reads: a link to a regular file is read as before."""
    target = tmp_path / "real.distcp"
    data = os.urandom(SIZE)
    target.write_bytes(data)
    path = str(tmp_path / "__0_0.distcp")
    os.symlink(target, path)
    dest = Mem(data=bytes(SIZE))
    assert bounded_error(lambda: engine.read([read_plan(path, dest)], threads=1)) is None
    assert bytes(dest.buf) == data


def test_read_socket_refused(engine, unix_socket):
    # Linux refuses open() of a socket file with ENXIO before fstat could see it.
    dest = Mem(data=bytes(SIZE))
    exc = bounded_error(lambda: engine.read([read_plan(unix_socket, dest)], threads=1))
    if isinstance(exc, CorruptCheckpointError):
        assert_refused(exc, unix_socket, stat.S_IFSOCK)
    else:
        assert isinstance(exc, OSError), repr(exc)
        assert (exc.errno, exc.filename) == (errno.ENXIO, unix_socket)


def test_read_refused_among_regular_files(engine, tmp_path):
    """One FIFO among regular files fails the whole call, on any thread, and leaks nothing."""
    paths, dests = [], []
    for i in range(4):
        path = str(tmp_path / f"__{i}_0.distcp")
        with open(path, "wb") as f:
            f.write(os.urandom(SIZE))
        paths.append(path)
        dests.append(Mem(data=bytes(SIZE)))
    os.remove(paths[2])
    os.mkfifo(paths[2])
    before = len(os.listdir("/proc/self/fd"))
    exc = bounded_error(
        lambda: engine.read([read_plan(p, d) for p, d in zip(paths, dests)], threads=3),
        fifo=paths[2],
    )
    assert_refused(exc, paths[2], stat.S_IFIFO)
    assert len(os.listdir("/proc/self/fd")) == before


# --------------------------------------------------------------------------- writes


@pytest.mark.parametrize("threads", [1, 3])
def test_write_fifo_without_reader(engine, tmp_path, threads):
    """O_NONBLOCK makes the open fail at once with ENXIO instead of waiting for a reader."""
    path = make_fifo(tmp_path)
    src = Mem(data=os.urandom(SIZE))
    exc = bounded_error(lambda: engine.write([write_plan(path, src)], threads=threads, sync=False),
                        fifo=path)
    assert isinstance(exc, OSError) and not isinstance(exc, CorruptCheckpointError), repr(exc)
    assert (exc.errno, exc.filename) == (errno.ENXIO, path)
    assert exc.strerror == f"{os.strerror(errno.ENXIO)} (open)"


def test_write_fifo_with_reader_refused(engine, tmp_path):
    """With a reader the open succeeds; fstat then refuses the FIFO, and nothing is written."""
    path = make_fifo(tmp_path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        src = Mem(data=os.urandom(SIZE))
        exc = bounded_error(lambda: engine.write([write_plan(path, src)], threads=1, sync=True))
        assert_refused(exc, path, stat.S_IFIFO)
        assert os.read(reader, 1) == b""  # EOF: the writer went without writing anything
    finally:
        os.close(reader)


def test_write_directory_refused(engine, tmp_path):
    path = str(tmp_path / "__0_0.distcp")
    os.mkdir(path)
    src = Mem(data=os.urandom(SIZE))
    exc = bounded_error(lambda: engine.write([write_plan(path, src)], threads=1, sync=False))
    # open(O_WRONLY) of a directory fails in the kernel already.
    assert isinstance(exc, IsADirectoryError), repr(exc)
    assert exc.filename == path


@pytest.mark.parametrize("target", ["/dev/null", "regular"])
def test_write_never_follows_a_symlink(engine, tmp_path, target):
    """O_NOFOLLOW: a planted link fails the write (ELOOP) instead of redirecting it."""
    victim = tmp_path / "victim"
    if target == "regular":
        victim.write_bytes(b"precious")
        target = str(victim)
    path = str(tmp_path / "__0_0.distcp")
    os.symlink(target, path)
    src = Mem(data=os.urandom(SIZE))
    exc = bounded_error(lambda: engine.write([write_plan(path, src)], threads=1, sync=False))
    assert isinstance(exc, OSError), repr(exc)
    assert (exc.errno, exc.filename) == (errno.ELOOP, path)
    if target == str(victim):
        assert victim.read_bytes() == b"precious"  # neither truncated nor written


def test_write_socket_refused(engine, unix_socket):
    src = Mem(data=os.urandom(SIZE))
    exc = bounded_error(lambda: engine.write([write_plan(unix_socket, src)], threads=1, sync=False))
    assert isinstance(exc, OSError), repr(exc)
    assert exc.filename == unix_socket
    if not isinstance(exc, CorruptCheckpointError):
        assert exc.errno == errno.ENXIO


def test_write_regular_file_unchanged(engine, tmp_path):
    """Regular files are written as before (O_NONBLOCK cleared again changes nothing)."""
    path = str(tmp_path / "__0_0.distcp")
    data = os.urandom(3 * SIZE + 5)
    src = Mem(data=data)
    written = engine.write([WriteFile(path, b"", array("q", [0, SRC_HOST, src.addr, len(data)]))],
                           threads=3, sync=True, chunk_bytes=SIZE)
    assert written.bytes_written == [len(data)]
    with open(path, "rb") as f:
        assert f.read() == data


# --------------------------------------------------------------------------- faults


def test_fault_first_open_still_fails_read(engine, tmp_path, monkeypatch):
    path = str(tmp_path / "__0_0.distcp")
    with open(path, "wb") as f:
        f.write(bytes(SIZE))
    dest = Mem(data=bytes(SIZE))
    monkeypatch.setenv(FAULT_ENV, "open:EIO:1")
    with pytest.raises(OSError) as info:
        engine.read([read_plan(path, dest)], threads=1)
    assert (info.value.errno, info.value.filename) == (errno.EIO, path)
    assert info.value.strerror == f"{os.strerror(errno.EIO)} (open)"


def test_fault_first_open_still_fails_write(engine, tmp_path, monkeypatch):
    path = str(tmp_path / "__0_0.distcp")
    monkeypatch.setenv(FAULT_ENV, "open:EIO:1")
    with pytest.raises(OSError) as info:
        engine.write([WriteFile(path, b"abc", array("q", [0, SRC_BLOB, 0, 3]))], threads=1,
                     sync=False)
    assert (info.value.errno, info.value.filename) == (errno.EIO, path)
    assert info.value.strerror == f"{os.strerror(errno.EIO)} (open)"
    assert not os.path.exists(path)  # the injected failure stands for the open itself


def test_fault_counts_refused_opens(engine, tmp_path, monkeypatch):
    """A refused special file counts as one open: the next file's open is the second."""
    fifo = make_fifo(tmp_path)
    path = str(tmp_path / "__1_0.distcp")
    with open(path, "wb") as f:
        f.write(bytes(SIZE))
    dests = [Mem(data=bytes(SIZE)), Mem(data=bytes(SIZE))]
    monkeypatch.setenv(FAULT_ENV, "open:EIO:1")
    # One thread opens the files in order: the FIFO's open is the one that fails.
    exc = bounded_error(lambda: engine.read([read_plan(fifo, dests[0]), read_plan(path, dests[1])],
                                            threads=1),
                        fifo=fifo)
    assert isinstance(exc, OSError) and not isinstance(exc, CorruptCheckpointError), repr(exc)
    assert (exc.errno, exc.filename) == (errno.EIO, fifo)
