#!/usr/bin/env python3
"""Planning at scale (issue 14): DCP's coordinator step, the metadata and one rank's load planning
for N simulated ranks in one process, stock's planners against dcp_native's.

The model is FSDP2-sharded: a Llama-like transformer (~1,000 parameters) with Adam's state
(``exp_avg``, ``exp_avg_sq``: DTensors sharded like their parameter; ``step``: a plain 0-d tensor on
every rank) and the optimizer's param group, saved as ``{"model": ..., "optim": ...}`` the way
``get_state_dict`` returns them. Every parameter is ``Shard(0)`` over the N ranks of a 1-D mesh,
split as DTensor splits it (``torch.chunk``: ceil(rows / N) rows a rank, the last ranks short or
empty). Each rank's local save plan is built from DCP's own objects (``WriteItem``,
``ChunkStorageMetadata``, ``TensorProperties``, ...) exactly as ``DefaultSavePlanner.create_local_plan``
builds it for a DTensor shard, without DTensors or process groups; :func:`check_faithful` compares
those plans with the ones a real ``DefaultSavePlanner`` makes for real DTensors (on torch's fake
process group) at a small N, and every run starts with that check.

Per N (``--ranks``), timed:

* ``coordinator``: ``planner.create_global_plan(plans)`` + ``writer.prepare_global_plan(...)`` on the
  N local plans: stock's ``DefaultSavePlanner`` + stock's ``FileSystemWriter`` against
  ``dcp_native.CachingSavePlanner`` (its first, uncached plan; and a repeated save of the same
  structure, where every rank sends a token) + ``dcp_native.FileSystemWriter``. Both must produce
  the same global plan and metadata (checked on every run).
* ``metadata``: the size of the pickled ``.metadata`` (with each item's storage entry, as the
  committed checkpoint has it), the time to pickle it (the coordinator) and to unpickle it (every
  rank that loads: stock's reader and dcp_native's), with the cyclic collector on and paused.
* ``load``: ``planner.set_up_planner`` + ``create_local_plan`` of one rank (a middle rank) against
  that metadata: stock's ``DefaultLoadPlanner`` against ``dcp_native.CachingLoadPlanner`` (first
  load); the rank's state dict holds real DTensors on torch's fake process group.

Stock's coordinator step grows quadratically in N for every tensor whose largest dimension is not
the sharded one (``_validate_global_plan`` sweeps along the largest dimension, where every shard
starts at 0); at large N it is capped (``--stock-cap`` seconds, stopped and reported as
"> cap"). The local plans of N ranks take ~640 bytes of memory per item: where N times the items
of one rank exceed ``--max-items``, the model is reduced (fewer layers) and the row says so.

Run alone: ``python benchmarks/planning_scale.py --ranks 64,256,1024,4096`` (``--quick``: a small
model, N = 8 and 32); ``make bench`` runs it as the ``planning`` workload.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import os
import pickle
import shutil
import signal
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A Llama-like transformer: per layer 2 norms, 4 attention projections (grouped-query: k and v
    have ``kv`` rows), 3 MLP projections; plus the embedding, the final norm and the output."""

    layers: int = 111
    d: int = 4096
    ffn: int = 11008
    kv: int = 1024
    vocab: int = 32000

    def parameters(self) -> list[tuple[str, tuple[int, ...]]]:
        d, f, kv = self.d, self.ffn, self.kv
        out = [("tok_embeddings.weight", (self.vocab, d))]
        for i in range(self.layers):
            p = f"layers.{i}."
            out += [(p + "attention_norm.weight", (d,)), (p + "attention.wq.weight", (d, d)),
                    (p + "attention.wk.weight", (kv, d)), (p + "attention.wv.weight", (kv, d)),
                    (p + "attention.wo.weight", (d, d)), (p + "ffn_norm.weight", (d,)),
                    (p + "feed_forward.w1.weight", (f, d)), (p + "feed_forward.w2.weight", (d, f)),
                    (p + "feed_forward.w3.weight", (f, d))]
        out += [("norm.weight", (d,)), ("output.weight", (self.vocab, d))]
        return out

    def reduced(self, layers: int) -> "ModelShape":
        return dataclasses.replace(self, layers=layers)


#: The benchmark's model: 111 layers, 1,002 parameters (4,020 items a rank with Adam's state).
DEFAULT_MODEL = ModelShape()
#: --quick and the tests: the same structure, small.
SMALL_MODEL = ModelShape(layers=2, d=8, ffn=20, kv=4, vocab=24)
#: Write items the N ranks' plans may hold by default (~640 bytes each, ~9 GiB peak for the run of
#: one N): above it the model is reduced.
MAX_ITEMS = 4_200_000
#: Steps are repeated (--reps) where the N ranks' plans hold at most this many write items.
REPS_ITEMS = 300_000


def items_per_rank(model: ModelShape) -> int:
    """Write items of one rank: 4 per parameter (it, Adam's step, exp_avg, exp_avg_sq) and the
    param group's 12 entries."""
    return 4 * len(model.parameters()) + len(_PARAM_GROUP) + 1


def fitted(model: ModelShape, n: int, max_items: int) -> ModelShape:
    """``model``, or with fewer layers where N ranks' plans of it would exceed ``max_items``."""
    if n * items_per_rank(model) <= max_items:
        return model
    per_layer = 36  # 9 parameters a layer, 4 items each
    fixed = items_per_rank(model.reduced(0))
    layers = max(1, (max_items // n - fixed) // per_layer)
    return model.reduced(min(layers, model.layers))


def describe(model: ModelShape) -> str:
    return (f"Llama-like model, {model.layers} layers (d {model.d}, ffn {model.ffn}, kv {model.kv}, vocab "
            f"{model.vocab}): {len(model.parameters())} parameters, FSDP2 Shard(0) over N ranks, with Adam's "
            f"state: {items_per_rank(model):,} write items a rank")

_PARAM_GROUP = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
                "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                "fused": None, "decoupled_weight_decay": False}


def nested_state_dict(model: ModelShape, param: Callable[[str, tuple[int, ...]], Any],
                      step: Callable[[], Any]) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` as ``get_state_dict(model, Adam)`` returns it (FSDP2)."""
    params = model.parameters()
    return {
        "model": {name: param(name, shape) for name, shape in params},
        "optim": {
            "state": {name: {"step": step(), "exp_avg": param(name, shape), "exp_avg_sq": param(name, shape)}
                      for name, shape in params},
            "param_groups": [dict(_PARAM_GROUP, params=[name for name, _ in params])],
        },
    }


def shard(shape: tuple[int, ...], n: int, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local sizes, global offsets) of ``rank``'s Shard(0) piece of ``shape`` over ``n`` ranks, as
    DTensor computes them: ceil(rows / n) rows a rank; an empty piece starts at the last row."""
    rows = shape[0]
    per = -(-rows // n)
    start = min(rank * per, rows)
    length = max(0, min(per, rows - start))
    return (length, *shape[1:]), (start, *([0] * (len(shape) - 1)))


@dataclasses.dataclass
class Simulation:
    """The flattened keys of the state dict and what every rank's plan shares with the others."""

    model: ModelShape
    n: int
    #: (flat key, "shard" | "tensor" | "object", global shape or None)
    entries: list[tuple[str, str, tuple[int, ...] | None]]
    mappings: dict[str, Any]

    @classmethod
    def build(cls, model: ModelShape, n: int) -> "Simulation":
        def param(name, shape):
            return ("shard", shape)

        sd = nested_state_dict(model, param, lambda: ("tensor", ()))
        flat, mappings = flatten_state_dict(sd)
        entries = []
        for key, value in flat.items():
            if isinstance(value, tuple) and len(value) == 2 and value[0] in ("shard", "tensor"):
                entries.append((key, value[0], value[1]))
            else:
                entries.append((key, "object", None))
        return cls(model, n, entries, mappings)

    @property
    def items_per_rank(self) -> int:
        return len(self.entries)

    def local_plan(self, rank: int, shared: dict[str, tuple[TensorProperties, torch.Size]]) -> SavePlan:
        """Rank ``rank``'s plan as ``DefaultSavePlanner.create_local_plan`` makes it: per item the
        objects ``_create_write_items_for_dtensor`` / ``_create_write_item_for_tensor`` make (one
        ``TensorProperties`` and global size per key shared by the ranks: the coordinator's metadata
        refers to one of each per key, as after unpickling the ranks' plans)."""
        items = []
        for key, kind, shape in self.entries:
            if kind == "object":
                items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
                continue
            props, size = shared[key]
            if kind == "shard":
                sizes, offsets = shard(shape, self.n, rank)
                sizes, offsets = torch.Size(sizes), torch.Size(offsets)
                item_type = WriteItemType.SHARD
            else:
                offsets, sizes = torch.Size([0] * len(shape)), torch.Size(shape)
                item_type = WriteItemType.TENSOR
            items.append(WriteItem(index=MetadataIndex(key, offsets), type=item_type, tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes), properties=props, size=size)))
        # Every rank sends its own mappings (the coordinator unpickles one dict per rank).
        return SavePlan(items, planner_data=dict(self.mappings))

    def shared(self) -> dict[str, tuple[TensorProperties, torch.Size]]:
        return {key: (TensorProperties(dtype=torch.float32, layout=torch.strided, requires_grad=False,
                                       memory_format=torch.contiguous_format, pin_memory=False), torch.Size(shape))
                for key, kind, shape in self.entries if kind != "object"}

    def local_plans(self) -> list[SavePlan]:
        shared = self.shared()
        return [self.local_plan(r, shared) for r in range(self.n)]


# ----------------------------------------------------------------------------- real DTensors


@contextlib.contextmanager
def fake_process_group(rank: int, world: int) -> Iterator[None]:
    """torch's fake process group as rank ``rank`` of ``world`` (no communication happens)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized in this process")
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_state_dict(model: ModelShape, n: int) -> dict[str, Any]:
    """The rank's FSDP2 state dict with real DTensors (inside :func:`fake_process_group`); the
    local tensors are one element expanded to the shard's shape (planning reads shapes only)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = DeviceMesh("cpu", list(range(n)))
    rank = dist.get_rank()

    def param(name, shape):
        sizes, _ = shard(shape, n, rank)
        local = torch.zeros(1).expand(sizes) if all(sizes) else torch.zeros(sizes)
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                                  stride=torch.empty(shape, device="meta").stride())

    return nested_state_dict(model, param, lambda: torch.tensor(1.0))


def real_local_plans(model: ModelShape, n: int) -> list[SavePlan]:
    """Every rank's plan from a real ``DefaultSavePlanner`` for real DTensors (fake process group)."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    plans = []
    for rank in range(n):
        with fake_process_group(rank, n):
            planner = DefaultSavePlanner()
            planner.set_up_planner(rank_state_dict(model, n), is_coordinator=rank == 0)
            plans.append(planner.create_local_plan())
    return plans


def check_faithful(model: ModelShape = SMALL_MODEL, n: int = 4) -> None:
    """Raise unless the simulated plans equal real DefaultSavePlanner's for real DTensors."""
    sim = Simulation.build(model, n).local_plans()
    real = real_local_plans(model, n)
    for rank, (a, b) in enumerate(zip(sim, real)):
        if a != b:
            bad = next((x, y) for x, y in zip(a.items, b.items) if x != y) if a.items != b.items else "planner_data"
            raise AssertionError(f"simulated plan of rank {rank} differs from the real one: {bad}")


# ----------------------------------------------------------------------------- measuring


class Capped(Exception):
    """The timed call ran past its cap and was stopped."""


@contextlib.contextmanager
def cap(seconds: float | None) -> Iterator[None]:
    """Raise :class:`Capped` inside the block once it has run ``seconds`` (SIGALRM: pure Python
    code such as DCP's planning stops at its next bytecode)."""
    if not seconds:
        yield
        return

    def fire(signum, frame):
        raise Capped(f"stopped after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def gc_off() -> Iterator[None]:
    """The cyclic collector off around untimed set-up that makes millions of objects."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def timed(fn: Callable[[], Any], limit: float | None = None) -> tuple[float, Any]:
    """(seconds, result) of ``fn()`` with the collector enabled, as in any process, after a full
    collection (each timed call starts from the same state); raises Capped past ``limit``."""
    gc.collect()
    with cap(limit):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def storage_entries(global_plan: list[SavePlan]) -> dict[MetadataIndex, Any]:
    """The ``storage_data`` a committed checkpoint's metadata holds: one ``_StorageInfo`` per item
    of every rank, named as stock names them (``__{rank}_0.distcp``), as the writers' results
    make it."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    out = {}
    for rank, plan in enumerate(global_plan):
        name = f"__{rank}_0.distcp"
        offset = 0
        for item in plan.items:
            length = 512 + (item.tensor_storage_size() or 64) // 4096
            out[item.index] = _StorageInfo(name, offset, length)
            offset += length
    return out


def _tagged(plans: list[SavePlan]) -> list[SavePlan]:
    """The plans as ranks with dcp_native's CachingSavePlanner send them (tagged with a token)."""
    from dcp_native.planners import _Tagged

    return [dataclasses.replace(p, planner_data=_Tagged(f"rank{i}", p.planner_data)) for i, p in enumerate(plans)]


def _tokens(n: int) -> list[SavePlan]:
    """What ranks with dcp_native's CachingSavePlanner send for a save of an unchanged structure."""
    from dcp_native.planners import _Token

    return [SavePlan([], planner_data=_Token(f"rank{i}"), usable=False) for i in range(n)]


def _stock_step(plans: list[SavePlan], writer: Any) -> tuple[list[SavePlan], Any]:
    """Stock's coordinator step: DefaultSavePlanner's global plan, then its writer's."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    planner = DefaultSavePlanner()
    global_plan, metadata = planner.create_global_plan(plans)
    writer.prepare_global_plan(global_plan)
    return planner.global_plan, metadata


def _mine_step(planner: Any, plans: list[SavePlan], writer: Any) -> tuple[list[SavePlan], Any]:
    """dcp_native's coordinator step: its CachingSavePlanner's global plan, then its writer's
    (which takes the save's marker: released again, untimed)."""
    global_plan, metadata = planner.create_global_plan(plans)
    writer.prepare_global_plan(global_plan)
    return planner.global_plan, metadata


def coordinator(plans: list[SavePlan], reps: int, stock_cap: float | None, scratch: str,
                log: Callable[[str], None]) -> tuple[dict, list[SavePlan], Any]:
    """The coordinator step of stock and dcp_native (first plan, and a save of the same
    structure), ``reps`` times interleaved; checks that both make the same global plan and
    metadata. Returns the figures and dcp_native's global plan and metadata."""
    import dcp_native
    from torch.distributed.checkpoint import FileSystemWriter as StockWriter

    n = len(plans)
    for name in ("stock", "dcp_native"):  # as each rank's prepare_local_plan makes it
        os.makedirs(os.path.join(scratch, name), exist_ok=True)
    stock_writer = StockWriter(os.path.join(scratch, "stock"))
    mine_writer = dcp_native.FileSystemWriter(os.path.join(scratch, "dcp_native"))
    tagged, tokens = _tagged(plans), _tokens(n)
    samples: dict[str, list[float]] = {"stock": [], "dcp_native": [], "dcp_native_same_structure": []}
    capped = None
    mine = None
    for rep in range(reps):
        # Stock first: dcp_native's planner pauses the collector, so stock's result kept alive for
        # the comparison costs it nothing, while dcp_native's would cost stock's collections.
        stock = None
        if capped is None:
            try:
                dt, stock = timed(lambda: _stock_step(plans, stock_writer), stock_cap)
                samples["stock"].append(dt)
                log(f"  N={n}: stock coordinator {dt:.2f} s")
            except Capped:
                capped = stock_cap
                log(f"  N={n}: stock coordinator > {stock_cap:g} s: stopped there")
        planner = dcp_native.CachingSavePlanner()
        mine = None
        dt, mine = timed(lambda: _mine_step(planner, tagged, mine_writer))
        mine_writer.reset()
        samples["dcp_native"].append(dt)
        dt, _ = timed(lambda: _mine_step(planner, tokens, mine_writer))
        mine_writer.reset()
        samples["dcp_native_same_structure"].append(dt)
        log(f"  N={n}: dcp_native coordinator {samples['dcp_native'][-1]:.2f} s (first plan), "
            f"{dt * 1e3:.1f} ms (same structure)")
        if stock is not None and (stock[0] != mine[0] or stock[1] != mine[1]):
            raise AssertionError(f"N={n}: dcp_native's global plan or metadata differs from stock's")
        del stock
    out: dict[str, Any] = {name: statistics.median(v) for name, v in samples.items() if v}
    out["samples"] = samples
    out["same_as_stock"] = bool(samples["stock"])
    if capped is not None:
        out["stock_capped_s"] = capped
    return out, mine[0], mine[1]


def metadata_pickle(global_plan: list[SavePlan], metadata: Any, reps: int) -> tuple[dict, bytes]:
    """The committed metadata (with every item's storage entry): its size and pickling, the
    collector on (stock's writer) and paused (dcp_native's writer pauses it). Returns the
    figures and the pickle."""
    from dcp_native.planners import gc_paused

    with gc_off():
        committed = dataclasses.replace(metadata, storage_data=storage_entries(global_plan))

    def dumps_paused():
        with gc_paused():
            return pickle.dumps(committed)

    samples: dict[str, list[float]] = {"pickle_gc_on": [], "pickle_gc_paused": []}
    raw = b""
    for rep in range(reps):
        raw = b""
        dt, raw = timed(lambda: pickle.dumps(committed))
        samples["pickle_gc_on"].append(dt)
        raw = b""
        dt, raw = timed(dumps_paused)
        samples["pickle_gc_paused"].append(dt)
    return {"bytes": len(raw), **{k: statistics.median(v) for k, v in samples.items()}, "samples": samples}, raw


def metadata_unpickle(raw: bytes, reps: int) -> dict:
    """What every loading rank pays for the metadata: unpickling it with stock's reader
    (``pickle.load``, the collector on) and dcp_native's (its restricted unpickler, which pauses
    the collector), and ``pickle.load`` with the collector paused. Only the pickle is alive (as on
    a rank)."""
    from dcp_native._safe_pickle import load_metadata
    from dcp_native.planners import gc_paused

    def loads_paused():
        with gc_paused():
            return pickle.loads(raw)

    samples: dict[str, list[float]] = {"unpickle_gc_on": [], "unpickle_dcp_native": [], "unpickle_gc_paused": []}
    for rep in range(reps):
        for name, fn in (("unpickle_gc_on", lambda: pickle.loads(raw)),
                         ("unpickle_dcp_native", lambda: load_metadata(io.BytesIO(raw), ".metadata")),
                         ("unpickle_gc_paused", loads_paused)):
            dt, loaded = timed(fn)
            samples[name].append(dt)
            del loaded  # freed outside the timed region, before the next one
    return {**{k: statistics.median(v) for k, v in samples.items()}, "unpickle_samples": samples}


def load_figures(model: ModelShape, n: int, raw: bytes, reps: int, log: Callable[[str], None]) -> dict:
    """One rank's load planning (a rank in the middle, real DTensors on the fake process group)
    against the unpickled metadata: stock's DefaultLoadPlanner, dcp_native's CachingLoadPlanner
    (first load), and the same planner's search alone (its chunk indexes built). Checks that
    both make the same plan."""
    import dcp_native
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    with gc_off():
        metadata = pickle.loads(raw)
    rank = n // 2
    samples: dict[str, list[float]] = {"stock": [], "dcp_native": [], "dcp_native_search": []}
    with fake_process_group(rank, n):
        state_dict = rank_state_dict(model, n)

        def stock_load():
            planner = DefaultLoadPlanner()
            planner.set_up_planner(state_dict, metadata, is_coordinator=False)
            return planner.create_local_plan()

        def mine_load(planner):
            planner.set_up_planner(state_dict, metadata, is_coordinator=False)
            return planner.create_local_plan()

        for rep in range(reps):
            dt, stock = timed(stock_load)
            samples["stock"].append(dt)
            planner = dcp_native.CachingLoadPlanner()
            dt, mine = timed(lambda: mine_load(planner))
            samples["dcp_native"].append(dt)
            dt, again = timed(planner._plan_reads)  # the same planner again: its indexes are built
            samples["dcp_native_search"].append(dt)
            if mine != stock or again != stock:
                raise AssertionError(f"N={n}: dcp_native's load plan of rank {rank} differs from stock's")
    out: dict[str, Any] = {"rank": rank, "read_items": len(stock.items),
                           **{k: statistics.median(v) for k, v in samples.items()}, "samples": samples}
    log(f"  N={n}: rank {rank}'s load planning: stock {out['stock']:.3f} s, dcp_native {out['dcp_native']:.3f} s "
        f"(its search alone, indexes built: {out['dcp_native_search']:.3f} s)")
    return out


def measure(model: ModelShape, n: int, *, reps: int = 1, stock_cap: float | None = None,
            log: Callable[[str], None] = lambda s: None) -> dict:
    """Every figure of N ranks (module docs): ``reps`` repetitions of each step, interleaved,
    medians; stock's coordinator step stopped after ``stock_cap`` s."""
    sim = Simulation.build(model, n)
    row: dict[str, Any] = {"ranks": n, "layers": model.layers, "parameters": len(model.parameters()),
                           "items_per_rank": sim.items_per_rank, "items": n * sim.items_per_rank, "reps": reps}
    t0 = time.perf_counter()
    with gc_off():
        plans = sim.local_plans()
    gc.collect()  # the plans are old objects by now, as the unpickled plans of a real coordinator
    log(f"  N={n}: {row['items']:,} write items ({model.layers} layers) built in {time.perf_counter() - t0:.1f} s, "
        f"RSS {rss_gib():.1f} GiB")
    scratch = tempfile.mkdtemp(prefix="dcp_native_planning_")
    try:
        row["coordinator"], global_plan, metadata = coordinator(plans, reps, stock_cap, scratch, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    del plans
    row["metadata"], raw = metadata_pickle(global_plan, metadata, reps)
    del global_plan, metadata
    row["metadata"].update(metadata_unpickle(raw, reps))
    md = row["metadata"]
    log(f"  N={n}: metadata {md['bytes'] / 2**20:.1f} MiB: pickled in {md['pickle_gc_on']:.2f} s "
        f"({md['pickle_gc_paused']:.2f} s with the collector paused), unpickled in {md['unpickle_gc_on']:.2f} s "
        f"(dcp_native's reader {md['unpickle_dcp_native']:.2f} s; {md['unpickle_gc_paused']:.2f} s with the "
        "collector paused)")
    row["load"] = load_figures(model, n, raw, reps, log)
    row["peak_rss_gib"] = _peak_rss_gib()
    return row


def _peak_rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return 0.0


# ----------------------------------------------------------------------------- running alone


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ranks", default="64,256,1024,4096", help="simulated rank counts, comma-separated")
    p.add_argument("--quick", action="store_true", help="a small model at 8 and 32 ranks")
    p.add_argument("--reps", type=int, default=3,
                   help=f"repetitions of each step where N ranks have at most {REPS_ITEMS:,} write items (else 1)")
    p.add_argument("--stock-cap", type=float, default=300.0, help="seconds after which stock's coordinator step stops")
    p.add_argument("--max-items", type=int, default=MAX_ITEMS,
                   help="most write items of the N ranks' plans (memory); above, the model is reduced")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    try:
        ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
    except ValueError:
        p.error(f"--ranks: not a list of rank counts: {args.ranks!r}")
    if args.quick:
        ranks = [8, 32] if args.ranks == p.get_default("ranks") else ranks
    if not ranks or min(ranks) < 2:
        p.error("--ranks: every rank count must be at least 2")
    model = SMALL_MODEL if args.quick else DEFAULT_MODEL
    print(f"{describe(model)}; checking the simulated plans against real DTensors' ...", flush=True)
    check_faithful(SMALL_MODEL, 4)
    check_faithful(SMALL_MODEL, 7)
    rows = []
    for n in ranks:
        shape = fitted(model, n, args.max_items)
        reps = args.reps if n * items_per_rank(shape) <= REPS_ITEMS else 1
        rows.append(measure(shape, n, reps=reps, stock_cap=args.stock_cap, log=lambda s: print(s, flush=True)))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dcpbench.report import planning_growth, render_planning

    case = {"params": {"model": describe(model), "layers": model.layers, "stock_cap_s": args.stock_cap,
                       "max_items": args.max_items}, "rows": rows, "growth": planning_growth(rows)}
    print()
    print("\n".join(render_planning(case)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(case, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
