#!/usr/bin/env python3
"""Two ranks on two GPUs: does a rank create a CUDA context on a GPU that is not its own?

On a multi-GPU node every rank uses one device (rank r: ``cuda:r``). A rank
that calls the CUDA runtime on device 0 by mistake (from a fresh thread, whose
current device is the runtime's default 0; ``cudaHostAlloc``,
``cudaHostRegister``, a stream or an event made without a device guard) gets a
CUDA context of its own on GPU 0: hundreds of MiB of GPU 0's memory per rank, so
on an 8-GPU node seven such contexts take GiBs from rank 0, and its kernels share
the GPU with them. One GPU cannot show it, so the tests cannot; this script
checks it on a machine with two or more.

For each engine (``--backends``, default ``native,python``: ``DCP_NATIVE_BACKEND``
in the ranks; the native engine stages device memory through its own pinned
pools and threads, the Python engine through torch's copies), the parent:

1. starts 2 rank processes (gloo over a ``FileStore``; no NCCL). Rank r calls
   ``torch.cuda.set_device(r)`` before anything touches CUDA, builds a state
   dict of about 45 MiB on ``cuda:r`` (keys of its own; a key both ranks hold
   with the same values, which DCP saves once, so one rank loads it from a file
   the other wrote; an object), and:

   * saves it with ``dcp.save`` and ``dcp_native.FileSystemWriter``, loads it into
     fresh CUDA tensors with ``dcp_native.FileSystemReader``, compares bit for bit;
   * ``dcp_native.async_save`` (staging on the calling thread), then
     ``dcp.async_save`` with ``FileSystemWriter(async_staging=True)`` (staging on a
     background thread); the source tensors are changed as soon as staging has
     completed, and each checkpoint must load as the values at the call;
   * reports which devices hold a primary CUDA context of its process (driver
     API, ``cuDevicePrimaryCtxGetState``: it must be its own device only), and
     waits, alive, until the parent is done looking;

2. while both ranks are alive, runs ``nvidia-smi --query-compute-apps`` and
   ``--query-gpu`` and checks that each rank, and every process descended from
   it, has process entries on its own GPU only: above all rank 1 none on GPU 0
   (the GPU rank 0 uses). Each rank must also appear on its own GPU: where it
   does not (a container with its own PID namespace, whose pids nvidia-smi
   does not show), the table proves nothing and the check fails as inconclusive.

The last line printed is ``PASS: ...``, ``FAIL: ...`` or ``SKIP: ...``; the exit
status is 0 for PASS and SKIP (fewer than 2 GPUs, or no nvidia-smi), 1 for FAIL
or any error. ``--out FILE`` writes the result as JSON: ``gpus``, ``pids`` (per
run, per rank), ``child_pids``, ``processes_per_gpu`` (per run, per nvidia-smi
index), ``primary_contexts``, ``runs`` (each run's checks and failures),
``passed`` (null when skipped), ``skipped``, ``reason``. Everything has a time
limit (``--timeout``, 90 s for the whole check): a rank that hangs is killed and
the check fails, saying which.

``benchmarks/gpu_check.sh`` runs it after its tests step. ``--device cpu`` runs
the same steps with CPU tensors, to check the script itself on a machine without
GPUs (with ``--nvidia-smi`` pointing at a stand-in that prints a table).

Usage: python benchmarks/multi_gpu_check.py [--out FILE] [--timeout S] [--backends native,python]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MiB = 1 << 20

#: Rank processes, one per GPU (rank r uses cuda:r).
WORLD = 2
#: Seconds a rank's report may lag behind another rank's failed one before the run stops.
FAILURE_GRACE_S = 10.0
#: Seconds the ranks have to exit once the parent is done looking.
EXIT_GRACE_S = 20.0
#: Seconds one nvidia-smi query may take.
NVIDIA_SMI_TIMEOUT_S = 20.0


class Terminated(BaseException):
    """SIGTERM (gpu_check.sh's ``timeout``): the runs end at once, their ranks killed."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(f"terminated by signal {signum}")


def say(msg: str = "") -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- nvidia-smi


def _normalize_uuid(uuid: str | None) -> str | None:
    """The 8-4-4-4-12 hex digits of a GPU's uuid, so that nvidia-smi's ``GPU-6a04...`` and
    torch's spelling compare equal."""
    if not uuid:
        return None
    found = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", uuid.lower())
    return found.group(0) if found else uuid.strip().lower()


def _csv(cmd: list[str]) -> list[list[str]]:
    """Rows of an nvidia-smi ``--format=csv,noheader`` query; raises RuntimeError on failure."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(cmd)} took more than {NVIDIA_SMI_TIMEOUT_S:.0f} s") from None
    except OSError as exc:
        raise RuntimeError(f"{' '.join(cmd)}: {exc}") from None
    if res.returncode != 0:
        out = (res.stderr or res.stdout).strip()
        raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}: {out}")
    rows = []
    for line in res.stdout.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if line.strip() and not line.lower().startswith("no running"):
            rows.append(cells)
    return rows


def query_gpus(smi: str) -> list[dict[str, Any]]:
    """Every GPU nvidia-smi lists: ``{"index", "uuid"}``."""
    rows = _csv([smi, "--query-gpu=index,uuid", "--format=csv,noheader"])
    return [{"index": int(r[0]), "uuid": r[1]} for r in rows if len(r) >= 2 and r[0].isdigit()]


def query_apps(smi: str) -> list[dict[str, Any]]:
    """Every compute process nvidia-smi lists: ``{"pid", "gpu_uuid", "used_memory"}``."""
    rows = _csv([smi, "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader"])
    return [{"pid": int(r[0]), "gpu_uuid": r[1], "used_memory": r[2]}
            for r in rows if len(r) >= 3 and r[0].isdigit()]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) >= 2:
            children.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return sorted(out)


# ----------------------------------------------------------------------------- rank process


def _primary_contexts() -> tuple[list[int] | None, str]:
    """CUDA ordinals whose primary context is active in this process (driver API); None and why not."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count, dev, flags, active = ctypes.c_int(), ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return None, "cuInit or cuDeviceGetCount failed"
        out = []
        for ordinal in range(count.value):
            if cuda.cuDeviceGet(ctypes.byref(dev), ordinal) != 0:
                return None, f"cuDeviceGet({ordinal}) failed"
            if cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active)) != 0:
                return None, f"cuDevicePrimaryCtxGetState({ordinal}) failed"
            if active.value:
                out.append(ordinal)
        return out, ""
    except (OSError, AttributeError) as exc:
        return None, f"driver API not available: {exc}"


def _state_dict(torch: Any, rank: int, device: str) -> dict[str, Any]:
    """About 45 MiB on ``device``: keys of this rank's own, a key both ranks hold with equal
    values, an object."""
    own = torch.Generator(device=device).manual_seed(1000 + rank)
    shared = torch.Generator(device=device).manual_seed(7)
    p = f"rank{rank}."
    return {
        # 36 MiB: more than one 32 MiB piece of the native engine's device staging.
        p + "w": torch.randn(2304, 4096, generator=own, device=device),
        p + "w_bf16": torch.randn(1024, 2048, generator=own, device=device).to(torch.bfloat16),
        p + "idx": torch.randint(-(1 << 40), 1 << 40, (100_003,), generator=own, device=device),
        p + "bias": torch.randn(4097, generator=own, device=device),
        # Same key and values on both ranks: DCP saves it once, on one rank; both load it.
        "shared.embed": torch.randn(512, 1024, generator=shared, device=device),
        "step": 42,
    }


def _blank(torch: Any, sd: dict[str, Any]) -> dict[str, Any]:
    """Fresh destinations like ``sd``'s, filled with -7 (and objects with 0)."""
    return {k: torch.zeros_like(v).fill_(-7) if isinstance(v, torch.Tensor) else 0
            for k, v in sd.items()}


def _differences(torch: Any, got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Every key whose loaded value is not bit for bit the expected one."""
    bad = []
    for k, w in want.items():
        g = got.get(k)
        if not isinstance(w, torch.Tensor):
            if g != w:
                bad.append(f"{k}: got {g!r}, want {w!r}")
            continue
        if not isinstance(g, torch.Tensor) or (g.device, g.dtype, g.shape) != (
                w.device, w.dtype, w.shape):
            bad.append(f"{k}: got {getattr(g, 'device', None)} {getattr(g, 'dtype', type(g))}"
                       f"{list(getattr(g, 'shape', []))}, want {w.device} {w.dtype}{list(w.shape)}")
            continue
        gb = g.contiguous().reshape(-1).view(torch.uint8)
        wb = w.contiguous().reshape(-1).view(torch.uint8)
        if not torch.equal(gb, wb):
            bad.append(f"{k}: {int((gb != wb).sum())} of {wb.numel()} bytes differ")
    return bad


def _result(fut: Any, timeout: float) -> None:
    """Waits for what DCP's async_save returned: a future, or a response with ``upload_completion``."""
    getattr(fut, "upload_completion", fut).result(timeout=max(1.0, timeout))


def _work(rank: int, device: str, limit: float, rundir: str, report: dict[str, Any]) -> None:
    """Rank ``rank``'s saves and loads; appends what passed to ``report["checks"]``, raises at
    the first failure."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import dcp_native

    start = time.monotonic()

    def left() -> float:
        return limit - (time.monotonic() - start)

    checks = report["checks"]
    report["backend"] = dcp_native.backend()
    try:
        from dcp_native._backend import get_engine

        status = get_engine().cuda_status()
        report["cuda_status"] = {"usable": status.usable, "reason": status.reason,
                                 "library": status.library}
    except Exception as exc:  # a private helper: report, do not fail on it
        report["cuda_status"] = {"usable": None, "reason": f"not known: {exc!r}", "library": ""}

    want = _state_dict(torch, rank, device)
    nbytes = sum(v.numel() * v.element_size() for v in want.values() if isinstance(v, torch.Tensor))

    def load_and_compare(label: str, path: str) -> None:
        t0 = time.monotonic()
        out = _blank(torch, want)
        reader = dcp_native.FileSystemReader(path)
        try:
            dcp.load(out, storage_reader=reader)
        finally:
            getattr(reader, "close", lambda: None)()
        if device != "cpu":
            torch.cuda.synchronize()
        bad = _differences(torch, out, want)
        if bad:
            raise AssertionError(f"{label}: the load from {path} differs: " + "; ".join(bad))
        checks.append(f"{label}: loaded into fresh {device} tensors, bit-exact "
                      f"({len(want)} keys, {nbytes / MiB:.1f} MiB, {time.monotonic() - t0:.2f} s)")

    def change(sd: dict[str, Any]) -> None:
        """What training does right after async_save returns: the checkpoint must not see it."""
        for v in sd.values():
            if isinstance(v, torch.Tensor):
                v.add_(1)

    # 1. dcp.save with dcp_native's writer (2 I/O threads), load with its reader.
    path = os.path.join(rundir, "ckpt_save")
    t0 = time.monotonic()
    writer = dcp_native.FileSystemWriter(path, thread_count=2, sync_files=False)
    try:
        dcp.save({k: v for k, v in want.items()}, storage_writer=writer)
    finally:
        getattr(writer, "close", lambda: None)()
    checks.append(f"dcp.save: {nbytes / MiB:.1f} MiB from {device} in {time.monotonic() - t0:.2f} s")
    load_and_compare("dcp.save", path)

    # 2. dcp_native.async_save: staging on this thread, the writes in DCP's background thread.
    path = os.path.join(rundir, "ckpt_async")
    sd = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in want.items()}
    t0 = time.monotonic()
    fut = dcp_native.async_save(sd, checkpoint_id=path)
    blocked = time.monotonic() - t0
    change(sd)
    _result(fut, left())
    checks.append(f"dcp_native.async_save: blocked {blocked:.2f} s, "
                  f"complete in {time.monotonic() - t0:.2f} s")
    load_and_compare("dcp_native.async_save", path)

    # 3. dcp.async_save with FileSystemWriter(async_staging=True): staging on a background thread.
    path = os.path.join(rundir, "ckpt_async_staging")
    sd = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in want.items()}
    writer = dcp_native.FileSystemWriter(path, thread_count=2, sync_files=False, async_staging=True)
    try:
        t0 = time.monotonic()
        res = dcp.async_save(sd, storage_writer=writer, checkpoint_id=path)
        staged = getattr(res, "staging_completion", None)
        if staged is not None:
            staged.result(timeout=max(1.0, left()))
            change(sd)
            _result(res, left())
            how = "tensors changed once staging completed"
        else:  # a torch whose async_save waits for staging itself
            change(sd)
            _result(res, left())
            how = "no staging_completion from this torch: tensors changed at return"
        checks.append(f"dcp.async_save(async_staging=True): complete in "
                      f"{time.monotonic() - t0:.2f} s ({how})")
    finally:
        getattr(writer, "close", lambda: None)()
    load_and_compare("dcp.async_save(async_staging=True)", path)

    # Every rank has finished its saves and loads (and DCP's background threads theirs).
    dist.barrier()


def rank_main(args: argparse.Namespace) -> int:
    """One rank: set the device first, do the work, report, wait for the parent's go, exit."""
    rank, rundir, device = args.rank, args.rundir, args.device
    start = time.monotonic()
    parent = os.getppid()
    report: dict[str, Any] = {"rank": rank, "pid": os.getpid(), "device": device, "checks": [],
                              "error": None, "device_uuid": None}
    dist = None
    try:
        import torch

        if device == "cuda":
            torch.cuda.set_device(rank)  # before anything else touches CUDA
            device = f"cuda:{rank}"
            report["device"] = device
            uuid = getattr(torch.cuda.get_device_properties(rank), "uuid", None)
            report["device_uuid"] = str(uuid) if uuid is not None else None
        import datetime

        import torch.distributed as dist

        dist.init_process_group(
            "gloo", store=dist.FileStore(os.path.join(rundir, "store"), WORLD), rank=rank,
            world_size=WORLD, timeout=datetime.timedelta(seconds=max(5.0, args.limit)),
        )
        _work(rank, device, args.limit - (time.monotonic() - start), rundir, report)
    except BaseException as exc:  # CheckpointException is a BaseException
        report["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stdout)
    if device != "cpu":
        report["primary_contexts"], report["primary_contexts_note"] = _primary_contexts()
    tmp = os.path.join(rundir, f"rank{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.replace(tmp, os.path.join(rundir, f"rank{rank}.json"))

    # Stay alive (with every context this process made) until the parent has looked.
    go = os.path.join(rundir, "go")
    while not os.path.exists(go):
        if time.monotonic() - start > args.limit + EXIT_GRACE_S or os.getppid() != parent:
            print("no go from the parent in time; exiting", flush=True)
            return 1
        time.sleep(0.05)
    if dist is not None and dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except BaseException as exc:
            print(f"exit barrier: {type(exc).__name__}: {exc}", flush=True)
    return 0 if report["error"] is None else 1


# ----------------------------------------------------------------------------- parent


def _kill(procs: list[subprocess.Popen]) -> list[int]:
    """Kills each rank's process group (the rank and what it started); returns the ranks that
    were still running.

    A group outlives its leader while a member lives, and its id is not reused meanwhile, so the
    group of a rank that has exited is killed too (anything it left behind)."""
    running = [rank for rank, p in enumerate(procs) if p.poll() is None]
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
    return running


def _tail(path: str, lines: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as exc:
        return f"({exc})\n"


def run_once(backend: str, args: argparse.Namespace, workdir: str, gpus: list[dict[str, Any]],
             limit: float, end: float) -> dict[str, Any]:
    """One run of 2 ranks with ``DCP_NATIVE_BACKEND=backend``; returns its record (passed when
    its ``failures`` are empty).

    The ranks have ``limit`` seconds to report; every rank is gone by ``end`` (``time.monotonic()``)
    or a few seconds after it."""
    rundir = os.path.join(workdir, backend)
    os.makedirs(rundir)
    pythonpath = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, DCP_NATIVE_BACKEND=backend, PYTHONPATH=pythonpath)
    say(f"=== run {backend}: 2 ranks, DCP_NATIVE_BACKEND={backend}, device {args.device}, "
        f"limit {limit:.0f} s")
    run: dict[str, Any] = {"backend": backend, "pids": {}, "child_pids": {}, "processes_per_gpu": {},
                           "primary_contexts": {}, "reports": {}, "failures": [], "exit_status": {}}
    failures = run["failures"]
    start = time.monotonic()
    deadline = start + limit
    procs: list[subprocess.Popen] = []
    reports: dict[int, dict[str, Any]] = {}
    try:
        for rank in range(WORLD):
            with open(os.path.join(rundir, f"rank{rank}.log"), "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--rank", str(rank), "--rundir", rundir,
                     "--device", args.device, "--limit", f"{limit:.1f}"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    start_new_session=True,  # its own process group: killed with what it starts
                ))
            run["pids"][str(rank)] = procs[-1].pid

        # Wait for every rank's report, a rank that exits without one, or the time limit.
        while True:
            for rank in range(WORLD):
                path = os.path.join(rundir, f"rank{rank}.json")
                if rank not in reports and os.path.exists(path):
                    with open(path) as f:
                        reports[rank] = json.load(f)
                    if reports[rank]["error"] is not None:  # the others may wait in a collective for it
                        deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
            missing = [r for r in range(WORLD) if r not in reports]
            if not missing:
                break
            gone = [r for r in missing if procs[r].poll() is not None]
            if gone:
                for r in gone:
                    failures.append(f"rank {r} (pid {procs[r].pid}) exited with status "
                                    f"{procs[r].returncode} without reporting")
                break
            if time.monotonic() >= deadline:
                for r in missing:
                    failures.append(f"rank {r} (pid {procs[r].pid}) did not report within "
                                    f"{time.monotonic() - start:.0f} s")
                break
            time.sleep(0.1)
        run["reports"] = {str(r): rep for r, rep in reports.items()}
        for r, rep in sorted(reports.items()):
            if rep.get("error"):
                failures.append(f"rank {r}: {rep['error']}")
            if rep.get("backend") not in (None, backend):
                failures.append(f"rank {r}: ran the {rep['backend']} engine, not {backend}")
            status = rep.get("cuda_status") or {}
            if args.device == "cuda" and backend == "native" and status.get("usable") is False:
                failures.append(f"rank {r}: the native engine's CUDA path is not usable "
                                f"({status.get('reason')}): this run did not exercise it")
            if rep.get("primary_contexts") is not None:
                run["primary_contexts"][str(r)] = rep["primary_contexts"]
                if rep["primary_contexts"] != [r]:
                    failures.append(f"rank {r} (pid {rep['pid']}) holds primary CUDA contexts on "
                                    f"devices {rep['primary_contexts']} (driver API); it must hold "
                                    f"only device {r}'s")

        # While every rank that reported is alive: who has a context where.
        alive = [r for r in reports if procs[r].poll() is None]
        if alive:
            _look(run, args, gpus, procs, reports)
        elif not failures:
            failures.append("no rank was alive to look at")
    finally:
        with open(os.path.join(rundir, "go"), "w"):
            pass
        # Ranks exit within a second of the go; a rank that never reported is not waited for long.
        grace = EXIT_GRACE_S if len(reports) == WORLD else 2.0
        if isinstance(sys.exc_info()[1], Terminated):
            grace = 0.0
        exit_by = time.monotonic() + min(grace, max(2.0, end - time.monotonic()))
        for p in procs:
            try:
                p.wait(max(0.1, exit_by - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        killed = _kill(procs)
        for rank, p in enumerate(procs):
            run["exit_status"][str(rank)] = p.returncode
    for rank, p in enumerate(procs):
        if any(f.startswith(f"rank {rank} ") or f.startswith(f"rank {rank}:") for f in failures):
            continue  # already said what went wrong with it
        if rank in killed:
            failures.append(f"rank {rank} (pid {p.pid}) did not exit after the check; killed")
        elif p.returncode != 0:
            failures.append(f"rank {rank} (pid {p.pid}) exited with status {p.returncode}")
    _print_run(run, rundir, gpus)
    return run


def _look(run: dict[str, Any], args: argparse.Namespace, gpus: list[dict[str, Any]],
          procs: list[subprocess.Popen], reports: dict[int, dict[str, Any]]) -> None:
    """Runs nvidia-smi while the ranks are alive; fills ``processes_per_gpu`` and adds failures."""
    failures = run["failures"]
    owner: dict[int, str] = {os.getpid(): "this script (parent)"}
    rank_of: dict[int, int] = {}
    for rank, p in enumerate(procs):
        kids = descendants(p.pid)
        run["child_pids"][str(rank)] = kids
        owner[p.pid], rank_of[p.pid] = f"rank {rank}", rank
        for kid in kids:
            owner[kid], rank_of[kid] = f"rank {rank} (descendant pid {kid} of {p.pid})", rank
    try:
        apps = query_apps(args.nvidia_smi)
        gpus[:] = query_gpus(args.nvidia_smi) or gpus
    except RuntimeError as exc:
        failures.append(f"nvidia-smi: {exc}")
        return
    index_of = {_normalize_uuid(g["uuid"]): g["index"] for g in gpus}
    table: dict[str, list[dict[str, Any]]] = {str(g["index"]): [] for g in gpus}
    for app in apps:
        index = index_of.get(_normalize_uuid(app["gpu_uuid"]))
        entry = dict(app, owner=owner.get(app["pid"], "other"))
        table.setdefault(str(index) if index is not None else app["gpu_uuid"], []).append(entry)
    run["processes_per_gpu"] = table

    # Each rank's own GPU: the uuid torch gave it, else nvidia-smi's index r (CUDA_VISIBLE_DEVICES
    # applied).
    own: dict[int, int | None] = {}
    for rank in range(WORLD):
        uuid = _normalize_uuid((reports.get(rank) or {}).get("device_uuid"))
        own[rank] = index_of.get(uuid) if uuid else None
        if own[rank] is None:
            own[rank] = _visible_index(rank)
            if uuid:
                say(f"note: rank {rank}'s device uuid {uuid!r} is not among nvidia-smi's; "
                    f"taking GPU {own[rank]} (CUDA_VISIBLE_DEVICES order) as its own")
    run["own_gpu"] = {str(r): i for r, i in own.items()}
    for rank in range(WORLD):
        if own[rank] is None:
            failures.append(f"rank {rank}: cannot tell which nvidia-smi GPU is its cuda:{rank}")
    for app in apps:
        rank = rank_of.get(app["pid"])
        if rank is None:
            continue
        index = index_of.get(_normalize_uuid(app["gpu_uuid"]))
        if index != own[rank]:
            failures.append(f"{owner[app['pid']]} (pid {app['pid']}) has a process entry on GPU "
                            f"{index} ({app['gpu_uuid']}, {app['used_memory']}): it must use GPU "
                            f"{own[rank]} only")
    for rank, p in enumerate(procs):
        seen = any(a["pid"] == p.pid and index_of.get(_normalize_uuid(a["gpu_uuid"])) == own[rank]
                   for a in apps)
        if rank in reports and p.poll() is None and own[rank] is not None and not seen:
            failures.append(
                f"inconclusive: nvidia-smi lists no process entry of rank {rank} (pid {p.pid}) on "
                f"its own GPU {own[rank]}, where it holds tensors: the pids it shows are not this "
                "machine's view (a container with its own PID namespace?), so the table cannot "
                "show where the ranks are")


def _visible_index(rank: int) -> int | None:
    """nvidia-smi's index of CUDA ordinal ``rank``, from CUDA_VISIBLE_DEVICES (when it lists indices)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return rank
    items = [v.strip() for v in visible.split(",") if v.strip()]
    return int(items[rank]) if rank < len(items) and items[rank].isdigit() else None


def _print_run(run: dict[str, Any], rundir: str, gpus: list[dict[str, Any]]) -> None:
    backend = run["backend"]
    for rank in range(WORLD):
        rep = run["reports"].get(str(rank)) or {}
        kids = run["child_pids"].get(str(rank))
        say(f"rank {rank}: pid {run['pids'].get(str(rank))}, device {rep.get('device', '?')} "
            f"(uuid {rep.get('device_uuid')}), engine {rep.get('backend', '?')}, "
            f"descendants {kids if kids is not None else '?'}, "
            f"exit status {run['exit_status'].get(str(rank))}")
        status = rep.get("cuda_status")
        if status:
            say(f"  cuda_status: usable={status.get('usable')} {status.get('reason') or ''} "
                f"{status.get('library') or ''}".rstrip())
        for check in rep.get("checks", []):
            say(f"  ok: {check}")
        if "primary_contexts" in rep:
            say(f"  primary CUDA contexts of this process (driver API): {rep['primary_contexts']} "
                f"{rep.get('primary_contexts_note') or ''}".rstrip())
    say(f"processes per GPU (nvidia-smi, while the ranks were alive), run {backend}:")
    table = run["processes_per_gpu"]
    if not table:
        say("  (not queried)")
    uuids = {str(g["index"]): g["uuid"] for g in gpus}
    for key in sorted(table, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k)):
        say(f"  GPU {key} {uuids.get(key, '')}:" + ("" if table[key] else " (no processes)"))
        for app in table[key]:
            say(f"    pid {app['pid']:>8}  {app['used_memory']:>10}  {app['owner']}")
    for failure in run["failures"]:
        say(f"  FAILED: {failure}")
    if run["failures"]:
        for rank in range(WORLD):
            say(f"--- rank {rank} output (tail):")
            sys.stdout.write(_tail(os.path.join(rundir, f"rank{rank}.log"), 60))
    say(f"run {backend}: {'FAIL' if run['failures'] else 'PASS'}")


def finish(result: dict[str, Any], out: str | None) -> int:
    if out:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(tmp, out)
    if result["skipped"]:
        say(result["reason"])
        return 0
    say(("PASS: " if result["passed"] else "FAIL: ") + result["reason"])
    return 0 if result["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", help="write the result as JSON to this file")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds for the whole check")
    p.add_argument("--backends", default="native,python",
                   help="DCP_NATIVE_BACKEND of each run, in order")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the same steps on CPU tensors, to check this script without GPUs")
    p.add_argument("--nvidia-smi", default="nvidia-smi", help="the nvidia-smi to query")
    p.add_argument("--dir", default=None, help="scratch directory for the checkpoints (removed after)")
    # The rank processes' own arguments.
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rundir", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank is not None:
        return rank_main(args)

    start = time.monotonic()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    result: dict[str, Any] = {
        "gpus": [], "torch_device_count": None, "device": args.device, "backends": backends,
        "pids": {}, "child_pids": {}, "processes_per_gpu": {}, "primary_contexts": {}, "runs": [],
        "passed": None, "skipped": False, "reason": "",
    }
    try:
        import torch

        count = torch.cuda.device_count()  # cudaGetDeviceCount: creates no context
        result["torch_device_count"] = count
        say(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"{count} CUDA device(s) visible to torch")
        if args.device == "cuda" and count < WORLD:
            result.update(skipped=True,
                          reason=f"SKIP: fewer than 2 GPUs (torch sees {count}); nothing checked")
            return finish(result, args.out)
        if shutil.which(args.nvidia_smi) is None:
            result.update(skipped=True,
                          reason=f"SKIP: nvidia-smi not found ({args.nvidia_smi!r} is not on PATH): "
                                 "the per-GPU process table cannot be read; nothing checked")
            return finish(result, args.out)
        gpus = query_gpus(args.nvidia_smi)
        result["gpus"] = gpus
        for g in gpus:
            say(f"GPU {g['index']}: {g['uuid']}")
        if args.device == "cuda" and os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
            say(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}: ranks are matched to "
                "nvidia-smi's GPUs by uuid")
    except Exception as exc:
        result.update(passed=False, reason=f"error before the runs: {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stdout)
        return finish(result, args.out)

    # SIGTERM (gpu_check.sh's timeout) ends the runs through their clean-up, which kills the ranks.
    signal.signal(signal.SIGTERM, _terminate)
    workdir = tempfile.mkdtemp(prefix="dcp_native_multi_gpu_", dir=args.dir)
    end = start + args.timeout
    try:
        for i, backend in enumerate(backends):
            # What is left, less a few seconds to end the last run, shared by the runs to come.
            left = end - time.monotonic() - 5.0
            limit = left / (len(backends) - i)
            if limit < 15.0:
                result["runs"].append({"backend": backend,
                                       "failures": [f"not run: only {left:.0f} s left"]})
                continue
            run = run_once(backend, args, workdir, result["gpus"], limit, end)
            result["runs"].append(run)
            for key in ("pids", "child_pids", "processes_per_gpu", "primary_contexts"):
                result[key][backend] = run[key]
    except BaseException as exc:
        done = len(result["runs"])
        backend = backends[done] if done < len(backends) else "?"
        if isinstance(exc, Terminated):
            result["runs"].append({"backend": backend, "failures": [f"{exc} during this run"]})
        else:
            result["runs"].append({"backend": backend,
                                   "failures": [f"error: {type(exc).__name__}: {exc}"]})
            traceback.print_exc(file=sys.stdout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    failed = [f"[{run['backend']}] {f}" for run in result["runs"] for f in run["failures"]]
    result["passed"] = not failed and len(result["runs"]) == len(backends) > 0
    if result["passed"]:
        result["reason"] = (f"every rank used only its own GPU ({', '.join(backends)} engine runs, "
                            f"{time.monotonic() - start:.0f} s)")
    else:
        result["reason"] = "; ".join(failed) or "no run"
    return finish(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
