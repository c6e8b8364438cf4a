#!/usr/bin/env python3
"""dcp_native benchmark suite: stock DCP vs dcp_native (Python and native engines) vs raw I/O.

``make bench`` runs this with no arguments (about 5 minutes on a 2-core
machine); ``--quick`` runs every case at tiny size (the smoke test). Results go
to ``--out`` (default ``benchmarks/results``): ``latest.json`` (every figure
with median/min/max and its samples, the machine, versions, method),
``latest.md`` (the tables) and ``latest.png`` (the chart, with matplotlib).

Workloads (``--workload``, repeatable; README.md in this folder has the details):

* ``model``   a transformer-like model in bf16 plus its AdamW state in fp32 and
              the non-tensor entries a trainer saves (``--size``, 1 GiB): save
              (sync off) and load at ``--threads`` 1, 2, 4, 8.
* ``cold``    the model's load with the page cache dropped before each load,
              with raw reads through O_DIRECT as well as buffered.
* ``many``    10,000 small tensors, optimizer-state style: save and load.
* ``load``    core issue: load 1 GiB in 64 fp32 tensors (+ peak memory).
* ``small``   core issue: 4000 tensors of 16 KiB, save and load, DCP's floor
              (a storage layer that does no I/O) and where the time goes.
* ``save``    core issue: save 1 GiB in 64 tensors, ``sync_files`` off and on.
* ``reshard`` 4096x4096 fp32 saved by 4 gloo ranks as DTensor Shard(0), loaded
              by 2 ranks as Shard(1) and by 3 ranks (uneven columns): time,
              bytes read versus bytes needed.
* ``cooperative`` cooperative loads (``cooperative.py``): ``--coop-ranks`` (4) gloo
              ranks (NCCL, one GPU each, with CUDA) load a ``--coop-size`` (256 MiB)
              checkpoint, every rank everything (replicated) and as HSDP
              ((N/2 x 2) mesh, (Replicate(), Shard(0))), cold and warm cache:
              stock, dcp_native alone and cooperative; slowest rank's time,
              bytes read by all ranks / checkpoint, bytes sent.
* ``async``   ``async_save`` blocking and total time: stock (its writer as stager, and
              its DefaultStager), dcp_native, and a plain copy into preallocated
              memory (pinned on CUDA); on CPU at most ``ASYNC_CPU_BYTES``.
* ``stage``   GPU: D2H staging (the writer's ``stage()``) vs torch's pinned copy.
* ``repeat``  second and later saves (and loads) of one structure in one
              process: 10,000 32x32 fp32 tensors (``--repeat-count``),
              ``--repeat-iters`` saves per process, the median of the 2nd and
              later; stock with and without its plan cache, dcp_native with and
              without caching planners (where dcp_native has them).
* ``savesweep`` the save of the model state (``--sweep-size``, 512 MiB) at
              1/2/4/8 threads, sync off and on, each engine with checksums on and
              off, raw pwrite at the same thread counts; the ratios of the
              core issue's targets.
* ``planning`` issue 14, planning at scale (``planning_scale.py``): N simulated
              FSDP ranks (``--planning-ranks``, 64,256,1024) of a ~1,000-parameter
              model with Adam's state in one process: the coordinator's step
              (stock vs dcp_native's planners and writers), the metadata's size
              and (un)pickling, one rank's load planning. One process per N.

The ``small`` workload also runs its save and load ``--repeat-iters`` times in
one long-lived process (``small_*_longlived``); the ``noio`` rows give every
system's cost per item above DCP's own floor.

Systems: ``stock`` (torch's FileSystemWriter/Reader), ``python`` and ``native``
(dcp_native with that engine), ``raw`` (the same bytes with plain sequential
pwrite/pread on threads, one file per thread, into/out of preallocated memory:
this machine's practical limit; every figure is also given as % of it), and
per case ``noio``, ``raw_direct``, ``*_on_stock_ckpt``, ``torch_pinned_*``,
``stock_cached`` (stock with ``enable_plan_caching=True``), ``*_cached``
(dcp_native's caching planners), ``*_crc`` / ``*_nocrc`` (checksums on / off).

Method: one fresh process per figure (forked from an import-only server per
round, see ``--isolation``); the timed region is only the save/load call or the
raw I/O; ``--reps`` rounds interleaved across systems (each round starts one
system later; ``--warmup`` untimed rounds first, none by default); median, min, max. Data is a seeded
pattern; every load checks every loaded value, and the checkpoint of each
system's first save is loaded back and checked. The page-cache state of every
figure is measured (mincore) and stated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dcpbench import data as wl  # noqa: E402
from dcpbench.common import (  # noqa: E402
    HERE,
    KiB,
    MiB,
    GiB,
    fmt_bytes,
    git_info,
    loadavg,
    machine_info,
    parse_size,
    summarize,
)
from dcpbench.report import (  # noqa: E402
    evaluate_targets,
    planning_growth,
    render_chart,
    render_tables,
    sweep_ratios,
)
from dcpbench.runner import ChildFailed, Runner  # noqa: E402

#: Every workload, in the order they run.
#: (GPU-only stage and CUDA-default async right after model: a GPU check cut short keeps them.)
WORKLOADS = ("model", "stage", "async", "cold", "many", "load", "small", "save", "reshard", "cooperative", "repeat",
             "savesweep", "planning")
#: Workloads that only mean something on a GPU.
CUDA_ONLY = ("stage",)
#: Workloads not run by default on a CPU-only machine (opt in with --workload).
CPU_OPT_IN: tuple[str, ...] = ()
#: State dict size of the async workload on CPU (the model's on CUDA): keeps it near 30 s.
ASYNC_CPU_BYTES = 256 * MiB
#: What the stock_cached system is (params of the cases that have it).
STOCK_CACHED = ("stock's FileSystemWriter with DefaultSavePlanner(enable_plan_caching=True); in a fresh process "
                "(one save) the cache starts empty")
#: How a long-lived figure uses DCP's objects (params of those cases).
LONG_LIVED_STORAGE = ("one planner object for every save (load) of the process; saves: a fresh writer per save, "
                      "each into a new directory (the previous one deleted and flushed between saves, untimed); "
                      "loads: one reader, every load with checkpoint_id (DCP resets the reader: .metadata is read "
                      "every time)")
#: Systems of the save thread sweep (checksums set explicitly on every dcp_native one).
SWEEP_SYSTEMS = ("stock", "python_nocrc", "python_crc", "native_nocrc", "native_crc", "raw")

#: Numeric per-run fields summarized (median/min/max) when every run of a system has them.
SUMMARIZED = ("bytes_read", "rchar", "read_calls", "resident_before", "blocking_s", "total_s",
              "first_blocking_s", "first_total_s", "first_seconds", "plan_reused", "bytes_sent", "bytes_received")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runner = Runner(args.isolation, args.verbose)
        self.root = tempfile.mkdtemp(prefix="dcp_native_bench_", dir=args.dir)
        self.cases: dict[str, dict] = {}
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.seed = args.seed
        self.t0 = time.perf_counter()
        self.device = "cpu"
        self.info: dict[str, Any] = {}

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)

    def base_spec(self) -> dict:
        return {"bench": self.root, "seed": self.seed, "cold": self.args.cache == "cold", "device": self.device}

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def setup(self, what: str, spec: dict) -> None:
        t0 = time.perf_counter()
        self.runner.run(dict(self.base_spec(), **spec))
        os.sync()  # clean pages, and no writeback left over for the timed figures
        if self.args.verbose:
            self.log(f"  setup {what}: {time.perf_counter() - t0:.1f} s")

    def fail(self, msg: str) -> None:
        self.errors.append(msg)
        print(msg, file=sys.stderr, flush=True)

    def rounds(
        self,
        case: str,
        systems: list[tuple[str, dict]],
        cleanup: Callable[[dict], None] | None = None,
        warmup: int | None = None,
        reps: int | None = None,
        slot0: int = 0,
    ) -> tuple[dict[str, list[dict]], dict[str, str]]:
        """Warm-up round(s), then ``reps`` rounds interleaved across systems.

        Returns the timed runs per system and the systems that reported they
        cannot run here (e.g. O_DIRECT on a filesystem without it), with why.
        The first round of every system verifies what it saved (``verify``).
        """
        warmup = self.args.warmup if warmup is None else warmup
        reps = self.args.reps if reps is None else reps
        samples: dict[str, list[dict]] = {name: [] for name, _ in systems}
        unsupported: dict[str, str] = {}
        failed: set[str] = set()
        for rnd in range(warmup + reps):
            warm = rnd < warmup
            # Each round starts one system later (stock, python, native, raw; python,
            # native, raw, stock; ...) so no system always runs right after the same one.
            shift = rnd % len(systems)
            for name, spec in systems[shift:] + systems[:shift]:
                if name in failed or name in unsupported:
                    continue
                full = dict(self.base_spec(), **spec, verify=rnd == 0)
                if "dir_template" in full:
                    full["dir"] = full.pop("dir_template").format(round=rnd)
                try:
                    res = self.runner.run(full, slot=slot0 + rnd)
                except ChildFailed as exc:
                    failed.add(name)
                    self.fail(f"{case}/{name}: FAILED\n{exc}")
                    continue
                finally:
                    if cleanup is not None:
                        cleanup(full)
                if "unsupported" in res:
                    unsupported[name] = res["unsupported"]
                    self.log(f"  {case}/{name}: not run here: {res['unsupported']}")
                    continue
                if not warm:
                    samples[name].append(res)
            label = "warm-up" if warm else f"rep {rnd - warmup + 1}/{reps}"
            self.log(f"  {case}: {label} done")
        if self.args.profile:
            self.profile(case, [(n, s) for n, s in systems if n not in failed and n not in unsupported], cleanup)
        return samples, unsupported

    def profile(self, case: str, systems: list[tuple[str, dict]], cleanup: Callable[[dict], None] | None) -> None:
        """One more run per system under cProfile (not a figure: the profiler distorts times)."""
        out = os.path.join(self.args.out, "profiles")
        os.makedirs(out, exist_ok=True)
        for name, spec in systems:
            if spec["op"] not in ("save", "load", "async_save", "repeat_save", "repeat_load") \
                    or spec["system"].startswith("raw"):
                continue
            full = dict(self.base_spec(), **spec, profile_to=os.path.join(out, f"{case}_{name}.txt"))
            if "dir_template" in full:
                full["dir"] = full.pop("dir_template").format(round="profile")
            try:
                self.runner.run(full)
            except ChildFailed as exc:
                self.fail(f"{case}/{name} (profile): FAILED\n{exc}")
            finally:
                if cleanup is not None:
                    cleanup(full)
        self.log(f"  {case}: profiles written to {out}")

    @staticmethod
    def rm_save(spec: dict) -> None:
        """After a save figure: delete what it wrote, and flush, so no writeback spills into the next figure."""
        if spec.get("op") in ("save", "async_save"):
            shutil.rmtree(spec["dir"], ignore_errors=True)
            os.sync()

    # ------------------------------------------------------------------ aggregation

    def record(
        self,
        key: str,
        title: str,
        samples: dict[str, list[dict]],
        *,
        workload: str,
        op: str,
        kind: str,
        threads: int | None,
        page_cache: str,
        params: dict,
        unsupported: dict[str, str] | None = None,
        tensors: int | None = None,
        reps: int | None = None,
        warmup: int | None = None,
    ) -> dict:
        """One case: per system, seconds / GB/s / peak MiB (+ whatever the runs report) as median/min/max."""
        systems: dict[str, dict] = {}
        for name, runs in samples.items():
            if not runs:
                continue
            entry: dict[str, Any] = {
                "seconds": summarize([r["seconds"] for r in runs]),
                "gbps": summarize([r["bytes"] / r["seconds"] / 1e9 for r in runs]),
                "bytes": runs[0]["bytes"],
                "peak_mib": summarize([r["peak_bytes"] / MiB for r in runs]),
            }
            if tensors:
                entry["us_per_tensor"] = summarize([r["seconds"] / tensors * 1e6 for r in runs])
            if all(r.get("gpu_peak_bytes") is not None for r in runs):
                entry["gpu_peak_mib"] = summarize([r["gpu_peak_bytes"] / MiB for r in runs])
            for k in SUMMARIZED:
                if all(k in r for r in runs):
                    entry[k] = summarize([r[k] for r in runs])
            if all("bytes_read" in r for r in runs) and op == "load":
                entry["read_over_needed"] = summarize([r["bytes_read"] / r["bytes"] for r in runs])
            if all("iter_seconds" in r for r in runs):
                # Long-lived figures: every save (load) of each process, in order (the figure leaves out the first).
                entry["iter_seconds"] = [r["iter_seconds"] for r in runs]
            caches = [r["cache"]["method"] for r in runs if "cache" in r]
            if caches:
                entry["eviction"] = sorted(set(caches))
            systems[name] = entry
        floor = systems.get("noio", {}).get("us_per_tensor")
        if floor is not None:
            # Each system's own cost per item above DCP's floor (medians: system minus noio).
            for name, entry in systems.items():
                if "us_per_tensor" in entry and not name.startswith("raw"):
                    entry["us_above_floor"] = entry["us_per_tensor"]["median"] - floor["median"]
        case = {
            "title": title,
            "workload": workload,
            "op": op,
            "kind": kind,
            "threads": threads,
            "device": self.device,
            "page_cache": page_cache,
            "reps": self.args.reps if reps is None else reps,
            "warmup": self.args.warmup if warmup is None else warmup,
            "params": params,
            "systems": systems,
        }
        if unsupported:
            case["unsupported"] = unsupported
        self.cases[key] = case
        return case

    def cache_label(self, op: str, cold: bool | None = None, sync: bool | None = None) -> str:
        cold = self.args.cache == "cold" if cold is None else cold
        if op in ("save", "async_save"):
            if sync:
                return "save: data written through the page cache and fsynced (sync_files on) inside the timed region"
            return ("save: data written into the page cache, not flushed inside the timed region (sync_files off); "
                    "flushed and deleted between figures")
        if cold:
            return ("cold: the checkpoint's files are evicted before each load (posix_fadvise DONTNEED, plus "
                    "drop_caches if pages survive), residency checked with mincore (`resident_before`); "
                    "raw_direct reads with O_DIRECT; a cache below this kernel (the hypervisor's) may still serve reads")
        return ("warm: the checkpoint's files are in the page cache (written in setup, read by earlier figures); "
                "residency checked with mincore (`resident_before`)")

    # ------------------------------------------------------------------ model (+ thread sweep, cold)

    def model_data(self) -> dict:
        return {"kind": "model", "size": self.args.size}

    def model_checkpoints(self) -> tuple[str, str]:
        """The model checkpoints the loads read: written once by stock and by dcp_native (native engine)."""
        stock_dir, native_dir = self.path("model_stock"), self.path("model_native")
        if not os.path.exists(native_dir):
            d = self.model_data()
            common = {"data": d, "threads": self.args.main_threads}
            self.setup("model stock checkpoint", dict(common, op="write_checkpoint", system="stock", dir=stock_dir))
            self.setup("model dcp_native checkpoint", dict(common, op="write_checkpoint", system="native", dir=native_dir))
        return stock_dir, native_dir

    def case_model(self) -> None:
        a = self.args
        d = self.model_data()
        desc = wl.describe(d, self.seed)
        shape = desc["shape"]
        what = (f"transformer-like model ({shape['layers']} layers, d_model {shape['d_model']}, vocab {shape['vocab']}) "
                f"+ AdamW: {fmt_bytes(desc['tensor_bytes'])} in {desc['tensors']} tensors "
                f"({fmt_bytes(desc['smallest'])} to {fmt_bytes(desc['largest'])}, bf16 weights, fp32 state) "
                f"+ {desc['objects']} objects")
        self.log(f"[model] {what}")
        params = dict(desc, data=d)
        t_main = a.main_threads
        sweep = [t for t in a.threads if t != t_main]
        cuda = self.device == "cuda"

        # Save, sync off, at the main thread count: every system, full reps.
        save_systems = [
            (n, {"op": "save", "system": n, "data": d, "threads": t_main, "sync": False,
                 "dir_template": self.path(f"model_save_{n}_t{t_main}_{{round}}")})
            for n in ("stock", "python", "native", "native_nocrc", "raw")
        ]
        if cuda:
            save_systems.append(("torch_pinned_d2h", {"op": "transfer", "system": "torch_pinned", "direction": "d2h",
                                                     "data": d, "threads": t_main, "dir": self.path("xfer")}))
        samples, _ = self.rounds("model_save", save_systems, cleanup=self.rm_save)
        self.record("model_save", f"save the model state ({fmt_bytes(desc['tensor_bytes'])}), {t_main} threads, sync_files off",
                    samples, workload="model", op="save", kind="throughput", threads=t_main,
                    page_cache=self.cache_label("save", sync=False), params=params)

        stock_dir, native_dir = self.model_checkpoints()
        load_systems = [
            ("stock", {"op": "load", "system": "stock", "data": d, "threads": t_main, "dir": stock_dir}),
            ("python", {"op": "load", "system": "python", "data": d, "threads": t_main, "dir": native_dir}),
            ("native", {"op": "load", "system": "native", "data": d, "threads": t_main, "dir": native_dir}),
            ("raw", {"op": "load", "system": "raw", "data": d, "threads": t_main, "dir": native_dir}),
        ]
        if cuda:
            load_systems.append(("torch_pinned_h2d", {"op": "transfer", "system": "torch_pinned", "direction": "h2d",
                                                     "data": d, "threads": t_main, "dir": self.path("xfer")}))
        samples, _ = self.rounds("model_load", load_systems)
        self.record("model_load", f"load the model state ({fmt_bytes(desc['tensor_bytes'])}), {t_main} threads",
                    samples, workload="model", op="load", kind="throughput", threads=t_main,
                    page_cache=self.cache_label("load"), params=params)

        # Thread sweep: fewer reps (a.sweep_reps, no warm-up: the rounds above warmed everything up).
        if sweep:
            self.log(f"[model] thread sweep {sweep} (+{t_main} above): {a.sweep_reps} rep(s) each")
            for t in sweep:
                systems = [
                    (n, {"op": "save", "system": n, "data": d, "threads": t, "sync": False,
                         "dir_template": self.path(f"model_save_{n}_t{t}_{{round}}")})
                    for n in ("stock", "python", "native", "raw")
                ]
                samples, _ = self.rounds(f"model_save_t{t}", systems, cleanup=self.rm_save, warmup=0, reps=a.sweep_reps)
                self.record(f"model_save_t{t}", f"save the model state, {t} threads, sync_files off", samples,
                            workload="model", op="save", kind="throughput", threads=t,
                            page_cache=self.cache_label("save", sync=False), params=params, reps=a.sweep_reps, warmup=0)
                systems = [
                    (n, {"op": "load", "system": n, "data": d, "threads": t, "dir": native_dir})
                    for n in ("python", "native", "raw")
                ]
                samples, _ = self.rounds(f"model_load_t{t}", systems, warmup=0, reps=a.sweep_reps)
                self.record(f"model_load_t{t}", f"load the model state, {t} threads", samples,
                            workload="model", op="load", kind="throughput", threads=t,
                            page_cache=self.cache_label("load"), params=params, reps=a.sweep_reps, warmup=0)

    def case_cold(self) -> None:
        a = self.args
        d = self.model_data()
        desc = wl.describe(d, self.seed)
        t = a.main_threads
        self.log(f"[cold] model load ({fmt_bytes(desc['tensor_bytes'])}) with the page cache dropped, {t} threads")
        stock_dir, native_dir = self.model_checkpoints()
        systems = [
            ("stock", {"op": "load", "system": "stock", "data": d, "threads": t, "dir": stock_dir, "cold": True}),
            ("python", {"op": "load", "system": "python", "data": d, "threads": t, "dir": native_dir, "cold": True}),
            ("native", {"op": "load", "system": "native", "data": d, "threads": t, "dir": native_dir, "cold": True}),
            ("raw", {"op": "load", "system": "raw", "data": d, "threads": t, "dir": native_dir, "cold": True}),
            ("raw_direct", {"op": "load", "system": "raw_direct", "data": d, "threads": t, "dir": native_dir,
                            "cold": True}),
        ]
        samples, unsupported = self.rounds("model_load_cold", systems)
        self.record("model_load_cold", f"load the model state ({fmt_bytes(desc['tensor_bytes'])}), {t} threads, "
                    "cold page cache", samples, workload="cold", op="load", kind="throughput", threads=t,
                    page_cache=self.cache_label("load", cold=True), params=dict(desc, data=d),
                    unsupported=unsupported)

    # ------------------------------------------------------------------ many small tensors

    def case_many(self) -> None:
        a = self.args
        d = {"kind": "many", "count": a.many_count}
        desc = wl.describe(d, self.seed)
        t = a.main_threads
        self.log(f"[many] {desc['tensors']} optimizer-state tensors ({fmt_bytes(desc['smallest'])} to "
                 f"{fmt_bytes(desc['largest'])}, {fmt_bytes(desc['tensor_bytes'])}) + {desc['objects']} objects, "
                 f"{t} threads, sync_files off")
        stock_dir, native_dir = self.path("many_stock"), self.path("many_native")
        self.setup("stock checkpoint", {"op": "write_checkpoint", "system": "stock", "data": d, "threads": t, "dir": stock_dir})
        self.setup("dcp_native checkpoint", {"op": "write_checkpoint", "system": "native", "data": d, "threads": t,
                                             "dir": native_dir})
        names = ["stock", "python", "native", "noio", "raw"]
        save_systems = [
            (n, {"op": "save", "system": n, "data": d, "threads": t, "sync": False, "verifier": "native",
                 "dir_template": self.path(f"many_save_{n}_{{round}}")})
            for n in names[:1] + ["stock_cached"] + names[1:]
        ]
        load_systems = [
            (n, {"op": "load", "system": n, "data": d, "threads": t, "dir": stock_dir if n == "stock" else native_dir})
            for n in names
        ]
        params = dict(desc, data=d, noio="DCP with a storage layer that does no I/O (DCP's own floor)",
                      stock_cached=STOCK_CACHED)
        samples, unsupported = self.rounds("many_save", save_systems, cleanup=self.rm_save)
        self.record("many_save", f"save {desc['tensors']} small tensors (optimizer state), sync_files off", samples,
                    workload="many", op="save", kind="time", threads=t, page_cache=self.cache_label("save", sync=False),
                    params=params, tensors=desc["tensors"], unsupported=unsupported)
        samples, _ = self.rounds("many_load", load_systems)
        self.record("many_load", f"load {desc['tensors']} small tensors (optimizer state)", samples,
                    workload="many", op="load", kind="time", threads=t, page_cache=self.cache_label("load"),
                    params=params, tensors=desc["tensors"])
        shutil.rmtree(stock_dir, ignore_errors=True)
        shutil.rmtree(native_dir, ignore_errors=True)

    # ------------------------------------------------------------------ core issue: load, small, save

    def uniform(self, count: int, numel: int, prefix: str) -> dict:
        return {"kind": "uniform", "count": count, "numel": numel, "prefix": prefix}

    def case_load(self) -> None:
        a = self.args
        count = 64
        numel = max(1, a.size // 4 // count)
        d = self.uniform(count, numel, "layer")
        t = a.main_threads
        stock_dir, native_dir = self.path("load_stock"), self.path("load_native")
        common = {"data": d, "threads": t}
        self.log(f"[load] {fmt_bytes(count * numel * 4)} in {count} fp32 tensors, {t} threads")
        self.setup("stock checkpoint", dict(common, op="write_checkpoint", system="stock", dir=stock_dir))
        self.setup("dcp_native checkpoint", dict(common, op="write_checkpoint", system="native", dir=native_dir))
        systems = [
            ("stock", dict(common, op="load", system="stock", dir=stock_dir)),
            ("python", dict(common, op="load", system="python", dir=native_dir)),
            ("native", dict(common, op="load", system="native", dir=native_dir)),
            ("python_on_stock_ckpt", dict(common, op="load", system="python", dir=stock_dir)),
            ("native_on_stock_ckpt", dict(common, op="load", system="native", dir=stock_dir)),
            ("raw", dict(common, op="load", system="raw", dir=native_dir)),
        ]
        samples, _ = self.rounds("load", systems)
        shutil.rmtree(stock_dir, ignore_errors=True)
        shutil.rmtree(native_dir, ignore_errors=True)
        params = {"tensors": count, "tensor_bytes": numel * 4, "total_bytes": count * numel * 4,
                  "reader_threads": t, "raw_threads": t}
        self.record("load", f"load {fmt_bytes(count * numel * 4)} in {count} fp32 tensors, {t} threads", samples,
                    workload="load", op="load", kind="throughput", threads=t, page_cache=self.cache_label("load"),
                    params=params)
        peak = {name: {"peak_mib": summarize([r["peak_bytes"] / MiB for r in runs])}
                for name, runs in samples.items() if runs}
        self.cases["peak"] = {
            "title": f"peak RSS above the destination tensors during the load of {fmt_bytes(count * numel * 4)}",
            "workload": "load", "op": "load", "kind": "memory", "threads": t, "device": self.device,
            "page_cache": self.cache_label("load"), "reps": a.reps, "warmup": a.warmup,
            "params": {"measured": "VmHWM minus VmRSS after the destination is allocated and touched "
                                   "(peak reset via /proc/self/clear_refs)"},
            "systems": peak,
        }

    def case_small(self) -> None:
        a = self.args
        count, numel = a.small_count, max(1, a.small_bytes // 4)
        d = self.uniform(count, numel, "opt")
        t = a.main_threads
        common = {"data": d, "threads": t}
        self.log(f"[small] {count} fp32 tensors of {fmt_bytes(numel * 4)}, {t} threads, sync_files off")
        stock_dir, native_dir = self.path("small_stock"), self.path("small_native")
        self.setup("stock checkpoint", dict(common, op="write_checkpoint", system="stock", dir=stock_dir))
        self.setup("dcp_native checkpoint", dict(common, op="write_checkpoint", system="native", dir=native_dir))
        names = ["stock", "python", "native", "noio", "raw"]
        save_names = ["stock", "stock_cached"] + names[1:]
        save_systems = [
            (n, dict(common, op="save", system=n, sync=False, dir_template=self.path(f"small_save_{n}_{{round}}")))
            for n in save_names
        ]
        load_systems = [
            (n, dict(common, op="load", system=n, dir=stock_dir if n == "stock" else native_dir)) for n in names
        ]
        save, save_unsupported = self.rounds("small_save", save_systems, cleanup=self.rm_save)
        load, _ = self.rounds("small_load", load_systems)
        phases = self.phase_rounds(save_systems, load_systems, a.phase_rounds, "small")
        # The same save and load, repeated in one long-lived process (a training loop): no raw.
        k = a.repeat_iters
        self.log(f"[small] long-lived process: {k} saves / {k} loads per process, the median of the 2nd and later")
        ll_save = [(n, dict(spec, op="repeat_save", iters=k)) for n, spec in save_systems if n != "raw"]
        ll_load = [(n, dict(spec, op="repeat_load", iters=k)) for n, spec in load_systems if n != "raw"]
        ll_save_s, ll_unsupported = self.rounds("small_save_longlived", ll_save, cleanup=self.rm_save)
        ll_load_s, _ = self.rounds("small_load_longlived", ll_load)
        shutil.rmtree(stock_dir, ignore_errors=True)
        shutil.rmtree(native_dir, ignore_errors=True)
        params = {"tensors": count, "tensor_bytes": numel * 4, "threads": t, "sync_files": False,
                  "noio": "DCP with a storage layer that does no I/O (DCP's own floor)",
                  "stock_cached": STOCK_CACHED, "phase_rounds": a.phase_rounds}
        ll_params = dict(params, iters=k, process="long-lived: one process runs every save (load) of a figure",
                         figure="median of the 2nd and later saves (loads) of the process; the first is "
                                "`first_seconds`", planner=LONG_LIVED_STORAGE)
        del ll_params["phase_rounds"]
        c = self.record("small_save", f"save {count} tensors of {fmt_bytes(numel * 4)} (sync off)", save,
                        workload="small", op="save", kind="time", threads=t,
                        page_cache=self.cache_label("save", sync=False), params=params, tensors=count,
                        unsupported=save_unsupported)
        for name, ph in phases["save"].items():
            if name in c["systems"]:
                c["systems"][name]["phases_s"] = ph
        c = self.record("small_load", f"load {count} tensors of {fmt_bytes(numel * 4)}", load,
                        workload="small", op="load", kind="time", threads=t, page_cache=self.cache_label("load"),
                        params=params, tensors=count)
        for name, ph in phases["load"].items():
            if name in c["systems"]:
                c["systems"][name]["phases_s"] = ph
        self.record("small_save_longlived", f"save {count} tensors of {fmt_bytes(numel * 4)} (sync off), "
                    f"long-lived process: saves 2-{k} of {k}", ll_save_s, workload="small", op="save", kind="time",
                    threads=t, page_cache=self.cache_label("save", sync=False), params=ll_params, tensors=count,
                    unsupported=ll_unsupported)
        self.record("small_load_longlived", f"load {count} tensors of {fmt_bytes(numel * 4)}, long-lived process: "
                    f"loads 2-{k} of {k}", ll_load_s, workload="small", op="load", kind="time", threads=t,
                    page_cache=self.cache_label("load"), params=ll_params, tensors=count)

    def phase_rounds(self, save_systems, load_systems, n_rounds: int, tag: str) -> dict[str, dict[str, dict]]:
        """Extra rounds with every phase timed (medians per phase), kept apart from the figures."""
        runs: dict[str, dict[str, list[dict]]] = {"save": {}, "load": {}}
        failed: set[tuple[str, str]] = set()
        for rnd in range(n_rounds):
            for kind, systems in (("save", save_systems), ("load", load_systems)):
                shift = rnd % len(systems)
                for name, spec in systems[shift:] + systems[:shift]:
                    if name == "raw" or (kind, name) in failed:
                        continue
                    full = dict(self.base_spec(), **spec, phases=True)
                    if "dir_template" in full:
                        full["dir"] = full.pop("dir_template").format(round=f"phases{rnd}")
                    try:
                        res = self.runner.run(full, slot=self.args.warmup + rnd)
                        if "unsupported" in res:
                            failed.add((kind, name))
                            continue
                        runs[kind].setdefault(name, []).append(res["phases"])
                    except ChildFailed as exc:
                        failed.add((kind, name))
                        self.fail(f"{tag}_{kind}/{name} (phases): FAILED\n{exc}")
                    finally:
                        self.rm_save(full)
            self.log(f"  {tag} phases: round {rnd + 1}/{n_rounds} done")
        out: dict[str, dict[str, dict]] = {"save": {}, "load": {}}
        for kind, by_system in runs.items():
            for name, rs in by_system.items():
                med: dict[str, float | None] = {}
                for label in rs[0]:
                    vals = [r[label] for r in rs if r.get(label) is not None]
                    med[label] = statistics.median(vals) if vals else None
                out[kind][name] = med
        return out

    def case_save(self) -> None:
        a = self.args
        count = 64
        numel = max(1, a.size // 4 // count)
        d = self.uniform(count, numel, "layer")
        t = a.main_threads
        self.log(f"[save] {fmt_bytes(count * numel * 4)} in {count} fp32 tensors, {t} threads, sync_files off/on")
        for sync in (False, True):
            key = "save_sync" if sync else "save_nosync"
            systems = [
                (n, {"op": "save", "system": n, "data": d, "threads": t, "sync": sync,
                     "dir_template": self.path(f"{key}_{n}_{{round}}")})
                for n in ("stock", "python", "native", "native_nocrc", "raw")
            ]
            samples, _ = self.rounds(key, systems, cleanup=self.rm_save)
            raw = f"pwrite into {t} files on {t} threads" + (" + fsync" if sync else "")
            self.record(key, f"save {fmt_bytes(count * numel * 4)} in {count} tensors, {t} threads, "
                        f"sync_files {'on' if sync else 'off'}", samples, workload="save", op="save",
                        kind="throughput", threads=t, page_cache=self.cache_label("save", sync=sync),
                        params={"tensors": count, "total_bytes": count * numel * 4, "threads": t,
                                "sync_files": sync, "raw": raw})

    # ------------------------------------------------------------------ issue 13: repeated saves, save sweep

    def case_repeat(self) -> None:
        """Second and later saves / loads of one structure in one process (plan caching)."""
        a = self.args
        side = a.repeat_side
        d = dict(self.uniform(a.repeat_count, side * side, "opt"), shape=[side, side])
        t, k = a.main_threads, a.repeat_iters
        desc = wl.describe(d, self.seed)
        self.log(f"[repeat] {a.repeat_count} fp32 tensors of {side}x{side}, {t} threads, sync_files off: {k} saves "
                 f"and {k} loads per process, the median of the 2nd and later")
        stock_dir, native_dir = self.path("repeat_stock"), self.path("repeat_native")
        common = {"data": d, "threads": t, "iters": k}
        self.setup("stock checkpoint", dict(common, op="write_checkpoint", system="stock", dir=stock_dir))
        self.setup("dcp_native checkpoint", dict(common, op="write_checkpoint", system="native", dir=native_dir))
        save_names = ["stock", "stock_cached", "python", "native", "native_stock_cached", "python_cached",
                      "native_cached", "noio"]
        load_names = ["stock", "python", "native", "python_cached", "native_cached", "noio"]
        save_systems = [
            (n, dict(common, op="repeat_save", system=n, sync=False, verifier="native",
                     dir_template=self.path(f"repeat_save_{n}_{{round}}")))
            for n in save_names
        ]
        load_systems = [
            (n, dict(common, op="repeat_load", system=n, dir=stock_dir if n == "stock" else native_dir))
            for n in load_names
        ]
        save, save_unsupported = self.rounds("repeat_save", save_systems, cleanup=self.rm_save)
        load, load_unsupported = self.rounds("repeat_load", load_systems)
        shutil.rmtree(stock_dir, ignore_errors=True)
        shutil.rmtree(native_dir, ignore_errors=True)
        params = dict(desc, data=d, threads=t, sync_files=False, iters=k,
                      process="one process runs every save (load) of a figure",
                      figure="median of the 2nd and later saves (loads) of the process; the first is `first_seconds`",
                      planner=LONG_LIVED_STORAGE,
                      stock_cached="stock's FileSystemWriter + DefaultSavePlanner(enable_plan_caching=True)",
                      native_stock_cached="dcp_native's writer (native engine) + stock's "
                                          "DefaultSavePlanner(enable_plan_caching=True)",
                      dcp_native_cached="dcp_native's caching save/load planners (found in dcp_native.__all__ at "
                                        "run time), with dcp_native's writer/reader",
                      noio="DCP with a storage layer that does no I/O (DCP's own floor), default planner")
        what = f"{a.repeat_count} tensors of {side}x{side} fp32"
        self.record("repeat_save", f"second and later saves of {what} in one process (sync off)", save,
                    workload="repeat", op="save", kind="time", threads=t,
                    page_cache=self.cache_label("save", sync=False), params=params, tensors=a.repeat_count,
                    unsupported=save_unsupported)
        self.record("repeat_load", f"second and later loads of {what} in one process", load,
                    workload="repeat", op="load", kind="time", threads=t, page_cache=self.cache_label("load"),
                    params=params, tensors=a.repeat_count, unsupported=load_unsupported)

    def case_savesweep(self) -> None:
        """Save of the model state at every thread count, sync off and on, checksums on and off per engine."""
        a = self.args
        d = {"kind": "model", "size": a.sweep_size}
        desc = wl.describe(d, self.seed)
        threads = sorted(set(a.threads) | {a.main_threads})
        self.log(f"[savesweep] model state {fmt_bytes(desc['tensor_bytes'])} in {desc['tensors']} tensors, threads "
                 f"{threads}, sync off/on, {', '.join(SWEEP_SYSTEMS)}")
        params = dict(desc, data=d, raw="pwrite into as many files as threads, one per thread (+ fsync with sync on)",
                      checksums="`*_crc`: checksums=True, `*_nocrc`: checksums=False, set explicitly (the native "
                                "engine's default is on, the Python engine's off)")
        for sync in (False, True):
            for t in threads:
                key = f"savesweep_{'sync' if sync else 'nosync'}_t{t}"
                systems = [
                    (n, {"op": "save", "system": n, "data": d, "threads": t, "sync": sync,
                         "dir_template": self.path(f"{key}_{n}_{{round}}")})
                    for n in SWEEP_SYSTEMS
                ]
                samples, unsupported = self.rounds(key, systems, cleanup=self.rm_save)
                c = self.record(key, f"save the model state ({fmt_bytes(desc['tensor_bytes'])}), {t} threads, "
                                f"sync_files {'on' if sync else 'off'}", samples, workload="savesweep", op="save",
                                kind="throughput", threads=t, page_cache=self.cache_label("save", sync=sync),
                                params=dict(params, sync_files=sync), unsupported=unsupported)
                c["ratios"] = sweep_ratios(c)

    # ------------------------------------------------------------------ issue 14: planning at scale

    def case_planning(self) -> None:
        """Planning at N simulated ranks (benchmarks/planning_scale.py), one process per N (the
        children build the model and check the simulation; this process never imports torch)."""
        a = self.args
        self.log(f"[planning] ranks {a.planning_ranks}, stock's coordinator step capped at {a.planning_cap:g} s")
        rows = []
        for n in a.planning_ranks:
            spec = {"op": "planning", "ranks": n, "quick": a.quick, "reps": a.reps, "cap": a.planning_cap,
                    "max_items": a.planning_max_items, "timeout": a.planning_timeout}
            try:
                rows.append(self.runner.run(dict(self.base_spec(), **spec)))
            except ChildFailed as exc:
                self.fail(f"planning/{n} ranks: FAILED\n{exc}")
                continue
            self.log(f"  planning: {n} ranks done")
        first = rows[0] if rows else {}
        self.cases["planning"] = {
            "title": "planning at scale: N simulated FSDP ranks (coordinator step, metadata, one rank's load plan)",
            "workload": "planning", "op": "plan", "kind": "scale", "threads": None, "device": "cpu",
            "page_cache": "no file I/O (planning only)", "reps": a.reps, "warmup": 0,
            "params": {"model": first.get("model", ""), "layers": first.get("full_layers"), "ranks": a.planning_ranks,
                       "stock_cap_s": a.planning_cap, "max_items": a.planning_max_items,
                       "reps": f"{a.reps} where N ranks have at most {first.get('reps_items', 0):,} write items, else 1",
                       "faithful": first.get("faithful"), "script": "benchmarks/planning_scale.py"},
            "rows": rows, "growth": planning_growth(rows), "systems": {},
        }

    # ------------------------------------------------------------------ resharding

    def case_reshard(self) -> None:
        a = self.args
        n_rows, n_cols = a.reshard_shape
        save_world = 4
        stock_dir, native_dir = self.path("reshard_stock"), self.path("reshard_native")
        common = {"shape": [n_rows, n_cols], "save_world": save_world, "threads": a.main_threads}
        self.log(f"[reshard] {n_rows}x{n_cols} fp32 ({fmt_bytes(n_rows * n_cols * 4)}) saved by {save_world} "
                 f"ranks as Shard(0)")
        self.setup("stock checkpoint", dict(common, op="reshard_save", system="stock", dir=stock_dir))
        self.setup("dcp_native checkpoint", dict(common, op="reshard_save", system="native", dir=native_dir))
        for load_world, key in ((2, "reshard"), (3, "reshard_3")):
            widths = sorted({-(-n_cols // load_world), n_cols - (load_world - 1) * -(-n_cols // load_world)})
            even = len(widths) == 1
            self.log(f"  -> {load_world} ranks as Shard(1): columns per rank {widths}{'' if even else ' (uneven)'}")
            c = dict(common, load_world=load_world, op="reshard_load")
            systems = [
                ("stock", dict(c, system="stock", dir=stock_dir)),
                ("python", dict(c, system="python", dir=native_dir)),
                ("native", dict(c, system="native", dir=native_dir)),
                ("native_on_stock_ckpt", dict(c, system="native", dir=stock_dir)),
                ("raw", dict(c, system="raw", dir=native_dir)),
            ]
            samples, _ = self.rounds(key, systems)
            case = self.record(
                key,
                f"resharded load {n_rows}x{n_cols} fp32, {save_world} ranks Shard(0) -> {load_world} ranks Shard(1)"
                + ("" if even else " (uneven)"),
                samples, workload="reshard", op="load", kind="time", threads=a.main_threads,
                page_cache=self.cache_label("load"),
                params={"shape": [n_rows, n_cols], "save_ranks": save_world, "load_ranks": load_world,
                        "columns_per_rank": widths, "run_bytes": min(widths) * 4,
                        "reader_threads_per_rank": a.main_threads, "backend": "gloo",
                        "time": "max over ranks of the dcp.load call",
                        "rchar": "/proc/self/io rchar delta around the load, summed over ranks "
                                 "(includes .metadata and gloo socket reads)"},
            )
            for name, runs in samples.items():
                if runs:
                    e = case["systems"][name]
                    e["bytes_needed"] = runs[0]["needed"]
                    e["rchar_over_needed"] = summarize([r["rchar"] / r["needed"] for r in runs])
                    if all("bytes_read" in r for r in runs):
                        e["read_over_needed"] = summarize([r["bytes_read"] / r["needed"] for r in runs])
        shutil.rmtree(stock_dir, ignore_errors=True)
        shutil.rmtree(native_dir, ignore_errors=True)

    # ------------------------------------------------------------------ cooperative loads

    def case_cooperative(self) -> None:
        """Cooperative loads (benchmarks/cooperative.py): one set of N rank processes runs every
        load (per case an untimed load per system, then per page-cache state ``--reps`` rounds,
        each starting one system later); one case per (layout, page cache)."""
        import cooperative as coop  # no torch at import: the ranks import it

        a = self.args
        world = a.coop_ranks
        cuda = self.device == "cuda"
        backend = "nccl" if cuda else "gloo"
        if cuda:
            gpus = (self.info.get("gpu") or {}).get("count", 0)
            if gpus < world:
                why = f"NCCL with one GPU per rank needs {world} GPUs (--coop-ranks), {gpus} here"
                self.notes.append(f"cooperative: not run: {why}")
                self.log(f"[cooperative] not run: {why}")
                return
        path = self.path("cooperative")
        ckpt = coop.checkpoint_bytes(a.coop_size)
        tensors = len(coop.tensor_shapes(a.coop_size))
        hsdp_why = coop.hsdp_unsupported(world)
        cases = [c for c in coop.CASES if c != "hsdp" or hsdp_why is None]
        opts = {"path": path, "nbytes": a.coop_size, "seed": self.seed, "cases": cases, "systems": list(coop.SYSTEMS),
                "caches": list(coop.CACHES), "reps": a.reps, "warmup": 1, "threads": a.main_threads,
                "exchange_bytes": 64 * MiB, "engine": "native", "device": self.device}
        self.log(f"[cooperative] {world} {backend} ranks, checkpoint {fmt_bytes(ckpt)} in {tensors} fp32 tensors; "
                 f"{', '.join(cases)}; cold and warm; {', '.join(coop.SYSTEMS)}")
        if hsdp_why:
            self.notes.append(f"cooperative: hsdp not run: {hsdp_why}")
        try:
            sizes = self.runner.run(dict(self.base_spec(), op="cooperative_save", dir=path, threads=a.main_threads,
                                         coop=opts))
            os.sync()
            res = self.runner.run(dict(self.base_spec(), op="cooperative", ranks=world, backend=backend, coop=opts,
                                       timeout=a.coop_timeout + 60, ranks_timeout=a.coop_timeout))
        except ChildFailed as exc:
            self.fail(f"cooperative: FAILED\n{exc}")
            return
        finally:
            shutil.rmtree(path, ignore_errors=True)
        records = res["records"]
        params = {
            "ranks": world, "backend": backend, "checkpoint_bytes": ckpt, "data_file_bytes": sizes["data_file_bytes"],
            "tensors": tensors, "layout": f"{tensors - coop.NORMS} tensors of 1024x1024 fp32 and {coop.NORMS} of "
                                          "64-319 fp32 elements, saved from one process, every tensor whole",
            "reader_threads_per_rank": a.main_threads, "exchange_bytes": opts["exchange_bytes"],
            "native_coop": "dcp_native's FileSystemReader(cooperative=True) over the default process group",
            "time": "max over ranks of the dcp.load call",
            "gbps": "checkpoint tensor bytes / the slowest rank's time (every replica ends up with the whole "
                    "checkpoint)",
            "bytes_read": "dcp_native: its engine's last_read_stats.bytes_read, summed over ranks; stock: "
                          "/proc/self/io rchar around the load, summed over ranks (its data-file reads, .metadata, "
                          "and any socket reads through read())",
            "process": "one set of ranks runs every load of the workload (not a fresh process per figure): per "
                       "case one untimed load per system, then per page-cache state --reps rounds, each starting "
                       "one system later",
            "peak": "VmHWM above the RSS at the start of the load, the largest rank's; in these long-lived ranks, "
                    "memory an earlier load freed and the allocator kept is reused without showing (a lower bound)",
            "one_machine": "the ranks share this machine's disk and page cache: the time shows mostly the cost of "
                           "the exchange over loopback; the bytes not read are what shared storage saves",
            "script": "benchmarks/cooperative.py",
        }
        what = {"replicated": "replicated (DDP-like: every rank loads everything)",
                "hsdp": f"HSDP ({world // 2}x2 mesh, (Replicate(), Shard(0)))"}
        for case in cases:
            for cache in coop.CACHES:
                samples = {s: [r for r in records if (r["case"], r["page_cache"], r["system"]) == (case, cache, s)]
                           for s in coop.SYSTEMS}
                key = f"cooperative_{case}_{cache}"
                c = self.record(key, f"cooperative loads, {what[case]}: {world} ranks, {fmt_bytes(ckpt)} checkpoint, "
                                f"{cache} page cache", samples, workload="cooperative", op="load", kind="cooperative",
                                threads=a.main_threads, page_cache=self.coop_cache_label(cache),
                                params=dict(params, case=case), reps=a.reps, warmup=1)
                c["case"], c["cache"] = case, cache
                for name, e in c["systems"].items():
                    runs = samples[name]
                    e.pop("read_over_needed", None)  # every rank needs the checkpoint: see read_over_ckpt
                    e["rchar_over_ckpt"] = summarize([r["rchar"] / r["bytes"] for r in runs])
                    if all("bytes_read" in r for r in runs):
                        e["read_over_ckpt"] = summarize([r["bytes_read"] / r["bytes"] for r in runs])
                    else:
                        e["read_over_ckpt"] = e["rchar_over_ckpt"]
                        e["read_source"] = "rchar"
                    e["per_rank_last"] = runs[-1]["per_rank"] if runs else {}
        self.log(f"  cooperative: {len(records)} timed loads done")

    @staticmethod
    def coop_cache_label(cache: str) -> str:
        if cache == "cold":
            return ("cold: rank 0 evicts the checkpoint's files before each load (posix_fadvise DONTNEED, plus "
                    "drop_caches if pages survive), residency checked with mincore (`resident_before`); a cache "
                    "below this kernel (the hypervisor's) may still serve reads")
        return ("warm: the checkpoint's files are in the page cache (read by the loads before), residency checked "
                "with mincore (`resident_before`)")

    # ------------------------------------------------------------------ async save, GPU staging

    def case_async(self) -> None:
        a = self.args
        d = self.model_data()
        if self.device != "cuda":
            d = dict(d, size=min(d["size"], ASYNC_CPU_BYTES))
        desc = wl.describe(d, self.seed)
        t = a.main_threads
        self.log(f"[async] async_save of the model state ({fmt_bytes(desc['tensor_bytes'])}) on {self.device}, "
                 f"{t} threads; the second of two saves with one writer is timed")
        systems = [
            (n, {"op": "async_save", "system": n, "data": d, "threads": t,
                 "dir_template": self.path(f"async_{n}_{{round}}")})
            for n in ("stock", "stock_pinned", "python", "native", "raw")
        ]
        samples, unsupported = self.rounds("async", systems, cleanup=self.rm_save)
        pinned = "pinned host memory" if self.device == "cuda" else "memory"
        self.record("async", f"async_save of the model state ({fmt_bytes(desc['tensor_bytes'])}) from {self.device} "
                    "tensors: time the call blocks", samples, workload="async", op="async_save", kind="time",
                    threads=t, page_cache=self.cache_label("save", sync=False), unsupported=unsupported,
                    params=dict(desc, data=d, blocking="until async_save returns and staging has completed",
                                total="until the write has completed",
                                raw=f"a plain copy of every tensor into preallocated, touched {pinned}",
                                stock=f"stock's writer as its own stager (cache_staged_state_dict="
                                      f"{self.device == 'cuda'}: stock's cache is pinned memory, which needs "
                                      "an accelerator)",
                                stock_pinned="stock's writer with async_stager=DefaultStager(use_async_staging="
                                             f"False, pinned/non-blocking: {self.device == 'cuda'}), cached storages",
                                writer="dcp_native: the writer's staging area, reused; first of two saves untimed"))

    def case_stage(self) -> None:
        a = self.args
        d = self.model_data()
        desc = wl.describe(d, self.seed)
        self.log(f"[stage] D2H staging of the model state ({fmt_bytes(desc['tensor_bytes'])})")
        systems = [
            ("torch_pinned", {"op": "transfer", "system": "torch_pinned", "direction": "d2h", "data": d,
                              "threads": a.main_threads, "dir": self.path("xfer")}),
            ("stock", {"op": "transfer", "system": "stock", "direction": "d2h", "data": d,
                       "threads": a.main_threads, "dir": self.path("xfer")}),
            ("native", {"op": "transfer", "system": "native", "direction": "d2h", "data": d,
                        "threads": a.main_threads, "dir": self.path("xfer")}),
        ]
        samples, _ = self.rounds("stage", systems)
        self.record("stage", f"D2H staging of the model state ({fmt_bytes(desc['tensor_bytes'])}): the writer's "
                    "stage() vs torch's pinned copy", samples, workload="stage", op="stage", kind="throughput",
                    threads=a.main_threads, page_cache="no file I/O",
                    params=dict(desc, data=d, torch_pinned="copy_(non_blocking=True) into preallocated pinned "
                                "tensors, one synchronize", writers="stage() with cache_staged_state_dict=True, "
                                "second call timed"))

    # ------------------------------------------------------------------ run

    def run(self, on_progress: Callable[[dict], None] | None = None) -> dict:
        """Run every workload; ``on_progress`` gets the document so far after each one."""
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.t_start = time.perf_counter()
        self.machine = machine_info(self.root)
        try:
            self.info = self.runner.run(dict(self.base_spec(), op="info"))
            self.run_workloads(on_progress)
        except BaseException:
            # Interrupted (SIGTERM from `timeout`, ^C) or failed: kill the measurement
            # processes now rather than wait for the figure in flight.
            self.runner.close(kill=True)
            raise
        finally:
            self.runner.close()
            shutil.rmtree(self.root, ignore_errors=True)
        return self.document(partial=False)

    def run_workloads(self, on_progress: Callable[[dict], None] | None) -> None:
        a = self.args
        machine = self.machine
        if a.device == "auto":
            self.device = "cuda" if self.info.get("cuda_available") else "cpu"
        else:
            self.device = a.device
        if self.device == "cuda" and not self.info.get("cuda_available"):
            raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine "
                             f"(torch {self.info.get('torch')}, built for CUDA {self.info.get('torch_cuda')})")
        requested = a.workload or [w for w in WORKLOADS if self.device == "cuda" or w not in CPU_OPT_IN]
        workloads = [w for w in requested if self.device == "cuda" or w not in CUDA_ONLY]
        skipped = [w for w in requested if w not in workloads]
        if skipped:
            self.notes.append(f"skipped without CUDA: {', '.join(skipped)}")
        if not a.workload and self.device == "cpu" and CPU_OPT_IN:
            self.notes.append(f"not run by default without CUDA: {', '.join(CPU_OPT_IN)} (--workload to run)")
        if self.device == "cuda":
            self.notes.append("CUDA: dcp_native moves device tensors through its pinned staging pipeline (copies "
                              "overlapped with file I/O); raw on CUDA = torch copy through pinned host memory + "
                              "pwrite/pread, not overlapped")
        self.log(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram']} RAM, "
                 f"{machine['filesystem']} at {machine['bench_dir']}, kernel {machine['kernel']}, "
                 f"load average {machine['loadavg_1_5_15']}")
        self.log(f"torch {self.info['torch']}, dcp_native {self.info['dcp_native']}, device {self.device}, "
                 f"isolation {a.isolation}, reps {a.reps} (+{a.warmup} warm-up), thread sweep {a.threads} "
                 f"({a.sweep_reps} rep(s) off {a.main_threads})")
        for w in workloads:
            before = set(self.cases)
            load_before = loadavg()
            try:
                getattr(self, f"case_{w}")()
            except ChildFailed as exc:  # a setup step failed: report it, run the other cases
                self.fail(f"{w} (setup): FAILED\n{exc}")
            # Other work on the machine skews figures: keep the load average next to them.
            for key in set(self.cases) - before:
                self.cases[key]["loadavg_before_after"] = [load_before, loadavg()]
            if on_progress is not None:
                on_progress(self.document(partial=True))

    def document(self, partial: bool) -> dict:
        a = self.args
        machine = dict(self.machine, loadavg_at_end=loadavg())
        if self.info.get("gpu"):
            machine["gpu"] = self.info["gpu"]
        reduced = []
        if a.reps < 5:
            reduced.append(f"{a.reps} timed reps per figure (not 5) to fit the time budget")
        if a.threads and a.sweep_reps < a.reps:
            reduced.append(f"thread-sweep points other than {a.main_threads} threads: {a.sweep_reps} rep(s)")
        if a.warmup == 0:
            reduced.append("no warm-up round: every figure runs in a fresh process, and the files a warm load "
                           "reads are in the page cache from setup (measured per figure: `resident_before`)")
        return {
            "schema": 2,
            "partial": partial,
            "started": self.started.isoformat(timespec="seconds"),
            "duration_s": round(time.perf_counter() - self.t_start, 1),
            "machine": machine,
            "versions": dict(self.info, git=git_info()),
            "device": self.device,
            "engines": {"stock": "torch.distributed.checkpoint FileSystemWriter/FileSystemReader",
                        "python": "dcp_native, DCP_NATIVE_BACKEND=python",
                        "native": "dcp_native, DCP_NATIVE_BACKEND=native (dcp_native._C)"
                                  + ("" if self.info.get("native_engine") else " -- NOT AVAILABLE")},
            "method": {
                "isolation": a.isolation,
                "isolation_note": ("one fresh process per figure, forked from a server that imported torch, DCP and "
                                   "dcp_native and ran nothing else; one server per round" if a.isolation == "fork"
                                   else "one fresh interpreter per figure"),
                "warmup_rounds": a.warmup,
                "reps": a.reps,
                "sweep_threads": a.threads,
                "main_threads": a.main_threads,
                "sweep_reps": a.sweep_reps,
                "reduced": reduced,
                "order": "rounds interleaved across systems; each round starts one system later than the previous",
                "timed_region": "the dcp.save / dcp.load / dcp.async_save call (or the raw I/O) only",
                "page_cache": "stated per case (`page_cache`), measured per figure with mincore (`resident_before`)",
                "check": ("every load compares every loaded value with the seeded pattern that was saved; the "
                          "checkpoint of each system's first save is loaded back and checked (stock's reader for "
                          "dcp_native's checkpoints and dcp_native's for stock's, except the many-tensor case: "
                          "dcp_native's for all)"),
                "seed": self.seed,
                "quick": a.quick,
                "argv": sys.argv[1:],
            },
            "notes": self.notes,
            "cases": self.cases,
            "targets": evaluate_targets(self.cases),
            "errors": self.errors,
        }


# ----------------------------------------------------------------------------- CLI


def parse_shape(text: str) -> tuple[int, int]:
    import re

    m = re.fullmatch(r"(\d+)[xX*,](\d+)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a 2-D shape: {text!r} (e.g. 4096x4096)")
    return int(m.group(1)), int(m.group(2))


def parse_threads(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of thread counts: {text!r} (e.g. 1,2,4,8 or 4)") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1: {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Benchmark stock DCP vs dcp_native (python and native engines) vs raw pread/pwrite.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--workload", action="append", choices=WORKLOADS,
                   help="workload to run (repeatable; default: all" +
                        (" but " + ", ".join(CPU_OPT_IN) + " on CPU" if CPU_OPT_IN else "") +
                        "; GPU-only ones with CUDA)")
    p.add_argument("--size", type=parse_size, default=None,
                   help="bytes of the model workload and of the 64-tensor load/save cases (default 1G; --quick 16M)")
    p.add_argument("--threads", type=parse_threads, default=None,
                   help="thread counts of the model's save/load sweep (default 1,2,4,8); the other cases run at 4 "
                        "if listed, else at the largest; one value runs everything at it, without a sweep")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per figure (default 3; --quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds before the timed ones (default 0)")
    p.add_argument("--sweep-reps", type=int, default=None,
                   help="repetitions of the sweep's other thread counts (default 1)")
    p.add_argument("--phase-rounds", type=int, default=None,
                   help="instrumented rounds of the small case's phase split (default 1)")
    p.add_argument("--many-count", type=int, default=None, help="tensors of the many case (default 10000; --quick 400)")
    p.add_argument("--small-count", type=int, default=None, help="tensors in the small case (default 4000; --quick 200)")
    p.add_argument("--small-bytes", type=parse_size, default=16 * KiB, help="bytes per tensor in the small case")
    p.add_argument("--repeat-count", type=int, default=None,
                   help="tensors of the repeat case (default 10000; --quick 200)")
    p.add_argument("--repeat-side", type=int, default=32, help="the repeat case's tensors are SIDE x SIDE fp32")
    p.add_argument("--repeat-iters", type=int, default=None,
                   help="saves (loads) per process in the repeat case and the small case's long-lived variant; "
                        "the figure is the median of the 2nd and later (default 5; --quick 3)")
    p.add_argument("--sweep-size", type=parse_size, default=None,
                   help="bytes of the model state of the savesweep workload (default 512M; --quick 16M)")
    p.add_argument("--reshard-shape", type=parse_shape, default=None,
                   help="global fp32 shape of the reshard case (default 4096x4096; --quick 256x2048)")
    p.add_argument("--coop-ranks", type=int, default=4,
                   help="ranks of the cooperative workload (gloo; with CUDA, NCCL with one GPU each); the hsdp "
                        "case needs an even number, at least 4")
    p.add_argument("--coop-size", type=parse_size, default=None,
                   help="checkpoint of the cooperative workload, in 4 MiB tensors (default 256M; --quick 8M)")
    p.add_argument("--coop-timeout", type=float, default=600.0,
                   help="seconds the cooperative workload's ranks may take before they are killed")
    p.add_argument("--planning-ranks", type=parse_threads, default=None,
                   help="simulated rank counts of the planning workload (default 64,256,1024; --quick 4,16)")
    p.add_argument("--planning-cap", type=float, default=300.0,
                   help="seconds after which stock's coordinator step is stopped (reported as more than that)")
    p.add_argument("--planning-max-items", type=int, default=4_200_000,
                   help="most write items the N ranks' plans may hold (~640 bytes each); above, the model is reduced")
    p.add_argument("--planning-timeout", type=float, default=1800.0,
                   help="seconds one N of the planning workload may take before its process is killed")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the state dicts live (auto: cuda when torch.cuda.is_available())")
    p.add_argument("--quick", action="store_true", help="tiny run of every case (smoke test)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="where latest.json / .md / .png go")
    p.add_argument("--dir", default=None, help="parent of the scratch directory (default: the system temp dir)")
    p.add_argument("--cache", choices=("warm", "cold"), default="warm",
                   help="page cache of every load (the cold workload is always cold)")
    p.add_argument("--isolation", choices=("fork", "exec"), default="fork",
                   help="fresh process per figure: forked from an import-only server, or a new interpreter")
    p.add_argument("--profile", action="store_true",
                   help="also write a cProfile of one run per system of every save/load case to OUT/profiles/")
    p.add_argument("--no-chart", action="store_true", help="do not draw latest.png")
    p.add_argument("--seed", type=int, default=0, help="seed of the data pattern")
    p.add_argument("--verbose", action="store_true")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    q = args.quick
    # None: the default set, which depends on the device (known once the info child ran).
    args.workload = [w for w in WORKLOADS if w in args.workload] if args.workload else None
    args.size = args.size if args.size is not None else (16 * MiB if q else GiB)
    args.reps = args.reps if args.reps is not None else (1 if q else 3)
    # No warm-up round by default: every figure is a fresh process (nothing to warm in it),
    # and the files a warm load reads are in the page cache since setup (checked per figure).
    args.warmup = args.warmup if args.warmup is not None else 0
    args.sweep_reps = args.sweep_reps if args.sweep_reps is not None else 1
    args.phase_rounds = args.phase_rounds if args.phase_rounds is not None else 1
    args.many_count = args.many_count if args.many_count is not None else (400 if q else 10_000)
    args.small_count = args.small_count if args.small_count is not None else (200 if q else 4000)
    args.repeat_count = args.repeat_count if args.repeat_count is not None else (200 if q else 10_000)
    args.repeat_iters = args.repeat_iters if args.repeat_iters is not None else (3 if q else 5)
    args.sweep_size = args.sweep_size if args.sweep_size is not None else (16 * MiB if q else 512 * MiB)
    args.reshard_shape = args.reshard_shape or ((256, 2048) if q else (4096, 4096))
    args.planning_ranks = args.planning_ranks or ([4, 16] if q else [64, 256, 1024])
    args.coop_size = args.coop_size if args.coop_size is not None else (8 * MiB if q else 256 * MiB)
    args.threads = args.threads or ([1, 2] if q else [1, 2, 4, 8])
    args.main_threads = 4 if 4 in args.threads else max(args.threads)
    if len(args.threads) == 1:
        args.threads = []
    if args.reps < 1 or args.warmup < 0 or args.sweep_reps < 1 or args.phase_rounds < 0:
        raise SystemExit("--reps and --sweep-reps must be >= 1, --warmup and --phase-rounds >= 0")
    if args.many_count < 4:
        raise SystemExit("--many-count must be >= 4")
    if args.repeat_count < 1 or args.repeat_side < 1 or args.repeat_iters < 2:
        raise SystemExit("--repeat-count and --repeat-side must be >= 1, --repeat-iters >= 2 (the figure is the "
                         "2nd and later)")
    if args.coop_ranks < 2 or args.coop_size < 1:
        raise SystemExit("--coop-ranks must be >= 2, --coop-size >= 1")
    if args.reshard_shape[0] % 4:
        raise SystemExit("--reshard-shape: rows must divide by 4 (saved by 4 ranks)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--child", "--child-rank", "--child-server"):
        from dcpbench import ops

        entry = {"--child": ops.child_main, "--child-rank": ops.child_rank_main}.get(argv[0])
        return entry(argv[1]) if entry else ops.child_server_main()
    args = resolve_args(build_parser().parse_args(argv))

    def terminate(signum, frame):  # `timeout` sends SIGTERM: unwind, so the cleanup runs
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)

    def write(doc: dict, chart: bool) -> str:
        doc["chart"] = None
        if chart:
            doc["chart"] = render_chart(doc, os.path.join(args.out, "latest.png"))
        table = render_tables(doc)
        with open(os.path.join(args.out, "latest.json"), "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        with open(os.path.join(args.out, "latest.md"), "w") as f:
            f.write(table + "\n")
        return table

    bench = Bench(args)
    # After each workload the results so far are written (marked partial), so a run that
    # is cut short still leaves its figures.
    doc = bench.run(on_progress=lambda d: write(d, chart=False))
    table = write(doc, chart=not args.no_chart)
    print()
    print(table)
    chart = doc["chart"] or {}
    written = ["latest.json", "latest.md"] + (["latest.png"] if chart.get("path") else [])
    if chart.get("skipped"):
        print(f"latest.png not drawn: {chart['skipped']}")
    print(f"wrote {', '.join(os.path.join(args.out, w) for w in written)}")
    if doc["errors"]:
        print(f"{len(doc['errors'])} figure(s) FAILED (see above and the errors section)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
