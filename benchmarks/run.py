#!/usr/bin/env python3
"""dcp_native benchmark: stock DCP vs dcp_native (Python and native engines) vs raw I/O.

``make bench`` runs this with no arguments (about 5 minutes on a 2-core
machine); ``--quick`` runs every case at tiny size in well under a minute.

Cases (the targets of the core issue):

* ``load``    load N bytes in 64 fp32 tensors (default 1 GiB); also dcp_native
              loading the stock-written checkpoint; raw = preads of the same
              data files, one thread per file, into preallocated memory.
              Peak memory of these loads is the ``peak`` table.
* ``small``   4000 tensors of 16 KiB, save and load; plus DCP's own floor (a
              storage layer that does no I/O) and a per-phase breakdown.
* ``save``    save N bytes in 64 tensors, ``thread_count`` threads, with
              ``sync_files`` off and on; raw = pwrite of the same bytes into
              ``thread_count`` files on as many threads (+ fsync when on).
* ``reshard`` a 2-D tensor saved by 4 gloo ranks as DTensor Shard(0), loaded on
              2 ranks as Shard(1): time, and bytes read versus bytes needed.

Method: every figure comes from a fresh process that has imported torch and
nothing else, so its state is clean and its peak RSS can be read. The timed
region is only the ``dcp.save``/``dcp.load`` call (or the raw I/O); creating
the state dict, allocating and touching destinations and checking the loaded
values are outside it. One warm-up round, then repetitions interleaved across
systems (round 1: stock, python, native, raw; round 2: python, native, raw,
stock; ...: each round starts one system later, so no system always follows
the same one); median, min, max.
Data is a seeded, position-dependent pattern; every load checks every loaded
value and fails loudly otherwise. Reads are warm (files in the page cache)
unless ``--cache cold`` (pages evicted with posix_fadvise(DONTNEED) before
each load).

Process isolation (``--isolation``): ``fork`` (default) starts one server
process per round (``--child-server``: a fresh interpreter that imports torch,
DCP and dcp_native and runs nothing) and forks one child per figure from it, so
state that differs between processes is drawn anew each round; ``exec``
starts a fresh interpreter per figure (``--child``), which is the same
measurement plus about two seconds of ``import torch`` per figure (too slow for
the 5-minute default, fine with ``--quick`` or fewer cases).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import io
import json
import os
import platform
import re
import select
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULT_MARK = "@@RESULT "
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

#: How long one figure (one child process) may take before it is killed.
CHILD_TIMEOUT_S = 600.0
#: Chunk of one raw pread/pwrite call (dcp_native's default unit of work).
RAW_CHUNK = 8 * MiB


# =============================================================================
# Helpers shared by parent and children (no torch)
# =============================================================================


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 256M, 65536)")
    mult = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * mult)


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{int(n)} B"


def proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0) and return that RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status()["VmRSS"]


def rchar() -> int:
    """Bytes this process has passed through read()/pread() & co (all threads)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar")


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages: other work on the machine skews every figure."""
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []


def machine_info(bench_dir: str) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    fs_type, fs_dev, fs_mount = "unknown", "unknown", ""
    real = os.path.realpath(bench_dir)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, typ = line.split()[:3]
                mnt = mnt.replace("\\040", " ")
                inside = mnt == "/" or real == mnt or real.startswith(mnt + "/")
                # The longest mount point containing the directory; a later equal one overmounts.
                if inside and len(mnt) >= len(fs_mount):
                    fs_type, fs_dev, fs_mount = typ, dev, mnt
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "loadavg_1_5_15": loadavg(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "ram_bytes": mem,
        "ram": fmt_bytes(mem),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "bench_dir": real,
        "filesystem": fs_type,
        "filesystem_device": fs_dev,
        "filesystem_mount": fs_mount,
    }


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty_files": [l[3:] for l in git("status", "--porcelain", "--untracked-files=no").splitlines()],
        }
    except (OSError, subprocess.SubprocessError):
        return {}


# =============================================================================
# Child side: everything below runs in a measurement process and uses torch
# =============================================================================

_CHILD_IMPORTED = False


def child_imports() -> None:
    """What the server (or an exec child) imports before any measurement."""
    global _CHILD_IMPORTED
    if _CHILD_IMPORTED:
        return
    import warnings

    # DCP warns on every no_dist save/load; that is not news here.
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.checkpoint.filesystem  # noqa: F401
    import dcp_native  # noqa: F401

    # DTensor imports torch._dynamo on first use (a second per process); load it once here.
    import torch._dynamo  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    try:  # load the extension now so a child does not pay for it inside a timed region
        import dcp_native._engine_native  # noqa: F401
    except ImportError:
        pass
    _CHILD_IMPORTED = True


class timed_threads:
    """Torch intra-op threads: 1 for untimed setup and checks, torch's default inside the timed region.

    Filling and checking the pattern single-threaded keeps them cheap and
    predictable on a busy machine (OpenMP barriers on an oversubscribed CPU
    are slow); what is measured runs with torch's usual thread count.
    """

    default: int | None = None

    @classmethod
    def setup(cls) -> None:
        import torch

        if cls.default is None:
            cls.default = torch.get_num_threads()
        torch.set_num_threads(1)

    def __enter__(self) -> None:
        import torch

        torch.set_num_threads(self.default or torch.get_num_threads())

    def __exit__(self, *exc: Any) -> None:
        import torch

        torch.set_num_threads(1)


def _pattern_offset(seed: int, index: int) -> int:
    # Different per tensor and per seed, small enough that offset + numel < 2**31.
    return (seed * 7919 + index * 1_000_003) % (1 << 20)


def _int_view(t):
    import torch

    return t.reshape(-1).view(torch.int32)


def fill_pattern(t, seed: int, index: int) -> None:
    """Fill an fp32 tensor with value bits = arange + an offset of (seed, index)."""
    import torch

    off = _pattern_offset(seed, index)
    torch.arange(off, off + t.numel(), dtype=torch.int32, out=_int_view(t))


def check_pattern(t, seed: int, index: int, what: str) -> None:
    import torch

    off = _pattern_offset(seed, index)
    got = _int_view(t)
    want = torch.arange(off, off + t.numel(), dtype=torch.int32)
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        i = int(bad[0])
        raise AssertionError(
            f"loaded values differ from what was saved: {what}, {len(bad)} of {t.numel()} "
            f"elements wrong, first at flat index {i}: got bits {int(got[i]):#x}, "
            f"want {int(want[i]):#x}"
        )


def make_state_dict(count: int, numel: int, seed: int, prefix: str, fill: bool = True):
    import torch

    sd = {}
    for i in range(count):
        t = torch.empty(numel, dtype=torch.float32)
        if fill:
            fill_pattern(t, seed, i)
        else:
            _int_view(t).fill_(-1)  # touched; NaN bits a correct load overwrites
        sd[f"{prefix}.{i:05d}"] = t
    return sd


def check_state_dict(sd, seed: int) -> None:
    for i, (k, t) in enumerate(sd.items()):
        check_pattern(t, seed, i, f"tensor {k!r}")


def host_view(t) -> memoryview:
    """A writable memoryview over a CPU tensor's bytes (no numpy needed)."""
    import ctypes

    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def _run_threads(fns: list[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def wrap(fn):
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    pos = 0
    while pos < len(view):
        n = os.pwrite(fd, view[pos : pos + RAW_CHUNK], offset + pos)
        if n <= 0:
            raise OSError(f"pwrite returned {n}")
        pos += n


def _pread_all(fd: int, view: memoryview, offset: int, path: str) -> None:
    pos = 0
    while pos < len(view):
        n = os.preadv(fd, [view[pos : pos + RAW_CHUNK]], offset + pos)
        if n <= 0:
            raise OSError(f"{path}: unexpected end of file at {offset + pos}")
        pos += n


def evict_from_page_cache(directory: str) -> None:
    """Drop the clean cached pages of every file in ``directory`` (cold reads)."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def set_engine(system: str) -> None:
    """python / native select dcp_native's engine; checks the choice took effect."""
    import dcp_native

    os.environ["DCP_NATIVE_BACKEND"] = system
    if dcp_native.backend() != system:
        raise RuntimeError(f"DCP_NATIVE_BACKEND={system} but dcp_native.backend() is {dcp_native.backend()}")


# ----------------------------------------------------------------------------- no-I/O storage


def _noio_classes():
    """A StorageWriter/StorageReader pair that does no I/O: DCP's own floor."""
    import pickle

    from torch.distributed.checkpoint.planner import LoadItemType
    from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
    from torch.futures import Future

    class NoIOWriter(StorageWriter):
        """Resolves every item (as any writer must) and writes nothing."""

        def reset(self, checkpoint_id=None) -> None:
            pass

        def set_up_storage_writer(self, is_coordinator, *args, **kwargs) -> None:
            pass

        def prepare_local_plan(self, plan):
            return plan

        def prepare_global_plan(self, plans):
            return plans

        def write_data(self, plan, planner):
            results = []
            for item in plan.items:
                planner.resolve_data(item)
                results.append(WriteResult(index=item.index, size_in_bytes=0, storage_data=None))
            fut = Future()
            fut.set_result(results)
            return fut

        def finish(self, metadata, results) -> None:
            pass

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id) -> bool:
            return True

    class NoIOReader(StorageReader):
        """Reads the real ``.metadata``; resolves and commits every tensor without reading it."""

        def __init__(self, path: str) -> None:
            super().__init__()
            self.path = path

        def reset(self, checkpoint_id=None) -> None:
            pass

        def read_metadata(self, *args, **kwargs):
            with open(os.path.join(self.path, ".metadata"), "rb") as f:
                return pickle.load(f)

        def set_up_storage_reader(self, metadata, is_coordinator, *args, **kwargs) -> None:
            pass

        def prepare_local_plan(self, plan):
            return plan

        def prepare_global_plan(self, plans):
            return plans

        def read_data(self, plan, planner):
            for req in plan.items:
                if req.type == LoadItemType.BYTE_IO:
                    continue
                target = planner.resolve_tensor(req).detach()
                planner.commit_tensor(req, target)
            fut = Future()
            fut.set_result(None)
            return fut

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id) -> bool:
            return True

    return NoIOWriter, NoIOReader


# ----------------------------------------------------------------------------- phase timing


class PhaseTimer:
    """Accumulates wall time of wrapped methods by label (summed over threads)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def wrap(self, obj: Any, name: str, label: str) -> None:
        fn = getattr(obj, name)

        # functools.wraps keeps the signature visible: DCP inspects planner methods' parameters.
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                with self._lock:
                    self.seconds[label] = self.seconds.get(label, 0.0) + dt
                    self.calls[label] = self.calls.get(label, 0) + 1

        setattr(obj, name, timed)

    def get(self, label: str) -> float:
        return self.seconds.get(label, 0.0)


def _instrument(system: str, storage: Any, planner: Any, save: bool) -> PhaseTimer:
    import torch
    import torch.distributed.checkpoint.filesystem as stock_fs

    pt = PhaseTimer()
    plan_methods = ["set_up_planner", "create_local_plan", "create_global_plan"]
    if save:
        plan_methods.append("finish_plan")
        storage_plan = ["set_up_storage_writer", "prepare_local_plan", "prepare_global_plan"]
        for m in plan_methods:
            pt.wrap(planner, m, "dcp.planner")
        for m in storage_plan:
            pt.wrap(storage, m, "storage.plan")
        pt.wrap(storage, "write_data", "storage.write_data")
        pt.wrap(storage, "finish", "storage.finish")
        pt.wrap(planner, "resolve_data", "write_data.resolve_data")
        if system in ("python", "native"):
            from dcp_native._backend import get_engine

            pt.wrap(get_engine(), "write", "write_data.engine")
        elif system == "stock":
            pt.wrap(stock_fs, "_write_item", "write_data.engine")
    else:
        storage_plan = ["set_up_storage_reader", "prepare_local_plan", "prepare_global_plan"]
        for m in plan_methods:
            pt.wrap(planner, m, "dcp.planner")
        for m in storage_plan:
            pt.wrap(storage, m, "storage.plan")
        pt.wrap(storage, "read_metadata", "storage.read_metadata")
        pt.wrap(storage, "read_data", "storage.read_data")
        for m in ("resolve_tensor", "commit_tensor", "load_bytes"):
            pt.wrap(planner, m, f"read_data.{m}")
        if system in ("python", "native"):
            from dcp_native._backend import get_engine

            pt.wrap(get_engine(), "read", "read_data.engine")
        elif system == "stock":
            pt.wrap(torch, "load", "read_data.engine")
    return pt


def _phase_report(pt: PhaseTimer, total: float, save: bool, overlapped: bool = False) -> dict[str, float | None]:
    """Split ``total`` into disjoint phases (seconds).

    ``overlapped``: the storage layer ran the timed callbacks on several threads
    (stock's writer), so their sums are thread-seconds and ``other`` is unknown.
    """
    out: dict[str, float] = {"total": total, "dcp.planner": pt.get("dcp.planner"), "storage.plan": pt.get("storage.plan")}
    if save:
        wd = pt.get("storage.write_data")
        out["write_data.resolve_data"] = pt.get("write_data.resolve_data")
        out["write_data.engine"] = pt.get("write_data.engine")
        other = wd - out["write_data.resolve_data"] - out["write_data.engine"]
        out["write_data.other"] = None if overlapped else other
        out["storage.finish"] = pt.get("storage.finish")
        storage = out["storage.plan"] + wd + out["storage.finish"]
    else:
        rd = pt.get("storage.read_data")
        out["storage.read_metadata"] = pt.get("storage.read_metadata")
        inner = 0.0
        for k in ("resolve_tensor", "commit_tensor", "load_bytes"):
            out[f"read_data.{k}"] = pt.get(f"read_data.{k}")
            inner += out[f"read_data.{k}"]
        out["read_data.engine"] = pt.get("read_data.engine")
        out["read_data.other"] = rd - inner - out["read_data.engine"]
        storage = out["storage.plan"] + rd + out["storage.read_metadata"]
    out["dcp.other"] = total - out["dcp.planner"] - storage
    return out


# ----------------------------------------------------------------------------- measurements


def _writer(system: str, path: str, threads: int, sync: bool):
    import torch.distributed.checkpoint as dcp

    import dcp_native

    if system == "stock":
        return dcp.FileSystemWriter(path, thread_count=threads, sync_files=sync)
    if system == "noio":
        return _noio_classes()[0]()
    set_engine(system)
    return dcp_native.FileSystemWriter(path, thread_count=threads, sync_files=sync)


def _reader(system: str, path: str, threads: int):
    import torch.distributed.checkpoint as dcp

    import dcp_native

    if system == "stock":
        return dcp.FileSystemReader(path)
    if system == "noio":
        return _noio_classes()[1](path)
    set_engine(system)
    return dcp_native.FileSystemReader(path, thread_count=threads)


def _maybe_profile(spec: dict, fn: Callable[[], Any]) -> Any:
    if not spec.get("profile_to"):
        return fn()
    import cProfile
    import pstats

    prof = cProfile.Profile()
    result = prof.runcall(fn)
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf).strip_dirs()
    buf.write("=== by cumulative time ===\n")
    st.sort_stats("cumulative").print_stats(35)
    buf.write("=== by own time ===\n")
    st.sort_stats("tottime").print_stats(35)
    with open(spec["profile_to"], "w") as f:
        f.write(buf.getvalue())
    return result


def op_write_checkpoint(spec: dict) -> dict:
    """Setup: write a single-process checkpoint (stock or dcp_native's native engine)."""
    import torch.distributed.checkpoint as dcp

    sd = make_state_dict(spec["count"], spec["numel"], spec["seed"], spec["prefix"])
    writer = _writer(spec["system"], spec["dir"], spec["threads"], True)
    t0 = time.perf_counter()
    with timed_threads():
        dcp.save(sd, storage_writer=writer, no_dist=True)
    return {"seconds": time.perf_counter() - t0}


def op_save(spec: dict) -> dict:
    """One timed save: stock / python / native / noio through dcp.save, or raw pwrite."""
    import gc

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    system, path, threads, sync = spec["system"], spec["dir"], spec["threads"], spec["sync"]
    sd = make_state_dict(spec["count"], spec["numel"], spec["seed"], spec["prefix"])
    nbytes = sum(t.nbytes for t in sd.values())
    phases = None
    gc.collect()
    if system == "raw":
        os.makedirs(path, exist_ok=True)
        tensors = list(sd.values())
        groups = [tensors[i::threads] for i in range(threads)]

        def write_file(n: int, group) -> None:
            name = os.path.join(path, f"raw_{n}.bin")
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                off = 0
                for t in group:
                    _pwrite_all(fd, host_view(t), off)
                    off += t.nbytes
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)

        fns = [lambda n=n, g=g: write_file(n, g) for n, g in enumerate(groups) if g]
        rss0 = reset_peak_rss()
        with timed_threads():
            t0 = time.perf_counter()
            _run_threads(fns)
            seconds = time.perf_counter() - t0
    else:
        writer = _writer(system, path, threads, sync)
        planner = DefaultSavePlanner()
        pt = _instrument(system, writer, planner, save=True) if spec.get("phases") else None
        rss0 = reset_peak_rss()
        with timed_threads():
            t0 = time.perf_counter()
            _maybe_profile(spec, lambda: dcp.save(sd, storage_writer=writer, planner=planner, no_dist=True))
            seconds = time.perf_counter() - t0
        if pt is not None:
            phases = _phase_report(pt, seconds, save=True, overlapped=system == "stock" and threads > 1)
    peak = proc_status()["VmHWM"] - rss0
    out = {"seconds": seconds, "bytes": nbytes, "peak_bytes": peak}
    if phases is not None:
        out["phases"] = phases
    return out


def _raw_read_files(path: str, threads: int):
    """Preallocate (and touch) one buffer for all data files; return (buffer, bases, readers)."""
    import torch

    names = sorted(n for n in os.listdir(path) if n.endswith(".distcp"))
    sizes = [os.path.getsize(os.path.join(path, n)) for n in names]
    buf = torch.empty(sum(sizes), dtype=torch.uint8)
    buf.fill_(0xA5)
    view = host_view(buf)
    bases, pos = {}, 0
    for n, s in zip(names, sizes):
        bases[n] = pos
        pos += s

    def read_file(name: str, base: int, size: int) -> None:
        full = os.path.join(path, name)
        fd = os.open(full, os.O_RDONLY)
        try:
            _pread_all(fd, view[base : base + size], 0, full)
        finally:
            os.close(fd)

    fns = [lambda n=n, b=bases[n], s=s: read_file(n, b, s) for n, s in zip(names, sizes)]
    return buf, bases, fns, len(names)


def _payload_locations(path: str) -> dict[str, tuple[str, int]]:
    """fqn (whole, unsharded tensors) -> (data file, payload offset), from .metadata + sidecar."""
    import pickle

    with open(os.path.join(path, ".metadata"), "rb") as f:
        md = pickle.load(f)
    with open(os.path.join(path, ".metadata.dcp_native")) as f:
        side = json.load(f)
    payload = {(rel, e[0]): e[2] for rel, entries in side["items"].items() for e in entries}
    out = {}
    for index, info in md.storage_data.items():
        out[index.fqn] = (info.relative_path, info.offset + payload[(info.relative_path, info.offset)])
    return out


def op_load(spec: dict) -> dict:
    """One timed load: stock / python / native / noio through dcp.load, or raw preads."""
    import gc

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    system, path, threads = spec["system"], spec["dir"], spec["threads"]
    extra: dict[str, Any] = {}
    phases = None
    if system == "raw":
        buf, bases, fns, nfiles = _raw_read_files(path, threads)
        nbytes = spec["count"] * spec["numel"] * 4
        extra["threads"] = nfiles
        if spec.get("cold"):
            evict_from_page_cache(path)
        gc.collect()
        rss0 = reset_peak_rss()
        r0 = rchar()
        with timed_threads():
            t0 = time.perf_counter()
            _run_threads(fns)
            seconds = time.perf_counter() - t0
        extra["rchar"] = rchar() - r0
        peak = proc_status()["VmHWM"] - rss0
        extra["bytes_read"] = buf.numel()
        # Check: every payload in the buffer holds the saved values.
        locs = _payload_locations(path)
        for i in range(spec["count"]):
            fqn = f"{spec['prefix']}.{i:05d}"
            rel, off = locs[fqn]
            start = bases[rel] + off
            got = buf[start : start + spec["numel"] * 4]  # payloads need not be 4-aligned in the file
            want = torch.empty(spec["numel"], dtype=torch.float32)
            fill_pattern(want, spec["seed"], i)
            if not torch.equal(got, want.view(torch.uint8)):
                raise AssertionError(f"raw read of {fqn!r}: bytes differ from what was saved")
    else:
        sd = make_state_dict(spec["count"], spec["numel"], spec["seed"], spec["prefix"], fill=False)
        nbytes = sum(t.nbytes for t in sd.values())
        reader = _reader(system, path, threads)
        planner = DefaultLoadPlanner()
        pt = _instrument(system, reader, planner, save=False) if spec.get("phases") else None
        if spec.get("cold"):
            evict_from_page_cache(path)
        gc.collect()
        rss0 = reset_peak_rss()
        r0 = rchar()
        with timed_threads():
            t0 = time.perf_counter()
            _maybe_profile(spec, lambda: dcp.load(sd, storage_reader=reader, planner=planner, no_dist=True))
            seconds = time.perf_counter() - t0
        extra["rchar"] = rchar() - r0
        peak = proc_status()["VmHWM"] - rss0
        stats = getattr(reader, "last_read_stats", None)
        if stats is not None:
            extra["bytes_read"] = stats.bytes_read
            extra["read_calls"] = stats.calls
        if pt is not None:
            phases = _phase_report(pt, seconds, save=False)
        if system != "noio":
            check_state_dict(sd, spec["seed"])
    out = {"seconds": seconds, "bytes": nbytes, "peak_bytes": peak, **extra}
    if phases is not None:
        out["phases"] = phases
    return out


# ----------------------------------------------------------------------------- multi-rank


def _rank_env(rank: int, world: int) -> None:
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def _global_pattern(rows: slice, cols: slice, n_cols: int, seed: int):
    """Values of the global 2-D tensor at rows x cols (int32 bits): i * C + j + offset."""
    import torch

    off = _pattern_offset(seed, 0)
    r = torch.arange(rows.start, rows.stop, dtype=torch.int64).unsqueeze(1)
    c = torch.arange(cols.start, cols.stop, dtype=torch.int64).unsqueeze(0)
    return (r * n_cols + c + off).to(torch.int32)


def rank_reshard_save(spec: dict, rank: int, world: int) -> dict:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    n_rows, n_cols = spec["shape"]
    per = n_rows // world
    local = _global_pattern(slice(rank * per, (rank + 1) * per), slice(0, n_cols), n_cols, spec["seed"])
    local = local.view(torch.float32).contiguous()
    mesh = init_device_mesh("cpu", (world,))
    dt = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size((n_rows, n_cols)), stride=(n_cols, 1))
    writer = _writer(spec["system"], spec["dir"], 1, True)
    dcp.save({"w": dt}, storage_writer=writer)
    return {}


def _raw_reshard_read(spec: dict, local, c0: int, c1: int, threads: int) -> list[Callable[[], None]]:
    """Preads of exactly the needed runs: for every saved row, columns [c0, c1)."""
    import pickle

    path = spec["dir"]
    n_cols = spec["shape"][1]
    with open(os.path.join(path, ".metadata"), "rb") as f:
        md = pickle.load(f)
    with open(os.path.join(path, ".metadata.dcp_native")) as f:
        side = json.load(f)
    payload = {(rel, e[0]): e[2] for rel, entries in side["items"].items() for e in entries}
    rows_of = {tuple(c.offsets): c.sizes[0] for c in md.state_dict_metadata["w"].chunks}
    chunks = []
    for index, info in md.storage_data.items():
        start = info.offset + payload[(info.relative_path, info.offset)]
        chunks.append((os.path.join(path, info.relative_path), start, index.offset[0], rows_of[tuple(index.offset)]))
    dest = host_view(local)
    run = (c1 - c0) * 4
    dest_row = local.shape[1] * 4

    def read_chunk(full: str, start: int, row0: int, rows: int) -> None:
        fd = os.open(full, os.O_RDONLY)
        try:
            for r in range(rows):
                d = (row0 + r) * dest_row
                _pread_all(fd, dest[d : d + run], start + (r * n_cols + c0) * 4, full)
        finally:
            os.close(fd)

    groups = [chunks[i::threads] for i in range(threads)]
    return [lambda g=g: [read_chunk(*c) for c in g] for g in groups if g]


def rank_reshard_load(spec: dict, rank: int, world: int) -> dict:
    import gc

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    n_rows, n_cols = spec["shape"]
    system = spec["system"]
    width = n_cols // world
    c0, c1 = rank * width, (rank + 1) * width
    local = torch.empty(n_rows, width, dtype=torch.float32)
    _int_view(local).fill_(-1)
    needed = local.nbytes
    mesh = init_device_mesh("cpu", (world,))
    dest = DTensor.from_local(local, mesh, [Shard(1)], run_check=False, shape=torch.Size((n_rows, n_cols)), stride=(n_cols, 1))
    if system == "raw":
        fns = _raw_reshard_read(spec, local, c0, c1, spec["threads"])
        reader = None
    else:
        reader = _reader(system, spec["dir"], spec["threads"])
    gc.collect()
    dist.barrier()
    rss0 = reset_peak_rss()
    r0 = rchar()
    t0 = time.perf_counter()
    if reader is None:
        _run_threads(fns)
    else:
        dcp.load({"w": dest}, storage_reader=reader)
    seconds = time.perf_counter() - t0
    read = rchar() - r0
    peak = proc_status()["VmHWM"] - rss0
    dist.barrier()
    want = _global_pattern(slice(0, n_rows), slice(c0, c1), n_cols, spec["seed"])
    got = local.view(torch.int32)
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        i, j = (int(x) for x in bad[0])
        raise AssertionError(
            f"rank {rank}: loaded values differ from what was saved: {len(bad)} of {got.numel()} "
            f"elements wrong, first at [{i}, {j + c0}]: got bits {int(got[i, j]):#x}, want {int(want[i, j]):#x}"
        )
    out = {"seconds": seconds, "needed": needed, "rchar": read, "peak_bytes": peak}
    if system == "raw":
        out["bytes_read"] = needed
    elif reader is not None and hasattr(reader, "last_read_stats"):
        out["bytes_read"] = reader.last_read_stats.bytes_read
        out["read_calls"] = reader.last_read_stats.calls
    return out


RANK_FUNCS = {"reshard_save": rank_reshard_save, "reshard_load": rank_reshard_load}


def _rank_main(spec: dict, rank: int, world: int) -> dict:
    import datetime as _dt

    import torch
    import torch.distributed as dist

    _rank_env(rank, world)
    # Several ranks share few cores: intra-op threads would only oversubscribe them.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{spec['store']}",
        rank=rank,
        world_size=world,
        timeout=_dt.timedelta(seconds=120),
    )
    try:
        out = RANK_FUNCS[spec["rank_op"]](spec, rank, world)
        return out
    finally:
        dist.destroy_process_group()


def _fork_call(fn: Callable[[], dict]) -> tuple[int, int]:
    """Fork a child that runs fn and writes its JSON result to a pipe: (pid, read fd)."""
    rd, wr = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rd)
        try:
            payload = json.dumps({"ok": fn()})
        except BaseException:  # noqa: BLE001 - everything goes back to the parent
            payload = json.dumps({"error": traceback.format_exc()})
        try:
            data = payload.encode()
            while data:
                data = data[os.write(wr, data) :]
        finally:
            os._exit(0)
    os.close(wr)
    return pid, rd


def _collect_forked(procs: list[tuple[int, int]], timeout: float) -> list[dict]:
    """Read every child's result; kill (by pid) whoever is not done by the deadline."""
    sel = selectors.DefaultSelector()
    bufs: dict[int, bytearray] = {}
    for i, (_, fd) in enumerate(procs):
        sel.register(fd, selectors.EVENT_READ, i)
        bufs[i] = bytearray()
    open_fds = len(procs)
    deadline = time.monotonic() + timeout
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for key, _ in sel.select(left):
            chunk = os.read(key.fd, 1 << 16)
            if chunk:
                bufs[key.data] += chunk
            else:
                sel.unregister(key.fd)
                os.close(key.fd)
                open_fds -= 1
    timed_out = open_fds > 0
    results = []
    for i, (pid, fd) in enumerate(procs):
        if timed_out:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
        if bufs[i]:
            results.append(json.loads(bytes(bufs[i])))
        else:
            why = "timed out" if timed_out else f"died (wait status {status})"
            results.append({"error": f"process {i} {why} without reporting a result"})
    for key in list(sel.get_map().values()):
        os.close(key.fd)
    return results


def _run_ranks(spec: dict, rank_op: str, world: int) -> list[dict]:
    store = os.path.join(spec["bench"], f"store_{os.getpid()}_{time.monotonic_ns()}")
    rspec = dict(spec, rank_op=rank_op, store=store)
    try:
        if spec.get("isolation", "fork") == "fork":
            procs = [_fork_call(lambda r=r: _rank_main(rspec, r, world)) for r in range(world)]
            results = _collect_forked(procs, CHILD_TIMEOUT_S)
        else:
            popens = [
                subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--child-rank", json.dumps(dict(rspec, rank=r, world=world))],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for r in range(world)
            ]
            results = []
            for p in popens:
                try:
                    out, _ = p.communicate(timeout=CHILD_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    p.kill()
                    out, _ = p.communicate()
                results.append(_parse_result(out, p.returncode))
    finally:
        if os.path.exists(store):
            os.unlink(store)
    errors = [f"rank {r}:\n{res['error']}" for r, res in enumerate(results) if "error" in res]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [res["ok"] for res in results]


def op_reshard_save(spec: dict) -> dict:
    _run_ranks(spec, "reshard_save", spec["save_world"])
    return {}


def op_reshard_load(spec: dict) -> dict:
    if spec.get("cold"):
        evict_from_page_cache(spec["dir"])
    ranks = _run_ranks(spec, "reshard_load", spec["load_world"])
    out = {
        "seconds": max(r["seconds"] for r in ranks),
        "needed": sum(r["needed"] for r in ranks),
        "rchar": sum(r["rchar"] for r in ranks),
        "peak_bytes": max(r["peak_bytes"] for r in ranks),
        "per_rank": ranks,
    }
    if all("bytes_read" in r for r in ranks):
        out["bytes_read"] = sum(r["bytes_read"] for r in ranks)
    out["bytes"] = out["needed"]
    return out


def op_info(spec: dict) -> dict:
    import torch

    import dcp_native

    info = {"torch": torch.__version__, "dcp_native": getattr(dcp_native, "__version__", "unknown")}
    os.environ["DCP_NATIVE_BACKEND"] = "native"
    try:
        info["native_engine"] = dcp_native.backend() == "native"
    except Exception as exc:  # noqa: BLE001 - reported, the native rows will then fail
        info["native_engine"] = False
        info["native_error"] = repr(exc)
    info["torch_threads"] = torch.get_num_threads()
    return info


OPS = {
    "info": op_info,
    "write_checkpoint": op_write_checkpoint,
    "save": op_save,
    "load": op_load,
    "reshard_save": op_reshard_save,
    "reshard_load": op_reshard_load,
}


def run_op(spec: dict) -> dict:
    child_imports()
    if spec["op"] not in ("reshard_save", "reshard_load"):
        timed_threads.setup()
    return OPS[spec["op"]](spec)


def _emit(result: dict) -> None:
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def child_main(spec_json: str) -> int:
    """``--child``: one figure in this fresh interpreter."""
    try:
        _emit({"ok": run_op(json.loads(spec_json))})
    except BaseException:  # noqa: BLE001
        _emit({"error": traceback.format_exc()})
    return 0


def child_rank_main(spec_json: str) -> int:
    """``--child-rank``: one rank of a multi-rank figure (exec isolation)."""
    spec = json.loads(spec_json)
    try:
        child_imports()
        _emit({"ok": _rank_main(spec, spec["rank"], spec["world"])})
    except BaseException:  # noqa: BLE001
        _emit({"error": traceback.format_exc()})
    return 0


def child_server_main() -> int:
    """``--child-server``: import once, then fork a fresh child per request (stdin JSON lines)."""
    import gc

    child_imports()
    # Children would otherwise walk (and copy-on-write) every object of the imports on gc.
    gc.collect()
    gc.freeze()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        spec = json.loads(line)
        procs = [_fork_call(lambda: run_op(spec))]
        (res,) = _collect_forked(procs, spec.get("timeout", CHILD_TIMEOUT_S))
        _emit(res)
    return 0


def _parse_result(stdout: str, returncode: int | None) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    return {"error": f"child exited with {returncode} without a result; output:\n{stdout[-2000:]}"}


# =============================================================================
# Parent side: runs figures in children, aggregates, reports (never imports torch)
# =============================================================================


class ChildFailed(RuntimeError):
    pass


class _Server:
    """One ``--child-server`` process and the unread part of its output."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child-server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # its own process group: it and its children die together
        )
        self.pending = b""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, kill: bool = False) -> None:
        proc = self.proc
        if kill:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            try:
                proc.stdin.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class Runner:
    """Runs one figure per fresh process, forked from a server (default) or by exec.

    With fork isolation there is one server per round (``slot``): a process's
    own state that differs from process to process (glibc malloc's, for one,
    which decides whether stock's 16 MiB temporaries are recycled or fresh,
    page-faulting memory: 0.32 s or 0.6 s for the same 1 GiB load) is then
    drawn once per round, as a fresh interpreter per figure would draw it,
    rather than once for the whole run.
    """

    def __init__(self, isolation: str, verbose: bool) -> None:
        self.isolation = isolation
        self.verbose = verbose
        self.servers: dict[int, _Server] = {}

    def close(self) -> None:
        servers, self.servers = self.servers, {}
        for srv in servers.values():
            srv.stop()

    def run(self, spec: dict, slot: int = 0) -> dict:
        spec = dict(spec, isolation=self.isolation)
        res = self._run_fork(spec, slot) if self.isolation == "fork" else self._run_exec(spec)
        if "error" in res:
            raise ChildFailed(res["error"])
        return res["ok"]

    def _run_exec(self, spec: dict) -> dict:
        try:
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                stdout=subprocess.PIPE,
                text=True,
                timeout=CHILD_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"child timed out after {CHILD_TIMEOUT_S} s"}
        return _parse_result(proc.stdout, proc.returncode)

    def _run_fork(self, spec: dict, slot: int) -> dict:
        srv = self.servers.get(slot)
        if srv is None or not srv.alive():
            srv = self.servers[slot] = _Server()
        try:
            srv.proc.stdin.write((json.dumps(spec) + "\n").encode())
            srv.proc.stdin.flush()
        except BrokenPipeError:
            self.servers.pop(slot).stop(kill=True)
            return {"error": "the child server exited unexpectedly"}
        fd = srv.proc.stdout.fileno()
        deadline = time.monotonic() + CHILD_TIMEOUT_S + 30
        # Raw reads and our own line splitting: a buffered reader could hold the
        # result line while select() waits on an empty pipe.
        while True:
            while b"\n" in srv.pending:
                line, srv.pending = srv.pending.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(RESULT_MARK):
                    return json.loads(text[len(RESULT_MARK) :])
                if self.verbose:
                    sys.stderr.write(text + "\n")
            left = deadline - time.monotonic()
            if left <= 0:
                self.servers.pop(slot).stop(kill=True)
                return {"error": "timed out waiting for the child server"}
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self.servers.pop(slot).stop(kill=True)
                return {"error": "the child server exited unexpectedly"}
            srv.pending += chunk


def summarize(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "samples": values,
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runner = Runner(args.isolation, args.verbose)
        self.root = tempfile.mkdtemp(prefix="dcp_native_bench_", dir=args.dir)
        self.cases: dict[str, dict] = {}
        self.errors: list[str] = []
        self.seed = args.seed
        self.t0 = time.perf_counter()

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)

    def base_spec(self) -> dict:
        return {"bench": self.root, "seed": self.seed, "cold": self.args.cache == "cold"}

    def setup(self, what: str, spec: dict) -> None:
        t0 = time.perf_counter()
        self.runner.run(dict(self.base_spec(), **spec))
        os.sync()  # clean pages, and no writeback left over for the timed figures
        if self.args.verbose:
            self.log(f"  setup {what}: {time.perf_counter() - t0:.1f} s")

    def rounds(
        self,
        case: str,
        systems: list[tuple[str, dict]],
        cleanup: Callable[[dict], None] | None = None,
    ) -> dict[str, list[dict]]:
        """Warm-up round(s), then ``reps`` rounds interleaved across systems."""
        samples: dict[str, list[dict]] = {name: [] for name, _ in systems}
        failed: set[str] = set()
        total = self.args.warmup + self.args.reps
        for rnd in range(total):
            warm = rnd < self.args.warmup
            # Each round starts one system later (stock, python, native, raw; python,
            # native, raw, stock; ...) so no system always runs right after the same one.
            shift = rnd % len(systems)
            for name, spec in systems[shift:] + systems[:shift]:
                if name in failed:
                    continue
                full = dict(self.base_spec(), **spec)
                if "dir_template" in full:
                    full["dir"] = full.pop("dir_template").format(round=rnd)
                try:
                    res = self.runner.run(full, slot=rnd)
                except ChildFailed as exc:
                    failed.add(name)
                    msg = f"{case}/{name}: FAILED\n{exc}"
                    self.errors.append(msg)
                    print(msg, file=sys.stderr, flush=True)
                    continue
                finally:
                    if cleanup is not None:
                        cleanup(full)
                if not warm:
                    samples[name].append(res)
            label = "warm-up" if warm else f"rep {rnd - self.args.warmup + 1}/{self.args.reps}"
            self.log(f"  {case}: {label} done")
        return samples

    # ------------------------------------------------------------------ cases

    def case_load(self) -> None:
        a = self.args
        count = 64
        numel = max(1, a.size // 4 // count)
        stock_dir = os.path.join(self.root, "load_stock")
        native_dir = os.path.join(self.root, "load_native")
        common = {"count": count, "numel": numel, "prefix": "layer", "threads": a.threads}
        self.log(f"[load] {fmt_bytes(count * numel * 4)} in {count} fp32 tensors, {a.threads} threads")
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
        samples = self.rounds("load", systems)
        shutil.rmtree(stock_dir, ignore_errors=True)
        shutil.rmtree(native_dir, ignore_errors=True)
        self.cases["load"] = self._throughput_case(
            "load",
            f"load {fmt_bytes(count * numel * 4)} in {count} fp32 tensors",
            samples,
            params={"tensors": count, "tensor_bytes": numel * 4, "total_bytes": count * numel * 4,
                    "reader_threads": a.threads, "raw_threads": "one per data file",
                    "page_cache": self.page_cache_label()},
        )
        peak = {}
        for name, runs in samples.items():
            if runs:
                peak[name] = {"peak_mib": summarize([r["peak_bytes"] / MiB for r in runs])}
        self.cases["peak"] = {
            "title": f"peak RSS above the destination tensors during the load of {fmt_bytes(count * numel * 4)}",
            "unit": "MiB",
            "params": {"measured": "VmHWM minus VmRSS after the destination is allocated and touched (peak reset via /proc/self/clear_refs)"},
            "systems": peak,
        }

    def case_small(self) -> None:
        a = self.args
        count, numel = a.small_count, max(1, a.small_bytes // 4)
        common = {"count": count, "numel": numel, "prefix": "opt", "threads": a.threads}
        self.log(f"[small] {count} fp32 tensors of {fmt_bytes(numel * 4)}, {a.threads} threads, sync_files off")
        stock_dir = os.path.join(self.root, "small_stock")
        native_dir = os.path.join(self.root, "small_native")
        self.setup("stock checkpoint", dict(common, op="write_checkpoint", system="stock", dir=stock_dir))
        self.setup("dcp_native checkpoint", dict(common, op="write_checkpoint", system="native", dir=native_dir))

        def rm(spec: dict) -> None:
            if spec.get("op") == "save":
                shutil.rmtree(spec["dir"], ignore_errors=True)
                os.sync()

        names = ["stock", "python", "native", "noio", "raw"]
        save_systems = [
            (n, dict(common, op="save", system=n, sync=False,
                     dir_template=os.path.join(self.root, f"small_save_{n}_{{round}}")))
            for n in names
        ]
        load_systems = [
            (n, dict(common, op="load", system=n, dir=stock_dir if n == "stock" else native_dir))
            for n in names
        ]
        save = self.rounds("small_save", save_systems, cleanup=rm)
        load = self.rounds("small_load", load_systems)

        # Where the time goes: up to 3 more rounds with every phase timed (medians per phase;
        # kept apart from the figures above so the wrappers do not touch them), and with
        # --profile one more cProfiled run per system (profilers distort phase times).
        phase_runs: dict[str, dict[str, list[dict]]] = {"save": {}, "load": {}}
        failed: set[tuple[str, str]] = set()
        rounds = [("phases", r) for r in range(min(a.reps, 3))] + ([("profile", 0)] if a.profile else [])
        for what, rnd in rounds:
            for kind, systems in (("save", save_systems), ("load", load_systems)):
                shift = rnd % len(systems)
                for name, spec in systems[shift:] + systems[:shift]:
                    if name == "raw" or (kind, name) in failed:
                        continue
                    full = dict(self.base_spec(), **spec, phases=what == "phases")
                    if "dir_template" in full:
                        full["dir"] = full.pop("dir_template").format(round=f"{what}{rnd}")
                    if what == "profile":
                        os.makedirs(a.out, exist_ok=True)
                        full["profile_to"] = os.path.join(a.out, f"profile_small_{kind}_{name}.txt")
                    try:
                        res = self.runner.run(full, slot=self.args.warmup + rnd)
                        if what == "phases":
                            phase_runs[kind].setdefault(name, []).append(res["phases"])
                    except ChildFailed as exc:
                        failed.add((kind, name))
                        self.errors.append(f"small_{kind}/{name} ({what}): FAILED\n{exc}")
                        print(self.errors[-1], file=sys.stderr, flush=True)
                    finally:
                        rm(full)
            self.log(f"  small phases: {what} round {rnd + 1} done")
        phases: dict[str, dict[str, dict]] = {"save": {}, "load": {}}
        for kind, by_system in phase_runs.items():
            for name, runs in by_system.items():
                med: dict[str, float | None] = {}
                for label in runs[0]:
                    vals = [r[label] for r in runs if r.get(label) is not None]
                    med[label] = statistics.median(vals) if vals else None
                phases[kind][name] = med
        shutil.rmtree(stock_dir, ignore_errors=True)
        shutil.rmtree(native_dir, ignore_errors=True)
        params = {"tensors": count, "tensor_bytes": numel * 4, "threads": a.threads, "sync_files": False,
                  "noio": "DCP with a storage layer that does no I/O (planning floor)",
                  "page_cache": self.page_cache_label()}
        self.cases["small_save"] = self._time_case(
            "small_save", f"save {count} tensors of {fmt_bytes(numel * 4)} (sync off)", save, params, phases["save"])
        self.cases["small_load"] = self._time_case(
            "small_load", f"load {count} tensors of {fmt_bytes(numel * 4)}", load, params, phases["load"])

    def case_save(self) -> None:
        a = self.args
        count = 64
        numel = max(1, a.size // 4 // count)
        common = {"count": count, "numel": numel, "prefix": "layer", "threads": a.threads}
        self.log(f"[save] {fmt_bytes(count * numel * 4)} in {count} fp32 tensors, {a.threads} threads, sync_files off/on")

        def rm(spec: dict) -> None:
            shutil.rmtree(spec["dir"], ignore_errors=True)
            os.sync()

        for sync in (False, True):
            key = "save_sync" if sync else "save_nosync"
            systems = [
                (n, dict(common, op="save", system=n, sync=sync,
                         dir_template=os.path.join(self.root, f"{key}_{n}_{{round}}")))
                for n in ("stock", "python", "native", "raw")
            ]
            samples = self.rounds(key, systems, cleanup=rm)
            self.cases[key] = self._throughput_case(
                key,
                f"save {fmt_bytes(count * numel * 4)} in {count} tensors, {a.threads} threads, sync_files {'on' if sync else 'off'}",
                samples,
                params={"tensors": count, "total_bytes": count * numel * 4, "threads": a.threads,
                        "sync_files": sync, "raw": f"pwrite into {a.threads} files on {a.threads} threads" + (" + fsync" if sync else ""),
                        "target_dir": "fresh directory per save; deleted and os.sync() between figures"},
            )

    def case_reshard(self) -> None:
        a = self.args
        n_rows, n_cols = a.reshard_shape
        save_world, load_world = 4, 2
        if n_rows % save_world or n_cols % load_world:
            raise SystemExit(f"--reshard-shape rows must divide by {save_world} and cols by {load_world}")
        common = {"shape": [n_rows, n_cols], "save_world": save_world, "load_world": load_world, "threads": a.threads}
        run = n_cols // load_world * 4
        self.log(f"[reshard] {n_rows}x{n_cols} fp32 ({fmt_bytes(n_rows * n_cols * 4)}): {save_world} ranks Shard(0) -> "
                 f"{load_world} ranks Shard(1); each needed run {fmt_bytes(run)}")
        stock_dir = os.path.join(self.root, "reshard_stock")
        native_dir = os.path.join(self.root, "reshard_native")
        self.setup("stock checkpoint", dict(common, op="reshard_save", system="stock", dir=stock_dir))
        self.setup("dcp_native checkpoint", dict(common, op="reshard_save", system="native", dir=native_dir))
        systems = [
            ("stock", dict(common, op="reshard_load", system="stock", dir=stock_dir)),
            ("python", dict(common, op="reshard_load", system="python", dir=native_dir)),
            ("native", dict(common, op="reshard_load", system="native", dir=native_dir)),
            ("native_on_stock_ckpt", dict(common, op="reshard_load", system="native", dir=stock_dir)),
            ("raw", dict(common, op="reshard_load", system="raw", dir=native_dir)),
        ]
        samples = self.rounds("reshard", systems)
        shutil.rmtree(stock_dir, ignore_errors=True)
        shutil.rmtree(native_dir, ignore_errors=True)
        out: dict[str, Any] = {
            "title": f"resharded load {n_rows}x{n_cols} fp32, {save_world} ranks Shard(0) -> {load_world} ranks Shard(1)",
            "unit": "s",
            "params": {"shape": [n_rows, n_cols], "save_ranks": save_world, "load_ranks": load_world,
                       "run_bytes": run, "reader_threads_per_rank": a.threads, "backend": "gloo",
                       "time": "max over ranks of the dcp.load call",
                       "rchar": "/proc/self/io rchar delta around the load, summed over ranks (includes .metadata and gloo socket reads)",
                       "page_cache": self.page_cache_label()},
            "systems": {},
        }
        for name, runs in samples.items():
            if not runs:
                continue
            entry = {
                "seconds": summarize([r["seconds"] for r in runs]),
                "bytes_needed": runs[0]["needed"],
                "rchar": summarize([r["rchar"] for r in runs]),
                "rchar_over_needed": summarize([r["rchar"] / r["needed"] for r in runs]),
                "peak_mib": summarize([r["peak_bytes"] / MiB for r in runs]),
            }
            if all("bytes_read" in r for r in runs):
                entry["bytes_read"] = summarize([r["bytes_read"] for r in runs])
                entry["read_over_needed"] = summarize([r["bytes_read"] / r["needed"] for r in runs])
            out["systems"][name] = entry
        self.cases["reshard"] = out

    # ------------------------------------------------------------------ aggregation

    def page_cache_label(self) -> str:
        if self.args.cache == "cold":
            return ("cold: data files evicted with posix_fadvise(POSIX_FADV_DONTNEED) before each load "
                    "(a cache below this kernel, e.g. the hypervisor's, may still serve reads)")
        return "warm: data files in the page cache (written in setup, read again in the warm-up round)"

    def _throughput_case(self, key: str, title: str, samples: dict[str, list[dict]], params: dict) -> dict:
        systems = {}
        for name, runs in samples.items():
            if not runs:
                continue
            entry = {
                "seconds": summarize([r["seconds"] for r in runs]),
                "gbps": summarize([r["bytes"] / r["seconds"] / 1e9 for r in runs]),
                "bytes": runs[0]["bytes"],
                "peak_mib": summarize([r["peak_bytes"] / MiB for r in runs]),
            }
            for k in ("bytes_read", "rchar", "read_calls"):
                if all(k in r for r in runs):
                    entry[k] = summarize([r[k] for r in runs])
            systems[name] = entry
        return {"title": title, "unit": "GB/s", "params": params, "systems": systems}

    def _time_case(self, key: str, title: str, samples: dict[str, list[dict]], params: dict, phases: dict) -> dict:
        systems = {}
        for name, runs in samples.items():
            if not runs:
                continue
            count = params["tensors"]
            entry = {
                "seconds": summarize([r["seconds"] for r in runs]),
                "us_per_tensor": summarize([r["seconds"] / count * 1e6 for r in runs]),
                "gbps": summarize([r["bytes"] / r["seconds"] / 1e9 for r in runs]),
                "peak_mib": summarize([r["peak_bytes"] / MiB for r in runs]),
            }
            if name in phases:
                entry["phases_s"] = phases[name]
            systems[name] = entry
        return {"title": title, "unit": "s", "params": params, "systems": systems}

    def run(self) -> dict:
        a = self.args
        started = datetime.datetime.now(datetime.timezone.utc)
        t_start = time.perf_counter()
        info = self.runner.run(dict(self.base_spec(), op="info"))
        machine = machine_info(self.root)
        self.log(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram']} RAM, "
                 f"{machine['filesystem']} at {machine['bench_dir']}, kernel {machine['kernel']}, "
                 f"load average {machine['loadavg_1_5_15']}")
        self.log(f"torch {info['torch']}, dcp_native {info['dcp_native']}, isolation {a.isolation}, "
                 f"reps {a.reps} (+{a.warmup} warm-up), page cache {a.cache}")
        try:
            for w in a.workload:
                case = {"load": self.case_load, "small": self.case_small, "save": self.case_save,
                        "reshard": self.case_reshard}[w]
                before = set(self.cases)
                load_before = loadavg()
                try:
                    case()
                except ChildFailed as exc:  # a setup step failed: report it, run the other cases
                    self.errors.append(f"{w} (setup): FAILED\n{exc}")
                    print(self.errors[-1], file=sys.stderr, flush=True)
                # Other work on the machine skews figures: keep the load average next to them.
                for key in set(self.cases) - before:
                    self.cases[key]["loadavg_before_after"] = [load_before, loadavg()]
        finally:
            self.runner.close()
            shutil.rmtree(self.root, ignore_errors=True)
        machine["loadavg_at_end"] = loadavg()
        return {
            "schema": 1,
            "started": started.isoformat(timespec="seconds"),
            "duration_s": round(time.perf_counter() - t_start, 1),
            "machine": machine,
            "versions": dict(info, **{"git": git_info()}),
            "method": {
                "isolation": a.isolation,
                "isolation_note": ("one fresh process per figure, forked from a server that imported torch, DCP and "
                                   "dcp_native and ran nothing else; one server per round" if a.isolation == "fork"
                                   else "one fresh interpreter per figure"),
                "warmup_rounds": a.warmup,
                "reps": a.reps,
                "order": "rounds interleaved across systems; each round starts one system later than the previous",
                "timed_region": "the dcp.save / dcp.load call (or the raw I/O) only",
                "page_cache": self.page_cache_label(),
                "check": "every load compares every loaded value with the seeded pattern that was saved",
                "seed": self.seed,
                "quick": a.quick,
                "argv": sys.argv[1:],
            },
            "cases": self.cases,
            "targets": evaluate_targets(self.cases),
            "errors": self.errors,
        }


# ----------------------------------------------------------------------------- targets & tables


def _med(cases: dict, case: str, system: str, field: str) -> float | None:
    try:
        return cases[case]["systems"][system][field]["median"]
    except KeyError:
        return None


def evaluate_targets(cases: dict) -> list[dict]:
    out: list[dict] = []

    def add(name: str, value: float | None, op: str, limit: float, unit: str) -> None:
        if value is None:
            return
        ok = value >= limit if op == ">=" else value <= limit
        out.append({"target": name, "value": value, "op": op, "limit": limit, "unit": unit, "met": ok})

    def ratio_tp(case, a, b):
        x, y = _med(cases, case, a, "gbps"), _med(cases, case, b, "gbps")
        return None if x is None or y is None else x / y

    def ratio_time(case, a, b):  # speed-up of a over b
        x, y = _med(cases, case, a, "seconds"), _med(cases, case, b, "seconds")
        return None if x is None or y is None else y / x

    add("load: native vs stock", ratio_tp("load", "native", "stock"), ">=", 5.0, "x")
    add("load: native vs raw", ratio_tp("load", "native", "raw"), ">=", 0.70, "of raw")
    add("load: python vs stock", ratio_tp("load", "python", "stock"), ">=", 1.0, "x")
    for e in ("python", "native"):
        add(f"small save: {e} vs stock", ratio_time("small_save", e, "stock"), ">=", 3.0 if e == "native" else 1.0, "x")
        add(f"small load: {e} vs stock", ratio_time("small_load", e, "stock"), ">=", 3.0 if e == "native" else 1.0, "x")
    add("save sync off: native vs stock", ratio_tp("save_nosync", "native", "stock"), ">=", 1.3, "x")
    add("save sync off: python vs stock", ratio_tp("save_nosync", "python", "stock"), ">=", 1.0, "x")
    add("save sync on: native vs raw", ratio_tp("save_sync", "native", "raw"), ">=", 0.90, "of raw")
    add("save sync on: python vs stock", ratio_tp("save_sync", "python", "stock"), ">=", 1.0, "x")
    for e in ("python", "native", "native_on_stock_ckpt"):
        add(f"reshard: {e} bytes read / needed", _med(cases, "reshard", e, "read_over_needed"), "<=", 1.1, "x")
    add("reshard: python vs stock (time)", ratio_time("reshard", "python", "stock"), ">=", 1.0, "x")
    for e in ("python", "native"):
        add(f"peak: {e} above destination", _med(cases, "peak", e, "peak_mib"), "<=", 64.0, "MiB")
    return out


def _fmt_num(v: float, digits: int = 3) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits - 1}f}" if abs(v) >= 1 else f"{v:.{digits}f}"


def _spread(s: dict, scale: float = 1.0) -> tuple[str, str]:
    return _fmt_num(s["median"] * scale), f"{_fmt_num(s['min'] * scale)}–{_fmt_num(s['max'] * scale)}"


SYSTEM_LABELS = {
    "stock": "stock DCP",
    "python": "dcp_native python",
    "native": "dcp_native native",
    "python_on_stock_ckpt": "dcp_native python, stock-written ckpt",
    "native_on_stock_ckpt": "dcp_native native, stock-written ckpt",
    "noio": "DCP floor (no-I/O storage)",
    "raw": "raw pread/pwrite",
}


def render_tables(doc: dict) -> str:
    cases = doc["cases"]
    lines: list[str] = []
    m = doc["machine"]
    v = doc["versions"]
    lines.append("# dcp_native benchmark")
    lines.append("")
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, kernel {m['kernel']}, "
                 f"bench dir on {m['filesystem']} ({m['filesystem_device']}).  ")
    lines.append(f"torch {v['torch']}, dcp_native {v['dcp_native']}"
                 + (f" (git {v['git'].get('commit', '')[:10]})" if v.get("git") else "")
                 + f"; {doc['method']['reps']} reps after {doc['method']['warmup_rounds']} warm-up round(s), "
                 f"interleaved; median with min–max; isolation: {doc['method']['isolation']}; "
                 f"run took {doc['duration_s']} s; load average {m.get('loadavg_1_5_15')} at start, "
                 f"{m.get('loadavg_at_end')} at end.  ")
    lines.append(f"Page cache: {doc['method']['page_cache']}.")
    lines.append("")

    def header(c: dict) -> None:
        lines.append(f"## {c['title']}")
        lines.append("")
        la = c.get("loadavg_before_after")
        if la and la[0] and la[1]:
            lines.append(f"Load average (1 min) {la[0][0]:.2f} before, {la[1][0]:.2f} after.")
            lines.append("")

    def tp_table(key: str) -> None:
        c = cases.get(key)
        if not c:
            return
        header(c)
        lines.append("| system | GB/s (median) | min–max | ratio vs stock | % of raw | peak MiB |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        stock = c["systems"].get("stock", {}).get("gbps", {}).get("median")
        raw = c["systems"].get("raw", {}).get("gbps", {}).get("median")
        for name, e in c["systems"].items():
            med, rng = _spread(e["gbps"])
            ratio = f"{e['gbps']['median'] / stock:.2f}x" if stock else "–"
            pct = f"{100 * e['gbps']['median'] / raw:.0f}%" if raw else "–"
            lines.append(f"| {SYSTEM_LABELS.get(name, name)} | {med} | {rng} | {ratio} | {pct} | "
                         f"{_fmt_num(e['peak_mib']['median'])} |")
        lines.append("")

    def time_table(key: str) -> None:
        c = cases.get(key)
        if not c:
            return
        header(c)
        lines.append("| system | ms (median) | min–max | µs/tensor | speed-up vs stock | % of raw | peak MiB |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        stock = c["systems"].get("stock", {}).get("seconds", {}).get("median")
        raw = c["systems"].get("raw", {}).get("seconds", {}).get("median")
        for name, e in c["systems"].items():
            med, rng = _spread(e["seconds"], 1e3)
            ratio = f"{stock / e['seconds']['median']:.2f}x" if stock else "–"
            pct = f"{100 * raw / e['seconds']['median']:.0f}%" if raw else "–"
            lines.append(f"| {SYSTEM_LABELS.get(name, name)} | {med} | {rng} | "
                         f"{_fmt_num(e['us_per_tensor']['median'])} | {ratio} | {pct} | "
                         f"{_fmt_num(e['peak_mib']['median'])} |")
        lines.append("")

    tp_table("load")
    if "peak" in cases:
        c = cases["peak"]
        header(c)
        lines.append("| system | MiB above destination (median) | min–max |")
        lines.append("|---|---:|---:|")
        for name, e in c["systems"].items():
            med, rng = _spread(e["peak_mib"])
            lines.append(f"| {SYSTEM_LABELS.get(name, name)} | {med} | {rng} |")
        lines.append("")
    time_table("small_save")
    time_table("small_load")
    for key in ("small_save", "small_load"):
        c = cases.get(key)
        if not c:
            continue
        names = [n for n in c["systems"] if "phases_s" in c["systems"][n]]
        if not names:
            continue
        labels: list[str] = []
        for n in names:
            for k in c["systems"][n]["phases_s"]:
                if k not in labels:
                    labels.append(k)
        lines.append(f"### where the time goes: {c['title']} (ms, median of instrumented runs)")
        lines.append("")
        lines.append("| phase | " + " | ".join(SYSTEM_LABELS.get(n, n) for n in names) + " |")
        lines.append("|---|" + "---:|" * len(names))
        for k in labels:
            row = []
            for n in names:
                v = c["systems"][n]["phases_s"].get(k, 0.0)
                row.append("n/a (threads)" if v is None else _fmt_num(v * 1e3))
            lines.append(f"| {k} | " + " | ".join(row) + " |")
        lines.append("")
        lines.append(PHASE_NOTE)
        lines.append("")
    tp_table("save_nosync")
    tp_table("save_sync")
    c = cases.get("reshard")
    if c:
        header(c)
        lines.append(f"Each needed run is {fmt_bytes(c['params']['run_bytes'])}; bytes needed = both ranks' destinations; "
                     "time = slowest rank's dcp.load.")
        lines.append("")
        lines.append("| system | ms (median) | min–max | speed-up vs stock | bytes read / needed (engine) | rchar / needed | peak MiB |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        stock = c["systems"].get("stock", {}).get("seconds", {}).get("median")
        for name, e in c["systems"].items():
            med, rng = _spread(e["seconds"], 1e3)
            ratio = f"{stock / e['seconds']['median']:.2f}x" if stock else "–"
            br = f"{e['read_over_needed']['median']:.3f}" if "read_over_needed" in e else "–"
            lines.append(f"| {SYSTEM_LABELS.get(name, name)} | {med} | {rng} | {ratio} | {br} | "
                         f"{e['rchar_over_needed']['median']:.3f} | {_fmt_num(e['peak_mib']['median'])} |")
        lines.append("")
    if doc.get("targets"):
        lines.append("## targets")
        lines.append("")
        lines.append("| target | measured | required | met |")
        lines.append("|---|---:|---:|:-:|")
        for t in doc["targets"]:
            if t["unit"] == "of raw":
                val, lim = f"{100 * t['value']:.0f}% of raw", f"{t['op']} {100 * t['limit']:.0f}%"
            elif t["unit"] == "MiB":
                val, lim = f"{t['value']:.1f} MiB", f"{t['op']} {t['limit']:.0f} MiB"
            else:
                val, lim = f"{t['value']:.2f}x", f"{t['op']} {t['limit']:.2f}x"
            lines.append(f"| {t['target']} | {val} | {lim} | {'yes' if t['met'] else '**no**'} |")
        lines.append("")
    if doc.get("errors"):
        lines.append("## errors")
        lines.append("")
        for e in doc["errors"]:
            lines.append("```")
            lines.append(e.strip())
            lines.append("```")
        lines.append("")
    return "\n".join(lines)


PHASE_NOTE = (
    "Phases: `dcp.planner` = the planner's set_up/create_local/create_global(/finish) plan calls; "
    "`dcp.other` = the rest of dcp.save/load outside the storage layer and the planner "
    "(metadata assembly, dedup, no_dist collectives); `storage.plan` = the storage layer's "
    "set_up/prepare_local/prepare_global; `write_data.resolve_data` and `read_data.resolve_tensor/"
    "commit_tensor` are planner callbacks made from inside the storage layer; `*.engine` = "
    "dcp_native's engine call, or for stock the sum of its per-item `_write_item` (torch.save + write) "
    "or `torch.load` calls (summed over threads where stock uses threads); `*.other` = the rest of "
    "write_data/read_data (framing, read planning, probing, bookkeeping); `storage.finish` = metadata "
    "(and sidecar) pickling, writing and fsync. Stock's writer runs `_write_item` on its "
    "`thread_count` threads, so its write_data split is in thread-seconds and has no `other`."
)


# ----------------------------------------------------------------------------- CLI


WORKLOADS = ("load", "small", "save", "reshard")


def parse_shape(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)[xX*,](\d+)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a 2-D shape: {text!r} (e.g. 4096x4096)")
    return int(m.group(1)), int(m.group(2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Benchmark stock DCP vs dcp_native (python and native engines) vs raw pread/pwrite.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--workload", action="append", choices=WORKLOADS,
                   help="case to run (repeatable; default: all of " + ", ".join(WORKLOADS) + ")")
    p.add_argument("--size", type=parse_size, default=None,
                   help="bytes of the load and save cases, in 64 fp32 tensors (default 1G; --quick 16M)")
    p.add_argument("--threads", type=int, default=4, help="writer thread_count and reader thread_count")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per system (default 5; --quick 1)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds before the timed ones")
    p.add_argument("--small-count", type=int, default=None, help="tensors in the small case (default 4000; --quick 200)")
    p.add_argument("--small-bytes", type=parse_size, default=16 * KiB, help="bytes per tensor in the small case")
    p.add_argument("--reshard-shape", type=parse_shape, default=None,
                   help="global fp32 shape of the reshard case (default 4096x4096; --quick 256x2048)")
    p.add_argument("--quick", action="store_true", help="tiny run of every case (smoke test)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="where latest.json / latest.md go")
    p.add_argument("--dir", default=None, help="parent of the scratch directory (default: the system temp dir)")
    p.add_argument("--cache", choices=("warm", "cold"), default="warm",
                   help="page-cache state of loads: warm, or cold via posix_fadvise(DONTNEED) before each load")
    p.add_argument("--isolation", choices=("fork", "exec"), default="fork",
                   help="fresh process per figure: forked from an import-only server, or a new interpreter")
    p.add_argument("--profile", action="store_true",
                   help="cProfile the instrumented small-case runs; writes profile_small_*.txt to --out")
    p.add_argument("--seed", type=int, default=0, help="seed of the data pattern")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(argv[1])
    if argv and argv[0] == "--child-rank":
        return child_rank_main(argv[1])
    if argv and argv[0] == "--child-server":
        return child_server_main()
    args = build_parser().parse_args(argv)
    q = args.quick
    args.workload = args.workload or list(WORKLOADS)
    args.workload = [w for w in WORKLOADS if w in args.workload]
    if args.size is None:
        args.size = 16 * MiB if q else GiB
    if args.reps is None:
        args.reps = 1 if q else 5
    if args.small_count is None:
        args.small_count = 200 if q else 4000
    if args.reshard_shape is None:
        args.reshard_shape = (256, 2048) if q else (4096, 4096)
    if args.threads < 1 or args.reps < 1 or args.warmup < 0:
        raise SystemExit("--threads and --reps must be >= 1, --warmup >= 0")
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)

    bench = Bench(args)
    doc = bench.run()
    table = render_tables(doc)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "latest.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    with open(os.path.join(args.out, "latest.md"), "w") as f:
        f.write(table + "\n")
    print()
    print(table)
    print(f"wrote {os.path.join(args.out, 'latest.json')} and latest.md")
    if doc["errors"]:
        print(f"{len(doc['errors'])} figure(s) FAILED (see above and the errors section)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
