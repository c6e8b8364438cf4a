"""Every pickle dcp_native reads, read without running code it brings along.

Three kinds of pickle live in a DCP checkpoint:

* ``.metadata``, which stock DCP loads with ``pickle.load``: a crafted file runs
  whatever it names. ``MetadataUnpickler`` imports only the globals some
  released DCP version (torch 1.13 through 2.13) wrote there, listed in
  ``_ADMITTED`` with the versions that wrote them, and refuses anything else
  before importing it.
* the saved objects (BYTE_IO items, ``torch.save`` archives), which stock DCP
  loads with ``torch.load(weights_only=False)``. ``check_object`` lets one
  through only if ``torch.load(weights_only=True)`` loads it.
* each tensor item's ``data.pkl``: ``parse_tensor_pickle`` reads its dtype,
  size, stride and storage through an unpickler that knows only torch's
  tensor rebuild functions, storage types and dtypes, and builds no tensor.

``describe_pickle`` names the object a pickle holds from its opcodes alone
(the command line's ``inspect`` and ``verify``): nothing is imported or called.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import io
import os
import pickle
import pickletools
import re
import zipfile
from typing import Any, BinaryIO, NamedTuple

import torch
from torch import _weights_only_unpickler as _wo
from torch._utils import IMPORT_MAPPING, NAME_MAPPING
from torch.distributed.checkpoint import metadata as _md

from ._errors import CorruptCheckpointError, RefusedObjectError
from ._gc import gc_paused

# ----------------------------------------------------------------------------- .metadata

_MD = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"
_SHARDED = "torch.distributed._shard.sharded_tensor.metadata"

#: The metadata classes every DCP version has had, under their module since 2.0.
_CORE = ("ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata", "Metadata", "MetadataIndex")

#: The globals DCP metadata may name, as the pickle names them, and what each is
#: loaded as. Evidence for the versions: each release's torch/distributed sources.
_ADMITTED: dict[tuple[str, str], tuple[str, str]] = {
    # 2.0+: the package as it is today. TensorProperties and its memory format
    # enum moved here in 2.3, StorageMeta arrived in 2.4.
    **{(_MD, name): (_MD, name) for name in (*_CORE, "TensorProperties", "_MEM_FORMAT_ENCODING", "StorageMeta")},
    (_FS, "_StorageInfo"): (_FS, "_StorageInfo"),
    # 1.13 wrote the same classes from torch.distributed._shard.checkpoint. Stock
    # still resolves that name (the old package aliases itself to the new one),
    # but by running metadata.py and filesystem.py a second time under the old
    # name, which gives look-alike classes; today's classes are the same code.
    **{("torch.distributed._shard.checkpoint.metadata", name): (_MD, name) for name in _CORE},
    ("torch.distributed._shard.checkpoint.filesystem", "_StorageInfo"): (_FS, "_StorageInfo"),
    # 2.1 and 2.2's FsspecWriter had its own copy of _StorageInfo (same fields).
    # Stock 2.13 cannot load it (the class is gone, and the module needs fsspec).
    ("torch.distributed.checkpoint._fsspec_filesystem", "_StorageInfo"): (_FS, "_StorageInfo"),
    # 1.13 to 2.2 took TensorProperties from ShardedTensor's metadata, which still
    # has it (stock loads this class, and so do we).
    (_SHARDED, "TensorProperties"): (_SHARDED, "TensorProperties"),
    (_SHARDED, "MEM_FORMAT_ENCODING"): (_SHARDED, "MEM_FORMAT_ENCODING"),
    # Tensor sizes and offsets, and layouts (torch.serialization registers this
    # reducer for torch.layout; dtypes are handled in find_class).
    ("torch", "Size"): ("torch", "Size"),
    ("torch.serialization", "_get_layout"): ("torch.serialization", "_get_layout"),
    # 2.4+: StorageMeta.checkpoint_id, which FileSystemWriter makes a pathlib.Path.
    # Python 3.13 pickles paths from pathlib._local (3.14 from pathlib again): the
    # same classes, which pathlib re-exports. A path from the other platform loads
    # as its pure variant (stock cannot instantiate it at all).
    **{(module, cls): ("pathlib", cls if (cls == "WindowsPath") == (os.name == "nt") else "Pure" + cls)
       for module in ("pathlib", "pathlib._local") for cls in ("PosixPath", "WindowsPath")},
}


@functools.lru_cache(maxsize=None)
def _resolve(module: str, name: str) -> Any:
    # Only ever called with a target from _ADMITTED: these modules are torch's own
    # (already imported with torch.distributed.checkpoint) and the standard library.
    return getattr(importlib.import_module(module), name)


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names something DCP metadata never holds."""


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler for DCP metadata only (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ADMITTED:
            return _resolve(*_ADMITTED[module, name])
        if (module, name) in _dtype_globals():
            return _dtype_globals()[module, name]
        raise RefusedGlobal(f"it refers to {module}.{name}, which DCP metadata never holds; refusing to import it")


def load_metadata(f: BinaryIO, path: str) -> _md.Metadata:
    """Unpickle DCP metadata from ``f`` (read from ``path``); CorruptCheckpointError when it is
    not DCP metadata or names a global outside DCP's metadata classes (nothing it names is imported)."""
    try:
        with gc_paused():  # millions of objects at scale, no cycles among them
            metadata = MetadataUnpickler(f).load()
    except RefusedGlobal as exc:
        raise CorruptCheckpointError(f"{path} is refused: {exc}", filename=path) from None
    except OSError:
        raise
    except Exception as exc:  # a malformed pickle raises many types
        raise CorruptCheckpointError(f"{path} cannot be read as DCP metadata: {type(exc).__name__}: {exc}",
                                     filename=path) from None
    if not isinstance(metadata, _md.Metadata):
        raise CorruptCheckpointError(f"{path} does not hold DCP metadata (found {type(metadata).__name__})",
                                     filename=path)
    return metadata


# ----------------------------------------------------------------------------- saved objects

#: torch's weights-only unpickler names the global it refuses in one of these
#: (stable from torch 2.6 to 2.14); it writes builtins without their module.
_REFUSED_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global by default"),
    re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked"),
)
#: Lines of torch's error that say why, as opposed to its advice around them.
_REASON_PREFIXES = ("Unsupported global", "Trying to", "Unsupported operand", "Can only", "unsupported persistent id")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def check_object(data: bytes | memoryview, *, key: str, filename: str, offset: int) -> Any:
    """The saved object ``data`` (``torch.save`` output of one non-tensor item, at ``offset`` of
    ``filename``) as ``torch.load(weights_only=True)`` loads it on the CPU; refused otherwise.

    The check is that one load, so it allows exactly what torch does, including
    globals the user allowed with ``torch.serialization.add_safe_globals`` or the
    ``safe_globals`` context manager. torch's weights-only unpickler imports
    nothing: it looks globals up in its allowlists and calls only what it found there.

    Raises:
        RefusedObjectError: torch's weights-only load refuses it (``refused``
            names the global when there is one).
        CorruptCheckpointError: the bytes are not a torch.save archive or pickle at all.
    """
    where = (key, filename, offset)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        message = _ANSI.sub("", str(exc))
        reason = _torch_reason(message)
        refused = _refused_in_message(message)
        if refused is None:
            decodes, refused = _scan(bytes(data))
            if not decodes:
                raise _undecodable(*where, reason) from None
        raise _refusal(*where, refused, reason) from None
    except RuntimeError as exc:
        # TorchScript archives (and legacy .tar files, from real files only) are
        # refused outright under weights_only=True.
        message = _ANSI.sub("", str(exc))
        if "Cannot use ``weights_only=True``" in message:
            reason = message.split(". ", 1)[0].strip()  # the rest is torch's advice
            raise _refusal(*where, None, reason) from None
        raise _undecodable(*where, _exc_text(exc, message)) from None
    except Warning:
        raise  # torch's warnings, turned into errors by the caller's filters
    except Exception as exc:  # a malformed archive or pickle raises many types
        raise _undecodable(*where, _exc_text(exc, str(exc))) from None


def _refusal(key: str, filename: str, offset: int, refused: str | None, reason: str) -> RefusedObjectError:
    trust_checkpoint = "if you trust this checkpoint, read it with dcp_native.FileSystemReader(path, allow_pickle=True)"
    if refused is None:
        what = f"needs more than torch.load(weights_only=True) allows ({reason})"
        advice = trust_checkpoint
    else:
        what = f"refers to {refused}, which torch.load(weights_only=True) does not allow"
        if "must be imported" in reason:  # DTensors, nested tensors: torch says what to import
            what += f" ({reason})"
        module = refused.rpartition(".")[0]
        if module in _wo._blocklisted_modules:
            advice = f"no allowlist admits it (torch blocks the module {module}); {trust_checkpoint}"
        else:
            advice = (
                f"if you trust {refused}, allow it with "
                f"torch.serialization.add_safe_globals([{refused}]) (or the "
                f"torch.serialization.safe_globals context manager); {trust_checkpoint}"
            )
    return RefusedObjectError(
        f"{filename} at offset {offset}: the saved object {key!r} {what}; loading it could run code the "
        f"checkpoint brings along, so it was not loaded. {advice[0].upper()}{advice[1:]}",
        refused=refused, key=key, filename=filename, offset=offset,
    )


def _undecodable(key: str, filename: str, offset: int, reason: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{filename} at offset {offset}: the saved object {key!r} cannot be decoded as a torch.save "
        f"archive or pickle ({reason})", key=key, filename=filename, offset=offset,
    )


def _exc_text(exc: BaseException, message: str) -> str:
    line = message.strip().split("\n", 1)[0][:300]
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _torch_reason(message: str) -> str:
    """The line of torch's weights-only error that says what it refused."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        line = line.split("WeightsUnpickler error:", 1)[-1].strip()
        if line.startswith(_REASON_PREFIXES) or "must be imported" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no reason given"


def _refused_in_message(message: str) -> str | None:
    for name in (m.group(1) for m in (p.search(message) for p in _REFUSED_PATTERNS) if m):
        return name if "." in name else f"builtins.{name}"  # torch drops "builtins." from the names
    return None


def _scan(data: bytes) -> tuple[bool, str | None]:
    """Whether the pickles torch reads decode, and the first global torch does not allow.

    Used only to word the error when torch's message names no global: the
    decision to refuse is torch's. Parses opcodes, executes nothing.
    """
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                name = next(n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1)
                stream, pickles = io.BytesIO(zf.read(name)), 1
        except Exception:  # not a zip archive, or no data.pkl (StopIteration)
            return False, None
    else:
        # The legacy format: magic number, protocol, system info and the object,
        # each a pickle of its own, then storage keys and raw storage bytes.
        stream, pickles = io.BytesIO(data), 4
    for _ in range(pickles):
        found: list[tuple[str, str]] = []
        try:
            describe_pickle(stream, found)
            decodes = True
        except Exception:  # genops raises more than ValueError on some truncations
            decodes = False
        for module, name in found:
            # torch's unpickler renames Python 2 names as pickle does.
            module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
            full = f"{module}.{name}"
            if full not in _wo._get_allowed_globals() and full not in _wo._get_user_allowed_globals():
                return True, full
        if not decodes:
            return False, None
    return True, None


# ----------------------------------------------------------------------------- data.pkl of a tensor


@dataclasses.dataclass(frozen=True)
class SavedTensor:
    """Where and how a saved tensor's elements lie in its item."""

    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    #: In elements, from the first byte of the payload.
    storage_offset: int = 0
    #: Bytes of the stored storage (the payload length).
    storage_nbytes: int | None = None


class UnsupportedLayout(Exception):
    """data.pkl holds something a strided copy cannot express; use torch.load."""


class _Recorded(NamedTuple):
    storage: object
    storage_offset: int
    size: tuple
    stride: tuple
    dtype: torch.dtype | None
    metadata: object


def _record_v2(storage, storage_offset, size, stride, requires_grad, hooks, metadata=None):
    return _Recorded(storage, storage_offset, tuple(size), tuple(stride), None, metadata)


def _record_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _Recorded(storage, storage_offset, tuple(size), tuple(stride), dtype, metadata)


@functools.lru_cache(maxsize=None)
def _storage_globals() -> dict:
    """(module, name) of a storage class -> (its dtype, whether it is typed)."""
    table = {("torch", name): (dtype, 1) for dtype, name in torch.storage._dtype_to_storage_type_map().items()}
    untyped = (torch.uint8, 0)
    return {**table, ("torch.storage", "UntypedStorage"): untyped, ("torch", "UntypedStorage"): untyped}


@functools.lru_cache(maxsize=None)
def _dtype_globals() -> dict:
    # vars(), not getattr(): torch's module __getattr__ imports submodules.
    return {("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


class _LayoutUnpickler(pickle.Unpickler):
    """Reads ``data.pkl`` without building a tensor and without importing arbitrary globals."""

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3"):
            return _record_v2 if name.endswith("2") else _record_v3
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        key = (module, name)
        if key in _storage_globals():
            return ("storage-type", key)
        if key in _dtype_globals():
            return _dtype_globals()[key]
        raise UnsupportedLayout(f"data.pkl refers to {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsupportedLayout(f"unexpected persistent id {pid!r}")
        _, storage_type, key, location, numel = pid
        if not (isinstance(storage_type, tuple) and storage_type[0] == "storage-type"):
            raise UnsupportedLayout(f"unexpected storage type {storage_type!r}")
        dtype, typed = _storage_globals()[storage_type[1]]
        return (dtype, typed, key, numel)


@functools.lru_cache(maxsize=4096)
def parse_tensor_pickle(data: bytes) -> SavedTensor:
    """Dtype, size, stride and storage offset from a stock ``data.pkl``; UnsupportedLayout when
    it holds anything but one plain dense tensor in storage ``0`` (use ``torch.load`` for it)."""
    try:
        obj = _LayoutUnpickler(io.BytesIO(data)).load()
    except UnsupportedLayout:
        raise
    except Exception as exc:  # malformed pickle: leave the verdict to torch.load
        raise UnsupportedLayout(f"data.pkl cannot be parsed: {exc}") from exc
    if not isinstance(obj, _Recorded) or not isinstance(obj.storage, tuple):
        raise UnsupportedLayout("data.pkl does not hold a single tensor")
    if obj.metadata:
        raise UnsupportedLayout(f"tensor metadata {obj.metadata!r} (conj/neg bits)")
    storage_dtype, typed, key, numel = obj.storage
    if key != "0":
        raise UnsupportedLayout(f"storage key {key!r}")
    dtype = obj.dtype if obj.dtype is not None else storage_dtype
    if not isinstance(dtype, torch.dtype):
        raise UnsupportedLayout(f"dtype {dtype!r}")
    nbytes = numel * (storage_dtype.itemsize if typed else 1)
    if len(obj.size) != len(obj.stride) or any(
        not isinstance(v, int) or v < 0 for v in (*obj.size, *obj.stride, obj.storage_offset)
    ):
        raise UnsupportedLayout(f"size {obj.size} / stride {obj.stride}")
    return SavedTensor(dtype, obj.size, obj.stride, obj.storage_offset, nbytes)


# ----------------------------------------------------------------------------- any pickle, described

# Callables whose result is better named by what they build.
_BUILDS = {
    "torch._utils._rebuild_tensor_v2": "torch.Tensor",
    "torch._utils._rebuild_tensor_v3": "torch.Tensor",
    "torch._utils._rebuild_tensor": "torch.Tensor",
    "torch._tensor._rebuild_from_type_v2": "torch.Tensor",
    "torch._utils._rebuild_parameter": "torch.nn.Parameter",
    "torch._utils._rebuild_parameter_with_state": "torch.nn.Parameter",
    "_codecs.encode": "bytes",
    "_io.BytesIO": "io.BytesIO",
}
#: Opcodes that push a constant description.
_PUSH = {
    "EMPTY_DICT": ("dict", None), "EMPTY_LIST": ("list", None), "EMPTY_TUPLE": ("tuple", None),
    "EMPTY_SET": ("set", None), "NONE": ("NoneType", None), "NEWTRUE": ("bool", True),
    "NEWFALSE": ("bool", False), "PERSID": ("persistent", None), "EXT1": ("extension", None),
    "EXT2": ("extension", None), "EXT4": ("extension", None), "NEXT_BUFFER": ("PickleBuffer", None),
}
_FROM_MARK = {"TUPLE": "tuple", "LIST": "list", "DICT": "dict", "FROZENSET": "frozenset"}
_SCALARS = (bool, int, float, str)


def describe_pickle(source: bytes | BinaryIO, found: list[tuple[str, str]] | None = None) -> tuple[str, Any]:
    """(type name, value if a short scalar else None) of the object a pickle holds (from a
    stream: the next one), appending ``(module, name)`` of every global it names to ``found``.

    Follows the pickle's opcodes (``pickletools.genops``) on a stack of
    descriptions: nothing is imported or called. Raises ValueError when the
    bytes are not a pickle.
    """
    found = [] if found is None else found
    stack: list[tuple[str, Any]] = []
    marks: list[int] = []
    memo: dict[int, tuple[str, Any]] = {}

    def pop_mark() -> list[tuple[str, Any]]:
        at = marks.pop()
        popped = stack[at:]
        del stack[at:]
        return popped

    def built(callable_: tuple[str, Any], args: tuple[str, Any] | None = None) -> tuple[str, Any]:
        kind, name = callable_
        if kind != "global":
            return ("object", None)
        if name == "copyreg._reconstructor" and args and args[0] == "tuple" and args[1]:
            return built(args[1][0])
        name = _BUILDS.get(name, name)
        return (name.removeprefix("builtins."), None)

    try:
        for op, arg, _ in pickletools.genops(source):
            name = op.name
            if name in ("PROTO", "FRAME", "READONLY_BUFFER"):
                continue
            if name == "STOP":
                if len(stack) != 1:
                    raise ValueError("STOP with an unbalanced stack")
                kind, value = stack[0]
                if kind == "global":
                    return "type", None
                short = isinstance(value, _SCALARS) and len(repr(value)) <= 60
                return kind, value if short else None
            if name == "MARK":
                marks.append(len(stack))
            elif name in _PUSH:
                stack.append(_PUSH[name])
            elif name in ("BUILD", "APPEND", "POP"):
                stack.pop()
            elif name == "SETITEM":
                del stack[-2:]
            elif name in ("GLOBAL", "INST"):
                found.append(tuple(arg.split(" ", 1)))
                described = ("global", arg.replace(" ", "."))
                if name == "INST":
                    pop_mark()
                    described = built(described)
                stack.append(described)
            elif name == "STACK_GLOBAL":
                attr, module = stack.pop(), stack.pop()
                found.append((str(module[1]), str(attr[1])))
                stack.append(("global", f"{module[1]}.{attr[1]}"))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name == "REDUCE":
                args = stack.pop()
                stack.append(built(stack.pop(), args))
            elif name in ("NEWOBJ", "NEWOBJ_EX"):
                del stack[-(1 if name == "NEWOBJ" else 2):]
                stack.append(built(stack.pop()))
            elif name == "OBJ":
                stack.append(built(pop_mark()[0]))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                stack[-n:] = [("tuple", stack[-n:])]
            elif name in _FROM_MARK:
                items = pop_mark()
                stack.append((_FROM_MARK[name], items if name == "TUPLE" else None))
            elif name in ("APPENDS", "SETITEMS", "ADDITEMS", "POP_MARK"):
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name == "BINPERSID":
                stack[-1] = ("persistent", None)
            elif not op.stack_before and len(op.stack_after) == 1:
                label = "bytearray" if name == "BYTEARRAY8" else type(arg).__name__
                stack.append((label, arg))
            else:
                raise ValueError(f"opcode {name}")
    except (IndexError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed pickle ({type(exc).__name__})") from None
    raise ValueError("no STOP opcode")
