#!/usr/bin/env python3
"""Cooperative loads: bytes read from storage and load time, with and without sharing.

N ranks (gloo on the CPU; ``--device cuda`` with NCCL, one GPU per rank) load one checkpoint:

* ``replicated``: DDP-like, every rank loads every tensor (``--mb`` MiB in 4 MiB tensors plus
  256 small ones);
* ``hsdp``: a (N/2 x 2) mesh, tensors placed ``(Replicate(), Shard(0))``: each shard is needed
  by N/2 ranks.

For each case the ranks alternate loads with ``cooperative=False`` and ``cooperative=True``
(``--reps`` each), the page cache cold (the checkpoint's files evicted before every load:
``posix_fadvise(DONTNEED)``, as the suite does) or warm (``--cache``). A load's time is the
slowest rank's; bytes read and sent are summed over the ranks. Values are checked after every
load. Prints a table; ``--out FILE`` writes JSON (``rows``: case, cooperative, cache, seconds
(median, all), bytes_read / checkpoint bytes, bytes_sent).

On one machine the ranks share its disk and page cache, so what cooperation saves here is
storage traffic (the ``read/ckpt`` column), paid for in loopback traffic; on shared storage
(NFS, Lustre, object stores) the bytes not read are the time saved.

Usage: python benchmarks/cooperative.py [--ranks 4] [--mb 256] [--reps 3] [--cache cold,warm]
       [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dcp_native  # noqa: E402
from dcpbench.rawio import evict  # noqa: E402


def _state(mb: int, device: str, blank: bool) -> dict:
    g = torch.Generator().manual_seed(7)
    sd = {}
    for i in range(max(1, mb // 4)):
        sd[f"layer{i}.weight"] = torch.randn(1024, 1024, generator=g)
    for i in range(256):
        sd[f"norm{i}"] = torch.randn(64 + i, generator=g)
    if blank:
        sd = {k: torch.zeros_like(v) for k, v in sd.items()}
    return {k: v.to(device) for k, v in sd.items()}


def _rank(rank: int, world: int, store: str, args: argparse.Namespace, paths: dict, result: str) -> None:
    device = "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    want = _state(args.mb, device, blank=False)
    mesh = init_device_mesh(args.device, (world // 2, 2)) if world % 2 == 0 and world > 2 else None
    rows = []
    for case, path in paths.items():
        if case == "hsdp" and mesh is None:
            continue
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".distcp"))
        for cache in args.cache.split(","):
            times: dict[bool, list[float]] = {False: [], True: []}
            read: dict[bool, int] = {}
            sent: dict[bool, int] = {}
            for _ in range(args.reps):
                for coop in (False, True):
                    sd = _state(args.mb, device, blank=True)
                    if case == "hsdp":
                        sd = {k: distribute_tensor(v, mesh, [Replicate(), Shard(0)]) for k, v in sd.items()}
                    if cache == "cold" and rank == 0:
                        evict(path)
                    dist.barrier()
                    reader = dcp_native.FileSystemReader(path, cooperative=coop, thread_count=args.threads)
                    t0 = time.perf_counter()
                    dcp.load(sd, storage_reader=reader)
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    took = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
                    dist.all_reduce(took, op=dist.ReduceOp.MAX)
                    stats = torch.tensor([reader.last_read_stats.bytes_read, reader.last_read_stats.bytes_sent],
                                         dtype=torch.int64, device=device)
                    dist.all_reduce(stats)
                    for k, v in sd.items():
                        local = v.to_local() if case == "hsdp" else v
                        ref = (distribute_tensor(want[k], mesh, [Replicate(), Shard(0)]).to_local()
                               if case == "hsdp" else want[k])
                        if not torch.equal(local, ref):
                            raise AssertionError(f"rank {rank}: {case} {k} differs (cooperative={coop})")
                    times[coop].append(took.item())
                    read[coop], sent[coop] = stats.tolist()
                    reader.close()
            for coop in (False, True):
                rows.append({"case": case, "cooperative": coop, "cache": cache, "ranks": world,
                             "checkpoint_bytes": size, "seconds": statistics.median(times[coop]),
                             "seconds_all": times[coop], "bytes_read": read[coop],
                             "read_over_checkpoint": read[coop] / size, "bytes_sent": sent[coop]})
    if rank == 0:
        with open(result, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="cold,warm")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        print(f"SKIP: --device cuda needs {args.ranks} GPUs, {torch.cuda.device_count()} here")
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        paths = {"replicated": os.path.join(tmp, "replicated"), "hsdp": os.path.join(tmp, "hsdp")}
        for path in paths.values():  # both from one process: every tensor whole, as DDP saves
            dcp.save(_state(args.mb, "cpu", blank=False), storage_writer=dcp_native.FileSystemWriter(path),
                     no_dist=True)
        result = os.path.join(tmp, "result.json")
        mp.start_processes(_rank, args=(args.ranks, os.path.join(tmp, "store"), args, paths, result),
                           nprocs=args.ranks, start_method="spawn")
        with open(result) as f:
            rows = json.load(f)
    print(f"{'case':<11} {'cache':<5} {'coop':<5} {'s (median)':>10} {'GB/s':>6} {'read/ckpt':>9} {'sent MiB':>9}")
    for r in rows:
        print(f"{r['case']:<11} {r['cache']:<5} {str(r['cooperative']):<5} {r['seconds']:>10.3f} "
              f"{r['checkpoint_bytes'] / r['seconds'] / 1e9:>6.2f} {r['read_over_checkpoint']:>9.2f} "
              f"{r['bytes_sent'] / 2**20:>9.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ranks": args.ranks, "mb": args.mb, "reps": args.reps, "device": args.device,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
