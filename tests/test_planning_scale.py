"""Planning at scale (dcp_native._scale through the caching planners): stock's results, faster.

* The benchmark's simulated FSDP2 plans (benchmarks/planning_scale.py) equal the plans a real
  ``DefaultSavePlanner`` makes for real DTensors (torch's fake process group), at 4, 7 and 16
  ranks (even, uneven and empty shards).
* The coordinator's step of ``CachingSavePlanner`` gives stock's global plan and metadata (equal,
  and pickled to the same bytes) for FSDP-like models at 4-16 simulated ranks, both dedup
  policies, with and without flattening; for random plans (hypothesis) it gives stock's result
  or raises stock's exception with stock's message; invalid plans (overlapping chunks, chunks
  out of bounds, gaps, an object and a tensor under one key, an item twice in one plan, ...)
  raise what stock raises.
* A rank's load planning (``CachingLoadPlanner``) gives stock's read items in stock's order for
  random saved and local chunks (resharding, grids, empty and 0-d chunks, overlapping or
  ill-formed saved chunks) and for whole state dicts of real DTensors loaded at another world
  size; its errors are stock's.
* Two gloo ranks save an FSDP-like state dict (uneven shards, replicated tensors, objects) with
  the caching planners through dcp.save / dcp.load on both engines, reload it resharded: the
  values round-trip and the metadata equals what stock's planner writes.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import random
import sys

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

import dcp_native
from dcp_native import _scale
from helpers import run_ranks

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import planning_scale as ps  # noqa: E402

SMALL = ps.SMALL_MODEL
#: Uneven at every world size below: 5 and 3 rows, kv of 3 rows, odd vocab.
UNEVEN = ps.ModelShape(layers=2, d=5, ffn=7, kv=3, vocab=11)


def _outcome(planner, plans):
    """What the planner's coordinator step makes of (a copy of) the plans: the global plan, the
    metadata and its pickle, or the exception's type and message."""
    try:
        global_plan, metadata = planner.create_global_plan(copy.deepcopy(plans))
    except Exception as exc:  # noqa: BLE001 - any error stock raises must be raised alike
        return ("raised", type(exc), str(exc))
    return ("planned", global_plan, metadata, pickle.dumps(metadata), pickle.dumps(global_plan))


def _same_as_stock(plans, **kwargs):
    stock = _outcome(DefaultSavePlanner(**kwargs), plans)
    mine = _outcome(dcp_native.CachingSavePlanner(**kwargs), plans)
    assert mine[0] == stock[0], (mine[:3], stock[:3])
    if stock[0] == "raised":
        assert mine[1:] == stock[1:]
    else:
        assert mine[1] == stock[1] and mine[2] == stock[2]
        assert mine[3] == stock[3], "the metadata pickles to other bytes"
        assert mine[4] == stock[4], "the global plan pickles to other bytes"
    return stock


# ---------------------------------------------------------------------- the simulation is faithful


@pytest.mark.parametrize("n", [4, 7, 16])
@pytest.mark.parametrize("model", [SMALL, UNEVEN], ids=["small", "uneven"])
def test_simulated_plans_are_real_plans(model, n):
    ps.check_faithful(model, n)


def test_faithfulness_check_can_fail(monkeypatch):
    """A simulation that put an empty shard at offset 0 (not where DTensor puts it) is caught."""
    right = ps.shard

    def wrong(shape, n, rank):
        sizes, offsets = right(shape, n, rank)
        return sizes, ((0, *offsets[1:]) if sizes[0] == 0 else offsets)

    monkeypatch.setattr(ps, "shard", wrong)
    with pytest.raises(AssertionError, match="differs from the real one"):
        ps.check_faithful(SMALL, 16)


# ---------------------------------------------------------------------- the global save plan


@pytest.mark.parametrize("n", [4, 9, 16])
@pytest.mark.parametrize("model", [SMALL, UNEVEN], ids=["small", "uneven"])
@pytest.mark.parametrize("lowest", [False, True], ids=["smallest", "lowest"])
def test_fsdp_global_plan_is_stocks(model, n, lowest):
    plans = ps.Simulation.build(model, n).local_plans()
    assert _scale.global_save_plan(copy.deepcopy(plans), lowest, True) is not None, "took stock's path"
    out = _same_as_stock(plans, dedup_save_to_lowest_rank=lowest)
    assert out[0] == "planned"


def test_unflattened_and_replicated_global_plan_is_stocks():
    """No flattening (planner_data None), replicated tensors and objects on every rank, a
    replicated DTensor (the same chunk on every rank) and rank-local keys."""
    plans = ps.Simulation.build(UNEVEN, 5).local_plans()
    props = TensorProperties(dtype=torch.float16)
    for rank, plan in enumerate(plans):
        extra = [_item("rep.dtensor", (0, 0), (4, 2), (4, 2), props, WriteItemType.SHARD),
                 _item("rep.plain", (0,), (9,), (9,), props, WriteItemType.TENSOR),
                 _item(f"local.{rank}", (0,), (rank,), (rank,), props, WriteItemType.TENSOR),
                 WriteItem(index=MetadataIndex("obj.shared"), type=WriteItemType.BYTE_IO)]
        plan.items[rank:rank] = extra
        plans[rank] = dataclasses.replace(plan, planner_data=None)
    assert _scale.global_save_plan(copy.deepcopy(plans), False, False) is not None
    _same_as_stock(plans, flatten_state_dict=False)


def _item(fqn, offsets, sizes, size, props, kind=WriteItemType.SHARD):
    offsets, sizes = torch.Size(offsets), torch.Size(sizes)
    return WriteItem(index=MetadataIndex(fqn, offsets), type=kind, tensor_data=TensorWriteData(
        chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes), properties=props, size=torch.Size(size)))


def _plans(per_rank: list[list[WriteItem]]) -> list[SavePlan]:
    return [SavePlan(items, planner_data={i.index.fqn: (i.index.fqn,) for i in items}) for items in per_rank]


PROPS = TensorProperties(dtype=torch.float32)


def _grid(fqn, size, splits, ranks):
    """Chunks of a grid over ``size`` (split points per dim), dealt round-robin to ``ranks`` ranks."""
    import itertools

    bounds = [list(zip([0, *s], [*s, n])) for s, n in zip(splits, size)]
    out = [[] for _ in range(ranks)]
    for k, box in enumerate(itertools.product(*bounds)):
        out[k % ranks].append(_item(fqn, [a for a, _ in box], [b - a for a, b in box], size, PROPS))
    return out


ERRORS = {
    "overlap": [[_item("w", (0, 0), (3, 4), (6, 4), PROPS)], [_item("w", (2, 0), (4, 4), (6, 4), PROPS)]],
    "overlap_along_the_short_dim": [[_item("w", (0, 0), (2, 5), (2, 9), PROPS)],
                                    [_item("w", (1, 4), (1, 5), (2, 9), PROPS)]],
    "out_of_bounds": [[_item("w", (0, 0), (3, 4), (6, 4), PROPS)], [_item("w", (3, 0), (4, 4), (6, 4), PROPS)]],
    "negative_offset": [[_item("w", (-1, 0), (4, 4), (6, 4), PROPS)], [_item("w", (3, 0), (3, 4), (6, 4), PROPS)]],
    "negative_size": [[_item("w", (0, 0), (6, 4), (6, 4), PROPS)], [_item("w", (4, 0), (-1, 4), (6, 4), PROPS)]],
    "gap": [[_item("w", (0, 0), (2, 4), (6, 4), PROPS)], [_item("w", (3, 0), (3, 4), (6, 4), PROPS)]],
    "empty_chunk_inside_another": [[_item("w", (0, 0), (6, 4), (6, 4), PROPS)],
                                   [_item("w", (2, 0), (0, 4), (6, 4), PROPS)]],
    "object_and_tensor_one_key": [[WriteItem(index=MetadataIndex("w"), type=WriteItemType.BYTE_IO)],
                                  [_item("w", (0,), (3,), (3,), PROPS)]],
    "plain_tensor_twice": [[_item("t", (0,), (3,), (3,), PROPS, WriteItemType.TENSOR)],
                           [_item("t", (1,), (2,), (3,), PROPS, WriteItemType.TENSOR)]],
    "item_twice_in_one_plan": [[_item("w", (0,), (3,), (6,), PROPS), _item("w", (0,), (3,), (6,), PROPS)],
                               [_item("w", (3,), (3,), (6,), PROPS)]],
    "chunk_short_of_a_dim": [[_item("w", (0,), (3,), (6, 4), PROPS)], [_item("w", (3, 0), (3, 4), (6, 4), PROPS)]],
    "chunk_with_an_extra_dim": [[_item("w", (0, 0, 0), (3, 4, 1), (6, 4), PROPS)],
                                [_item("w", (3, 0), (3, 4), (6, 4), PROPS)]],
    "no_tensor_data": [[WriteItem(index=MetadataIndex("w", (0,)), type=WriteItemType.SHARD)]],
    "offsets_not_numbers": [[WriteItem(index=MetadataIndex("w", (0, 0)), type=WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=["a", 0],
                                                                                              sizes=[3, 4]),
                                                                   properties=PROPS, size=torch.Size((6, 4))))],
                            [_item("w", (3, 0), (3, 4), (6, 4), PROPS)]],
    "many_overlaps_truncated": [[_item("w", (i, 0), (3, 2), (40, 2), PROPS) for i in range(0, 38, 2)],
                                [_item("x", (0,), (1,), (1,), PROPS)]],
}


#: Odd plans stock accepts (its checks look at the tensor's dimensions only): so must the fast path.
STOCK_ACCEPTS = {"chunk_with_an_extra_dim"}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_invalid_plans_raise_stocks_errors(case):
    stock = _same_as_stock(_plans(ERRORS[case]))
    assert stock[0] == ("planned" if case in STOCK_ACCEPTS else "raised"), stock[:3]
    if case == "many_overlaps_truncated":
        assert stock[2].endswith("... (truncated)")


@pytest.mark.parametrize("splits", [([3], [2]), ([1, 2, 3], []), ([2, 4], [1, 3]), ([], [])],
                         ids=["2x2", "rows", "3x3", "whole"])
@pytest.mark.parametrize("ranks", [1, 2, 5])
def test_grids_are_proven_valid(splits, ranks):
    """Grids (2-D sharding) pass the fast validation (no tensor handed to stock's check) and equal
    stock's result; the same grid with one chunk grown by a row does not."""
    per_rank = _grid("g", (5, 4), splits, ranks)
    plans = _plans(per_rank)
    _, metadata = _scale.global_save_plan(copy.deepcopy(plans), False, True)
    assert _scale._proven(metadata.state_dict_metadata["g"], ranks > 1)
    _same_as_stock(plans)
    grown = copy.deepcopy(per_rank)
    first = grown[0][0]
    chunk = first.tensor_data.chunk
    bigger = _item("g", chunk.offsets, (chunk.sizes[0] + 1, *chunk.sizes[1:]), (5, 4), PROPS)
    grown[0][0] = bigger
    assert _same_as_stock(_plans(grown))[0] == "raised"


@st.composite
def random_plans(draw):
    """Several tensors, each cut into a grid dealt to random ranks, some chunks then moved, grown,
    dropped or copied to another rank; replicated tensors and objects; random flattening maps."""
    ranks = draw(st.integers(1, 5))
    per_rank: list[list[WriteItem]] = [[] for _ in range(ranks)]
    for t in range(draw(st.integers(1, 4))):
        ndim = draw(st.integers(0, 3))
        size = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))
        splits = [sorted(set(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=3)))) if n > 1 else []
                  for n in size]
        import itertools

        bounds = [list(zip([0, *s], [*s, n])) for s, n in zip(splits, size)]
        for box in itertools.product(*bounds):
            offsets = [a for a, _ in box]
            sizes = [b - a for a, b in box]
            fate = draw(st.sampled_from(["keep"] * 8 + ["move", "grow", "drop", "copy"]))
            if fate == "drop":
                continue
            if fate in ("move", "grow") and ndim:
                d = draw(st.integers(0, ndim - 1))
                delta = draw(st.sampled_from([-1, 1]))
                if fate == "move":
                    offsets[d] += delta
                else:
                    sizes[d] += delta
            owners = [draw(st.integers(0, ranks - 1))]
            if fate == "copy":
                owners.append(draw(st.integers(0, ranks - 1)))
            for r in owners:
                per_rank[r].append(_item(f"t{t}", offsets, sizes, size, PROPS))
    for r in range(ranks):
        if draw(st.booleans()):
            per_rank[r].append(_item("rep", (0,), (4,), (4,), PROPS, WriteItemType.TENSOR))
        if draw(st.booleans()):
            per_rank[r].append(WriteItem(index=MetadataIndex("obj"), type=WriteItemType.BYTE_IO))
    for items in per_rank:
        random.Random(draw(st.integers(0, 1000))).shuffle(items)
    plans = [SavePlan(items, planner_data={i.index.fqn: (i.index.fqn, draw(st.integers(0, 2))) for i in items})
             for items in per_rank]
    return plans, draw(st.booleans())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_plans())
def test_random_plans_give_stocks_result_or_error(case):
    plans, lowest = case
    _same_as_stock(plans, dedup_save_to_lowest_rank=lowest)


def test_dedup_keeps_each_item_where_stock_does():
    """Replicated items of different sizes: stock keeps each in the plan with the fewest bytes so
    far (ties broken by its set's order), which depends on the items before it."""
    big = [_item(f"big{k}", (0,), (1000,), (1000,), PROPS, WriteItemType.TENSOR) for k in range(3)]
    small = [_item(f"s{k}", (0,), (k + 1,), (k + 1,), PROPS, WriteItemType.TENSOR) for k in range(6)]
    per_rank = [[big[0], *small], [*small[::-1], big[1]], [big[2], *small[2:]], small[:3]]
    out = _same_as_stock(_plans(per_rank))
    assert out[0] == "planned"
    assert sorted(len(p.items) for p in out[1]) != [0, 0, 0, 9], "the items stayed in more than one plan"


def test_dedup_counts_the_bytes_of_an_items_last_copy():
    """Copies of one item that differ in size (a float32 and a float64 copy): stock adds the
    last copy's bytes to the plan it keeps the item in, which decides where the next one stays."""
    f64 = TensorProperties(dtype=torch.float64)
    k1 = _item("k1", (0,), (10,), (10,), PROPS, WriteItemType.TENSOR)     # 40 bytes
    k1_wide = _item("k1", (0,), (10,), (10,), f64, WriteItemType.TENSOR)  # 80 bytes
    k2 = _item("k2", (0,), (15,), (15,), PROPS, WriteItemType.TENSOR)     # 60 bytes
    k3 = _item("k3", (0,), (1,), (1,), PROPS, WriteItemType.TENSOR)
    out = _same_as_stock(_plans([[k1, k2, k3], [k1_wide, k2, k3]]))
    # k1 stays in plan 0 (a tie), k2 in plan 1 (plan 0 holds 80 bytes), k3 where fewer: plan 1 (60 < 80).
    assert [[i.index.fqn for i in p.items] for p in out[1]] == [["k1"], ["k2", "k3"]]


def test_the_cached_path_still_validates_the_first_plan():
    """A repeated save reuses the global plan; the first one of a structure is validated."""
    planner = dcp_native.CachingSavePlanner()
    with pytest.raises(ValueError, match="overlapping chunks"):
        planner.create_global_plan(_plans(ERRORS["overlap"]))


# ---------------------------------------------------------------------- load planning


@st.composite
def chunk_lists(draw):
    ndim = draw(st.integers(0, 3))

    def chunk(extra_dim=False):
        n = ndim + (1 if extra_dim else 0)
        offs = draw(st.lists(st.integers(-1, 7), min_size=n, max_size=n))
        sizes = draw(st.lists(st.integers(-1, 5), min_size=n, max_size=n))
        return ChunkStorageMetadata(offsets=torch.Size(offs), sizes=torch.Size(sizes))

    saved = [chunk(extra_dim=draw(st.integers(0, 30)) == 0) for _ in range(draw(st.integers(0, 12)))]
    local = [chunk() for _ in range(draw(st.integers(0, 3)))]
    return ndim, saved, local


@st.composite
def tilings(draw):
    """A tensor tiled by a grid when saved and by another grid when loaded (resharding)."""
    import itertools

    ndim = draw(st.integers(1, 3))
    size = draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim))

    def grid():
        bounds = []
        for n in size:
            cuts = sorted(set(draw(st.lists(st.integers(1, n), max_size=3))) - {n})
            bounds.append(list(zip([0, *cuts], [*cuts, n])))
        return [ChunkStorageMetadata(offsets=torch.Size([a for a, _ in b]), sizes=torch.Size([e - a for a, e in b]))
                for b in itertools.product(*bounds)]

    saved = grid()
    random.Random(draw(st.integers(0, 99))).shuffle(saved) if draw(st.booleans()) else None
    local = grid()
    return ndim, saved, draw(st.lists(st.sampled_from(local), min_size=1, max_size=3, unique_by=id))


def _reads(fqn, md, local, mine: bool):
    try:
        if mine:
            return _scale.read_items_for_chunks(fqn, md, local, _scale.ChunkIndex(md.chunks))
        return create_read_items_for_chunk_list(fqn, md, local)
    except Exception as exc:  # noqa: BLE001 - the same error as stock's
        return (type(exc), str(exc))


@settings(max_examples=400, deadline=None)
@given(st.one_of(chunk_lists(), tilings()))
def test_read_items_are_stocks(case):
    ndim, saved, local = case
    md = TensorStorageMetadata(properties=PROPS, size=torch.Size([8] * ndim), chunks=saved)
    assert _reads("w", md, local, mine=True) == _reads("w", md, local, mine=False)


def test_chunk_index_finds_what_a_scan_finds():
    rng = random.Random(5)
    for trial in range(200):
        n = rng.randint(1, 40)
        chunks = [ChunkStorageMetadata(offsets=torch.Size([rng.randint(0, 30), rng.randint(0, 3)]),
                                       sizes=torch.Size([rng.randint(0, 6), rng.randint(0, 3)])) for _ in range(n)]
        if trial % 2:
            chunks.sort(key=lambda c: c.offsets[0])
        index = _scale.ChunkIndex(chunks)
        for dim in (0, 1):
            for lo in range(-1, 33):
                hi = lo + rng.randint(0, 5)
                want = {i for i, c in enumerate(chunks)
                        if c.offsets[dim] < hi and lo < c.offsets[dim] + c.sizes[dim]}
                assert set(index.overlapping(dim, lo, hi)) == want, (trial, dim, lo, hi)


def test_index_goes_stale_with_its_chunk_list():
    chunks = [ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([2]))]
    index = _scale.ChunkIndex(chunks)
    assert index.current(chunks) and not index.current(list(chunks))
    chunks.append(ChunkStorageMetadata(offsets=torch.Size([2]), sizes=torch.Size([2])))
    assert not index.current(chunks)


def _load_plans(model, saved_world, load_world, rank, **planner_kwargs):
    """Stock's and dcp_native's load plans of ``rank`` (of ``load_world``) against the metadata
    of a save by ``saved_world`` ranks."""
    plans = ps.Simulation.build(model, saved_world).local_plans()
    _, metadata = DefaultSavePlanner().create_global_plan(plans)
    metadata = pickle.loads(pickle.dumps(metadata))
    out = []
    with ps.fake_process_group(rank, load_world):
        sd = ps.rank_state_dict(model, load_world)
        for cls in (DefaultLoadPlanner, dcp_native.CachingLoadPlanner):
            planner = cls(**planner_kwargs)
            try:
                planner.set_up_planner(copy.copy(sd), metadata, is_coordinator=rank == 0)
                out.append(planner.create_local_plan())
            except Exception as exc:  # noqa: BLE001
                out.append((type(exc), str(exc)))
    return out


@pytest.mark.parametrize("saved_world, load_world, rank", [(4, 4, 1), (7, 4, 3), (16, 5, 4), (3, 16, 15), (9, 2, 0)])
@pytest.mark.parametrize("model", [SMALL, UNEVEN], ids=["small", "uneven"])
def test_load_plans_of_real_dtensors_are_stocks(model, saved_world, load_world, rank):
    stock, mine = _load_plans(model, saved_world, load_world, rank)
    assert not isinstance(stock, tuple), stock
    assert mine == stock


def test_load_errors_are_stocks():
    """A key the checkpoint lacks (strict), a shape that differs: stock's exception and message; a
    partial load plans what the checkpoint has."""
    plans = ps.Simulation.build(SMALL, 2).local_plans()
    _, metadata = DefaultSavePlanner().create_global_plan(plans)
    state = {"model": {"tok_embeddings.weight": torch.zeros(SMALL.vocab, SMALL.d), "extra": torch.zeros(2)}}
    wrong = {"model": {"tok_embeddings.weight": torch.zeros(SMALL.vocab + 1, SMALL.d)}}
    for sd, kwargs in ((state, {}), (wrong, {}), (state, {"allow_partial_load": True})):
        results = []
        for cls in (DefaultLoadPlanner, dcp_native.CachingLoadPlanner):
            planner = cls(**kwargs)
            planner.set_up_planner(copy.deepcopy(sd), metadata)
            try:
                results.append(planner.create_local_plan())
            except Exception as exc:  # noqa: BLE001
                results.append((type(exc), str(exc)))
        assert results[0] == results[1]
    assert results[0].items, "the partial load plans the key the checkpoint has"


# ---------------------------------------------------------------------- two real ranks


def _fsdp_like_round_trip(path: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(3)
    full = {"wq": torch.randn(5, 4, generator=g), "w2": torch.randn(3, 7, generator=g),
            "norm": torch.randn(1, generator=g)}

    def state(fill: float | None):
        sd = {"model": {k: distribute_tensor(v if fill is None else torch.full_like(v, fill), mesh, [Shard(0)])
                        for k, v in full.items()},
              "optim": {"state": {"wq": {"step": torch.tensor(7.0 if fill is None else fill)}},
                        "param_groups": [{"lr": 0.1, "params": ["wq", "w2", "norm"]}]},
              "rep": torch.arange(4.0) if fill is None else torch.zeros(4)}
        return sd

    # Which paths ran: the coordinator's fast global plan, and indexed searches on every rank.
    used = {"global_plans": [], "searches": 0}
    fast_plan, overlapping = _scale.global_save_plan, _scale.ChunkIndex.overlapping

    def global_save_plan(*args):
        out = fast_plan(*args)
        used["global_plans"].append(out is not None)
        return out

    def searched(self, *args):
        used["searches"] += 1
        return overlapping(self, *args)

    _scale.global_save_plan, _scale.ChunkIndex.overlapping = global_save_plan, searched
    sd = state(None)
    dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(os.path.join(path, "mine")),
             planner=dcp_native.CachingSavePlanner())
    dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(os.path.join(path, "stock_planner")),
             planner=DefaultSavePlanner())
    out = state(-1.0)
    # Resharded: every tensor loaded by columns where it has more than one.
    for k, v in list(out["model"].items()):
        if v.dim() == 2:
            out["model"][k] = distribute_tensor(torch.full(v.shape, -1.0), mesh, [Shard(1)])
    dcp.load(out, storage_reader=dcp_native.FileSystemReader(os.path.join(path, "mine")),
             planner=dcp_native.CachingLoadPlanner())
    same = all(torch.equal(v.full_tensor() if isinstance(v, DTensor) else v, full[k])
               for k, v in out["model"].items())
    return {"values": same and torch.equal(out["rep"], sd["rep"]) and out["optim"]["state"]["wq"]["step"] == 7.0
            and out["optim"]["param_groups"][0]["lr"] == 0.1,
            "fast_global_plan": used["global_plans"], "searched": used["searches"] >= len(full)}


@pytest.mark.multiprocess
def test_two_ranks_save_and_load_through_the_fast_paths(engine_name, tmp_path):
    results = run_ranks(2, _fsdp_like_round_trip, str(tmp_path), engine=engine_name, timeout=240)
    # The coordinator (rank 0) planned through the fast path; every rank searched its indexes.
    assert results == [{"values": True, "fast_global_plan": [True], "searched": True},
                       {"values": True, "fast_global_plan": [], "searched": True}]
    mine = dcp_native.FileSystemReader(str(tmp_path / "mine")).read_metadata()
    stock = dcp_native.FileSystemReader(str(tmp_path / "stock_planner")).read_metadata()
    assert mine.state_dict_metadata == stock.state_dict_metadata
    assert mine.planner_data == stock.planner_data
    assert set(mine.storage_data) == set(stock.storage_data)
