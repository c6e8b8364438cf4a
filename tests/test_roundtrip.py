"""Single-process save/load through DCP, on both engines, and interop with stock DCP both ways."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zlib
from typing import IO

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension

import dcp_native
from helpers import data_file, data_files, sidecar_file
from helpers import DCP_DTYPES, bits, blank_like, make_tensor


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


def zeros_like_sd(sd):
    return {
        k: blank_like(v) if isinstance(v, torch.Tensor) else None for k, v in sd.items()
    }


# ----------------------------------------------------------------------------- reference scenario


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


def test_backend_reports_engine(engine_name):
    assert dcp_native.backend() == engine_name


# ----------------------------------------------------------------------------- dtype table interop


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
    for load in (load_native, load_stock):
        out = {"step": 0, "name": "", "nested": {"lr": 0.0, "betas": (0, 0), "tags": []}, "blob": b"", "t": torch.zeros(3)}
        load(out, tmp_path)
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


def test_sidecar_and_files(engine_name, tmp_path):
    sd = {"a": torch.randn(100), "b": torch.randn(5, 5)}
    save_native(sd, tmp_path, checksums=True)
    (data,) = data_files(tmp_path)
    tag = data.split(".")[1]
    names = sorted(os.listdir(tmp_path))
    assert names == [
        ".dcp_native.lock", ".metadata", f".metadata.{tag}.dcp_native", data, data + ".crc32c"
    ]
    assert sidecar_file(tmp_path) == str(tmp_path / f".metadata.{tag}.dcp_native")
    raw = (tmp_path / f".metadata.{tag}.dcp_native").read_bytes()
    assert raw.startswith(b"DCPNSIDE")
    doc = json.loads(raw[56:])
    assert doc["format"] == "dcp_native" and doc["version"] == 2 and len(doc["items"][data]) == 2
    assert doc["tables"][data]["file"] == data + ".crc32c"
    assert doc["tables"][data]["size"] == os.path.getsize(tmp_path / (data + ".crc32c"))
    # The metadata is stock's: no dcp_native class is pickled into it.
    assert b"dcp_native" not in (tmp_path / ".metadata").read_bytes()


def test_stock_overwrite_ignores_old_sidecar(engine_name, tmp_path):
    """A stock save over a dcp_native one leaves an old sidecar; it must be ignored."""
    save_native({"a": torch.arange(10.0), "b": torch.ones(4)}, tmp_path)
    old_sidecar = sidecar_file(tmp_path)
    new = {"a": torch.arange(10.0) * 2, "pad": torch.randn(1000), "b": torch.full((4,), 5.0)}
    save_stock(new, tmp_path)
    assert os.path.exists(old_sidecar)
    out = zeros_like_sd(new)
    load_native(out, tmp_path)
    assert_same(out, new)


def test_overwrite_with_dcp_native(engine_name, tmp_path):
    for scale in (1.0, 3.0):
        sd = {"a": torch.arange(64.0) * scale}
        save_native(sd, tmp_path)
    out = {"a": torch.zeros(64)}
    load_native(out, tmp_path)
    assert torch.equal(out["a"], torch.arange(64.0) * 3.0)


def test_single_file_per_item(engine_name, tmp_path):
    sd = {f"t{i}": torch.full((i + 1,), float(i)) for i in range(5)}
    sd["obj"] = [1, 2]
    save_native(sd, tmp_path, single_file_per_rank=False, thread_count=2)
    assert len(data_files(tmp_path)) == 6
    for load in (load_native, load_stock):
        out = {k: torch.zeros_like(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}
        out["obj"] = None
        load(out, tmp_path)
        assert out["obj"] == [1, 2]
        assert_same({k: v for k, v in out.items() if k != "obj"}, {k: v for k, v in sd.items() if k != "obj"})


# ----------------------------------------------------------------------------- slower paths


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


def test_save_and_load_helpers_with_checkpoint_id(engine_name, tmp_path):
    sd = {"w": torch.randn(10), "step": 3}
    dcp_native.save(sd, checkpoint_id=tmp_path, no_dist=True)
    assert os.path.exists(sidecar_file(tmp_path))
    out = {"w": torch.zeros(10), "step": 0}
    dcp_native.load(out, checkpoint_id=tmp_path, no_dist=True)
    assert torch.equal(out["w"], sd["w"]) and out["step"] == 3


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


def test_async_save(engine_name, tmp_path):
    """dcp.async_save / dcp_native.async_save with the writer as its stager (stock's for now)."""
    sd = {"w": torch.randn(1000), "step": 5}
    fut = dcp_native.async_save(sd, checkpoint_id=tmp_path)
    result = fut.result() if hasattr(fut, "result") else fut.upload_completion.result()
    assert result is not None
    out = {"w": torch.zeros(1000), "step": 0}
    dcp_native.load(out, checkpoint_id=tmp_path)
    assert torch.equal(out["w"], sd["w"]) and out["step"] == 5
    assert os.path.exists(sidecar_file(tmp_path))
