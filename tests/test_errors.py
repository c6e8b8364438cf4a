"""Bad input: clear errors naming the file (and key and offset); nothing zero-filled or half-loaded."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import dcp_native
from helpers import data_file
from dcp_native import _backend


def failure(exc_info) -> BaseException:
    """The exception DCP wrapped (DCP reports per-rank failures in CheckpointException)."""
    exc = exc_info.value
    if isinstance(exc, CheckpointException):
        (err, _), = exc.failures.values()
        return err
    return exc


def save(sd, path, writer="native"):
    w = dcp_native.FileSystemWriter(path) if writer == "native" else dcp.FileSystemWriter(path)
    dcp.save(sd, storage_writer=w, no_dist=True)


def load(sd, path):
    dcp.load(sd, storage_reader=dcp_native.FileSystemReader(path), no_dist=True)


STATE = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(4096), "c": torch.ones(3)}


def test_directory_without_metadata(engine_name, tmp_path):
    save(STATE, tmp_path)
    os.remove(tmp_path / ".metadata")
    reader = dcp_native.FileSystemReader(tmp_path)
    with pytest.raises(dcp_native.IncompleteCheckpointError, match="no complete checkpoint") as ei:
        reader.read_metadata()
    assert isinstance(ei.value, FileNotFoundError)
    assert ei.value.filename == os.path.join(tmp_path, ".metadata")
    # Through dcp.load, on every torch version, DCP reports this very error for the rank.
    with pytest.raises(CheckpointException) as ei:
        load({"a": torch.zeros(1000)}, tmp_path)
    assert isinstance(failure(ei), dcp_native.IncompleteCheckpointError)
    assert "no complete checkpoint" in str(failure(ei))


def test_missing_directory(engine_name, tmp_path):
    with pytest.raises(CheckpointException) as ei:
        dcp_native.load({"a": torch.zeros(2)}, checkpoint_id=tmp_path / "nope", no_dist=True)
    assert isinstance(failure(ei), dcp_native.IncompleteCheckpointError)
    assert "holds no checkpoint" in str(failure(ei))


@pytest.mark.parametrize("writer", ["native", "stock"])
def test_missing_data_file(engine_name, tmp_path, writer):
    save(STATE, tmp_path, writer)
    path = data_file(tmp_path)
    os.remove(path)
    out = {"a": torch.zeros(1000), "b": torch.zeros(4096), "c": torch.zeros(3)}
    with pytest.raises(CheckpointException) as ei:
        load(out, tmp_path)
    err = failure(ei)
    assert isinstance(err, FileNotFoundError)
    assert err.filename == path


@pytest.mark.parametrize("writer", ["native", "stock"])
@pytest.mark.parametrize("keep", [0, 100, 5000])
def test_truncated_data_file(engine_name, tmp_path, writer, keep):
    save(STATE, tmp_path, writer)
    path = data_file(tmp_path)
    full = os.path.getsize(path)
    os.truncate(path, full - keep - 1 if keep else full - 1)
    actual = os.path.getsize(path)
    out = {"a": torch.full((1000,), -1.0), "b": torch.full((4096,), -1.0), "c": torch.full((3,), -1.0)}
    with pytest.raises(CheckpointException) as ei:
        load(out, tmp_path)
    err = failure(ei)
    assert isinstance(err, dcp_native.TruncatedFileError)
    assert err.filename == str(path)
    assert err.expected == full and err.actual == actual
    assert err.key in STATE and err.offset is not None
    assert f"needs at least {full} bytes" in str(err) and f"has {actual}" in str(err)
    # Nothing was read: no destination holds data from a partly valid file.
    assert all(torch.all(v == -1) for v in out.values())


def test_garbage_item_names_key_file_and_offset(engine_name, tmp_path):
    """A stock item whose zip structure is destroyed: a CorruptCheckpointError, never zeros."""
    save({"a": torch.arange(64.0)}, tmp_path, writer="stock")
    path = tmp_path / "__0_0.distcp"
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(b"\xff" * size)
    with pytest.raises(CheckpointException) as ei:
        load({"a": torch.zeros(64)}, tmp_path)
    err = failure(ei)
    assert isinstance(err, dcp_native.CorruptCheckpointError)
    assert err.key == "a" and err.filename == str(path) and err.offset == 0


def test_metadata_dtype_mismatch_is_reported(engine_name, tmp_path):
    """An item whose data.pkl disagrees with the metadata is refused, naming the key."""
    save({"a": torch.arange(16, dtype=torch.float32)}, tmp_path, writer="stock")
    save_other = tmp_path / "other"
    save({"a": torch.arange(16, dtype=torch.int32)}, save_other, writer="stock")
    os.replace(save_other / "__0_0.distcp", tmp_path / "__0_0.distcp")
    with pytest.raises(CheckpointException) as ei:
        load({"a": torch.zeros(16)}, tmp_path)
    err = failure(ei)
    assert isinstance(err, dcp_native.CorruptCheckpointError) and err.key == "a"
    assert "torch.int32" in str(err) and "torch.float32" in str(err)


def test_unwritable_destination(engine_name, tmp_path):
    if os.geteuid() == 0:
        target = "/proc/dcp_native_cannot_write_here"
    else:
        target = tmp_path / "ro"
        target.mkdir()
        os.chmod(target, 0o500)
    with pytest.raises(CheckpointException) as ei:
        save(STATE, target)
    assert isinstance(failure(ei), OSError)


def test_invalid_backend_value(monkeypatch):
    monkeypatch.setenv("DCP_NATIVE_BACKEND", "gpu")
    with pytest.raises(ValueError, match="DCP_NATIVE_BACKEND"):
        dcp_native.backend()


def test_native_requested_but_unavailable(monkeypatch):
    monkeypatch.setattr(_backend, "_engines", {})
    monkeypatch.setattr(_backend, "_native_error", None)
    monkeypatch.setattr(_backend, "_warned", False)
    monkeypatch.setitem(sys.modules, "dcp_native._C", None)  # makes the import fail
    monkeypatch.delitem(sys.modules, "dcp_native._engine_native", raising=False)
    monkeypatch.setenv("DCP_NATIVE_BACKEND", "native")
    with pytest.raises(dcp_native.BackendUnavailableError, match="DCP_NATIVE_BACKEND=python"):
        dcp_native.backend()
    monkeypatch.setenv("DCP_NATIVE_BACKEND", "auto")
    with pytest.warns(RuntimeWarning, match="pure-Python engine"):
        assert dcp_native.backend() == "python"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert dcp_native.backend() == "python"
