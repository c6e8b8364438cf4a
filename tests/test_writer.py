"""Saves through dcp_native's writer, on both engines.

* What a save writes: tagged data files, their checksum tables, the sidecar, the lock; stock's
  metadata, nothing of dcp_native pickled into it; short transfers resumed; an unwritable
  destination fails the save.

async_save through the writer (its AsyncStager):

* What is saved are the values at the call, though training changes the
  tensors (and other entries) as soon as the call returns.
* Overlapping saves with one writer: the second waits for the first to have
  written its staged bytes, or raises StagingBusyError after staging_timeout;
  checkpoints never mix.
* The staging area is laid out once and reused across saves (bytes held do
  not grow), re-laid out for another layout, bounded by staging_bytes,
  freed by close(); the writer pickles without it.
* A failed background write surfaces through the returned future.
* DCP's thread and process executors on 2 gloo ranks (DTensor shards and
  replicated tensors; an FSDP2 model and its AdamW state, whose DTensors sit
  at non-zero offsets of the staging buffer), and asynchronous staging (DCP's
  AsyncSaveResponse).
* CUDA tensors (marked ``cuda``): staged from device memory.

Slow writes are simulated by holding the engine's write until the test opens
a gate, so every ordering checked here is forced, not hoped for.

The commit protocol (overwrites, concurrent saves, killed and failed saves):
tests/test_commit.py.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import pickle
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import dcp_native
import dcp_native.writer as writer_module
from dcp_native.staging import StagedStateDict, StagingArea, StagingBusyError
from helpers import data_files, failure, run_ranks, sidecar_file

#: Seconds a gated write waits at most for the test to open the gate.
GATE_S = 20.0


def state(scale: float) -> dict:
    g = torch.Generator().manual_seed(int(scale * 100))
    return {
        "w": torch.randn(64, 33, generator=g) * scale,
        "bf": (torch.randn(7, 5, generator=g) * scale).to(torch.bfloat16),
        "i": torch.arange(10, dtype=torch.int64) * int(scale),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(scale),
        "view": (torch.randn(16, 16, generator=g) * scale).t(),
        "nested": {"m": torch.full((3,), scale), "list": [torch.ones(2) * scale, int(scale)]},
        "step": int(scale * 10),
        "meta": {"lr": scale / 10, "name": f"run{scale}"},
    }


def zeros_like(sd):
    if isinstance(sd, dict):
        return {k: zeros_like(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [zeros_like(v) for v in sd]
    if isinstance(sd, torch.Tensor):
        return torch.zeros_like(sd).contiguous()
    return None if not isinstance(sd, (int, float, str)) else type(sd)()


def snapshot(sd):
    if isinstance(sd, dict):
        return {k: snapshot(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [snapshot(v) for v in sd]
    if isinstance(sd, torch.Tensor):
        return sd.detach().clone()
    return sd


def mutate(sd) -> None:
    """What training does right after async_save returns: every entry changes in place."""
    for k, v in list(sd.items()):
        if isinstance(v, torch.Tensor):
            v.add_(1) if v.dtype != torch.bool else v.logical_not_()
        elif isinstance(v, dict):
            mutate(v)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                if isinstance(x, torch.Tensor):
                    x.add_(1)
                else:
                    v[i] = -1
        elif isinstance(v, int):
            sd[k] = -1


def assert_same(got, want, where="") -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got.cpu(), want.cpu()), f"{where}: values differ"
    else:
        assert got == want, where


def load(path, like):
    out = zeros_like(like)
    dcp.load(out, storage_reader=dcp_native.FileSystemReader(path), no_dist=True)
    return out


class GatedEngine:
    """The active engine, but write() waits for ``gate`` first (a slow disk, on demand)."""

    def __init__(self, engine, gate: threading.Event, entered: threading.Event) -> None:
        self._engine = engine
        self._gate = gate
        self._entered = entered

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def write(self, *args, **kwargs):
        self._entered.set()
        if not self._gate.wait(GATE_S):
            raise TimeoutError("the test never opened the gate")
        return self._engine.write(*args, **kwargs)


@pytest.fixture
def gate(monkeypatch):
    """An open/closed gate in front of every engine write of the writer; closed at first."""
    g = threading.Event()
    g.entered = threading.Event()
    real = writer_module.get_engine
    monkeypatch.setattr(writer_module, "get_engine", lambda: GatedEngine(real(), g, g.entered))
    yield g
    g.set()


def result_of(resp):
    """The upload's result, whichever object async_save returned."""
    return getattr(resp, "upload_completion", resp).result(timeout=60)


# ----------------------------------------------------------------- what a save writes


def save_sync(sd, path, **kw) -> None:
    dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(path, **kw), no_dist=True)


def test_sidecar_and_files(engine_name, tmp_path):
    sd = {"a": torch.randn(100), "b": torch.randn(5, 5)}
    save_sync(sd, tmp_path, checksums=True)
    (data,) = data_files(tmp_path)
    tag = data.split(".")[1]
    names = sorted(os.listdir(tmp_path))
    assert names == [
        ".dcp_native.lock", ".metadata", f".metadata.{tag}.dcp_native", data, data + ".crc32c"
    ]
    assert sidecar_file(tmp_path) == str(tmp_path / f".metadata.{tag}.dcp_native")
    raw = (tmp_path / f".metadata.{tag}.dcp_native").read_bytes()
    assert raw.startswith(b"DCPNSIDE")
    doc = json.loads(raw[56:])
    assert doc["format"] == "dcp_native" and doc["version"] == 2 and len(doc["items"][data]) == 2
    assert doc["tables"][data]["file"] == data + ".crc32c"
    assert doc["tables"][data]["size"] == os.path.getsize(tmp_path / (data + ".crc32c"))
    # The metadata is stock's: no dcp_native class is pickled into it.
    assert b"dcp_native" not in (tmp_path / ".metadata").read_bytes()


@pytest.mark.parametrize("short", ["1", "7", "4096"])
def test_short_transfers_round_trip(engine_name, tmp_path, monkeypatch, short):
    """Every transfer cut to ``short`` bytes (DCP_NATIVE_TEST_SHORT_IO): resumed until complete."""
    sd = state(1.5)
    monkeypatch.setenv("DCP_NATIVE_TEST_SHORT_IO", short)
    save_sync(sd, tmp_path, thread_count=3, checksums=True)
    out = zeros_like(sd)
    dcp.load(out, storage_reader=dcp_native.FileSystemReader(tmp_path, verify=True), no_dist=True)
    assert_same(out, sd)


def test_unwritable_destination(engine_name, tmp_path):
    if os.geteuid() == 0:
        target = "/proc/dcp_native_cannot_write_here"
    else:
        target = tmp_path / "ro"
        target.mkdir()
        os.chmod(target, 0o500)
    with pytest.raises(CheckpointException) as ei:
        save_sync(state(1.0), target)
    assert isinstance(failure(ei), OSError)


# ----------------------------------------------------------------- values at call time


@pytest.mark.parametrize("api", ["dcp", "dcp_native"])
def test_values_at_call_time(engine_name, tmp_path, gate, api):
    sd = state(1.0)
    want = snapshot(sd)
    writer = dcp_native.FileSystemWriter(tmp_path, sync_files=False)
    save = dcp.async_save if api == "dcp" else dcp_native.async_save
    fut = save(sd, checkpoint_id=tmp_path, storage_writer=writer, no_dist=True)
    mutate(sd)  # before a single byte is written: the write is held at the gate
    assert not fut.done()
    gate.set()
    result_of(fut)
    assert_same(load(tmp_path, want), want)
    writer.close()


def test_checkpoint_id_only(engine_name, tmp_path):
    """dcp_native.async_save with just a path: a writer made for the call, closed after it."""
    sd = state(2.0)
    want = snapshot(sd)
    fut = dcp_native.async_save(sd, checkpoint_id=tmp_path, no_dist=True)
    mutate(sd)
    assert result_of(fut) is not None
    assert_same(load(tmp_path, want), want)
    assert os.path.exists(sidecar_file(tmp_path))


def test_stock_reads_async_checkpoint(engine_name, tmp_path):
    sd = state(3.0)
    want = snapshot(sd)
    result_of(dcp.async_save(sd, storage_writer=dcp_native.FileSystemWriter(tmp_path), no_dist=True))
    out = zeros_like(want)
    dcp.load(out, storage_reader=dcp.FileSystemReader(tmp_path), no_dist=True)
    assert_same(out, want)


# ----------------------------------------------------------------- overlapping saves


def test_second_save_waits_for_first(engine_name, tmp_path, gate):
    sd = state(1.0)
    first, second = snapshot(sd), None
    writer = dcp_native.FileSystemWriter(tmp_path / "a", sync_files=False)
    fut1 = dcp.async_save(sd, checkpoint_id=tmp_path / "a", storage_writer=writer, no_dist=True)
    mutate(sd)
    second = snapshot(sd)
    assert gate.entered.wait(GATE_S)  # the first save is writing (held)

    box = {}

    def call():
        box["fut"] = dcp.async_save(sd, checkpoint_id=tmp_path / "b", storage_writer=writer, no_dist=True)

    t = threading.Thread(target=call)
    t.start()
    t.join(0.5)
    assert t.is_alive(), "the second async_save reused the staging area while the first was writing"
    gate.set()
    t.join(GATE_S)
    assert not t.is_alive()
    mutate(sd)
    result_of(fut1)
    result_of(box["fut"])
    assert_same(load(tmp_path / "a", first), first)
    assert_same(load(tmp_path / "b", second), second)
    assert writer._staging.allocations == 1
    writer.close()


def test_second_save_times_out_with_clear_error(engine_name, tmp_path, gate):
    sd = state(1.0)
    want = snapshot(sd)
    writer = dcp_native.FileSystemWriter(tmp_path / "a", sync_files=False, staging_timeout=0.2)
    fut1 = dcp_native.async_save(sd, checkpoint_id=tmp_path / "a", storage_writer=writer, no_dist=True)
    assert gate.entered.wait(GATE_S)
    mutate(sd)
    with pytest.raises(StagingBusyError, match="still used by the save running in thread"):
        dcp_native.async_save(sd, checkpoint_id=tmp_path / "b", storage_writer=writer, no_dist=True)
    assert not os.path.exists(tmp_path / "b" / ".metadata")
    gate.set()
    result_of(fut1)
    assert_same(load(tmp_path / "a", want), want)
    # Once the first has finished, the writer stages again.
    want = snapshot(sd)
    result_of(dcp_native.async_save(sd, checkpoint_id=tmp_path / "c", storage_writer=writer, no_dist=True))
    assert_same(load(tmp_path / "c", want), want)
    writer.close()


# ----------------------------------------------------------------- staging memory


def staged_bytes(sd) -> int:
    """Payload bytes of the tensors the staging area takes (before alignment)."""
    total = 0
    for v in sd.values():
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            total += staged_bytes(v)
        elif isinstance(v, list):
            total += staged_bytes(dict(enumerate(v)))
    return total


def test_staging_reused_across_three_saves(engine_name, tmp_path):
    sd = state(1.0)
    writer = dcp_native.FileSystemWriter(tmp_path, sync_files=False)
    assert writer.bytes_held == 0
    held = []
    for n in range(3):
        want = snapshot(sd)
        path = tmp_path / str(n)
        result_of(dcp.async_save(sd, checkpoint_id=path, storage_writer=writer, no_dist=True))
        held.append(writer.bytes_held)
        assert_same(load(path, want), want)
        mutate(sd)
    assert held[0] >= staged_bytes(sd)
    assert held == [held[0]] * 3, f"bytes held grew across saves: {held}"
    assert writer._staging.allocations == 1

    # Another layout replaces the area (it does not add to it).
    sd["w"] = torch.randn(128, 33)
    want = snapshot(sd)
    result_of(dcp.async_save(sd, checkpoint_id=tmp_path / "x", storage_writer=writer, no_dist=True))
    assert_same(load(tmp_path / "x", want), want)
    assert writer._staging.allocations == 2
    assert staged_bytes(sd) <= writer.bytes_held < held[0] + 128 * 33 * 4

    writer.close()
    assert writer.bytes_held == 0
    writer.close()  # idempotent
    # Still usable after close (a new area).
    result_of(dcp.async_save(sd, checkpoint_id=tmp_path / "y", storage_writer=writer, no_dist=True))
    assert_same(load(tmp_path / "y", want), want)
    writer.close()


def test_stage_returns_views_of_one_reused_buffer(engine_name, tmp_path):
    sd = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, dtype=torch.float64)}
    writer = dcp_native.FileSystemWriter(tmp_path)
    s1 = writer.stage(sd)
    ptrs = (s1["a"].data_ptr(), s1["b"].data_ptr())
    assert s1["b"].data_ptr() % 64 == 0
    del s1  # dropped without a save: the next stage may reuse the buffer
    sd["a"].mul_(2)
    s2 = writer.stage(sd)
    assert (s2["a"].data_ptr(), s2["b"].data_ptr()) == ptrs
    assert torch.equal(s2["a"], sd["a"])
    writer.close()


def test_staging_bytes_bound(engine_name, tmp_path):
    sd = state(1.0)
    writer = dcp_native.FileSystemWriter(tmp_path, staging_bytes=1024)
    with pytest.raises(ValueError, match="staging_bytes=1024"):
        dcp.async_save(sd, checkpoint_id=tmp_path, storage_writer=writer, no_dist=True)
    assert writer.bytes_held == 0
    assert not os.path.exists(tmp_path / ".metadata")
    small = {"x": torch.arange(100, dtype=torch.int32)}
    result_of(dcp.async_save(small, checkpoint_id=tmp_path, storage_writer=writer, no_dist=True))
    assert 400 <= writer.bytes_held <= 1024
    assert_same(load(tmp_path, small), small)
    with pytest.raises(ValueError, match="staging_bytes"):
        dcp_native.FileSystemWriter(tmp_path, staging_bytes=-1)


def test_writer_pickles_without_staging(engine_name, tmp_path):
    sd = state(1.0)
    writer = dcp_native.FileSystemWriter(tmp_path / "a", staging_bytes=1 << 20, thread_count=2)
    result_of(dcp.async_save(sd, checkpoint_id=tmp_path / "a", storage_writer=writer, no_dist=True))
    assert writer.bytes_held > 0
    clone = pickle.loads(pickle.dumps(writer))
    assert clone.bytes_held == 0 and clone._staging is None
    assert (clone.staging_bytes, clone.thread_count) == (1 << 20, 2)
    want = snapshot(sd)
    result_of(dcp.async_save(sd, checkpoint_id=tmp_path / "b", storage_writer=clone, no_dist=True))
    assert_same(load(tmp_path / "b", want), want)
    clone.close()
    writer.close()


# ----------------------------------------------------------------- failures


def test_background_failure_surfaces_through_future(engine_name, tmp_path, monkeypatch):
    sd = state(1.0)
    writer = dcp_native.FileSystemWriter(tmp_path / "a", sync_files=False)
    monkeypatch.setenv("DCP_NATIVE_FAULT", "write:ENOSPC:1")
    fut = dcp.async_save(sd, checkpoint_id=tmp_path / "a", storage_writer=writer, no_dist=True)
    with pytest.raises(CheckpointException) as info:
        fut.result(timeout=60)
    exc = next(iter(info.value.failures.values()))[0]
    assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    assert not os.path.exists(tmp_path / "a" / ".metadata")
    monkeypatch.delenv("DCP_NATIVE_FAULT")
    # The failed save released the staging area: the next one neither waits nor fails.
    writer.staging_timeout = 10.0
    if writer._staging is not None:
        writer._staging.timeout = 10.0
    want = snapshot(sd)
    result_of(dcp.async_save(sd, checkpoint_id=tmp_path / "b", storage_writer=writer, no_dist=True))
    assert_same(load(tmp_path / "b", want), want)
    writer.close()


def test_failure_before_write_releases_staging(engine_name, tmp_path, monkeypatch):
    """A save that fails before write_data (here: in planning) frees the area when its thread ends."""
    sd = state(1.0)
    writer = dcp_native.FileSystemWriter(tmp_path / "a", staging_timeout=10.0)

    def broken(self, plan):
        raise RuntimeError("injected planning failure")

    with monkeypatch.context() as m:
        m.setattr(dcp_native.FileSystemWriter, "prepare_local_plan", broken)
        fut = dcp.async_save(sd, checkpoint_id=tmp_path / "a", storage_writer=writer, no_dist=True)
        with pytest.raises(CheckpointException, match="injected planning failure"):
            fut.result(timeout=60)
    want = snapshot(sd)
    result_of(dcp.async_save(sd, checkpoint_id=tmp_path / "b", storage_writer=writer, no_dist=True))
    assert_same(load(tmp_path / "b", want), want)
    del fut
    writer.close()


# ----------------------------------------------------------------- asynchronous staging


def test_async_staging_response(engine_name, tmp_path):
    sd = state(1.0)
    writer = dcp_native.FileSystemWriter(tmp_path / "0", async_staging=True)
    for n in range(2):
        want = snapshot(sd)
        resp = dcp.async_save(sd, checkpoint_id=tmp_path / str(n), storage_writer=writer, no_dist=True)
        assert hasattr(resp, "staging_completion") and hasattr(resp, "upload_completion")
        resp.staging_completion.result(timeout=60)
        mutate(sd)  # allowed once staging has completed
        resp.upload_completion.result(timeout=60)
        assert_same(load(tmp_path / str(n), want), want)
    assert writer._staging.allocations == 1
    writer.close()


# ----------------------------------------------------------------- 2 gloo ranks


def _rank_state(scale: float):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6) * scale
    return {
        "dt": distribute_tensor(full, mesh, [Shard(0)]),
        "rep": torch.full((5,), scale),
        "step": int(scale),
    }, full


def _ranks_async(path: str, executor: str) -> None:
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    kind = AsyncCheckpointerType.PROCESS if executor == "process" else AsyncCheckpointerType.THREAD
    if executor == "process":
        # DCP's process executor starts its checkpoint process from here; the
        # harness runs ranks as daemonic processes, which may not have children.
        multiprocessing.current_process()._config["daemon"] = False
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    sd, full = _rank_state(1.0)
    writer = dcp_native.FileSystemWriter(path, sync_files=False)
    futs = []
    for n in range(2):
        futs.append(
            dcp.async_save(sd, checkpoint_id=f"{path}/{n}", storage_writer=writer, async_checkpointer_type=kind)
        )
        # Training changes everything right away; the second save waits for the first.
        sd["dt"]._local_tensor.add_(100)
        sd["rep"].add_(100)
        sd["step"] += 100
    for fut in futs:
        fut.result(timeout=120)
    held = writer.bytes_held
    writer.close()
    for n in range(2):
        out, _ = _rank_state(0.0)
        dcp.load(out, checkpoint_id=f"{path}/{n}", storage_reader=dcp_native.FileSystemReader(f"{path}/{n}"))
        local = out["dt"].to_local()
        rank = dist.get_rank()
        rows = full.shape[0] // dist.get_world_size()
        want = full[rank * rows : (rank + 1) * rows] + 100 * n
        if not torch.equal(local, want):
            raise AssertionError(f"save {n}: DTensor shard differs: {local} != {want}")
        if not torch.equal(out["rep"], torch.full((5,), 1.0 + 100 * n)) or out["step"] != 1 + 100 * n:
            raise AssertionError(f"save {n}: replicated entries differ: {out['rep']}, {out['step']}")
    return held


@pytest.mark.multiprocess
@pytest.mark.parametrize("executor", ["thread", "process"])
def test_two_ranks(engine_name, tmp_path, executor):
    held = run_ranks(2, _ranks_async, str(tmp_path), executor, engine=engine_name, timeout=120)
    assert all(h > 0 for h in held)


def _fsdp_setup():
    """A small FSDP2 MLP (uneven shards) and its AdamW, on this rank; the same on every call."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _fsdp_step(model, optim, seed: int) -> None:
    """One training step: changes every parameter, moment and ``step`` in place."""
    g = torch.Generator().manual_seed(seed * 10 + dist.get_rank())
    model(torch.randn(6, 12, generator=g)).square().mean().backward()
    optim.step()
    optim.zero_grad()


def _fsdp_full(model, optim) -> dict:
    """The full (unsharded) model and optimizer state, every tensor cloned."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True))
    return snapshot({"model": msd, "optim": osd})


def _ranks_fsdp(path: str, executor: str) -> tuple[int, int, list]:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    kind = AsyncCheckpointerType.PROCESS if executor == "process" else AsyncCheckpointerType.THREAD
    if executor == "process":
        multiprocessing.current_process()._config["daemon"] = False  # see _ranks_async
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # The thread executor's writes wait until training has changed everything (the
    # process executor's are out of reach: its checkpoint process is spawned).
    gate = threading.Event()
    if executor == "thread":
        real = writer_module.get_engine
        writer_module.get_engine = lambda: GatedEngine(real(), gate, threading.Event())
    model, optim = _fsdp_setup()
    _fsdp_step(model, optim, 1)
    _fsdp_step(model, optim, 2)
    # As torch advises for async saves: the checkpoint's collectives on a group of their own.
    group = dist.new_group(backend="gloo")
    writer = dcp_native.FileSystemWriter(path, sync_files=False)
    wants, buffers = [], []
    for n, save in enumerate((dcp_native.async_save, dcp.async_save)):
        msd, osd = get_state_dict(model, optim)
        wants.append(_fsdp_full(model, optim))
        gate.clear()
        fut = save(
            {"model": msd, "optim": osd},
            checkpoint_id=f"{path}/{n}",
            storage_writer=writer,
            process_group=group,
            async_checkpointer_type=kind,
        )
        # Training goes on: every parameter, moment and step changes in place, and the lr.
        _fsdp_step(model, optim, 3 + n)
        optim.param_groups[0]["lr"] = 0.5
        gate.set()
        result_of(fut)
        buffers.append((writer._staging._buffer.data_ptr(), writer._staging._buffer.is_shared()))
    held = writer.bytes_held
    allocations = writer._staging.allocations
    writer.close()
    for n, want in enumerate(wants):
        model, optim = _fsdp_setup()
        msd, osd = get_state_dict(model, optim)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=f"{path}/{n}", storage_reader=dcp_native.FileSystemReader(f"{path}/{n}"))
        set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        assert_same(_fsdp_full(model, optim), want, f"save {n}")
    return held, allocations, buffers


@pytest.mark.multiprocess
@pytest.mark.parametrize("executor", ["thread", "process"])
def test_fsdp2_model_and_optimizer(engine_name, tmp_path, executor):
    """FSDP2 + AdamW: DTensors at non-zero offsets of the staging buffer, plain ``step`` tensors and
    param groups, saved on a process group of their own; the values at the call, from one buffer."""
    for held, allocations, buffers in run_ranks(2, _ranks_fsdp, str(tmp_path), executor, engine=engine_name):
        assert held > 0 and allocations == 1
        # The same memory for both saves: the process executor's first save moved it into
        # shared memory once (torch's pickling), the thread executor's stays plain memory.
        assert buffers == [(buffers[0][0], executor == "process")] * 2, buffers


def _rank_pickle() -> None:
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's shared-memory reductions
    from torch.distributed.tensor import DTensor

    sd, _ = _rank_state(1.0)
    sd["optim"] = {"exp_avg": _rank_state(2.0)[0]["dt"], "step": torch.tensor(3.0), "betas": (0.9, 0.99)}
    area = StagingArea()
    staged = area.stage(sd)
    local = staged["optim"]["exp_avg"]._local_tensor
    assert local.storage_offset() > 0  # what torch's pickling of the DTensor itself got wrong
    back = ForkingPickler.loads(ForkingPickler.dumps(staged))
    assert type(back) is StagedStateDict
    for got, want in ((back["dt"], staged["dt"]), (back["optim"]["exp_avg"], staged["optim"]["exp_avg"])):
        assert type(got) is DTensor and got._spec == want._spec
        assert torch.equal(got._local_tensor, want._local_tensor)
        # Shared, not copied: unpickled here, the local tensor is the staged one's memory.
        assert got._local_tensor.data_ptr() == want._local_tensor.data_ptr()
    assert torch.equal(back["rep"], staged["rep"]) and back["step"] == staged["step"]
    assert back["optim"]["betas"] == (0.9, 0.99) and torch.equal(back["optim"]["step"], torch.tensor(3.0))
    area.close()


def test_staged_dtensors_pickle_for_the_process_executor():
    """The process executor pickles the staged state dict with ForkingPickler; DTensors at offsets survive."""
    run_ranks(1, _rank_pickle)


# ----------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_values_at_call_time(engine_name, tmp_path, gate):
    sd = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in state(1.0).items()}
    sd["host"] = torch.arange(5.0)
    want = snapshot(sd)
    writer = dcp_native.FileSystemWriter(tmp_path, sync_files=False)
    staged = writer.stage(sd)
    assert not staged["w"].is_cuda and staged["w"].is_pinned()
    del staged
    fut = dcp.async_save(sd, checkpoint_id=tmp_path, storage_writer=writer, no_dist=True)
    mutate(sd)  # queued on the GPU right after the call
    gate.set()
    result_of(fut)
    assert_same(load(tmp_path, want), want)
    held = writer.bytes_held
    result_of(dcp.async_save(sd, checkpoint_id=tmp_path / "2", storage_writer=writer, no_dist=True))
    assert writer.bytes_held == held
    writer.close()
    assert writer.bytes_held == 0


@pytest.mark.cuda
def test_cuda_sync_save_from_device(engine_name, tmp_path):
    sd = {"a": torch.randn(1000, 37, device="cuda"), "t": torch.randn(64, 64, device="cuda").t(), "n": 3}
    want = snapshot(sd)
    writer = dcp_native.FileSystemWriter(tmp_path, staging_bytes=1 << 20)
    dcp.save(sd, storage_writer=writer, no_dist=True)
    assert_same(load(tmp_path, want), want)
    writer.close()
    assert writer.bytes_held == 0


@pytest.mark.parametrize("asynchronous", [False, True])
def test_staging_that_timed_out_does_not_free_the_buffer(asynchronous):
    """A stage() that gave up waiting (StagingBusyError) leaves the buffer as busy as it found
    it: the next stage() waits for the save still reading it too."""
    area = StagingArea(timeout=0.1)
    first = area.stage({"w": torch.ones(4)})
    done = threading.Event()
    saver = threading.Thread(target=lambda: (area.claim(), done.wait(GATE_S)))
    saver.start()
    while area.lease.owner is None:
        time.sleep(0.001)

    def stage(value):
        sd = {"w": torch.full((4,), value)}
        return area.stage_async(sd).result() if asynchronous else area.stage(sd)

    for value in (2.0, 3.0):  # the second try must not pass the first one's failure
        with pytest.raises(StagingBusyError, match="still used by the save running in thread"):
            stage(value)
        assert first["w"].tolist() == [1.0] * 4
    done.set()
    saver.join()
    assert stage(4.0)["w"].tolist() == [4.0] * 4
    area.close()


# ----------------------------------------------------------------- early writes


def _small_state() -> dict:
    # 39 small tensors: three files get 10, the last 9, so "small" goes to the last file laid out.
    sd = {f"t{i:02d}": torch.full((256,), float(i)) for i in range(39)}
    sd["small"] = torch.arange(10.0)
    return sd


def test_files_are_written_as_they_are_laid_out(engine_name, tmp_path, monkeypatch):
    """On the native engine each complete file of small host tensors goes to the engine while
    later ones are laid out, and the checkpoint is the one a single engine call writes; large
    tensors, a single file and the Python engine take one call."""
    calls = []
    real = writer_module.FileSystemWriter._write_host_files

    def spy(self, engine, crc_block, files):
        calls.append(sorted(fl.relative_path for fl in files))
        return real(self, engine, crc_block, files)

    monkeypatch.setattr(writer_module.FileSystemWriter, "_write_host_files", spy)
    sd = _small_state()
    dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(str(tmp_path), thread_count=4), no_dist=True)
    if engine_name == "native":
        assert sorted(sum(calls, [])) == sorted(data_files(tmp_path))
    else:
        assert calls == []
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    dcp.load(out, storage_reader=dcp_native.FileSystemReader(str(tmp_path), verify=engine_name == "native"),
             no_dist=True)  # verified against the tables the native engine wrote from early CRCs
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    calls.clear()
    dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(str(tmp_path / "one")), no_dist=True)
    big = {f"b{i}": torch.zeros(1 << 16) for i in range(8)}  # 256 KiB each
    dcp.save(big, storage_writer=dcp_native.FileSystemWriter(str(tmp_path / "big"), thread_count=4), no_dist=True)
    assert calls == []


def test_a_layout_failure_waits_for_early_writes_before_removing_files(engine_name, tmp_path, monkeypatch):
    """Files handed to the engine early are still being written when a later item fails to
    resolve: the save waits for them, then removes every file it wrote; nothing is written
    after it raised."""
    real = writer_module.FileSystemWriter._write_host_files
    started = threading.Event()

    def slow(self, engine, crc_block, files):
        started.set()
        time.sleep(0.3)
        return real(self, engine, crc_block, files)

    class Failing(dcp.DefaultSavePlanner):
        def resolve_data(self, write_item):
            if write_item.index.fqn == "small":
                # On the native engine an early write is in flight (the Python engine writes none).
                assert started.wait(10) if engine_name == "native" else not started.is_set()
                raise RuntimeError("injected resolve failure")
            return super().resolve_data(write_item)

    monkeypatch.setattr(writer_module.FileSystemWriter, "_write_host_files", slow)
    with pytest.raises(CheckpointException, match="injected resolve failure"):
        dcp.save(_small_state(), storage_writer=dcp_native.FileSystemWriter(str(tmp_path), thread_count=4),
                 planner=Failing(), no_dist=True)
    assert data_files(tmp_path) == []
    time.sleep(0.5)
    assert data_files(tmp_path) == [] and not (tmp_path / ".metadata").exists()


def test_a_failed_early_write_fails_the_save_and_leaves_nothing(engine_name, tmp_path, monkeypatch):
    """ENOSPC in the first engine call (on the native engine: the early write of the first file,
    while the others are laid out): the save raises it, naming the file, and removes what it wrote;
    the committed checkpoint stays."""
    old = _small_state()
    dcp.save(old, storage_writer=dcp_native.FileSystemWriter(str(tmp_path), thread_count=4), no_dist=True)
    listing = sorted(os.listdir(tmp_path))
    monkeypatch.setenv("DCP_NATIVE_FAULT", "write:ENOSPC:1")
    new = {k: v + 1 for k, v in old.items()}
    with pytest.raises(CheckpointException) as info:
        dcp.save(new, storage_writer=dcp_native.FileSystemWriter(str(tmp_path), thread_count=4), no_dist=True)
    err = failure(info)
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC and str(tmp_path) in err.filename
    assert sorted(os.listdir(tmp_path)) == listing
    monkeypatch.delenv("DCP_NATIVE_FAULT")
    out = {k: torch.zeros_like(v) for k, v in old.items()}
    dcp.load(out, storage_reader=dcp_native.FileSystemReader(str(tmp_path)), no_dist=True)
    assert all(torch.equal(out[k], old[k]) for k in old)
