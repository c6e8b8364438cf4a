"""dcp.save / dcp.load of "device" state dicts through the writer and reader, against the fake CUDA runtime.

tests/device/test_fake_cuda.py drives the engines' GPU pipelines directly; this file
checks the plumbing above them — which tensors the writer hands over as device
memory, the producer stream, the pinned pools the writer and reader keep, the
reader's device boxes (column views become 2-D copies; narrow rows one dense
copy to device scratch, then a gather there), verified loads, and
what a failed copy does to a save — end to end through DCP on the native
engine, the one GPU path; the Python engine takes torch's copies instead.

Without a GPU, CPU tensors stand for device tensors: ``dcp_native._device``'s
two questions (on which device is this tensor, which stream produces it) are
answered "device 0" for the tensors a test registers and "the legacy stream"
for streams. The fake runtime treats host memory as device memory, so the
engines copy these tensors through their pinned pools exactly as they would
copy GPU memory, with the fake's delayed asynchronous copies.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

import dcp_native
from dcp_native import load_plan
from helpers import Pretend, data_file, failure, tensor_bytes

pytestmark = pytest.mark.fake_cuda


@pytest.fixture
def engine_name(monkeypatch) -> str:
    """The native engine only: it is the one GPU path (overrides conftest's two engines)."""
    pytest.importorskip("dcp_native._C")
    monkeypatch.setenv("DCP_NATIVE_BACKEND", "native")
    return "native"


@pytest.fixture
def pretend(fake, engine_name, monkeypatch) -> Pretend:
    return Pretend(monkeypatch)


def _state_dict(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(3 << 20, generator=gen),  # 12 MiB: several pieces of a small pool
        "matrix": torch.randn(300, 257, generator=gen),
        "bf16": torch.randn(1000, generator=gen).to(torch.bfloat16),
        "zero_d": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "host": torch.arange(1000, dtype=torch.int32),  # stays host memory
        "step": 12,
    }


def _save(sd, path, **kw):
    writer = dcp_native.FileSystemWriter(path, **kw)
    dcp.save(sd, storage_writer=writer, no_dist=True)
    return writer


def _blank(sd: dict) -> dict:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in sd.items()}


def _cli_verify(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcp_native", "verify", str(path)], capture_output=True, text=True)


def _device_bytes(sd: dict) -> int:
    return sum(v.nbytes for k, v in sd.items() if isinstance(v, torch.Tensor) and k != "host")


def test_save_from_device_memory(pretend, fake, tmp_path):
    sd = _state_dict()
    pretend(*(v for k, v in sd.items() if isinstance(v, torch.Tensor) and k != "host"))
    writer = _save(sd, tmp_path, thread_count=3, checksums=True, staging_bytes=4 << 20)
    assert fake.counter("copies_d2h") > 0
    assert fake.counter("bytes_d2h") == _device_bytes(sd)
    assert 0 < writer.bytes_held <= 4 << 20
    # Stock's reader loads it, and the CRC32C tables cover the device bytes.
    out = _blank(sd)
    dcp.load(out, storage_reader=dcp.FileSystemReader(tmp_path), no_dist=True)
    for k, v in sd.items():
        assert torch.equal(out[k], v) if isinstance(v, torch.Tensor) else out[k] == v, k
    res = _cli_verify(tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    writer.close()
    assert writer.bytes_held == 0


def test_load_into_device_memory(pretend, fake, tmp_path):
    sd = _state_dict(1)
    _save(sd, tmp_path)
    out = _blank(sd)
    pretend(*(v for k, v in out.items() if isinstance(v, torch.Tensor) and k != "host"))
    reader = dcp_native.FileSystemReader(tmp_path, staging_bytes=2 << 20)
    dcp.load(out, storage_reader=reader, no_dist=True)
    for k, v in sd.items():
        assert torch.equal(out[k], v) if isinstance(v, torch.Tensor) else out[k] == v, k
    assert fake.counter("bytes_h2d") == _device_bytes(sd)
    assert 0 < reader.staging_bytes_held <= 2 << 20
    reader.close()
    assert reader.staging_bytes_held == 0


def test_column_view_destination_is_one_2d_copy_per_piece(pretend, fake, tmp_path):
    full = torch.randn(512, 300)
    _save({"w": full}, tmp_path)
    wide = torch.full((512, 700), -1.0)
    pretend(wide)
    dcp.load({"w": wide[:, 100:400]}, storage_reader=dcp_native.FileSystemReader(tmp_path), no_dist=True)
    assert torch.equal(wide[:, 100:400], full)
    assert bool((wide[:, :100] == -1).all()) and bool((wide[:, 400:] == -1).all())
    assert fake.counter("copies_2d") >= 1 and fake.counter("bytes_h2d") == full.nbytes
    assert 300 * 4 >= load_plan._NARROW_DEVICE_ROW  # rows wide enough for the 2-D copy


class _Columns(DefaultLoadPlanner):
    """Reads columns ``[first, first + n)`` of the saved 2-D tensor "w" into the state dict's
    (n-column) "w": a column shard without DTensor, the ReadItem's storage offsets narrowing."""

    def __init__(self, first: int) -> None:
        super().__init__()
        self.first = first

    def create_local_plan(self) -> LoadPlan:
        rows, cols = self.state_dict["w"].shape
        at = MetadataIndex("w", torch.Size([0, 0]))
        return LoadPlan([ReadItem(LoadItemType.TENSOR, dest_index=at, dest_offsets=torch.Size([0, 0]),
                                  storage_index=at, storage_offsets=torch.Size([0, self.first]),
                                  lengths=torch.Size([rows, cols]))])


def _load_columns(path, target: torch.Tensor, first: int, **kw) -> None:
    dcp.load({"w": target}, storage_reader=dcp_native.FileSystemReader(path, **kw), planner=_Columns(first),
             no_dist=True)


def test_narrow_column_view_destination_is_one_dense_copy(pretend, fake, tmp_path):
    """96-byte rows into a column view of device memory: the item's bytes in one dense copy per
    pinned buffer into device scratch, scattered there (no narrow 2-D copies)."""
    full = torch.randn(512, 24)
    _save({"w": full}, tmp_path)
    wide = torch.full((512, 700), -1.0)
    pretend(wide)
    dcp.load({"w": wide[:, 100:124]}, storage_reader=dcp_native.FileSystemReader(tmp_path), no_dist=True)
    assert torch.equal(wide[:, 100:124], full)
    assert bool((wide[:, :100] == -1).all()) and bool((wide[:, 124:] == -1).all())
    assert fake.counter("copies_2d") == 0 and fake.counter("bytes_h2d") == full.nbytes


def test_column_shard_of_a_saved_tensor_reads_its_covering_range(pretend, fake, tmp_path):
    """Columns 16:32 of saved 256-byte rows: the covering range (4x the bytes needed) is copied
    densely to the device and gathered there."""
    full = torch.randn(1024, 64)
    _save({"w": full}, tmp_path)
    out = torch.zeros(1024, 16)
    pretend(out)
    _load_columns(tmp_path, out, 16)
    assert torch.equal(out, full[:, 16:32])
    assert fake.counter("copies_2d") == 0 and fake.counter("bytes_h2d") == 1023 * 256 + 64


def test_dense_reads_go_in_rounds_within_the_memory_budget(pretend, fake, tmp_path, monkeypatch):
    """Three 24 KiB narrow reads with a 64 KiB budget: two engine calls, at most 64 KiB of scratch each."""
    sd = {k: torch.randn(256, 24) for k in "abc"}
    _save(sd, tmp_path)
    wide = {k: torch.full((256, 50), -1.0) for k in sd}
    pretend(*wide.values())
    calls: list[int] = []
    run_engine = load_plan.LoadRun._run_engine

    def counting(self, host, device_boxes=None):
        calls.append(sum(b.inner_bytes for bx in (device_boxes or {}).values() for b in bx))
        return run_engine(self, host, device_boxes)

    monkeypatch.setattr(load_plan.LoadRun, "_run_engine", counting)
    reader = dcp_native.FileSystemReader(tmp_path, memory_budget=64 << 10)
    dcp.load({k: w[:, 10:34] for k, w in wide.items()}, storage_reader=reader, no_dist=True)
    for k, v in sd.items():
        assert torch.equal(wide[k][:, 10:34], v), k
        assert bool((wide[k][:, :10] == -1).all()) and bool((wide[k][:, 34:] == -1).all()), k
    assert sorted(c for c in calls if c) == [24 << 10, 48 << 10]
    assert fake.counter("copies_2d") == 0


def test_narrow_reads_past_the_bounds_keep_the_strided_copies(pretend, fake, tmp_path):
    """A 4-byte column of 16 KiB saved rows (a covering range 4096x the bytes needed), and a
    narrow view whose range exceeds the memory budget: strided copies of the needed bytes, no scratch."""
    full = torch.randn(64, 4096)
    _save({"w": full}, tmp_path / "wide")
    out = torch.zeros(64, 1)
    pretend(out)
    _load_columns(tmp_path / "wide", out, 7)
    assert torch.equal(out, full[:, 7:8])
    assert fake.counter("bytes_h2d") == 64 * 4  # the needed bytes only (a copy per row: far apart)

    narrow = torch.randn(64, 24)
    _save({"w": narrow}, tmp_path / "narrow")
    wide = torch.full((64, 700), -1.0)
    pretend(wide)
    copies, h2d = fake.counter("copies_2d"), fake.counter("bytes_h2d")
    reader = dcp_native.FileSystemReader(tmp_path / "narrow", memory_budget=4096)
    dcp.load({"w": wide[:, 100:124]}, storage_reader=reader, no_dist=True)
    assert torch.equal(wide[:, 100:124], narrow) and bool((wide[:, 124:] == -1).all())
    assert fake.counter("copies_2d") > copies and fake.counter("bytes_h2d") - h2d == narrow.nbytes


def test_verified_narrow_read_checks_its_covering_range(pretend, fake, tmp_path):
    """verify=True on a dense read: the engine checks the covering range in its pinned buffers,
    and a flipped byte between the needed columns fails the load, naming the key."""
    full = torch.randn(1024, 64)
    _save({"w": full}, tmp_path, checksums=True)
    out = torch.zeros(1024, 16)
    pretend(out)
    _load_columns(tmp_path, out, 16, verify=True)
    assert torch.equal(out, full[:, 16:32]) and fake.counter("bytes_h2d") == 1023 * 256 + 64
    path = data_file(tmp_path)
    with open(path, "rb") as f:
        payload = f.read().find(tensor_bytes(full))
    assert payload > 0
    with open(path, "r+b") as f:  # element (500, 40): in the covering range, not in the shard
        f.seek(payload + (500 * 64 + 40) * 4)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))
    pretend(out)
    with pytest.raises(CheckpointException) as err:
        _load_columns(tmp_path, out, 16, verify=True)
    exc = failure(err)
    assert isinstance(exc, dcp_native.IntegrityError) and exc.key == "w", exc


def test_pools_are_reused_across_saves_and_loads(pretend, fake, tmp_path):
    sd = _state_dict(2)
    pretend(*(v for v in sd.values() if isinstance(v, torch.Tensor)))
    writer = dcp_native.FileSystemWriter(tmp_path, staging_bytes=4 << 20)
    reader = dcp_native.FileSystemReader(tmp_path, staging_bytes=4 << 20)
    held, allocs = [], []
    for _ in range(3):
        dcp.save(sd, storage_writer=writer, no_dist=True)
        out = _blank(sd)
        pretend(*(v for v in out.values() if isinstance(v, torch.Tensor)))
        dcp.load(out, storage_reader=reader, no_dist=True)
        assert torch.equal(out["big"], sd["big"])
        held.append((writer.bytes_held, reader.staging_bytes_held))
        allocs.append(fake.counter("host_allocs"))
    assert held == [held[0]] * 3 and allocs == [allocs[0]] * 3
    writer.close()
    reader.close()
    assert fake.counter("pinned_bytes") == 0


def test_verified_load_into_device_memory_checks_in_pinned_buffers(pretend, fake, tmp_path):
    sd = {"w": torch.randn(1 << 18)}
    _save(sd, tmp_path, checksums=True)
    out = {"w": torch.zeros(1 << 18)}
    pretend(out["w"])
    dcp.load(out, storage_reader=dcp_native.FileSystemReader(tmp_path, verify=True), no_dist=True)
    assert torch.equal(out["w"], sd["w"])
    # The device route: read into pinned buffers, checked there, copied to the device.
    assert fake.counter("bytes_h2d") == sd["w"].nbytes
    data = next(p for p in os.listdir(tmp_path) if p.endswith(".distcp"))
    with open(tmp_path / data, "r+b") as f:
        f.seek(os.path.getsize(tmp_path / data) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(CheckpointException) as err:
        dcp.load({"w": out["w"]}, storage_reader=dcp_native.FileSystemReader(tmp_path, verify=True), no_dist=True)
    assert isinstance(failure(err), dcp_native.IntegrityError)


def test_failed_copy_fails_the_save_and_commits_nothing(pretend, fake, tmp_path):
    old = {"big": torch.full((3 << 20,), 7.0)}
    _save(old, tmp_path)
    sd = _state_dict(3)
    pretend(*(v for v in sd.values() if isinstance(v, torch.Tensor)))
    fake.fail("cudaMemcpyAsync", 2, 700)  # cudaErrorIllegalAddress on the second copy
    with pytest.raises(CheckpointException) as err:
        _save(sd, tmp_path, staging_bytes=2 << 20)
    exc = failure(err)
    assert isinstance(exc, dcp_native.CudaError), exc
    assert "cudaMemcpyAsync" in exc.operation and exc.code == 700
    # The previous checkpoint is still the committed one, bit-exact.
    out = {"big": torch.zeros(3 << 20)}
    dcp.load(out, storage_reader=dcp_native.FileSystemReader(tmp_path), no_dist=True)
    assert torch.equal(out["big"], old["big"])


def test_python_engine_takes_torch_copies(fake, monkeypatch, tmp_path):
    """On the Python engine "device" tensors are written and loaded through host copies: the
    runtime is never asked to copy, and the values are exact."""
    monkeypatch.setenv("DCP_NATIVE_BACKEND", "python")
    p = Pretend(monkeypatch)
    sd = _state_dict(5)
    p(*(v for k, v in sd.items() if isinstance(v, torch.Tensor) and k != "host"))
    writer = _save(sd, tmp_path, thread_count=2)
    out = _blank(sd)
    p(*(v for k, v in out.items() if isinstance(v, torch.Tensor) and k != "host"))
    dcp.load(out, storage_reader=dcp_native.FileSystemReader(tmp_path), no_dist=True)
    for k, v in sd.items():
        assert torch.equal(out[k], v) if isinstance(v, torch.Tensor) else out[k] == v, k
    assert fake.counter("copies_d2h") == fake.counter("copies_h2d") == 0
    assert fake.counter("pinned_bytes") == fake.pinned0 and writer.bytes_held == 0
