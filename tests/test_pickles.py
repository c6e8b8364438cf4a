"""The two pickles of a checkpoint: ``.metadata`` as every DCP version wrote it, and saved objects.

``.metadata`` files of older torch versions are rebuilt here from a checkpoint
this torch writes, by a pickler that names the classes by the module paths the
old versions used (see ``_LEGACY``), and are read on both engines. Saved
objects go through ``check_object``, which must allow exactly what
``torch.load(weights_only=True)`` allows.
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import sys
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import metadata as sharded_md
from torch.distributed.checkpoint import filesystem as stock_fs
from torch.distributed.checkpoint import metadata as md_mod
from torch.distributed.checkpoint.api import CheckpointException

import dcp_native
from dcp_native._safe_pickle import check_object

# ----------------------------------------------------------------------------- legacy .metadata

_OLD_MD = "torch.distributed._shard.checkpoint.metadata"
_CORE = (
    md_mod.ChunkStorageMetadata,
    md_mod.TensorStorageMetadata,
    md_mod.BytesStorageMetadata,
    md_mod.Metadata,
    md_mod.MetadataIndex,
)
_SHARDED_TP = {
    md_mod.TensorProperties: (sharded_md.__name__, "TensorProperties"),
    md_mod._MEM_FORMAT_ENCODING: (sharded_md.__name__, "MEM_FORMAT_ENCODING"),
}

#: How older versions wrote .metadata: pickle protocol, the module paths of the
#: classes (today's class -> the (module, name) written), and the fields they lacked.
_LEGACY = {
    # torch 1.13, on Python 3.7 (pickle's default protocol 3 there)
    "torch-1.13": dict(
        protocol=3,
        names={
            **{cls: (_OLD_MD, cls.__name__) for cls in _CORE},
            stock_fs._StorageInfo: ("torch.distributed._shard.checkpoint.filesystem", "_StorageInfo"),
            **_SHARDED_TP,
        },
        no_planner_data=True,
    ),
    # torch 2.0 to 2.2
    "torch-2.0": dict(protocol=4, names=dict(_SHARDED_TP)),
    # torch 2.1 and 2.2's FsspecWriter
    "torch-2.1-fsspec": dict(
        protocol=4,
        names={
            stock_fs._StorageInfo: ("torch.distributed.checkpoint._fsspec_filesystem", "_StorageInfo"),
            **_SHARDED_TP,
        },
    ),
    # torch 2.5+ on Python 3.13, whose pathlib classes live in pathlib._local
    "python-3.13": dict(
        protocol=4,
        names={pathlib.PosixPath: ("pathlib._local", "PosixPath")},
        current=True,
    ),
}


class _LegacyPickler(pickle._Pickler):
    """Pickles classes under the (module, name) given for them, as an older torch wrote them."""

    def __init__(self, file, protocol: int, names: dict) -> None:
        super().__init__(file, protocol)
        self.names = names

    def save_global(self, obj, name=None):
        if obj not in self.names:
            return super().save_global(obj, name)
        module, name = self.names[obj]
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def _legacy_bytes(md: Any, protocol: int, names: dict) -> bytes:
    buf = io.BytesIO()
    _LegacyPickler(buf, protocol, names).dump(md)
    return buf.getvalue()


def _as_legacy(md: md_mod.Metadata, variant: str) -> md_mod.Metadata:
    """``md`` without the fields the variant's torch did not have yet."""
    spec = _LEGACY[variant]
    if not spec.get("current"):
        for field in ("storage_meta", "version"):
            md.__dict__.pop(field, None)
        for info in md.storage_data.values():
            info.__dict__.pop("transform_descriptors", None)
    if spec.get("no_planner_data"):
        md.planner_data = None
    return md


def _state() -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(16, 9, generator=g),
        "h": torch.randn(5, generator=g).to(torch.bfloat16),
        "i": torch.arange(7, dtype=torch.int64),
        "b": torch.tensor([True, False, True]),
        "s": torch.tensor(2.5),
        "step": 11,
    }


def _zeros(sd: dict) -> dict:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in sd.items()}


def _write_legacy(
    path: pathlib.Path, variant: str, edit=None, extra_names=None
) -> tuple[dict, md_mod.Metadata]:
    """A checkpoint whose .metadata is as ``variant`` wrote it; returns its state and metadata."""
    sd = _state()
    dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(path), no_dist=True)
    # Old checkpoints have no dcp_native sidecar beside .metadata.
    for name in os.listdir(path):
        if name.startswith(".metadata") and name != ".metadata":
            os.remove(path / name)
    with open(path / ".metadata", "rb") as f:
        md = pickle.load(f)  # this test's own file: trusted
    md = _as_legacy(md, variant)
    # One tensor says channels_last, so the memory format enum loads a value other than 0.
    md.state_dict_metadata["w"].properties.memory_format = torch.channels_last
    if edit is not None:
        edit(md)
    spec = _LEGACY[variant]
    data = _legacy_bytes(md, spec["protocol"], {**spec["names"], **(extra_names or {})})
    for module, name in spec["names"].values():
        # The file names the legacy path exactly as the old version wrote it.
        assert module.encode() in data and name.encode() in data
    (path / ".metadata").write_bytes(data)
    return sd, md


@pytest.mark.parametrize("variant", list(_LEGACY))
def test_legacy_metadata_loads(engine_name, tmp_path, variant):
    sd, written = _write_legacy(tmp_path, variant)
    md = dcp_native.FileSystemReader(tmp_path).read_metadata()

    assert type(md) is md_mod.Metadata
    assert md.planner_data == written.planner_data
    assert set(md.state_dict_metadata) == set(sd)
    legacy_tp = md_mod.TensorProperties in _LEGACY[variant]["names"]
    for key, value in sd.items():
        item = md.state_dict_metadata[key]
        if not isinstance(value, torch.Tensor):
            assert type(item) is md_mod.BytesStorageMetadata
            continue
        assert type(item) is md_mod.TensorStorageMetadata
        # Old TensorProperties load as the class they name, as stock loads them.
        assert type(item.properties) is (sharded_md.TensorProperties if legacy_tp else md_mod.TensorProperties)
        assert item.properties.dtype == value.dtype
        assert item.properties.layout == torch.strided
        assert item.properties.requires_grad is False
        assert item.properties.pin_memory is False
        assert item.properties.memory_format == (
            torch.channels_last if key == "w" else torch.contiguous_format
        )
        assert item.size == value.size() and type(item.size) is torch.Size
        [chunk] = item.chunks
        assert type(chunk) is md_mod.ChunkStorageMetadata
        assert chunk.offsets == torch.Size([0] * value.dim()) and chunk.sizes == value.size()
    assert len(md.storage_data) == len(written.storage_data)
    for index, info in md.storage_data.items():
        assert type(index) is md_mod.MetadataIndex
        assert type(info) is stock_fs._StorageInfo
        old = written.storage_data[index]
        assert (info.relative_path, info.offset, info.length) == (old.relative_path, old.offset, old.length)
        assert info.transform_descriptors == getattr(old, "transform_descriptors", None)
    if variant == "python-3.13":
        assert type(md.storage_meta.checkpoint_id) is pathlib.PosixPath
        assert md.storage_meta.checkpoint_id == pathlib.Path(tmp_path)

    out = _zeros(sd)
    dcp.load(out, storage_reader=dcp_native.FileSystemReader(tmp_path), no_dist=True)
    for key, value in sd.items():
        if isinstance(value, torch.Tensor):
            assert out[key].dtype == value.dtype and torch.equal(out[key], value), key
        else:
            assert out[key] == value


def test_legacy_tensor_properties_load_as_stock_loads_them(tmp_path):
    # What torch 2.0 to 2.2 wrote, read by stock DCP: the same class and values as ours.
    _write_legacy(tmp_path, "torch-2.0")
    ours = dcp_native.FileSystemReader(tmp_path).read_metadata()
    stock = dcp.FileSystemReader(str(tmp_path)).read_metadata()
    for key, item in stock.state_dict_metadata.items():
        if isinstance(item, md_mod.TensorStorageMetadata):
            mine = ours.state_dict_metadata[key].properties
            assert type(mine) is type(item.properties) is sharded_md.TensorProperties
            assert mine == item.properties


class _Global:
    """Pickles as a call of whatever global the test names for it (nothing is ever called)."""

    def __reduce__(self):
        return (_Global, ())


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("variant", ["torch-1.13", "torch-2.0"])
def test_legacy_metadata_with_code_is_refused(engine_name, tmp_path, variant):
    marker = tmp_path / "pwned"
    sd, _ = _write_legacy(tmp_path, variant, edit=lambda md: setattr(md, "planner_data", _RunsCode(str(marker))))
    path = str(tmp_path / ".metadata")
    with pytest.raises(dcp_native.CorruptCheckpointError, match=r"refers to (posix|os)\.system, which DCP") as ei:
        dcp_native.FileSystemReader(tmp_path).read_metadata()
    assert ei.value.filename == path
    with pytest.raises(CheckpointException):
        dcp.load(_zeros(sd), storage_reader=dcp_native.FileSystemReader(tmp_path), no_dist=True)
    assert not marker.exists()


@pytest.mark.parametrize(
    "module, name",
    [
        ("builtins", "eval"),
        ("os", "system"),
        # Siblings of admitted names: only the exact (module, name) pairs are admitted.
        (sharded_md.__name__, "ShardMetadata"),
        (sharded_md.__name__, "ShardedTensorMetadata"),
        (_OLD_MD, "torch"),
        (md_mod.__name__, "torch.load"),  # protocol 4 resolves dotted names attribute by attribute
        ("torch.distributed.checkpoint._fsspec_filesystem", "FsspecWriter"),
        ("torch", "load"),
        ("torch", "channels_last"),  # memory formats never reach .metadata (TensorProperties encodes them)
        ("pathlib", "Path.open"),
        ("collections", "OrderedDict"),
        ("copyreg", "_reconstructor"),
    ],
)
def test_foreign_global_beside_legacy_ones_is_refused(tmp_path, module, name):
    _write_legacy(
        tmp_path,
        "torch-2.0",
        edit=lambda md: setattr(md, "planner_data", _Global()),
        extra_names={_Global: (module, name)},
    )
    with pytest.raises(dcp_native.CorruptCheckpointError) as ei:
        dcp_native.FileSystemReader(tmp_path).read_metadata()
    assert str(ei.value) == (
        f"{tmp_path / '.metadata'} is refused: it refers to {module}.{name}, "
        "which DCP metadata never holds; refusing to import it"
    )
    assert ei.value.filename == str(tmp_path / ".metadata")


def test_refused_global_is_never_imported(tmp_path, monkeypatch):
    probe = "dcp_native_probe_never_imported"
    (tmp_path / f"{probe}.py").write_text("raise SystemExit('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    absent = "_dcp_native_no_such_attribute"
    refused = [(probe, "thing"), (f"{probe}.sub", "x"), ("torch", absent)]
    for i, (module, name) in enumerate(refused):
        ck = tmp_path / f"ck{i}"
        dcp.save({"a": torch.ones(2)}, storage_writer=dcp_native.FileSystemWriter(ck), no_dist=True)
        (ck / ".metadata").write_bytes(_legacy_bytes([_Global()], 4, {_Global: (module, name)}))
    # torch's module __getattr__ imports submodules lazily: refusing torch.X must not reach it.
    asked: list[str] = []

    def lazy(name: str):
        asked.append(name)
        raise AttributeError(name)

    monkeypatch.setattr(torch, "__getattr__", lazy, raising=False)
    for i in range(len(refused)):
        with pytest.raises(dcp_native.CorruptCheckpointError, match="never holds"):
            dcp_native.FileSystemReader(tmp_path / f"ck{i}").read_metadata()
    assert probe not in sys.modules
    assert absent not in asked


# ----------------------------------------------------------------------------- check_object


class Point:
    """A user's class: torch.load(weights_only=True) refuses it until it is allowed."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other) -> bool:
        return type(other) is Point and (self.x, self.y) == (other.x, other.y)


class _Pwn:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def _saved(obj: Any, **kw) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def _check(data, key="step", filename="/ck/__0_0.distcp", offset=4096):
    return check_object(data, key=key, filename=filename, offset=offset)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return type(b) is type(a) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) is type(a) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(b) is type(a) and len(a) == len(b) and all(map(_equal, a, b))
    return type(b) is type(a) and a == b


_ALLOWED = {
    "int": 7,
    "big-int": 1 << 80,
    "float": 2.5,
    "str": "lr-schedule",
    "bytes": b"\x00\xff",
    "none": None,
    "bool": True,
    "list": [1, 2.0, "x", None],
    "tuple": (1, (2, 3)),
    "dict": {"epoch": 3, "nested": {"a": [1, 2]}},
    "ordered-dict": collections.OrderedDict([("b", 1), ("a", 2)]),
    "set": {1, 2, 3},
    "complex": 1 + 2j,
    "size": torch.Size([4, 0, 3]),
    "tensor": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "tensors": {"m": torch.ones(2, dtype=torch.bfloat16), "n": torch.tensor(5, dtype=torch.int8)},
    "empty-tensor": torch.empty(0, 3),
    "view": torch.arange(10)[2:7:2],
    "dtype": torch.float16,
    "device": torch.device("cpu"),
}


@pytest.mark.parametrize("name", list(_ALLOWED))
def test_check_object_allows_what_weights_only_allows(name):
    obj = _ALLOWED[name]
    data = _saved(obj)
    assert _equal(obj, _check(data))
    assert _equal(obj, _check(memoryview(data)))


def test_check_object_allows_the_legacy_format():
    obj = {"step": 3, "t": torch.arange(5)}
    data = _saved(obj, _use_new_zipfile_serialization=False)
    assert not data.startswith(b"PK")
    assert _equal(obj, _check(data))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_check_object_refuses_code_and_runs_nothing(tmp_path, legacy):
    marker = tmp_path / "pwned"
    data = _saved({"step": _Pwn(str(marker))}, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(dcp_native.RefusedObjectError) as ei:
        _check(data, key="step", filename=str(tmp_path / "__0_0.distcp"), offset=123)
    err = ei.value
    assert not marker.exists()
    assert err.refused in ("os.system", "posix.system", "nt.system")
    assert (err.key, err.filename, err.offset) == ("step", str(tmp_path / "__0_0.distcp"), 123)
    text = str(err)
    for part in ("'step'", str(tmp_path / "__0_0.distcp"), "123", err.refused, "allow_pickle=True"):
        assert part in text
    assert isinstance(err, OSError)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")
def test_check_object_refuses_a_bare_pickle(tmp_path):
    # Not torch.save output at all, but stock's torch.load would still unpickle it.
    marker = tmp_path / "pwned"
    for protocol in (2, 4):
        with pytest.raises(dcp_native.RefusedObjectError) as ei:
            _check(pickle.dumps(_Pwn(str(marker)), protocol=protocol))
        assert ei.value.refused in ("os.system", "posix.system", "nt.system")
    assert not marker.exists()


def test_check_object_names_a_refused_builtin():
    with pytest.raises(dcp_native.RefusedObjectError) as ei:
        _check(_saved([_Eval()]))
    assert ei.value.refused == "builtins.eval"
    assert "add_safe_globals([builtins.eval])" in str(ei.value)


@pytest.fixture
def restore_safe_globals():
    saved = torch.serialization.get_safe_globals()
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(saved)


def test_check_object_follows_the_user_allowlist(restore_safe_globals):
    obj = {"origin": Point(1, 2)}
    data = _saved(obj)
    with pytest.raises(dcp_native.RefusedObjectError) as ei:
        _check(data, key="origin")
    name = f"{Point.__module__}.Point"
    assert ei.value.refused == name
    text = str(ei.value)
    assert f"torch.serialization.add_safe_globals([{name}])" in text
    assert "dcp_native.FileSystemReader(path, allow_pickle=True)" in text

    with torch.serialization.safe_globals([Point]):
        assert _check(data) == obj
    with pytest.raises(dcp_native.RefusedObjectError):
        _check(data)
    torch.serialization.add_safe_globals([Point])
    assert _check(data) == obj


def test_check_object_refuses_what_weights_only_cannot_read():
    # A valid torch.save stream whose pickle uses opcodes the weights-only unpickler lacks.
    data = _saved({"step": 1, "name": "x" * 10}, pickle_protocol=4)
    with pytest.warns(UserWarning, match="pickle protocol 4"):
        with pytest.raises(dcp_native.RefusedObjectError, match="Unsupported operand") as ei:
            _check(data)
    assert ei.value.refused is None


@pytest.mark.filterwarnings("ignore:'torch.load' received a zip file that looks like a TorchScript:UserWarning")
def test_check_object_refuses_a_torchscript_archive():
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buf)
    with pytest.raises(dcp_native.RefusedObjectError, match="TorchScript archives") as ei:
        _check(buf.getvalue(), key="model")
    assert ei.value.refused is None and ei.value.key == "model"
    assert "allow_pickle=True" in str(ei.value)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff\x00 not a pickle", b"PK\x03\x04" + bytes(60), pickle.dumps(5, protocol=2)],
    ids=["empty", "garbage", "broken-zip", "bare-int-pickle"],
)
def test_check_object_garbage_is_corrupt(data):
    with pytest.raises(dcp_native.CorruptCheckpointError, match="cannot be decoded") as ei:
        _check(data, key="opt.state", filename="/ck/__1_0.distcp", offset=77)
    err = ei.value
    assert not isinstance(err, dcp_native.RefusedObjectError)
    assert (err.key, err.filename, err.offset) == ("opt.state", "/ck/__1_0.distcp", 77)
    assert "'opt.state'" in str(err) and "/ck/__1_0.distcp" in str(err) and "77" in str(err)


def test_check_object_truncated_archive_is_corrupt():
    data = _saved({"t": torch.arange(100)})
    with pytest.raises(dcp_native.CorruptCheckpointError, match="cannot be decoded"):
        _check(data[: len(data) // 2])
