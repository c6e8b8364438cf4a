"""Cooperative loads (FileSystemReader(cooperative=True)): bytes several ranks need are read once
and shared over the process group. Real gloo ranks, both engines, exact values, bytes read."""

from __future__ import annotations

import os
import random
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import dcp_native
from dcp_native import cooperative
from helpers import RankError, data_files, run_ranks


# ------------------------------------------------------------------ the schedule


def _covered(sched: cooperative.Schedule, rank: int) -> dict[str, list[tuple[int, int]]]:
    """File ranges a rank ends up holding: segments it reads plus segments it receives."""
    got: dict[str, list[tuple[int, int]]] = {}
    sids = [sid for rnd in sched.rounds for sid in rnd.reads]
    sids += [sid for rnd in sched.rounds for msg in rnd.recvs for sid in msg.segments]
    for sid in sids:
        rel, lo, hi, _ = sched.segments[sid]
        got.setdefault(rel, []).append((lo, hi))
    return got


def _union(ranges):
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [tuple(r) for r in out]


def _check_schedule(spans, exchange_bytes, segment_bytes):
    scheds = cooperative.schedule(spans, exchange_bytes, segment_bytes)
    assert len(scheds) == len(spans)
    assert len({len(s.rounds) for s in scheds}) == 1, "every rank has the same rounds"
    read_by: dict[tuple[str, int, int], int] = {}
    for rank, sched in enumerate(scheds):
        for rnd in sched.rounds:
            for sid in rnd.reads:
                rel, lo, hi, _ = sched.segments[sid]
                assert (rel, lo, hi) not in read_by, "a segment is read once"
                read_by[(rel, lo, hi)] = rank
                assert hi - lo <= segment_bytes
    # Every byte read once in all: segments of one file never overlap.
    for rel in {k[0] for k in read_by}:
        mine = sorted((lo, hi) for r, lo, hi in read_by if r == rel)
        assert all(a[1] <= b[0] for a, b in zip(mine, mine[1:]))
    for rank, sched in enumerate(scheds):
        want: dict[str, list] = {}
        for rel, lo, hi in spans[rank]:
            if hi > lo:
                want.setdefault(rel, []).append((lo, hi))
        got = _covered(sched, rank)
        assert {k: _union(v) for k, v in got.items()} == {k: _union(v) for k, v in want.items()}
        # No segment is both read and received by a rank, and received ones were sent by their reader.
        for rnd_i, rnd in enumerate(sched.rounds):
            for msg in rnd.recvs:
                sent = [m for m in scheds[msg.peer].rounds[rnd_i].sends if m.tag == msg.tag]
                assert sent == [cooperative.Message(rank, msg.tag, msg.segments)]
                for sid in msg.segments:
                    assert read_by[sched.segments[sid][:3]] == msg.peer
        # Per round, what a rank reads and receives stays within the bound (a single segment may
        # exceed it alone).
        for rnd in sched.rounds:
            sids = list(rnd.reads) + [s for m in rnd.recvs for s in m.segments]
            total = sum(sched.segments[s][2] - sched.segments[s][1] for s in sids)
            assert total <= max(exchange_bytes, segment_bytes) or len(sids) == 1
    return scheds


span_lists = st.lists(
    st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 400), st.integers(1, 200))
             .map(lambda t: (t[0], t[1], t[1] + t[2])), max_size=6),
    min_size=1, max_size=5)


@settings(max_examples=300, deadline=None)
@given(span_lists, st.integers(1, 300), st.integers(1, 120))
def test_schedule_covers_every_rank_once(spans, exchange_bytes, segment_bytes):
    _check_schedule(spans, exchange_bytes, segment_bytes)


def test_schedule_replicated_spreads_reads():
    """Four replicas of 8 tensors: each rank reads a quarter of the bytes and receives the rest."""
    spans = [[("f", i * 100, (i + 1) * 100) for i in range(8)] for _ in range(4)]
    scheds = _check_schedule(spans, 10 ** 6, 100)
    reads = [sum(s.segments[sid][2] - s.segments[sid][1] for r in s.rounds for sid in r.reads) for s in scheds]
    assert reads == [200, 200, 200, 200]


def test_schedule_partial_overlap_shares_the_overlap():
    """Two ranks whose spans overlap by half: the overlap is read once, the rest by its own rank."""
    scheds = _check_schedule([[("f", 0, 100)], [("f", 50, 150)]], 10 ** 6, 10 ** 6)
    reads = [sorted(s.segments[sid][1:3] for r in s.rounds for sid in r.reads) for s in scheds]
    assert sorted(b for r in reads for b in r) == [(0, 50), (50, 100), (100, 150)]


def test_schedule_packs_small_segments():
    """Many small replicated tensors travel in a few packed messages, not one each."""
    spans = [[("f", i * 1000, i * 1000 + 1000) for i in range(500)] for _ in range(2)]
    scheds = _check_schedule(spans, 10 ** 9, 10 ** 9)
    messages = sum(len(r.sends) for r in scheds[0].rounds)
    assert 1 <= messages <= 2


# ------------------------------------------------------------------ real ranks

ROWS, COLS = 96, 40  # fp32


def _value(key: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, key)))
    return torch.randn(*shape, generator=g)


#: Replicated state (DDP-like): big and small tensors, several dtypes, and an object.
REPLICATED = {
    "big": ((1 << 20) + 7,),          # > ALONE_BYTES: travels alone, straight into place
    "huge": (5 << 20,),               # spans several segments at SEGMENT_BYTES=8 MiB
    "bf": (300, 7),
    **{f"small.{i}": (i + 3, 5) for i in range(60)},  # packed
}


def _replicated(blank: bool) -> dict:
    sd = {}
    for key, shape in REPLICATED.items():
        t = _value(key, shape)
        if key == "bf":
            t = t.to(torch.bfloat16)
        sd[key] = torch.zeros_like(t) if blank else t
    sd["step"] = 0 if blank else 1234
    return sd


def _bytes_read(reader) -> int:
    stats = torch.tensor([reader.last_read_stats.bytes_read, reader.last_read_stats.bytes_received,
                          reader.last_read_stats.bytes_sent], dtype=torch.int64)
    dist.all_reduce(stats)
    return stats.tolist()


def _data_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in data_files(path))


def _rank_replicated(path: str, cooperative_on: bool, segment_bytes: int) -> tuple:
    cooperative.SEGMENT_BYTES = segment_bytes
    sd = _replicated(blank=True)
    reader = dcp_native.FileSystemReader(path, cooperative=cooperative_on, thread_count=2)
    dcp.load(sd, storage_reader=reader)
    want = _replicated(blank=False)
    bad = [k for k in want if k != "step" and not torch.equal(sd[k], want[k])]
    assert not bad, f"rank {dist.get_rank()}: wrong values for {bad[:5]}"
    assert sd["step"] == 1234
    return tuple(_bytes_read(reader))


@pytest.fixture(scope="module")
def replicated_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("coop") / "replicated")
    dcp.save(_replicated(blank=False), storage_writer=dcp_native.FileSystemWriter(path), no_dist=True)
    return path


@pytest.fixture(scope="module")
def stock_replicated_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("coop") / "stock")
    dcp.save(_replicated(blank=False), storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    return path


@pytest.mark.parametrize("kind", ["native", "stock"])
def test_replicated_load_reads_each_byte_once(engine_name, kind, replicated_ckpt, stock_replicated_ckpt):
    """DDP-like: 4 ranks load the whole state; together they read about the checkpoint once."""
    path = replicated_ckpt if kind == "native" else stock_replicated_ckpt
    size = _data_bytes(path)
    read, received, sent = run_ranks(4, _rank_replicated, path, True, 8 << 20, engine=engine_name)[0]
    assert read <= 1.15 * size, f"4 ranks read {read} bytes of a {size}-byte checkpoint"
    assert received == sent and received >= 2.5 * size
    # Without it every rank reads everything (the measure above can fail).
    plain = run_ranks(4, _rank_replicated, path, False, 8 << 20, engine=engine_name)[0]
    assert plain[0] >= 3.5 * size and plain[1] == 0


# (2 x 2) mesh: the first dimension replicates, the second shards.
MESH_SAVED = {"w1": (ROWS, COLS), "w2": (ROWS, COLS), "b": (ROWS,), "emb": (ROWS + 3, 8)}
MESH_LOADS = {
    "w1": (Replicate(), Shard(0)),   # each row shard needed by two replicas
    "w2": (Replicate(), Shard(1)),   # column shards: spans of a row-major chunk
    "b": (Replicate(), Replicate()),  # everyone
    "emb": (Shard(0), Replicate()),  # uneven rows (99 over 2)
}


def _rank_mesh_save(path: str) -> None:
    mesh = init_device_mesh("cpu", (4,))
    sd = {k: distribute_tensor(_value(k, s), mesh, [Shard(0)]) for k, s in MESH_SAVED.items()}
    dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(path, thread_count=2, checksums=True))


def _rank_mesh_load(path: str, cooperative_on: bool, verify: bool) -> tuple:
    mesh = init_device_mesh("cpu", (2, 2))
    sd = {k: distribute_tensor(torch.zeros(s), mesh, list(MESH_LOADS[k])) for k, s in MESH_SAVED.items()}
    reader = dcp_native.FileSystemReader(path, cooperative=cooperative_on, verify=verify, thread_count=2)
    dcp.load(sd, storage_reader=reader)
    for key, shape in MESH_SAVED.items():
        want = distribute_tensor(_value(key, shape), mesh, list(MESH_LOADS[key])).to_local()
        assert torch.equal(sd[key].to_local(), want), f"rank {dist.get_rank()}: {key} differs"
    return tuple(_bytes_read(reader))


@pytest.fixture(scope="module")
def mesh_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("coop") / "mesh")
    run_ranks(4, _rank_mesh_save, path, engine="python")
    return path


@pytest.mark.parametrize("verify", [False, True])
def test_mesh_replicate_shard(engine_name, mesh_ckpt, verify):
    """(2 x 2) mesh, Replicate x Shard placements (rows, columns, uneven): exact values, and the
    4 ranks read at most 1.15x the checkpoint between them (about 2x without cooperation)."""
    size = _data_bytes(mesh_ckpt)
    read = run_ranks(4, _rank_mesh_load, mesh_ckpt, True, verify, engine=engine_name)[0][0]
    assert read <= 1.15 * size + (4 * 4 * 4096 if verify else 0), f"read {read} of {size}"
    if not verify:
        plain = run_ranks(4, _rank_mesh_load, mesh_ckpt, False, False, engine=engine_name)[0][0]
        assert plain >= 1.8 * size


class _RowsPlanner(DefaultLoadPlanner):
    """Reads rows [lo, lo + n) of "w" into a tensor of its own (ranks ask for overlapping rows)."""

    def __init__(self, lo: int, n: int) -> None:
        super().__init__()
        self.lo, self.n = lo, n
        self.out = torch.zeros(n, COLS)

    def create_local_plan(self) -> LoadPlan:
        index = MetadataIndex("w", (0, 0))
        return LoadPlan([ReadItem(LoadItemType.TENSOR, MetadataIndex("w", (0, 0)), (0, 0), index,
                                  (self.lo, 0), (self.n, COLS))])

    def resolve_tensor(self, read_item):
        return self.out


def _rank_rows(path: str, bucket: int) -> tuple:
    rank = dist.get_rank()
    lo, n = [(0, 50), (30, 50), (30, 50), (70, 26)][rank]
    planner = _RowsPlanner(lo, n)
    reader = dcp_native.FileSystemReader(path, cooperative=True, exchange_bytes=bucket)
    dcp.load({"w": torch.zeros(ROWS, COLS)}, storage_reader=reader, planner=planner)
    assert torch.equal(planner.out, _value("w", (ROWS, COLS))[lo:lo + n]), f"rank {rank}"
    return tuple(_bytes_read(reader))


def test_partial_overlaps_share_what_they_can(engine_name, tmp_path):
    """Ranks read overlapping row ranges of one tensor (a custom planner): every row is read
    once, in small rounds too."""
    path = str(tmp_path / "rows")
    dcp.save({"w": _value("w", (ROWS, COLS))}, storage_writer=dcp_native.FileSystemWriter(path), no_dist=True)
    for bucket in (64 << 20, 3000):
        read, received, _ = run_ranks(4, _rank_rows, path, bucket, engine=engine_name)[0]
        assert read <= ROWS * COLS * 4 * 1.05
        # Rows [30, 50) are needed by 3 ranks, [50, 70) by 2, [70, 80) by 3: each reaches the
        # others once (2 x 20 + 20 + 2 x 10 rows); nothing else travels.
        assert received == 80 * COLS * 4


def _rank_fails(path: str, good: str, how: str) -> None:
    rank = dist.get_rank()
    if rank == 2 and how == "fault":
        os.environ["DCP_NATIVE_FAULT"] = "read:EIO:1"
    sd = _replicated(blank=True)
    reader = dcp_native.FileSystemReader(path if rank == 2 else good, cooperative=True, thread_count=2)
    dcp.load(sd, storage_reader=reader)


@pytest.mark.parametrize("how", ["fault", "truncated", "other"])
def test_error_on_one_rank_reaches_all(engine_name, replicated_ckpt, stock_replicated_ckpt, tmp_path, how):
    """Rank 2 fails (an I/O error while reading its share, a truncated file before the
    schedule, another checkpoint than the others'): every rank raises, nobody hangs; the others
    name rank 2 and its error."""
    bad = str(tmp_path / "bad")
    shutil.copytree(replicated_ckpt, bad)
    if how == "other":
        target = stock_replicated_ckpt
    elif how == "truncated":
        f = os.path.join(bad, data_files(bad)[0])
        os.truncate(f, os.path.getsize(f) // 2)
        target = bad
    else:
        target = replicated_ckpt
    with pytest.raises(RankError) as info:
        run_ranks(4, _rank_fails, target, replicated_ckpt, how, engine=engine_name, timeout=90)
    failures = info.value.failures
    assert sorted(failures) == [0, 1, 2, 3], failures
    for rank, (_, text) in failures.items():
        if how == "other":
            assert "CooperativeLoadError" in text and "every rank must load the same checkpoint" in text, text
        elif rank == 2:
            assert ("TruncatedFileError" if how == "truncated" else "Input/output error") in text
        else:
            assert "CooperativeLoadError" in text and "rank 2 failed" in text, text


def _rank_single(path: str) -> None:
    sd = _replicated(blank=True)
    dcp.load(sd, storage_reader=dcp_native.FileSystemReader(path, cooperative=True), no_dist=True)
    assert sd["step"] == 1234


def test_single_rank_and_no_dist(replicated_ckpt):
    """Without a process group (or a group of one) cooperative is a plain load."""
    sd = _replicated(blank=True)
    reader = dcp_native.FileSystemReader(replicated_ckpt, cooperative=True)
    dcp.load(sd, storage_reader=reader, no_dist=True)
    assert torch.equal(sd["huge"], _value("huge", REPLICATED["huge"]))
    run_ranks(1, _rank_single, replicated_ckpt)


def test_random_partial_schedule_runs(engine_name, tmp_path):
    """A random mix of overlapping row ranges on 3 ranks, tiny rounds: exact rows."""
    path = str(tmp_path / "rows")
    dcp.save({"w": _value("w", (ROWS, COLS))}, storage_writer=dcp_native.FileSystemWriter(path), no_dist=True)
    rng = random.Random(5)
    ranges = [(lo, rng.randint(1, ROWS - lo)) for lo in (rng.randint(0, ROWS - 1) for _ in range(3))]
    run_ranks(3, _rank_ranges, path, ranges, engine=engine_name)


def _rank_ranges(path: str, ranges) -> None:
    lo, n = ranges[dist.get_rank()]
    planner = _RowsPlanner(lo, n)
    reader = dcp_native.FileSystemReader(path, cooperative=True, exchange_bytes=1000)
    dcp.load({"w": torch.zeros(ROWS, COLS)}, storage_reader=reader, planner=planner)
    assert torch.equal(planner.out, _value("w", (ROWS, COLS))[lo:lo + n])


def _rank_cached(path: str) -> list[bool]:
    planner = dcp_native.CachingLoadPlanner()
    reused = []
    for _ in range(2):
        sd = _replicated(blank=True)
        reader = dcp_native.FileSystemReader(path, cooperative=True, thread_count=2)
        dcp.load(sd, storage_reader=reader, planner=planner)
        assert torch.equal(sd["huge"], _value("huge", REPLICATED["huge"]))
        assert torch.equal(sd["small.7"], _value("small.7", REPLICATED["small.7"]))
        reused.append(planner.reused)
    return reused


def test_with_caching_planner(engine_name, replicated_ckpt):
    """A reused load plan (tokens instead of plans in DCP's exchange) still shares its reads."""
    assert run_ranks(2, _rank_cached, replicated_ckpt, engine=engine_name) == [[False, True]] * 2


def _hsdp_setup(mesh):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 33), nn.ReLU(), nn.Linear(33, 5))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _full(model, optim) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True))
    flat = {f"model.{k}": v for k, v in msd.items()}
    for pid, st_ in osd["state"].items():
        for name, v in st_.items():
            flat[f"optim.{pid}.{name}"] = v
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in flat.items()}


def _rank_hsdp(path: str) -> tuple:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model, optim = _hsdp_setup(mesh)
    g = torch.Generator().manual_seed(1)  # the same batch on every rank: replicas stay equal
    model(torch.randn(6, 12, generator=g)).square().mean().backward()
    optim.step()
    want = _full(model, optim)
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, storage_writer=dcp_native.FileSystemWriter(path, thread_count=2))
    # A fresh model and optimizer, loaded cooperatively over a group of the checkpoint's own.
    model, optim = _hsdp_setup(mesh)
    msd, osd = get_state_dict(model, optim)
    sd = {"model": msd, "optim": osd}
    group = dist.new_group(backend="gloo")
    reader = dcp_native.FileSystemReader(path, cooperative=True, process_group=group, thread_count=2)
    dcp.load(sd, storage_reader=reader, process_group=group)
    set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    got = _full(model, optim)
    assert got.keys() == want.keys()
    for k in want:
        same = torch.equal(got[k], want[k]) if isinstance(want[k], torch.Tensor) else got[k] == want[k]
        assert same, f"rank {dist.get_rank()}: {k} differs"
    payload = sum(v.numel() * v.element_size() for v in want.values() if isinstance(v, torch.Tensor))
    plain = dcp_native.FileSystemReader(path, thread_count=2)
    dcp.load(sd, storage_reader=plain, process_group=group)
    return (*_bytes_read(reader), payload, _bytes_read(plain)[0])


def test_hsdp_model_and_optimizer(engine_name, tmp_path):
    """HSDP (FSDP2 on a 2 replicate x 2 shard mesh) with AdamW state, loaded cooperatively on a
    process group of its own: exact values, each shard read once between the two replicas."""
    path = str(tmp_path / "hsdp")
    read, received, _, payload, plain = run_ranks(4, _rank_hsdp, path, engine=engine_name)[0]
    size = _data_bytes(path)
    # Two replicas: half of what the ranks read alone (within 1.15x), and below the checkpoint.
    assert read <= 1.15 * plain / 2 and read <= 1.15 * size, f"read {read}: alone {plain}, data files {size}"
    # Every shard (and every replicated tensor) reaches its second replica over the group.
    assert received >= payload


def _rank_verify(path: str) -> None:
    sd = _replicated(blank=True)
    reader = dcp_native.FileSystemReader(path, cooperative=True, verify=True, thread_count=2)
    dcp.load(sd, storage_reader=reader)


def test_damaged_byte_stops_every_rank(engine_name, tmp_path):
    """verify=True and one flipped byte inside a tensor: the rank that reads it raises
    IntegrityError naming the key; the ranks it would have sent it to do not load garbage: they
    raise too (their own IntegrityError, or CooperativeLoadError naming that rank)."""
    path = str(tmp_path / "ckpt")
    dcp.save(_replicated(blank=False), storage_writer=dcp_native.FileSystemWriter(path, checksums=True), no_dist=True)
    from dcp_native import checkpoint as ck_module

    ck = ck_module.Checkpoint(path)
    item = next(i for i in ck.items() if i.key == "huge")
    f = os.path.join(path, item.file)
    with open(f, "r+b") as fh:
        at = item.offset + item.length // 2
        fh.seek(at)
        b = fh.read(1)
        fh.seek(at)
        fh.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(RankError) as info:
        run_ranks(4, _rank_verify, path, engine=engine_name, timeout=90)
    failures = info.value.failures
    assert sorted(failures) == [0, 1, 2, 3], failures
    # DCP gathers every rank's error to every rank: each sees the reader's IntegrityError and
    # the others' CooperativeLoadError naming it.
    for _, text in failures.values():
        assert "IntegrityError: " in text and "read for 'huge'" in text, text
        assert "CooperativeLoadError: " in text and "failed: IntegrityError" in text, text
