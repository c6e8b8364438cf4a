"""The pickle of a checkpoint's ``.metadata``, written by the native module where it can.

``pickle.dumps(metadata)`` spends about 9 µs per tensor in pickle's generic reduce protocol
(``object.__reduce_ex__``, copyreg, a fresh state per dataclass). The classes of DCP's metadata are
few and known, so ``dcp_native._C.pickle_tree`` walks the tree once and writes the opcodes pickle
writes for it, in protocol 4, memoizing by identity as pickle does. The stream loads with any
unpickler (stock DCP's ``pickle.load`` included) into objects equal to the metadata, of the same
types, shared where they were shared.

What the native pickler may write is the two tables built here, from what pickle itself does
with each class in this process: a class whose pickling a torch or Python version changes (a
``__reduce__``, slots, a copyreg entry) leaves the table, and any tree holding an object outside
the tables (a planner's own ``planner_data``, say) is pickled by ``pickle.dumps``, as is every
tree when the native module is not there.
"""

from __future__ import annotations

import copyreg
import enum
import functools
import pathlib
import pickle
import pickletools
from typing import Any

import torch
from torch.distributed.checkpoint import filesystem as _fs
from torch.distributed.checkpoint import metadata as _md

# Modes of the class table (csrc/metadata_pickle.hpp).
STATE_DICT, STATE_CALL, TUPLE_REDUCE, REDUCE_CALL, STATE_BY_FIELDS, STATE_NOT_NONE = 0, 1, 2, 3, 4, 5

#: The classes a checkpoint's metadata is made of.
_CLASSES = (
    _md.Metadata, _md.TensorStorageMetadata, _md.BytesStorageMetadata, _md.ChunkStorageMetadata,
    _md.TensorProperties, _md.MetadataIndex, _md.StorageMeta, _fs._StorageInfo,
    torch.Size, pathlib.PosixPath, pathlib.PurePosixPath,
)


#: Opcodes a by-name object's pickle may use: none reads the memo, so the object's opcodes,
#: without their MEMOIZEs, mean the same anywhere in a stream.
_NAMED_OPS = frozenset({
    "SHORT_BINUNICODE", "BINUNICODE", "STACK_GLOBAL", "MARK", "EMPTY_TUPLE", "TUPLE", "TUPLE1",
    "TUPLE2", "TUPLE3", "REDUCE", "BININT", "BININT1", "BININT2", "NONE", "NEWTRUE", "NEWFALSE",
})


def _named_opcodes(obj: Any) -> bytes | None:
    """The opcodes pickle writes for ``obj`` alone (a global, or a call of one with constant
    arguments), without PROTO/FRAME/MEMOIZE/STOP; None where it writes anything else."""
    try:
        raw = pickle.dumps(obj, protocol=4)
        if pickle.loads(raw) is not obj:
            return None
    except Exception:
        return None
    ops = list(pickletools.genops(raw))
    kept = []
    for (op, _, pos), (_, _, end) in zip(ops, ops[1:] + [(None, None, len(raw))]):
        if op.name in ("PROTO", "FRAME", "MEMOIZE", "STOP"):
            continue
        if op.name not in _NAMED_OPS:
            return None
        kept.append(raw[pos:end])
    fragment = b"".join(kept)
    if not fragment or pickle.loads(b"\x80\x04" + fragment + b".") is not obj:
        return None
    return fragment


def _mode(cls: type) -> int | None:
    """How pickle writes instances of ``cls``, as one of the modes, or None (not in the table)."""
    if cls in copyreg.dispatch_table or type(cls) is not type or _named_opcodes(cls) is None:
        return None
    if cls is torch.Size:
        sample = torch.Size([2, 3])
        return TUPLE_REDUCE if sample.__reduce_ex__(4) == (torch.Size, ((2, 3),)) else None
    if issubclass(cls, pathlib.PurePath):
        reduced = cls("/a/b").__reduce_ex__(4)
        ok = (isinstance(reduced, tuple) and len(reduced) == 2 and reduced[0] is cls
              and type(reduced[1]) is tuple and all(type(p) is str for p in reduced[1]))
        return REDUCE_CALL if ok else None
    plain = (cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
             and not hasattr(cls, "__getnewargs_ex__") and not hasattr(cls, "__getnewargs__")
             and not copyreg._slotnames(cls) and hasattr(cls, "__dict__"))
    if not plain:
        return None
    if getattr(cls, "__getstate__", None) is getattr(object, "__getstate__", None):
        return STATE_DICT
    if cls is _md.TensorProperties:
        # Its state is its fields re-encoded (the memory format as an enum): one call per
        # distinct set of field values is enough.
        return STATE_BY_FIELDS
    if cls is _fs._StorageInfo and _drops_none(cls):
        return STATE_NOT_NONE
    return STATE_CALL


def _drops_none(cls: type) -> bool:
    """Whether ``cls.__getstate__`` is its fields without the None ones (stock's _StorageInfo)."""
    samples = [cls("a", 1, 2, None), cls("a", 1, 2, ["x"]), cls(None, 0, 0, None)]
    return all(type(s.__getstate__()) is dict and s.__getstate__() == {k: v for k, v in vars(s).items()
                                                                       if v is not None}
               for s in samples)


@functools.cache
def tables() -> tuple[dict[Any, tuple[bytes, Any]], dict[type, int]]:
    """(globals, classes): the objects pickle writes by name with their opcodes, and the
    classes written by mode (csrc/metadata_pickle.hpp)."""
    classes = {cls: mode for cls in _CLASSES if (mode := _mode(cls)) is not None}
    named = list(classes) + [v for v in vars(torch).values()
                             if isinstance(v, (torch.dtype, torch.layout, torch.memory_format))]
    for v in list(vars(_md).values()):  # the metadata's enums (TensorProperties' memory format)
        if isinstance(v, type) and issubclass(v, enum.Enum):
            named += list(v)
    globals_ = {}
    for obj in named:
        fragment = _named_opcodes(obj)
        if fragment is not None:
            globals_[obj] = (fragment, obj)
    return globals_, classes


def dumps(metadata: Any, native: bool) -> bytes:
    """The pickle of ``metadata``: by the native pickler when ``native`` and it can, else pickle's."""
    if native:
        try:
            from . import _C
        except ImportError:
            _C = None
        if _C is not None and hasattr(_C, "pickle_tree"):
            raw = _C.pickle_tree(metadata, *tables())
            if raw is not None:
                return raw
    return pickle.dumps(metadata)
