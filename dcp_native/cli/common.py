"""What the commands share: checkpoint opening, item reads, archives and pickles described without unpickling."""

from __future__ import annotations

import ctypes
import dataclasses
import io
import json
import os
import pickletools
from typing import Any, Iterable, Sequence

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from .. import _fileio, layout
from .._backend import get_engine
from .._errors import BackendUnavailableError, CheckpointError
from .._safe_pickle import MetadataUnpickler
from ..engine import ReadFile
from ..plan import Box, encode_boxes
from ..reader import default_thread_count
from ..sidecar import Sidecar
from ..sidecar import read as read_sidecar_file

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
