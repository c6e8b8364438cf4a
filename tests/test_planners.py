"""dcp_native.CachingSavePlanner / CachingLoadPlanner: plans cached across saves and loads.

* Repeated saves and loads of one structure reuse their plans (``planner.reused``) and the
  writer its layout, and give what stock's planners give: the same metadata, bit-exact tensors,
  objects pickled afresh by every save; stock's reader loads what they save; they work with
  stock's writer and reader too.
* A changed structure (new or removed key, shape, dtype, strides, nesting, device, sharding)
  is planned afresh; a cached load plan is never used for another checkpoint.
* Multi-rank (gloo, 2 and 3 ranks): replicated tensors, a sharded DTensor, a rank-local change,
  ranks whose planners are out of step (one save fails, the next plans in full).
* dcp_native's writer with stock's ``enable_plan_caching``: the cached plan carries an earlier
  save's tag; the save still writes its own files (never the committed checkpoint's).
"""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader as StockReader
from torch.distributed.checkpoint import FileSystemWriter as StockWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

import dcp_native
from dcp_native import checkpoint
from dcp_native.planners import structure
from dcp_native.writer import _fresh, _KeptLayout, _PickledMetadata, _pickle_metadata
from helpers import data_files, run_ranks

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
warnings.filterwarnings("ignore", message=".*Detected an existing checkpoint.*")

DTYPES = (torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.float64)


def _state(step: int, n: int = 12) -> dict:
    """A nested state dict: tensors of several dtypes and sizes (one empty) and objects whose
    values, and for some their pickles' lengths, change with ``step``."""
    g = torch.Generator().manual_seed(step)
    model = {f"w{i}": (torch.randn(5 + i, 7, generator=g) * 100).to(DTYPES[i % len(DTYPES)])
             for i in range(n)}
    model["big"] = torch.randn(300, 257, generator=g)
    model["empty"] = torch.zeros(0, 3)
    return {"model": model, "optim": {"step": step, "lr": 0.1 * step, "hist": list(range(step % 3))},
            "tag": f"run-{step}"}


def _blank(sd):
    if isinstance(sd, dict):
        return {k: _blank(v) for k, v in sd.items()}
    return torch.full_like(sd, 7) if isinstance(sd, torch.Tensor) else None


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    return a == b


def _metadata(path):
    with open(os.path.join(path, ".metadata"), "rb") as f:
        return pickle.load(f)


def _plan_of(path):
    """What the planner decides: everything of the metadata but where the bytes went."""
    md = _metadata(path)
    return md.state_dict_metadata, md.planner_data


def _writer(path, **kw):
    return dcp_native.FileSystemWriter(path, thread_count=kw.pop("thread_count", 3), sync_files=False, **kw)


def _load(path, like, reader=None, planner=None):
    out = _blank(like)
    dcp.load(out, storage_reader=reader or StockReader(path), planner=planner, no_dist=True)
    return out


# ---------------------------------------------------------------------- one process


def test_repeated_saves_and_loads_are_stocks(engine_name, tmp_path):
    """Three saves and loads with one planner each: the second and third reuse the plans (and
    the writer its layout), every checkpoint has stock's metadata and loads bit-exact with
    stock's reader; the caching loads give bit-exact values too."""
    saver, loader = dcp_native.CachingSavePlanner(), dcp_native.CachingLoadPlanner()
    path, ref = str(tmp_path / "ck"), str(tmp_path / "ref")
    for step in range(3):
        sd = _state(step)
        dcp.save(sd, storage_writer=_writer(path), planner=saver, no_dist=True)
        assert saver.reused == (step > 0)
        assert _KeptLayout in saver.storage_cache
        dcp.save(sd, storage_writer=StockWriter(ref, sync_files=False), no_dist=True)
        assert _plan_of(path) == _plan_of(ref)
        assert _equal(_load(path, sd), sd)
        side = checkpoint.Checkpoint(path).sidecar
        assert side.usable, side.reason  # bound to the metadata's bytes, however they were made
        got = _load(path, sd, dcp_native.FileSystemReader(path), loader)
        assert not loader.reused  # a new checkpoint
        assert _equal(got, sd)
        got = _load(path, sd, dcp_native.FileSystemReader(path), loader)
        assert loader.reused and _equal(got, sd)


def test_objects_are_saved_afresh(engine_name, tmp_path):
    """Objects change between saves, with pickles of the same and of other lengths; tensors
    change in place and are replaced by new tensors: every save holds the new values."""
    saver = dcp_native.CachingSavePlanner()
    path = str(tmp_path / "ck")
    sd = _state(0)
    for step, obj in enumerate([10, 11, 12345678901234567890, "x" * 5000, 13]):
        sd["optim"]["step"] = obj
        sd["model"]["w0"].add_(1)                   # same tensor, new values
        sd["model"]["w1"] = sd["model"]["w1"] * 2   # a new tensor
        dcp.save(sd, storage_writer=_writer(path), planner=saver, no_dist=True)
        assert saver.reused == (step > 0)
        assert _equal(_load(path, sd), sd)


@pytest.mark.parametrize("change", ["new key", "removed key", "shape", "dtype", "strides",
                                    "nesting", "requires_grad", "tensor to object"])
def test_changed_structure_is_planned_afresh(engine_name, tmp_path, change):
    saver, loader = dcp_native.CachingSavePlanner(), dcp_native.CachingLoadPlanner()
    path, ref = str(tmp_path / "ck"), str(tmp_path / "ref")
    sd = _state(1)
    for _ in range(2):
        dcp.save(sd, storage_writer=_writer(path), planner=saver, no_dist=True)
        _load(path, sd, dcp_native.FileSystemReader(path), loader)
    assert saver.reused
    model = sd["model"]
    if change == "new key":
        model["extra"] = torch.ones(3)
    elif change == "removed key":
        del model["w2"]
    elif change == "shape":
        model["w2"] = torch.randn(7, 7)
    elif change == "dtype":
        model["w2"] = model["w2"].to(torch.float16)
    elif change == "strides":
        model["big"] = model["big"].t().contiguous().t()  # same shape and values, column-major
    elif change == "nesting":  # the same flat keys in the same order, another path
        nested = sd.pop("optim")
        sd.update({f"optim.{k}": v for k, v in nested.items()}, tag=sd.pop("tag"))
    elif change == "requires_grad":
        model["w0"] = model["w0"].float().requires_grad_()
    elif change == "tensor to object":
        model["w3"] = [1, 2, 3]
    dcp.save(sd, storage_writer=_writer(path), planner=saver, no_dist=True)
    assert not saver.reused
    dcp.save(sd, storage_writer=StockWriter(ref, sync_files=False), no_dist=True)
    assert _plan_of(path) == _plan_of(ref)
    assert _equal(_load(path, sd), sd)
    got = _load(path, sd, dcp_native.FileSystemReader(path), loader)
    assert not loader.reused and _equal(got, sd)


def test_a_subclass_that_transforms_objects_is_honoured(engine_name, tmp_path):
    """A subclass overriding DefaultSavePlanner's transform_object sees every item."""
    class Doubling(dcp_native.CachingSavePlanner):
        def transform_object(self, write_item, obj):
            obj = super().transform_object(write_item, obj)
            return obj * 2 if isinstance(obj, torch.Tensor) else obj

    saver, sd = Doubling(), {"a": torch.arange(6.0), "n": 3}
    for _ in range(2):
        dcp.save(sd, storage_writer=_writer(str(tmp_path)), planner=saver, no_dist=True)
        assert _equal(_load(str(tmp_path), sd), {"a": sd["a"] * 2, "n": 3})


def test_async_saves(engine_name, tmp_path):
    """dcp.async_save stages a new state dict each time: same structure, plans reused."""
    saver, writer = dcp_native.CachingSavePlanner(), _writer(str(tmp_path))
    for step in range(3):
        sd = _state(step)
        dcp.async_save(sd, storage_writer=writer, planner=saver).result()
        assert saver.reused == (step > 0) and _equal(_load(str(tmp_path), sd), sd)
    writer.close()


def test_structure_sees_device_and_sharded_values():
    t = torch.ones(2, 3)
    base = structure({"a": t})
    assert structure({"a": torch.zeros(2, 3)}) == base
    assert structure({"a": torch.ones(2, 3, device="meta")}) != base
    assert structure({"a": t}, {"a": ("x", "a")}) != base
    assert structure({"a": t.to_sparse()}) is None  # planned every time
    assert structure({"a": 3}) == structure({"a": "three"})  # objects: only that they are


def test_a_token_the_coordinator_does_not_hold_raises():
    """A rank's token names its plan; a coordinator that holds another plan for that rank index
    (another planner's) refuses it rather than use its own."""
    sd = {"a": torch.ones(3), "b": torch.zeros(2)}

    def save(planner):
        planner.set_up_planner(sd, is_coordinator=True)
        local = planner.create_local_plan()
        return local, lambda: planner.finish_plan(planner.create_global_plan([local])[0][0])

    p, q = dcp_native.CachingSavePlanner(), dcp_native.CachingSavePlanner()
    for planner in (p, q):
        save(planner)[1]()
    token, _ = save(p)
    assert not token.usable and not token.items
    with pytest.raises(RuntimeError, match="out of step"):
        q.create_global_plan([token])


def test_a_cached_load_is_never_used_for_another_checkpoint(engine_name, tmp_path):
    """Same structure, other checkpoints: another directory, the same directory saved again
    (same values even), then the first one again: each is planned for itself."""
    saver, loader = dcp_native.CachingSavePlanner(), dcp_native.CachingLoadPlanner()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    sd_a, sd_b = _state(1), _state(2)
    dcp.save(sd_a, storage_writer=_writer(a), planner=saver, no_dist=True)
    dcp.save(sd_b, storage_writer=_writer(b), planner=saver, no_dist=True)
    for path, want in ((a, sd_a), (a, sd_a), (b, sd_b), (a, sd_a)):
        got = _load(path, want, dcp_native.FileSystemReader(path), loader)
        assert _equal(got, want)
    dcp.save(sd_a, storage_writer=_writer(a), planner=saver, no_dist=True)
    got = _load(a, sd_a, dcp_native.FileSystemReader(a), loader)
    assert not loader.reused and _equal(got, sd_a)
    loads = []
    for path, want in ((a, sd_a), (b, sd_b), (b, sd_b)):
        loads.append(_equal(_load(path, want, dcp_native.FileSystemReader(path), loader), want))
        loads.append(loader.reused)
    assert loads == [True, True, True, False, True, True]


def test_with_stock_storage(engine_name, tmp_path):
    """With stock's writer and reader: plans cached on save; loads plan every time (stock's
    reader parses the metadata anew); results bit-exact."""
    saver, loader = dcp_native.CachingSavePlanner(), dcp_native.CachingLoadPlanner()
    path = str(tmp_path / "ck")
    for step in range(3):
        sd = _state(step)
        dcp.save(sd, storage_writer=StockWriter(path, sync_files=False), planner=saver, no_dist=True)
        assert saver.reused == (step > 0)
        assert _equal(_load(path, sd, StockReader(path), loader), sd) and not loader.reused
        assert _equal(_load(path, sd, dcp_native.FileSystemReader(path)), sd)


def test_after_a_failed_save(engine_name, tmp_path, monkeypatch):
    """A save that fails after the plans were agreed (writing) leaves them valid: the next save
    reuses them. One that fails before (the writer's global step) makes the next plan in full."""
    saver = dcp_native.CachingSavePlanner()
    path = str(tmp_path / "ck")
    dcp.save(_state(1), storage_writer=_writer(path), planner=saver, no_dist=True)
    def fail(*args, **kwargs):
        raise OSError("no lock today")

    for fault, reused in (("write", True), ("prepare_global_plan", False)):
        with monkeypatch.context() as m:
            if fault == "write":
                m.setenv("DCP_NATIVE_FAULT", "write:ENOSPC:1")
            else:
                m.setattr(dcp_native.FileSystemWriter, "prepare_global_plan", fail)
            with pytest.raises(CheckpointException):
                dcp.save(_state(2), storage_writer=_writer(path), planner=saver, no_dist=True)
        sd = _state(3)
        dcp.save(sd, storage_writer=_writer(path), planner=saver, no_dist=True)
        assert saver.reused == reused and _equal(_load(path, sd), sd)


@pytest.mark.parametrize("native", [True, False], ids=["native_pickler", "pickle"])
def test_a_kept_metadata_pickle_is_reused_only_where_it_is_sound(native):
    """The next save's metadata pickle is the last one with its save id and file names replaced,
    only when each occurs once in it (else a key equal to a name, say, could be replaced); with
    pickle's stream and with the native pickler's."""
    from dcp_native import _metadata_pickle
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta

    def metadata(sd_md, save_id, name):
        md = Metadata(sd_md, planner_data={"k": ("k",)}, version="1.0.0")
        md.storage_data = {MetadataIndex("k"): _StorageInfo(_fresh(name), 0, 10)}
        md.storage_meta = StorageMeta("/ck", _fresh(save_id))
        return md

    for key, reused in (("k", True), ("__0_0.aaaa.distcp", False)):
        sd_md = {key: None}
        first = metadata(sd_md, "s" * 32, "__0_0.aaaa.distcp")
        first.planner_data = {key: (key,)}
        _pickle_metadata(first, native)
        second = metadata(sd_md, "t" * 32, "__0_0.bbbb.distcp")
        second.planner_data = first.planner_data
        kept = _PickledMetadata(sd_md, first.planner_data, {"version": first.version}, first.storage_meta,
                                first.storage_data, _metadata_pickle.dumps(first, native))
        got = kept.reuse(second)
        assert (got is not None) == reused
        if got is not None:
            assert pickle.loads(got) == second
        assert pickle.loads(_pickle_metadata(second, native)) == second


def test_kept_layout_falls_back_when_a_tensor_no_longer_fits(engine_name, tmp_path):
    """Stock's plan caching hands the writer the same plan for a tensor that became column-major
    (its plan does not record strides): the writer lays out anew and saves the right values."""
    saver = DefaultSavePlanner(enable_plan_caching=True)
    saver._cached_plans_key = f"{__name__}.{tmp_path}"  # stock's cache is per class: a key of our own
    writer = _writer(str(tmp_path), thread_count=2)
    sd = {"a": torch.randn(40, 30), "b": torch.arange(12.0)}
    for a in (sd["a"], sd["a"] + 1, (sd["a"] - 1).t().contiguous().t(), sd["a"] * 3):
        sd["a"] = a
        dcp.save(sd, storage_writer=writer, planner=saver, no_dist=True)
        assert _equal(_load(str(tmp_path), sd), sd)
    assert _KeptLayout in writer._layouts


def test_stock_plan_caching_never_writes_the_committed_files(engine_name, tmp_path):
    """Stock's enable_plan_caching hands back the first save's plan, tag included: each save
    still writes files of its own, and the committed checkpoint's stay untouched until the next
    commit."""
    saver = DefaultSavePlanner(enable_plan_caching=True)
    saver._cached_plans_key = f"{__name__}.{tmp_path}"
    path = str(tmp_path)
    seen = set()
    for step in range(3):
        sd = _state(step)
        dcp.save(sd, storage_writer=_writer(path), planner=saver, no_dist=True)
        names = set(data_files(path))
        assert names and not names & seen
        seen |= names
        assert _equal(_load(path, sd), sd)


# ---------------------------------------------------------------------- several ranks


def _rank_state(step: int, sharding: str, extra: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    g = torch.Generator().manual_seed(step)
    full = torch.randn(8, 6, generator=g)
    dim = {"rows": 0, "cols": 1}[sharding]
    sd = {"dt": distribute_tensor(full, mesh, [Shard(dim)]),
          "rep": torch.arange(10.0) + step,           # replicated: saved once (dedup)
          "step": step}
    if extra and dist.get_rank() == 1:
        sd["only_on_1"] = torch.full((3,), float(step))
    return sd, full


def _ranks_save_and_load(path: str) -> list:
    """On every rank: saves and loads through one pair of caching planners while the structure
    changes; returns (reused on save, reused on load) per step."""
    from torch.distributed.tensor import DTensor

    saver, loader = dcp_native.CachingSavePlanner(), dcp_native.CachingLoadPlanner()
    flags = []
    for step, (sharding, extra) in enumerate([("rows", False), ("rows", False), ("rows", False),
                                              ("cols", False), ("cols", False), ("cols", True),
                                              ("cols", True)]):
        sd, full = _rank_state(step, sharding, extra)
        dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(path, thread_count=2), planner=saver)
        fresh, _ = _rank_state(99, sharding, extra)
        for k, v in fresh.items():
            if isinstance(v, DTensor):
                v.to_local().fill_(-1)
        dcp.load(fresh, storage_reader=dcp_native.FileSystemReader(path), planner=loader)
        dcp.load(fresh, storage_reader=dcp_native.FileSystemReader(path), planner=loader)
        assert torch.equal(fresh["dt"].full_tensor(), full), step
        assert torch.equal(fresh["rep"], sd["rep"]) and fresh["step"] == step
        if extra and dist.get_rank() == 1:
            assert torch.equal(fresh["only_on_1"], sd["only_on_1"])
        stock = _rank_state(98, sharding, extra)[0]
        dcp.load(stock, storage_reader=StockReader(path), planner=DefaultLoadPlanner())
        assert torch.equal(stock["dt"].full_tensor(), full), step
        flags.append((saver.reused, loader.reused))
    return flags


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_cache_and_replan_together(engine_name, tmp_path, world_size):
    """2 and 3 gloo ranks: a DTensor sharded by rows then by columns (unevenly on 3), a
    replicated tensor, an object, then a key on rank 1 only: every change is planned afresh on
    every rank, every result equals the saved values (caching loads and stock's)."""
    results = run_ranks(world_size, _ranks_save_and_load, str(tmp_path), engine=engine_name, timeout=240)
    want = [(False, True), (True, True), (True, True), (False, True), (True, True),
            (False, True), (True, True)]
    assert results == [want] * world_size


def _out_of_step(path: str) -> list:
    """Rank 0 (the coordinator) makes a new planner for the third save; rank 1 keeps its own."""
    planner = dcp_native.CachingSavePlanner()
    outcome = []
    for step in range(5):
        if step == 2 and dist.get_rank() == 0:
            planner = dcp_native.CachingSavePlanner()
        sd = {"t": torch.arange(6.0) * step, "r": torch.full((2,), float(dist.get_rank()))}
        sd = {f"{k}{dist.get_rank()}" if k == "r" else k: v for k, v in sd.items()}
        try:
            dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(path), planner=planner)
        except CheckpointException as exc:  # DCP raises the coordinator's error on every rank
            outcome.append("out of step" in str(exc))
            continue
        out = {k: torch.zeros_like(v) for k, v in sd.items()}
        dcp.load(out, storage_reader=dcp_native.FileSystemReader(path))
        outcome.append((planner.reused, all(torch.equal(out[k], sd[k]) for k in sd)))
    return outcome


@pytest.mark.multiprocess
def test_planners_out_of_step_fail_one_save_then_recover(tmp_path):
    results = run_ranks(2, _out_of_step, str(tmp_path), engine="native", timeout=240)
    assert results == [[(False, True), (True, True), True, (False, True), (True, True)]] * 2
