"""The engines' test hooks: short transfers (DCP_NATIVE_TEST_SHORT_IO) and injected faults
(DCP_NATIVE_FAULT), both engines."""

from __future__ import annotations

import errno
import os

import pytest

from dcp_native.engine import (
    ReadFile,
    ReadStats,
    WriteFile,
)
from helpers import (
    Mem,
    blob_seg,
    box,
    copies,
    host_seg,
    open_fds,
    pattern,
    segments,
    write_file,
)

SHORT_IO_ENV = "DCP_NATIVE_TEST_SHORT_IO"


# --------------------------------------------------------------------------- short I/O hook


@pytest.mark.parametrize("cap", [1, 7])
def test_short_io(engine, tmp_path, monkeypatch, cap):
    data = pattern(3000, 12)
    host = Mem(data=data)
    blob = data[:300] + data[1000:1200]
    path = tmp_path / "short.distcp"
    # Blob and host segments, contiguous, several per call and split by chunks.
    plan = segments(
        blob_seg(0, 0, 300),
        host_seg(300, host.addr + 300, 700),
        blob_seg(1000, 300, 200),
        host_seg(1200, host.addr + 1200, 1800),
    )
    dest = Mem(3000, fill=0xEE)
    # 30 runs of 50 bytes every 100 bytes (the 50-byte gaps merge under the
    # tiny-span rule, so calls hold gaps and are split by chunk_bytes), and a
    # last run after a 40-byte gap.
    boxes = [
        box(0, 0, 0),  # empty (a null address is fine when nothing is copied)
        box(0, dest.addr, 50, (30,), (100,), (100,)),
        box(2990, dest.addr + 2990, 10),
    ]
    monkeypatch.setenv(SHORT_IO_ENV, str(cap))
    written = engine.write(
        [WriteFile(str(path), blob, plan)], threads=3, sync=False, chunk_bytes=900
    )
    assert written.bytes_written == [3000]
    assert path.read_bytes() == data
    stats = engine.read([ReadFile(str(path), 3000, copies(*boxes))], threads=3, chunk_bytes=900)
    monkeypatch.delenv(SHORT_IO_ENV)
    expected = bytearray([0xEE]) * 3000
    for i in range(30):
        expected[100 * i : 100 * i + 50] = data[100 * i : 100 * i + 50]
    expected[2990:] = data[2990:]
    assert dest.bytes() == bytes(expected)
    dest2 = Mem(3000, fill=0xEE)
    boxes2 = [box(0, dest2.addr, 50, (30,), (100,), (100,)), box(2990, dest2.addr + 2990, 10)]
    # The stats are the plan's: resumed short transfers are not extra calls.
    again = engine.read([ReadFile(str(path), 3000, copies(*boxes2))], threads=3, chunk_bytes=900)
    assert again == stats
    assert dest2.bytes() == bytes(expected)


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", " 7", "+7"])
def test_short_io_bad_value(engine, tmp_path, monkeypatch, value):
    monkeypatch.setenv(SHORT_IO_ENV, value)
    with pytest.raises(ValueError, match=SHORT_IO_ENV):
        engine.write([WriteFile(str(tmp_path / "x"), b"", segments())], threads=1, sync=False)
    with pytest.raises(ValueError, match=SHORT_IO_ENV):
        engine.read([ReadFile(str(tmp_path / "x"), 0, copies())], threads=1)
    assert not (tmp_path / "x").exists()


def test_short_io_zero_means_off(engine, tmp_path, monkeypatch):
    monkeypatch.setenv(SHORT_IO_ENV, "0")
    path = tmp_path / "z.distcp"
    plan = segments(blob_seg(0, 0, 3))
    written = engine.write([WriteFile(str(path), b"abc", plan)], threads=1, sync=False)
    assert written.bytes_written == [3]
    assert path.read_bytes() == b"abc"


# --------------------------------------------------------------------------- fault injection

FAULT_ENV = "DCP_NATIVE_FAULT"


def one_file_plan(tmp_path, size=10_000):
    host = Mem(data=pattern(size, 30))
    path = str(tmp_path / "f.distcp")
    return host, path, WriteFile(path, b"", segments(host_seg(0, host.addr, size)))


def test_fault_enospc_on_third_write(engine, tmp_path, monkeypatch):
    host, path, wf = one_file_plan(tmp_path)
    monkeypatch.setenv(FAULT_ENV, "write:ENOSPC:3")
    before = open_fds()
    with pytest.raises(OSError) as info:
        engine.write([wf], threads=1, sync=False, chunk_bytes=1000)
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, path)
    # One thread: the third write is the one at offset 2000.
    assert info.value.strerror == f"{os.strerror(errno.ENOSPC)} (pwrite at offset 2000)"
    assert open_fds() == before
    with open(path, "rb") as f:
        assert f.read() == host.bytes()[:2000]


@pytest.mark.parametrize("threads", [3, 16])
def test_fault_write_many_threads(engine, tmp_path, monkeypatch, threads):
    """Exactly one write fails whatever the interleaving; the call returns and closes all."""
    hosts = [Mem(data=pattern(20_000, i)) for i in range(8)]
    paths = [str(tmp_path / f"{i}.distcp") for i in range(8)]
    files = [WriteFile(p, b"", segments(host_seg(0, h.addr, 20_000)), crc_block=4096)
             for p, h in zip(paths, hosts)]
    monkeypatch.setenv(FAULT_ENV, "write:EFBIG:7")
    before = open_fds()
    with pytest.raises(OSError) as info:
        engine.write(files, threads=threads, sync=True, chunk_bytes=1000)
    assert info.value.errno == errno.EFBIG and info.value.filename in paths
    assert "pwrite at offset" in info.value.strerror
    assert open_fds() == before


# op: (errno name, operation in the message)
WRITE_FAULTS = {
    "open": ("EACCES", "open"),
    "write": ("EIO", "pwritev"),
    "fsync": ("EIO", "fsync"),
    "close": ("EDQUOT", "close"),
}


@pytest.mark.parametrize("op", WRITE_FAULTS)
@pytest.mark.parametrize("threads", [1, 3])
def test_fault_each_write_op(engine, tmp_path, monkeypatch, op, threads):
    name, operation = WRITE_FAULTS[op]
    blob = pattern(3000, 31)
    paths = [str(tmp_path / f"{i}.distcp") for i in range(3)]
    # Two segments per file: one pwritev each.
    files = [WriteFile(p, blob, segments(blob_seg(0, 0, 1000), blob_seg(1000, 1000, 2000)))
             for p in paths]
    monkeypatch.setenv(FAULT_ENV, f"{op}:{name}:2")
    before = open_fds()
    with pytest.raises(OSError) as info:
        engine.write(files, threads=threads, sync=True)
    code = getattr(errno, name)
    assert info.value.errno == code and info.value.filename in paths
    if threads == 1:
        # Files go in order: the second of any operation is on the second file.
        assert info.value.filename == paths[1]
    where = " at offset 0" if op == "write" else ""
    assert info.value.strerror == f"{os.strerror(code)} ({operation}{where})"
    assert isinstance(info.value, type(OSError(code, "x")))  # the subclass errno selects
    assert open_fds() == before


def test_fault_fsync_with_sync(engine, tmp_path, monkeypatch):
    _, path, wf = one_file_plan(tmp_path)
    monkeypatch.setenv(FAULT_ENV, "fsync:EIO:1")
    with pytest.raises(OSError) as info:
        engine.write([wf], threads=2, sync=True)
    assert (info.value.errno, info.value.filename) == (errno.EIO, path)
    assert info.value.strerror == f"{os.strerror(errno.EIO)} (fsync)"
    # Without sync there is no fsync to fail.
    assert engine.write([wf], threads=2, sync=False).bytes_written == [10_000]


def test_fault_eio_on_read(engine, tmp_path, monkeypatch):
    data = pattern(10_000, 32)
    path = str(tmp_path / "r.distcp")
    write_file(path, data)
    dest = Mem(10_000)
    plan = copies(box(0, dest.addr, 10_000))
    monkeypatch.setenv(FAULT_ENV, "read:EIO:4")
    before = open_fds()
    with pytest.raises(OSError) as info:
        engine.read([ReadFile(path, 0, plan)], threads=1, chunk_bytes=1000)
    assert (info.value.errno, info.value.filename) == (errno.EIO, path)
    assert info.value.strerror == f"{os.strerror(errno.EIO)} (pread at offset 3000)"
    assert open_fds() == before


def test_fault_open_on_read(engine, tmp_path, monkeypatch):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.distcp"))
        write_file(paths[-1], pattern(100, i))
    dest = Mem(300)
    files = [
        ReadFile(p, 100, copies(box(0, dest.addr + 100 * i, 100))) for i, p in enumerate(paths)
    ]
    monkeypatch.setenv(FAULT_ENV, "open:ENOENT:3")
    before = open_fds()
    with pytest.raises(FileNotFoundError) as info:
        engine.read(files, threads=1)
    assert info.value.filename == paths[2]
    assert info.value.strerror == f"{os.strerror(errno.ENOENT)} (open)"
    assert open_fds() == before


def test_fault_close_on_read_is_ignored(engine, tmp_path, monkeypatch):
    """Nothing read can be lost when a close fails: the read succeeds (as with a real one)."""
    path = str(tmp_path / "r.distcp")
    write_file(path, b"abcdef")
    dest = Mem(6)
    monkeypatch.setenv(FAULT_ENV, "close:EIO:1")
    before = open_fds()
    stats = engine.read([ReadFile(path, 6, copies(box(0, dest.addr, 6)))], threads=1)
    assert stats == ReadStats(6, 1) and dest.bytes() == b"abcdef"
    assert open_fds() == before


def test_fault_counts_short_transfers(engine, tmp_path, monkeypatch):
    """Each piece of a transfer split by DCP_NATIVE_TEST_SHORT_IO is a call of its own."""
    _, path, wf = one_file_plan(tmp_path, 1000)
    monkeypatch.setenv(SHORT_IO_ENV, "100")
    monkeypatch.setenv(FAULT_ENV, "write:28:5")  # ENOSPC by number
    with pytest.raises(OSError) as info:
        engine.write([wf], threads=1, sync=False)
    assert info.value.errno == errno.ENOSPC
    assert info.value.strerror == f"{os.strerror(errno.ENOSPC)} (pwrite at offset 400)"


def test_fault_past_the_last_call(engine, tmp_path, monkeypatch):
    host, path, wf = one_file_plan(tmp_path)
    monkeypatch.setenv(FAULT_ENV, "write:EIO:11,open:EIO:2,fsync:EIO:2,close:EIO:2,read:EIO:1")
    assert engine.write([wf], threads=3, sync=True, chunk_bytes=1000).bytes_written == [10_000]
    with open(path, "rb") as f:
        assert f.read() == host.bytes()


def test_fault_several_specs(engine, tmp_path, monkeypatch):
    _, path, wf = one_file_plan(tmp_path)
    monkeypatch.setenv(FAULT_ENV, "write:EIO:9,write:ENOSPC:2")
    with pytest.raises(OSError) as info:
        engine.write([wf], threads=1, sync=False, chunk_bytes=1000)
    assert info.value.errno == errno.ENOSPC


@pytest.mark.parametrize(
    "value",
    [
        "write",
        "write:ENOSPC",
        "write:ENOSPC:1:2",
        "write:ENOSPC:0",
        "write:ENOSPC:-1",
        "write:ENOSPC:x",
        "write:ENOSPC: 1",
        "bogus:EIO:1",
        "pwrite:EIO:1",
        "write:ENOTANERRNO:1",
        "write:eio:1",
        "write:0:1",
        "write:4096:1",
        "write:-5:1",
        "write:EIO:1,",
        ",write:EIO:1",
        "write:EIO:1,write:ENOSPC:1",
    ],
)
def test_fault_malformed(engine, tmp_path, monkeypatch, value):
    monkeypatch.setenv(FAULT_ENV, value)
    path = tmp_path / "x"
    with pytest.raises(ValueError, match=FAULT_ENV):
        engine.write([WriteFile(str(path), b"a", segments(blob_seg(0, 0, 1)))], threads=1,
                     sync=False)
    with pytest.raises(ValueError, match=FAULT_ENV):
        engine.read([ReadFile(str(path), 0, copies())], threads=1)
    assert not path.exists()


def test_fault_empty_means_off(engine, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "")
    _, path, wf = one_file_plan(tmp_path)
    assert engine.write([wf], threads=1, sync=False).bytes_written == [10_000]
