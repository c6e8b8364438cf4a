"""A FIFO (or a directory, or a link to a device) in place of a checkpoint file never hangs.

test_special_files.py checks the engines' own opens; this file checks the
whole paths a user takes: ``dcp.load`` through dcp_native's reader,
``dcp-native verify`` and ``dcp-native inspect``, with each file of a
checkpoint written by dcp_native's writer (checksums on) replaced in turn:
the data file, its CRC32C table, the sidecar, ``.metadata`` and the
directory lock. An ``open()`` of a FIFO without O_NONBLOCK blocks until a
writer appears, so every call runs in a daemon thread joined with a timeout
(a subprocess gets ``timeout=``): a hang fails its test instead of the suite.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import dcp_native
from dcp_native import cli
from helpers import data_file, data_files, failure, sidecar_file

#: Long enough for a slow shared machine, short enough that a hang fails quickly.
HANG_TIMEOUT_S = 15.0
SUBPROCESS_TIMEOUT_S = 30.0
# torch warns at import when numpy is absent (as in tests/test_cli.py).
QUIET = "ignore:Failed to initialize NumPy"

FILES = ("data", "table", "sidecar", "metadata")
EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3


# --------------------------------------------------------------------------- helpers


def state() -> dict:
    return {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.arange(5, dtype=torch.int64) * 7,
        "c": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "step": 3,
    }


def empty_like(sd: dict) -> dict:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in sd.items()}


def assert_exact(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        else:
            assert got[k] == v, k


def release(path: str) -> None:
    """Opens the FIFO at both ends for a moment, so that an open() blocked on it returns."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
    except OSError:
        pass


def bounded(call, *, fifo: str | None = None):
    """``call()`` in a daemon thread; its result, or its exception re-raised here.

    If it is still running after HANG_TIMEOUT_S, the FIFO is opened to release
    it and the test fails: something opened a non-regular file without O_NONBLOCK.
    """
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_TIMEOUT_S)
    if thread.is_alive():
        if fifo is not None:
            release(fifo)
        thread.join(5.0)
        pytest.fail(f"blocked for {HANG_TIMEOUT_S:.0f} s with {fifo} in the checkpoint "
                    "(a blocking open?)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def load(path, verify: bool, fifo: str | None = None) -> dict:
    out = empty_like(state())
    reader = dcp_native.FileSystemReader(path, verify=verify)
    bounded(lambda: dcp.load(out, storage_reader=reader, no_dist=True), fifo=fifo)
    return out


def load_error(path, verify: bool, fifo: str | None = None) -> BaseException:
    with pytest.raises((CheckpointException, dcp_native.CheckpointError)) as info:
        load(path, verify, fifo)
    return failure(info.value)


def run_cli(args: list[str], fifo: str | None = None) -> tuple[int, str, str]:
    """``cli.main(args)`` in this process (bounded); returns (exit code, stdout, stderr)."""

    def call():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in args])
        return code, out.getvalue(), err.getvalue()

    code, out, err = bounded(call, fifo=fifo)
    shown = f"$ dcp-native {' '.join(map(str, args))}\n-> {code}\n{out}\n{err}"
    assert "Traceback" not in out + err, shown
    assert code in (EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_FAILED), shown
    return code, out, err


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One checkpoint, saved once; each test damages its own copy."""
    path = tmp_path_factory.mktemp("template") / "ck"
    writer = dcp_native.FileSystemWriter(path, checksums=True)
    dcp.save(state(), storage_writer=writer, no_dist=True)
    return path


def target(ck, which: str) -> str:
    if which == "data":
        return data_file(ck)
    if which == "table":
        return data_file(ck) + ".crc32c"
    if which == "sidecar":
        return sidecar_file(ck)
    if which == "metadata":
        return os.path.join(ck, ".metadata")
    if which == "lock":
        return os.path.join(ck, ".dcp_native.lock")
    raise ValueError(which)


def hostile(template, tmp_path, which: str, kind: str = "fifo") -> tuple[str, str]:
    """A copy of the template with file ``which`` replaced; returns (directory, replaced path)."""
    ck = str(tmp_path / "ck")
    shutil.copytree(template, ck)
    path = target(ck, which)
    assert os.path.isfile(path), (path, sorted(os.listdir(ck)))
    os.remove(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", path)
    else:
        raise ValueError(kind)
    return ck, path


VERIFY = pytest.mark.parametrize("verify", [False, True], ids=["verify_off", "verify_on"])


# --------------------------------------------------------------------------- load


@VERIFY
def test_load_fifo_data_file_refused(engine_name, template, tmp_path, verify):
    ck, fifo = hostile(template, tmp_path, "data")
    err = load_error(ck, verify, fifo)
    assert type(err) is dcp_native.CorruptCheckpointError, repr(err)
    assert err.filename == fifo
    assert err.key in state()
    assert "FIFO" in str(err) and "not a regular file" in str(err)


@VERIFY
def test_load_fifo_checksum_table(engine_name, template, tmp_path, verify):
    ck, fifo = hostile(template, tmp_path, "table")
    if not verify:
        # The table is only opened to check blocks: the load does not need it.
        assert_exact(load(ck, verify, fifo), state())
        return
    err = load_error(ck, verify, fifo)
    assert isinstance(err, dcp_native.IntegrityError), repr(err)
    assert err.filename == fifo
    assert "cannot be verified" in str(err) and "not a regular file" in str(err)


@VERIFY
def test_load_fifo_sidecar_ignored(engine_name, template, tmp_path, verify):
    ck, fifo = hostile(template, tmp_path, "sidecar")
    if not verify:
        # Without the sidecar the reader parses each item's headers instead.
        assert_exact(load(ck, verify, fifo), state())
        return
    err = load_error(ck, verify, fifo)
    assert isinstance(err, dcp_native.IntegrityError), repr(err)
    assert "cannot be verified" in str(err)
    # ... and says why: the sidecar cannot be read, being a FIFO.
    assert os.path.basename(fifo) in str(err) and "cannot be read" in str(err)
    assert "FIFO" in str(err)


@VERIFY
def test_load_fifo_metadata_refused(engine_name, template, tmp_path, verify):
    ck, fifo = hostile(template, tmp_path, "metadata")
    with pytest.raises((CheckpointException, dcp_native.CheckpointError)) as info:
        load(ck, verify, fifo)
    err = failure(info.value)
    assert isinstance(err, dcp_native.CorruptCheckpointError), repr(err)
    assert err.filename == fifo
    assert "not a regular file" in str(err) and "FIFO" in str(err)
    assert "missing" not in str(err) and "No such file" not in str(err), str(err)
    # The wrapper carries the traceback (code lines included): only the phrase is checked.
    assert ".metadata is missing" not in str(info.value), str(info.value)


@pytest.mark.parametrize("kind", ["directory", "dev-zero"])
def test_load_data_file_not_regular_refused(engine_name, template, tmp_path, kind):
    ck, path = hostile(template, tmp_path, "data", kind)
    for verify in (False, True):
        err = load_error(ck, verify)
        assert type(err) is dcp_native.CorruptCheckpointError, repr(err)
        assert err.key in state()
        assert os.path.basename(path) in str(err)
        if kind == "directory":
            assert err.filename == path
            assert "a directory, not a regular file" in str(err)
        else:
            # Refused before it is opened: the link leaves the checkpoint
            # directory (a path check, which names the directory).
            assert err.filename in (path, ck)
            why = ("outside the checkpoint directory", "not a regular file")
            assert any(text in str(err) for text in why), str(err)


@pytest.mark.parametrize("kind", ["directory", "dev-zero"])
def test_load_sidecar_not_regular_ignored(engine_name, template, tmp_path, kind):
    ck, path = hostile(template, tmp_path, "sidecar", kind)
    assert_exact(load(ck, verify=False), state())
    err = load_error(ck, verify=True)
    assert isinstance(err, dcp_native.IntegrityError), repr(err)
    assert os.path.basename(path) in str(err) and "cannot be read" in str(err)
    assert ("a directory" if kind == "directory" else "a character device") in str(err)


def test_load_fifo_lock_file_unused(engine_name, template, tmp_path):
    # Readers never take the directory lock: a FIFO there changes nothing.
    ck, fifo = hostile(template, tmp_path, "lock")
    assert_exact(load(ck, verify=True, fifo=fifo), state())


def test_save_over_fifo_lock_file_refused(engine_name, template, tmp_path):
    ck, fifo = hostile(template, tmp_path, "lock")
    before = sorted(os.listdir(ck))
    new = {k: v * 2 if isinstance(v, torch.Tensor) else v + 1 for k, v in state().items()}
    writer = dcp_native.FileSystemWriter(ck, checksums=True)
    with pytest.raises((CheckpointException, dcp_native.CheckpointError)) as info:
        bounded(lambda: dcp.save(new, storage_writer=writer, no_dist=True), fifo=fifo)
    err = failure(info.value)
    assert isinstance(err, dcp_native.CorruptCheckpointError), repr(err)
    assert err.filename == fifo and "FIFO" in str(err)
    # The refused save removed what it wrote; the committed checkpoint is intact.
    assert sorted(os.listdir(ck)) == before
    assert_exact(load(ck, verify=True, fifo=fifo), state())


# --------------------------------------------------------------------------- verify, inspect


@pytest.mark.parametrize("which", FILES)
def test_verify_reports_fifo(engine_name, template, tmp_path, which):
    ck, fifo = hostile(template, tmp_path, which)
    code, out, err = run_cli(["verify", ck], fifo)
    shown = f"-> {code}\n{out}\n{err}"
    if which == "metadata":
        assert code in (EXIT_PROBLEMS, EXIT_USAGE), shown
        assert ".metadata" in out + err and "not a regular file" in out + err, shown
        assert "missing" not in out + err, shown
        return
    assert code == EXIT_PROBLEMS, shown
    problems = out.split("FAILED:", 1)[1]
    assert os.path.basename(fifo) in problems, shown
    if which == "sidecar":
        assert "cannot be read" in problems, shown


@pytest.mark.parametrize("which", ["data", "table"])
def test_verify_read_all_reports_fifo(engine_name, template, tmp_path, which):
    # --read-all reads every payload byte through the engine (and the tables).
    ck, fifo = hostile(template, tmp_path, which)
    code, out, err = run_cli(["verify", "--read-all", ck], fifo)
    assert code == EXIT_PROBLEMS, (code, out, err)
    assert os.path.basename(fifo) in out.split("FAILED:", 1)[1], out


def test_verify_json_names_fifo_data_file(engine_name, template, tmp_path):
    import json

    ck, fifo = hostile(template, tmp_path, "data")
    code, out, err = run_cli(["verify", "--json", ck], fifo)
    assert code == EXIT_PROBLEMS, (code, out, err)
    report = json.loads(out)
    assert report["ok"] is False
    assert os.path.basename(fifo) in {p["file"] for p in report["problems"]}, report


@pytest.mark.parametrize("which", FILES)
def test_inspect_survives_fifo(engine_name, template, tmp_path, which):
    ck, fifo = hostile(template, tmp_path, which)
    code, out, err = run_cli(["inspect", ck], fifo)
    shown = f"-> {code}\n{out}\n{err}"
    if which == "metadata":
        # Nothing to show without the metadata: a clean error that says why.
        assert code in (EXIT_USAGE, EXIT_FAILED), shown
        assert err.startswith("dcp-native: ") and "not a regular file" in err, shown
        assert "missing" not in err, shown
        return
    # Inspect lists what the metadata says; it may note, or not, what it could not read.
    assert code in (EXIT_OK, EXIT_PROBLEMS, EXIT_FAILED), shown
    if code != EXIT_OK:
        assert os.path.basename(fifo) in out + err, shown
    if code == EXIT_OK:
        assert "float32" in out and "bfloat16" in out and "step" in out, shown


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_cli_ignores_fifo_lock_file(engine_name, template, tmp_path, command):
    ck, fifo = hostile(template, tmp_path, "lock")
    code, out, err = run_cli([command, ck], fifo)
    assert code == EXIT_OK, (code, out, err)


def test_cli_subprocess_never_hangs(engine_name, template, tmp_path):
    """The real entry point, as a user runs it: each command exits, and prints no traceback.

    A subprocess also catches what the in-process calls cannot: a worker
    thread left blocked on the FIFO would keep the interpreter from exiting.
    """
    env = {**os.environ, "DCP_NATIVE_BACKEND": engine_name, "PYTHONWARNINGS": QUIET}
    runs = []
    for which, command in (("data", "verify"), ("metadata", "inspect")):
        ck, fifo = hostile(template, tmp_path / which, which)
        line = [sys.executable, "-m", "dcp_native", command, ck]
        proc = subprocess.Popen(line, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        runs.append((which, fifo, line, proc))
    results = []
    for which, fifo, line, proc in runs:
        try:
            out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            release(fifo)
            pytest.fail(f"{' '.join(line)} did not exit within {SUBPROCESS_TIMEOUT_S:.0f} s")
        results.append((which, fifo, proc.returncode, out, err))
    for which, fifo, code, out, err in results:
        shown = f"{which}: -> {code}\n{out}\n{err}"
        assert "Traceback" not in out + err, shown
        if which == "data":
            assert code == EXIT_PROBLEMS, shown
            assert os.path.basename(fifo) in out, shown
        else:
            assert code in (EXIT_USAGE, EXIT_FAILED), shown
            assert "not a regular file" in err, shown


def test_template_is_what_the_cases_replace(template):
    # Guards the cases above: each file they replace exists in a fresh save.
    names = set(os.listdir(template))
    assert {".metadata", ".dcp_native.lock"} <= names
    (data,) = data_files(template)
    assert data + ".crc32c" in names
    assert os.path.basename(sidecar_file(template)) in names
