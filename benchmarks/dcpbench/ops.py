"""The measurement side: one op per figure, run in a fresh process; uses torch.

An op gets a JSON spec from the parent and returns a JSON-able dict. The
timed region of every op is only the ``dcp.save`` / ``dcp.load`` /
``dcp.async_save`` call or the raw I/O; building the state dict, allocating
and touching destinations, and checking the loaded values are outside it.

Systems (``spec["system"]``): ``stock`` (torch's FileSystemWriter/Reader),
``python`` / ``native`` (dcp_native with that engine), ``noio`` (a storage
layer that does no I/O: DCP's own floor), ``raw`` (plain pwrite/pread on
threads, see :mod:`rawio`), ``raw_direct`` (raw reads with O_DIRECT),
``torch_pinned`` (torch's own copy through pinned host memory; GPU figures).
"""

from __future__ import annotations

import functools
import gc
import io
import json
import os
import pickle
import sys
import threading
import time
import traceback
from typing import Any, Callable

from . import data as wl
from . import rawio
from .common import (
    CHILD_TIMEOUT_S,
    SCRIPT,
    collect_forked,
    emit,
    fork_call,
    parse_result,
    proc_status,
    rchar,
    reset_peak_rss,
)

_CHILD_IMPORTED = False


def child_imports() -> None:
    """What the server (or an exec child) imports before any measurement. Never initializes CUDA."""
    global _CHILD_IMPORTED
    if _CHILD_IMPORTED:
        return
    import warnings

    # DCP warns on every no_dist save/load; that is not news here.
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
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


#: dcp_native systems: name -> (engine, writer settings beyond the defaults).
#: ``native_nocrc`` is the native engine without the CRC32C tables it writes by
#: default, to show what the checksums cost.
#: ``*_crc`` / ``*_nocrc`` set the checksums explicitly (the save thread sweep);
#: ``*_cached`` use dcp_native's caching planners, ``native_stock_cached`` stock's
#: plan cache (see :data:`PLANNER_OF`).
DCP_NATIVE_SYSTEMS: dict[str, tuple[str, dict[str, Any]]] = {
    "python": ("python", {}),
    "native": ("native", {}),
    "native_nocrc": ("native", {"checksums": False}),
    "native_crc": ("native", {"checksums": True}),
    "python_crc": ("python", {"checksums": True}),
    "python_nocrc": ("python", {"checksums": False}),
    "python_cached": ("python", {}),
    "native_cached": ("native", {}),
    "native_stock_cached": ("native", {}),
}

#: Systems whose planner is not DCP's default: ``stock_cache`` = stock's
#: ``DefaultSavePlanner(enable_plan_caching=True)`` (saves only; stock caches no
#: load plans), ``dcp_native_cache`` = dcp_native's caching save/load planners,
#: found at run time in ``dcp_native.__all__`` (a system reports itself not run
#: where the torch or dcp_native at hand lacks them).
PLANNER_OF: dict[str, str] = {
    "stock_cached": "stock_cache",
    "native_stock_cached": "stock_cache",
    "python_cached": "dcp_native_cache",
    "native_cached": "dcp_native_cache",
}


def storage_of(system: str) -> str:
    """The storage layer of a system: 'stock', 'python', 'native', or the system's own name (noio, raw...)."""
    if system in ("stock", "stock_cached"):
        return "stock"
    return engine_of(system) or system


class Unsupported(Exception):
    """This system cannot run with the torch / dcp_native at hand (reported, not a failure)."""


def dcp_native_planner_class(save: bool):
    """dcp_native's caching planner class (feature detection: ``dcp_native.__all__``), or why there is none."""
    import dcp_native

    suffix = "SavePlanner" if save else "LoadPlanner"
    names = [n for n in getattr(dcp_native, "__all__", ()) if n.endswith(suffix) and hasattr(dcp_native, n)]
    names.sort(key=lambda n: ("cach" not in n.lower(), n))
    if not names:
        raise Unsupported(f"this dcp_native ({getattr(dcp_native, '__version__', '?')}) exports no *{suffix} "
                          "(dcp_native.__all__)")
    return getattr(dcp_native, names[0])


def make_planner(system: str, save: bool):
    """The planner of a system (DCP's default unless :data:`PLANNER_OF` says otherwise); raises Unsupported."""
    import inspect

    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

    kind = PLANNER_OF.get(system)
    if kind is None:
        return DefaultSavePlanner() if save else DefaultLoadPlanner()
    if kind == "stock_cache":
        if not save:
            raise Unsupported("stock caches save plans only (enable_plan_caching)")
        if "enable_plan_caching" not in inspect.signature(DefaultSavePlanner.__init__).parameters:
            import torch

            raise Unsupported(f"torch {torch.__version__}'s DefaultSavePlanner has no enable_plan_caching")
        return DefaultSavePlanner(enable_plan_caching=True)
    cls = dcp_native_planner_class(save)
    try:
        return cls()
    except TypeError as exc:
        raise Unsupported(f"dcp_native.{cls.__name__}() needs arguments this suite does not know: {exc}") from None


def set_engine(system: str) -> None:
    """Select the engine of a dcp_native system; checks the choice took effect."""
    import dcp_native

    engine = engine_of(system)
    os.environ["DCP_NATIVE_BACKEND"] = engine
    if dcp_native.backend() != engine:
        raise RuntimeError(f"DCP_NATIVE_BACKEND={engine} but dcp_native.backend() is {dcp_native.backend()}")


def engine_of(system: str) -> str:
    """The dcp_native engine a system uses ('python'/'native'), or '' for the others."""
    return DCP_NATIVE_SYSTEMS.get(system, ("", {}))[0]


# ----------------------------------------------------------------------------- device


def is_cuda(spec: dict) -> bool:
    return spec.get("device", "cpu") == "cuda"


def device_sync(spec: dict) -> None:
    if is_cuda(spec):
        import torch

        torch.cuda.synchronize()


class DevicePeak:
    """Peak GPU memory allocated by torch inside a region (None on CPU)."""

    def __init__(self, spec: dict) -> None:
        self.cuda = is_cuda(spec)
        self.base = 0

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()

    def peak(self) -> int | None:
        if not self.cuda:
            return None
        import torch

        return torch.cuda.max_memory_allocated() - self.base


def pinned_like(t, pin: bool):
    import torch

    return torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)


def aligned_host_buffer(nbytes: int, pin: bool):
    """A uint8 CPU tensor of ``nbytes`` whose first byte is page-aligned (O_DIRECT), pinned if asked."""
    import torch

    raw = torch.empty(nbytes + rawio.DIRECT_ALIGN, dtype=torch.uint8, pin_memory=pin)
    pad = (-raw.data_ptr()) % rawio.DIRECT_ALIGN
    return raw[pad : pad + nbytes]


# ----------------------------------------------------------------------------- no-I/O storage


def _noio_classes():
    """A StorageWriter/StorageReader pair that does no I/O: DCP's own floor."""
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
        """Reads the real ``.metadata``; resolves and commits every tensor without reading it.

        Object (byte) items are not loaded: the check of a noio load is skipped.
        """

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
        if engine_of(system):
            from dcp_native._backend import get_engine

            pt.wrap(get_engine(), "write", "write_data.engine")
        elif storage_of(system) == "stock":
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
        if engine_of(system):
            from dcp_native._backend import get_engine

            pt.wrap(get_engine(), "read", "read_data.engine")
        elif storage_of(system) == "stock":
            pt.wrap(torch, "load", "read_data.engine")
    return pt


def _phase_report(pt: PhaseTimer, total: float, save: bool, overlapped: bool = False) -> dict[str, float | None]:
    """Split ``total`` into disjoint phases (seconds).

    ``overlapped``: the storage layer ran the timed callbacks on several threads
    (stock's writer), so their sums are thread-seconds and ``other`` is unknown.
    """
    out: dict[str, Any] = {"total": total, "dcp.planner": pt.get("dcp.planner"), "storage.plan": pt.get("storage.plan")}
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


# ----------------------------------------------------------------------------- storage factories


def make_writer(system: str, path: str, threads: int, sync: bool, **kwargs: Any):
    import torch.distributed.checkpoint as dcp

    import dcp_native

    if storage_of(system) == "stock":
        return dcp.FileSystemWriter(path, thread_count=threads, sync_files=sync, **kwargs)
    if system == "noio":
        return _noio_classes()[0]()
    set_engine(system)
    kwargs = {**DCP_NATIVE_SYSTEMS[system][1], **kwargs}
    return dcp_native.FileSystemWriter(path, thread_count=threads, sync_files=sync, **kwargs)


def make_reader(system: str, path: str, threads: int):
    import torch.distributed.checkpoint as dcp

    import dcp_native

    if storage_of(system) == "stock":
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
    st.sort_stats("cumulative").print_stats(40)
    buf.write("=== by own time ===\n")
    st.sort_stats("tottime").print_stats(40)
    with open(spec["profile_to"], "w") as f:
        f.write(buf.getvalue())
    return result


# ----------------------------------------------------------------------------- verification


def _sidecar_payloads(path: str) -> tuple[Any, dict[tuple[str, int], int]]:
    """The metadata, and (data file, item offset) -> payload offset in the item, from the sidecar
    (through dcp_native's checkpoint model, which checks it against the metadata)."""
    from dcp_native.checkpoint import Checkpoint

    ck = Checkpoint(path)
    if not ck.sidecar.usable:
        raise AssertionError(f"{path}: {ck.sidecar.reason}")
    return ck.metadata, {(rel, off): e[1] for rel, rows in ck.sidecar.entries.items() for off, e in rows.items()}


def payload_locations(path: str) -> dict[str, tuple[str, int]]:
    """fqn (whole, unsharded tensors) -> (data file, payload offset), from .metadata + dcp_native's sidecar."""
    md, payload = _sidecar_payloads(path)
    out = {}
    for index, info in md.storage_data.items():
        key = (info.relative_path, info.offset)
        if key in payload:
            out[index.fqn] = (info.relative_path, info.offset + payload[key])
    return out


def verify_checkpoint(spec: dict) -> None:
    """Load what a save figure wrote and check every value.

    The reader is the other implementation: stock's for dcp_native's
    checkpoints, dcp_native's (native engine) for stock's, so each check is
    also an interoperability check; ``spec["verifier"]`` overrides that
    (stock's reader costs seconds on 10,000 tensors).
    """
    import torch.distributed.checkpoint as dcp

    verifier = spec.get("verifier") or ("native" if storage_of(spec["system"]) == "stock" else "stock")
    dest = wl.build(spec["data"], spec["seed"], "cpu", fill=False)
    dcp.load(dest.state_dict, storage_reader=make_reader(verifier, spec["dir"], 4), no_dist=True)
    dest.check()


def verify_raw_files(spec: dict, work: wl.Workload, threads: int) -> None:
    """Read back the raw save's files and compare them with the tensors' expected bytes."""
    import torch

    sizes = [t.nbytes for _, t, _ in work.tensors]
    for n, group in enumerate(rawio.split_groups(sizes, threads)):
        path = os.path.join(spec["dir"], f"raw_{n}.bin")
        got = torch.frombuffer(bytearray(open(path, "rb").read()), dtype=torch.uint8)
        off = 0
        for i in group:
            key, t, index = work.tensors[i]
            want = wl.expected_bytes(t, spec["seed"], index)
            if not torch.equal(got[off : off + t.nbytes], want):
                raise AssertionError(f"raw save: bytes of {key!r} in {path} differ from the tensor's")
            off += t.nbytes


# ----------------------------------------------------------------------------- single-process ops


def op_write_checkpoint(spec: dict) -> dict:
    """Setup: write a single-process checkpoint (stock or dcp_native's native engine), sync on."""
    import torch.distributed.checkpoint as dcp

    work = wl.build(spec["data"], spec["seed"], spec.get("device", "cpu"))
    writer = make_writer(spec["system"], spec["dir"], spec["threads"], True)
    t0 = time.perf_counter()
    with timed_threads():
        dcp.save(work.state_dict, storage_writer=writer, no_dist=True)
    return {"seconds": time.perf_counter() - t0}


def op_save(spec: dict) -> dict:
    """One timed save: stock / python / native / noio through dcp.save, or raw pwrite."""
    import torch.distributed.checkpoint as dcp

    system, path, threads, sync = spec["system"], spec["dir"], spec["threads"], spec["sync"]
    work = wl.build(spec["data"], spec["seed"], spec.get("device", "cpu"))
    nbytes = work.nbytes
    phases = None
    dev_peak = DevicePeak(spec)
    if system == "raw":
        # CUDA tensors are first copied to pinned host memory (torch), then written.
        tensors = [t for _, t, _ in work.tensors]
        hosts = [pinned_like(t, True) if t.is_cuda else t for t in tensors]
        views = [rawio.host_view(h) for h in hosts]
        fns = rawio.write_files(path, views, threads, sync)
        if is_cuda(spec):
            groups = rawio.split_groups([len(v) for v in views], threads)
            writes = fns

            def with_d2h(g: list[int], write: Callable[[], None]) -> Callable[[], None]:
                def fn() -> None:
                    for i in g:
                        if tensors[i].is_cuda:
                            hosts[i].copy_(tensors[i])
                    write()
                return fn

            fns = [with_d2h(g, w) for g, w in zip(groups, writes)]
        gc.collect()
        dev_peak.start()
        rss0 = reset_peak_rss()
        with timed_threads():
            t0 = time.perf_counter()
            rawio.run_threads(fns)
            seconds = time.perf_counter() - t0
        peak = proc_status()["VmHWM"] - rss0
        if spec.get("verify"):
            verify_raw_files(spec, work, threads)
    else:
        writer = make_writer(system, path, threads, sync)
        try:
            planner = make_planner(system, save=True)
        except Unsupported as exc:
            return {"unsupported": str(exc)}
        pt = _instrument(system, writer, planner, save=True) if spec.get("phases") else None
        gc.collect()
        dev_peak.start()
        rss0 = reset_peak_rss()
        with timed_threads():
            t0 = time.perf_counter()
            _maybe_profile(spec, lambda: dcp.save(work.state_dict, storage_writer=writer, planner=planner, no_dist=True))
            device_sync(spec)
            seconds = time.perf_counter() - t0
        peak = proc_status()["VmHWM"] - rss0
        if pt is not None:
            phases = _phase_report(pt, seconds, save=True, overlapped=storage_of(system) == "stock" and threads > 1)
        if spec.get("verify") and system != "noio":
            verify_checkpoint(spec)
    out: dict[str, Any] = {"seconds": seconds, "bytes": nbytes, "peak_bytes": peak}
    if dev_peak.cuda:
        out["gpu_peak_bytes"] = dev_peak.peak()
    if phases is not None:
        out["phases"] = phases
    return out


def _load_raw(spec: dict, work: wl.Workload, direct: bool) -> dict:
    """Raw read of the checkpoint's data files into one preallocated buffer (+ one H2D copy on CUDA)."""
    import torch

    path, threads = spec["dir"], spec["threads"]
    if direct:
        why = rawio.direct_io_supported(path)
        if why:
            return {"unsupported": why}
    files = rawio.data_files(path)
    bases, total = rawio.read_layout(files)
    cuda = is_cuda(spec)
    buf = aligned_host_buffer(total, pin=cuda)
    buf.fill_(0xA5)
    dev_buf = torch.empty(total, dtype=torch.uint8, device="cuda") if cuda else None
    view = rawio.host_view(buf)
    fns = rawio.read_files(path, files, bases, view, threads, direct=direct)
    extra: dict[str, Any] = {}
    if spec.get("cold"):
        extra["cache"] = rawio.evict(path)
    extra["resident_before"] = rawio.resident_fraction(path)
    gc.collect()
    rss0 = reset_peak_rss()
    r0 = rchar()
    with timed_threads():
        t0 = time.perf_counter()
        rawio.run_threads(fns)
        if dev_buf is not None:
            dev_buf.copy_(buf)
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    extra["rchar"] = rchar() - r0
    peak = proc_status()["VmHWM"] - rss0
    extra["bytes_read"] = sum(s for _, s in files)
    # Check: every payload in the buffer (on the device, for CUDA) holds the saved bytes.
    got_all = dev_buf if dev_buf is not None else buf
    locs = payload_locations(path)
    for key, t, index in work.tensors:
        rel, off = locs[key]
        start = bases[rel] + off
        got = got_all[start : start + t.nbytes]
        if start % 4 == 0:  # payloads are aligned in the file, files page-aligned in the buffer
            wl.check_pattern(got, spec["seed"], index, f"raw read of {key!r}")
        elif not torch.equal(got, wl.expected_bytes(t, spec["seed"], index).to(got.device)):
            raise AssertionError(f"raw read of {key!r}: bytes differ from what was saved")
    return {"seconds": seconds, "bytes": work.nbytes, "peak_bytes": peak, **extra}


def op_load(spec: dict) -> dict:
    """One timed load: stock / python / native / noio through dcp.load, or raw preads (raw, raw_direct)."""
    import torch.distributed.checkpoint as dcp

    system, path, threads = spec["system"], spec["dir"], spec["threads"]
    if system in ("raw", "raw_direct"):
        # Keys, shapes and dtypes for the check; meta tensors hold no memory.
        work = wl.build(spec["data"], spec["seed"], "meta", fill=False)
        return _load_raw(spec, work, direct=system == "raw_direct")
    extra: dict[str, Any] = {}
    work = wl.build(spec["data"], spec["seed"], spec.get("device", "cpu"), fill=False)
    reader = make_reader(system, path, threads)
    try:
        planner = make_planner(system, save=False)
    except Unsupported as exc:
        return {"unsupported": str(exc)}
    pt = _instrument(system, reader, planner, save=False) if spec.get("phases") else None
    if spec.get("cold"):
        extra["cache"] = rawio.evict(path)
    extra["resident_before"] = rawio.resident_fraction(path)
    dev_peak = DevicePeak(spec)
    gc.collect()
    dev_peak.start()
    rss0 = reset_peak_rss()
    r0 = rchar()
    with timed_threads():
        t0 = time.perf_counter()
        _maybe_profile(spec, lambda: dcp.load(work.state_dict, storage_reader=reader, planner=planner, no_dist=True))
        device_sync(spec)
        seconds = time.perf_counter() - t0
    extra["rchar"] = rchar() - r0
    peak = proc_status()["VmHWM"] - rss0
    if dev_peak.cuda:
        extra["gpu_peak_bytes"] = dev_peak.peak()
    stats = getattr(reader, "last_read_stats", None)
    if stats is not None:
        extra["bytes_read"] = stats.bytes_read
        extra["read_calls"] = stats.calls
    if pt is not None:
        extra["phases"] = _phase_report(pt, seconds, save=False)
    if system != "noio":
        work.check()
    return {"seconds": seconds, "bytes": work.nbytes, "peak_bytes": peak, **extra}


def op_async_save(spec: dict) -> dict:
    """Two async_saves of the same state dict with one writer (and stager); the second is timed.

    ``blocking``: until ``dcp.async_save`` returns and staging has completed (the
    training loop may change the tensors from then on); ``total``: until the
    upload (the write) has completed. Systems: ``stock`` (stock's writer is its
    own stager, as ``dcp.async_save(sd, storage_writer=FileSystemWriter(...))``
    does: a fresh copy per save, or a cached pinned one on CUDA);
    ``stock_pinned`` (stock's writer with ``async_stager=DefaultStager`` in
    synchronous mode: storages cached across saves, pinned and copied
    non-blocking where CUDA is present); ``python`` / ``native`` (dcp_native's
    writer as the stager: its reused staging area); ``raw``: a plain copy of
    every tensor into preallocated memory (pinned on CUDA), the floor of any staging.
    """
    import torch.distributed.checkpoint as dcp

    system, base, threads = spec["system"], spec["dir"], spec["threads"]
    work = wl.build(spec["data"], spec["seed"], spec.get("device", "cpu"))
    cuda = is_cuda(spec)
    gc.collect()
    if system == "raw":
        tensors = [t for _, t, _ in work.tensors]
        hosts = [pinned_like(t, cuda) for t in tensors]
        for h in hosts:
            h.zero_()  # touched: the copy below does not pay for page faults
        rss0 = reset_peak_rss()
        with timed_threads():
            t0 = time.perf_counter()
            for h, t in zip(hosts, tensors):
                h.copy_(t, non_blocking=cuda)
            device_sync(spec)
            seconds = time.perf_counter() - t0
        peak = proc_status()["VmHWM"] - rss0
        return {"seconds": seconds, "blocking_s": seconds, "total_s": seconds, "first_blocking_s": seconds,
                "bytes": work.nbytes, "peak_bytes": peak}

    kwargs = _single_process_kwargs(dcp.async_save, spec)
    stager = None
    if system == "stock_pinned":
        import torch.distributed.checkpoint.staging as staging

        if not hasattr(staging, "DefaultStager"):
            return {"unsupported": "this torch has no DefaultStager"}
        stager = staging.DefaultStager(staging.StagingOptions(
            use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=cuda))
        kwargs["async_stager"] = stager
        writer = make_writer("stock", os.path.join(base, "0"), threads, False)
    else:
        # Stock's own stager caches only when asked, and its cache is pinned memory
        # (which needs an accelerator); dcp_native's writer always reuses its area.
        writer = make_writer(system, os.path.join(base, "0"), threads, False, cache_staged_state_dict=cuda)

    def one(path: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        resp = dcp.async_save(work.state_dict, checkpoint_id=path, storage_writer=writer, **kwargs)
        staging = getattr(resp, "staging_completion", None)
        if staging is not None:
            staging.result()
        blocking = time.perf_counter() - t0
        upload = getattr(resp, "upload_completion", resp)
        upload.result()
        return blocking, time.perf_counter() - t0

    with timed_threads():
        first_blocking, first_total = one(os.path.join(base, "0"))
    # The first save's dirty pages are flushed now, not by the kernel during the
    # timed save: its copy would compete with writeback that the raw copy never sees.
    os.sync()
    gc.collect()
    rss0 = reset_peak_rss()
    with timed_threads():
        try:
            blocking, total = one(os.path.join(base, "1"))
        except KeyError as exc:
            if system != "stock_pinned":
                raise
            # torch 2.11's DefaultStager cannot stage a second time with the same
            # stager (its deep copy meets a type it has no rule for); later torch can.
            import torch

            return {"unsupported": f"stock's DefaultStager fails on its second save with torch "
                                   f"{torch.__version__} ({exc!r})"}
    peak = proc_status()["VmHWM"] - rss0
    extra: dict[str, Any] = {}
    held = getattr(writer, "bytes_held", None)
    if isinstance(held, int):
        extra["staging_bytes_held"] = held
    for obj in (writer, stager):
        close = getattr(obj, "close", None)
        if callable(close):
            close()
    if spec.get("verify"):
        verify_checkpoint(dict(spec, dir=os.path.join(base, "1")))
    return {"seconds": blocking, "blocking_s": blocking, "total_s": total, "first_blocking_s": first_blocking,
            "first_total_s": first_total, "bytes": work.nbytes, "peak_bytes": peak, **extra}


def _later(times: list[float]) -> float:
    """Median of the second and later iterations (the first when there is only one)."""
    import statistics

    return statistics.median(times[1:] or times)


def _reuse_report(planner: Any, reused: list[bool]) -> dict:
    """``plan_reused``: the fraction of the 2nd and later calls whose plan the planner reused from its cache
    (planners that say so: ``reused``, as dcp_native's caching planners do)."""
    if not hasattr(planner, "reused") or len(reused) < 2:
        return {}
    return {"plan_reused": sum(reused[1:]) / len(reused[1:]), "iter_reused": reused}


def op_repeat_save(spec: dict) -> dict:
    """``spec["iters"]`` saves of one state dict in this one process (a training loop's checkpoints).

    One planner object for every save (DCP's default, stock's plan cache or
    dcp_native's caching planner, by system), a fresh writer per save (as
    ``dcp.save(checkpoint_id=...)`` makes one), each save into a new directory;
    between saves (untimed) the previous directory is deleted and flushed. The
    figure (``seconds``) is the median of the second and later saves; the first
    is ``first_seconds``, every one is in ``iter_seconds``. The last save's
    checkpoint is checked in the verifying round.
    """
    import shutil

    import torch.distributed.checkpoint as dcp

    system, base, threads, sync, iters = spec["system"], spec["dir"], spec["threads"], spec["sync"], spec["iters"]
    work = wl.build(spec["data"], spec["seed"], spec.get("device", "cpu"))
    try:
        planner = make_planner(system, save=True)
    except Unsupported as exc:
        return {"unsupported": str(exc)}
    times: list[float] = []
    reused: list[bool] = []
    peak = 0
    path = ""
    for i in range(iters):
        last = i == iters - 1
        if path:
            shutil.rmtree(path, ignore_errors=True)
            os.sync()
        path = os.path.join(base, str(i))
        writer = make_writer(system, path, threads, sync)
        spec_i = spec if last else dict(spec, profile_to=None)  # --profile: the last save only
        gc.collect()
        rss0 = reset_peak_rss()
        with timed_threads():
            t0 = time.perf_counter()
            _maybe_profile(spec_i, lambda: dcp.save(work.state_dict, storage_writer=writer, planner=planner,
                                                    no_dist=True))
            device_sync(spec)
            times.append(time.perf_counter() - t0)
        reused.append(bool(getattr(planner, "reused", False)))
        if i or iters == 1:
            peak = max(peak, proc_status()["VmHWM"] - rss0)
    if spec.get("verify") and system != "noio":
        verify_checkpoint(dict(spec, dir=path))
    return {"seconds": _later(times), "first_seconds": times[0], "iter_seconds": times, "bytes": work.nbytes,
            "peak_bytes": peak, **_reuse_report(planner, reused)}


def op_repeat_load(spec: dict) -> dict:
    """``spec["iters"]`` loads of one checkpoint into one state dict in this one process.

    One planner object and one reader object for every load (DCP's default or
    dcp_native's caching planner), each load given ``checkpoint_id`` (DCP
    resets the reader with it: it reads ``.metadata`` again every time). Before
    each load (untimed) the destination is overwritten with garbage; after the
    last load (after every one in the verifying round) every value is checked.
    Figure: the median of the second and later loads.
    """
    import torch.distributed.checkpoint as dcp

    system, path, threads, iters = spec["system"], spec["dir"], spec["threads"], spec["iters"]
    work = wl.build(spec["data"], spec["seed"], spec.get("device", "cpu"), fill=False)
    try:
        planner = make_planner(system, save=False)
    except Unsupported as exc:
        return {"unsupported": str(exc)}
    times: list[float] = []
    reused: list[bool] = []
    peak = 0
    extra: dict[str, Any] = {"resident_before": rawio.resident_fraction(path)}
    reader = make_reader(system, path, threads)
    for i in range(iters):
        last = i == iters - 1
        if i:
            for _, t, _ in work.tensors:
                wl.fill_garbage(t)
        spec_i = spec if last else dict(spec, profile_to=None)
        gc.collect()
        rss0 = reset_peak_rss()
        with timed_threads():
            t0 = time.perf_counter()
            _maybe_profile(spec_i, lambda: dcp.load(work.state_dict, checkpoint_id=path, storage_reader=reader,
                                                    planner=planner, no_dist=True))
            device_sync(spec)
            times.append(time.perf_counter() - t0)
        reused.append(bool(getattr(planner, "reused", False)))
        if i or iters == 1:
            peak = max(peak, proc_status()["VmHWM"] - rss0)
        if system != "noio" and (last or spec.get("verify")):
            work.check()
    return {"seconds": _later(times), "first_seconds": times[0], "iter_seconds": times, "bytes": work.nbytes,
            "peak_bytes": peak, **extra, **_reuse_report(planner, reused)}


def _single_process_kwargs(fn: Callable[..., Any], spec: dict) -> dict:
    """``no_dist=True`` where ``fn`` takes it; else a one-rank gloo group (older torch's async_save)."""
    import inspect

    if "no_dist" in inspect.signature(fn).parameters:
        return {"no_dist": True}
    import torch.distributed as dist

    if not dist.is_initialized():
        store = os.path.join(spec["bench"], f"store_{os.getpid()}_{time.monotonic_ns()}")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    return {}


def op_transfer(spec: dict) -> dict:
    """GPU only: D2H staging or H2D copy bandwidth of the workload's CUDA tensors.

    ``torch_pinned``: torch's own ``copy_(non_blocking=True)`` between the device
    tensors and preallocated pinned host tensors, then one synchronize.
    ``stock`` / ``native`` (d2h): the writer's ``stage()`` (what ``async_save``
    blocks on), second call with ``cache_staged_state_dict=True`` so buffers are reused.
    """
    import torch

    if not is_cuda(spec):
        raise RuntimeError("the transfer case needs --device cuda")
    system, direction = spec["system"], spec["direction"]
    work = wl.build(spec["data"], spec["seed"], "cuda")
    dev = [t for _, t, _ in work.tensors if t.is_cuda]
    nbytes = sum(t.nbytes for t in dev)
    extra: dict[str, Any] = {}
    if system == "torch_pinned":
        hosts = [pinned_like(t, True) for t in dev]
        if direction == "h2d":
            # The pinned copies hold the pattern; the device tensors get garbage the copy must replace.
            for h, t in zip(hosts, dev):
                h.copy_(t)
                wl.fill_garbage(t)
        torch.cuda.synchronize()
        rss0 = reset_peak_rss()
        t0 = time.perf_counter()
        for h, t in zip(hosts, dev):
            if direction == "d2h":
                h.copy_(t, non_blocking=True)
            else:
                t.copy_(h, non_blocking=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = proc_status()["VmHWM"] - rss0
        if direction == "h2d":
            work.check()
    else:
        if direction != "d2h":
            raise ValueError("stage() is a D2H figure; H2D of the systems is the load case on CUDA")
        writer = make_writer(system, os.path.join(spec["dir"], "stage"), spec["threads"], False,
                             cache_staged_state_dict=True)
        t0 = time.perf_counter()
        writer.stage(work.state_dict)
        torch.cuda.synchronize()
        extra["first_seconds"] = time.perf_counter() - t0
        gc.collect()
        rss0 = reset_peak_rss()
        t0 = time.perf_counter()
        staged = writer.stage(work.state_dict)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = proc_status()["VmHWM"] - rss0
        # The staged copy is on the host and equal to the device tensors.
        flat = {}
        _flatten(staged, "", flat)
        for key, t, index in work.tensors:
            wl.check_pattern(flat[key], spec["seed"], index, f"staged {key!r}")
            if flat[key].is_cuda:
                raise AssertionError(f"stage() left {key!r} on the device")
        close = getattr(writer, "close", None)
        if callable(close):
            close()
    return {"seconds": seconds, "bytes": nbytes, "peak_bytes": peak, **extra}


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}.{i}", out)
    else:
        out[prefix] = value


def op_info(spec: dict) -> dict:
    import torch

    import dcp_native

    info: dict[str, Any] = {"torch": torch.__version__, "dcp_native": getattr(dcp_native, "__version__", "unknown")}
    info["dcp_native_path"] = os.path.dirname(dcp_native.__file__)
    os.environ["DCP_NATIVE_BACKEND"] = "native"
    try:
        info["native_engine"] = dcp_native.backend() == "native"
    except Exception as exc:  # noqa: BLE001 - reported; the native rows will then fail
        info["native_engine"] = False
        info["native_error"] = repr(exc)
    info["torch_threads"] = torch.get_num_threads()
    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "memory_bytes": p.total_memory, "count": torch.cuda.device_count()}
    info["direct_io"] = rawio.direct_io_supported(spec["bench"]) or "supported"
    return info


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

    off = wl.pattern_offset(seed, 0)
    r = torch.arange(rows.start, rows.stop, dtype=torch.int64).unsqueeze(1)
    c = torch.arange(cols.start, cols.stop, dtype=torch.int64).unsqueeze(0)
    return (r * n_cols + c + off).to(torch.int32)


def shard_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """DTensor Shard(dim)'s split (torch.chunk's): ceil(n / world) per rank, the last ones shorter."""
    per = -(-n // world)
    start = min(n, rank * per)
    return start, min(n, start + per)


def _mesh(spec: dict, world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cuda" if is_cuda(spec) else "cpu", (world,))


def rank_reshard_save(spec: dict, rank: int, world: int) -> dict:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Shard

    n_rows, n_cols = spec["shape"]
    r0, r1 = shard_range(n_rows, world, rank)
    local = _global_pattern(slice(r0, r1), slice(0, n_cols), n_cols, spec["seed"]).view(torch.float32).contiguous()
    if is_cuda(spec):
        local = local.cuda()
    dt = DTensor.from_local(local, _mesh(spec, world), [Shard(0)], run_check=False,
                            shape=torch.Size((n_rows, n_cols)), stride=(n_cols, 1))
    dcp.save({"w": dt}, storage_writer=make_writer(spec["system"], spec["dir"], 1, True))
    return {}


def _raw_reshard_read(spec: dict, local, c0: int, c1: int, threads: int) -> list[Callable[[], None]]:
    """Preads of exactly the needed runs: for every saved row, columns [c0, c1)."""
    path = spec["dir"]
    n_cols = spec["shape"][1]
    md, payload = _sidecar_payloads(path)
    rows_of = {tuple(c.offsets): c.sizes[0] for c in md.state_dict_metadata["w"].chunks}
    chunks = []
    for index, info in md.storage_data.items():
        start = info.offset + payload[(info.relative_path, info.offset)]
        chunks.append((os.path.join(path, info.relative_path), start, index.offset[0], rows_of[tuple(index.offset)]))
    dest = rawio.host_view(local)
    run = (c1 - c0) * 4
    dest_row = local.shape[1] * 4

    def read_chunk(full: str, start: int, row0: int, rows: int) -> None:
        fd = os.open(full, os.O_RDONLY)
        try:
            for r in range(rows):
                d = (row0 + r) * dest_row
                rawio.pread_all(fd, dest[d : d + run], start + (r * n_cols + c0) * 4, full)
        finally:
            os.close(fd)

    groups = [chunks[i::threads] for i in range(threads)]
    return [lambda g=g: [read_chunk(*c) for c in g] for g in groups if g]


def rank_reshard_load(spec: dict, rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Shard

    n_rows, n_cols = spec["shape"]
    system = spec["system"]
    cuda = is_cuda(spec)
    c0, c1 = shard_range(n_cols, world, rank)
    local = torch.empty(n_rows, c1 - c0, dtype=torch.float32, device="cuda" if cuda else "cpu")
    wl.fill_garbage(local)
    needed = local.nbytes
    dest = DTensor.from_local(local, _mesh(spec, world), [Shard(1)], run_check=False,
                              shape=torch.Size((n_rows, n_cols)), stride=(n_cols, 1))
    reader = None
    if system == "raw":
        host = torch.empty(local.shape, dtype=torch.float32, pin_memory=cuda) if cuda else local
        fns = _raw_reshard_read(spec, host, c0, c1, spec["threads"])
    else:
        reader = make_reader(system, spec["dir"], spec["threads"])
    gc.collect()
    dist.barrier()
    rss0 = reset_peak_rss()
    r0 = rchar()
    t0 = time.perf_counter()
    if reader is None:
        rawio.run_threads(fns)
        if cuda:
            local.copy_(host)
    else:
        dcp.load({"w": dest}, storage_reader=reader)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    read = rchar() - r0
    peak = proc_status()["VmHWM"] - rss0
    dist.barrier()
    want = _global_pattern(slice(0, n_rows), slice(c0, c1), n_cols, spec["seed"])
    got = local.view(torch.int32).cpu()
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        i, j = (int(x) for x in bad[0])
        raise AssertionError(
            f"rank {rank}: loaded values differ from what was saved: {len(bad)} of {got.numel()} "
            f"elements wrong, first at [{i}, {j + c0}]: got bits {int(got[i, j]):#x}, want {int(want[i, j]):#x}"
        )
    out = {"seconds": seconds, "needed": needed, "rchar": read, "peak_bytes": peak, "columns": [c0, c1]}
    if system == "raw":
        out["bytes_read"] = needed
    elif reader is not None and hasattr(reader, "last_read_stats"):
        out["bytes_read"] = reader.last_read_stats.bytes_read
        out["read_calls"] = reader.last_read_stats.calls
    return out


#: How long the ranks of one multi-rank figure may take (gloo's own timeout is 120 s).
RANK_TIMEOUT_S = 300.0

def rank_cooperative(spec: dict, rank: int, world: int) -> dict:
    """Every load of the cooperative workload (benchmarks/cooperative.py, shared with the
    command that runs it alone)."""
    import cooperative

    return {"records": cooperative.run_rank(rank, world, spec["coop"])}


RANK_FUNCS = {"reshard_save": rank_reshard_save, "reshard_load": rank_reshard_load, "cooperative": rank_cooperative}


def _rank_main(spec: dict, rank: int, world: int) -> dict:
    """One rank: joins the group (gloo; ``spec["backend"] == "nccl"``: NCCL, GPU ``rank``), runs
    ``spec["rank_op"]``."""
    import datetime as _dt

    import torch
    import torch.distributed as dist

    _rank_env(rank, world)
    # Several ranks share few cores: intra-op threads would only oversubscribe them.
    torch.set_num_threads(1)
    backend = spec.get("backend", "gloo")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"file://{spec['store']}",
        rank=rank,
        world_size=world,
        timeout=_dt.timedelta(seconds=120),
    )
    try:
        return RANK_FUNCS[spec["rank_op"]](spec, rank, world)
    finally:
        dist.destroy_process_group()


def _run_ranks(spec: dict, rank_op: str, world: int) -> list[dict]:
    import subprocess

    store = os.path.join(spec["bench"], f"store_{os.getpid()}_{time.monotonic_ns()}")
    rspec = dict(spec, rank_op=rank_op, store=store)
    limit = spec.get("ranks_timeout", RANK_TIMEOUT_S)
    try:
        if spec.get("isolation", "fork") == "fork":
            procs = [fork_call(lambda r=r: _rank_main(rspec, r, world)) for r in range(world)]
            results = collect_forked(procs, limit)
        else:
            popens = [
                subprocess.Popen(
                    [sys.executable, SCRIPT, "--child-rank", json.dumps(dict(rspec, rank=r, world=world))],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for r in range(world)
            ]
            results = []
            for p in popens:
                try:
                    out, _ = p.communicate(timeout=limit)
                except subprocess.TimeoutExpired:
                    p.kill()
                    out, _ = p.communicate()
                results.append(parse_result(out, p.returncode))
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
    extra: dict[str, Any] = {}
    if spec.get("cold"):
        extra["cache"] = rawio.evict(spec["dir"])
    extra["resident_before"] = rawio.resident_fraction(spec["dir"])
    ranks = _run_ranks(spec, "reshard_load", spec["load_world"])
    out = {
        "seconds": max(r["seconds"] for r in ranks),
        "needed": sum(r["needed"] for r in ranks),
        "rchar": sum(r["rchar"] for r in ranks),
        "peak_bytes": max(r["peak_bytes"] for r in ranks),
        "per_rank": ranks,
        **extra,
    }
    if all("bytes_read" in r for r in ranks):
        out["bytes_read"] = sum(r["bytes_read"] for r in ranks)
    out["bytes"] = out["needed"]
    return out


# ----------------------------------------------------------------------------- cooperative loads


def op_cooperative_save(spec: dict) -> dict:
    """The cooperative workload's checkpoint, saved from this process alone."""
    import cooperative

    return cooperative.write_checkpoint(spec["dir"], spec["coop"]["nbytes"], spec["seed"], spec["threads"])


def op_cooperative(spec: dict) -> dict:
    """Every load of the cooperative workload, by ``spec["ranks"]`` ranks: rank 0's records
    (every rank holds the same)."""
    ranks = _run_ranks(spec, "cooperative", spec["ranks"])
    return {"records": ranks[0]["records"]}


# ----------------------------------------------------------------------------- planning at scale


def op_planning(spec: dict) -> dict:
    """Issue 14: the figures of N simulated ranks (benchmarks/planning_scale.py), progress on
    stderr; the simulation is checked against real DTensors' plans first."""
    import planning_scale as ps

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    model = ps.SMALL_MODEL if spec["quick"] else ps.DEFAULT_MODEL
    checked = [4, 7]
    for n in checked:
        ps.check_faithful(ps.SMALL_MODEL, n)
    n = spec["ranks"]
    shape = ps.fitted(model, n, spec["max_items"])
    reps = spec["reps"] if n * ps.items_per_rank(shape) <= ps.REPS_ITEMS else 1
    row = ps.measure(shape, n, reps=reps, stock_cap=spec["cap"], log=log)
    return dict(row, model=ps.describe(model), full_layers=model.layers, reps_items=ps.REPS_ITEMS,
                faithful=f"simulated plans equal real DefaultSavePlanner's for real DTensors at {checked} ranks")


# ----------------------------------------------------------------------------- entry points


OPS: dict[str, Callable[[dict], dict]] = {
    "info": op_info,
    "write_checkpoint": op_write_checkpoint,
    "save": op_save,
    "load": op_load,
    "async_save": op_async_save,
    "repeat_save": op_repeat_save,
    "repeat_load": op_repeat_load,
    "transfer": op_transfer,
    "reshard_save": op_reshard_save,
    "reshard_load": op_reshard_load,
    "planning": op_planning,
    "cooperative_save": op_cooperative_save,
    "cooperative": op_cooperative,
}


def run_op(spec: dict) -> dict:
    child_imports()
    if spec["op"] not in ("reshard_save", "reshard_load", "cooperative"):  # (these fork ranks)
        timed_threads.setup()
    return OPS[spec["op"]](spec)


def child_main(spec_json: str) -> int:
    """``--child``: one figure in this fresh interpreter."""
    try:
        emit({"ok": run_op(json.loads(spec_json))})
    except BaseException:  # noqa: BLE001
        emit({"error": traceback.format_exc()})
    return 0


def child_rank_main(spec_json: str) -> int:
    """``--child-rank``: one rank of a multi-rank figure (exec isolation)."""
    spec = json.loads(spec_json)
    try:
        child_imports()
        emit({"ok": _rank_main(spec, spec["rank"], spec["world"])})
    except BaseException:  # noqa: BLE001
        emit({"error": traceback.format_exc()})
    return 0


def child_server_main() -> int:
    """``--child-server``: import once, then fork a fresh child per request (stdin JSON lines)."""
    child_imports()
    # Children would otherwise walk (and copy-on-write) every object of the imports on gc.
    gc.collect()
    gc.freeze()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        spec = json.loads(line)
        procs = [fork_call(lambda: run_op(spec))]
        (res,) = collect_forked(procs, spec.get("timeout", CHILD_TIMEOUT_S))
        emit(res)
    return 0
