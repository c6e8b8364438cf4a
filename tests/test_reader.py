"""Loads: round trips through dcp_native's reader, on both engines, and what the reader meets.

* Round trips (every dtype, views, objects, one file per item), stock DCP interop both ways
  (stock's reader never needs dcp_native), stream transforms, casts and strided destinations,
  reads of only the bytes a load needs, items past 4 GiB (``slow``).
* Missing and damaged files: clear errors naming the file (and key and offset); nothing
  zero-filled or half-loaded.
* Hostile checkpoints: a ``.metadata`` whose pickle runs code, paths and symbolic links leaving
  the directory, absurd sizes and offsets, saved objects that run code.
* Special files: a FIFO (or a directory, or a link to a device) in place of a checkpoint file
  never hangs ``dcp.load``, ``dcp-native verify`` or ``dcp-native inspect`` (the engines' own
  opens: tests/engine/test_special_files.py). An ``open()`` of a FIFO without O_NONBLOCK blocks
  until a writer appears, so every call runs bounded by a timeout (helpers.bounded; a subprocess
  gets ``timeout=``): a hang fails its test instead of the suite.

Multi-rank resharding: tests/test_distributed.py; ``verify=True``: tests/test_integrity.py.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from typing import IO

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension
from torch.distributed.checkpoint.api import CheckpointException

import dcp_native
from dcp_native import cli
from helpers import (
    DCP_DTYPES,
    bits,
    blank_like,
    bounded,
    data_file,
    data_files,
    failure,
    load,
    make_tensor,
    save,
    sidecar_file,
    state,
    unblock_fifo,
)


# ----------------------------------------------------------------------------------------- helpers


class MyTestModule(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear_1 = torch.nn.Linear(5, 5)
        self.linear_2 = torch.nn.Linear(5, 1)
        self.emb = torch.nn.EmbeddingBag(5, 10)


def assert_same(a, b):
    assert set(a) == set(b)
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            w = b[k]
            assert v.dtype == w.dtype and v.shape == w.shape, k
            assert torch.equal(bits(v), bits(w)), f"{k} differs"
        else:
            assert v == b[k], k


def save_native(sd, path, **kw):
    dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(path, **kw), no_dist=True)


def load_native(sd, path, **kw):
    reader = dcp_native.FileSystemReader(path, **kw)
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return reader


def save_stock(sd, path, **kw):
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(path, **kw), no_dist=True)


def load_stock(sd, path, **kw):
    dcp.load(sd, storage_reader=dcp.FileSystemReader(path, **kw), no_dist=True)


def save_with(writer: str, sd, path, **kw):
    """Saves with dcp_native's writer ("native") or stock's ("stock")."""
    (save_native if writer == "native" else save_stock)(sd, path, **kw)


def zeros_like_sd(sd):
    return {
        k: blank_like(v) if isinstance(v, torch.Tensor) else None for k, v in sd.items()
    }


# ------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("thread_count", [1, 2, 3])
def test_read_write_only_tensor(engine_name, tmp_path, thread_count):
    torch.manual_seed(thread_count)
    to_save = MyTestModule().state_dict()
    dcp_native.save_state_dict(
        to_save, dcp_native.FileSystemWriter(tmp_path, thread_count=thread_count), no_dist=True
    )
    to_load = MyTestModule().state_dict()
    assert not all(torch.equal(to_load[k], to_save[k]) for k in to_save)
    dcp_native.load_state_dict(to_load, dcp_native.FileSystemReader(tmp_path), no_dist=True)
    assert_same(to_load, to_save)
    # thread_count data files per rank, as stock.
    files = data_files(tmp_path)
    assert [f.split(".")[0] for f in files] == [f"__0_{i}" for i in range(thread_count)]
    assert len({f.split(".")[1] for f in files}) == 1  # one save, one tag


def dtype_table_state_dict():
    sd = {}
    for i, dtype in enumerate(DCP_DTYPES):
        name = str(dtype).replace("torch.", "")
        sd[f"{name}.matrix"] = make_tensor(dtype, (7, 5), seed=i)
        sd[f"{name}.scalar"] = make_tensor(dtype, (), seed=100 + i)
        sd[f"{name}.empty"] = make_tensor(dtype, (0, 3), seed=i)
        sd[f"{name}.big"] = make_tensor(dtype, (40000,), seed=200 + i)  # page-aligned payload
    return sd


@pytest.mark.parametrize("direction", ["native->stock", "stock->native", "native->native"])
def test_dtype_table_interop(engine_name, tmp_path, direction):
    sd = dtype_table_state_dict()
    writer, reader = direction.split("->")
    (save_native if writer == "native" else save_stock)(sd, tmp_path, thread_count=2)
    out = zeros_like_sd(sd)
    (load_native if reader == "native" else load_stock)(out, tmp_path)
    assert_same(out, sd)


def views_state_dict():
    base = torch.arange(200, dtype=torch.float32).reshape(10, 20)
    return {
        "slice_rows": base[2:5],  # contiguous view with a storage offset
        "slice_cols": base[:, 3:7],  # non-contiguous
        "transposed": base.T,
        "expanded": torch.arange(3.0).expand(4, 3),  # stride 0: saved as its logical values
        "step": base[::3, ::2],
        "conj": torch.tensor([1 + 2j, 3 - 4j]).conj(),
        "neg_view": torch.tensor([1.0, 2.0])._neg_view(),
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "int_scalar": torch.tensor(7, dtype=torch.int64),
        "bool_empty": torch.zeros(0, dtype=torch.bool),
    }


@pytest.mark.parametrize("direction", ["native->stock", "stock->native", "native->native"])
def test_views_and_expanded_tensors(engine_name, tmp_path, direction):
    sd = views_state_dict()
    expected = {k: v.resolve_conj().resolve_neg().clone() for k, v in sd.items()}
    writer, reader = direction.split("->")
    (save_native if writer == "native" else save_stock)(sd, tmp_path)
    out = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in expected.items()}
    (load_native if reader == "native" else load_stock)(out, tmp_path)
    assert_same(out, expected)


def test_objects_round_trip(engine_name, tmp_path):
    sd = {
        "step": 1234,
        "name": "run-7",
        "nested": {"lr": 0.1, "betas": (0.9, 0.999), "tags": ["a", "b"]},
        "blob": b"\x00\x01raw",
        "t": torch.ones(3),
    }
    save_native(sd, tmp_path, thread_count=2)
    for load_fn in (load_native, load_stock):
        out = {"step": 0, "name": "", "nested": {"lr": 0.0, "betas": (0, 0), "tags": []}, "blob": b"", "t": torch.zeros(3)}
        load_fn(out, tmp_path)
        assert out["step"] == 1234 and out["name"] == "run-7" and out["blob"] == b"\x00\x01raw"
        assert out["nested"] == {"lr": 0.1, "betas": (0.9, 0.999), "tags": ["a", "b"]}
        assert torch.equal(out["t"], torch.ones(3))


def test_stock_reader_needs_no_dcp_native(engine_name, tmp_path):
    """A fresh interpreter that never imports dcp_native loads our checkpoint."""
    sd = {"a": torch.randn(33, 17), "b": make_tensor(torch.bfloat16, (1000,)), "s": "x"}
    save_native(sd, tmp_path, thread_count=2)
    torch.save({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, tmp_path / "expected.pt")
    code = f"""
import sys, torch, torch.distributed.checkpoint as dcp
exp = torch.load({str(tmp_path / 'expected.pt')!r})
out = {{k: torch.zeros_like(v) for k, v in exp.items()}}
out["s"] = ""
dcp.load(out, storage_reader=dcp.FileSystemReader({str(tmp_path)!r}), no_dist=True)
same = lambda a, b: torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
assert all(same(out[k], exp[k]) for k in exp), "values differ"
assert out["s"] == "x"
assert not any(m.startswith("dcp_native") for m in sys.modules), "dcp_native was imported"
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, env=env, cwd="/"
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_single_file_per_item(engine_name, tmp_path):
    sd = {f"t{i}": torch.full((i + 1,), float(i)) for i in range(5)}
    sd["obj"] = [1, 2]
    save_native(sd, tmp_path, single_file_per_rank=False, thread_count=2)
    assert len(data_files(tmp_path)) == 6
    for load_fn in (load_native, load_stock):
        out = {k: torch.zeros_like(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}
        out["obj"] = None
        load_fn(out, tmp_path)
        assert out["obj"] == [1, 2]
        assert_same({k: v for k, v in out.items() if k != "obj"}, {k: v for k, v in sd.items() if k != "obj"})


def test_save_and_load_helpers_with_checkpoint_id(engine_name, tmp_path):
    sd = {"w": torch.randn(10), "step": 3}
    dcp_native.save(sd, checkpoint_id=tmp_path, no_dist=True)
    assert os.path.exists(sidecar_file(tmp_path))
    out = {"w": torch.zeros(10), "step": 0}
    dcp_native.load(out, checkpoint_id=tmp_path, no_dist=True)
    assert torch.equal(out["w"], sd["w"]) and out["step"] == 3


# ------------------------------------ slower paths: casts, strided destinations, stream transforms


@pytest.mark.parametrize("writer", ["native", "stock"])
def test_load_casts_to_destination_dtype(engine_name, tmp_path, writer):
    sd = {"w": torch.randn(64, 32), "i": torch.arange(10, dtype=torch.int32)}
    (save_native if writer == "native" else save_stock)(sd, tmp_path)
    out = {"w": torch.zeros(64, 32, dtype=torch.bfloat16), "i": torch.zeros(10, dtype=torch.float64)}
    load_native(out, tmp_path)
    assert torch.equal(out["w"], sd["w"].to(torch.bfloat16))
    assert torch.equal(out["i"], sd["i"].to(torch.float64))


@pytest.mark.parametrize("writer", ["native", "stock"])
def test_load_into_non_contiguous_destinations(engine_name, tmp_path, writer):
    torch.manual_seed(0)
    sd = {"t": torch.randn(48, 40), "c": torch.randn(30, 20)}
    (save_native if writer == "native" else save_stock)(sd, tmp_path)
    holder = torch.zeros(40, 48)
    wide = torch.zeros(30, 64)
    out = {"t": holder.T, "c": wide[:, 10:30]}  # element-wise and strided destinations
    load_native(out, tmp_path)
    assert torch.equal(holder.T, sd["t"]) and torch.equal(wide[:, 10:30], sd["c"])
    assert torch.count_nonzero(wide[:, :10]) == 0 and torch.count_nonzero(wide[:, 30:]) == 0


def test_transposed_tensor_saved_by_stock(engine_name, tmp_path):
    """Stock keeps the stride of a permuted tensor whose storage has the exact size."""
    t = torch.randn(300, 200)
    sd = {"tT": t.T, "p": torch.randn(3, 4, 5).permute(2, 0, 1)}
    save_stock(sd, tmp_path)
    out = {"tT": torch.zeros(200, 300), "p": torch.zeros(5, 3, 4)}
    load_native(out, tmp_path)
    assert torch.equal(out["tT"], t.T) and torch.equal(out["p"], sd["p"])


class XorZlib(StreamTransformExtension):
    """A custom stream transform: zlib compression of bytes XOR-ed with 0x5A."""

    @staticmethod
    def registry_name() -> str:
        return "test.xorzlib"

    @staticmethod
    def from_descriptor(version: str) -> "XorZlib":
        return XorZlib()

    def get_descriptor(self) -> str:
        return f"{self.registry_name()}/1"

    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        class Writer(io.RawIOBase):
            def __init__(self) -> None:
                self.z = zlib.compressobj()

            def writable(self) -> bool:
                return True

            def write(self, b) -> int:
                data = bytes(x ^ 0x5A for x in bytes(b))
                output.write(self.z.compress(data))
                return len(data)

            def close(self) -> None:
                if not self.closed:
                    output.write(self.z.flush())
                    output.close()
                super().close()

        return Writer()

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:
        data = bytes(x ^ 0x5A for x in zlib.decompress(input.read()))
        return io.BytesIO(data)


def test_custom_stream_transform(engine_name, tmp_path):
    sd = {"w": torch.randn(40, 3), "obj": "opaque-object", "b": torch.arange(5)}
    dcp.save(
        sd,
        storage_writer=dcp_native.FileSystemWriter(tmp_path, _extensions=[XorZlib()]),
        no_dist=True,
    )
    registry = ExtensionRegistry()
    registry.register(XorZlib)
    for make_reader in (
        lambda: dcp_native.FileSystemReader(tmp_path, _extension_registry=registry),
        lambda: dcp.FileSystemReader(tmp_path, _extension_registry=registry),
    ):
        out = {"w": torch.zeros(40, 3), "obj": None, "b": torch.zeros(5, dtype=torch.int64)}
        dcp.load(out, storage_reader=make_reader(), no_dist=True)
        assert torch.equal(out["w"], sd["w"]) and torch.equal(out["b"], sd["b"])
        assert out["obj"] == "opaque-object"


def test_zstandard_extension(engine_name, tmp_path):
    from torch.distributed.checkpoint._extension import ZStandard

    if not ZStandard.is_available():
        pytest.skip("neither zstandard nor pyzstd is installed")
    sd = {"w": torch.randn(100, 10), "o": [1, 2, 3]}
    dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(tmp_path, _extensions=[ZStandard()]), no_dist=True)
    for reader in (dcp_native.FileSystemReader(tmp_path), dcp.FileSystemReader(tmp_path)):
        out = {"w": torch.zeros(100, 10), "o": None}
        dcp.load(out, storage_reader=reader, no_dist=True)
        assert torch.equal(out["w"], sd["w"]) and out["o"] == [1, 2, 3]


# ------------------------------------------------------------------------------- what a load reads


def test_many_small_tensors(engine_name, tmp_path):
    sd = {f"p{i}": make_tensor(torch.float32, (i % 7 + 1, 13), seed=i) for i in range(600)}
    save_native(sd, tmp_path, thread_count=3)
    out = zeros_like_sd(sd)
    reader = load_native(out, tmp_path, thread_count=3)
    assert_same(out, sd)
    # Neighbouring small payloads share reads: far fewer calls than items.
    assert reader.last_read_stats.calls < 100
    out = zeros_like_sd(sd)
    load_stock(out, tmp_path)
    assert_same(out, sd)


def test_reads_only_needed_bytes_for_partial_load(engine_name, tmp_path):
    """Loading a subset of keys reads those items' payloads, not the files."""
    sd = {f"big{i}": torch.randn(256, 256) for i in range(8)}
    save_native(sd, tmp_path, checksums=True)
    out = {"big3": torch.zeros(256, 256)}
    reader = load_native(out, tmp_path, verify=False)
    assert torch.equal(out["big3"], sd["big3"])
    assert reader.last_read_stats.bytes_read == 256 * 256 * 4
    # Verifying adds the file's checksum table (read whole: its SHA-256 is checked), 1/1024 of it.
    out = {"big3": torch.zeros(256, 256)}
    reader = load_native(out, tmp_path, verify=True)
    assert torch.equal(out["big3"], sd["big3"])
    table = os.path.getsize(data_file(tmp_path) + ".crc32c")
    assert table == 32 + 4 * -(-os.path.getsize(data_file(tmp_path)) // 4096)
    assert reader.last_read_stats.bytes_read == 256 * 256 * 4 + table


# ----------------------------------------- items past 4 GiB (slow): ZIP64 framing, both directions


BIG = (4 << 30) + 3 * 4096 + 5  # bytes: a ZIP64 storage; everything after it lies past 4 GiB


def large_state():
    big = torch.empty(BIG, dtype=torch.uint8)
    # Mark a few places (the rest is whatever the allocator gives: compared bit-exactly).
    big[:4096] = 7
    big[(2 << 30) : (2 << 30) + 100] = 9
    big[-4096:] = 11
    return {
        "big": big,
        "after": torch.arange(1000, dtype=torch.float32),
        "after_bf16": torch.linspace(-3, 3, 5000).to(torch.bfloat16),
        "note": "past four gibibytes",
    }


def _offsets(path):
    with open(path / ".metadata", "rb") as f:
        md = pickle.load(f)
    return {idx.fqn: info.offset for idx, info in md.storage_data.items()}


def _load_small(reader):
    out = {"after": torch.zeros(1000), "after_bf16": torch.zeros(5000, dtype=torch.bfloat16), "note": ""}
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


@pytest.mark.parametrize("writer", ["native", "stock"])
@pytest.mark.slow
def test_items_past_4_gib(engine_name, tmp_path, writer):
    if writer == "native":
        w = dcp_native.FileSystemWriter(tmp_path, sync_files=False)
    else:
        if engine_name == "python":
            pytest.skip("the stock writer does not depend on the engine; covered once")
        w = dcp.FileSystemWriter(tmp_path, sync_files=False)
    state = large_state()
    dcp.save(state, storage_writer=w, no_dist=True)
    offsets = _offsets(tmp_path)
    assert offsets["after"] > 1 << 32 and offsets["after_bf16"] > 1 << 32

    # Small items past 4 GiB, with both readers.
    for reader in (dcp_native.FileSystemReader(tmp_path), dcp.FileSystemReader(tmp_path)):
        out = _load_small(reader)
        assert torch.equal(out["after"], state["after"])
        assert torch.equal(out["after_bf16"], state["after_bf16"])
        assert out["note"] == "past four gibibytes"

    # The ZIP64 storage itself, with dcp_native; and once with stock's reader
    # (torch.load decodes the ZIP64 framing we generate).
    readers = [dcp_native.FileSystemReader(tmp_path)]
    if writer == "native" and engine_name == "native":
        readers.append(dcp.FileSystemReader(tmp_path))
    for reader in readers:
        dest = {"big": torch.zeros(BIG, dtype=torch.uint8)}
        dcp.load(dest, storage_reader=reader, no_dist=True)
        assert torch.equal(dest["big"], state["big"])
        del dest
    for f in tmp_path.iterdir():
        f.unlink()


# ----------------------------------------------------------------------- missing and damaged files


STATE = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(4096), "c": torch.ones(3)}


def test_directory_without_metadata(engine_name, tmp_path):
    save_native(STATE, tmp_path)
    os.remove(tmp_path / ".metadata")
    reader = dcp_native.FileSystemReader(tmp_path)
    with pytest.raises(dcp_native.IncompleteCheckpointError, match="no complete checkpoint") as ei:
        reader.read_metadata()
    assert isinstance(ei.value, FileNotFoundError)
    assert ei.value.filename == os.path.join(tmp_path, ".metadata")
    # Through dcp.load, on every torch version, DCP reports this very error for the rank.
    with pytest.raises(CheckpointException) as ei:
        load_native({"a": torch.zeros(1000)}, tmp_path)
    assert isinstance(failure(ei), dcp_native.IncompleteCheckpointError)
    assert "no complete checkpoint" in str(failure(ei))


def test_missing_directory(engine_name, tmp_path):
    with pytest.raises(CheckpointException) as ei:
        dcp_native.load({"a": torch.zeros(2)}, checkpoint_id=tmp_path / "nope", no_dist=True)
    assert isinstance(failure(ei), dcp_native.IncompleteCheckpointError)
    assert "holds no checkpoint" in str(failure(ei))


@pytest.mark.parametrize("writer", ["native", "stock"])
def test_missing_data_file(engine_name, tmp_path, writer):
    save_with(writer, STATE, tmp_path)
    path = data_file(tmp_path)
    os.remove(path)
    out = {"a": torch.zeros(1000), "b": torch.zeros(4096), "c": torch.zeros(3)}
    with pytest.raises(CheckpointException) as ei:
        load_native(out, tmp_path)
    err = failure(ei)
    assert isinstance(err, FileNotFoundError)
    assert err.filename == path


@pytest.mark.parametrize("writer", ["native", "stock"])
@pytest.mark.parametrize("keep", [0, 100, 5000])
def test_truncated_data_file(engine_name, tmp_path, writer, keep):
    save_with(writer, STATE, tmp_path)
    path = data_file(tmp_path)
    full = os.path.getsize(path)
    os.truncate(path, full - keep - 1 if keep else full - 1)
    actual = os.path.getsize(path)
    out = {"a": torch.full((1000,), -1.0), "b": torch.full((4096,), -1.0), "c": torch.full((3,), -1.0)}
    with pytest.raises(CheckpointException) as ei:
        load_native(out, tmp_path)
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
    save_stock({"a": torch.arange(64.0)}, tmp_path)
    path = tmp_path / "__0_0.distcp"
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(b"\xff" * size)
    with pytest.raises(CheckpointException) as ei:
        load_native({"a": torch.zeros(64)}, tmp_path)
    err = failure(ei)
    assert isinstance(err, dcp_native.CorruptCheckpointError)
    assert err.key == "a" and err.filename == str(path) and err.offset == 0


def test_metadata_dtype_mismatch_is_reported(engine_name, tmp_path):
    """An item whose data.pkl disagrees with the metadata is refused, naming the key."""
    save_stock({"a": torch.arange(16, dtype=torch.float32)}, tmp_path)
    save_other = tmp_path / "other"
    save_stock({"a": torch.arange(16, dtype=torch.int32)}, save_other)
    os.replace(save_other / "__0_0.distcp", tmp_path / "__0_0.distcp")
    with pytest.raises(CheckpointException) as ei:
        load_native({"a": torch.zeros(16)}, tmp_path)
    err = failure(ei)
    assert isinstance(err, dcp_native.CorruptCheckpointError) and err.key == "a"
    assert "torch.int32" in str(err) and "torch.float32" in str(err)


# -------------------------------------- hostile checkpoints: metadata, paths, sizes, saved objects


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
    save_native(sd, tmp_path)
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
    save_native({"a": torch.ones(4)}, ck)
    (tmp_path / "outside.distcp").write_bytes(Path(data_file(ck)).read_bytes())
    _rewrite_metadata(ck, lambda md: _set_all_paths(md, rel))
    with pytest.raises(CheckpointException) as ei:
        load(ck, {"a": torch.ones(4)})
    err = failure(ei)
    assert isinstance(err, dcp_native.CorruptCheckpointError) and err.key == "a"
    assert "refusing to read it" in str(err)


def test_symlink_out_of_the_directory_is_refused(engine_name, tmp_path):
    ck = tmp_path / "ck"
    save_native({"a": torch.ones(4)}, ck)
    outside = tmp_path / "elsewhere.distcp"
    inside = data_file(ck)
    os.replace(inside, outside)
    os.symlink(outside, inside)
    with pytest.raises(CheckpointException) as ei:
        load(ck, {"a": torch.ones(4)})
    assert "symbolic link" in str(failure(ei))


def test_petabyte_item_is_refused_before_allocation(engine_name, tmp_path):
    sd = {"a": torch.ones(4), "obj": "x"}
    save_native(sd, tmp_path)

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
    save_native({"a": torch.ones(4)}, tmp_path)

    def negative(md):
        for idx, info in list(md.storage_data.items()):
            md.storage_data[idx] = type(info)(info.relative_path, -5, info.length, None)

    _rewrite_metadata(tmp_path, negative)
    with pytest.raises(CheckpointException) as ei:
        load(tmp_path, {"a": torch.zeros(4)})
    assert isinstance(failure(ei), dcp_native.CorruptCheckpointError)
    assert "not a valid file range" in str(failure(ei))


def test_eio_on_read(engine_name, tmp_path, monkeypatch):
    sd = state(1.0, n=6, cols=257)
    save_native(sd, tmp_path)
    monkeypatch.setenv("DCP_NATIVE_FAULT", "read:EIO:3")
    reader = dcp_native.FileSystemReader(tmp_path, verify=False, chunk_bytes=65536)
    with pytest.raises(CheckpointException) as ei:
        load(tmp_path, sd, reader)
    err = failure(ei)
    assert isinstance(err, OSError) and err.errno == errno.EIO
    assert err.filename == data_file(tmp_path)


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


# --------------------------------------------------------- special files in a checkpoint: dcp.load


SUBPROCESS_TIMEOUT_S = 30.0
# torch warns at import when numpy is absent (as in tests/test_cli.py).
QUIET = "ignore:Failed to initialize NumPy"

FILES = ("data", "table", "sidecar", "metadata")
EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3


def fifo_state() -> dict:
    """What the special-file cases save (one data file, checksums on) and load."""
    return {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.arange(5, dtype=torch.int64) * 7,
        "c": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "step": 3,
    }


def empty_like(sd: dict) -> dict:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in sd.items()}


def fifo_load(path, verify: bool, fifo: str | None = None) -> dict:
    """``dcp.load`` of fifo_state()'s keys, bounded (``fifo`` is released if it blocks)."""
    out = empty_like(fifo_state())
    reader = dcp_native.FileSystemReader(path, verify=verify)
    bounded(lambda: dcp.load(out, storage_reader=reader, no_dist=True), fifo=fifo)
    return out


def load_error(path, verify: bool, fifo: str | None = None) -> BaseException:
    with pytest.raises((CheckpointException, dcp_native.CheckpointError)) as info:
        fifo_load(path, verify, fifo)
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


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One checkpoint, saved once; each test damages its own copy."""
    path = tmp_path_factory.mktemp("template") / "ck"
    writer = dcp_native.FileSystemWriter(path, checksums=True)
    dcp.save(fifo_state(), storage_writer=writer, no_dist=True)
    return path


def replaced_file(ck, which: str) -> str:
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
    path = replaced_file(ck, which)
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


@VERIFY
def test_load_fifo_checksum_table(engine_name, template, tmp_path, verify):
    ck, fifo = hostile(template, tmp_path, "table")
    if not verify:
        # The table is only opened to check blocks: the load does not need it.
        assert_same(fifo_load(ck, verify, fifo), fifo_state())
        return
    err = load_error(ck, verify, fifo)
    assert isinstance(err, dcp_native.IntegrityError), repr(err)
    assert err.filename == fifo
    assert "cannot be verified" in str(err) and "not a regular file" in str(err)


@VERIFY
def test_load_fifo_metadata_refused(engine_name, template, tmp_path, verify):
    ck, fifo = hostile(template, tmp_path, "metadata")
    with pytest.raises((CheckpointException, dcp_native.CheckpointError)) as info:
        fifo_load(ck, verify, fifo)
    err = failure(info.value)
    assert isinstance(err, dcp_native.CorruptCheckpointError), repr(err)
    assert err.filename == fifo
    assert "not a regular file" in str(err) and "FIFO" in str(err)
    assert "missing" not in str(err) and "No such file" not in str(err), str(err)
    # The wrapper carries the traceback (code lines included): only the phrase is checked.
    assert ".metadata is missing" not in str(info.value), str(info.value)


@pytest.mark.parametrize("kind", ["fifo", "directory", "dev-zero"])
def test_load_data_file_not_regular_refused(engine_name, template, tmp_path, kind):
    ck, path = hostile(template, tmp_path, "data", kind)
    for verify in (False, True):
        err = load_error(ck, verify, path if kind == "fifo" else None)
        assert type(err) is dcp_native.CorruptCheckpointError, repr(err)
        assert err.key in fifo_state()
        assert os.path.basename(path) in str(err)
        if kind == "dev-zero":
            # Refused before it is opened: the link leaves the checkpoint
            # directory (a path check, which names the directory).
            assert err.filename in (path, ck)
            why = ("outside the checkpoint directory", "not a regular file")
            assert any(text in str(err) for text in why), str(err)
        else:
            assert err.filename == path
            assert "not a regular file" in str(err)
            assert ("FIFO" if kind == "fifo" else "a directory, not a regular file") in str(err)


@pytest.mark.parametrize("kind", ["fifo", "directory", "dev-zero"])
def test_load_sidecar_not_regular_ignored(engine_name, template, tmp_path, kind):
    ck, path = hostile(template, tmp_path, "sidecar", kind)
    fifo = path if kind == "fifo" else None
    # Without the sidecar the reader parses each item's headers instead.
    assert_same(fifo_load(ck, verify=False, fifo=fifo), fifo_state())
    err = load_error(ck, verify=True, fifo=fifo)
    assert isinstance(err, dcp_native.IntegrityError), repr(err)
    assert "cannot be verified" in str(err)
    # ... and says why: the sidecar cannot be read, and what it is.
    assert os.path.basename(path) in str(err) and "cannot be read" in str(err)
    what = {"fifo": "FIFO", "directory": "a directory", "dev-zero": "a character device"}[kind]
    assert what in str(err)


def test_load_fifo_lock_file_unused(engine_name, template, tmp_path):
    # Readers never take the directory lock: a FIFO there changes nothing.
    ck, fifo = hostile(template, tmp_path, "lock")
    assert_same(fifo_load(ck, verify=True, fifo=fifo), fifo_state())


# ------------------------------------ special files in a checkpoint: dcp-native verify and inspect


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
            unblock_fifo(fifo)
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
