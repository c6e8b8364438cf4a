"""The CUDA runtime for the pure-Python engine, reached through ctypes.

The engine never calls torch.cuda: it sees device addresses, device indices
and stream handles as integers, and moves bytes with the few runtime
functions resolved here. The runtime is not linked or loaded by dcp_native:
it is the one torch has already loaded (``dlopen`` with ``RTLD_NOLOAD`` of
``libcudart.so.13``, ``libcudart.so.12``, then any ``libcudart.so*`` mapped
into the process), or the library ``DCP_NATIVE_CUDART`` names, which is
loaded (the tests' fake runtime). The choice is re-made when that variable
changes, so tests can switch runtimes with monkeypatch.

Nothing here runs on the CPU-only path: the engine asks for the runtime only
for plans with device memory, or when :func:`status` is called.

ctypes calls release the GIL, so copies, event waits and pinned allocations
on worker threads overlap with the file I/O of the others.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

from ._errors import CudaError
from .engine import CUDART_ENV, CudaStatus

#: cudaMemcpyKind values.
HOST_TO_DEVICE = 1
DEVICE_TO_HOST = 2
#: cudaStreamNonBlocking: the copy stream does not synchronize with the legacy default stream.
STREAM_NON_BLOCKING = 1
#: cudaEventBlockingSync | cudaEventDisableTiming: a waiting I/O thread sleeps instead of
#: spinning (other threads need the CPU), and no timing.
EVENT_FLAGS = 0x01 | 0x02
#: cudaHostAllocPortable: pinned for every device, so one pool serves files on any device.
HOST_ALLOC_PORTABLE = 1

_SONAMES = ("libcudart.so.13", "libcudart.so.12")

_p = ctypes.c_void_p
_size = ctypes.c_size_t
_uint = ctypes.c_uint
_int = ctypes.c_int
_pp = ctypes.POINTER(ctypes.c_void_p)
_pint = ctypes.POINTER(ctypes.c_int)

#: Every function the engine needs: name -> argument types (all return cudaError_t).
_SIGNATURES = {
    "cudaGetDeviceCount": (_pint,),
    "cudaGetDevice": (_pint,),
    "cudaSetDevice": (_int,),
    "cudaStreamCreateWithFlags": (_pp, _uint),
    "cudaStreamDestroy": (_p,),
    "cudaStreamSynchronize": (_p,),
    "cudaStreamWaitEvent": (_p, _p, _uint),
    "cudaEventCreateWithFlags": (_pp, _uint),
    "cudaEventRecord": (_p, _p),
    "cudaEventSynchronize": (_p,),
    "cudaEventDestroy": (_p,),
    "cudaMemcpyAsync": (_p, _p, _size, _int, _p),
    "cudaMemcpy2DAsync": (_p, _size, _p, _size, _size, _size, _int, _p),
    "cudaHostAlloc": (_pp, _size, _uint),
    "cudaFreeHost": (_p,),
}


class Runtime:
    """The resolved runtime: checked wrappers of its functions, and one copy stream per device.

    Every wrapper raises :class:`CudaError` for a nonzero ``cudaError_t``,
    named after ``operation`` (the call and what dcp_native was doing with it,
    worded as the native engine words it) and carrying the runtime's own error
    string and code.
    """

    def __init__(self, lib: ctypes.CDLL, library: str) -> None:
        self.library = library
        self._lib = lib
        get_string = lib.cudaGetErrorString
        get_string.argtypes = (_int,)
        get_string.restype = ctypes.c_char_p
        self._error_string = get_string
        get_last = lib.cudaGetLastError
        get_last.argtypes = ()
        get_last.restype = _int
        self._get_last_error = get_last
        for name, argtypes in _SIGNATURES.items():
            function = getattr(lib, name)
            function.argtypes = argtypes
            function.restype = _int
            setattr(self, "_" + name, function)
        self._lock = threading.Lock()
        # Streams live as long as the process (as a CUDA library's own
        # streams do): creating one per call would cost more than the copies
        # of a small save.
        self._streams: dict[int, int] = {}

    def error_text(self, code: int) -> str:
        """The runtime's string for an error code."""
        text = self._error_string(code)
        return text.decode(errors="replace") if text else "unknown CUDA error"

    def clear_last_error(self) -> None:
        """Reset this thread's last error (a failed call sets it; torch checks it after its
        kernel launches, so one left behind would fail the caller's next kernel)."""
        self._get_last_error()

    def error(self, code: int, operation: str) -> CudaError:
        self.clear_last_error()
        return CudaError(f"{operation}: {self.error_text(code)} (cudaError {code})",
                         operation=operation, code=code)

    def _check(self, code: int, operation: str) -> None:
        if code:
            raise self.error(code, operation)

    # ------------------------------------------------------------------ devices

    def device_count(self) -> int:
        count = ctypes.c_int(0)
        self._check(self._cudaGetDeviceCount(ctypes.byref(count)), "cudaGetDeviceCount")
        return count.value

    def get_device(self) -> int:
        device = ctypes.c_int(0)
        self._check(self._cudaGetDevice(ctypes.byref(device)), "cudaGetDevice")
        return device.value

    def set_device(self, device: int) -> None:
        self._check(self._cudaSetDevice(device), f"cudaSetDevice({device})")

    # ------------------------------------------------------------------ streams and events

    def copy_stream(self, device: int) -> int:
        """The engine's non-blocking copy stream on ``device`` (the calling thread's device must
        be ``device``)."""
        stream = self._streams.get(device)
        if stream is not None:
            return stream
        with self._lock:
            stream = self._streams.get(device)
            if stream is None:
                handle = ctypes.c_void_p()
                self._check(
                    self._cudaStreamCreateWithFlags(ctypes.byref(handle), STREAM_NON_BLOCKING),
                    f"cudaStreamCreateWithFlags for the copy stream of device {device}",
                )
                stream = self._streams[device] = handle.value or 0
        return stream

    def stream_synchronize(self, stream: int, operation: str) -> None:
        self._check(self._cudaStreamSynchronize(stream), operation)

    def stream_wait_event(self, stream: int, event: int, operation: str) -> None:
        self._check(self._cudaStreamWaitEvent(stream, event, 0), operation)

    def event_create(self, operation: str) -> int:
        handle = ctypes.c_void_p()
        self._check(
            self._cudaEventCreateWithFlags(ctypes.byref(handle), EVENT_FLAGS),
            operation,
        )
        return handle.value or 0

    def event_record(self, event: int, stream: int, operation: str) -> None:
        self._check(self._cudaEventRecord(event, stream), operation)

    def event_synchronize(self, event: int, operation: str) -> None:
        self._check(self._cudaEventSynchronize(event), operation)

    def event_destroy(self, event: int) -> int:
        """Destroys an event; returns the error code (cleanup paths must go on regardless)."""
        return self._cudaEventDestroy(event)

    # ------------------------------------------------------------------ copies

    def memcpy_async(self, dst: int, src: int, nbytes: int, kind: int, stream: int,
                     operation: str) -> None:
        self._check(self._cudaMemcpyAsync(dst, src, nbytes, kind, stream), operation)

    def memcpy_2d_async(self, dst: int, dpitch: int, src: int, spitch: int, width: int,
                        height: int, kind: int, stream: int, operation: str) -> None:
        self._check(
            self._cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, stream),
            operation,
        )

    # ------------------------------------------------------------------ pinned memory

    def host_alloc(self, nbytes: int, operation: str) -> int:
        pointer = ctypes.c_void_p()
        self._check(
            self._cudaHostAlloc(ctypes.byref(pointer), nbytes, HOST_ALLOC_PORTABLE), operation
        )
        if not pointer.value:
            raise CudaError(f"{operation}: the runtime returned a null pointer",
                            operation=operation)
        return pointer.value

    def free_host(self, address: int) -> int:
        """Frees pinned memory; returns the error code (cleanup paths must go on regardless)."""
        return self._cudaFreeHost(address)


# Runtimes that resolved, by the value of DCP_NATIVE_CUDART ("" when unset), kept
# for the process: streams and pinned memory outlive any one call. A failure is
# not kept: torch may initialize CUDA between two calls.
_lock = threading.Lock()
_runtimes: dict[str, Runtime] = {}

_NOT_LOADED = "libcudart not loaded in this process (import torch and initialise CUDA first)"


def status() -> CudaStatus:
    """Whether the runtime is usable now: found, every needed function resolved, and at least
    one device; and why not."""
    rt, reason = find()
    if rt is None:
        return CudaStatus(False, reason)
    try:
        count = rt.device_count()
    except CudaError as exc:
        return CudaStatus(
            False,
            f"no CUDA device: cudaGetDeviceCount returned cudaError {exc.code} "
            f"({rt.error_text(exc.code)}) in {rt.library}",
            rt.library,
        )
    if count < 1:
        return CudaStatus(False, f"no CUDA device: cudaGetDeviceCount found none in {rt.library}",
                          rt.library)
    return CudaStatus(True, "", rt.library)


def runtime() -> Runtime:
    """The runtime DCP_NATIVE_CUDART selects now, or :class:`CudaError` saying why there is none."""
    rt, reason = find()
    if rt is None:
        raise CudaError(f"CUDA is not usable: {reason}", operation="find the CUDA runtime")
    return rt


def find() -> tuple[Runtime | None, str]:
    """The runtime DCP_NATIVE_CUDART selects now (read at every call), or None and the reason."""
    env = os.environ.get(CUDART_ENV, "")
    rt = _runtimes.get(env)
    if rt is not None:
        return rt, ""
    with _lock:
        rt = _runtimes.get(env)
        if rt is not None:
            return rt, ""
        lib, library, reason = _open(env)
        if lib is None:
            return None, reason
        missing = next((name for name in _NAMES if not _has_symbol(lib, name)), None)
        if missing is not None:
            return None, f"symbol {missing} missing in {library}"
        rt = _runtimes[env] = Runtime(lib, library)
        return rt, ""


_NAMES = ("cudaGetErrorString", "cudaGetLastError", *_SIGNATURES)


def _open(env: str) -> tuple[ctypes.CDLL | None, str, str]:
    """The library the environment selects, its path (or name), or None and the reason."""
    if env:
        try:
            return ctypes.CDLL(env, mode=os.RTLD_NOW | os.RTLD_LOCAL), env, ""
        except OSError as exc:
            return None, "", f"cannot load {CUDART_ENV}={env}: {exc}"
    mapped = _mapped_cudart()
    for name in _SONAMES:
        try:
            lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
        except OSError:
            continue
        # The path says more than a soname where several CUDA versions are installed.
        path = next((p for p in mapped if os.path.basename(p) == name), name)
        return lib, path, ""
    for path in mapped:
        try:
            return ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_NOW), path, ""
        except OSError:
            continue
    return None, "", _NOT_LOADED


def _mapped_cudart() -> list[str]:
    """Paths of libcudart.so* files mapped into this process."""
    paths: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                slash = line.find("/")
                if slash < 0:
                    continue
                path = line[slash:].rstrip("\n")
                if os.path.basename(path).startswith("libcudart.so") and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    return paths


def _has_symbol(lib: ctypes.CDLL, name: str) -> bool:
    try:
        getattr(lib, name)
    except AttributeError:
        return False
    return True


# --------------------------------------------------------------------------- pinned pool

#: Pinned buffers are whole pages, so O_DIRECT can move them in place.
PAGE = 4096


class PinnedBuffer:
    """One page-aligned pinned buffer of a pool: its address and a writable view of it."""

    __slots__ = ("address", "size", "view", "_base")

    def __init__(self, base: int, address: int, size: int) -> None:
        self._base = base
        self.address = address
        self.size = size
        self.view = memoryview((ctypes.c_char * size).from_address(address)).cast("B")


class PinnedPool:
    """The pure-Python engine's :class:`~dcp_native.engine.PinnedPool` (as csrc/pinned_pool.hpp).

    Buffers are allocated with cudaHostAlloc on first use, never more than
    ``capacity // chunk_bytes`` of them, and reused by later calls. Engine
    calls mark the pool in use (:meth:`use`), take buffers with
    :meth:`take_locked` under :attr:`condition` and wait on it when none is
    free; :meth:`release` gives one back and wakes them.
    """

    def __init__(self, rt: Runtime, device: int, capacity: int, chunk_bytes: int) -> None:
        check_pool_arguments(device, capacity, chunk_bytes)
        self.device = device
        self.capacity = capacity
        self.chunk_bytes = buffer_bytes(capacity, chunk_bytes)
        self.runtime = rt
        self.condition = threading.Condition(threading.Lock())
        self._limit = capacity // self.chunk_bytes
        self._free: list[PinnedBuffer] = []
        self._held: list[PinnedBuffer] = []  # every allocated buffer, free or not
        self._reserved = 0  # buffers being allocated
        self._users = 0  # engine calls using the pool now
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"PinnedPool(device={self.device}, capacity={self.capacity}, "
            f"chunk_bytes={self.chunk_bytes}, bytes_held={self.bytes_held})"
        )

    def __del__(self) -> None:
        # A pool dropped without close() still gives its pinned memory back
        # (as the native pool's destructor does), unless the interpreter is
        # going away and the runtime with it.
        if not getattr(self, "_closed", True) and self._held and not sys.is_finalizing():
            for buffer in self._held:
                self.runtime.free_host(buffer._base)
            self._held.clear()

    def __enter__(self) -> "PinnedPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def bytes_held(self) -> int:
        with self.condition:
            return len(self._held) * self.chunk_bytes

    def use(self) -> None:
        """Marks the pool in use by an engine call (close() refuses then); ValueError when
        closed. :meth:`unuse` ends it."""
        with self.condition:
            if self._closed:
                raise ValueError("the pinned pool is closed")
            self._users += 1

    def unuse(self) -> None:
        with self.condition:
            self._users -= 1

    def take_locked(self):
        """A free buffer, :data:`ALLOCATE` when the caller may allocate one (then it must call
        :meth:`allocate`), or None when every buffer is in use. Call with :attr:`condition`
        held."""
        if self._free:
            return self._free.pop()
        if len(self._held) + self._reserved < self._limit:
            self._reserved += 1
            return ALLOCATE
        return None

    def allocate(self) -> PinnedBuffer:
        """Allocates the buffer :meth:`take_locked` reserved (outside the lock: pinning takes
        milliseconds). Leaves the calling thread on the pool's device."""
        size = self.chunk_bytes
        what = f"cudaHostAlloc of {size} bytes for the pinned pool of device {self.device}"
        try:
            # On the pool's device: a thread that has not chosen one would make the runtime
            # set up device 0 for it.
            self.runtime.set_device(self.device)
            base = self.runtime.host_alloc(size, what)
            if base % PAGE:
                # The runtime's allocations are page-aligned; this keeps the promise
                # with any runtime, at the cost of one page.
                self.runtime.free_host(base)
                base = self.runtime.host_alloc(size + PAGE, what)
            buffer = PinnedBuffer(base, -(-base // PAGE) * PAGE, size)
        except BaseException:
            with self.condition:
                self._reserved -= 1
                self.condition.notify_all()  # the slot it reserved is free again
            raise
        with self.condition:
            self._reserved -= 1
            self._held.append(buffer)
        return buffer

    def release(self, buffer: PinnedBuffer) -> None:
        """Gives a buffer back (no copy uses it any more) and wakes the waiters."""
        with self.condition:
            self._free.append(buffer)
            self.condition.notify_all()

    def close(self) -> None:
        """Frees every buffer (idempotent); ValueError while an engine call uses the pool."""
        with self.condition:
            if self._users > 0:
                raise ValueError("the pinned pool is in use by an engine call and cannot be closed")
            self._closed = True
            held, self._held, self._free = self._held, [], []
        if not held:
            return
        rt = self.runtime
        # On the pool's device (a thread without one would make the runtime set up device 0),
        # and the thread's own device back afterwards; every buffer is freed even if a runtime
        # call fails, and the first failure is reported.
        codes = []
        previous = ctypes.c_int(-1)
        codes.append(rt._cudaGetDevice(ctypes.byref(previous)))
        codes.append(rt._cudaSetDevice(self.device))
        failed_frees = [code for code in (rt.free_host(b._base) for b in held) if code]
        if previous.value >= 0:
            codes.append(rt._cudaSetDevice(previous.value))
        first = next(iter(failed_frees), 0)
        if first:
            raise rt.error(first, f"cudaFreeHost of the pinned pool of device {self.device}")
        first = next((code for code in codes if code), 0)
        if first:
            raise rt.error(first, f"cudaGetDevice/cudaSetDevice({self.device}) around cudaFreeHost "
                                  f"of the pinned pool of device {self.device}")


#: take_locked's answer when the caller may allocate a new buffer.
ALLOCATE = object()


def buffer_bytes(capacity: int, chunk_bytes: int) -> int:
    """The buffer size of a pool: ``min(chunk_bytes, capacity // 2)`` rounded down to whole pages
    (at least one), so that a pool holds at least two buffers (one filled while the other is
    emptied)."""
    return max(PAGE, min(chunk_bytes, capacity // 2) // PAGE * PAGE)


def check_pool_arguments(device: int, capacity: int, chunk_bytes: int) -> None:
    if device < 0:
        raise ValueError(f"device must be a CUDA device index (>= 0), got {device}")
    if capacity < 2 * PAGE:
        raise ValueError(
            f"capacity must be at least two pages ({2 * PAGE} bytes) for double buffering, "
            f"got {capacity}"
        )
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be at least 1, got {chunk_bytes}")
