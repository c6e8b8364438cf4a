"""The native pickler of ``.metadata`` (``dcp_native._metadata_pickle``, csrc/metadata_pickle.cpp).

Its stream must load, with pickle's C and pure-Python unpicklers, with stock DCP's reader and with
dcp_native's restricted one, into objects equal to the metadata, of the same types, shared where
pickle's own stream shares them; anything outside its tables must go through pickle.dumps.
"""

from __future__ import annotations

import dataclasses
import pathlib
import pickle
import pickletools

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import filesystem as stock_fs
from torch.distributed.checkpoint import metadata as md

import dcp_native
from dcp_native import _metadata_pickle as mp
from dcp_native._safe_pickle import load_metadata

_C = pytest.importorskip("dcp_native._C")


def native(obj):
    return _C.pickle_tree(obj, *mp.tables())


def _shape(obj, seen=None):
    """``obj``'s tree as nested plain values, each object numbered by its first appearance, so
    two trees with the same values and the same sharing have equal shapes."""
    seen = {} if seen is None else seen
    if obj is None or type(obj) in (bool, int, float):
        return obj
    if id(obj) in seen:
        return ("ref", seen[id(obj)])
    seen[id(obj)] = len(seen)
    if type(obj) in (str, bytes) or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
        return (type(obj).__name__, obj)
    if type(obj) is torch.Size:
        return ("Size", tuple(obj))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, [_shape(x, seen) for x in obj])
    if isinstance(obj, dict):
        return ("dict", [(_shape(k, seen), _shape(v, seen)) for k, v in obj.items()])
    if isinstance(obj, pathlib.PurePath):
        return (type(obj).__name__, str(obj))
    return (type(obj).__name__, _shape(vars(obj), seen))


def check(obj):
    """The native pickle of ``obj`` loads as pickle's does; returns it."""
    raw = native(obj)
    assert raw is not None, "outside the tables"
    expected = _shape(pickle.loads(pickle.dumps(obj)))
    for loads in (pickle.loads, pickle._loads):  # C, and pure Python (strict about frames)
        assert _shape(loads(raw)) == expected
    assert pickle.loads(raw) == obj
    # Frames hold whole opcodes and every opcode is protocol 4's or older.
    assert max(op.proto for op, _, _ in pickletools.genops(raw)) <= 4
    return raw


def _tensor_md(shape, dtype=torch.float32, chunks=None, requires_grad=False):
    props = md.TensorProperties(dtype=dtype, requires_grad=requires_grad)
    chunks = chunks or [md.ChunkStorageMetadata(torch.Size([0] * len(shape)), torch.Size(shape))]
    return md.TensorStorageMetadata(props, torch.Size(shape), chunks)


def test_a_saved_checkpoint_metadata(tmp_path, monkeypatch):
    """A real save's metadata (tensors of many dtypes, 0-d, empty, objects, nested names)."""
    monkeypatch.setenv("DCP_NATIVE_BACKEND", "native")
    sd = {f"w{i}": torch.randn(i + 1, 3) for i in range(30)}
    sd.update(bf=torch.zeros(2, dtype=torch.bfloat16), c=torch.zeros(2, dtype=torch.complex64),
              b=torch.zeros(4, dtype=torch.bool), i8=torch.zeros(3, dtype=torch.int8), scalar=torch.tensor(3.0),
              empty=torch.zeros(0, 5), obj={"step": 3, "name": "é"}, nested={"x": {"y": torch.ones(2)}},
              lr=0.5, steps=[1, 2])
    got = dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(str(tmp_path)), no_dist=True)
    check(got)
    raw = (tmp_path / ".metadata").read_bytes()
    assert _shape(pickle.loads(raw)) == _shape(pickle.loads(pickle.dumps(got)))
    # Read back by stock DCP's reader and by dcp_native's restricted unpickler.
    read = stock_fs.FileSystemReader(str(tmp_path)).read_metadata()
    read.storage_meta.load_id = None  # set by the reader
    assert read == got
    with open(tmp_path / ".metadata", "rb") as f:
        assert load_metadata(f, str(tmp_path / ".metadata")) == got


def test_the_writer_uses_it_on_the_native_engine_only(tmp_path, monkeypatch, engine_name):
    calls = []
    real = _C.pickle_tree
    monkeypatch.setattr(_C, "pickle_tree", lambda *a: calls.append(1) or real(*a))
    sd = {"a": torch.arange(6.0), "o": [1, 2]}
    got = dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(str(tmp_path)), no_dist=True)
    assert len(calls) == (engine_name == "native")
    out = {"a": torch.zeros(6), "o": None}
    dcp.load(out, storage_reader=stock_fs.FileSystemReader(str(tmp_path)), no_dist=True)
    assert torch.equal(out["a"], sd["a"]) and out["o"] == [1, 2]
    read = stock_fs.FileSystemReader(str(tmp_path)).read_metadata()
    assert read.state_dict_metadata == got.state_dict_metadata and read.storage_data == got.storage_data


def test_sharded_tensors_many_items_and_large_values():
    """Several chunks per tensor, more than one SETITEMS batch (1000) and frame (64 KiB),
    sizes past 2**31 and 2**63-1, negative ints, long names."""
    chunks = [md.ChunkStorageMetadata(torch.Size([r * 4, 0]), torch.Size([4, 8])) for r in range(4)]
    sd_md = {f"layers.{i}.{'x' * (i % 300)}": _tensor_md([16, 8], chunks=chunks) for i in range(2500)}
    sd_md["huge"] = _tensor_md([2**33, 2**40], dtype=torch.float8_e4m3fn, requires_grad=True)
    sd_md["obj"] = md.BytesStorageMetadata()
    storage = {md.MetadataIndex(fqn, c.offsets, i): stock_fs._StorageInfo("__0_0.distcp", 2**45 + i, 100)
               for fqn, t in sd_md.items() if isinstance(t, md.TensorStorageMetadata)
               for i, c in enumerate(t.chunks)}
    storage[md.MetadataIndex("obj")] = stock_fs._StorageInfo("__0_1.distcp", 0, 5, ["zstd", "x"])
    meta = md.Metadata(sd_md, planner_data={"k": ("a", 0, -1, -(2**40), 2**63 - 1, 1.5, None, True)},
                       storage_data=storage,
                       storage_meta=md.StorageMeta(pathlib.PosixPath("/ck/p"), "sid", None, ["m"]))
    raw = check(meta)
    assert len(raw) > 3 * 64 * 1024 and sum(op.name == "FRAME" for op, _, _ in pickletools.genops(raw)) > 3


def test_shared_objects_stay_shared():
    size = torch.Size([3, 4])
    props = md.TensorProperties(dtype=torch.float16)
    a = md.TensorStorageMetadata(props, size, [md.ChunkStorageMetadata(torch.Size([0, 0]), size)])
    b = md.TensorStorageMetadata(props, size, a.chunks)
    meta = md.Metadata({"a": a, "b": b, "again": a}, planner_data=[a.chunks, a.chunks])
    back = pickle.loads(check(meta))
    assert back.state_dict_metadata["again"] is back.state_dict_metadata["a"]
    assert back.state_dict_metadata["b"].chunks is back.state_dict_metadata["a"].chunks
    assert back.state_dict_metadata["b"].properties is back.state_dict_metadata["a"].properties


class _Foreign:
    pass


@pytest.mark.parametrize("planner_data", [
    {"x": _Foreign()},                   # a class outside the tables
    {"x": {1, 2}},                       # a set
    {"x": "\udc80"},                     # a lone surrogate (pickle writes it with surrogatepass)
    {"x": 2**64},                        # beyond 64 bits
    {"x": "y" * (70 * 1024)},            # a string pickle writes outside a frame
    {"x": bytearray(b"ab")},
], ids=["class", "set", "surrogate", "bigint", "longstr", "bytearray"])
def test_anything_else_goes_through_pickle(planner_data):
    meta = md.Metadata({"a": _tensor_md([2])}, planner_data=planner_data)
    assert native(meta) is None
    for flag in (True, False):
        back = pickle.loads(mp.dumps(meta, flag))
        assert type(back.planner_data["x"]) is type(planner_data["x"])


def test_a_cycle_through_a_list_is_written_and_one_through_a_tuple_gives_up():
    loop: list = []
    loop.append(loop)
    back = pickle.loads(native({"l": loop}))
    assert back["l"][0] is back["l"]
    t_loop: list = []
    t = (t_loop,)
    t_loop.append(t)
    assert native(t) is None and pickle.loads(mp.dumps(t, True))[0][0][0] is not None


def test_a_class_pickled_its_own_way_leaves_the_table():
    @dataclasses.dataclass
    class Plain:
        x: int = 0

    class Reduced(Plain):
        def __reduce__(self):
            return (Plain, ())

    class Slotted:
        __slots__ = ("x",)

    class GetState(Plain):
        def __getstate__(self):
            return {"x": 1}

    assert mp._mode(Reduced) is None and mp._mode(Slotted) is None
    assert mp._mode(GetState) is None  # local classes cannot be found by name
    globals()["_PlainForTest"] = Plain
    Plain.__qualname__ = "_PlainForTest"
    try:
        assert mp._mode(Plain) == mp.STATE_DICT
    finally:
        del globals()["_PlainForTest"]
    table = mp.tables()[1]
    assert table[torch.Size] == mp.TUPLE_REDUCE and table[md.TensorProperties] == mp.STATE_BY_FIELDS
    assert table[stock_fs._StorageInfo] == mp.STATE_NOT_NONE and table[md.Metadata] == mp.STATE_DICT


def test_a_getstate_that_raises_is_raised():
    class Boom(md.TensorProperties):
        def __getstate__(self):
            raise RuntimeError("boom")

    classes = dict(mp.tables()[1])
    classes[Boom] = mp.STATE_CALL
    globals_ = dict(mp.tables()[0])
    globals_[Boom] = (mp._named_opcodes(md.TensorProperties), Boom)
    with pytest.raises(RuntimeError, match="boom"):
        _C.pickle_tree([Boom()], globals_, classes)


def test_a_global_equal_but_not_identical_is_refused():
    class Twin:
        def __eq__(self, other):
            return other is torch.float32

        def __hash__(self):
            return hash(torch.float32)

    assert native({"x": Twin()}) is None


_names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
_ints = st.integers(-(2**63), 2**63 - 1)
_dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.bool, torch.complex128,
                           torch.float8_e5m2])
_plain = st.recursive(st.none() | st.booleans() | _ints | _names | st.floats(allow_nan=False),
                      lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                      | st.dictionaries(_names, inner, max_size=4), max_leaves=12)


@st.composite
def _metadata(draw):
    sd_md, storage = {}, {}
    files = [f"__{i}_0.distcp" for i in range(draw(st.integers(1, 3)))]
    for fqn in draw(st.lists(_names, max_size=40, unique=True)):
        if draw(st.booleans()):
            sd_md[fqn] = md.BytesStorageMetadata()
            storage[md.MetadataIndex(fqn)] = stock_fs._StorageInfo(draw(st.sampled_from(files)), draw(_ints), 5)
            continue
        shape = draw(st.lists(st.integers(0, 2**40), max_size=4))
        t = _tensor_md(shape, dtype=draw(_dtypes), requires_grad=draw(st.booleans()))
        sd_md[fqn] = t
        storage[md.MetadataIndex(fqn, t.chunks[0].offsets, 0)] = stock_fs._StorageInfo(
            draw(st.sampled_from(files)), draw(st.integers(0, 2**50)), draw(st.integers(0, 2**50)),
            draw(st.none() | st.lists(_names, max_size=2)))
    return md.Metadata(sd_md, planner_data=draw(_plain), storage_data=storage,
                       storage_meta=md.StorageMeta(draw(st.sampled_from(["", "/ck", pathlib.PosixPath("/c/k")])),
                                                   draw(_names)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_metadata())
def test_random_metadata(meta):
    check(meta)
