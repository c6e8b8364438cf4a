"""Multi-rank save/load on gloo, on both engines.

* PyTorch's own multi-rank file-system checkpoint tests
  (test/distributed/checkpoint/test_file_system_checkpoint_cpu.py) against
  dcp_native's writer and reader: ShardedTensor save/load, the reshard matrix
  between chunk and enumerable sharding specs, row-wise to column-wise,
  byte objects, sharded <-> plain tensors.
* DTensor checkpoints saved on 4 ranks and loaded on 2 and 3 ranks (uneven
  shards, an empty shard, 2-D meshes, Replicate), and saved on 2 and loaded
  on 4; interop with stock DCP in both directions across world sizes.
* The fast path reads what a rank needs and no more (``last_read_stats``).

Every rank checks its own local shards against the full tensor, computed
independently on each rank from a seed, so a failed check never leaves a peer
waiting in a collective; the matrix scenarios collect every failing
combination and report them together.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed._shard import sharded_tensor
from torch.distributed._shard.sharded_tensor import ShardedTensor, state_dict_hook
from torch.distributed._shard.sharding_spec import (
    ChunkShardingSpec,
    EnumerableShardingSpec,
    ShardMetadata,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import dcp_native
from helpers import run_ranks

pytestmark = pytest.mark.multiprocess

THREAD_COUNTS = (1, 2)
#: Seconds one multi-rank run may take before every rank is killed.
RUN_TIMEOUT = 120.0


# ---------------------------------------------------------------------- helpers


def _slices(offsets, sizes) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(offsets, sizes))


def _differs(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None when equal, otherwise a short description of the difference."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"got {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}"
    if torch.equal(got, want):
        return None
    bad = (got != want).nonzero()
    first = tuple(bad[0].tolist())
    return (
        f"{bad.shape[0]} of {want.numel()} elements differ, first at {list(first)}: "
        f"got {got[first].item()}, want {want[first].item()}"
    )


def _check(failures: list[str], label: str, got: torch.Tensor, want: torch.Tensor) -> None:
    diff = _differs(got, want)
    if diff is not None:
        failures.append(f"rank {dist.get_rank()}: {label}: {diff}")


def _attempt(failures: list[str], label: str, step: Callable[[], Any]) -> bool:
    """Runs one save or load; records a CheckpointException instead of raising.

    DCP gathers what failed on any rank (the storage layer included) into a
    CheckpointException raised on every rank, so every rank takes the same
    branch here and the next scenario starts in step. Any other exception may
    have hit one rank only, with its peers waiting in a collective: it aborts
    the run (the harness reports it and kills the rest).
    """
    try:
        step()
        return True
    except CheckpointException as exc:
        failures.append(f"rank {dist.get_rank()}: {label}: {type(exc).__name__}: {exc}")
        return False


def _checked(engine: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Runs ``fn`` on a rank after checking that the engine under test is the active one."""
    active = dcp_native.backend()
    if active != engine:
        raise AssertionError(f"DCP_NATIVE_BACKEND={engine} but dcp_native.backend() is {active!r}")
    return fn(*args)


def _run(world_size: int, fn: Callable[..., Any], *args: Any, engine: str) -> list[Any]:
    return run_ranks(world_size, _checked, engine, fn, *args, engine=engine, timeout=RUN_TIMEOUT)


def _report(per_rank: list[list[str]]) -> None:
    failures = [f for rank_failures in per_rank for f in rank_failures]
    if failures:
        pytest.fail(f"{len(failures)} failing checks:\n" + "\n".join(failures), pytrace=False)


# ------------------------------------------------------- ShardedTensor scenarios

# ShardedTensor shapes of PyTorch's reshard tests.
ROWS, COLS = 10, 20


def _st_specs() -> list[tuple[str, Any]]:
    """The specs of PyTorch's test_load_with_different_shard_plan, plus column and 2-D blocks."""
    return [
        ("chunk0[r0,r1]", ChunkShardingSpec(dim=0, placements=["rank:0", "rank:1"])),
        (
            "chunk0[r0,r1,r1,r0]",
            ChunkShardingSpec(dim=0, placements=["rank:0", "rank:1", "rank:1", "rank:0"]),
        ),
        (
            "enum-rows[2,1,3,3,1]",
            EnumerableShardingSpec(
                shards=[
                    ShardMetadata(shard_offsets=[0, 0], shard_sizes=[2, 20], placement="rank:0"),
                    ShardMetadata(shard_offsets=[2, 0], shard_sizes=[1, 20], placement="rank:1"),
                    ShardMetadata(shard_offsets=[3, 0], shard_sizes=[3, 20], placement="rank:0"),
                    ShardMetadata(shard_offsets=[6, 0], shard_sizes=[3, 20], placement="rank:1"),
                    ShardMetadata(shard_offsets=[9, 0], shard_sizes=[1, 20], placement="rank:0"),
                ]
            ),
        ),
        (
            "enum-rows[8,2]",
            EnumerableShardingSpec(
                shards=[
                    ShardMetadata(shard_offsets=[0, 0], shard_sizes=[8, 20], placement="rank:1"),
                    ShardMetadata(shard_offsets=[8, 0], shard_sizes=[2, 20], placement="rank:0"),
                ]
            ),
        ),
        ("chunk1[r0,r1]", ChunkShardingSpec(dim=1, placements=["rank:0", "rank:1"])),
        (
            "chunk1[r1,r0,r0]",
            ChunkShardingSpec(dim=1, placements=["rank:1", "rank:0", "rank:0"]),
        ),
        (
            "enum-blocks-2d",
            EnumerableShardingSpec(
                shards=[
                    ShardMetadata(shard_offsets=[0, 0], shard_sizes=[4, 7], placement="rank:0"),
                    ShardMetadata(shard_offsets=[0, 7], shard_sizes=[4, 13], placement="rank:1"),
                    ShardMetadata(shard_offsets=[4, 0], shard_sizes=[6, 7], placement="rank:1"),
                    ShardMetadata(shard_offsets=[4, 7], shard_sizes=[6, 13], placement="rank:0"),
                ]
            ),
        ),
    ]


def _full_st(shape=(ROWS, COLS)) -> torch.Tensor:
    # Distinct, non-zero values: a misplaced or missing element shows up.
    n = 1
    for s in shape:
        n *= s
    return torch.arange(1, n + 1, dtype=torch.float32).reshape(shape)


def _st_from_full(spec, full: torch.Tensor) -> ShardedTensor:
    st = sharded_tensor.zeros(spec, *full.shape, init_rrefs=False)
    for shard in st.local_shards():
        md = shard.metadata
        shard.tensor.copy_(full[_slices(md.shard_offsets, md.shard_sizes)])
    return st


def _check_st(failures: list[str], label: str, st: ShardedTensor, full: torch.Tensor) -> None:
    for shard in st.local_shards():
        md = shard.metadata
        _check(
            failures,
            f"{label}: shard at {list(md.shard_offsets)} size {list(md.shard_sizes)}",
            shard.tensor,
            full[_slices(md.shard_offsets, md.shard_sizes)],
        )


class _ShardedModel(torch.nn.Module):
    """PyTorch's MyShardedModel1/2 (_test_st_common) shapes: sharded and plain tensors, nested."""

    def __init__(self, spec, nested: bool = True) -> None:
        super().__init__()
        self.sharded_tensor1 = sharded_tensor.rand(spec, 10, 20, init_rrefs=False)
        self.random_tensor1 = torch.nn.Parameter(torch.rand(2, 2))
        if nested:
            self.submodule = _ShardedModel(spec, nested=False)
        self._register_state_dict_hook(state_dict_hook)


def _rank_read_write_shard_tensor(path: str) -> list[str]:
    failures: list[str] = []
    spec = ChunkShardingSpec(dim=0, placements=["rank:0", "rank:1"])
    for tc in THREAD_COUNTS:
        ckpt = os.path.join(path, f"threads{tc}")
        torch.manual_seed(1)  # the same on every rank: replicated tensors must agree
        to_save = _ShardedModel(spec).state_dict()
        torch.manual_seed(2)
        to_load = _ShardedModel(spec).state_dict()
        # Sanity: the model to load into starts out different.
        assert not torch.equal(
            to_load["sharded_tensor1"].local_shards()[0].tensor,
            to_save["sharded_tensor1"].local_shards()[0].tensor,
        )
        label = f"threads={tc}"
        if not _attempt(
            failures,
            f"{label} save",
            lambda: dcp_native.save_state_dict(
                to_save, dcp_native.FileSystemWriter(ckpt, thread_count=tc)
            ),
        ):
            continue
        dist.barrier()
        if not _attempt(
            failures,
            f"{label} load",
            lambda: dcp_native.load_state_dict(
                to_load, dcp_native.FileSystemReader(ckpt, thread_count=tc)
            ),
        ):
            continue
        assert to_save.keys() == to_load.keys()
        for key, want in to_save.items():
            got = to_load[key]
            if isinstance(want, ShardedTensor):
                for a, b in zip(got.local_shards(), want.local_shards()):
                    _check(failures, f"{label} {key}", a.tensor, b.tensor)
            else:
                _check(failures, f"{label} {key}", got.detach(), want.detach())
    return failures


def _rank_reshard_matrix(path: str) -> list[str]:
    failures: list[str] = []
    full = _full_st()
    specs = _st_specs()
    for tc in THREAD_COUNTS:
        for i, (name0, spec0) in enumerate(specs):
            ckpt = os.path.join(path, f"threads{tc}_spec{i}")
            saved = _st_from_full(spec0, full)
            if not _attempt(
                failures,
                f"threads={tc} save {name0}",
                lambda: dcp.save(
                    {"st": saved}, storage_writer=dcp_native.FileSystemWriter(ckpt, thread_count=tc)
                ),
            ):
                continue
            for name1, spec1 in specs:
                label = f"threads={tc} {name0} -> {name1}"
                target = sharded_tensor.zeros(spec1, ROWS, COLS, init_rrefs=False)
                if _attempt(
                    failures,
                    label,
                    lambda: dcp.load(
                        {"st": target},
                        storage_reader=dcp_native.FileSystemReader(ckpt, thread_count=tc),
                    ),
                ):
                    _check_st(failures, label, target, full)
    return failures


def _gather_st(st: ShardedTensor) -> torch.Tensor | None:
    out = torch.zeros(st.shape) if dist.get_rank() == 0 else None
    st.gather(out=out)
    return out


def _rank_rowwise_to_colwise(path: str) -> list[str]:
    failures: list[str] = []
    src = ChunkShardingSpec(dim=0, placements=["rank:0", "rank:1"])
    dst = ChunkShardingSpec(dim=1, placements=["rank:0", "rank:1"])
    for tc in THREAD_COUNTS:
        ckpt = os.path.join(path, f"threads{tc}")
        torch.manual_seed(10 + tc)
        to_save = {"sharded_tensor": sharded_tensor.rand(src, ROWS, COLS, init_rrefs=False)}
        to_load = {"sharded_tensor": sharded_tensor.zeros(dst, ROWS, COLS, init_rrefs=False)}
        dcp_native.save_state_dict(to_save, dcp_native.FileSystemWriter(ckpt, thread_count=tc))
        dcp_native.load_state_dict(to_load, dcp_native.FileSystemReader(ckpt, thread_count=tc))
        # As PyTorch's test does it: gather both to rank 0 and compare there.
        stored = _gather_st(to_save["sharded_tensor"])
        loaded = _gather_st(to_load["sharded_tensor"])
        if dist.get_rank() == 0:
            _check(failures, f"threads={tc} gathered", loaded, stored)
    return failures


def _rank_save_load_bytes(path: str) -> list[str]:
    failures: list[str] = []
    for tc in THREAD_COUNTS:
        ckpt = os.path.join(path, f"threads{tc}")
        to_save = {"bytes0": [1], "bytes1": "string"}
        dcp_native.save_state_dict(to_save, dcp_native.FileSystemWriter(ckpt, thread_count=tc))
        to_load = {"bytes0": [2], "bytes1": "other"}
        dcp_native.load_state_dict(to_load, dcp_native.FileSystemReader(ckpt, thread_count=tc))
        if to_load != {"bytes0": [1], "bytes1": "string"}:
            failures.append(f"rank {dist.get_rank()}: threads={tc}: loaded {to_load}")
    return failures


def _rank_sharded_to_plain(path: str) -> list[str]:
    """PyTorch's test_switch_between_sharded_tensor_to_tensor: sharded <-> plain swapped on load."""
    failures: list[str] = []
    n = 32
    specs = [
        ("chunk0[r0,r1]", ChunkShardingSpec(dim=0, placements=["rank:0", "rank:1"])),
        (
            "chunk0[r0,r1,r1,r0]",
            ChunkShardingSpec(dim=0, placements=["rank:0", "rank:1", "rank:1", "rank:0"]),
        ),
        (
            "enum[8,24]",
            EnumerableShardingSpec(
                shards=[
                    ShardMetadata(shard_offsets=[0], shard_sizes=[8], placement="rank:1"),
                    ShardMetadata(shard_offsets=[8], shard_sizes=[n - 8], placement="rank:0"),
                ]
            ),
        ),
        (
            "enum[10,22]",
            EnumerableShardingSpec(
                shards=[
                    ShardMetadata(shard_offsets=[0], shard_sizes=[10], placement="rank:0"),
                    ShardMetadata(shard_offsets=[10], shard_sizes=[n - 10], placement="rank:1"),
                ]
            ),
        ),
    ]
    full_sharded = _full_st((n,))
    full_plain = -_full_st((n,))
    for tc in THREAD_COUNTS:
        for i, (save_name, save_spec) in enumerate(specs):
            ckpt = os.path.join(path, f"threads{tc}_spec{i}")
            to_save = {
                "sharded": _st_from_full(save_spec, full_sharded),
                "replicated": full_plain.clone(),
            }
            if not _attempt(
                failures,
                f"threads={tc} save {save_name}",
                lambda: dcp.save(
                    to_save, storage_writer=dcp_native.FileSystemWriter(ckpt, thread_count=tc)
                ),
            ):
                continue
            for load_name, load_spec in specs:
                label = f"threads={tc} {save_name} -> plain / plain -> {load_name}"
                to_load = {
                    "sharded": torch.zeros(n),
                    "replicated": sharded_tensor.zeros(load_spec, n, init_rrefs=False),
                }
                if _attempt(
                    failures,
                    label,
                    lambda: dcp.load(
                        to_load, storage_reader=dcp_native.FileSystemReader(ckpt, thread_count=tc)
                    ),
                ):
                    _check(failures, f"{label} [sharded]", to_load["sharded"], full_sharded)
                    _check_st(failures, f"{label} [replicated]", to_load["replicated"], full_plain)
    return failures


@pytest.mark.parametrize(
    "scenario",
    [
        _rank_read_write_shard_tensor,
        _rank_reshard_matrix,
        _rank_rowwise_to_colwise,
        _rank_save_load_bytes,
        _rank_sharded_to_plain,
    ],
    ids=lambda f: f.__name__.removeprefix("_rank_"),
)
def test_sharded_tensor(engine_name, tmp_path, scenario):
    """PyTorch's 2-rank ShardedTensor checkpoint tests, thread counts 1 and 2, on dcp_native."""
    _report(_run(2, scenario, str(tmp_path), engine=engine_name))


# ------------------------------------------------------------ DTensor resharding

#: Tensors of the DTensor checkpoints: key -> (shape, dtype, mesh shape, placements when saved).
#: "row" is wide enough that each run a 2-rank column-wise load needs is 8 KiB.
DT_SAVED = {
    "row": ((8, 4096), torch.float32, (4,), (Shard(0),)),
    # 10 rows on 4 ranks: 3, 3, 3, 1.
    "odd": ((10, 7), torch.float32, (4,), (Shard(0),)),
    # 5 columns on 4 ranks: 2, 2, 1, 0 (rank 3 holds an empty shard).
    "cols": ((12, 5), torch.int64, (4,), (Shard(1),)),
    "blocks": ((8, 12), torch.float32, (2, 2), (Shard(0), Shard(1))),
    "rep_shard": ((6, 9), torch.bfloat16, (2, 2), (Replicate(), Shard(1))),
    "twice0": ((12, 3), torch.float64, (2, 2), (Shard(0), Shard(0))),
    "replicated": ((5, 3), torch.float32, (4,), (Replicate(),)),
    "plain": ((7,), torch.float32, None, None),
}
DT_OBJECTS = {"step": 7, "meta": {"name": "ckpt", "ranks": [0, 1, 2, 3]}}

#: How each tensor is loaded on a 1-D mesh of M ranks.
DT_LOADED_1D = {
    "row": (Shard(1),),
    "odd": (Shard(1),),
    "cols": (Shard(0),),
    "blocks": (Shard(1),),
    "rep_shard": (Shard(0),),
    "twice0": (Replicate(),),
    "replicated": (Shard(0),),
    "plain": (Shard(0),),
}


def _full_dt(key: str) -> torch.Tensor:
    shape, dtype = DT_SAVED[key][:2]
    gen = torch.Generator().manual_seed(sum(map(ord, key)))
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    return torch.randint(-(10**9), 10**9, shape, generator=gen, dtype=dtype)


#: Device meshes of this rank process, by (pid, shape): each new mesh sets up new
#: gloo groups, which costs more than the loads themselves.
_MESH_CACHE: dict[tuple[int, tuple[int, ...]], Any] = {}


def _meshes(shapes) -> dict[tuple[int, ...], Any]:
    out = {}
    for shape in set(shapes):
        key = (os.getpid(), shape)
        if key not in _MESH_CACHE:
            _MESH_CACHE[key] = init_device_mesh("cpu", shape)
        out[shape] = _MESH_CACHE[key]
    return out


def _distribute(key: str, mesh, placements) -> DTensor:
    # src_data_rank=None: every rank cuts its shard from its own copy, no communication.
    return distribute_tensor(_full_dt(key), mesh, list(placements), src_data_rank=None)


def _saved_state_dict() -> dict[str, Any]:
    meshes = _meshes(m for _, _, m, _ in DT_SAVED.values() if m is not None)
    sd: dict[str, Any] = {}
    for key, (_, _, mesh_shape, placements) in DT_SAVED.items():
        if mesh_shape is None:
            sd[key] = _full_dt(key)
        else:
            sd[key] = _distribute(key, meshes[mesh_shape], placements)
    sd.update(DT_OBJECTS)
    return sd


def _rank_save_dtensors(native_path: str, stock_path: str) -> None:
    sd = _saved_state_dict()
    dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(native_path))
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(stock_path))


def _targets(layouts: dict[str, tuple[tuple[int, ...], tuple]]) -> tuple[dict, dict]:
    """Zeroed DTensor targets, and what each rank's local shard must hold after the load."""
    meshes = _meshes(m for m, _ in layouts.values())
    targets, want = {}, {}
    for key, (mesh_shape, placements) in layouts.items():
        dt = _distribute(key, meshes[mesh_shape], placements)
        want[key] = dt.to_local().clone()
        dt.to_local().zero_()
        targets[key] = dt
    return targets, want


def _rank_load_dtensors(path: str, reader_kind: str) -> list[str]:
    failures: list[str] = []
    m = dist.get_world_size()
    cases = [("1-D", {k: ((m,), p) for k, p in DT_LOADED_1D.items()})]
    # The same checkpoint again, everything replicated on every rank.
    cases.append(("Replicate", {k: ((m,), (Replicate(),)) for k in DT_SAVED}))
    if m == 4:
        two_d = {k: ((2, 2), (Shard(1), Shard(0))) for k, v in DT_SAVED.items() if len(v[0]) == 2}
        cases.append(("2-D", two_d))
    for case, layouts in cases:
        targets, want = _targets(layouts)
        sd: dict[str, Any] = dict(targets)
        if case == "1-D":
            sd.update({"step": 0, "meta": {"name": "", "ranks": []}})
        if reader_kind == "native":
            reader = dcp_native.FileSystemReader(path)
        else:
            reader = dcp.FileSystemReader(path)
        if not _attempt(failures, f"{case} load", lambda: dcp.load(sd, storage_reader=reader)):
            continue
        for key, dt in targets.items():
            placements = tuple(str(p) for p in dt.placements)
            _check(failures, f"{case} {key} as {placements}", sd[key].to_local(), want[key])
        objects = {k: sd[k] for k in DT_OBJECTS if k in sd}
        if case == "1-D" and objects != DT_OBJECTS:
            failures.append(f"rank {dist.get_rank()}: objects: loaded {objects!r}")
    return failures


@pytest.fixture(scope="module")
def _dtensor_checkpoint_cache(tmp_path_factory) -> dict:
    return {"root": tmp_path_factory.mktemp("dtensor_ckpts")}


@pytest.fixture
def dtensor_checkpoints(engine_name, _dtensor_checkpoint_cache) -> dict[str, str]:
    """DTensor checkpoints saved on 4 ranks: {"native": dcp_native's, "stock": stock DCP's}.

    Saved once per engine and module; a failed save fails every test that uses it.
    """
    cache = _dtensor_checkpoint_cache
    if engine_name not in cache:
        root = cache["root"] / engine_name
        paths = {"native": str(root / "native"), "stock": str(root / "stock")}
        try:
            _run(4, _rank_save_dtensors, paths["native"], paths["stock"], engine=engine_name)
            cache[engine_name] = paths
        except Exception as exc:  # noqa: BLE001
            cache[engine_name] = exc
    result = cache[engine_name]
    if isinstance(result, Exception):
        raise result
    return result


@pytest.mark.parametrize("load_ranks", [2, 3])
def test_dtensor_reshard_fewer_ranks(engine_name, dtensor_checkpoints, load_ranks):
    """Saved by dcp_native on 4 ranks, loaded by dcp_native on 2 and 3 (uneven shards)."""
    path = dtensor_checkpoints["native"]
    _report(_run(load_ranks, _rank_load_dtensors, path, "native", engine=engine_name))


def _rank_save_2(path: str) -> None:
    mesh = init_device_mesh("cpu", (2,))
    sd = {key: _distribute(key, mesh, (Shard(1),)) for key, v in DT_SAVED.items() if len(v[0]) == 2}
    sd["plain"] = _full_dt("plain")
    sd.update(DT_OBJECTS)
    dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(path, thread_count=3))


def test_dtensor_reshard_more_ranks(engine_name, tmp_path):
    """Saved by dcp_native on 2 ranks (Shard(1)), loaded on 4 (1-D, 2-D and replicated)."""
    path = str(tmp_path / "ckpt")
    _run(2, _rank_save_2, path, engine=engine_name)
    _report(_run(4, _rank_load_dtensors, path, "native", engine=engine_name))


@pytest.mark.parametrize("load_ranks", [2, 3])
def test_interop_stock_save_native_load(engine_name, dtensor_checkpoints, load_ranks):
    """Saved by stock DCP on 4 ranks, loaded by dcp_native on 2 and 3."""
    path = dtensor_checkpoints["stock"]
    _report(_run(load_ranks, _rank_load_dtensors, path, "native", engine=engine_name))


@pytest.mark.parametrize("load_ranks", [2, 3])
def test_interop_native_save_stock_load(engine_name, dtensor_checkpoints, load_ranks):
    """Saved by dcp_native on 4 ranks, loaded by stock DCP on 2 and 3."""
    path = dtensor_checkpoints["native"]
    _report(_run(load_ranks, _rank_load_dtensors, path, "stock", engine=engine_name))


# ------------------------------------------------------------ bytes actually read


def _rank_load_row_colwise(path: str) -> tuple[int, int, int, list[str]]:
    failures: list[str] = []
    targets, want = _targets({"row": ((dist.get_world_size(),), (Shard(1),))})
    # The read plan itself; checksum verification, which completes the 4 KiB
    # blocks these unaligned runs touch, is covered in test_integrity.py.
    reader = dcp_native.FileSystemReader(path, verify=False)
    dcp.load(targets, storage_reader=reader)
    _check(failures, "row as Shard(1)", targets["row"].to_local(), want["row"])
    needed = want["row"].numel() * want["row"].element_size()
    stats = reader.last_read_stats
    return needed, stats.bytes_read, stats.calls, failures


def test_fast_path_reads_only_needed_bytes(engine_name, dtensor_checkpoints):
    """4 ranks Shard(0) -> 2 ranks Shard(1): each rank reads its half columns, not whole rows.

    Each saved chunk is 2 rows of 4096 float32; a rank needs 2 runs of 8 KiB
    from each, 8 KiB apart: too far apart to be worth coalescing.
    """
    results = _run(2, _rank_load_row_colwise, dtensor_checkpoints["native"], engine=engine_name)
    _report([r[3] for r in results])
    for rank, (needed, bytes_read, calls, _) in enumerate(results):
        assert needed == 8 * 2048 * 4
        assert needed <= bytes_read <= 1.1 * needed, (
            f"rank {rank} read {bytes_read} bytes in {calls} calls; it needs {needed}"
        )
        assert calls >= 1
