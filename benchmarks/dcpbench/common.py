"""Helpers shared by the parent and the measurement processes; never imports torch."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import selectors
import signal
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

PKG = os.path.dirname(os.path.abspath(__file__))
HERE = os.path.dirname(PKG)
REPO = os.path.dirname(HERE)
#: The script the parent starts measurement processes from.
SCRIPT = os.path.join(HERE, "run.py")
RESULT_MARK = "@@RESULT "
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

#: How long one figure (one child process) may take before it is killed.
CHILD_TIMEOUT_S = 600.0
#: Chunk of one raw pread/pwrite call (dcp_native's default unit of work).
RAW_CHUNK = 8 * MiB


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


def fork_call(fn: Callable[[], dict]) -> tuple[int, int]:
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


def collect_forked(procs: list[tuple[int, int]], timeout: float) -> list[dict]:
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


def emit(result: dict) -> None:
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def parse_result(stdout: str, returncode: int | None) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    return {"error": f"child exited with {returncode} without a result; output:\n{stdout[-2000:]}"}


def summarize(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "samples": values,
    }

