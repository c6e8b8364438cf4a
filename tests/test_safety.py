"""Never wrong, never stuck: concurrent saves, the sidecar, verify, saved objects, failed saves, commit faults.

Every test runs on both engines. A checkpoint written by dcp_native holds
``.metadata``, the sidecar ``.metadata.<tag>.dcp_native``, data files
``__R_N.<tag>.distcp`` with their ``.crc32c`` tables, and ``.dcp_native.lock``
(see dcp_native.commit).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import resource
import signal
import struct
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import dcp_native
from helpers import data_file, data_files, failure, in_child, sidecar_file
from dcp_native import commit


def state(scale: float, n: int = 4, rows: int = 64) -> dict:
    g = torch.Generator().manual_seed(int(scale * 1000))
    sd = {f"w{i}": torch.randn(rows * (i + 1), 129, generator=g) * scale for i in range(n)}
    sd["small"] = torch.arange(5.0) * scale
    sd["step"] = int(scale * 10)
    return sd


def save(sd, path, **kw) -> None:
    kw.setdefault("checksums", True)
    dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(path, **kw), no_dist=True)


def blank(like: dict) -> dict:
    return {k: torch.full_like(v, -7.0) if isinstance(v, torch.Tensor) else -1 for k, v in like.items()}


def load(path, like, **reader_kw) -> dict:
    out = blank(like)
    dcp.load(out, storage_reader=dcp_native.FileSystemReader(path, **reader_kw), no_dist=True)
    return out


def same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def checkpoint_files(path) -> set[str]:
    """The committed checkpoint's files plus the directory lock: all a tidy directory holds."""
    names = set(data_files(path))
    names |= {n + ".crc32c" for n in names if os.path.exists(os.path.join(path, n + ".crc32c"))}
    return names | {".metadata", os.path.basename(sidecar_file(path)), commit.LOCK_NAME}


def assert_tidy(path) -> None:
    assert set(os.listdir(path)) == checkpoint_files(path), sorted(os.listdir(path))


# ----------------------------------------------------------------------------- 1. concurrent saves


def test_back_to_back_async_saves_to_one_checkpoint_id(engine_name, tmp_path):
    """Writers made per call for one checkpoint_id: each save waits for the one before it."""
    for trial in range(3):
        path = tmp_path / f"t{trial}"
        states = [state(1.0 + trial + i / 10) for i in range(4)]
        futures = [dcp_native.async_save(sd, checkpoint_id=path) for sd in states]
        for fut in futures:
            fut.result()
        assert same(load(path, states[-1]), states[-1])
        assert_tidy(path)


def _async_with_new_writer(sd, path):
    return dcp.async_save(sd, storage_writer=dcp_native.FileSystemWriter(path, checksums=True))


def test_concurrent_async_saves_with_separate_writers(engine_name, tmp_path):
    """Saves that nothing serializes (DCP's own async_save, a writer each) never damage each other."""
    for trial in range(3):
        path = tmp_path / f"t{trial}"
        states = [state(2.0 + trial + i / 10, rows=256) for i in range(3)]
        futures = [_async_with_new_writer(sd, path) for sd in states]
        for fut in futures:
            fut.result()
        got = load(path, states[0], verify=True)
        assert any(same(got, sd) for sd in states)
        assert_tidy(path)


def _save_loop(path: str, states: list[dict], engine: str) -> int:
    # The states are made before the fork: torch's OpenMP pool does not survive one.
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ["DCP_NATIVE_BACKEND"] = engine
            for sd in states:
                save(sd, path, thread_count=2)
            code = 0
        except BaseException:  # noqa: BLE001 - reported through the exit code
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def test_two_processes_saving_to_one_path(engine_name, tmp_path):
    """Two processes save to one path, over and over: every save succeeds, the path always loads."""
    for trial in range(2):
        path = str(tmp_path / f"t{trial}")
        save(state(0.5), path)
        runs = [[state(10.0 * (k + 1) + i) for i in range(4)] for k in range(2)]
        pids = [_save_loop(path, run, engine_name) for run in runs]
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        finals = [run[-1] for run in runs]
        got = load(path, finals[0], verify=True)
        assert any(same(got, sd) for sd in finals)
        assert_tidy(path)


# ----------------------------------------------------------------------------- 2. the sidecar


def _sidecar_doc(path) -> tuple[Path, dict]:
    side = Path(sidecar_file(path))
    return side, json.loads(side.read_bytes()[56:])


def _write_sidecar(side: Path, doc: dict, reseal: bool) -> None:
    """Replace the sidecar's body; with ``reseal`` its header's length and SHA-256 are fixed too."""
    raw = side.read_bytes()
    body = json.dumps(doc, separators=(",", ":")).encode()
    if reseal:
        import hashlib

        header = struct.pack("<8sIIQ32s", b"DCPNSIDE", 2, 0, len(body), hashlib.sha256(body).digest())
    else:
        header = raw[:56]
    side.write_bytes(header + body)


def _shift(doc: dict, by) -> None:
    for rows in doc["items"].values():
        for row in rows:
            row[2] = by(row[2])


SHIFTS = {
    "plus-8": lambda p: p + 8,
    "plus-64": lambda p: p + 64,
    "minus-64": lambda p: p - 64,
    "plus-4096": lambda p: p + 4096,
    "negative": lambda p: -(4 << 40),
    "huge": lambda p: 1 << 62,
}


@pytest.mark.parametrize("shift", list(SHIFTS))
@pytest.mark.parametrize("reseal", [False, True], ids=["damaged", "forged"])
def test_sidecar_offsets_never_give_wrong_values(engine_name, tmp_path, shift, reseal):
    sd = state(1.0)
    save(sd, tmp_path)
    side, doc = _sidecar_doc(tmp_path)
    _shift(doc, SHIFTS[shift])
    _write_sidecar(side, doc, reseal)
    # Sealed again (a forgery), plausible offsets are checked against the metadata and the
    # framing; anything else makes the sidecar damaged, and a damaged sidecar is ignored
    # (items are found from their headers) or, under verify=True, reported.
    forged = reseal and shift in ("plus-8", "plus-64", "minus-64")
    for verify in (False, True):
        if not forged and not verify:
            assert same(load(tmp_path, sd), sd)
            continue
        with pytest.raises(CheckpointException) as ei:
            load(tmp_path, sd, verify=verify)
        err = failure(ei)
        if forged:
            assert isinstance(err, dcp_native.CorruptCheckpointError), err
            assert "does not match" in str(err) and err.key in sd
        else:
            assert isinstance(err, dcp_native.IntegrityError), err
            assert "cannot be verified" in str(err) and "is damaged" in str(err)


def _flip_bits(path: Path, count: int, seed: int) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for _ in range(count):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("which", ["sidecar", "table"])
def test_random_bit_flips_in_files_dcp_native_adds(engine_name, tmp_path, which):
    """Any damage to the sidecar or a table: exact values without verify, IntegrityError with it."""
    sd = state(1.5)
    save(sd, tmp_path)
    pristine = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    target = Path(sidecar_file(tmp_path)) if which == "sidecar" else Path(data_file(tmp_path) + ".crc32c")
    for seed in range(12):
        for name, data in pristine.items():
            (tmp_path / name).write_bytes(data)
        _flip_bits(target, 1 + seed % 3, seed)
        assert same(load(tmp_path, sd), sd)
        with pytest.raises(CheckpointException) as ei:
            load(tmp_path, sd, verify=True)
        err = failure(ei)
        assert isinstance(err, dcp_native.IntegrityError), err
        assert "cannot be verified" in str(err)


def test_metadata_dtype_of_the_same_width_is_detected(engine_name, tmp_path):
    """.metadata edited to int32 where float32 was saved: the sidecar no longer matches it, the
    item headers are read and disagree with it."""
    sd = {"a": torch.randn(1000), "b": torch.randn(7)}
    save(sd, tmp_path)
    with open(tmp_path / ".metadata", "rb") as f:
        md = pickle.load(f)
    md.state_dict_metadata["a"].properties.dtype = torch.int32
    with open(tmp_path / ".metadata", "wb") as f:
        pickle.dump(md, f)
    out = {"a": torch.zeros(1000, dtype=torch.int32), "b": torch.zeros(7)}
    for verify in (False, True):
        with pytest.raises(CheckpointException) as ei:
            dcp.load(out, storage_reader=dcp_native.FileSystemReader(tmp_path, verify=verify),
                     no_dist=True)
        err = failure(ei)
        assert isinstance(err, dcp_native.CorruptCheckpointError)
        if not verify:
            assert err.key == "a" and "torch.int32" in str(err) and "torch.float32" in str(err)
        else:
            assert "other bytes of .metadata" in str(err)


# ----------------------------------------------------------------------------- 3. verify=True


def _flip_payload_bit(path) -> None:
    f = data_file(path)
    with open(f, "r+b") as fh:
        fh.seek(os.path.getsize(f) // 2)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0x08]))


def _drop_sidecar(path) -> None:
    os.remove(sidecar_file(path))


def _damage_sidecar(path) -> None:
    _flip_bits(Path(sidecar_file(path)), 1, 3)


def _stale_sidecar(path) -> None:
    """Another save's (sealed, intact) sidecar under this save's name."""
    other = Path(path).parent / "other"
    save(state(9.0), other)
    Path(sidecar_file(path)).write_bytes(Path(sidecar_file(other)).read_bytes())


@pytest.mark.parametrize("spoil", [_drop_sidecar, _damage_sidecar, _stale_sidecar],
                         ids=["deleted", "damaged", "stale"])
def test_verify_never_passes_unverified_bytes(engine_name, tmp_path, spoil):
    sd = state(2.5)
    path = tmp_path / "ck"
    save(sd, path)
    spoil(path)
    _flip_payload_bit(path)
    with pytest.raises(CheckpointException) as ei:
        load(path, sd, verify=True)
    err = failure(ei)
    assert isinstance(err, dcp_native.IntegrityError)
    assert "cannot be verified" in str(err) and err.filename and err.key in sd


@pytest.mark.parametrize("writer", ["no-checksums", "stock"])
def test_verify_without_checksum_tables_raises(engine_name, tmp_path, writer):
    sd = state(3.0)
    if writer == "stock":
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp_path), no_dist=True)
    else:
        save(sd, tmp_path, checksums=False)
    assert same(load(tmp_path, sd), sd)
    with pytest.raises(CheckpointException) as ei:
        load(tmp_path, sd, verify=True)
    err = failure(ei)
    assert isinstance(err, dcp_native.IntegrityError)
    expected = "no checksum table" if writer == "no-checksums" else "written by stock DCP"
    assert "cannot be verified" in str(err) and expected in str(err), err


def test_failed_overwrite_keeps_the_old_sidecar(engine_name, tmp_path, monkeypatch):
    """An overwrite that fails at its rename leaves the old checkpoint verifiable, bit-exact."""
    old, new = state(1.0), state(4.0)
    save(old, tmp_path)
    before = sorted(os.listdir(tmp_path))
    _fault_commit(monkeypatch, "rename:EIO:1")
    with pytest.raises(CheckpointException) as ei:
        save(new, tmp_path)
    assert failure(ei).errno == errno.EIO
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == before
    assert same(load(tmp_path, old, verify=True), old)


# ----------------------------------------------------------------------------- 5. saved objects


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Allowed:
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def __eq__(self, other) -> bool:
        return isinstance(other, Allowed) and other.value == self.value


@pytest.mark.parametrize("verify", [False, True])
def test_object_that_runs_code_is_refused(engine_name, tmp_path, verify):
    marker = tmp_path / "pwned"
    sd = {"w": torch.randn(10), "step": _RunsCode(str(marker))}
    save(sd, tmp_path / "ck")
    assert not marker.exists()
    out = {"w": torch.zeros(10), "step": 0}
    with pytest.raises(CheckpointException) as ei:
        dcp.load(out, storage_reader=dcp_native.FileSystemReader(tmp_path / "ck", verify=verify),
                 no_dist=True)
    err = failure(ei)
    assert isinstance(err, dcp_native.RefusedObjectError), err
    assert err.key == "step" and err.filename == data_file(tmp_path / "ck") and err.offset is not None
    assert "system" in str(err) and err.refused.endswith(".system") and "allow_pickle=True" in str(err)
    assert not marker.exists()
    # The explicit opt-in loads it as stock does (and runs it).
    dcp.load(out, storage_reader=dcp_native.FileSystemReader(tmp_path / "ck", allow_pickle=True),
             no_dist=True)
    assert marker.exists()


def test_safe_globals_admit_a_class(engine_name, tmp_path):
    sd = {"w": torch.randn(3), "cfg": Allowed(5)}
    save(sd, tmp_path)
    out = {"w": torch.zeros(3), "cfg": None}
    with pytest.raises(CheckpointException) as ei:
        dcp.load(out, storage_reader=dcp_native.FileSystemReader(tmp_path), no_dist=True)
    err = failure(ei)
    assert isinstance(err, dcp_native.RefusedObjectError) and err.key == "cfg"
    assert "Allowed" in err.refused and "add_safe_globals" in str(err)
    with torch.serialization.safe_globals([Allowed]):
        dcp.load(out, storage_reader=dcp_native.FileSystemReader(tmp_path), no_dist=True)
    assert out["cfg"] == Allowed(5) and torch.equal(out["w"], sd["w"])


# ----------------------------------------------------------------------------- 6. failed saves


def test_failed_saves_leave_nothing_behind(engine_name, tmp_path):
    """With a file size limit, three saves fail (EFBIG) and each removes what it wrote; a
    save that fits then succeeds beside the old checkpoint."""
    old = state(1.0, n=2, rows=16)
    save(old, tmp_path)
    listing = sorted(os.listdir(tmp_path))
    big, fits = state(5.0, n=4, rows=512), state(6.0, n=2, rows=16)

    def limited() -> str:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))
        errors = []
        for _ in range(3):
            try:
                save(big, tmp_path, thread_count=2)
                errors.append("saved")
            except CheckpointException as exc:
                errors.append(str(getattr(next(iter(exc.failures.values()))[0], "errno", None)))
            errors.append(",".join(sorted(os.listdir(tmp_path))))
        save(fits, tmp_path)
        return "|".join(errors)

    code, out = in_child(limited)
    assert code == 0, out
    parts = out.split("|")
    for i in range(3):
        assert parts[2 * i] == str(errno.EFBIG), out
        assert parts[2 * i + 1].split(",") == listing, out
    assert same(load(tmp_path, fits, verify=True), fits)
    assert_tidy(tmp_path)


def test_enospc_saves_remove_their_files(engine_name, tmp_path, monkeypatch):
    old = state(1.0)
    save(old, tmp_path, thread_count=2)
    listing = sorted(os.listdir(tmp_path))
    monkeypatch.setenv("DCP_NATIVE_FAULT", "write:ENOSPC:4")
    for _ in range(3):
        with pytest.raises(CheckpointException) as ei:
            save(state(2.0), tmp_path, thread_count=2, chunk_bytes=65536)
        assert failure(ei).errno == errno.ENOSPC
        assert sorted(os.listdir(tmp_path)) == listing
    monkeypatch.delenv("DCP_NATIVE_FAULT")
    assert same(load(tmp_path, old, verify=True), old)


def test_leftovers_of_killed_saves_are_removed(engine_name, tmp_path, monkeypatch):
    """Killed saves leave files; the next save removes every one of them (their markers are
    unlocked: the kernel dropped the dead processes' locks)."""
    old = state(1.0, n=8, rows=256)
    save(old, tmp_path, thread_count=2)
    new = state(7.0, n=8, rows=256)
    monkeypatch.setenv("DCP_NATIVE_TEST_SHORT_IO", "256")
    for delay in (0.01, 0.03, 0.05, 0.08):
        pid = os.fork()
        if pid == 0:
            try:
                save(new, tmp_path, thread_count=2)
            finally:
                os._exit(0)
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    monkeypatch.delenv("DCP_NATIVE_TEST_SHORT_IO")
    got = load(tmp_path, old)
    assert same(got, old) or same(got, new)
    save(old, tmp_path)
    assert same(load(tmp_path, old, verify=True), old)
    assert_tidy(tmp_path)


def test_a_live_save_keeps_its_files(engine_name, tmp_path):
    """What another save in progress wrote is never removed, even by a save that commits."""
    save(state(1.0), tmp_path)
    tag = "0123abcd"
    directory = str(tmp_path)
    with commit.DirectoryLock(directory):
        marker = commit.SaveMarker(directory, tag)
    foreign = [f"__0_0.{tag}.distcp", f"__0_0.{tag}.distcp.crc32c", f".metadata.{tag}.tmp"]
    for name in foreign:
        (tmp_path / name).write_bytes(b"in progress")
    save(state(2.0), tmp_path)
    assert all((tmp_path / n).exists() for n in foreign)
    marker.release()
    save(state(3.0), tmp_path)
    assert not any((tmp_path / n).exists() for n in foreign)
    assert same(load(tmp_path, state(3.0)), state(3.0))
    assert_tidy(tmp_path)


# ----------------------------------------------------------------------------- 7. the commit under faults


def _fault_commit(monkeypatch, spec: str) -> None:
    """DCP_NATIVE_FAULT=spec for the commit only (the data files are written without it)."""
    real = commit.commit

    def faulty(*args, **kwargs):
        os.environ["DCP_NATIVE_FAULT"] = spec
        try:
            return real(*args, **kwargs)
        finally:
            del os.environ["DCP_NATIVE_FAULT"]

    monkeypatch.setattr(commit, "commit", faulty)


#: Each system call of a commit with sync_files: (fault spec, whether the rename had happened).
COMMIT_STEPS = [
    ("open:{e}:1", False),   # the directory lock
    ("open:{e}:2", False),   # the sidecar
    ("write:{e}:1", False),
    ("fsync:{e}:1", False),
    ("close:{e}:1", False),
    ("open:{e}:3", False),   # the metadata's temporary file
    ("write:{e}:2", False),
    ("fsync:{e}:2", False),
    ("close:{e}:2", False),
    ("rename:{e}:1", False),
    ("open:{e}:4", True),    # the directory, for its fsync
    ("fsync:{e}:3", True),
]


@pytest.mark.parametrize("err", ["ENOSPC", "EIO"])
@pytest.mark.parametrize("step, renamed", COMMIT_STEPS, ids=[s.split(":{")[0] + s[-2:] for s, _ in COMMIT_STEPS])
def test_each_commit_step_fails_cleanly(engine_name, tmp_path, monkeypatch, err, step, renamed):
    old, new = state(1.0), state(2.0)
    save(old, tmp_path)
    before = sorted(os.listdir(tmp_path))
    _fault_commit(monkeypatch, step.format(e=err))
    with pytest.raises(CheckpointException) as ei:
        save(new, tmp_path)
    got = failure(ei)
    assert isinstance(got, OSError) and got.errno == getattr(errno, err), got
    assert got.filename and str(tmp_path) in got.filename
    monkeypatch.undo()
    if renamed:
        # The new metadata was in place when the directory fsync failed: the new checkpoint
        # is the committed one, whole; the old files go with the next save.
        assert same(load(tmp_path, new, verify=True), new)
    else:
        assert sorted(os.listdir(tmp_path)) == before
        assert same(load(tmp_path, old, verify=True), old)
        assert same(_stock_load(tmp_path, old), old)
    save(new, tmp_path)
    assert same(load(tmp_path, new, verify=True), new)
    assert_tidy(tmp_path)


def _stock_load(path, like) -> dict:
    out = blank(like)
    dcp.load(out, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    return out


# ----------------------------------------------------------------------------- rank-local saves


def _rank_local_saves(path: str) -> list[str]:
    """Each rank commits its own __{rank}.metadata (use_collectives=False), twice; then loads."""
    import torch.distributed as dist

    rank = dist.get_rank()
    for scale in (1.0, 2.0):
        sd = {"w": torch.full((1000,), scale * (rank + 1)), "n": rank}
        dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(path, checksums=True),
                 use_collectives=False)
        dist.barrier()
    out = {"w": torch.zeros(1000), "n": -1}
    dcp.load(out, storage_reader=dcp_native.FileSystemReader(path, verify=True))
    assert torch.equal(out["w"], torch.full((1000,), 2.0 * (rank + 1))) and out["n"] == rank
    dist.barrier()
    return sorted(os.listdir(path))


@pytest.mark.multiprocess
def test_rank_local_saves_keep_each_ranks_checkpoint(engine_name, tmp_path):
    from helpers import run_ranks

    listings = run_ranks(2, _rank_local_saves, str(tmp_path), engine=engine_name, timeout=120)
    names = listings[-1]
    # Per rank: its metadata, sidecar, one data file and its table (the first save's are gone).
    for rank in (0, 1):
        mine = [n for n in names if n.startswith(f"__{rank}")]
        assert len([n for n in mine if n.endswith(".distcp")]) == 1, names
        assert len([n for n in mine if n.endswith(".dcp_native")]) == 1, names
        assert f"__{rank}.metadata" in mine, names
    assert not [n for n in names if n.endswith(".tmp") or (n.endswith(".lock") and n != commit.LOCK_NAME)]
