"""The pure-Python engine's device path against the fake CUDA runtime (csrc/testing).

What only the Python engine has: its ctypes runtime (dcp_native._cudart), its
pinned pool, the pipelining of device pieces with block CRCs straddling them,
O_DIRECT with its buffered fallback, and the proof that the CPU path never
looks the runtime up. The contract both engines share is tested in
tests/test_fake_cuda.py.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
from array import array
from pathlib import Path

import pytest

from dcp_native import CudaError
from dcp_native import _cudart
from dcp_native._crc32c import _crc32c_python as ref_crc32c
from dcp_native._engine_python import PythonEngine, _direct_io_bytes
from dcp_native.engine import (
    CUDART_ENV,
    SRC_BLOB,
    SRC_DEVICE,
    SRC_HOST,
    ReadFile,
    WriteFile,
)

pytestmark = pytest.mark.fake_cuda

@pytest.fixture
def engine() -> PythonEngine:
    return PythonEngine()


class Mem:
    """Host memory standing for device memory (the fake's device memory is host memory)."""

    def __init__(self, data: bytes = b"", size: int | None = None) -> None:
        self.size = len(data) if size is None else size
        self.buf = bytearray(data) if size is None else bytearray(size)
        if not self.buf:
            self.buf = bytearray(1)
        self._pin = (ctypes.c_char * len(self.buf)).from_buffer(self.buf)
        self.addr = ctypes.addressof(self._pin)

    def bytes(self) -> bytes:
        return bytes(self.buf[: self.size])


def block_crcs(content: bytes, block: int) -> array:
    return array("I", [ref_crc32c(content[i : i + block]) for i in range(0, len(content), block)])


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------- runtime


def test_status_with_the_fake(fake, engine):
    status = engine.cuda_status()
    assert status.usable and status.reason == "" and status.library == fake.path


def test_status_follows_the_env(fake, engine, monkeypatch, tmp_path):
    missing = tmp_path / "libcudart_missing.so"
    monkeypatch.setenv(CUDART_ENV, str(missing))
    status = engine.cuda_status()
    assert not status.usable
    assert str(missing) in status.reason and CUDART_ENV in status.reason
    with pytest.raises(CudaError, match="CUDA is not usable"):
        engine.pinned_pool(0, 1 << 20)
    monkeypatch.setenv(CUDART_ENV, fake.path)
    assert engine.cuda_status().usable


def test_status_without_a_device(fake, engine, monkeypatch):
    monkeypatch.setenv("DCP_NATIVE_FAKE_CUDA_DEVICES", "0")
    status = engine.cuda_status()
    assert not status.usable and "no CUDA device" in status.reason
    assert status.library == fake.path


def test_library_lacking_a_symbol(engine, monkeypatch):
    # The C library is loadable but is no CUDA runtime.
    monkeypatch.setenv(CUDART_ENV, "libc.so.6")
    status = engine.cuda_status()
    assert not status.usable and "symbol cudaGetErrorString missing in libc.so.6" in status.reason


def test_cpu_path_never_looks_up_the_runtime(engine, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the CPU path looked the CUDA runtime up")

    monkeypatch.setattr(_cudart, "find", refuse)
    monkeypatch.setattr(_cudart, "runtime", refuse)
    data = Mem(random.randbytes(10000))
    path = str(tmp_path / "f")
    stats = engine.write(
        [WriteFile(path, b"", array("q", [0, SRC_HOST, data.addr, data.size]), crc_block=4096)],
        threads=2, sync=False, pool=None, direct_io=True,
    )
    assert stats.block_crcs[0] == block_crcs(data.bytes(), 4096)
    out = Mem(size=data.size)
    engine.read([ReadFile(path, data.size, array("q", [0, out.addr, data.size, 0]))], threads=2)
    assert out.bytes() == data.bytes()


# --------------------------------------------------------------------------- pool


def test_pool_sizes_and_validation(fake, engine):
    pool = engine.pinned_pool(0, 10 * 4096 + 5, 3 * 4096 + 1)
    assert (pool.device, pool.capacity, pool.chunk_bytes) == (0, 10 * 4096 + 5, 3 * 4096)
    assert pool.bytes_held == 0  # nothing allocated before use
    assert engine.pinned_pool(0, 8192, 1 << 30).chunk_bytes == 4096
    assert engine.pinned_pool(0, 1 << 20, 100).chunk_bytes == 4096
    with pytest.raises(ValueError, match="two pages"):
        engine.pinned_pool(0, 8191)
    with pytest.raises(ValueError, match="chunk_bytes"):
        engine.pinned_pool(0, 1 << 20, 0)
    with pytest.raises(ValueError, match="device"):
        engine.pinned_pool(-1)


def test_pool_is_reused_bounded_and_freed(fake, engine, tmp_path):
    pool = engine.pinned_pool(0, 4 * 16384, 16384)
    data = Mem(random.randbytes(300000))
    seg = array("q", [0, SRC_DEVICE, data.addr, data.size])
    path = str(tmp_path / "f")
    engine.write([WriteFile(path, b"", seg, device=0)], threads=3, sync=False, pool=pool)
    held = pool.bytes_held
    assert 0 < held <= pool.capacity
    assert fake.counter("pinned_bytes") - fake.pinned0 == held
    allocs = fake.counter("host_allocs")
    for _ in range(3):
        engine.write([WriteFile(path, b"", seg, device=0)], threads=3, sync=False, pool=pool)
        out = Mem(size=data.size)
        engine.read([ReadFile(path, 0, array("q", [0, out.addr, data.size, 0]), device=0)],
                    threads=3, pool=pool)
        assert out.bytes() == data.bytes()
    assert fake.counter("host_allocs") == allocs  # reused, not reallocated
    assert fake.counter("pinned_peak") - fake.pinned0 <= pool.capacity
    assert Path(path).read_bytes() == data.bytes()
    pool.close()
    pool.close()  # idempotent
    assert pool.bytes_held == 0 and fake.counter("pinned_bytes") == fake.pinned0
    with pytest.raises(ValueError, match="closed"):
        engine.write([WriteFile(path, b"", seg, device=0)], threads=1, sync=False, pool=pool)


def test_temporary_pool_is_freed(fake, engine, tmp_path):
    data = Mem(random.randbytes(5000))
    engine.write(
        [WriteFile(str(tmp_path / "f"), b"", array("q", [0, SRC_DEVICE, data.addr, data.size]),
                   device=0)],
        threads=1, sync=False,
    )
    assert fake.counter("host_allocs") >= 1
    assert fake.counter("pinned_bytes") == fake.pinned0
    assert fake.counter("events_live") == fake.events0


def test_foreign_pool_is_refused(fake, engine, tmp_path):
    data = Mem(b"x" * 10)
    with pytest.raises(TypeError, match="pinned_pool"):
        engine.write(
            [WriteFile(str(tmp_path / "f"), b"", array("q", [0, SRC_DEVICE, data.addr, 10]),
                       device=0)],
            threads=1, sync=False, pool=object(),
        )


# --------------------------------------------------------------------------- writes


def _mixed_plan(seed: int, data_size: int) -> tuple[bytes, list]:
    """File content and segments: blob headers, host and device payloads at odd offsets."""
    rng = random.Random(seed)
    segs = []
    content = bytearray()
    keep = []
    while len(content) < data_size:
        kind = rng.choice([SRC_BLOB, SRC_HOST, SRC_DEVICE, SRC_DEVICE])
        length = rng.choice([0, 1, 7, 4095, 4096, 4097, 20000, 70001])
        payload = rng.randbytes(length)
        if kind == SRC_BLOB:
            segs.append((len(content), kind, payload))
        else:
            mem = Mem(payload)
            keep.append(mem)
            segs.append((len(content), kind, mem))
        content += payload
    return bytes(content), segs, keep


def _segments(segs: list) -> tuple[bytes, array]:
    blob = bytearray()
    flat = array("q")
    for offset, kind, source in segs:
        if kind == SRC_BLOB:
            flat.extend([offset, SRC_BLOB, len(blob), len(source)])
            blob += source
        else:
            flat.extend([offset, kind, source.addr, source.size])
    return bytes(blob), flat


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("block", [1, 4096, 4097, 65536])
def test_mixed_writes_and_block_crcs(fake, engine, tmp_path, seed, threads, block):
    """Blocks straddle device pieces, host runs and blob bytes: the CRCs still equal those of
    the file's content."""
    fake.lib.fake_cuda_set_delay_us(50)
    content, segs, _keep = _mixed_plan(seed, 200000 if block > 1 else 30000)
    blob, flat = _segments(segs)
    pool = engine.pinned_pool(0, 3 * 8192, 8192)  # pieces of 8 KiB, three buffers
    path = str(tmp_path / "f")
    stats = engine.write([WriteFile(path, blob, flat, crc_block=block, device=0)],
                         threads=threads, sync=True, chunk_bytes=10000, pool=pool)
    assert Path(path).read_bytes() == content
    assert stats.bytes_written == [len(content)]
    assert stats.block_crcs[0] == block_crcs(content, block)
    assert fake.counter("unpinned_copies") == 0
    pool.close()


def test_several_files_and_devices(fake, engine, tmp_path, monkeypatch):
    monkeypatch.setenv("DCP_NATIVE_FAKE_CUDA_DEVICES", "2")
    fake.lib.cudaSetDevice(1)
    files, expected = [], []
    keep = []
    for i in range(5):
        data = Mem(random.randbytes(50000 + i))
        keep.append(data)
        header = b"h" * (i + 1)
        flat = array("q", [0, SRC_BLOB, 0, len(header), len(header), SRC_DEVICE, data.addr,
                           data.size])
        files.append(WriteFile(str(tmp_path / f"f{i}"), header, flat, crc_block=4096,
                               device=i % 2))
        expected.append(header + data.bytes())
    pool = engine.pinned_pool(0, 4 * 4096, 4096)
    stats = engine.write(files, threads=3, sync=False, pool=pool)
    for f, content, crcs in zip(files, expected, stats.block_crcs):
        assert Path(f.path).read_bytes() == content
        assert crcs == block_crcs(content, 4096)
    assert fake.get_device() == 1  # the caller's device is given back
    pool.close()


def test_waits_for_the_producer_stream(fake, engine, tmp_path):
    """A slow "kernel" on the legacy stream fills the memory: the copy must come after it."""
    size = 100000
    data = Mem(size=size)
    fake.lib.fake_cuda_fill_async(data.addr, 0x5A, size, None, 20000)
    path = str(tmp_path / "f")
    engine.write([WriteFile(path, b"", array("q", [0, SRC_DEVICE, data.addr, size]), device=0,
                            stream=0)], threads=2, sync=False)
    assert Path(path).read_bytes() == b"\x5a" * size
    assert fake.counter("stream_waits") >= 1


def test_copies_overlap_writes(fake, engine, tmp_path):
    """With one thread, the copy of the next piece is in flight while a piece is written."""
    fake.lib.fake_cuda_set_delay_us(5000)
    data = Mem(random.randbytes(16 * 4096))
    pool = engine.pinned_pool(0, 2 * 4096, 4096)
    path = str(tmp_path / "f")
    engine.write([WriteFile(path, b"", array("q", [0, SRC_DEVICE, data.addr, data.size]),
                            device=0)], threads=1, sync=False, pool=pool)
    assert Path(path).read_bytes() == data.bytes()
    assert fake.counter("copies_d2h") == 16
    assert fake.counter("max_in_flight") >= 2
    pool.close()


# --------------------------------------------------------------------------- reads


def test_reads_into_device_memory(fake, engine, tmp_path):
    rows, cols, item = 64, 50, 4
    content = random.randbytes(rows * cols * item + 12345)
    path = tmp_path / "f"
    path.write_bytes(content)
    whole = Mem(size=len(content))
    column = Mem(size=rows * 10 * item)
    copies = array("q", [0, whole.addr, len(content), 0])
    copies.extend([7 * item, column.addr, 10 * item, 1, rows, cols * item, 10 * item])
    pool = engine.pinned_pool(0, 3 * 8192, 8192)
    stats = engine.read([ReadFile(str(path), len(content), copies, device=0)], threads=2,
                        pool=pool)
    assert whole.bytes() == content
    assert column.bytes() == b"".join(
        content[r * cols * item + 7 * item : r * cols * item + 17 * item] for r in range(rows)
    )
    assert fake.counter("copies_2d") >= 1
    assert fake.counter("unpinned_copies") == 0
    assert stats.bytes_read >= len(content)
    pool.close()


def test_device_and_host_files_in_one_read(fake, engine, tmp_path):
    a, b = random.randbytes(30000), random.randbytes(20000)
    (tmp_path / "a").write_bytes(a)
    (tmp_path / "b").write_bytes(b)
    da, hb = Mem(size=len(a)), Mem(size=len(b))
    stats = engine.read(
        [
            ReadFile(str(tmp_path / "a"), 0, array("q", [0, da.addr, len(a), 0]), device=0),
            ReadFile(str(tmp_path / "b"), 0, array("q", [0, hb.addr, len(b), 0]),
                     checks=array("q", [ref_crc32c(b), 1, hb.addr, len(b)])),
        ],
        threads=3,
    )
    assert da.bytes() == a and hb.bytes() == b and stats.failed_checks == []
    assert fake.counter("pinned_bytes") == fake.pinned0
    assert fake.counter("events_live") == fake.events0


def test_device_reads_refuse_checks(fake, engine, tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 10)
    out = Mem(size=10)
    with pytest.raises(ValueError, match="checks"):
        engine.read([ReadFile(str(tmp_path / "f"), 0, array("q", [0, out.addr, 10, 0]),
                              checks=array("q"), device=0)], threads=1)


# --------------------------------------------------------------------------- O_DIRECT


@pytest.fixture
def open_flags(monkeypatch) -> list[int]:
    """Flags of every os.open the engine makes."""
    seen: list[int] = []
    real = os.open

    def recording(path, flags, *args, **kwargs):
        seen.append(flags)
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording)
    return seen


def _takes_o_direct(directory: Path) -> bool:
    try:
        fd = os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize("direct_io", [True, False])
def test_direct_io_for_aligned_pieces(fake, engine, tmp_path, open_flags, direct_io):
    data = Mem(random.randbytes(5 * 4096 + 100))
    header = b"H" * 4096
    flat = array("q", [0, SRC_BLOB, 0, 4096, 4096, SRC_DEVICE, data.addr, data.size])
    path = str(tmp_path / "f")
    pool = engine.pinned_pool(0, 4 * 8192, 8192)
    moved = _direct_io_bytes()
    stats = engine.write([WriteFile(path, header, flat, crc_block=4096, device=0)], threads=2,
                         sync=True, pool=pool, direct_io=direct_io)
    content = header + data.bytes()
    assert Path(path).read_bytes() == content
    assert stats.block_crcs[0] == block_crcs(content, 4096)
    out = Mem(size=len(content))
    engine.read([ReadFile(path, 0, array("q", [0, out.addr, len(content), 0]), device=0)],
                threads=2, pool=pool, direct_io=direct_io)
    assert out.bytes() == content
    direct = [f for f in open_flags if f & os.O_DIRECT]
    # One O_DIRECT descriptor for the write, one for the read, where the filesystem takes it;
    # the device bytes' whole pages go through them, the header and the tail do not.
    used = direct_io and _takes_o_direct(tmp_path)
    assert len(direct) == (2 if used else 0)
    assert _direct_io_bytes() - moved == (2 * 5 * 4096 + 4096 if used else 0)
    pool.close()


@pytest.mark.parametrize("where", ["open", "transfer"])
def test_direct_io_refused_falls_back(fake, engine, tmp_path, monkeypatch, where):
    real_open, real_pwritev, real_preadv = os.open, os.pwritev, os.preadv
    direct_fds: set[int] = set()

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT and where == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def refuse(real):
        def call(fd, buffers, offset):
            if fd in direct_fds:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, buffers, offset)

        return call

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "pwritev", refuse(real_pwritev))
    monkeypatch.setattr(os, "preadv", refuse(real_preadv))
    data = Mem(random.randbytes(8 * 4096))
    path = str(tmp_path / "f")
    before = open_fds()
    engine.write([WriteFile(path, b"", array("q", [0, SRC_DEVICE, data.addr, data.size]),
                            device=0)], threads=3, sync=False)
    assert Path(path).read_bytes() == data.bytes()
    out = Mem(size=data.size)
    engine.read([ReadFile(path, 0, array("q", [0, out.addr, data.size, 0]), device=0)],
                threads=3)
    assert out.bytes() == data.bytes()
    assert open_fds() == before


@pytest.mark.parametrize("refusal", ["open", "transfer"])
def test_no_direct_hook(fake, engine, tmp_path, monkeypatch, refusal):
    monkeypatch.setenv("DCP_NATIVE_TEST_NO_DIRECT", refusal)
    data = Mem(random.randbytes(6 * 4096))
    path = str(tmp_path / "f")
    moved = _direct_io_bytes()
    engine.write([WriteFile(path, b"", array("q", [0, SRC_DEVICE, data.addr, data.size]),
                            device=0)], threads=3, sync=False)
    out = Mem(size=data.size)
    engine.read([ReadFile(path, 0, array("q", [0, out.addr, data.size, 0]), device=0)],
                threads=3)
    assert Path(path).read_bytes() == data.bytes() and out.bytes() == data.bytes()
    assert _direct_io_bytes() == moved


def test_no_direct_hook_bad_value(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("DCP_NATIVE_TEST_NO_DIRECT", "always")
    with pytest.raises(ValueError, match="DCP_NATIVE_TEST_NO_DIRECT"):
        engine.write([WriteFile(str(tmp_path / "f"), b"x", array("q", [0, SRC_BLOB, 0, 1]))],
                     threads=1, sync=False)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("nth", [1, 3])
def test_failed_d2h_copy(fake, engine, tmp_path, threads, nth):
    pool = engine.pinned_pool(0, 2 * 4096, 4096)
    data = Mem(random.randbytes(10 * 4096))
    path = str(tmp_path / "f")
    before = open_fds()
    fake.fail("cudaMemcpyAsync", nth, 700)
    with pytest.raises(CudaError) as info:
        engine.write([WriteFile(path, b"", array("q", [0, SRC_DEVICE, data.addr, data.size]),
                                device=0)], threads=threads, sync=False, pool=pool)
    err = info.value
    assert err.code == 700
    assert "D2H" in err.operation and path in err.operation
    assert f"at offset {(nth - 1) * 4096}" in err.operation
    assert "an illegal memory access was encountered" in str(err)
    assert open_fds() == before
    assert fake.counter("events_live") == fake.events0
    # The pool is usable after the failure.
    engine.write([WriteFile(path, b"", array("q", [0, SRC_DEVICE, data.addr, data.size]),
                            device=0)], threads=threads, sync=False, pool=pool)
    assert Path(path).read_bytes() == data.bytes()
    pool.close()
    assert fake.counter("pinned_bytes") == fake.pinned0


@pytest.mark.parametrize("function", ["cudaMemcpyAsync", "cudaEventSynchronize",
                                      "cudaEventRecord"])
def test_failed_h2d_copy(fake, engine, tmp_path, function):
    content = random.randbytes(10 * 4096)
    path = tmp_path / "f"
    path.write_bytes(content)
    pool = engine.pinned_pool(0, 2 * 4096, 4096)
    out = Mem(size=len(content))
    copies = array("q", [0, out.addr, len(content), 0])
    before = open_fds()
    fake.fail(function, 2, 1)
    with pytest.raises(CudaError) as info:
        engine.read([ReadFile(str(path), 0, copies, device=0)], threads=3, pool=pool)
    assert info.value.code == 1 and str(path) in info.value.operation
    assert "H2D" in info.value.operation and "invalid argument" in str(info.value)
    assert open_fds() == before
    assert fake.counter("events_live") == fake.events0
    engine.read([ReadFile(str(path), 0, copies, device=0)], threads=3, pool=pool)
    assert out.bytes() == content
    pool.close()


def test_failed_pinned_allocation(fake, engine, tmp_path):
    data = Mem(b"x" * 10000)
    fake.fail("cudaHostAlloc", 1, 2)
    with pytest.raises(CudaError, match="cudaHostAlloc.*out of memory"):
        engine.write([WriteFile(str(tmp_path / "f"), b"",
                                array("q", [0, SRC_DEVICE, data.addr, data.size]), device=0)],
                     threads=2, sync=False)
    assert fake.counter("pinned_bytes") == fake.pinned0


def test_io_error_during_device_write(fake, engine, tmp_path, monkeypatch):
    monkeypatch.setenv("DCP_NATIVE_FAULT", "write:ENOSPC:2")
    data = Mem(random.randbytes(10 * 4096))
    pool = engine.pinned_pool(0, 3 * 4096, 4096)
    before = open_fds()
    with pytest.raises(OSError) as info:
        engine.write([WriteFile(str(tmp_path / "f"), b"",
                                array("q", [0, SRC_DEVICE, data.addr, data.size]), device=0)],
                     threads=3, sync=False, pool=pool)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "f")
    assert open_fds() == before
    assert fake.counter("events_live") == fake.events0
    pool.close()


def test_close_refused_while_in_use(fake, engine, tmp_path, monkeypatch):
    pool = engine.pinned_pool(0, 2 * 4096, 4096)
    data = Mem(random.randbytes(4096 * 4))
    errors = []
    real_pwritev = os.pwritev

    def pwritev(fd, buffers, offset):
        try:
            pool.close()
        except ValueError as exc:
            errors.append(exc)
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    path = str(tmp_path / "f")
    engine.write([WriteFile(path, b"", array("q", [0, SRC_DEVICE, data.addr, data.size]),
                            device=0)], threads=1, sync=False, pool=pool)
    assert len(errors) == 4 and "in use" in str(errors[0])
    assert Path(path).read_bytes() == data.bytes()
    pool.close()
    assert pool.bytes_held == 0


def test_many_waiters_on_a_small_pool(fake, engine, tmp_path):
    """Workers that wait for a buffer to issue their own piece stop waiting when another
    worker issues it (a worker waiting while its piece held one of the two buffers used to
    deadlock the call)."""
    rng = random.Random(7)
    pool = engine.pinned_pool(0, 2 * 4096, 4096)
    for round_ in range(25):
        fake.lib.fake_cuda_set_delay_us(rng.choice([0, 50]))
        files, keep, contents = [], [], []
        for i in range(4):
            data = Mem(random.Random(i).randbytes(rng.randrange(1, 12 * 4096)))
            keep.append(data)
            flat = array("q", [0, SRC_BLOB, 0, 10, 10, SRC_DEVICE, data.addr, data.size])
            files.append(WriteFile(str(tmp_path / f"f{i}"), b"h" * 10, flat, crc_block=4096,
                                   device=0))
            contents.append(b"h" * 10 + data.bytes())
        stats = engine.write(files, threads=rng.choice([3, 4, 8]), sync=False, pool=pool)
        for f, content, crcs in zip(files, contents, stats.block_crcs):
            assert Path(f.path).read_bytes() == content, round_
            assert crcs == block_crcs(content, 4096)
        outs = [Mem(size=len(c)) for c in contents]
        engine.read([ReadFile(f.path, 0, array("q", [0, o.addr, len(c), 0]), device=0)
                     for f, o, c in zip(files, outs, contents)], threads=4, pool=pool)
        assert [o.bytes() for o in outs] == contents
    pool.close()
