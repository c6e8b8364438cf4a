"""The fake CUDA runtime of the tests (csrc/testing/fake_cudart.cpp), seen from Python.

The normal build puts the library beside the extension
(dcp_native/_testing_fake_cudart.so); build/ is searched too. :class:`Fake`
wraps its test-only exports (counters, failure injection, delayed "kernels")
and a few runtime calls through ctypes. The ``fake`` fixture (tests/conftest.py)
selects it for both engines through DCP_NATIVE_CUDART and resets its counters
around each test.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

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
