"""Runs one figure per fresh process (forked from an import-only server, or exec'd)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

from .common import CHILD_TIMEOUT_S, RESULT_MARK, SCRIPT, parse_result


class ChildFailed(RuntimeError):
    pass


class _Server:
    """One ``--child-server`` process and the unread part of its output."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, SCRIPT, "--child-server"],
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

    def close(self, kill: bool = False) -> None:
        servers, self.servers = self.servers, {}
        for srv in servers.values():
            srv.stop(kill=kill)

    def run(self, spec: dict, slot: int = 0) -> dict:
        spec = dict(spec, isolation=self.isolation)
        res = self._run_fork(spec, slot) if self.isolation == "fork" else self._run_exec(spec)
        if "error" in res:
            raise ChildFailed(res["error"])
        return res["ok"]

    def _run_exec(self, spec: dict) -> dict:
        limit = spec.get("timeout", CHILD_TIMEOUT_S)
        try:
            proc = subprocess.run(
                [sys.executable, SCRIPT, "--child", json.dumps(spec)],
                stdout=subprocess.PIPE,
                text=True,
                timeout=limit,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"child timed out after {limit} s"}
        return parse_result(proc.stdout, proc.returncode)

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
        # A spec may carry its own limit (the server's child honours it too).
        deadline = time.monotonic() + spec.get("timeout", CHILD_TIMEOUT_S) + 30
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

