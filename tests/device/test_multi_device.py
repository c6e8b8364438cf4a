"""The GPU path on a multi-GPU node: no runtime call acts on a device other than the tensors' own.

The CUDA runtime acts on the calling thread's current device, and its first call there creates
that device's primary context (hundreds of MiB). A thread starts on device 0, so on an 8-GPU
node an engine thread that makes a runtime call before selecting the device, a guard that
"restores" device 0 when a thread ends, or a call made on the caller's thread while it sits on
device 0 would put a context of every rank on GPU 0. A single-GPU test cannot see this.

The fake runtime (two devices here) records the device every call acts on. With the "device"
tensors on device 1 and the caller's thread on device 1 (as after torch.cuda.set_device(1)) or
left on device 0 (a process that never selected a device, with tensors on cuda:1), a save, a
verified load, an async save that stages asynchronously, and closing the pools must leave
device 0 untouched and the caller's current device as it was.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import dcp_native
from helpers import Pretend, failure

pytestmark = [pytest.mark.fake_cuda, pytest.mark.multi_device]


@pytest.fixture
def device1(fake, monkeypatch) -> Pretend:
    """The native engine, two fake devices, registered tensors on device 1."""
    pytest.importorskip("dcp_native._C")
    monkeypatch.setenv("DCP_NATIVE_BACKEND", "native")
    monkeypatch.setenv("DCP_NATIVE_FAKE_CUDA_DEVICES", "2")
    return Pretend(monkeypatch, device=1)


def _state_dict(pretend: Pretend, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sd = {
        "big": torch.randn(3 << 20, generator=gen),  # several pieces of a small pool
        "matrix": torch.randn(300, 257, generator=gen),
        "bf16": torch.randn(1000, generator=gen).to(torch.bfloat16),
        "step": 7,
    }
    pretend(*(v for v in sd.values() if isinstance(v, torch.Tensor)))
    return sd


def _assert_device0_untouched(fake, caller_device: int) -> None:
    calls, first = fake.device_calls(0)
    assert calls == 0, f"{calls} runtime calls acted on device 0, the first {first}"
    assert fake.device_calls(1)[0] > 0  # the check saw the work on device 1
    assert fake.get_device() == caller_device  # the caller's device as it was


@pytest.mark.parametrize("caller_device", [1, 0])
def test_save_load_async_save_and_close_touch_only_the_tensors_device(device1, fake, tmp_path, caller_device):
    if caller_device:
        fake.lib.cudaSetDevice(caller_device)
    sd = _state_dict(device1, 0)
    writer = dcp_native.FileSystemWriter(tmp_path / "sync", thread_count=3, staging_bytes=4 << 20)
    dcp.save(sd, storage_writer=writer, no_dist=True)

    out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in sd.items()}
    device1(*(v for v in out.values() if isinstance(v, torch.Tensor)))
    reader = dcp_native.FileSystemReader(tmp_path / "sync", verify=True, staging_bytes=2 << 20, thread_count=3)
    dcp.load(out, storage_reader=reader, no_dist=True)
    for k, v in sd.items():
        assert torch.equal(out[k], v) if isinstance(v, torch.Tensor) else out[k] == v, k

    # Async save with asynchronous staging: the staging buffer is pinned from a thread on
    # device 1, the save's engine calls run on the executor's thread (which starts on device 0).
    staged_writer = dcp_native.FileSystemWriter(tmp_path / "async", async_staging=True, staging_bytes=16 << 20)
    want = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
    resp = dcp.async_save(sd, storage_writer=staged_writer, no_dist=True)
    resp.staging_completion.result(timeout=60)
    resp.upload_completion.result(timeout=60)
    assert fake.counter("host_allocs") > 0  # the pools and the staging buffer were pinned

    for closing in (writer, reader, staged_writer):
        closing.close()
    assert fake.counter("pinned_bytes") == fake.pinned0
    _assert_device0_untouched(fake, caller_device)

    check = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in want.items()}
    dcp.load(check, storage_reader=dcp.FileSystemReader(tmp_path / "async"), no_dist=True)
    for k, v in want.items():
        assert torch.equal(check[k], v) if isinstance(v, torch.Tensor) else check[k] == v, k


def test_a_failed_call_on_device_1_touches_only_device_1(device1, fake, tmp_path):
    """Error paths clean up (events, buffers, stream synchronisation) on device 1 too."""
    sd = _state_dict(device1, 1)
    writer = dcp_native.FileSystemWriter(tmp_path, staging_bytes=2 << 20)
    fake.fail("cudaMemcpyAsync", 2, 700)
    with pytest.raises(CheckpointException) as err:
        dcp.save(sd, storage_writer=writer, no_dist=True)
    assert isinstance(failure(err), dcp_native.CudaError) and "cudaErrorIllegalAddress (700)" in str(failure(err))
    writer.close()
    assert fake.counter("pinned_bytes") == fake.pinned0
    _assert_device0_untouched(fake, 0)
