"""Run a function on N gloo ranks on this machine, for the multi-rank tests.

``run_ranks(world_size, fn, *args, engine=..., timeout=...)`` starts one
process per rank, joins them into a gloo process group through a FileStore in
a fresh temporary directory, calls ``fn(*args)`` on every rank and returns the
per-rank return values (rank order). What it guarantees:

* an exception on any rank is raised here as :class:`RankError`, with the
  remote traceback of every rank that failed (the first failure first: later
  ones are usually peers noticing that the failed rank went away);
* a rank that dies without reporting (a crash in native code) is named with
  its exit code or signal;
* nothing hangs: past ``timeout`` every rank still running is killed and
  :class:`RankTimeout` says which ranks had not finished; after a failure the
  other ranks get a short grace period before they are killed;
* every rank destroys its process group on the way out.

Processes are forked: a fork costs milliseconds where a spawn re-imports
torch (seconds per rank), and forking a process that has imported torch but
never initialised a process group is what torch's own DataLoader workers do.
The children start from the pytest process's state (imported modules, the
warning filters of the running test), so ``fn`` may be a local function or
closure. ``DCP_NATIVE_TEST_START_METHOD=spawn`` switches to spawn, which needs
``fn`` and its arguments to be picklable and importable.

"""

from __future__ import annotations

import datetime
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

#: Seconds the other ranks get to report after one rank failed, before they are killed.
FAILURE_GRACE_S = 5.0


class RankError(RuntimeError):
    """One or more ranks raised (or died); the message holds their remote tracebacks.

    Attributes:
        failures: ``{rank: (exception type name, formatted traceback)}``.
    """

    def __init__(self, message: str, failures: dict[int, tuple[str, str]]) -> None:
        super().__init__(message)
        self.failures = failures


class RankTimeout(RankError):
    """The ranks did not all finish within the timeout and were killed."""


def _worker(
    rank: int,
    world_size: int,
    store_path: str,
    engine: str | None,
    pg_timeout_s: float,
    conn: multiprocessing.connection.Connection,
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
) -> None:
    import torch
    import torch.distributed as dist

    if engine is not None:
        os.environ["DCP_NATIVE_BACKEND"] = engine
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    # Several ranks share few cores: intra-op threads would only oversubscribe them.
    torch.set_num_threads(1)
    message: tuple
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        try:
            message = ("ok", fn(*args, **kwargs))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        message = ("error", type(exc).__name__, traceback.format_exc())
    try:
        conn.send(message)
    except Exception as exc:  # an unpicklable return value
        conn.send(("error", type(exc).__name__, f"rank {rank} result cannot be sent: {exc!r}\n"))
    conn.close()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _start_method() -> str:
    method = os.environ.get("DCP_NATIVE_TEST_START_METHOD", "fork")
    if method not in multiprocessing.get_all_start_methods():
        raise ValueError(f"DCP_NATIVE_TEST_START_METHOD={method!r} is not available here")
    return method


def run_ranks(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    engine: str | None = None,
    timeout: float = 120.0,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return each rank's result.

    Args:
        world_size: number of ranks (processes).
        fn: called once per rank after ``init_process_group``; it finds its rank
            with ``torch.distributed.get_rank()``. Its return value must pickle.
        engine: value of ``DCP_NATIVE_BACKEND`` in every rank (``None``: inherited).
        timeout: seconds for the whole run, start-up included; then every rank is killed.

    Raises:
        RankError: a rank raised or died; the message has every remote traceback.
        RankTimeout: the run took longer than ``timeout``.

    Example:
        >>> import torch.distributed as dist
        >>> run_ranks(2, dist.get_rank)
        [0, 1]
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    ctx = multiprocessing.get_context(_start_method())
    tmpdir = tempfile.mkdtemp(prefix="dcp_native_dist_")
    store_path = os.path.join(tmpdir, "store")
    deadline = time.monotonic() + timeout
    procs: list[multiprocessing.process.BaseProcess] = []
    conns: list[multiprocessing.connection.Connection] = []
    try:
        for rank in range(world_size):
            parent_conn, child_conn = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker,
                args=(rank, world_size, store_path, engine, timeout, child_conn, fn, args, kwargs),
                name=f"dcp_native-rank{rank}",
                daemon=True,
            )
            proc.start()
            child_conn.close()
            procs.append(proc)
            conns.append(parent_conn)
        return _collect(procs, conns, deadline, timeout)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(5)
        for conn in conns:
            conn.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


def _collect(
    procs: list[multiprocessing.process.BaseProcess],
    conns: list[multiprocessing.connection.Connection],
    deadline: float,
    timeout: float,
) -> list[Any]:
    world_size = len(procs)
    results: dict[int, Any] = {}
    failures: dict[int, tuple[str, str]] = {}  # insertion order = order of arrival
    pending = set(range(world_size))
    by_conn = {id(c): r for r, c in enumerate(conns)}
    by_sentinel = {p.sentinel: r for r, p in enumerate(procs)}
    failed_at: float | None = None

    while pending:
        now = time.monotonic()
        limit = deadline if failed_at is None else min(deadline, failed_at + FAILURE_GRACE_S)
        if now >= limit:
            break
        waitables: list[Any] = [conns[r] for r in pending] + [procs[r].sentinel for r in pending]
        ready = multiprocessing.connection.wait(waitables, timeout=limit - now)
        for obj in ready:
            rank = by_conn.get(id(obj))
            if rank is None:
                rank = by_sentinel.get(obj)
            if rank is None or rank not in pending:
                continue
            message = None
            if conns[rank].poll():
                try:
                    message = conns[rank].recv()
                except (EOFError, OSError):
                    message = None
            if message is None:
                if obj is conns[rank] or procs[rank].exitcode is None:
                    # The pipe closed: the process is exiting; its sentinel will follow.
                    procs[rank].join(1)
                how = _describe_exit(procs[rank].exitcode)
                failures[rank] = ("died", f"rank {rank} ended without reporting ({how})\n")
            elif message[0] == "ok":
                results[rank] = message[1]
            else:
                failures[rank] = (message[1], message[2])
            pending.discard(rank)
            if rank in failures and failed_at is None:
                failed_at = time.monotonic()

    if pending and not failures:
        raise RankTimeout(
            f"{world_size}-rank run timed out after {timeout:.0f} s; ranks "
            f"{sorted(pending)} had not finished (killed)",
            {r: ("timeout", "") for r in pending},
        )
    if failures:
        parts = []
        for i, (rank, (name, text)) in enumerate(failures.items()):
            tag = "first failure" if i == 0 else "then"
            parts.append(f"----- rank {rank} of {world_size} ({tag}): {name} -----\n{text}")
        if pending:
            parts.append(f"----- ranks {sorted(pending)} had not finished and were killed -----\n")
        first_rank, (first_name, first_text) = next(iter(failures.items()))
        last_line = first_text.strip().splitlines()[-1] if first_text.strip() else first_name
        raise RankError(f"rank {first_rank}: {last_line}\n" + "\n".join(parts), failures)
    return [results[r] for r in range(world_size)]
