"""Durability and safety: commits, overwrites, interrupted saves, hostile metadata (both engines)."""

from __future__ import annotations

import errno
import os
import pickle
import signal
import time

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import dcp_native
from helpers import run_ranks
from helpers import data_file, data_files, failure, in_child


def state(scale: float, n: int = 6, rows: int = 64) -> dict:
    g = torch.Generator().manual_seed(int(scale * 1000))
    sd = {f"w{i}": torch.randn(rows * (i + 1), 257, generator=g) * scale for i in range(n)}
    sd["step"] = int(scale * 10)
    return sd


def save(sd, path, **kw):
    dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(path, **kw), no_dist=True)


def load(path, like, reader=None):
    out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in like.items()}
    reader = reader or dcp_native.FileSystemReader(path)
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


def same(a, b) -> bool:
    return all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


# ----------------------------------------------------------------------------- overwrite


def test_overwrite_keeps_old_checkpoint_until_commit(engine_name, tmp_path, monkeypatch):
    old, new = state(1.0), state(2.0)
    save(old, tmp_path, thread_count=2)
    old_files = data_files(tmp_path)

    # The new save fails after writing its data files, before its commit.
    written = []

    def broken_commit(directory, *args, **kwargs):
        written.extend(set(data_files(directory)) - set(old_files))
        raise OSError(errno.EIO, "injected failure before the commit")

    with monkeypatch.context() as m:
        m.setattr(dcp_native.commit, "commit", broken_commit)
        with pytest.raises(CheckpointException):
            save(new, tmp_path, thread_count=2)
    assert len(written) == 2, "the interrupted save wrote its data files under new names"
    # ... and removed them when it failed; the old files were not touched.
    assert data_files(tmp_path) == old_files
    assert same(load(tmp_path, old), old)  # bit-exact old checkpoint
    assert same(load(tmp_path, old, dcp.FileSystemReader(tmp_path)), old)

    # The next save commits and removes the old files.
    save(new, tmp_path, thread_count=2)
    assert same(load(tmp_path, new), new)
    assert same(load(tmp_path, new, dcp.FileSystemReader(tmp_path)), new)
    remaining = data_files(tmp_path)
    assert not (set(remaining) & (set(old_files) | set(written)))
    assert len(remaining) == 2
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp") or f.endswith(".lock")
                and f != ".dcp_native.lock"]


def _kill_child(tmp_path, sd, when, **save_kw) -> int:
    """Fork a child that saves ``sd`` and is SIGKILLed at ``when``; returns its status.

    ``when`` is a delay in seconds after the save starts, or ``("rename", n, phase)``:
    die just before or after the n-th ``os.rename`` of the commit.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            if isinstance(when, tuple):
                _, nth, phase = when
                real = os.rename
                calls = [0]

                def rename(src, dst):
                    calls[0] += 1
                    if calls[0] == nth and phase == "before":
                        os.kill(os.getpid(), signal.SIGKILL)
                    real(src, dst)
                    if calls[0] == nth and phase == "after":
                        os.kill(os.getpid(), signal.SIGKILL)

                os.rename = rename
            os.write(w, b"go")
            save(sd, tmp_path, **save_kw)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 2) == b"go"
    os.close(r)
    if not isinstance(when, tuple):
        time.sleep(when)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    return status


KILL_POINTS = [0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, ("rename", 1, "before"),
               ("rename", 1, "after")]
#: 34 MiB written in transfers of at most 256 bytes: about 0.07 s (native) to 0.3 s
#: (python) of writing, so that the delays above land inside the data writes.
SLOW_IO = "256"


_OUTCOMES: dict[str, list[str]] = {}


@pytest.mark.parametrize("when", KILL_POINTS, ids=str)
def test_sigkill_during_overwrite(engine_name, tmp_path, monkeypatch, when):
    """Killed at any point, the directory holds the old or the new checkpoint, bit-exact."""
    old, new = state(1.0, n=16, rows=256), state(3.0, n=16, rows=256)
    save(old, tmp_path, thread_count=2)
    # Small transfers stretch the write so that the delays land inside it.
    monkeypatch.setenv("DCP_NATIVE_TEST_SHORT_IO", SLOW_IO)
    _kill_child(tmp_path, new, when, thread_count=2)
    monkeypatch.delenv("DCP_NATIVE_TEST_SHORT_IO")
    got = load(tmp_path, old)
    assert same(got, old) or same(got, new)
    if not isinstance(when, tuple):
        _OUTCOMES.setdefault(engine_name, []).append("old" if same(got, old) else "new")
    if when == ("rename", 1, "after"):
        assert same(got, new)
    if when == ("rename", 1, "before"):
        assert same(got, old)
    # Stock reads the same thing.
    assert same(load(tmp_path, old, dcp.FileSystemReader(tmp_path)), got)
    # The next save cleans up whatever the killed one left behind.
    save(old, tmp_path)
    assert same(load(tmp_path, old), old)
    assert len(data_files(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == sorted(
        [".dcp_native.lock", ".metadata", *data_files(tmp_path),
         *(n for n in os.listdir(tmp_path) if n.endswith(".dcp_native") or n.endswith(".crc32c"))]
    )
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".dcp_native")]) == 1


@pytest.mark.parametrize("when", [0.0, 0.01, 0.04, ("rename", 1, "after")], ids=str)
def test_sigkill_during_first_save(engine_name, tmp_path, monkeypatch, when):
    """Killed before the commit, a fresh directory holds no checkpoint, and says so."""
    new = state(2.0, n=16, rows=256)
    monkeypatch.setenv("DCP_NATIVE_TEST_SHORT_IO", SLOW_IO)
    _kill_child(tmp_path, new, when, thread_count=2)
    monkeypatch.delenv("DCP_NATIVE_TEST_SHORT_IO")
    if (tmp_path / ".metadata").exists():
        assert same(load(tmp_path, new), new)
    else:
        with pytest.raises(CheckpointException) as ei:
            load(tmp_path, new)
        assert isinstance(failure(ei), dcp_native.IncompleteCheckpointError)


def _failing_rank(path):
    import torch.distributed as dist

    rank = dist.get_rank()
    sd = {"x": torch.full((1000,), float(rank)), "y": torch.arange(10.0)}
    if rank == 1:
        def boom(self, plan, planner):
            raise OSError(errno.ENOSPC, "No space left on device (injected)", os.path.join(path, "__1_0.distcp"))

        dcp_native.FileSystemWriter.write_data = boom
    t0 = time.monotonic()
    try:
        dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(path))
    except CheckpointException as exc:
        err = next(iter(exc.failures.values()))[0]
        assert isinstance(err, OSError) and err.errno == errno.ENOSPC, err
        assert 1 in exc.failures
    else:
        raise AssertionError("the save succeeded on a rank although rank 1 failed")
    assert time.monotonic() - t0 < 60
    dist.barrier()


def test_failure_on_one_of_two_ranks(engine_name, tmp_path):
    old = {"x": torch.full((1000,), 7.0), "y": torch.arange(10.0) * 2}
    save(old, tmp_path)
    before = sorted(os.listdir(tmp_path))
    run_ranks(2, _failing_rank, str(tmp_path), engine=engine_name, timeout=120)
    # Nothing was committed: the old checkpoint is intact.
    got = load(tmp_path, old)
    assert same(got, old)
    assert ".metadata" in before


# ----------------------------------------------------------------------------- hostile metadata


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite_metadata(path, edit):
    with open(path / ".metadata", "rb") as f:
        md = pickle.load(f)
    edit(md)
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)


def test_metadata_pickle_that_runs_code_is_refused(engine_name, tmp_path):
    sd = {"a": torch.ones(4)}
    save(sd, tmp_path)
    marker = tmp_path / "pwned"
    _rewrite_metadata(tmp_path, lambda md: setattr(md, "planner_data", _RunsCode(str(marker))))
    with pytest.raises(dcp_native.CorruptCheckpointError, match="posix.system|os.system") as ei:
        dcp_native.FileSystemReader(tmp_path).read_metadata()
    assert ei.value.filename == str(tmp_path / ".metadata")
    with pytest.raises(CheckpointException) as ei:
        load(tmp_path, sd)
    # The refusal is what the user sees, not "missing" (DCP asks for __0.metadata next).
    err = failure(ei)
    assert isinstance(err, dcp_native.CorruptCheckpointError) and "refused" in str(err)
    assert "missing" not in str(err) and err.filename == str(tmp_path / ".metadata")
    assert not marker.exists()


def _set_all_paths(md, rel):
    for idx, info in list(md.storage_data.items()):
        md.storage_data[idx] = type(info)(rel, info.offset, info.length, info.transform_descriptors)


@pytest.mark.parametrize("rel", ["../outside.distcp", "/etc/passwd", "sub/../../x.distcp", "a\0b"])
def test_paths_leaving_the_directory_are_refused(engine_name, tmp_path, rel):
    ck = tmp_path / "ck"
    save({"a": torch.ones(4)}, ck)
    (tmp_path / "outside.distcp").write_bytes(Path(data_file(ck)).read_bytes())
    _rewrite_metadata(ck, lambda md: _set_all_paths(md, rel))
    with pytest.raises(CheckpointException) as ei:
        load(ck, {"a": torch.ones(4)})
    err = failure(ei)
    assert isinstance(err, dcp_native.CorruptCheckpointError) and err.key == "a"
    assert "refusing to read it" in str(err)


def test_symlink_out_of_the_directory_is_refused(engine_name, tmp_path):
    ck = tmp_path / "ck"
    save({"a": torch.ones(4)}, ck)
    outside = tmp_path / "elsewhere.distcp"
    inside = data_file(ck)
    os.replace(inside, outside)
    os.symlink(outside, inside)
    with pytest.raises(CheckpointException) as ei:
        load(ck, {"a": torch.ones(4)})
    assert "symbolic link" in str(failure(ei))


def test_petabyte_item_is_refused_before_allocation(engine_name, tmp_path):
    sd = {"a": torch.ones(4), "obj": "x"}
    save(sd, tmp_path)

    def huge(md):
        for idx, info in list(md.storage_data.items()):
            md.storage_data[idx] = type(info)(info.relative_path, info.offset, 1 << 50, None)

    _rewrite_metadata(tmp_path, huge)
    with pytest.raises(CheckpointException) as ei:
        load(tmp_path, {"a": torch.zeros(4), "obj": ""})
    err = failure(ei)
    assert isinstance(err, dcp_native.TruncatedFileError)
    assert err.expected >= 1 << 50


def test_negative_offsets_are_refused(engine_name, tmp_path):
    save({"a": torch.ones(4)}, tmp_path)

    def negative(md):
        for idx, info in list(md.storage_data.items()):
            md.storage_data[idx] = type(info)(info.relative_path, -5, info.length, None)

    _rewrite_metadata(tmp_path, negative)
    with pytest.raises(CheckpointException) as ei:
        load(tmp_path, {"a": torch.zeros(4)})
    assert isinstance(failure(ei), dcp_native.CorruptCheckpointError)
    assert "not a valid file range" in str(failure(ei))


def test_kill_points_hit_both_phases():
    """Some delays of test_sigkill_during_overwrite land inside the save (not all after it)."""
    if not _OUTCOMES:
        pytest.skip("runs after test_sigkill_during_overwrite")
    for engine, outcomes in _OUTCOMES.items():
        assert "old" in outcomes, (engine, outcomes)


# ----------------------------------------------------------------------------- injected I/O faults


def test_enospc_mid_write_keeps_old_checkpoint(engine_name, tmp_path, monkeypatch):
    old, new = state(1.0), state(2.0)
    save(old, tmp_path, thread_count=2)
    monkeypatch.setenv("DCP_NATIVE_FAULT", "write:ENOSPC:3")
    with pytest.raises(CheckpointException) as ei:
        save(new, tmp_path, thread_count=2, chunk_bytes=65536)  # many write calls
    err = failure(ei)
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert err.filename and str(tmp_path) in err.filename
    monkeypatch.delenv("DCP_NATIVE_FAULT")
    assert same(load(tmp_path, old), old)
    save(new, tmp_path)
    assert same(load(tmp_path, new), new)


def test_fsync_failure_commits_nothing(engine_name, tmp_path, monkeypatch):
    new = state(2.0)
    monkeypatch.setenv("DCP_NATIVE_FAULT", "fsync:EIO:1")
    with pytest.raises(CheckpointException) as ei:
        save(new, tmp_path, sync_files=True)
    assert failure(ei).errno == errno.EIO
    assert not (tmp_path / ".metadata").exists()


def test_efbig_from_file_size_limit(engine_name, tmp_path):
    """RLIMIT_FSIZE in a forked child: EFBIG mid-write, the old checkpoint survives."""
    import resource

    old, new = state(1.0), state(2.0)
    save(old, tmp_path)
    def limited() -> str:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            save(new, tmp_path)
        except CheckpointException as exc:
            return str(getattr(failure(exc), "errno", None))
        return "saved"

    code, got = in_child(limited)
    assert code == 0 and got == str(errno.EFBIG), got
    assert same(load(tmp_path, old), old)


def test_eio_on_read(engine_name, tmp_path, monkeypatch):
    sd = state(1.0)
    save(sd, tmp_path)
    monkeypatch.setenv("DCP_NATIVE_FAULT", "read:EIO:3")
    reader = dcp_native.FileSystemReader(tmp_path, verify=False, chunk_bytes=65536)
    with pytest.raises(CheckpointException) as ei:
        load(tmp_path, sd, reader)
    err = failure(ei)
    assert isinstance(err, OSError) and err.errno == errno.EIO
    assert err.filename == data_file(tmp_path)


@pytest.mark.parametrize("short", ["1", "7", "4096"])
def test_short_transfers_round_trip(engine_name, tmp_path, monkeypatch, short):
    sd = state(1.5, n=3, rows=8)
    monkeypatch.setenv("DCP_NATIVE_TEST_SHORT_IO", short)
    save(sd, tmp_path, thread_count=3, checksums=True)
    assert same(load(tmp_path, sd, dcp_native.FileSystemReader(tmp_path, verify=True)), sd)


# ----------------------------------------------------------------------------- checksums


def _flip(path, offset, bit=0x10):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ bit]))


def _item(path, key):
    with open(path / ".metadata", "rb") as f:
        md = pickle.load(f)
    for idx, info in md.storage_data.items():
        if idx.fqn == key:
            return info


@pytest.mark.parametrize("where", ["payload", "header", "trailer"])
def test_flipped_bit_is_caught(engine_name, tmp_path, where):
    sd = state(1.0)
    save(sd, tmp_path, checksums=True)
    info = _item(tmp_path, "w3")
    offset = {
        "payload": info.offset + info.length // 2,
        "header": info.offset + 100,
        "trailer": info.offset + info.length - 30,
    }[where]
    _flip(tmp_path / info.relative_path, offset)
    with pytest.raises(CheckpointException) as ei:
        load(tmp_path, sd, dcp_native.FileSystemReader(tmp_path, verify=True))
    err = failure(ei)
    assert isinstance(err, dcp_native.IntegrityError)
    assert err.filename == str(tmp_path / info.relative_path)
    assert err.offset == offset // 4096 * 4096
    if where == "payload":
        assert err.key == "w3"


def _reshard_verify(path, flip):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = torch.arange(256 * 4096, dtype=torch.float32).reshape(256, 4096)
    if not flip:
        dcp.save({"t": distribute_tensor(full, mesh, [Shard(0)])},
                 storage_writer=dcp_native.FileSystemWriter(path, checksums=True))
    dist.barrier()
    dest = distribute_tensor(torch.zeros(256, 4096), mesh, [Shard(1)])
    reader = dcp_native.FileSystemReader(path, verify=True)
    try:
        dcp.load({"t": dest}, storage_reader=reader)
    except CheckpointException as exc:
        return ("error", type(next(iter(exc.failures.values()))[0]).__name__, sorted(exc.failures))
    assert torch.equal(dest.to_local(), full[:, rank * 2048 : (rank + 1) * 2048])
    return ("ok", reader.last_read_stats.bytes_read, dest.to_local().nbytes)


def test_resharded_read_verifies_exactly_what_it_reads(engine_name, tmp_path):
    """Shard(0) -> Shard(1) with verification: 16 KiB runs on 4 KiB blocks, no extra bytes."""
    results = run_ranks(2, _reshard_verify, str(tmp_path), False, engine=engine_name, timeout=120)
    for status, read, needed in results:
        assert status == "ok" and read <= 1.1 * needed + 8192, results
    # A flipped bit in the right half of the rows: rank 1 reads it and fails; DCP fails both.
    info = next(i for i in _items_of(tmp_path) if i.offset >= 0)
    path = tmp_path / info.relative_path
    with open(path, "rb") as f:
        data = f.read()
    needle = torch.arange(4096, dtype=torch.float32)[:16]
    start = data.index(ctypes_bytes(needle))
    _flip(path, start + 3000 * 4)
    results = run_ranks(2, _reshard_verify, str(tmp_path), True, engine=engine_name, timeout=120)
    assert all(r[0] == "error" and r[1] == "IntegrityError" and r[2] == [1] for r in results), results


def _items_of(path):
    with open(path / ".metadata", "rb") as f:
        md = pickle.load(f)
    return list(md.storage_data.values())


def ctypes_bytes(t):
    import ctypes

    return ctypes.string_at(t.data_ptr(), t.nbytes)
