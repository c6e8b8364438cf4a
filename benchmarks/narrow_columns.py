#!/usr/bin/env python3
"""Narrow rows into CUDA memory: stock's reader vs dcp_native's routes, to tune load_plan's thresholds.

usage: PYTHONPATH=. python benchmarks/narrow_columns.py --out FILE.json [--reps 3] [--dir DIR]

A load whose destination rows are a few bytes wide (a column shard, a column view) is either
read as strided copies (one cudaMemcpy2DAsync per pinned buffer, or a copy per row where the
runs lie too far apart to share a read) or, below ``load_plan._NARROW_DEVICE_ROW`` bytes per
row and within the amplification and scratch bounds, densely: the covering file range into
device scratch, then a gather by torch on the device. For row widths of 4 B to 4 KiB, two cases:

* ``view``:  a saved (8192, W/4) fp32 tensor loaded into the column view ``wide[:, :W/4]`` of a
             (8192, 8192) CUDA tensor; the covering range is exactly the bytes needed.
* ``shard``: columns ``[0, W/4)`` of a saved (8192, 8192) fp32 tensor (256 MiB) into a
             (8192, W/4) CUDA tensor (a ReadItem with storage offsets, no DTensor); the
             covering range is the whole tensor, 32 KiB / W times the bytes needed.

Systems: ``stock`` (torch's FileSystemReader), ``old`` (dcp_native with the dense route off:
what it did before, host-buffered below 512-byte runs), ``2d`` (dense route off and every box a
strided device copy), ``dense`` (the defaults), ``dense_unbounded`` (the dense route without the
amplification and scratch bounds: is a dense read of the whole range faster even so?).

The files stay in the page cache (saved just before); each figure is the median of ``--reps``
loads after one untimed load that also checks every value. Prints a table of ms and GB/s of
needed bytes per width, writes every sample to ``--out``. Without CUDA: prints "SKIP: no CUDA
device" and exits 0. About 30-60 s on one H200.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

WIDTHS = (4, 16, 64, 256, 1024, 4096)  # bytes per row
ROWS = COLS = 8192
SYSTEMS = ("stock", "old", "2d", "dense", "dense_unbounded")


@contextlib.contextmanager
def _route(system: str):
    """load_plan's constants set for ``system``, restored afterwards."""
    from dcp_native import load_plan

    names = ("_NARROW_DEVICE_ROW", "_NARROW_MAX_AMPLIFICATION", "_NARROW_MAX_SCRATCH", "_SHORT_RUN")
    saved = {n: getattr(load_plan, n) for n in names}
    changes = {
        "old": {"_NARROW_DEVICE_ROW": 0},
        "2d": {"_NARROW_DEVICE_ROW": 0, "_SHORT_RUN": 0},
        "dense_unbounded": {"_NARROW_MAX_AMPLIFICATION": 1 << 40, "_NARROW_MAX_SCRATCH": 1 << 40},
    }.get(system, {})
    try:
        for n, v in changes.items():
            setattr(load_plan, n, v)
        yield
    finally:
        for n, v in saved.items():
            setattr(load_plan, n, v)


def _columns_planner(first: int):
    """A planner reading columns ``[first, first + n)`` of the saved "w" into the state dict's
    n-column "w" (the ReadItem's storage offsets narrow; no DTensor)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

    class Columns(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            rows, cols = self.state_dict["w"].shape
            at = MetadataIndex("w", torch.Size([0, 0]))
            return LoadPlan([ReadItem(LoadItemType.TENSOR, dest_index=at, dest_offsets=torch.Size([0, 0]),
                                      storage_index=at, storage_offsets=torch.Size([0, first]),
                                      lengths=torch.Size([rows, cols]))])

    return Columns()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file for every sample")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        with open(args.out, "w") as f:
            json.dump({"skipped": "no CUDA device"}, f)
        return 0
    report = run(args, torch.device("cuda", torch.cuda.current_device()), torch.cuda.synchronize)
    report["gpu"] = torch.cuda.get_device_name()
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


def run(args: argparse.Namespace, device: torch.device, sync) -> dict:
    """Save the checkpoints, time every load on ``device`` (``sync()`` waits for its work); the report."""
    import torch.distributed.checkpoint as dcp

    import dcp_native
    from dcp_native import load_plan
    from dcp_native._backend import get_engine

    root = tempfile.mkdtemp(prefix="narrow_columns_", dir=args.dir)
    try:
        gen = torch.Generator().manual_seed(0)
        full = torch.randn(ROWS, COLS, generator=gen)
        narrow = {w: torch.randn(ROWS, w // 4, generator=gen) for w in WIDTHS}
        paths = {"shard": os.path.join(root, "full"), "view": os.path.join(root, "narrow")}
        dcp.save({"w": full}, storage_writer=dcp_native.FileSystemWriter(paths["shard"]), no_dist=True)
        dcp.save({f"c{w}": t for w, t in narrow.items()},
                 storage_writer=dcp_native.FileSystemWriter(paths["view"]), no_dist=True)
        full_gpu = full.to(device)
        wide = torch.empty(ROWS, COLS, device=device)
        readers: dict = {}

        def reader(system: str, case: str):
            key = (system, case)
            if key not in readers:  # one per system and case: pinned pools are reused, as in training
                path = paths[case]
                readers[key] = (dcp.FileSystemReader(path) if system == "stock" else
                                dcp_native.FileSystemReader(path, memory_budget=(1 << 30) if system ==
                                                            "dense_unbounded" else 32 << 20))
            return readers[key]

        def load(case: str, width: int, system: str) -> float:
            cols = width // 4
            if case == "view":
                wide.fill_(-1.0)
                target, sd, planner = wide[:, :cols], {f"c{width}": wide[:, :cols]}, None
            else:
                target = torch.full((ROWS, cols), -1.0, device=device)
                sd, planner = {"w": target}, _columns_planner(0)
            sync()
            start = time.perf_counter()
            with _route(system):
                dcp.load(sd, storage_reader=reader(system, case), planner=planner, no_dist=True)
            sync()
            elapsed = time.perf_counter() - start
            expected = narrow[width].to(device) if case == "view" else full_gpu[:, :cols]
            if not torch.equal(target, expected):
                raise AssertionError(f"{case} {width} B {system}: wrong values")
            return elapsed

        results = []
        for case in ("view", "shard"):
            print(f"\n{case}: ms (GB/s of needed bytes), median of {args.reps}")
            print(f"{'B/row':>6} " + " ".join(f"{s:>20}" for s in SYSTEMS))
            for width in WIDTHS:
                needed = ROWS * width
                cells = []
                for system in SYSTEMS:
                    load(case, width, system)  # untimed: checks the values, warms pools and caches
                    samples = [load(case, width, system) for _ in range(args.reps)]
                    med = statistics.median(samples)
                    results.append({"case": case, "width_bytes": width, "system": system,
                                    "needed_bytes": needed, "median_ms": med * 1e3,
                                    "samples_ms": [s * 1e3 for s in samples], "gbps": needed / med / 1e9})
                    cells.append(f"{med * 1e3:9.2f} ({needed / med / 1e9:6.2f})")
                print(f"{width:>6} " + " ".join(f"{c:>20}" for c in cells), flush=True)
        for r in readers.values():
            close = getattr(r, "close", None)
            if close is not None:
                close()
        return {
            "torch": torch.__version__, "engine": get_engine().name,
            "rows": ROWS, "cols": COLS, "reps": args.reps,
            "thresholds": {n: getattr(load_plan, n) for n in (
                "_NARROW_DEVICE_ROW", "_NARROW_MAX_AMPLIFICATION", "_NARROW_MAX_SCRATCH", "_SHORT_RUN", "_MANY_RUNS")},
            "results": results,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
