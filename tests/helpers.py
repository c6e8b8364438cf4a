"""What the tests share, in one module (no test file is imported as a library).

Sections:

* checkpoint files and errors: the files of a checkpoint directory, DCP's wrapped errors,
  a forked child, a call bounded by a timeout (for FIFOs that would block an open);
* one-process saves and loads: a state dict, ``save`` / ``load`` through dcp_native, ``same``;
* dtypes: every dtype torch can save, deterministic tensors of any dtype, their bytes;
* multi-rank runs: ``run_ranks`` (gloo ranks on this machine);
* the fake CUDA runtime: where it is built, and its test-only exports through ctypes;
* engine plans: host memory with raw addresses, segments and boxes, reference CRCs.

dcp_native tags every file of a save with the save's tag
(``__0_0.1a2b3c4d.distcp``, see dcp_native.commit); stock's files have none.
"""

from __future__ import annotations

import ctypes
import datetime
import itertools
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import shutil
import signal
import tempfile
import time
import traceback
from array import array
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest
import torch

from dcp_native._crc32c import _crc32c_python as ref_crc32c
from dcp_native.engine import SRC_BLOB, SRC_HOST


# ==================== checkpoint files and errors ================================================

_DATA = re.compile(r"^__(\d+)_(\d+)(?:\.[0-9a-f]{8})?\.distcp$")


def failure(exc_info) -> BaseException:
    """The error a rank raised: DCP wraps per-rank failures in CheckpointException.

    Takes a pytest ``ExceptionInfo`` or an exception.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    exc = getattr(exc_info, "value", exc_info)
    if isinstance(exc, CheckpointException):
        return next(iter(exc.failures.values()))[0]
    return exc


def data_files(path) -> list[str]:
    """Names of the data files in ``path``, sorted by (rank, number)."""
    found = []
    for name in os.listdir(path):
        m = _DATA.match(name)
        if m:
            found.append(((int(m.group(1)), int(m.group(2))), name))
    return [name for _, name in sorted(found)]


def data_file(path, rank: int = 0, n: int = 0) -> str:
    """The full path of data file ``n`` of ``rank`` (the only one with that number)."""
    names = [
        name for name in data_files(path) if _DATA.match(name).groups()[:2] == (str(rank), str(n))
    ]
    assert len(names) == 1, (path, rank, n, sorted(os.listdir(path)))
    return os.path.join(str(path), names[0])


def sidecar_file(path) -> str:
    """The full path of the sidecar of the committed checkpoint in ``path``."""
    import io

    from dcp_native import sidecar
    from dcp_native._safe_pickle import load_metadata

    with open(os.path.join(path, ".metadata"), "rb") as f:
        md = load_metadata(io.BytesIO(f.read()), ".metadata")
    return os.path.join(str(path), sidecar.file_name(".metadata", md.storage_meta.save_id))


def in_child(fn: Callable[[], str]) -> tuple[int, str]:
    """Run ``fn()`` in a forked child; returns (exit code, what it wrote to the pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.write(w, fn().encode())
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported through the pipe
            os.write(w, repr(exc).encode()[:4000])
        finally:
            os._exit(code)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status), out.decode()


#: Long enough for a slow shared machine, short enough that a hang fails quickly.
HANG_TIMEOUT_S = 15.0


def unblock_fifo(path: str) -> None:
    """Opens the FIFO at both ends for a moment, so that an open() blocked on it returns."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
    except OSError:
        pass


def bounded(call: Callable[[], Any], *, fifo: str | None = None) -> Any:
    """``call()`` in a daemon thread; its result, or its exception re-raised here.

    If it is still running after HANG_TIMEOUT_S, the FIFO is opened to release it and the
    test fails: something opened a non-regular file without O_NONBLOCK.
    """
    import threading

    box: dict = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="bounded-call", daemon=True)
    thread.start()
    thread.join(HANG_TIMEOUT_S)
    if thread.is_alive():
        if fifo is not None:
            unblock_fifo(fifo)
        thread.join(5.0)
        pytest.fail(f"blocked for {HANG_TIMEOUT_S:.0f} s with {fifo} in the checkpoint "
                    "(a blocking open?)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def bounded_error(call: Callable[[], Any], *, fifo: str | None = None) -> Exception | None:
    """:func:`bounded`, but the exception ``call()`` raised is returned (None if it returned)."""
    try:
        bounded(call, fifo=fifo)
    except Exception as exc:  # noqa: BLE001 - a hang (pytest.fail) is not an Exception
        return exc
    return None


# ==================== one-process saves and loads ================================================


def state(scale: float, n: int = 4, rows: int = 64, cols: int = 129) -> dict:
    """A state dict of ``n`` float tensors of growing size, a small one and an object."""
    g = torch.Generator().manual_seed(int(scale * 1000))
    sd = {f"w{i}": torch.randn(rows * (i + 1), cols, generator=g) * scale for i in range(n)}
    sd["small"] = torch.arange(5.0) * scale
    sd["step"] = int(scale * 10)
    return sd


def save(sd: dict, path, **kw) -> None:
    """``dcp.save`` through dcp_native's writer, checksums on unless ``checksums=`` says."""
    import torch.distributed.checkpoint as dcp

    import dcp_native

    kw.setdefault("checksums", True)
    dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(path, **kw), no_dist=True)


def blank(like: dict) -> dict:
    """Destinations for ``like``: tensors full of -7, objects -1."""
    return {
        k: torch.full_like(v, -7.0) if isinstance(v, torch.Tensor) else -1 for k, v in like.items()
    }


def load(path, like: dict, reader=None, **reader_kw) -> dict:
    """``dcp.load`` of ``like``'s keys (dcp_native's reader unless ``reader``); the values."""
    import torch.distributed.checkpoint as dcp

    import dcp_native

    out = blank(like)
    reader = reader or dcp_native.FileSystemReader(path, **reader_kw)
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


def same(a: dict, b: dict) -> bool:
    """Equal values, key by key (tensors exactly)."""
    return all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


# ==================== dtypes =====================================================================
# The dtype table shared by the format and interop tests: every dtype torch can save.

_CANDIDATES = [
    "float64", "float32", "float16", "bfloat16",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "int64", "int32", "int16", "int8",
    "uint64", "uint32", "uint16", "uint8",
    "bool",
    "complex128", "complex64", "complex32",
    "bits8", "bits16",
]

DTYPES = [getattr(torch, name) for name in _CANDIDATES if hasattr(torch, name)]
#: DCP's own planning cannot size the bits* dtypes (torch._utils._element_size fails),
#: so checkpoints of them cannot exist; the item format still handles them.
DCP_DTYPES = [d for d in DTYPES if not str(d).startswith("torch.bits")]


def make_tensor(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    """Deterministic values of any dtype, built from random bytes (covers every bit pattern)."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for s in shape:
        numel *= s
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return (raw % 2).to(torch.bool).reshape(shape)
    return raw.view(dtype).reshape(shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, to compare values exactly whatever the dtype (NaNs included)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.view(torch.uint8)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's bytes as Python bytes (without needing numpy)."""
    b = bits(t)
    return ctypes.string_at(b.data_ptr(), b.numel()) if b.numel() else b""


def blank_like(t: torch.Tensor) -> torch.Tensor:
    """A zero-filled tensor like ``t``, for any dtype (some have no fill kernel)."""
    out = torch.empty(t.shape, dtype=t.dtype)
    if out.numel():
        out.reshape(-1).view(torch.uint8).zero_()
    return out


# ==================== multi-rank runs ============================================================
# Run a function on N gloo ranks on this machine, for the multi-rank tests.
#
# ``run_ranks(world_size, fn, *args, engine=..., timeout=...)`` starts one
# process per rank, joins them into a gloo process group through a FileStore in
# a fresh temporary directory, calls ``fn(*args)`` on every rank and returns the
# per-rank return values (rank order). What it guarantees:
#
# * an exception on any rank is raised here as :class:`RankError`, with the
#   remote traceback of every rank that failed (the first failure first: later
#   ones are usually peers noticing that the failed rank went away);
# * a rank that dies without reporting (a crash in native code) is named with
#   its exit code or signal;
# * nothing hangs: past ``timeout`` every rank still running is killed and
#   :class:`RankTimeout` says which ranks had not finished; after a failure the
#   other ranks get a short grace period before they are killed;
# * every rank destroys its process group on the way out.
#
# Processes are forked: a fork costs milliseconds where a spawn re-imports
# torch (seconds per rank), and forking a process that has imported torch but
# never initialised a process group is what torch's own DataLoader workers do.
# The children start from the pytest process's state (imported modules, the
# warning filters of the running test), so ``fn`` may be a local function or
# closure. ``DCP_NATIVE_TEST_START_METHOD=spawn`` switches to spawn, which needs
# ``fn`` and its arguments to be picklable and importable.

#: Seconds the other ranks get to report after one rank failed, before they are killed.
FAILURE_GRACE_S = 5.0


class RankError(RuntimeError):
    """One or more ranks raised (or died); the message holds their remote tracebacks.

    Attributes:
        failures: ``{rank: (exception type name, formatted traceback)}``.
    """

    def __init__(self, message: str, failures: dict[int, tuple[str, str]]) -> None:
        super().__init__(message)
        self.failures = failures


class RankTimeout(RankError):
    """The ranks did not all finish within the timeout and were killed."""


def _worker(
    rank: int,
    world_size: int,
    store_path: str,
    engine: str | None,
    pg_timeout_s: float,
    conn: multiprocessing.connection.Connection,
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
) -> None:
    import torch
    import torch.distributed as dist

    if engine is not None:
        os.environ["DCP_NATIVE_BACKEND"] = engine
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    # Several ranks share few cores: intra-op threads would only oversubscribe them.
    torch.set_num_threads(1)
    message: tuple
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        try:
            message = ("ok", fn(*args, **kwargs))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        message = ("error", type(exc).__name__, traceback.format_exc())
    try:
        conn.send(message)
    except Exception as exc:  # an unpicklable return value
        conn.send(("error", type(exc).__name__, f"rank {rank} result cannot be sent: {exc!r}\n"))
    conn.close()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _start_method() -> str:
    method = os.environ.get("DCP_NATIVE_TEST_START_METHOD", "fork")
    if method not in multiprocessing.get_all_start_methods():
        raise ValueError(f"DCP_NATIVE_TEST_START_METHOD={method!r} is not available here")
    return method


def run_ranks(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    engine: str | None = None,
    timeout: float = 120.0,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return each rank's result.

    Args:
        world_size: number of ranks (processes).
        fn: called once per rank after ``init_process_group``; it finds its rank
            with ``torch.distributed.get_rank()``. Its return value must pickle.
        engine: value of ``DCP_NATIVE_BACKEND`` in every rank (``None``: inherited).
        timeout: seconds for the whole run, start-up included; then every rank is killed.

    Raises:
        RankError: a rank raised or died; the message has every remote traceback.
        RankTimeout: the run took longer than ``timeout``.

    Example:
        >>> import torch.distributed as dist
        >>> run_ranks(2, dist.get_rank)
        [0, 1]
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    ctx = multiprocessing.get_context(_start_method())
    tmpdir = tempfile.mkdtemp(prefix="dcp_native_dist_")
    store_path = os.path.join(tmpdir, "store")
    deadline = time.monotonic() + timeout
    procs: list[multiprocessing.process.BaseProcess] = []
    conns: list[multiprocessing.connection.Connection] = []
    try:
        for rank in range(world_size):
            parent_conn, child_conn = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker,
                args=(rank, world_size, store_path, engine, timeout, child_conn, fn, args, kwargs),
                name=f"dcp_native-rank{rank}",
                daemon=True,
            )
            proc.start()
            child_conn.close()
            procs.append(proc)
            conns.append(parent_conn)
        return _collect(procs, conns, deadline, timeout)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(5)
        for conn in conns:
            conn.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


def _collect(
    procs: list[multiprocessing.process.BaseProcess],
    conns: list[multiprocessing.connection.Connection],
    deadline: float,
    timeout: float,
) -> list[Any]:
    world_size = len(procs)
    results: dict[int, Any] = {}
    failures: dict[int, tuple[str, str]] = {}  # insertion order = order of arrival
    pending = set(range(world_size))
    by_conn = {id(c): r for r, c in enumerate(conns)}
    by_sentinel = {p.sentinel: r for r, p in enumerate(procs)}
    failed_at: float | None = None

    while pending:
        now = time.monotonic()
        limit = deadline if failed_at is None else min(deadline, failed_at + FAILURE_GRACE_S)
        if now >= limit:
            break
        waitables: list[Any] = [conns[r] for r in pending] + [procs[r].sentinel for r in pending]
        ready = multiprocessing.connection.wait(waitables, timeout=limit - now)
        for obj in ready:
            rank = by_conn.get(id(obj))
            if rank is None:
                rank = by_sentinel.get(obj)
            if rank is None or rank not in pending:
                continue
            message = None
            if conns[rank].poll():
                try:
                    message = conns[rank].recv()
                except (EOFError, OSError):
                    message = None
            if message is None:
                if obj is conns[rank] or procs[rank].exitcode is None:
                    # The pipe closed: the process is exiting; its sentinel will follow.
                    procs[rank].join(1)
                how = _describe_exit(procs[rank].exitcode)
                failures[rank] = ("died", f"rank {rank} ended without reporting ({how})\n")
            elif message[0] == "ok":
                results[rank] = message[1]
            else:
                failures[rank] = (message[1], message[2])
            pending.discard(rank)
            if rank in failures and failed_at is None:
                failed_at = time.monotonic()

    if pending and not failures:
        raise RankTimeout(
            f"{world_size}-rank run timed out after {timeout:.0f} s; ranks "
            f"{sorted(pending)} had not finished (killed)",
            {r: ("timeout", "") for r in pending},
        )
    if failures:
        parts = []
        for i, (rank, (name, text)) in enumerate(failures.items()):
            tag = "first failure" if i == 0 else "then"
            parts.append(f"----- rank {rank} of {world_size} ({tag}): {name} -----\n{text}")
        if pending:
            parts.append(f"----- ranks {sorted(pending)} had not finished and were killed -----\n")
        first_rank, (first_name, first_text) = next(iter(failures.items()))
        last_line = first_text.strip().splitlines()[-1] if first_text.strip() else first_name
        raise RankError(f"rank {first_rank}: {last_line}\n" + "\n".join(parts), failures)
    return [results[r] for r in range(world_size)]


# ==================== the fake CUDA runtime ======================================================
# The fake CUDA runtime of the tests (csrc/testing/fake_cudart.cpp), seen from Python.
#
# The normal build puts the library beside the extension
# (dcp_native/_testing_fake_cudart.so); build/ is searched too. :class:`Fake`
# wraps its test-only exports (counters, failure injection, delayed "kernels")
# and a few runtime calls through ctypes. The ``fake`` fixture (tests/conftest.py)
# selects it for both engines through DCP_NATIVE_CUDART and resets its counters
# around each test.

ROOT = Path(__file__).resolve().parent.parent
FAKE_NAME = "_testing_fake_cudart.so"


def fake_path() -> Path | None:
    beside = ROOT / "dcp_native" / FAKE_NAME
    if beside.exists():
        return beside
    return next(iter(sorted((ROOT / "build").glob(f"**/{FAKE_NAME}"))), None)


class Fake:
    """The fake runtime's test-only exports (and a few runtime calls) through ctypes."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        lib = self.lib = ctypes.CDLL(self.path)
        lib.fake_cuda_counter.restype = ctypes.c_longlong
        lib.fake_cuda_counter.argtypes = (ctypes.c_char_p,)
        lib.fake_cuda_fail.argtypes = (ctypes.c_char_p, ctypes.c_longlong, ctypes.c_int)
        lib.fake_cuda_write_async.argtypes = (
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_longlong
        )
        lib.fake_cuda_fill_async.argtypes = (
            ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_longlong
        )
        lib.fake_cuda_set_delay_us.argtypes = (ctypes.c_longlong,)
        lib.cudaStreamCreateWithFlags.argtypes = (ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint)
        lib.cudaStreamDestroy.argtypes = (ctypes.c_void_p,)
        lib.cudaStreamSynchronize.argtypes = (ctypes.c_void_p,)
        lib.cudaSetDevice.argtypes = (ctypes.c_int,)
        lib.cudaGetDevice.argtypes = (ctypes.POINTER(ctypes.c_int),)
        #: Live counters an earlier failed test may have left behind (set by the fixture).
        self.pinned0 = 0
        self.events0 = 0

    def counter(self, name: str) -> int:
        value = self.lib.fake_cuda_counter(name.encode())
        assert value >= 0, f"unknown fake counter {name}"
        return value

    def fail(self, function: str, nth: int, code: int) -> None:
        self.lib.fake_cuda_fail(function.encode(), nth, code)

    def delay(self, us: int) -> None:
        self.lib.fake_cuda_set_delay_us(us)

    def stream(self) -> int:
        handle = ctypes.c_void_p()
        assert self.lib.cudaStreamCreateWithFlags(ctypes.byref(handle), 1) == 0
        return handle.value

    def kernel_write(self, dest: int, source: int, n: int, stream: int, delay_us: int) -> None:
        """Queues a "kernel" on ``stream`` that writes ``n`` bytes at ``dest`` after a delay."""
        self.lib.fake_cuda_write_async(dest, source, n, stream, delay_us)

    def get_device(self) -> int:
        device = ctypes.c_int(-1)
        assert self.lib.cudaGetDevice(ctypes.byref(device)) == 0
        return device.value

    def device_calls(self, device: int) -> tuple[int, str]:
        """How many calls acted on ``device`` since the reset, and the first one's name."""
        self.lib.fake_cuda_first_call.restype = ctypes.c_char_p
        return self.lib.fake_cuda_device_calls(device), self.lib.fake_cuda_first_call(device).decode()


class Pretend:
    """Makes the CPU tensors a test registers stand for memory on CUDA device ``device``:
    dcp_native._device's two questions are answered for them (which device, and the legacy
    stream), and the fake runtime treats host memory as device memory."""

    def __init__(self, monkeypatch, device: int = 0) -> None:
        from dcp_native import _device

        self.device = device
        self.storages: set[int] = set()
        monkeypatch.setattr(_device, "cuda_index", self.cuda_index)
        monkeypatch.setattr(_device, "current_stream", lambda device: 0)

    def __call__(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            self.storages.add(t.untyped_storage().data_ptr())

    def cuda_index(self, tensor: torch.Tensor) -> int:
        if tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr() in self.storages:
            return self.device
        return -1


# ==================== engine plans ===============================================================

SIZES = (0, 1, 4095, 4096, 4097, (1 << 20) + 3)
THREADS = (1, 3, 16)

class Mem:
    """Host memory with a raw address: a bytearray pinned by a ctypes view."""

    def __init__(self, size: int = 0, *, data: bytes | None = None, fill: int = 0) -> None:
        if data is not None:
            size = len(data)
        self.size = size
        self.buf = bytearray(data) if data is not None else bytearray([fill]) * size
        if not self.buf:
            self.buf = bytearray(1)  # an address needs at least one byte
        self._pin = (ctypes.c_char * len(self.buf)).from_buffer(self.buf)
        self.addr = ctypes.addressof(self._pin)

    def bytes(self) -> bytes:
        return bytes(self.buf[: self.size])


def pattern(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def segments(*segs: tuple[int, int, int, int]) -> array:
    return array("q", [v for seg in segs for v in seg])


def blob_seg(offset: int, source: int, length: int) -> tuple[int, int, int, int]:
    return (offset, SRC_BLOB, source, length)


def host_seg(offset: int, address: int, length: int) -> tuple[int, int, int, int]:
    return (offset, SRC_HOST, address, length)


def box(file_offset, dest, inner, counts=(), file_strides=(), dest_strides=()) -> list[int]:
    assert len(counts) == len(file_strides) == len(dest_strides)
    return [file_offset, dest, inner, len(counts), *counts, *file_strides, *dest_strides]


def copies(*boxes: list[int]) -> array:
    return array("q", [v for b in boxes for v in b])


def apply_box(data: bytes, dest: bytearray, file_offset, dest_offset, inner, counts=(),
              file_strides=(), dest_strides=()) -> None:
    """Reference semantics of one box (dest_offset relative to ``dest``)."""
    for idx in itertools.product(*(range(c) for c in counts)):
        f = file_offset + sum(i * s for i, s in zip(idx, file_strides))
        d = dest_offset + sum(i * s for i, s in zip(idx, dest_strides))
        dest[d : d + inner] = data[f : f + inner]


def write_file(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def both_engines():
    pytest.importorskip("dcp_native._C")
    from dcp_native._engine_native import NativeEngine
    from dcp_native._engine_python import PythonEngine

    return NativeEngine(), PythonEngine()


def block_crcs(content: bytes, block: int) -> array:
    """Reference: the CRC32C of every block, by the pure-Python implementation."""
    return array("I", (ref_crc32c(content[k : k + block]) for k in range(0, len(content), block)))


def contiguous_plan(rng: random.Random, lengths, host: Mem, blob: bytes) -> tuple[array, bytes]:
    """Segments of the given lengths covering [0, sum) without holes, blob and host
    alternating at random, listed in random order; returns them and the file content."""
    segs, content, offset = [], bytearray(), 0
    for length in lengths:
        if rng.random() < 0.5:
            source = rng.randrange(0, len(blob) - length + 1)
            segs.append(blob_seg(offset, source, length))
            content += blob[source : source + length]
        else:
            source = rng.randrange(0, host.size - length + 1)
            segs.append(host_seg(offset, host.addr + source, length))
            content += host.buf[source : source + length]
        offset += length
    rng.shuffle(segs)
    return segments(*segs), bytes(content)
