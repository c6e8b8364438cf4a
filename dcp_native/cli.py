"""The ``dcp-native`` command line: inspect, verify and convert DCP checkpoints.

Works on checkpoints written by dcp_native and by stock DCP, on any machine,
without a process group. ``inspect`` and ``verify`` never run code from the
checkpoint: ``.metadata`` is read by an unpickler that admits only DCP's
metadata classes, and objects saved as bytes are described from their pickle
opcodes (``pickletools``), never unpickled. They read only item headers and
trailers (a few KiB per item), in batches through the engine.

``verify`` runs in passes, each adding problems to one list so that every
problem is reported, not only the first: metadata, data files and sizes, item
framing (zip end records, central directory, local headers, ``data.pkl``
against the metadata, the sidecar against the archive), the CRC32C of every
4 KiB block of each data file that has a checksum table (read in bounded
rounds, checked by the engine), and with ``--read-all`` every byte of every
item, also of files without checksums.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import dataclasses
import io
import json
import os
import pickle
import pickletools
import stat
import sys
import time
import traceback
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any, Iterable, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)

from . import _fileio, integrity, layout
from ._backend import get_engine
from ._errors import BackendUnavailableError, CheckpointError, IntegrityError
from ._safe_pickle import MetadataUnpickler
from .engine import ReadFile
from .plan import Box, encode_boxes
from .reader import FileSystemReader, default_thread_count
from .sidecar import Sidecar, TableInfo
from .sidecar import read as read_sidecar_file
from .writer import FileSystemWriter

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_BUG = 4

PROG = "dcp-native"
_METADATA = ".metadata"
#: Bytes of temporary buffers verify and inspect hold at once.
_READ_BUDGET = 64 << 20
#: Items per batch of header reads (also the progress bar's step).
_ITEMS_PER_ROUND = 1024
#: Progress bar (auto) for checkpoints with at least this many items or bytes to read.
_PROGRESS_MIN_ITEMS = 1000
_PROGRESS_MIN_BYTES = 1 << 30

EXIT_CODES_HELP = """\
exit codes:
  0  success; for verify: the checkpoint is intact
  1  verify found problems (each printed with its key, file and offset)
  2  usage error or bad input: a path that is not a checkpoint or not a
     torch.save file, an unknown key, an output that exists (without --force),
     DCP_NATIVE_BACKEND naming an engine that cannot be loaded
  3  the command could not finish: an I/O error, or a checkpoint too damaged
     to read (run `dcp-native verify` on it)
  4  internal error (a bug in dcp-native; the traceback is printed)
"""


class UsageError(Exception):
    """Bad input from the user: exit 2 with a one-line message."""


class CommandFailed(Exception):
    """The command could not finish: exit 3 with a one-line message."""


# --------------------------------------------------------------------------- small helpers


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _os_error_text(exc: OSError) -> str:
    if exc.filename and exc.strerror and not isinstance(exc, CheckpointError):
        return f"{exc.filename}: {exc.strerror}"
    return _one_line(exc)


def _weights_only_reason(exc: BaseException) -> str:
    """The line of torch.load's weights_only refusal that names the refused global."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        for line in text.split(marker, 1)[1].splitlines():
            if line.strip():
                return line.strip().split(". ", 1)[0]
    return _one_line(exc)


def _torch_load_objects(source: Any, weights_only: bool, **kwargs: Any) -> Any:
    """torch.load, with io.BytesIO allowed under weights_only (DCP saves BytesIO values as such)."""
    if not weights_only:
        return torch.load(source, weights_only=False, **kwargs)
    with torch.serialization.safe_globals([io.BytesIO]):
        return torch.load(source, weights_only=True, **kwargs)


def _engine():
    """The engine DCP_NATIVE_BACKEND selects; a bad choice is the user's to fix (exit 2)."""
    try:
        return get_engine()
    except (BackendUnavailableError, ValueError) as exc:
        raise UsageError(_one_line(exc)) from None


def _threads() -> int:
    return default_thread_count()


def _json(doc: Any) -> str:
    """Indented JSON with lists of scalars (shapes, file names) kept on one line."""
    nonce = os.urandom(6).hex()
    inline: dict[str, str] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            if any(isinstance(v, (dict, list)) for v in x):
                return [walk(v) for v in x]
            token = f"{nonce}:{len(inline)}"
            inline[json.dumps(token)] = json.dumps(x)
            return token
        return x

    text = json.dumps(walk(doc), indent=2)
    for token, value in inline.items():
        text = text.replace(token, value, 1)
    return text


def _keys_match(key: str, pattern: str) -> bool:
    prefix = pattern if pattern.endswith(".") else pattern + "."
    return key == pattern or key.startswith(prefix)


def _select_keys(keys: Sequence[str], patterns: Sequence[str] | None, where: str) -> list[str]:
    """Keys named by ``patterns`` (exact keys or dotted prefixes), in checkpoint order."""
    if not patterns:
        return list(keys)
    chosen = set()
    for pattern in patterns:
        hits = [k for k in keys if _keys_match(k, pattern)]
        if not hits:
            raise UsageError(
                f"no key in {where} is {pattern!r} or starts with {pattern.rstrip('.') + '.'!r} "
                f"(list them with `{PROG} inspect {where}`)"
            )
        chosen.update(hits)
    return [k for k in keys if k in chosen]


# --------------------------------------------------------------------------- .metadata


class _BadMetadata(Exception):
    """``.metadata`` exists but does not load (the message says why, without the path)."""


def _load_metadata(path: str) -> tuple[Any, bytes]:
    """The metadata at ``path`` and its raw bytes (the sidecar is bound to them)."""
    try:
        raw = _fileio.read_regular(path, None, what="metadata")
    except FileNotFoundError:
        raise
    except CheckpointError as exc:  # not a regular file
        raise _BadMetadata(str(exc).split(": ", 1)[-1]) from None
    except OSError as exc:
        raise CommandFailed(_os_error_text(exc)) from None
    try:
        metadata = MetadataUnpickler(io.BytesIO(raw)).load()
    except Exception as exc:  # any malformed pickle: pickle raises many types
        raise _BadMetadata(f"cannot be read as DCP metadata: {_one_line(exc)}") from None
    if not isinstance(metadata, Metadata):
        raise _BadMetadata(f"does not hold DCP metadata (found {type(metadata).__name__})")
    return metadata, raw


# --------------------------------------------------------------------------- the checkpoint


@dataclasses.dataclass
class _Item:
    """One saved item (a tensor chunk or an object) and where it lies."""

    key: str
    kind: str  # "tensor" | "object"
    file: str  # relative path
    offset: int
    length: int
    transformed: bool
    dtype: Any = None
    chunk_offsets: tuple[int, ...] = ()
    #: None: no chunk of the tensor's metadata starts at chunk_offsets.
    chunk_sizes: tuple[int, ...] | None = None


def _written_by(sc: Sidecar) -> str:
    if sc.usable:
        return "dcp_native"
    return "stock DCP" if sc.status == "absent" else "dcp_native (sidecar not usable)"


def _describe_sidecar(sc: Sidecar) -> str:
    if sc.usable:
        return f"written by dcp_native (sidecar {sc.name}, format {sc.version})"
    if sc.status == "absent":
        return "written by stock DCP (no dcp_native sidecar)"
    return f"sidecar ignored: {sc.reason}"


@dataclasses.dataclass
class _Checkpoint:
    path: str
    metadata: Any
    items: list[_Item]
    sidecar: Sidecar

    def file_path(self, rel: str) -> str:
        return os.path.join(self.path, rel)

    @property
    def files(self) -> list[str]:
        return sorted({item.file for item in self.items})


def _checkpoint_dir(path: str) -> str:
    """The checkpoint directory PATH names (PATH itself, or the folder of PATH/.metadata)."""
    if os.path.basename(os.path.normpath(path)) == _METADATA and os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        raise UsageError(f"{path} is a file, not a DCP checkpoint directory")
    return path


def _looks_like_unfinished_save(directory: str) -> list[str]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(n for n in names if n.endswith(".distcp") or n.startswith(_METADATA))


def _open_checkpoint(path: str) -> _Checkpoint:
    """Metadata and sidecar of the checkpoint at ``path``; UsageError when it is none."""
    directory = _checkpoint_dir(path)
    md_path = os.path.join(directory, _METADATA)
    try:
        metadata, raw = _load_metadata(md_path)
    except FileNotFoundError:
        found = _looks_like_unfinished_save(directory)
        hint = (
            f" (it holds {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}: "
            "an unfinished save, or .metadata was lost)"
            if found
            else ""
        )
        raise UsageError(
            f"{directory} is not a DCP checkpoint: it has no {_METADATA}{hint}"
        ) from None
    return _Checkpoint(
        directory, metadata, _items(metadata), read_sidecar_file(directory, _METADATA, metadata, raw)
    )


def _items(metadata: Any) -> list[_Item]:
    items = []
    sd_md = metadata.state_dict_metadata
    for index, info in (metadata.storage_data or {}).items():
        md = sd_md.get(index.fqn)
        tensor = isinstance(md, TensorStorageMetadata) or index.offset is not None
        item = _Item(
            key=index.fqn,
            kind="tensor" if tensor else "object",
            file=str(info.relative_path),
            offset=int(info.offset),
            length=int(info.length),
            transformed=bool(getattr(info, "transform_descriptors", None)),
        )
        if isinstance(md, TensorStorageMetadata) and index.offset is not None:
            item.dtype = md.properties.dtype
            item.chunk_offsets = tuple(index.offset)
            for chunk in md.chunks:
                if tuple(chunk.offsets) == item.chunk_offsets:
                    item.chunk_sizes = tuple(chunk.sizes)
                    break
        items.append(item)
    return items


# --------------------------------------------------------------------------- reading item bytes


class _ItemView:
    """What was read of one item (its head and tail); other ranges read on demand."""

    def __init__(self, path: str, item: _Item, head: bytes, tail: bytes) -> None:
        self.path = path
        self.item = item
        self.head = head
        self.tail = tail

    @property
    def length(self) -> int:
        return self.item.length

    def get(self, start: int, n: int) -> bytes:
        """Bytes ``[start, start + n)`` of the item (item-relative offsets)."""
        if start < 0 or n < 0 or start + n > self.length:
            raise layout.ArchiveError(
                f"bytes {start}..{start + n} of the item lie outside it ({self.length} bytes)"
            )
        if start + n <= len(self.head):
            return self.head[start : start + n]
        tail_start = self.length - len(self.tail)
        if start >= tail_start:
            return self.tail[start - tail_start : start - tail_start + n]
        # Rare (a data.pkl larger than a probe): one extra small read.
        fd = _fileio.open_regular(self.path, what="data file")
        try:
            data = os.pread(fd, n, self.item.offset + start)
        finally:
            os.close(fd)
        if len(data) != n:
            raise layout.ArchiveError(
                f"the file ends inside the item (at item offset {start + len(data)})"
            )
        return data


def _bytearray_address(buf: bytearray) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf)) if len(buf) else 0


def _read_ranges(ck: _Checkpoint, ranges: list[tuple[str, int, int]]) -> list[bytearray]:
    """Read ``(relative path, offset, nbytes)`` ranges through the engine, in one call."""
    bufs = [bytearray(n) for _, _, n in ranges]
    boxes: dict[str, list] = {}
    for (rel, offset, n), buf in zip(ranges, bufs):
        if n:
            boxes.setdefault(rel, []).append(Box(offset, _bytearray_address(buf), n))
    files = [ReadFile(ck.file_path(rel), 0, encode_boxes(bx)) for rel, bx in boxes.items()]
    if files:
        _engine().read(files, threads=_threads())
    return bufs


def _read_views(
    ck: _Checkpoint, items: list[_Item]
) -> Iterable[tuple[_Item, _ItemView | OSError]]:
    """Head and tail of each item, read in rounds; items must lie inside existing files."""
    probe = layout.PROBE_BYTES
    for start in range(0, len(items), _ITEMS_PER_ROUND):
        batch = items[start : start + _ITEMS_PER_ROUND]
        ranges = []
        for item in batch:
            if item.length <= 2 * probe:
                ranges.append((item.file, item.offset, item.length))
            else:
                ranges.append((item.file, item.offset, probe))
                tail_start = item.offset + item.length - probe
                ranges.append((item.file, tail_start, probe))
        try:
            bufs = _read_ranges(ck, ranges)
        except OSError:
            # Attribute the failure: read each item on its own.
            for item in batch:
                try:
                    yield item, _read_view_one(ck, item)
                except OSError as exc:
                    yield item, exc
            continue
        pos = 0
        for item in batch:
            head = bytes(bufs[pos])
            if item.length <= 2 * probe:
                tail = head
                pos += 1
            else:
                tail = bytes(bufs[pos + 1])
                pos += 2
            yield item, _ItemView(ck.file_path(item.file), item, head, tail)


def _read_view_one(ck: _Checkpoint, item: _Item) -> _ItemView:
    probe = layout.PROBE_BYTES
    path = ck.file_path(item.file)
    fd = _fileio.open_regular(path, what="data file")
    try:
        if item.length <= 2 * probe:
            head = tail = os.pread(fd, item.length, item.offset)
        else:
            head = os.pread(fd, probe, item.offset)
            tail = os.pread(fd, probe, item.offset + item.length - probe)
    finally:
        os.close(fd)
    return _ItemView(path, item, head, tail)


# --------------------------------------------------------------------------- archives


@dataclasses.dataclass
class _Archive:
    #: record name -> (data start in the item, size)
    records: dict[str, tuple[int, int]]


def _parse_archive(view: _ItemView) -> _Archive:
    """The records of a torch.save archive; raises layout.ArchiveError saying what is wrong."""
    try:
        index = layout.parse_archive_tail(view.tail, view.length)
    except layout.ArchiveError:
        # A central directory larger than the probe: retry once with more of the item.
        bigger = min(view.length, 1 << 20)
        if bigger <= len(view.tail):
            raise
        view.tail = view.get(view.length - bigger, bigger)
        index = layout.parse_archive_tail(view.tail, view.length)
    records = {}
    for name, (header_offset, size) in index.records.items():
        if header_offset + 30 > view.length:
            raise layout.ArchiveError(
                f"record {name}: its local header (item offset {header_offset}) lies past the "
                f"item's end ({view.length} bytes)"
            )
        data = layout.local_data_offset(view.get(header_offset, 30), header_offset)
        if data + size > view.length:
            raise layout.ArchiveError(
                f"record {name} ({size} bytes at item offset {data}) runs past the item's end "
                f"({view.length} bytes)"
            )
        records[name] = (data, size)
    return _Archive(records)


def _pickle_of(view: _ItemView, archive: _Archive) -> bytes:
    if "data.pkl" not in archive.records:
        raise layout.ArchiveError("the archive has no data.pkl record")
    start, size = archive.records["data.pkl"]
    return view.get(start, size)


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
_EMPTY = {
    "EMPTY_DICT": "dict",
    "EMPTY_LIST": "list",
    "EMPTY_TUPLE": "tuple",
    "EMPTY_SET": "set",
    "NONE": "NoneType",
    "NEWTRUE": "bool",
    "NEWFALSE": "bool",
}
_FROM_MARK = {"TUPLE": "tuple", "LIST": "list", "DICT": "dict", "FROZENSET": "frozenset"}
_SCALARS = (bool, int, float, str)


def describe_pickle(data: bytes) -> tuple[str, Any]:
    """(type name, value if a short scalar else None) of the object a pickle holds.

    Follows the pickle's opcodes (``pickletools.genops``) on a stack of
    descriptions: nothing is imported or called. Raises ValueError when the
    bytes are not a pickle.
    """
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
        for op, arg, _ in pickletools.genops(data):
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
            elif name in _EMPTY:
                stack.append((_EMPTY[name], {"NEWTRUE": True, "NEWFALSE": False}.get(name)))
            elif name == "GLOBAL":
                stack.append(("global", arg.replace(" ", ".")))
            elif name == "INST":
                pop_mark()
                stack.append(built(("global", arg.replace(" ", "."))))
            elif name == "STACK_GLOBAL":
                attr, module = stack.pop(), stack.pop()
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
            elif name == "NEWOBJ":
                stack.pop()
                stack.append(built(stack.pop()))
            elif name == "NEWOBJ_EX":
                del stack[-2:]
                stack.append(built(stack.pop()))
            elif name == "OBJ":
                popped = pop_mark()
                stack.append(built(popped[0]))
            elif name == "BUILD":
                stack.pop()
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = stack[-n:]
                del stack[-n:]
                stack.append(("tuple", items))
            elif name in _FROM_MARK:
                items = pop_mark()
                stack.append((_FROM_MARK[name], items if name == "TUPLE" else None))
            elif name in ("APPENDS", "SETITEMS", "ADDITEMS", "POP_MARK"):
                pop_mark()
            elif name == "APPEND":
                stack.pop()
            elif name == "SETITEM":
                del stack[-2:]
            elif name == "POP":
                stack.pop()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name == "PERSID":
                stack.append(("persistent", None))
            elif name == "BINPERSID":
                stack[-1] = ("persistent", None)
            elif name in ("EXT1", "EXT2", "EXT4"):
                stack.append(("extension", None))
            elif name == "NEXT_BUFFER":
                stack.append(("PickleBuffer", None))
            elif not op.stack_before and len(op.stack_after) == 1:
                label = "bytearray" if name == "BYTEARRAY8" else type(arg).__name__
                stack.append((label, arg))
            else:
                raise ValueError(f"opcode {name}")
    except (IndexError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed pickle ({type(exc).__name__})") from None
    raise ValueError("no STOP opcode")


# --------------------------------------------------------------------------- inspect


def _object_types(ck: _Checkpoint, items: list[_Item]) -> dict[tuple[str, int], tuple[str, Any]]:
    """(type name, short value) of each object item, from its data.pkl's opcodes."""
    sizes = _file_sizes(ck)
    readable = [
        it for it in items
        if not it.transformed and sizes.get(it.file, -1) >= it.offset + it.length
    ]
    out: dict[tuple[str, int], tuple[str, Any]] = {}
    for item, view in _read_views(ck, readable):
        try:
            if isinstance(view, OSError):
                raise view
            out[(item.file, item.offset)] = describe_pickle(_pickle_of(view, _parse_archive(view)))
        except (layout.ArchiveError, ValueError, OSError):
            out[(item.file, item.offset)] = ("unknown (unreadable; run verify)", None)
    for it in items:
        if (it.file, it.offset) not in out:
            why = "stream-transformed" if it.transformed else "data file missing or short"
            out[(it.file, it.offset)] = (f"unknown ({why})", None)
    return out


def _file_sizes(ck: _Checkpoint) -> dict[str, int]:
    sizes = {}
    for rel in ck.files:
        try:
            sizes[rel] = os.stat(ck.file_path(rel)).st_size
        except OSError:
            pass
    return sizes


def _inspect_doc(ck: _Checkpoint) -> dict[str, Any]:
    by_key: dict[str, list[_Item]] = collections.defaultdict(list)
    for item in ck.items:
        by_key[item.key].append(item)
    objects = [it for it in ck.items if it.kind == "object"]
    types = _object_types(ck, objects)
    tensors_out, objects_out = [], []
    for key, md in ck.metadata.state_dict_metadata.items():
        saved = by_key.get(key, [])
        files = sorted({it.file for it in saved})
        stored = sum(it.length for it in saved)
        if isinstance(md, TensorStorageMetadata):
            numel = 1
            for s in md.size:
                numel *= s
            tensors_out.append({
                "key": key,
                "dtype": _dtype_name(md.properties.dtype),
                "shape": list(md.size),
                "numel": numel,
                "bytes": numel * md.properties.dtype.itemsize,
                "chunks": len(md.chunks),
                "files": files,
                "stored_bytes": stored,
            })
        else:
            type_name, value = (
                types[(saved[0].file, saved[0].offset)] if saved else ("unknown (no item)", None)
            )
            entry = {"key": key, "type": type_name, "bytes": stored, "files": files}
            if value is not None:
                entry["value"] = value
            objects_out.append(entry)
    sizes = _file_sizes(ck)
    files_out = [{"name": rel, "bytes": sizes.get(rel)} for rel in ck.files]
    storage_meta = getattr(ck.metadata, "storage_meta", None)
    return {
        "path": os.path.abspath(ck.path),
        "written_by": _written_by(ck.sidecar),
        "sidecar": ck.sidecar.status,
        "dcp_version": getattr(ck.metadata, "version", None),
        "save_id": getattr(storage_meta, "save_id", None),
        "tensors": tensors_out,
        "objects": objects_out,
        "files": files_out,
        "totals": {
            "tensors": len(tensors_out),
            "tensor_elements": sum(t["numel"] for t in tensors_out),
            "tensor_bytes": sum(t["bytes"] for t in tensors_out),
            "objects": len(objects_out),
            "object_bytes": sum(o["bytes"] for o in objects_out),
            "files": len(files_out),
            "file_bytes": sum(f["bytes"] or 0 for f in files_out),
        },
    }


def _table(rows: list[list[str]], right: Sequence[int] = ()) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def _inspect_text(doc: dict[str, Any], ck: _Checkpoint) -> str:
    t = doc["totals"]
    lines = [f"{doc['path']}: DCP checkpoint, {_describe_sidecar(ck.sidecar)}"]
    if doc["tensors"]:
        rows = [["tensor", "dtype", "shape", "bytes", "chunks", "files"]]
        for e in doc["tensors"]:
            rows.append([
                e["key"], e["dtype"], str(e["shape"]), _human(e["bytes"]),
                str(e["chunks"]), str(len(e["files"])),
            ])
        lines += [""] + _table(rows, right=(3, 4, 5))
    if doc["objects"]:
        rows = [["object", "type", "bytes", "files", "value"]]
        for e in doc["objects"]:
            value = repr(e["value"]) if "value" in e else ""
            rows.append([e["key"], e["type"], _human(e["bytes"]), str(len(e["files"])), value])
        lines += [""] + _table(rows, right=(2, 3))
    files = ", ".join(
        f"{f['name']} ({_human(f['bytes']) if f['bytes'] is not None else 'missing'})"
        for f in doc["files"]
    )
    lines += [
        "",
        f"totals: {_plural(t['tensors'], 'tensor')} ({t['tensor_elements']:,} elements, "
        f"{_human(t['tensor_bytes'])}), {_plural(t['objects'], 'object')} "
        f"({_human(t['object_bytes'])}), {_plural(t['files'], 'data file')} "
        f"({_human(t['file_bytes'])}): {files}",
    ]
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        ck = _open_checkpoint(args.path)
    except _BadMetadata as exc:
        raise CommandFailed(
            f"{os.path.join(args.path, _METADATA)} {exc} (run `{PROG} verify` on it)"
        ) from None
    doc = _inspect_doc(ck)
    if args.json:
        print(_json(doc))
    else:
        print(_inspect_text(doc, ck))
    return EXIT_OK


# --------------------------------------------------------------------------- verify


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint, and where."""

    message: str
    file: str | None = None
    offset: int | None = None
    key: str | None = None

    def where(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(self.file)
        if self.offset is not None:
            parts.append(f"offset {self.offset}")
        if self.key is not None:
            parts.append(f"key {self.key!r}")
        return ", ".join(parts)

    def __str__(self) -> str:
        where = self.where()
        return f"{where}: {self.message}" if where else self.message


class _Progress:
    """A one-line progress bar on stderr (\\r updates), or nothing."""

    def __init__(self, label: str, total: int, unit: str, enabled: bool) -> None:
        self.label, self.total, self.unit, self.enabled = label, max(total, 1), unit, enabled
        self.done = 0
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and self.done < self.total:
            return
        self._last = now
        frac = min(1.0, self.done / self.total)
        bar = "#" * int(30 * frac)
        if self.unit == "bytes":
            count = f"{_human(self.done)}/{_human(self.total)}"
        else:
            count = f"{self.done}/{self.total} {self.unit}"
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac:4.0%} {count}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


class _Verifier:
    """The verify passes over one checkpoint; each appends to ``problems``."""

    def __init__(self, ck: _Checkpoint, progress: str) -> None:
        self.ck = ck
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        self.progress_mode = progress
        self.sizes: dict[str, int] = {}
        #: Items whose bytes lie inside an existing file (later passes read only these).
        self.readable: list[_Item] = []
        self.checked_tensors = 0
        self.checked_objects = 0
        self.checked_files = 0

    def problem(self, message: str, item: _Item | None = None, **where: Any) -> None:
        if item is not None:
            where = {"file": item.file, "offset": item.offset, "key": item.key, **where}
        self.problems.append(Problem(message, **where))

    def _progress(self, label: str, total: int, unit: str, nbytes: int) -> _Progress:
        enabled = self.progress_mode == "always" or (
            self.progress_mode == "auto"
            and sys.stderr.isatty()
            and (total >= _PROGRESS_MIN_ITEMS or nbytes >= _PROGRESS_MIN_BYTES)
        )
        return _Progress(label, total, unit, enabled)

    # -------------------------------------------------------------- pass 1: metadata

    def check_metadata(self) -> None:
        md = self.ck.metadata
        saved: dict[str, dict[tuple, _Item]] = collections.defaultdict(dict)
        for item in self.ck.items:
            saved[item.key][item.chunk_offsets] = item
            if item.key not in md.state_dict_metadata:
                self.problem("the item's key is not in the metadata's state dict", item)
            elif item.kind == "tensor" and item.chunk_sizes is None:
                self.problem(
                    f"no saved chunk of the tensor starts at {list(item.chunk_offsets)}", item
                )
            if item.offset < 0 or item.length < 0:
                self.problem(f"negative offset or length ({item.length})", item)
        for key, entry in md.state_dict_metadata.items():
            if isinstance(entry, BytesStorageMetadata):
                if not saved.get(key):
                    self.problem("the object has no saved item", key=key)
                continue
            if not isinstance(entry, TensorStorageMetadata):
                self.problem(f"unknown metadata type {type(entry).__name__}", key=key)
                continue
            total = 0
            for chunk in entry.chunks:
                offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
                if offsets not in saved.get(key, {}):
                    self.problem(f"chunk at {list(offsets)} has no saved item", key=key)
                if len(offsets) != len(entry.size) or any(
                    o < 0 or n < 0 or o + n > s for o, n, s in zip(offsets, sizes, entry.size)
                ):
                    self.problem(
                        f"chunk at {list(offsets)} of size {list(sizes)} lies outside the "
                        f"tensor's shape {list(entry.size)}",
                        key=key,
                    )
                n = 1
                for s in sizes:
                    n *= s
                total += n
            numel = 1
            for s in entry.size:
                numel *= s
            if total != numel:
                self.problem(
                    f"the saved chunks hold {total} elements, the tensor's shape "
                    f"{list(entry.size)} has {numel}",
                    key=key,
                )
        self._check_overlaps()
        self._check_sidecar_entries()

    def _check_overlaps(self) -> None:
        by_file: dict[str, list[_Item]] = collections.defaultdict(list)
        for item in self.ck.items:
            by_file[item.file].append(item)
        for items in by_file.values():
            items.sort(key=lambda it: it.offset)
            for a, b in zip(items, items[1:]):
                if a.offset + a.length > b.offset:
                    self.problem(
                        f"the item overlaps the one before it ({a.key!r} at offset {a.offset}, "
                        f"{a.length} bytes)",
                        b,
                    )

    def _check_sidecar_entries(self) -> None:
        sidecar = self.ck.sidecar
        if sidecar.status in ("unknown version", "legacy"):
            self.notes.append(f"{sidecar.reason}; it was not checked")
        elif sidecar.status in ("damaged", "stale"):
            self.problem(f"{sidecar.reason}; it is ignored", file=sidecar.name)
        if sidecar.status != "matching":
            return
        known = {(it.file, it.offset): it for it in self.ck.items}
        for rel, entries in sidecar.entries.items():
            for offset, entry in entries.items():
                item = known.get((rel, offset))
                if item is None:
                    self.problem("the sidecar names an item the metadata does not have",
                                 file=rel, offset=offset)
                elif item.kind != "tensor":
                    self.problem("the sidecar gives a payload offset for an object item", item)
                elif entry[0] != item.length:
                    self.problem(
                        f"the sidecar says the item has {entry[0]} bytes, "
                        f"the metadata {item.length}",
                        item,
                    )

    # -------------------------------------------------------------- pass 2: files and sizes

    def check_files(self) -> None:
        by_file: dict[str, list[_Item]] = collections.defaultdict(list)
        for item in self.ck.items:
            by_file[item.file].append(item)
        for rel, items in sorted(by_file.items()):
            path = self.ck.file_path(rel)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                keys = sorted({it.key for it in items})
                shown = ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
                self.problem(
                    f"the data file is missing; it holds {_plural(len(items), 'item')} "
                    f"of {_plural(len(keys), 'key')}: {shown}",
                    file=rel,
                )
                continue
            except OSError as exc:
                self.problem(f"cannot stat the data file: {exc.strerror}", file=rel)
                continue
            if not stat.S_ISREG(st.st_mode):
                self.problem(f"is {_fileio.file_kind(st.st_mode)}, not a regular file", file=rel)
                continue
            self.sizes[rel] = st.st_size
            for item in sorted(items, key=lambda it: it.offset):
                end = item.offset + item.length
                if end > st.st_size:
                    self.problem(
                        f"the file is truncated: the item ends at byte {end}, the file has "
                        f"{st.st_size} bytes",
                        item,
                    )
                elif item.offset >= 0 and item.length >= 0:
                    self.readable.append(item)
        referenced = set(by_file)
        try:
            strays = sorted(
                n for n in os.listdir(self.ck.path) if n.endswith(".distcp") and n not in referenced
            )
        except OSError:
            strays = []
        if strays:
            self.notes.append(
                f"{_plural(len(strays), 'data file')} not referenced by the metadata "
                f"(left over from another save?): {', '.join(strays[:5])}"
                + (", ..." if len(strays) > 5 else "")
            )

    # -------------------------------------------------------------- pass 3: framing

    def check_framing(self) -> None:
        items = [it for it in self.readable if not it.transformed]
        transformed = len(self.readable) - len(items)
        if transformed:
            self.notes.append(
                f"{_plural(transformed, 'item')} written with stream transforms: "
                "bounds checked, framing not parsed"
            )
        progress = self._progress("verify", len(items), "items", 0)
        try:
            for item, view in _read_views(self.ck, items):
                progress.update(1)
                if isinstance(view, OSError):
                    self.problem(f"cannot read the item: {_os_error_text(view)}", item)
                    continue
                try:
                    if item.kind == "tensor":
                        self._check_tensor(item, view)
                        self.checked_tensors += 1
                    else:
                        self._check_object(item, view)
                        self.checked_objects += 1
                except layout.ArchiveError as exc:
                    self.problem(f"not a readable torch.save archive: {exc}", item)
                except OSError as exc:
                    self.problem(f"cannot read the item: {_os_error_text(exc)}", item)
        finally:
            progress.close()

    def _check_object(self, item: _Item, view: _ItemView) -> None:
        archive = _parse_archive(view)
        try:
            describe_pickle(_pickle_of(view, archive))
        except ValueError as exc:
            self.problem(f"data.pkl is not a valid pickle: {exc}", item)

    def _check_tensor(self, item: _Item, view: _ItemView) -> None:
        archive = _parse_archive(view)
        data_pkl = _pickle_of(view, archive)
        if "data/0" not in archive.records:
            self.problem("the archive has no data/0 record (the tensor's storage)", item)
            return
        payload, payload_size = archive.records["data/0"]
        try:
            describe_pickle(data_pkl)
        except ValueError as exc:
            self.problem(f"data.pkl is not a valid pickle: {exc}", item)
            return
        try:
            saved = layout.parse_tensor_pickle(data_pkl)
        except layout.UnsupportedLayout as exc:
            # Legitimate for tensors stock frames with torch.save (sparse, quantized, ...).
            self.notes.append(
                f"{item.file}, offset {item.offset}, key {item.key!r}: a tensor layout "
                f"dcp-native does not parse ({exc}); its archive was checked, its data.pkl not"
            )
            return
        if item.dtype is not None and item.chunk_sizes is not None and (
            saved.dtype != item.dtype or tuple(saved.size) != item.chunk_sizes
        ):
            self.problem(
                f"data.pkl holds a {_dtype_name(saved.dtype)} tensor of shape {list(saved.size)}, "
                f"the metadata declares {_dtype_name(item.dtype)} of shape "
                f"{list(item.chunk_sizes)}",
                item,
            )
        if saved.storage_nbytes is not None and saved.storage_nbytes != payload_size:
            self.problem(
                f"data.pkl declares a storage of {saved.storage_nbytes} bytes, the data/0 record "
                f"holds {payload_size}",
                item,
            )
        if all(s > 0 for s in saved.size):
            last = saved.storage_offset + sum(
                (n - 1) * st for n, st in zip(saved.size, saved.stride)
            )
            if (last + 1) * saved.dtype.itemsize > payload_size:
                self.problem(
                    f"the tensor's elements reach byte {(last + 1) * saved.dtype.itemsize} of "
                    f"its storage, which has {payload_size}",
                    item,
                )
        entry = self.ck.sidecar.entries.get(item.file, {}).get(item.offset)
        if entry is not None and len(entry) > 1 and entry[1] != payload:
            self.problem(
                f"the sidecar puts the payload at item offset {entry[1]}, the archive at {payload}",
                item,
            )

    # -------------------------------------------------------------- pass 4: every byte

    def read_all(self) -> None:
        """Read every byte of every item, in rounds within _READ_BUDGET, through the engine.

        Finds unreadable ranges of every file, also of files without checksum
        tables (those with tables are read whole by :meth:`check_checksums`).
        """
        items = sorted(self.readable, key=lambda it: (it.file, it.offset))
        total = sum(it.length for it in items)
        progress = self._progress("verify --read-all", total, "bytes", total)
        try:
            pieces = [
                (it, start, min(_READ_BUDGET, it.length - start))
                for it in items
                for start in range(0, max(it.length, 1), _READ_BUDGET)
            ]
            batch: list[tuple[_Item, int, int]] = []
            used = 0
            for piece in pieces:
                if batch and used + piece[2] > _READ_BUDGET:
                    self._read_batch(batch)
                    progress.update(used)
                    batch, used = [], 0
                batch.append(piece)
                used += piece[2]
            self._read_batch(batch)
            progress.update(used)
        finally:
            progress.close()

    def _read_batch(self, batch: list[tuple[_Item, int, int]]) -> None:
        if not batch:
            return
        try:
            _read_ranges(self.ck, [(it.file, it.offset + s, n) for it, s, n in batch])
            return
        except OSError:
            pass
        failed = set()
        for it, s, n in batch:
            if id(it) in failed:
                continue
            try:
                _read_ranges(self.ck, [(it.file, it.offset + s, n)])
            except OSError as exc:
                failed.add(id(it))
                self.problem(f"cannot read the item: {_os_error_text(exc)}", it)

    def check_checksums(self) -> int:
        """Read every data file that has a CRC32C table and check each block; returns bytes checked.

        The blocks are checked by the engine as it reads (ReadFile.checks), in
        rounds of _READ_BUDGET bytes; a mismatch names the block's file offset
        and the item that holds it.
        """
        tables = self.ck.sidecar.tables
        files = [rel for rel in self.ck.files if rel in tables and rel in self.sizes]
        total = sum(self.sizes[rel] for rel in files)
        progress = self._progress("verify checksums", total, "bytes", total)
        checked = 0
        try:
            for rel in files:
                n = self._check_file(rel, tables[rel], progress)
                checked += n
                self.checked_files += n > 0 or self.sizes[rel] == 0
        finally:
            progress.close()
        return checked

    def _check_file(self, rel: str, info: TableInfo, progress: _Progress) -> int:
        try:
            table = integrity.load_table(
                self.ck.file_path(info.file), info, self.ck.file_path(rel), self.sizes[rel]
            )
        except IntegrityError as exc:
            which = info.file if exc.filename == self.ck.file_path(info.file) else rel
            self.problem(str(exc).split(": ", 1)[-1], file=which)
            return 0
        except OSError as exc:
            self.problem(f"the checksum table cannot be read: {_os_error_text(exc)}", file=info.file)
            return 0
        block, size = table.block, table.size
        step = max(block, _READ_BUDGET // block * block)
        owners = sorted((it.offset, it.offset + it.length, it.key) for it in self.ck.items
                        if it.file == rel)
        for start in range(0, size, step):
            n = min(step, size - start)
            buf = bytearray(n)
            plan = integrity.CheckPlan(table)
            plan.add_run(start, _bytearray_address(buf), n, None)
            plan.finish()
            rf = ReadFile(self.ck.file_path(rel), size, encode_boxes([Box(start, _bytearray_address(buf), n)]))
            rf.checks = plan.records
            try:
                stats = _engine().read([rf], threads=_threads())
            except OSError as exc:
                self.problem(f"cannot be read: {_os_error_text(exc)}", file=rel, offset=start)
                return start
            for _, record in stats.failed_checks:
                offset = plan.block_offsets[record]
                key = next((k for a, b, k in owners if a <= offset < b or offset <= a < offset + block), None)
                self.problem(f"checksum mismatch in the {block}-byte block: the bytes on disk are "
                             "not those written", file=rel, offset=offset, key=key)
            progress.update(n)
        return size

    # -------------------------------------------------------------- report

    def summary(self) -> str:
        n_files = len(self.ck.files)
        total = sum(self.sizes.values())
        return (
            f"{_plural(len(self.ck.items), 'item')} in {_plural(n_files, 'data file')} "
            f"({_human(total)}); framing parsed for {_plural(self.checked_tensors, 'tensor item')} "
            f"and {_plural(self.checked_objects, 'object item')}"
        )


def _problem_json(p: Problem) -> dict[str, Any]:
    return {"file": p.file, "offset": p.offset, "key": p.key, "message": p.message}


def cmd_verify(args: argparse.Namespace) -> int:
    directory = _checkpoint_dir(args.path)
    problems: list[Problem] = []
    verifier = None
    checked = 0
    try:
        ck = _open_checkpoint(directory)
    except UsageError:
        found = _looks_like_unfinished_save(directory)
        if not found:
            raise
        # Data files without .metadata: a damaged or unfinished checkpoint, which is
        # what verify is for (exit 1), not a wrong path (exit 2).
        problems.append(Problem(
            f"missing: the directory holds {', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''} but no committed {_METADATA} "
            "(the save did not finish, or the file was lost)",
            file=_METADATA,
        ))
    except _BadMetadata as exc:
        problems.append(Problem(str(exc), file=_METADATA))
    else:
        verifier = _Verifier(ck, args.progress)
        verifier.check_metadata()
        verifier.check_files()
        verifier.check_framing()
        checked = verifier.check_checksums()
        if args.read_all:
            verifier.read_all()
        problems = sorted(
            verifier.problems,
            key=lambda p: (p.file or "", -1 if p.offset is None else p.offset, p.key or ""),
        )

    tables = verifier.ck.sidecar.tables if verifier else {}
    files_checked = verifier.checked_files if verifier else 0
    checksums = (
        f"CRC32C of every 4 KiB block checked ({_human(checked)} in "
        f"{_plural(files_checked, 'data file')})"
        if tables else "no checksums recorded"
    )
    if args.json:
        doc = {
            "path": os.path.abspath(directory),
            "ok": not problems,
            "written_by": _written_by(verifier.ck.sidecar) if verifier else None,
            "problems": [_problem_json(p) for p in problems],
            "notes": verifier.notes if verifier else [],
            "read_all": bool(args.read_all),
            "checksums": {"files": files_checked, "bytes_checked": checked} if tables else None,
        }
        print(_json(doc))
    else:
        head = os.path.abspath(directory)
        if verifier is not None:
            print(f"{head}: DCP checkpoint, {_describe_sidecar(verifier.ck.sidecar)}")
        else:
            print(f"{head}:")
        if verifier is not None:
            print(f"  checked: {verifier.summary()}")
            if tables and not args.read_all:
                print(f"  {checksums}")
            else:
                extent = (
                    "every byte read" if args.read_all
                    else "payload bytes not read (--read-all reads them)"
                )
                print(f"  {checksums}; {extent}")
            for note in verifier.notes:
                print(f"  note: {note}")
        if problems:
            print(f"FAILED: {_plural(len(problems), 'problem')}")
            for p in problems:
                print(f"  {p}")
        else:
            print("OK: intact")
    return EXIT_PROBLEMS if problems else EXIT_OK


# --------------------------------------------------------------------------- convert


class _PickleRefused(Exception):
    """torch.load(weights_only=True) refused an object.

    Not a ValueError or UnpicklingError: the reader would wrap those as corruption.
    """


class _Unimportable(Exception):
    """An object's pickle names code that this environment cannot import."""


def _unwrap_checkpoint_exception(exc: BaseException) -> BaseException:
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return exc


def _check_output(dst: str, force: bool, want_dir: bool) -> None:
    if os.path.lexists(dst):
        if want_dir:
            if not os.path.isdir(dst):
                raise UsageError(f"{dst} exists and is not a directory")
            if os.listdir(dst) and not force:
                raise UsageError(f"{dst} exists and is not empty (--force writes into it)")
        else:
            if os.path.isdir(dst):
                raise UsageError(f"{dst} is a directory; give the path of the file to write")
            if not force:
                raise UsageError(f"{dst} exists (--force overwrites it)")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise UsageError(f"{parent}: no such directory")


def _convert_to_file(args: argparse.Namespace) -> int:
    try:
        ck = _open_checkpoint(args.src)
    except _BadMetadata as exc:
        raise CommandFailed(
            f"{os.path.join(args.src, _METADATA)} {exc} (run `{PROG} verify` on it)"
        ) from None
    _check_output(args.dst, args.force, want_dir=False)
    sd_md = ck.metadata.state_dict_metadata
    keys = _select_keys(list(sd_md), args.keys, args.src)
    _engine()  # a bad DCP_NATIVE_BACKEND is a usage error, reported before any work

    # Preallocated outputs for the chosen keys only: the load reads nothing else.
    # A tensor cannot hold more bytes than the items on disk that store it; a
    # metadata file declaring more is refused before anything is allocated.
    stored: dict[str, int] = collections.defaultdict(int)
    file_sizes: dict[str, int] = {}
    for index, info in (ck.metadata.storage_data or {}).items():
        rel = info.relative_path
        if rel not in file_sizes:
            try:
                file_sizes[rel] = os.path.getsize(ck.file_path(rel))
            except OSError:
                file_sizes[rel] = 0
        stored[index.fqn] += max(0, min(info.length, file_sizes[rel] - info.offset))
    flat: dict[str, Any] = {}
    for key in keys:
        md = sd_md[key]
        if isinstance(md, TensorStorageMetadata):
            nbytes = md.properties.dtype.itemsize
            for s in md.size:
                nbytes *= s
            if nbytes > stored[key]:
                raise CommandFailed(
                    f"{key!r}: the metadata declares a tensor of {nbytes} bytes, but its items "
                    f"in the data files hold {stored[key]} bytes; refusing to allocate it "
                    f"(run `{PROG} verify {args.src}`)"
                )
            flat[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        else:
            flat[key] = None
    objects: dict[str, Any] = {}
    weights_only = not args.allow_pickle

    class Planner(DefaultLoadPlanner):
        # DCP's own load_bytes unpickles with weights_only=False; we only do with --allow-pickle.
        def load_bytes(self, read_item, value):
            try:
                objects[read_item.dest_index.fqn] = _torch_load_objects(value, weights_only)
            except pickle.UnpicklingError as exc:
                raise _PickleRefused(
                    f"{read_item.dest_index.fqn!r} ({_weights_only_reason(exc)})"
                ) from None
            except (AttributeError, ImportError) as exc:
                raise _Unimportable(
                    f"object {read_item.dest_index.fqn!r}: {_one_line(exc)}"
                ) from None

    try:
        dcp.load(flat, storage_reader=FileSystemReader(ck.path), planner=Planner(), no_dist=True)
    except BaseException as exc:  # DCP raises CheckpointException, a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        err = _unwrap_checkpoint_exception(exc)
        if isinstance(err, _PickleRefused):
            raise UsageError(
                f"torch.load(weights_only=True) refuses object {err}; if you trust "
                f"{args.src}, rerun with --allow-pickle"
            ) from None
        if isinstance(err, _Unimportable):
            raise CommandFailed(f"cannot unpickle {err} (is its package installed?)") from None
        if isinstance(err, OSError):
            raise CommandFailed(
                f"cannot load {args.src}: {_os_error_text(err)} (run `{PROG} verify` on it)"
            ) from None
        raise
    flat.update(objects)

    out: Any = flat
    mapping = getattr(ck.metadata, "planner_data", None)
    if not args.flat and isinstance(mapping, dict) and all(k in mapping for k in flat):
        out = unflatten_state_dict(flat, {k: mapping[k] for k in flat})
    tmp = f"{args.dst}.tmp{os.getpid()}"
    try:
        torch.save(out, tmp)
        os.replace(tmp, args.dst)
    except OSError as exc:
        raise CommandFailed(f"cannot write {args.dst}: {_os_error_text(exc)}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    n_tensors = sum(isinstance(v, torch.Tensor) for v in flat.values())
    print(
        f"wrote {args.dst}: {_plural(n_tensors, 'tensor')}, "
        f"{_plural(len(flat) - n_tensors, 'object')} ({_human(os.path.getsize(args.dst))}) "
        f"from {_plural(len(keys), 'key')} of {len(sd_md)}"
    )
    return EXIT_OK


#: The pickled magic number that starts a torch.save file in the legacy (pre-zip) format.
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[2:]


def _is_torch_save_file(path: str) -> bool:
    try:
        fd = _fileio.open_regular(path, what="input")
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    try:
        start = os.pread(fd, 64, 0)
    finally:
        os.close(fd)
    return zipfile.is_zipfile(path) or _LEGACY_MAGIC in start[:16]


def _torch_load(src: str, weights_only: bool) -> Any:
    try:
        if not _is_torch_save_file(src):
            raise UsageError(
                f"{src} is not a torch.save file (neither a zip archive nor torch's legacy format)"
            )
    except OSError as exc:
        raise UsageError(_os_error_text(exc)) from None
    try:
        try:
            return _torch_load_objects(src, weights_only, map_location="cpu", mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files in the legacy (non-zip) format cannot be memory-mapped.
            return _torch_load_objects(src, weights_only, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if weights_only and "Unsupported global" in str(exc):
            raise UsageError(
                f"torch.load(weights_only=True) refuses {src} ({_weights_only_reason(exc)}); "
                "if you trust the file, rerun with --allow-pickle"
            ) from None
        raise UsageError(
            f"{src} is not a readable torch.save file: {_weights_only_reason(exc)}"
        ) from None
    except OSError as exc:
        raise UsageError(_os_error_text(exc)) from None
    except (AttributeError, ImportError) as exc:
        raise CommandFailed(
            f"cannot unpickle {src}: {_one_line(exc)} (is its package installed?)"
        ) from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise UsageError(f"{src} is not a readable torch.save file: {_one_line(exc)}") from None


def _convert_to_dcp(args: argparse.Namespace) -> int:
    _check_output(args.dst, args.force, want_dir=True)
    _engine()
    obj = _torch_load(args.src, weights_only=not args.allow_pickle)
    if not isinstance(obj, Mapping):
        raise UsageError(f"{args.src} holds a {type(obj).__name__}, not a state dict (a dict)")
    flat, mapping = flatten_state_dict(dict(obj))
    keys = _select_keys(list(flat), args.keys, args.src)
    chosen = {k: flat[k] for k in keys}
    if args.flat:
        state_dict = chosen
    else:
        state_dict = unflatten_state_dict(chosen, {k: mapping[k] for k in keys})
    try:
        dcp.save(state_dict, storage_writer=FileSystemWriter(args.dst), no_dist=True)
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        err = _unwrap_checkpoint_exception(exc)
        if isinstance(err, OSError):
            raise CommandFailed(f"cannot write {args.dst}: {_os_error_text(err)}") from None
        raise
    n_tensors = sum(isinstance(v, torch.Tensor) for v in chosen.values())
    print(
        f"wrote {args.dst}: {_plural(n_tensors, 'tensor')}, "
        f"{_plural(len(chosen) - n_tensors, 'object')} from {_plural(len(keys), 'key')} of "
        f"{len(flat)} (DCP checkpoint, written by dcp_native)"
    )
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    src = args.src
    if os.path.isdir(src) or os.path.basename(os.path.normpath(src)) == _METADATA:
        return _convert_to_file(args)
    if not os.path.exists(src):
        raise UsageError(f"{src}: no such file or directory")
    return _convert_to_dcp(args)


# --------------------------------------------------------------------------- argument parsing


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description=(
            "Inspect, verify and convert PyTorch Distributed Checkpoint (DCP) checkpoints,\n"
            "written by dcp_native or by stock torch.distributed.checkpoint. No process\n"
            "group is needed. `python -m dcp_native` is the same command.\n\n"
            "commands:\n"
            "  inspect PATH         keys, dtypes, shapes, sizes, chunks and files; --json\n"
            "  verify PATH          check metadata, files, sizes and item framing;\n"
            "                       exit 1 with every problem found\n"
            "  convert SRC DST      DCP directory -> torch.save file, or torch.save file -> DCP"
        ),
        epilog=EXIT_CODES_HELP
        + "\nThe engine that reads data files is chosen by DCP_NATIVE_BACKEND=auto|native|python.",
        formatter_class=formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "inspect",
        help="list keys with dtype, shape, bytes, chunks and files",
        description=(
            "List every key of a DCP checkpoint: tensors with dtype, global shape, bytes,\n"
            "number of saved chunks and data files; objects (non-tensor entries) with\n"
            "their type, read from the pickle's opcodes without unpickling anything\n"
            "(short scalars show their value); totals; and whether dcp_native wrote it\n"
            "(its sidecar is present and belongs to this save) or stock DCP."
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    p.add_argument("path", metavar="PATH", help="checkpoint directory (the one holding .metadata)")
    p.add_argument("--json", action="store_true", help="print one JSON document (for scripts)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "verify",
        help="check that a checkpoint is intact (exit 0) or list what is wrong (exit 1)",
        description=(
            "Check a DCP checkpoint without loading it: .metadata loads; every chunk of\n"
            "every tensor has a saved item; every data file exists and is long enough;\n"
            "items do not overlap; every item's framing parses (zip end records, central\n"
            "directory, local headers, data.pkl), its dtype and shape agree with the\n"
            "metadata and its payload lies inside the item; the dcp_native sidecar\n"
            "agrees with the archives. Only item headers and trailers are read, unless\n"
            "--read-all. Every problem is listed with its file, offset and key. Every\n"
            "4 KiB block of each data file that has a CRC32C table (dcp_native writes\n"
            "them by default with its native engine) is read and checked, and the\n"
            "sidecar and tables are checked against what the save recorded. A directory\n"
            "with data files but no .metadata is reported as damaged (exit 1); one\n"
            "without either is not a checkpoint (exit 2)."
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    p.add_argument("path", metavar="PATH", help="checkpoint directory (the one holding .metadata)")
    p.add_argument("--json", action="store_true", help="print one JSON document (for scripts)")
    p.add_argument(
        "--read-all", action="store_true",
        help="also read every byte of every item (finds unreadable sectors; slow on big "
        "checkpoints)",
    )
    p.add_argument(
        "--progress", choices=("auto", "always", "never"), default="auto",
        help="progress bar on stderr; auto: when stderr is a terminal and the checkpoint has "
        f"{_PROGRESS_MIN_ITEMS}+ items or {_human(_PROGRESS_MIN_BYTES)}+ to read (default: auto)",
    )
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "convert",
        help="DCP checkpoint <-> single torch.save file",
        description=(
            "Convert between a DCP checkpoint directory and a single torch.save file. The\n"
            "direction follows SRC: a directory (holding .metadata) becomes a torch.save\n"
            "file of full tensors assembled from their chunks, objects included; a file\n"
            "saved with torch.save (holding a dict) becomes a DCP checkpoint written by\n"
            "dcp_native. Nested dicts are kept (the checkpoint's planner data says how);\n"
            "--flat writes dotted keys instead. Only the requested keys are read, so\n"
            "memory follows the output's size.\n\n"
            "Objects are unpickled with torch.load(weights_only=True); --allow-pickle\n"
            "unpickles anything (this runs code from the input: trusted inputs only)."
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    p.add_argument("src", metavar="SRC", help="a DCP checkpoint directory, or a torch.save file")
    p.add_argument("dst", metavar="DST", help="the torch.save file, or DCP directory, to write")
    p.add_argument(
        "--keys", nargs="+", action="extend", metavar="K",
        help="convert only these keys; K takes the key K and every key under it (K.*), in "
        "the dotted names `inspect` lists, e.g. --keys model.layer1 step. A K that "
        "matches nothing is an error (exit 2)",
    )
    p.add_argument("--flat", action="store_true", help="write dotted keys, not nested dicts")
    p.add_argument("-f", "--force", action="store_true",
                   help="overwrite an existing DST file, or write into a non-empty DST directory")
    p.add_argument(
        "--allow-pickle", action="store_true",
        help="unpickle objects with weights_only=False (runs code from SRC; trusted inputs only)",
    )
    p.set_defaults(func=cmd_convert)
    return parser


# --------------------------------------------------------------------------- main


def quiet_warnings() -> None:
    # DCP warns about its own normal use (no process group, deprecations); a user of
    # the command cannot act on those. Others are printed on one line.
    for pattern in (
        ".*torch.distributed is disabled.*",
        ".*TypedStorage is deprecated.*",
        ".*overwriting since.*",
        "Failed to initialize NumPy.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    def one_line(message: Any, category: Any, *args: Any, **kwargs: Any) -> str:
        text = str(message).strip().splitlines()
        return f"{PROG}: warning: {text[0] if text else category.__name__}\n"

    warnings.formatwarning = one_line  # type: ignore[assignment]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see EXIT_CODES_HELP).

    The entry points (``dcp-native``, ``python -m dcp_native``) call
    :func:`quiet_warnings` first; this function leaves the process's warning
    filters alone, so that it can be called in-process.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandFailed as exc:
        print(f"{PROG}: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # `dcp-native inspect ... | head`: not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"{PROG}: failed: {_os_error_text(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except BaseException as exc:  # a bug: show it, with a code of its own
        if isinstance(exc, SystemExit):
            raise
        traceback.print_exc()
        print(f"{PROG}: internal error (a bug in dcp-native, please report it): "
              f"{_one_line(exc)}", file=sys.stderr)
        return EXIT_BUG
