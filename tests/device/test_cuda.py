"""Saves and loads of CUDA state dicts, on both engines (needs a CUDA GPU).

Every test here is marked ``cuda`` and skipped without a GPU; with
``DCP_NATIVE_REQUIRE_CUDA=1`` (the GPU check script sets it) a skip is a
failure. The pipeline itself (pinned staging, overlap, strided copies,
failures) is also tested without a GPU against the fake runtime in
tests/device/test_fake_cuda.py; this file checks the real thing end to end: DCP's
planners, torch's streams, stock interop and resharded loads into device
memory.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import dcp_native
from dcp_native._backend import get_engine
from helpers import DCP_DTYPES, blank_like, failure, make_tensor, run_ranks, tensor_bytes

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

#: Bigger than a 32 MiB pinned piece, so saves and loads cross piece boundaries.
BIG = (21 << 20) // 4 * 2  # 42 MiB of fp32, not a multiple of the piece size


def _state_dict(device: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    sd: dict = {
        "big": torch.randn(BIG, generator=gen),
        "matrix": torch.randn(1000, 513, generator=gen),
        "bf16": torch.randn(300, 7, generator=gen).to(torch.bfloat16),
        "zero_d": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "ints": torch.arange(-500, 500, dtype=torch.int64),
        "step": 7,
        "name": "adamw",
    }
    for dtype in DCP_DTYPES:
        sd[f"dtype_{str(dtype).split('.')[-1]}"] = make_tensor(dtype, (17, 5), seed=1)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}


def _blank(sd: dict, device: str) -> dict:
    out = {}
    for k, v in sd.items():
        # blank_like: CUDA has no fill kernel for every dtype (float4_e2m1fn_x2); copy a CPU blank.
        out[k] = blank_like(v.cpu()).to(device) if isinstance(v, torch.Tensor) else None
    return out


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and tensor_bytes(a.cpu()) == tensor_bytes(b.cpu())


def _save(sd, path, **kw):
    dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(path, **kw), no_dist=True)


def _load(sd, path, **kw):
    reader = dcp_native.FileSystemReader(path, **kw)
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return reader


@pytest.mark.parametrize("src,dst", [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cuda")])
def test_round_trip(engine_name, tmp_path, src, dst):
    status = get_engine().cuda_status()
    assert status.usable, status.reason
    want = _state_dict(src)
    _save(want, tmp_path, thread_count=4)
    out = _blank(want, dst)
    _load(out, tmp_path, thread_count=4)
    torch.cuda.synchronize()
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert out[k].device.type == dst, k
            assert _bits_equal(out[k], v), k
        else:
            assert out[k] == v, k


def test_stock_interop_from_cuda(engine_name, tmp_path):
    want = _state_dict("cuda")
    ours, theirs = tmp_path / "ours", tmp_path / "stock"
    _save(want, ours)
    dcp.save(want, storage_writer=dcp.FileSystemWriter(theirs), no_dist=True)
    for path, reader in ((ours, dcp.FileSystemReader), (theirs, dcp_native.FileSystemReader)):
        out = _blank(want, "cuda")
        dcp.load(out, storage_reader=reader(path), no_dist=True)
        torch.cuda.synchronize()
        for k, v in want.items():
            if isinstance(v, torch.Tensor):
                assert _bits_equal(out[k], v), (path.name, k)


def test_noncontiguous_and_expanded_sources(engine_name, tmp_path):
    base = torch.randn(64, 96, device="cuda")
    want = {
        "t": base.t(),
        "cols": base[:, 10:50],
        "expanded": torch.randn(1, 96, device="cuda").expand(64, 96),
        "neg": torch.randn(8, 8, device="cuda", dtype=torch.complex64).conj(),
    }
    _save(want, tmp_path)
    out = {k: torch.zeros(v.shape, dtype=v.dtype, device="cuda") for k, v in want.items()}
    _load(out, tmp_path)
    for k, v in want.items():
        assert torch.equal(out[k], v.resolve_conj()), k


def test_column_view_destination_uses_strided_copies(engine_name, tmp_path):
    """A destination view with a row stride (a column shard) is filled in place."""
    full = torch.randn(512, 300)
    _save({"w": full.cuda()}, tmp_path)
    wide = torch.full((512, 700), -1.0, device="cuda")
    dest = wide[:, 100:400]
    _load({"w": dest}, tmp_path)
    torch.cuda.synchronize()
    assert torch.equal(wide[:, 100:400].cpu(), full)
    assert bool((wide[:, :100] == -1).all()) and bool((wide[:, 400:] == -1).all())


def test_cast_into_cuda_destination(engine_name, tmp_path):
    """An fp32 checkpoint into a bf16 CUDA model: the slower path casts, values as DCP's."""
    full = torch.randn(256, 64)
    _save({"w": full}, tmp_path)
    out = {"w": torch.zeros(256, 64, dtype=torch.bfloat16, device="cuda")}
    _load(out, tmp_path)
    assert torch.equal(out["w"].cpu(), full.to(torch.bfloat16))


def test_verified_load_into_cuda(engine_name, tmp_path):
    want = {"w": torch.randn(1 << 20, device="cuda"), "b": torch.randn(33, device="cuda")}
    _save(want, tmp_path, checksums=True)
    out = {k: torch.zeros_like(v) for k, v in want.items()}
    _load(out, tmp_path, verify=True)
    for k, v in want.items():
        assert torch.equal(out[k], v), k
    # A flipped bit is caught on the way to the GPU.
    data = sorted(p for p in os.listdir(tmp_path) if p.endswith(".distcp"))[0]
    with open(tmp_path / data, "r+b") as f:
        f.seek(os.path.getsize(tmp_path / data) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CheckpointException) as err:
        _load({k: torch.zeros_like(v) for k, v in want.items()}, tmp_path, verify=True)
    assert isinstance(failure(err), dcp_native.IntegrityError)


def test_producer_stream_work_is_saved(engine_name, tmp_path):
    """Kernels queued on the current stream before save() finish before their memory is copied."""
    t = torch.zeros(8 << 20, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keeps the stream busy well past the save's start
        t.fill_(42.0)
        _save({"t": t}, tmp_path)
    out = {"t": torch.zeros(8 << 20)}
    _load(out, tmp_path)
    assert bool((out["t"] == 42.0).all())


def test_reader_staging_is_bounded_reused_and_released(engine_name, tmp_path):
    want = {"big": torch.randn(BIG, device="cuda")}
    _save(want, tmp_path)
    staging = 8 << 20
    reader = dcp_native.FileSystemReader(tmp_path, staging_bytes=staging)
    held = []
    for _ in range(3):
        out = {"big": torch.zeros(BIG, device="cuda")}
        dcp.load(out, storage_reader=reader, no_dist=True)
        assert torch.equal(out["big"], want["big"])
        held.append(reader.staging_bytes_held)
    if engine_name == "python":
        assert held == [0, 0, 0]  # host memory only: torch's copies, no pinned pool
        return
    assert 0 < held[0] <= staging
    assert held == [held[0]] * 3
    reader.close()
    assert reader.staging_bytes_held == 0
    reader.close()


def test_cuda_errors_are_exceptions(engine_name, tmp_path):
    """A failed device copy raises CudaError (operation and CUDA's message), no hang.

    In a subprocess: a copy from a bogus device address may leave the CUDA
    context unusable for the rest of the process.
    """
    code = f"""
import torch
torch.cuda.init()
import dcp_native
from array import array
from dcp_native._backend import get_engine
wf = WriteFile({str(tmp_path / "f")!r}, b"", array("q", (0, SRC_DEVICE, 0x10, 4096)), device=0)
try:
    get_engine().write([wf], threads=2, sync=False)
except dcp_native.CudaError as exc:
    print("CudaError", exc.code, exc.operation)
except ValueError as exc:
    print("ValueError", exc)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    if engine_name == "python":  # no GPU path: the plan is refused before any copy
        assert res.stdout.startswith("ValueError ") and "host memory only" in res.stdout, res.stdout
        return
    assert res.stdout.startswith("CudaError ") and "cudaMemcpyAsync D2H" in res.stdout, res.stdout


# ---------------------------------------------------------------- resharded loads on several ranks

ROWS, COLS = 512, 3001  # uneven over 3 ranks; runs of kilobytes, as real column shards


def _full() -> torch.Tensor:
    return torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(5))


def _rank_save_rows(path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    dt = distribute_tensor(_full(), mesh, [Shard(0)], src_data_rank=None)
    dcp.save({"w": dt}, storage_writer=dcp_native.FileSystemWriter(path))


def _rank_load_cols_cuda(path: str) -> tuple[int, list[int], bool]:
    """Load Shard(0) x4 as Shard(1) on this rank's GPU; (rank, bytes read, equal)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    mesh = init_device_mesh("cuda", (dist.get_world_size(),))
    dt = distribute_tensor(torch.zeros(ROWS, COLS, device="cuda"), mesh, [Shard(1)], src_data_rank=None)
    reader = dcp_native.FileSystemReader(path)
    dcp.load({"w": dt}, storage_reader=reader)
    want = distribute_tensor(_full().cuda(), mesh, [Shard(1)], src_data_rank=None).to_local()
    got = dt.to_local()
    return dist.get_rank(), reader.last_read_stats.bytes_read, bool(torch.equal(got, want))


@pytest.mark.multiprocess
@pytest.mark.parametrize("load_ranks", [2, 3])
def test_reshard_into_cuda(engine_name, tmp_path, monkeypatch, load_ranks):
    """Saved on 4 ranks as Shard(0), loaded on 2 or 3 ranks as Shard(1) into CUDA DTensors.

    The ranks share the GPUs there are (gloo carries DCP's collectives). They are
    spawned: a forked child cannot use CUDA once the parent has.
    """
    monkeypatch.setenv("DCP_NATIVE_TEST_START_METHOD", "spawn")
    path = str(tmp_path / "ckpt")
    run_ranks(4, _rank_save_rows, path, engine=engine_name, timeout=180)
    results = run_ranks(load_ranks, _rank_load_cols_cuda, path, engine=engine_name, timeout=180)
    assert all(ok for _, _, ok in results), results
    needed = ROWS * COLS * 4
    assert sum(b for _, b, _ in results) <= 1.1 * needed, results


_NO_CONTEXT_ON_DEVICE_0 = r"""
import ctypes, sys
import torch, torch.distributed.checkpoint as dcp
import dcp_native

torch.cuda.set_device(1)
sd = {"w": torch.randn(1 << 22, device="cuda:1"), "m": torch.randn(999, 37, device="cuda:1")}
path = sys.argv[1]
writer = dcp_native.FileSystemWriter(path + "/a", thread_count=4)
dcp.save(sd, storage_writer=writer, no_dist=True)
out = {k: torch.zeros_like(v) for k, v in sd.items()}
reader = dcp_native.FileSystemReader(path + "/a", verify=True, thread_count=4)
dcp.load(out, storage_reader=reader, no_dist=True)
assert all(torch.equal(out[k], v) for k, v in sd.items())
staged = dcp_native.FileSystemWriter(path + "/b", async_staging=True)
resp = dcp.async_save(sd, storage_writer=staged, no_dist=True)
resp.staging_completion.result(timeout=120)
resp.upload_completion.result(timeout=120)
for closing in (writer, reader, staged):
    closing.close()
torch.cuda.synchronize(1)
cuda = ctypes.CDLL("libcuda.so.1")
device, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
assert cuda.cuDeviceGet(ctypes.byref(device), 0) == 0
assert cuda.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(active)) == 0
print("device 0 primary context active:", active.value)
sys.exit(3 if active.value else 0)
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_work_on_device_1_creates_no_context_on_device_0(tmp_path):
    """A process that only uses cuda:1 (native engine: save, verified load, async save with
    asynchronous staging, close) leaves device 0 without a primary context, as the driver
    reports it (cuDevicePrimaryCtxGetState)."""
    env = {**os.environ, "DCP_NATIVE_BACKEND": "native"}
    done = subprocess.run([sys.executable, "-c", _NO_CONTEXT_ON_DEVICE_0, str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
