"""Helpers the I/O tests share: the files of a checkpoint directory, and DCP's wrapped errors.

dcp_native tags every file of a save with the save's tag
(``__0_0.1a2b3c4d.distcp``, see dcp_native.commit); stock's files have none.
"""

from __future__ import annotations

import os
import re
from typing import Callable

_DATA = re.compile(r"^__(\d+)_(\d+)(?:\.[0-9a-f]{8})?\.distcp$")


def failure(exc_info) -> BaseException:
    """The error a rank raised: DCP wraps per-rank failures in CheckpointException.

    Takes a pytest ``ExceptionInfo`` or an exception.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    exc = getattr(exc_info, "value", exc_info)
    if isinstance(exc, CheckpointException):
        return next(iter(exc.failures.values()))[0]
    return exc


def data_files(path) -> list[str]:
    """Names of the data files in ``path``, sorted by (rank, number)."""
    found = []
    for name in os.listdir(path):
        m = _DATA.match(name)
        if m:
            found.append(((int(m.group(1)), int(m.group(2))), name))
    return [name for _, name in sorted(found)]


def data_file(path, rank: int = 0, n: int = 0) -> str:
    """The full path of data file ``n`` of ``rank`` (the only one with that number)."""
    names = [
        name for name in data_files(path) if _DATA.match(name).groups()[:2] == (str(rank), str(n))
    ]
    assert len(names) == 1, (path, rank, n, sorted(os.listdir(path)))
    return os.path.join(str(path), names[0])


def sidecar_file(path) -> str:
    """The full path of the sidecar of the committed checkpoint in ``path``."""
    import io

    from dcp_native import sidecar
    from dcp_native._safe_pickle import load_metadata

    with open(os.path.join(path, ".metadata"), "rb") as f:
        md = load_metadata(io.BytesIO(f.read()), ".metadata")
    return os.path.join(str(path), sidecar.file_name(".metadata", md.storage_meta.save_id))


def in_child(fn: Callable[[], str]) -> tuple[int, str]:
    """Run ``fn()`` in a forked child; returns (exit code, what it wrote to the pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.write(w, fn().encode())
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported through the pipe
            os.write(w, repr(exc).encode()[:4000])
        finally:
            os._exit(code)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status), out.decode()
