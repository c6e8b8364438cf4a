"""The GPU path of the engine seam against the fake CUDA runtime (csrc/testing/fake_cudart.cpp).

No GPU is needed: the fake runtime is a small library the normal build puts
beside the extension (dcp_native/_testing_fake_cudart.so; build/ is searched
too). Its "device memory" is host memory, so torch CPU tensors stand for
device tensors (their data_ptr() is the device address). Its streams run
copies on their own threads after a delay, so a missing synchronisation
shows up as wrong data rather than passing by luck.

The runtime is chosen by DCP_NATIVE_CUDART, which both engines re-read at
every call, so the tests set it with monkeypatch in this process (no
subprocess). The fake's counters are process-wide; the ``fake`` fixture
resets them around each test.

The GPU path is the native engine's (the Python engine moves host memory
only, see test_python_engine_is_host_only), so every test here runs on it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import random
import threading
import time
from array import array
from pathlib import Path

import pytest
import torch

from helpers import FAKE_NAME
from dcp_native import CudaError
from dcp_native._crc32c import crc32c
from dcp_native.config import CUDART_ENV
from dcp_native.engine import (
    CudaStatus,
    DEFAULT_DEVICE_CHUNK_BYTES,
    DEFAULT_STAGING_BYTES,
    SRC_BLOB,
    SRC_DEVICE,
    SRC_HOST,
    ReadFile,
    WriteFile,
)
from dcp_native.integrity import Table

pytestmark = pytest.mark.fake_cuda


@pytest.fixture
def engine_name(monkeypatch) -> str:
    """The native engine only: it is the one GPU path (overrides conftest's two engines)."""
    native_c()
    monkeypatch.setenv("DCP_NATIVE_BACKEND", "native")
    return "native"

NOT_LOADED = "libcudart not loaded in this process (import torch and initialise CUDA first)"
ILLEGAL_ADDRESS = 700
OUT_OF_MEMORY = 2
PAGE = 4096
#: Every call of a test must return within this many seconds (a hang fails, not blocks).
TIMEOUT = 60


# --------------------------------------------------------------------------- helpers


def device_tensor(data: bytes) -> torch.Tensor:
    """A CPU tensor standing for device memory holding ``data`` (at least one byte)."""
    t = torch.empty(max(len(data), 1), dtype=torch.uint8)
    if data:
        t[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return t


def tensor_bytes(t: torch.Tensor, n: int | None = None) -> bytes:
    return t.numpy().tobytes()[:n]


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def segs(*tuples) -> array:
    return array("q", [v for t in tuples for v in t])


def expected_crcs(content: bytes, block: int) -> list[int]:
    return [crc32c(content[i : i + block]) for i in range(0, len(content), block)]


def call(fn, *args, **kwargs):
    """fn(*args, **kwargs) on a thread, failing the test if it does not return in TIMEOUT."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    if thread.is_alive():
        pytest.fail(f"engine call did not return within {TIMEOUT} s (hang)")
    if "error" in result:
        raise result["error"]
    return result["value"]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Layout:
    """One file of random blob/host/device segments covering it without holes."""

    def __init__(self, rng: random.Random, path: Path, n_segments: int, max_len: int) -> None:
        self.path = path
        self.blob = bytearray()
        self.keep = []  # memory behind the addresses
        self.content = bytearray()
        self.segments = array("q")
        self.device_runs = []  # (file offset, length) of device segments
        offset = 0
        for _ in range(n_segments):
            kind = rng.choice((SRC_BLOB, SRC_HOST, SRC_DEVICE, SRC_DEVICE))
            length = rng.choice((0, 1, rng.randrange(1, max_len), PAGE, rng.randrange(max_len)))
            data = rng.randbytes(length)
            if kind == SRC_BLOB:
                source = len(self.blob)
                self.blob += data
            else:
                t = device_tensor(data)
                self.keep.append(t)
                source = t.data_ptr()
                if kind == SRC_DEVICE and length:
                    self.device_runs.append((offset, length))
            self.segments.extend((offset, kind, source, length))
            self.content += data
            offset += length

    def write_file(self, crc_block: int, stream: int = 0) -> WriteFile:
        return WriteFile(str(self.path), bytes(self.blob), self.segments, crc_block, 0, stream)


# --------------------------------------------------------------------------- runtime status


def test_status_with_the_fake(engine, fake):
    status = engine.cuda_status()
    assert status.usable, status.reason
    assert status.reason == ""
    assert os.path.basename(status.library) == FAKE_NAME


def _real_cudart_mapped() -> bool:
    with open("/proc/self/maps") as maps:
        return any("libcudart.so" in line and FAKE_NAME not in line for line in maps)


def test_status_without_a_loaded_runtime(engine, fake, monkeypatch):
    monkeypatch.delenv(CUDART_ENV)
    status = engine.cuda_status()
    if _real_cudart_mapped():
        # A CUDA build of torch loads its runtime at import: found, usable or not.
        assert "libcudart.so" in status.library and (status.usable or "cudaGetDeviceCount failed" in status.reason)
    else:
        assert not status.usable
        assert status.reason == NOT_LOADED
    # The env var switches back at the next call.
    monkeypatch.setenv(CUDART_ENV, fake.path)
    assert engine.cuda_status().usable


def test_status_library_missing(engine, fake, monkeypatch, tmp_path):
    missing = str(tmp_path / "no_such_cudart.so")
    monkeypatch.setenv(CUDART_ENV, missing)
    status = engine.cuda_status()
    assert not status.usable
    assert missing in status.reason
    with pytest.raises(CudaError, match="no_such_cudart"):
        engine.pinned_pool(0, 1 << 20, 1 << 16)


def test_status_symbol_missing(engine, fake, monkeypatch):
    libc = ctypes.util.find_library("c")
    assert libc
    monkeypatch.setenv(CUDART_ENV, libc)
    status = engine.cuda_status()
    assert not status.usable
    assert "symbol cuda" in status.reason and "missing in" in status.reason
    assert "libc" in status.reason
    if engine.name == "native":
        assert status.reason.startswith("symbol cudaGetErrorName missing in ")


def test_status_no_device(engine, fake, monkeypatch):
    monkeypatch.setenv("DCP_NATIVE_FAKE_CUDA_DEVICES", "0")
    status = engine.cuda_status()
    assert not status.usable
    # CUDA's own name for the state, its code and words.
    assert status.reason.startswith(
        "no CUDA device: cudaGetDeviceCount failed with cudaErrorNoDevice (100): no CUDA-capable device")
    with pytest.raises(CudaError, match="cudaErrorNoDevice"):
        engine.pinned_pool(0, 1 << 20, 1 << 16)


def test_device_memory_needs_a_pool(engine, fake, monkeypatch, tmp_path):
    """Pools live across calls (unpinning can stall the device): a call with device memory and
    no pool is refused before any I/O, and without a runtime no pool can be made."""
    t = device_tensor(b"x" * 100)
    path = tmp_path / "f"
    with pytest.raises(ValueError, match="device 0.* needs a pinned pool"):
        engine.write([WriteFile(str(path), b"", segs((0, SRC_DEVICE, t.data_ptr(), 100)), 0, 0)],
                     threads=1, sync=False)
    path.write_bytes(b"y" * 100)
    with pytest.raises(ValueError, match="needs a pinned pool"):
        engine.read([ReadFile(str(path), 0, array("q", [0, t.data_ptr(), 100, 0]), None, 0)], threads=1)
    assert tensor_bytes(t, 100) == b"x" * 100 and path.read_bytes() == b"y" * 100
    assert fake.counter("host_allocs") == 0
    monkeypatch.setenv(CUDART_ENV, str(tmp_path / "absent.so"))
    with pytest.raises(CudaError) as info:
        engine.pinned_pool(0, 1 << 20, 1 << 16)
    assert info.value.code is None and "absent.so" in str(info.value)


# --------------------------------------------------------------------------- pools


def test_pool_geometry(engine, fake):
    pool = engine.pinned_pool(0, 10 * PAGE + 5, 3 * PAGE + 7)
    assert (pool.device, pool.capacity, pool.chunk_bytes, pool.bytes_held) == (
        0, 10 * PAGE + 5, 3 * PAGE, 0)
    pool.close()
    small = engine.pinned_pool(0, 2 * PAGE, 1 << 20)
    assert small.chunk_bytes == PAGE  # at least two buffers
    small.close()
    default = engine.pinned_pool(0)
    assert (default.capacity, default.chunk_bytes) == (
        DEFAULT_STAGING_BYTES, DEFAULT_DEVICE_CHUNK_BYTES)
    default.close()
    with pytest.raises(ValueError):
        engine.pinned_pool(0, 2 * PAGE - 1, PAGE)


def test_pool_reuse_and_close(engine, fake, tmp_path):
    pool = engine.pinned_pool(0, 4 * PAGE, PAGE)
    baseline = fake.counter("pinned_bytes")
    data = pattern(10 * PAGE + 3, 1)
    src = device_tensor(data)
    dest = device_tensor(bytes(len(data)))
    path = tmp_path / "f"
    held, allocs = [], []
    for _ in range(3):
        call(engine.write, [WriteFile(str(path), b"", segs((0, SRC_DEVICE, src.data_ptr(),
                                                            len(data))), 0, 0)],
             threads=2, sync=False, pool=pool)
        call(engine.read, [ReadFile(str(path), 0, array("q", [0, dest.data_ptr(), len(data), 0]),
                                    None, 0)], threads=2, pool=pool)
        assert tensor_bytes(dest, len(data)) == data
        held.append(pool.bytes_held)
        allocs.append(fake.counter("host_allocs"))
    assert held[0] == held[1] == held[2] <= 4 * PAGE
    assert allocs[0] == allocs[1] == allocs[2] == held[0] // PAGE
    assert fake.counter("pinned_bytes") - baseline == held[0]
    pool.close()
    assert pool.bytes_held == 0
    assert fake.counter("pinned_bytes") == baseline
    assert fake.counter("host_frees") == allocs[0]
    pool.close()  # idempotent
    with pytest.raises(ValueError):
        engine.write([WriteFile(str(path), b"", segs((0, SRC_DEVICE, src.data_ptr(), 10)), 0, 0)],
                     threads=1, sync=False, pool=pool)


# --------------------------------------------------------------------------- writes and reads


CHUNK = 4 * PAGE


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("size", [1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 5 * CHUNK + 7])
def test_round_trip_sizes_around_chunk(engine, fake, tmp_path, size, threads):
    """A header, a page-aligned device payload and a trailer; pieces at, under and over a chunk."""
    pool = engine.pinned_pool(0, 3 * CHUNK, CHUNK)
    data = pattern(size, size)
    src = device_tensor(data)
    header, trailer = pattern(100, 1), pattern(33, 2)
    path = tmp_path / "f.distcp"
    plan = segs((0, SRC_BLOB, 0, 100), (PAGE, SRC_DEVICE, src.data_ptr(), size),
                (100, SRC_BLOB, 100, PAGE - 100), (PAGE + size, SRC_BLOB, PAGE, 33))
    blob = header + bytes(PAGE - 100) + trailer
    stats = call(engine.write, [WriteFile(str(path), blob, plan, PAGE, 0)],
                 threads=threads, sync=True, pool=pool)
    content = header + bytes(PAGE - 100) + data + trailer
    assert path.read_bytes() == content
    assert stats.bytes_written == [len(content)]
    assert list(stats.block_crcs[0]) == expected_crcs(content, PAGE)

    dest = device_tensor(bytes(size))
    call(engine.read, [ReadFile(str(path), len(content),
                                array("q", [PAGE, dest.data_ptr(), size, 0]), None, 0)],
         threads=threads, pool=pool)
    assert tensor_bytes(dest, size) == data
    assert fake.counter("unpinned_copies") == 0
    assert fake.counter("bytes_d2h") == size
    assert fake.counter("bytes_h2d") == size
    pool.close()


@pytest.mark.parametrize("seed", range(6))
def test_random_layouts_bytes_and_block_crcs(engine, fake, tmp_path, seed):
    """Several files of mixed segments: contents, and block CRCs straddling every boundary."""
    rng = random.Random(seed)
    chunk = rng.choice((PAGE, 2 * PAGE))
    pool = engine.pinned_pool(0, rng.choice((2, 3, 5)) * chunk, chunk)
    layouts = [Layout(rng, tmp_path / f"f{i}", rng.randrange(1, 12), 3 * chunk)
               for i in range(rng.randrange(1, 4))]
    blocks = [rng.choice((1000, PAGE, 3 * PAGE + 5, 1 << 20)) for _ in layouts]
    stats = call(engine.write, [lay.write_file(b) for lay, b in zip(layouts, blocks)],
                 threads=rng.choice((1, 2, 4)), sync=False, pool=pool,
                 chunk_bytes=rng.choice((PAGE, 1 << 20)))
    for lay, block, crcs in zip(layouts, blocks, stats.block_crcs):
        assert lay.path.read_bytes() == bytes(lay.content)
        assert list(crcs) == expected_crcs(bytes(lay.content), block)

    # Read every device segment back into fresh device memory.
    reads, dests = [], []
    for lay in layouts:
        plan = array("q")
        for offset, length in lay.device_runs:
            dest = device_tensor(bytes(length))
            dests.append((dest, lay.content[offset : offset + length]))
            plan.extend((offset, dest.data_ptr(), length, 0))
        reads.append(ReadFile(str(lay.path), len(lay.content), plan, None, 0))
    call(engine.read, reads, threads=rng.choice((1, 3)), pool=pool)
    for dest, expected in dests:
        assert tensor_bytes(dest, len(expected)) == bytes(expected)
    assert fake.counter("unpinned_copies") == 0
    pool.close()


@pytest.mark.parametrize("legacy", [False, True], ids=["own_stream", "legacy_stream"])
def test_copies_wait_for_the_producer_stream(engine, fake, tmp_path, legacy):
    """A delayed "kernel" on the producer stream writes the tensor; the file gets its bytes."""
    size = 3 * PAGE + 5
    final = pattern(size, 7)
    source = device_tensor(final)
    t = device_tensor(bytes(size))  # zeros until the kernel runs
    stream = 0 if legacy else fake.stream()
    fake.kernel_write(t.data_ptr(), source.data_ptr(), size, stream, 50_000)
    path = tmp_path / "f"
    pool = engine.pinned_pool(0, 4 * PAGE, PAGE)
    call(engine.write, [WriteFile(str(path), b"", segs((0, SRC_DEVICE, t.data_ptr(), size)), 0, 0,
                                  stream)], threads=2, sync=False, pool=pool)
    assert path.read_bytes() == final
    assert fake.counter("stream_waits") >= 1
    pool.close()


def test_pool_of_two_buffers_many_pieces_no_deadlock(engine, fake, tmp_path):
    pool = engine.pinned_pool(0, 2 * PAGE, PAGE)
    files, contents, keep = [], [], []
    for i in range(4):
        data = pattern(40 * PAGE + i, i)
        t = device_tensor(data)
        keep.append(t)
        contents.append(data)
        files.append(WriteFile(str(tmp_path / f"f{i}"), b"h" * 10,
                               segs((0, SRC_BLOB, 0, 10), (10, SRC_DEVICE, t.data_ptr(), len(data))),
                               PAGE, 0))
    fake.delay(50)
    stats = call(engine.write, files, threads=4, sync=False, pool=pool)
    for f, data, crcs in zip(files, contents, stats.block_crcs):
        content = b"h" * 10 + data
        assert Path(f.path).read_bytes() == content
        assert list(crcs) == expected_crcs(content, PAGE)
    dests = [device_tensor(bytes(len(d))) for d in contents]
    reads = [ReadFile(f.path, 0, array("q", [10, d.data_ptr(), len(c), 0]), None, 0)
             for f, d, c in zip(files, dests, contents)]
    call(engine.read, reads, threads=4, pool=pool)
    assert [tensor_bytes(d, len(c)) for d, c in zip(dests, contents)] == contents
    assert pool.bytes_held <= 2 * PAGE
    assert fake.counter("pinned_peak") <= fake.counter("pinned_bytes") + 2 * PAGE
    assert fake.counter("max_in_flight") <= 2
    pool.close()


def test_copies_overlap_file_io(engine, fake, tmp_path):
    """Timing-free evidence of pipelining: a copy is queued before the previous one ran."""
    pool = engine.pinned_pool(0, 4 * PAGE, PAGE)
    data = pattern(32 * PAGE, 3)
    src = device_tensor(data)
    path = tmp_path / "f"
    fake.delay(2000)
    call(engine.write, [WriteFile(str(path), b"", segs((0, SRC_DEVICE, src.data_ptr(), len(data))),
                                  0, 0)], threads=1, sync=False, pool=pool)
    assert path.read_bytes() == data
    assert fake.counter("max_in_flight") >= 2
    fake.lib.fake_cuda_reset()
    fake.delay(2000)
    dest = device_tensor(bytes(len(data)))
    call(engine.read, [ReadFile(str(path), 0, array("q", [0, dest.data_ptr(), len(data), 0]),
                                None, 0)], threads=1, pool=pool)
    assert tensor_bytes(dest) == data
    assert fake.counter("max_in_flight") >= 2
    pool.close()


def test_column_slice_uses_memcpy2d(engine, fake, tmp_path):
    rows, cols, c0, c1 = 64, 48, 5, 29  # float32 row-major in the file
    matrix = torch.randn(rows, cols)
    path = tmp_path / "m"
    path.write_bytes(matrix.numpy().tobytes())
    width = (c1 - c0) * 4
    dest = torch.zeros(rows, c1 - c0)
    box = [c0 * 4, dest.data_ptr(), width, 1, rows, cols * 4, width]
    pool = engine.pinned_pool(0, 4 * PAGE, 2 * PAGE)
    stats = call(engine.read, [ReadFile(str(path), 0, array("q", box), None, 0)],
                 threads=2, pool=pool)
    assert torch.equal(dest, matrix[:, c0:c1])
    assert fake.counter("copies_2d") >= 1
    assert fake.counter("copies_h2d") < rows  # not one copy per row
    assert stats.bytes_read > 0

    # The other direction: contiguous rows in the file into a strided destination.
    wide = torch.zeros(rows, cols + 16)
    box = [0, wide.data_ptr(), cols * 4, 1, rows, cols * 4, (cols + 16) * 4]
    fake.lib.fake_cuda_reset()
    call(engine.read, [ReadFile(str(path), 0, array("q", box), None, 0)], threads=1, pool=pool)
    assert torch.equal(wide[:, :cols], matrix)
    assert torch.count_nonzero(wide[:, cols:]) == 0
    assert fake.counter("copies_2d") >= 1
    pool.close()


@pytest.mark.parametrize("legacy", [False, True], ids=["own_stream", "legacy_stream"])
def test_reads_wait_for_the_consumer_stream(engine, fake, tmp_path, legacy):
    """A delayed "kernel" queued on the consumer's stream before the read writes the
    destination (the fill of a fresh tensor): the loaded bytes must come after it."""
    size = 5 * PAGE + 3
    data = pattern(size, 11)
    path = tmp_path / "f"
    path.write_bytes(data)
    stale = device_tensor(b"\xee" * size)
    dest = device_tensor(bytes(size))
    stream = 0 if legacy else fake.stream()
    fake.kernel_write(dest.data_ptr(), stale.data_ptr(), size, stream, 50_000)
    pool = engine.pinned_pool(0, 4 * PAGE, 2 * PAGE)
    read = ReadFile(str(path), 0, array("q", [0, dest.data_ptr(), size, 0]), None, 0, stream)
    call(engine.read, [read], threads=2, pool=pool)
    assert tensor_bytes(dest, size) == data
    assert fake.counter("stream_waits") >= 1
    pool.close()


def test_2d_copies_stay_within_one_box(engine, fake, tmp_path):
    """Runs of two different destinations never share a 2-D copy, even at a regular pitch:
    the rows of one cudaMemcpy2DAsync must lie in one allocation."""
    n, parts = 256, 6
    data = pattern(n * parts, 3)
    path = tmp_path / "f"
    path.write_bytes(data)
    arena = device_tensor(bytes(2 * n * parts))  # destinations at a regular pitch of 2n
    records = []
    for k in range(parts):
        records += [k * n, arena.data_ptr() + 2 * n * k, n, 0]
    pool = engine.pinned_pool(0, 4 * PAGE, 2 * PAGE)
    call(engine.read, [ReadFile(str(path), 0, array("q", records), None, 0)], threads=1, pool=pool)
    got = tensor_bytes(arena, 2 * n * parts)
    assert [got[2 * n * k: 2 * n * k + n] for k in range(parts)] == [data[k * n:(k + 1) * n] for k in range(parts)]
    assert fake.counter("copies_2d") == 0
    assert fake.counter("copies_h2d") == parts
    pool.close()


def test_failed_call_leaves_no_last_error_on_the_callers_thread(engine, fake, tmp_path):
    """A failed runtime call sets the thread's last error; the engine resets it, or torch
    would raise it after the caller's next kernel launch."""
    fake.lib.fake_cuda_peek_last_error.restype = ctypes.c_int
    path = tmp_path / "f"
    path.write_bytes(pattern(PAGE, 1))
    dest = device_tensor(bytes(PAGE))
    pool = engine.pinned_pool(0, 4 * PAGE, 2 * PAGE)
    # The consumer-stream event is recorded before any worker starts (on an engine thread).
    fake.fail("cudaEventRecord", 1, ILLEGAL_ADDRESS)
    read = ReadFile(str(path), 0, array("q", [0, dest.data_ptr(), PAGE, 0]), None, 0)

    def read_then_peek():
        try:
            engine.read([read], threads=2, pool=pool)
        except CudaError as exc:
            return exc, fake.lib.fake_cuda_peek_last_error()  # on the calling thread
        return None, None

    error, last = call(read_then_peek)
    assert error is not None and error.code == ILLEGAL_ADDRESS and "consumer stream" in error.operation
    assert last == 0
    pool.close()


def test_dropped_pool_frees_its_memory(engine, fake, tmp_path):
    """A pool nobody closed frees its pinned buffers when the last reference goes."""
    import gc

    data = pattern(3 * PAGE, 5)
    src = device_tensor(data)
    pool = engine.pinned_pool(0, 4 * PAGE, PAGE)
    call(engine.write, [WriteFile(str(tmp_path / "f"), b"", segs((0, SRC_DEVICE, src.data_ptr(), len(data))),
                                  0, 0)], threads=2, sync=False, pool=pool)
    assert pool.bytes_held > 0 and fake.counter("pinned_bytes") > fake.pinned0
    del pool
    gc.collect()
    assert fake.counter("pinned_bytes") == fake.pinned0


def test_host_and_device_files_in_one_read(engine, fake, tmp_path):
    data = pattern(5 * PAGE + 11, 5)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(data)
    b.write_bytes(data[::-1])
    host = bytearray(len(data))
    host_addr = ctypes.addressof((ctypes.c_char * len(host)).from_buffer(host))
    dev = device_tensor(bytes(len(data)))
    pool = engine.pinned_pool(0, 4 * PAGE, PAGE)
    call(engine.read, [ReadFile(str(a), 0, array("q", [0, host_addr, len(data), 0])),
                       ReadFile(str(b), 0, array("q", [0, dev.data_ptr(), len(data), 0]), None, 0)],
         threads=2, pool=pool)
    assert bytes(host) == data
    assert tensor_bytes(dev, len(data)) == data[::-1]
    assert fake.counter("bytes_h2d") == len(data)
    pool.close()


@pytest.mark.parametrize("chunk", [4096, 1 << 16])
def test_device_reads_checked_in_pinned_buffers(engine, fake, tmp_path, chunk):
    """A table checks device reads as it checks host ones (widened to whole blocks, the
    same failures and stats), in the pinned buffers, before the bytes reach the device."""
    data = pattern(200_000, 7)
    path = tmp_path / "f"
    path.write_bytes(data)
    crcs = array("I", (crc32c(data[k : k + 4096]) for k in range(0, len(data), 4096)))
    crcs[3] ^= 1
    crcs[40] ^= 1
    table = Table(4096, len(data), crcs)
    # A column of a 400 x 500 matrix of bytes, and a run inside block 3.
    col = device_tensor(bytes(400 * 100))
    run = device_tensor(bytes(100))
    plan = array("q", [0, col.data_ptr(), 100, 1, 400, 500, 100, 13_000, run.data_ptr(), 100, 0])
    pool = engine.pinned_pool(0, 4 * chunk, chunk)
    stats = call(engine.read, [ReadFile(str(path), 0, plan, table=table, device=0)], threads=3,
                 chunk_bytes=chunk, pool=pool)
    host = bytearray(40_100)
    addr = ctypes.addressof((ctypes.c_char * len(host)).from_buffer(host))
    host_plan = array("q", [0, addr, 100, 1, 400, 500, 100, 13_000, addr + 40_000, 100, 0])
    expected = engine.read([ReadFile(str(path), 0, host_plan, table=table)], threads=3,
                           chunk_bytes=chunk)
    assert stats.failed_blocks == expected.failed_blocks == [(0, 3), (0, 40)]
    assert bytes(host[:40_000]) == tensor_bytes(col, 40_000)
    assert tensor_bytes(col, 40_000) == b"".join(data[i * 500 : i * 500 + 100] for i in range(400))
    assert tensor_bytes(run, 100) == data[13_000:13_100]
    pool.close()


def test_device_segment_needs_a_device(engine, fake, tmp_path):
    dev = device_tensor(b"x" * 100)
    path = tmp_path / "f"
    with pytest.raises(ValueError):
        engine.write([WriteFile(str(path), b"", segs((0, SRC_DEVICE, dev.data_ptr(), 100)))],
                     threads=1, sync=False)
    assert not path.exists()


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("function,nth,code,text", [
    ("cudaMemcpyAsync", 3, ILLEGAL_ADDRESS, "an illegal memory access was encountered"),
    ("cudaEventSynchronize", 2, ILLEGAL_ADDRESS, "an illegal memory access was encountered"),
    ("cudaHostRegister", 2, OUT_OF_MEMORY, "out of memory"),
])
def test_write_cuda_failure(engine, fake, tmp_path, function, nth, code, text):
    pool = engine.pinned_pool(0, 4 * PAGE, PAGE)
    data = pattern(20 * PAGE, 9)
    src = device_tensor(data)
    files = [WriteFile(str(tmp_path / f"f{i}"), b"", segs((0, SRC_DEVICE, src.data_ptr(),
                                                          len(data))), PAGE, 0)
             for i in range(2)]
    fds = open_fds()
    fake.fail(function, nth, code)
    with pytest.raises(CudaError) as info:
        call(engine.write, files, threads=3, sync=False, pool=pool)
    err = info.value
    assert err.code == code
    assert text in str(err) and f"cudaError{'IllegalAddress' if code == ILLEGAL_ADDRESS else 'MemoryAllocation'} ({code})" in str(err)
    assert function in err.operation or function in str(err)
    if function == "cudaMemcpyAsync":
        assert "D2H" in err.operation and str(tmp_path) in err.operation
        assert "offset" in err.operation
    assert open_fds() == fds
    # The pool is whole again: the same call succeeds and allocates nothing new.
    held = pool.bytes_held
    stats = call(engine.write, files, threads=3, sync=False, pool=pool)
    for f, crcs in zip(files, stats.block_crcs):
        assert Path(f.path).read_bytes() == data
        assert list(crcs) == expected_crcs(data, PAGE)
    assert pool.bytes_held >= held
    pool.close()
    assert pool.bytes_held == 0


@pytest.mark.parametrize("function,nth", [
    ("cudaMemcpyAsync", 4), ("cudaMemcpy2DAsync", 1), ("cudaEventSynchronize", 1),
])
def test_read_cuda_failure(engine, fake, tmp_path, function, nth):
    rows, cols = 64, 32
    matrix = torch.randn(rows, cols)
    path = tmp_path / "m"
    path.write_bytes(matrix.numpy().tobytes() * 4)
    whole = torch.zeros(rows * 4, cols)
    column = torch.zeros(rows, 8)
    plan = array("q", [0, whole.data_ptr(), rows * cols * 16, 0])
    plan.extend([4 * 4, column.data_ptr(), 32, 1, rows, cols * 4, 32])
    pool = engine.pinned_pool(0, 4 * PAGE, PAGE)
    fds = open_fds()
    fake.fail(function, nth, ILLEGAL_ADDRESS)
    with pytest.raises(CudaError) as info:
        call(engine.read, [ReadFile(str(path), 0, plan, None, 0)], threads=2, pool=pool)
    assert info.value.code == ILLEGAL_ADDRESS
    assert "an illegal memory access was encountered" in str(info.value)
    assert function in info.value.operation or function in str(info.value)
    assert open_fds() == fds
    call(engine.read, [ReadFile(str(path), 0, plan, None, 0)], threads=2, pool=pool)
    assert torch.equal(whole[:rows], matrix) and torch.equal(column, matrix[:, 4:12])
    pool.close()


def test_close_while_in_use_is_refused(engine, fake, tmp_path):
    pool = engine.pinned_pool(0, 2 * PAGE, PAGE)
    data = pattern(8 * PAGE, 4)
    src = device_tensor(data)
    fake.delay(100_000)  # 8 pieces: the write lasts most of a second
    path = tmp_path / "f"
    done = threading.Event()

    def write():
        try:
            engine.write([WriteFile(str(path), b"", segs((0, SRC_DEVICE, src.data_ptr(),
                                                          len(data))), 0, 0)],
                         threads=1, sync=False, pool=pool)
        finally:
            done.set()

    thread = threading.Thread(target=write)
    thread.start()
    time.sleep(0.15)
    try:
        if not done.is_set():
            with pytest.raises(ValueError, match="in use"):
                pool.close()
    finally:
        thread.join(TIMEOUT)
    assert path.read_bytes() == data
    pool.close()
    assert pool.bytes_held == 0


# --------------------------------------------------------------------------- native only


def native_c():
    return pytest.importorskip("dcp_native._C")


def o_direct_works(directory: Path) -> bool:
    probe = directory / ".o_direct_probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o644)
    except OSError:
        return False
    try:
        import mmap

        buf = mmap.mmap(-1, PAGE)
        try:
            os.pwrite(fd, buf, 0)
        except OSError:
            return False
        return True
    finally:
        os.close(fd)
        probe.unlink()


@pytest.mark.parametrize("mode", ["direct", "buffered", "refused_open", "refused_transfer"])
def test_o_direct_and_fallback(fake, tmp_path, monkeypatch, mode):
    C = native_c()
    from dcp_native._engine_native import NativeEngine

    engine = NativeEngine()
    if mode.startswith("refused"):
        monkeypatch.setenv("DCP_NATIVE_TEST_NO_DIRECT", mode.split("_")[1])
    pool = engine.pinned_pool(0, 4 * CHUNK, CHUNK)
    data = pattern(7 * CHUNK + 100, 11)  # unaligned tail: buffered for the last piece
    src = device_tensor(data)
    path = tmp_path / "f"
    before = C._direct_io_bytes()
    stats = call(engine.write, [WriteFile(str(path), b"h" * PAGE,
                                          segs((0, SRC_BLOB, 0, PAGE),
                                               (PAGE, SRC_DEVICE, src.data_ptr(), len(data))),
                                          PAGE, 0)],
                 threads=2, sync=True, pool=pool, direct_io=mode != "buffered")
    content = b"h" * PAGE + data
    assert path.read_bytes() == content
    assert list(stats.block_crcs[0]) == expected_crcs(content, PAGE)
    written_direct = C._direct_io_bytes() - before
    dest = device_tensor(bytes(len(data)))
    call(engine.read, [ReadFile(str(path), 0, array("q", [PAGE, dest.data_ptr(), len(data), 0]),
                                None, 0)], threads=2, pool=pool, direct_io=mode != "buffered")
    assert tensor_bytes(dest, len(data)) == data
    read_direct = C._direct_io_bytes() - before - written_direct
    if mode == "direct":
        if o_direct_works(tmp_path):
            assert written_direct == len(data) // PAGE * PAGE
            assert read_direct == len(data) // PAGE * PAGE
    else:
        assert written_direct == 0 and read_direct == 0
    pool.close()


@pytest.mark.parametrize("op", ["write", "read"])
@pytest.mark.parametrize("errno_name", ["EINVAL", "EFAULT", "EOPNOTSUPP"])
def test_first_direct_transfer_refused_falls_back(fake, tmp_path, monkeypatch, op, errno_name):
    """Any refusal of a file's first O_DIRECT transfer (alignment, pages the kernel cannot pin,
    a filesystem without support) makes that file buffered; the same error on a later direct
    transfer is a real failure and raises."""
    C = native_c()
    from dcp_native._engine_native import NativeEngine

    if not o_direct_works(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT itself")
    engine = NativeEngine()
    pool = engine.pinned_pool(0, 4 * CHUNK, CHUNK)
    data = pattern(3 * CHUNK, 12)
    src, dest = device_tensor(data), device_tensor(bytes(len(data)))
    path = tmp_path / "f"
    write = [WriteFile(str(path), b"", segs((0, SRC_DEVICE, src.data_ptr(), len(data))), 0, 0)]
    read = [ReadFile(str(path), 0, array("q", [0, dest.data_ptr(), len(data), 0]), None, 0)]
    if op == "read":
        call(engine.write, write, threads=1, sync=False, pool=pool)
    monkeypatch.setenv("DCP_NATIVE_FAULT", f"{op}:{errno_name}:1")  # the first transfer: a direct one
    before = C._direct_io_bytes()
    call(engine.write if op == "write" else engine.read, write if op == "write" else read,
         threads=1, pool=pool, **({"sync": False} if op == "write" else {}))
    assert C._direct_io_bytes() == before  # the whole file went buffered
    if op == "write":
        assert path.read_bytes() == data
    else:
        assert tensor_bytes(dest, len(data)) == data
    monkeypatch.setenv("DCP_NATIVE_FAULT", f"{op}:{errno_name}:2")  # after one direct transfer worked
    with pytest.raises(OSError) as info:
        call(engine.write if op == "write" else engine.read, write if op == "write" else read,
             threads=1, pool=pool, **({"sync": False} if op == "write" else {}))
    assert info.value.errno == getattr(errno, errno_name) and info.value.filename == str(path)
    pool.close()


def test_no_direct_env_is_validated(fake, tmp_path, monkeypatch):
    native_c()
    from dcp_native._engine_native import NativeEngine

    monkeypatch.setenv("DCP_NATIVE_TEST_NO_DIRECT", "sometimes")
    with pytest.raises(ValueError, match="DCP_NATIVE_TEST_NO_DIRECT"):
        NativeEngine().write([WriteFile(str(tmp_path / "f"), b"x", segs((0, SRC_BLOB, 0, 1)))],
                             threads=1, sync=False)


def test_crc32c_combine():
    C = native_c()
    rng = random.Random(5)
    for _ in range(200):
        a = rng.randbytes(rng.randrange(0, 300))
        b = rng.randbytes(rng.choice((0, 1, rng.randrange(0, 70000))))
        assert C.crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)


def test_python_engine_is_host_only(tmp_path, monkeypatch):
    """The Python engine has no GPU path: not usable, no pools, device plans refused."""
    from dcp_native._engine_python import HOST_ONLY, PythonEngine

    engine = PythonEngine()
    assert engine.cuda_status() == CudaStatus(False, HOST_ONLY)
    with pytest.raises(CudaError, match="host memory only"):
        engine.pinned_pool(0)
    src = device_tensor(b"x" * 100)
    path = str(tmp_path / "f")
    segments = array("q", (0, SRC_DEVICE, src.data_ptr(), 100))
    for device, what in ((0, "device 0"), (-1, "SRC_DEVICE")):
        with pytest.raises(ValueError, match=f"{what}: the Python engine moves host memory only"):
            engine.write([WriteFile(path, b"", segments, device=device)], threads=1, sync=False)
    with pytest.raises(ValueError, match="device 0: the Python engine moves host memory only"):
        engine.read([ReadFile(path, 0, array("q"), None, 0)], threads=1)
