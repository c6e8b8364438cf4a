"""The native engine against the real CUDA runtime library, on a machine without a GPU.

The fake runtime of the other device tests is written from the same declarations as the
engine's, so it cannot catch a wrong name, a missing export or a misread error. Here the real
``libcudart.so.13`` of the ``nvidia-cuda-runtime`` wheel (the one torch's CUDA builds load; `make
venv` installs it as a test dependency) is loaded both ways the engine finds a runtime: named by
``DCP_NATIVE_CUDART``, and already loaded into the process (as torch loads it). Every function the
engine resolves must be exported, and ``cuda_status()`` must report the driver and device state in
CUDA's own words. Each check runs in a fresh process: a runtime once loaded stays mapped, and
other tests expect a process without one.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_cudart

ROOT = Path(__file__).resolve().parents[2]


def _wheel_runtime() -> str:
    try:
        dist = importlib.metadata.distribution("nvidia-cuda-runtime")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the nvidia-cuda-runtime wheel is not installed (`make venv` installs it; "
                    "without network it cannot): no real CUDA runtime to check against")
    found = [f for f in dist.files or () if f.name.startswith("libcudart.so.")]
    if not found:
        pytest.skip(f"nvidia-cuda-runtime {dist.version} holds no libcudart.so.*")
    return str(dist.locate_file(found[0]))


def _in_fresh_process(code: str, **env: str) -> dict:
    pytest.importorskip("dcp_native._C")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DCP_NATIVE_")}
    environ.update(env)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=environ, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


_STATUS = """
import ctypes, json
import dcp_native._C as C
from dcp_native._engine_native import NativeEngine
from dcp_native import CudaError
if {preload}:
    ctypes.CDLL({library!r}, mode=ctypes.RTLD_GLOBAL)
handle = ctypes.CDLL({library!r})
missing = [name for name in C.CUDA_SYMBOLS if not hasattr(handle, name)]
status = NativeEngine().cuda_status()
try:
    NativeEngine().pinned_pool(0, 1 << 20, 1 << 16).close()
    pool_error = None
except CudaError as exc:
    pool_error = str(exc)
print(json.dumps({{"missing": missing, "symbols": list(C.CUDA_SYMBOLS), "usable": status.usable,
                  "reason": status.reason, "library": status.library, "pool_error": pool_error}}))
"""

#: What cudaGetDeviceCount may say on a machine without a usable GPU, by CUDA's names.
_NO_GPU = ("cudaErrorInsufficientDriver", "cudaErrorNoDevice", "cudaErrorNotPermitted",
           "cudaErrorSystemDriverMismatch", "cudaErrorCompatNotSupportedOnDevice")


def _check_status(result: dict, library: str) -> None:
    assert result["missing"] == [], f"{library} lacks {result['missing']}"
    assert len(result["symbols"]) >= 18 and "cudaHostRegister" in result["symbols"]
    if result["usable"]:  # a GPU machine: torch's CUDA build may have loaded its own copy first
        assert result["reason"] == "" and result["pool_error"] is None
        assert os.path.basename(result["library"]).startswith("libcudart.so")
        return
    assert os.path.realpath(result["library"]) == os.path.realpath(library)
    reason = result["reason"]
    assert "symbol" not in reason, reason  # every symbol resolved: the runtime itself answered
    name = reason.split("cudaGetDeviceCount failed with ", 1)[1].split(" ", 1)[0]
    assert name in _NO_GPU, reason
    if name == "cudaErrorInsufficientDriver":
        assert reason.startswith("no NVIDIA driver, or one older than the runtime: cudaGetDeviceCount failed "
                                 "with cudaErrorInsufficientDriver (35): CUDA driver version is insufficient")
    assert reason.endswith(f"(runtime {result['library']})")
    assert result["pool_error"] is not None and name in result["pool_error"]


def test_named_runtime_resolves_and_reports_the_driver_state():
    library = _wheel_runtime()
    result = _in_fresh_process(_STATUS.format(preload=False, library=library), DCP_NATIVE_CUDART=library)
    _check_status(result, library)


def test_runtime_loaded_by_the_process_is_found():
    """As after `import torch` on a CUDA build: the runtime is mapped, DCP_NATIVE_CUDART unset."""
    library = _wheel_runtime()
    result = _in_fresh_process(_STATUS.format(preload=True, library=library))
    _check_status(result, library)


def test_without_a_loaded_runtime_nothing_is_loaded():
    """Without DCP_NATIVE_CUDART the engine only looks for a runtime the process has loaded:
    it loads none itself, so a CPU-only process never maps one."""
    _wheel_runtime()
    result = _in_fresh_process(
        "import json\nfrom dcp_native._engine_native import NativeEngine\n"
        "status = NativeEngine().cuda_status()\n"
        "mapped = 'libcudart' in open('/proc/self/maps').read()\n"
        "print(json.dumps({'usable': status.usable, 'reason': status.reason, 'mapped': mapped}))")
    if result["usable"] or "cudaGetDeviceCount" in result["reason"]:
        pytest.skip("this torch loads a CUDA runtime at import")
    assert result == {"usable": False, "mapped": False, "reason": result["reason"]}
    assert result["reason"].startswith("libcudart not loaded in this process")
