#!/usr/bin/env python3
"""Cooperative loads: bytes read from storage and load time, with and without sharing.

N ranks (gloo on the CPU; ``--device cuda`` with NCCL, one GPU per rank) load one checkpoint
(``--mb`` MiB of fp32 in 4 MiB tensors plus 256 small ones, saved from one process, every
tensor whole, as DDP saves):

* ``replicated``: DDP-like, every rank loads every tensor;
* ``hsdp``: a (N/2 x 2) mesh, tensors placed ``(Replicate(), Shard(0))``: each shard is needed
  by N/2 ranks (needs an even N of at least 4).

Systems: ``stock`` (torch's FileSystemReader), ``native`` (dcp_native's, ``cooperative=False``)
and ``native_coop`` (``cooperative=True``). One set of N rank processes runs every load: per case
one untimed load per system (``--warmup``), then per page-cache state (``--cache``: ``cold``, the
checkpoint's files evicted before every load with ``posix_fadvise(DONTNEED)`` as the suite does;
``warm``) ``--reps`` rounds, each round starting one system later. A load's time is the slowest
rank's ``dcp.load``; bytes read (dcp_native's engine statistics; stock: ``/proc/self/io`` rchar),
sent and received are summed over the ranks. Every load's values are checked against the seeded
pattern that was saved. Prints a table; ``--out FILE`` writes JSON (``rows``: case, system,
cooperative, cache, seconds (median, all), bytes_read / checkpoint bytes, bytes_sent).

On one machine the ranks share its disk and page cache, so what cooperation saves here is
storage traffic (the ``read/ckpt`` column), paid for in loopback traffic; on shared storage
(NFS, Lustre, object stores) the bytes not read are the time saved.

The suite's ``cooperative`` workload (``benchmarks/run.py --workload cooperative``) runs the
same ranks (:func:`run_rank`) in its own processes and reports them with its other figures.

Usage: python benchmarks/cooperative.py [--ranks 4] [--mb 256] [--reps 3] [--cache cold,warm]
       [--device cpu|cuda] [--dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from dcpbench.common import proc_status, rchar, reset_peak_rss  # noqa: E402

CASES = ("replicated", "hsdp")
#: Systems, in the order of a round: stock DCP's reader, dcp_native's alone and cooperative.
SYSTEMS = ("stock", "native", "native_coop")
CACHES = ("cold", "warm")
#: One large tensor: 1024 x 1024 fp32.
LAYER_SHAPE = (1024, 1024)
LAYER_BYTES = 4 << 20
#: Small tensors (a norm's weight): 64 + i fp32 elements each, i < NORMS.
NORMS = 256
#: Per rank and load, summed or gathered over the ranks (one row of a [world, len] tensor).
_STATS = ("bytes_read", "bytes_sent", "bytes_received", "rchar", "peak_bytes")


def tensor_shapes(nbytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """The checkpoint's tensors (names, shapes, fp32) for about ``nbytes``, in pattern order."""
    shapes = [(f"layer{i}.weight", LAYER_SHAPE) for i in range(max(1, nbytes // LAYER_BYTES))]
    return shapes + [(f"norm{i}", (64 + i,)) for i in range(NORMS)]


def checkpoint_bytes(nbytes: int) -> int:
    """Tensor bytes of the checkpoint of ``nbytes`` (what every replica needs)."""
    total = 0
    for _, shape in tensor_shapes(nbytes):
        n = 4
        for d in shape:
            n *= d
        total += n
    return total


def hsdp_unsupported(world: int) -> str | None:
    """Why the hsdp case cannot run on ``world`` ranks, or None."""
    if world < 4 or world % 2:
        return f"needs an even number of ranks, at least 4, for its (N/2 x 2) mesh; {world} here"
    return None


def write_checkpoint(path: str, nbytes: int, seed: int, threads: int = 4) -> dict[str, int]:
    """Save the checkpoint from this process alone (every tensor whole, as DDP saves)."""
    import torch
    import torch.distributed.checkpoint as dcp

    import dcp_native
    from dcpbench.data import fill_pattern

    sd = {}
    for index, (name, shape) in enumerate(tensor_shapes(nbytes)):
        t = torch.empty(shape, dtype=torch.float32)
        fill_pattern(t, seed, index)
        sd[name] = t
    dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(path, thread_count=threads), no_dist=True)
    files = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".distcp"))
    return {"checkpoint_bytes": checkpoint_bytes(nbytes), "data_file_bytes": files}


def _chunk(n: int, parts: int, index: int) -> tuple[int, int]:
    """DTensor Shard's split (torch.chunk's): ceil(n / parts) per part, the last ones shorter."""
    per = -(-n // parts)
    start = min(n, index * per)
    return start, min(n, start + per)


class _Destination:
    """One case's state dict to load into, reused by every load of the case, and its check."""

    def __init__(self, case: str, opts: dict, device: str, mesh: Any) -> None:
        import torch
        from torch.distributed.tensor import DTensor, Replicate, Shard

        self.state_dict: dict[str, Any] = {}
        #: (name, local tensor, pattern index, first pattern element of the local tensor)
        self.locals: list[tuple[str, Any, int, int]] = []
        self.seed = opts["seed"]
        for index, (name, shape) in enumerate(tensor_shapes(opts["nbytes"])):
            row = 1
            for d in shape[1:]:
                row *= d
            if case == "hsdp":
                r0, r1 = _chunk(shape[0], mesh.size(1), mesh.get_coordinate()[1])
                local = torch.empty((r1 - r0, *shape[1:]), dtype=torch.float32, device=device)
                self.state_dict[name] = DTensor.from_local(local, mesh, [Replicate(), Shard(0)], run_check=False,
                                                           shape=torch.Size(shape), stride=(row, 1)[: len(shape)])
                self.locals.append((name, local, index, r0 * row))
            else:
                local = torch.empty(shape, dtype=torch.float32, device=device)
                self.state_dict[name] = local
                self.locals.append((name, local, index, 0))

    def scramble(self) -> None:
        from dcpbench.data import fill_garbage

        for _, t, _, _ in self.locals:
            fill_garbage(t)

    def check(self, what: str) -> None:
        from dcpbench.data import check_pattern

        for name, t, index, first in self.locals:
            check_pattern(t, self.seed, index, f"{what}: tensor {name!r}", first=first)


def _reader(system: str, path: str, opts: dict) -> Any:
    import torch.distributed.checkpoint as dcp

    import dcp_native

    if system == "stock":
        return dcp.FileSystemReader(path)
    return dcp_native.FileSystemReader(path, thread_count=opts["threads"], cooperative=system == "native_coop",
                                       exchange_bytes=opts["exchange_bytes"])


def _load(rank: int, world: int, case: str, system: str, cache: str, dest: _Destination, opts: dict,
          device: str) -> dict:
    """One load by every rank; on every rank, the figures of all of them."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from dcpbench.rawio import evict, resident_fraction

    path = opts["path"]
    dest.scramble()
    extra: dict[str, Any] = {}
    if rank == 0:
        if cache == "cold":
            extra["cache"] = evict(path)
        extra["resident_before"] = resident_fraction(path)
    reader = _reader(system, path, opts)
    gc.collect()
    dist.barrier()
    rss0 = reset_peak_rss()
    r0 = rchar()
    t0 = time.perf_counter()
    dcp.load(dest.state_dict, storage_reader=reader)
    if device != "cpu":
        torch.cuda.synchronize()
    took = time.perf_counter() - t0
    read_chars = rchar() - r0
    # (VmRSS read just after the reset can exceed the peak when memory is freed meanwhile.)
    peak = max(0, proc_status()["VmHWM"] - rss0)
    stats = getattr(reader, "last_read_stats", None)
    mine = [stats.bytes_read, stats.bytes_sent, stats.bytes_received] if stats is not None else [0, 0, 0]
    # Every rank's row of the table, the others zero: a sum gives every rank all the rows.
    table = torch.zeros(world, len(_STATS), dtype=torch.int64, device=device)
    table[rank] = torch.tensor(mine + [read_chars, peak], dtype=torch.int64)
    times = torch.zeros(world, dtype=torch.float64, device=device)
    times[rank] = took
    dist.all_reduce(table)
    dist.all_reduce(times)
    # A rank whose values differ says so to the others, so none waits for it in the next load.
    try:
        dest.check(f"rank {rank}, {case}, {system}, {cache} cache")
        wrong = None
    except AssertionError as exc:
        wrong = exc
    flag = torch.tensor([0 if wrong is None else 1], device=device)
    dist.all_reduce(flag)
    if wrong is not None:
        raise wrong
    if flag.item():
        raise AssertionError(f"rank {rank}: another rank loaded wrong values ({case}, {system}, {cache} cache)")
    if hasattr(reader, "close"):
        reader.close()
    per_rank = {k: table[:, i].tolist() for i, k in enumerate(_STATS)}
    out = {
        "seconds": max(times.tolist()),
        "per_rank_seconds": times.tolist(),
        "bytes": checkpoint_bytes(opts["nbytes"]),
        "peak_bytes": max(per_rank["peak_bytes"]),
        "rchar": sum(per_rank["rchar"]),
        "per_rank": per_rank,
        **extra,
    }
    if stats is not None:
        out.update(bytes_read=sum(per_rank["bytes_read"]), bytes_sent=sum(per_rank["bytes_sent"]),
                   bytes_received=sum(per_rank["bytes_received"]))
    return out


def run_rank(rank: int, world: int, opts: dict) -> list[dict]:
    """Every load of the run, on one rank of an initialized process group (gloo, or NCCL with
    this rank's GPU current). Returns one record per timed load (the same on every rank).

    ``opts``: path, nbytes, seed, cases, systems, caches, reps, warmup, threads, exchange_bytes,
    engine ('native' or 'python'), device ('cpu' or 'cuda'). A record: seconds (the slowest
    rank's), bytes (the checkpoint's tensor bytes), peak_bytes (the largest rank's), rchar and,
    for dcp_native, bytes_read, bytes_sent, bytes_received (summed over ranks), per_rank (each
    rank's), resident_before and, cold, cache (how the files were evicted); case, system,
    page_cache ('cold' / 'warm'), rep.
    """
    import torch

    import dcp_native

    os.environ["DCP_NATIVE_BACKEND"] = opts.get("engine", "native")
    if dcp_native.backend() != os.environ["DCP_NATIVE_BACKEND"]:
        raise RuntimeError(f"DCP_NATIVE_BACKEND={os.environ['DCP_NATIVE_BACKEND']} but dcp_native.backend() is "
                           f"{dcp_native.backend()}")
    cuda = opts["device"] == "cuda"
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    mesh = None
    cases = [c for c in opts["cases"] if c != "hsdp" or hsdp_unsupported(world) is None]
    if "hsdp" in cases:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cuda" if cuda else "cpu", (world // 2, 2))
    systems = list(opts["systems"])
    records = []
    for case in cases:
        dest = _Destination(case, opts, device, mesh)
        for _ in range(opts["warmup"]):
            for system in systems:
                _load(rank, world, case, system, "warm", dest, opts, device)
        for cache in opts["caches"]:
            for rep in range(opts["reps"]):
                shift = rep % len(systems)
                for system in systems[shift:] + systems[:shift]:
                    rec = _load(rank, world, case, system, cache, dest, opts, device)
                    records.append(dict(rec, case=case, system=system, page_cache=cache, rep=rep))
        del dest
    return records


# ----------------------------------------------------------------------------- alone


def rows(records: list[dict], world: int) -> list[dict]:
    """One row per (case, cache, system), in run order: medians over the reps."""
    out: dict[tuple[str, str, str], dict] = {}
    for r in records:
        key = (r["case"], r["page_cache"], r["system"])
        row = out.setdefault(key, {"case": r["case"], "system": r["system"],
                                   "cooperative": r["system"] == "native_coop", "cache": r["page_cache"],
                                   "ranks": world, "checkpoint_bytes": r["bytes"], "seconds_all": [],
                                   "bytes_read_all": [], "bytes_sent": r.get("bytes_sent", 0),
                                   "bytes_read_source": "engine" if "bytes_read" in r else "rchar"})
        row["seconds_all"].append(r["seconds"])
        row["bytes_read_all"].append(r.get("bytes_read", r["rchar"]))
    for row in out.values():
        row["seconds"] = statistics.median(row["seconds_all"])
        row["bytes_read"] = statistics.median(row["bytes_read_all"])
        row["read_over_checkpoint"] = row["bytes_read"] / row["checkpoint_bytes"]
    return list(out.values())


def _spawned_rank(rank: int, world: int, spec: dict, result: str) -> None:
    from dcpbench import ops

    records = ops._rank_main(spec, rank, world)["records"]
    if rank == 0:
        with open(result, "w") as f:
            json.dump(records, f)
    # Done (its process group destroyed): leave without the interpreter's teardown, in which the
    # spawned rank aborts now and then ("terminate called without an active exception", no Python
    # frame left; 5 of 20 runs with stock DCP's reader alone, stdout a pipe).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--mb", type=int, default=256, help="MiB of the checkpoint (4 MiB tensors + 256 small ones)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed loads per system and case first")
    p.add_argument("--threads", type=int, default=2, help="dcp_native's reader threads per rank")
    p.add_argument("--cache", default="cold,warm")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    caches = [c for c in args.cache.split(",") if c]
    systems = [s for s in args.systems.split(",") if s]
    if not set(caches) <= set(CACHES) or not set(systems) <= set(SYSTEMS) or not systems or not caches:
        p.error(f"--cache takes {','.join(CACHES)}, --systems {','.join(SYSTEMS)}")
    if args.ranks < 2 or args.reps < 1 or args.warmup < 0 or args.mb < 1:
        p.error("--ranks must be >= 2, --reps and --mb >= 1, --warmup >= 0")

    import torch
    import torch.multiprocessing as mp

    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        print(f"SKIP: --device cuda needs {args.ranks} GPUs, {torch.cuda.device_count()} here")
        return 0
    if hsdp_unsupported(args.ranks):
        print(f"hsdp: not run: {hsdp_unsupported(args.ranks)}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "checkpoint")
        nbytes = args.mb << 20
        sizes = write_checkpoint(path, nbytes, args.seed)
        opts = {"path": path, "nbytes": nbytes, "seed": args.seed, "cases": list(CASES), "systems": systems,
                "caches": caches, "reps": args.reps, "warmup": args.warmup, "threads": args.threads,
                "exchange_bytes": 64 << 20, "engine": "native", "device": args.device}
        spec = {"rank_op": "cooperative", "store": os.path.join(tmp, "store"), "coop": opts,
                "backend": "nccl" if args.device == "cuda" else "gloo"}
        result = os.path.join(tmp, "result.json")
        mp.start_processes(_spawned_rank, args=(args.ranks, spec, result), nprocs=args.ranks, start_method="spawn")
        with open(result) as f:
            table = rows(json.load(f), args.ranks)
    print(f"{args.ranks} ranks ({args.device}), checkpoint {sizes['checkpoint_bytes'] / 2**20:.0f} MiB; "
          f"median of {args.reps}; read: summed over ranks (engine statistics; stock: rchar)")
    print(f"{'case':<11} {'cache':<5} {'system':<11} {'s (median)':>10} {'GB/s':>6} {'read/ckpt':>9} {'sent MiB':>9}")
    for r in table:
        print(f"{r['case']:<11} {r['cache']:<5} {r['system']:<11} {r['seconds']:>10.3f} "
              f"{r['checkpoint_bytes'] / r['seconds'] / 1e9:>6.2f} {r['read_over_checkpoint']:>9.2f} "
              f"{r['bytes_sent'] / 2**20:>9.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ranks": args.ranks, "mb": args.mb, "reps": args.reps, "device": args.device, **sizes,
                       "rows": table}, f, indent=1)
    # Last line: what cooperation saved (a log's tail names it).
    summary = []
    for case in CASES:
        got = {(r["system"], r["cache"]): r for r in table if r["case"] == case}
        cache = caches[0]
        if ("native", cache) in got and ("native_coop", cache) in got:
            summary.append(f"{case}: read/ckpt {got[('native', cache)]['read_over_checkpoint']:.2f} alone, "
                           f"{got[('native_coop', cache)]['read_over_checkpoint']:.2f} cooperative "
                           f"({cache}: {got[('native', cache)]['seconds']:.3f} s vs "
                           f"{got[('native_coop', cache)]['seconds']:.3f} s)")
    print("; ".join(summary) if summary else "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
