"""The checkpoint model: what a checkpoint directory holds, and where the bytes of each item lie.

The one place that opens a checkpoint (for load planning, the commit's clean-up and the command
line): ``.metadata`` through the restricted unpickler, the sidecar (which checks itself and its
binding to the metadata), every item's file name and byte range, the data files' checksum tables,
and tensor payloads, from a sidecar entry checked against the framing or from the item's own zip
headers; every offset and length is bounds-checked before anyone uses it. Data files are read
only through the engine (:func:`checked_read` also checks their blocks against the tables).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import io
import math
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from . import _fileio, _safe_pickle, integrity, layout, sidecar
from ._errors import CorruptCheckpointError
from ._safe_pickle import SavedTensor, UnsupportedLayout
from .engine import ReadFile, ReadStats
from .layout import ArchiveError
from .plan import Box, encode_boxes

METADATA_NAME = ".metadata"
#: How many bytes of an item's head and of its tail one probe reads.
PROBE_BYTES = 4096
#: Bytes of the end of an item read to find a central directory too large for a probe.
_MAX_DIRECTORY_BYTES = 1 << 20


def load_metadata(path: str) -> tuple[Metadata, bytes]:
    """The DCP metadata at ``path`` and its raw bytes (the sidecar is bound to them).

    ``FileNotFoundError`` when it is missing; :class:`CorruptCheckpointError` when it is not a
    regular file or not DCP metadata, or names a global outside DCP's metadata classes.
    """
    raw = _fileio.read_regular(path, None, what="metadata")
    return _safe_pickle.load_metadata(io.BytesIO(raw), path), raw


def table_name(data_file: str) -> str:
    """The name of a data file's CRC32C table (beside it)."""
    return data_file + integrity.SUFFIX


def named_files(metadata_name: str, metadata: Any) -> set[str]:
    """Every file one committed metadata names: its data files, their tables and its sidecar."""
    infos = (getattr(metadata, "storage_data", None) or {}).values()
    files = {rel for info in infos if isinstance(rel := getattr(info, "relative_path", None), str)}
    keep = {name for rel in files for name in (rel, table_name(rel))}
    save_id = getattr(getattr(metadata, "storage_meta", None), "save_id", None)
    if save_id:
        keep.add(sidecar.file_name(metadata_name, save_id))
    return keep


@dataclasses.dataclass
class Item:
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

    def inside(self, file_size: int) -> bool:
        """Whether the item is a valid range of a file of ``file_size`` bytes."""
        return 0 <= self.offset and 0 <= self.length and self.offset + self.length <= file_size


class Checkpoint:
    """A checkpoint directory opened through one metadata file (``.metadata`` or ``__{rank}.metadata``)."""

    def __init__(self, directory: str | os.PathLike, metadata_name: str = METADATA_NAME) -> None:
        self.directory = str(directory)
        self.metadata_name = metadata_name
        self.metadata, raw = load_metadata(self.path(metadata_name))
        #: SHA-256 of the metadata file's bytes: names this very save (cooperative loads check
        #: that every rank loads the same one).
        self.digest = hashlib.sha256(raw).hexdigest()
        self.sidecar = sidecar.read(self.directory, metadata_name, self.metadata, raw)

    def path(self, rel: str) -> str:
        return os.path.join(self.directory, rel)

    def items(self) -> list[Item]:
        """Every item of the metadata's storage_data, in its order."""
        items = []
        sd_md = self.metadata.state_dict_metadata
        for index, info in (self.metadata.storage_data or {}).items():
            md = sd_md.get(index.fqn)
            tensor_md = isinstance(md, TensorStorageMetadata)
            item = Item(
                key=index.fqn,
                kind="tensor" if tensor_md or index.offset is not None else "object",
                file=str(info.relative_path),
                # Not an integer (a damaged metadata): an invalid range, which nothing reads.
                offset=info.offset if isinstance(info.offset, int) else -1,
                length=info.length if isinstance(info.length, int) else -1,
                transformed=bool(getattr(info, "transform_descriptors", None)),
            )
            if tensor_md and index.offset is not None:
                item.dtype, item.chunk_offsets = md.properties.dtype, tuple(index.offset)
                item.chunk_sizes = next(
                    (tuple(c.sizes) for c in md.chunks if tuple(c.offsets) == item.chunk_offsets), None)
            items.append(item)
        return items

    def data_file_size(self, rel: str) -> int:
        """The size of data file ``rel`` (``stat`` never blocks); CorruptCheckpointError for a name
        that leads outside the directory (:func:`path_problem`) or a file that is not regular."""
        path = self.path(rel)
        why = path_problem(self.directory, os.path.realpath(self.directory), rel)
        if why is not None:
            raise CorruptCheckpointError(f"{path}: the data file name {why}; refusing to read it", filename=path)
        return _fileio.check_regular(path, "data file").st_size

    def entry(self, rel: str, offset: int) -> tuple[int, int] | None:
        """The usable sidecar's ``(item length, payload offset)`` of the item at ``offset``."""
        return self.sidecar.entries.get(rel, {}).get(offset) if self.sidecar.usable else None

    def missing_table(self, rel: str) -> str | None:
        """Why data file ``rel`` has no checksum table to trust (None: it has one)."""
        if not self.sidecar.usable:
            return self.sidecar.reason
        if rel not in self.sidecar.tables:
            return (f"the save wrote no checksum table for {rel} (written with checksums=False, "
                    "or by the Python engine, which writes none by default)")
        return None

    def table(self, rel: str, data_size: int) -> integrity.Table:
        """The checksum table of data file ``rel`` (``data_size`` bytes now), checked against the
        sidecar (:func:`dcp_native.integrity.load_table`: IntegrityError when it cannot vouch)."""
        info = self.sidecar.tables[rel]
        check_relative_path(self.directory, os.path.realpath(self.directory), info.file, rel)
        return integrity.load_table(self.path(info.file), info, self.path(rel), data_size)


# --------------------------------------------------------------------------- item locations


def validate_storage_data(directory: str, storage_data: Any) -> None:
    """Refuse item locations that leave the directory or cannot be file ranges.

    Every path must be a plain relative path inside the checkpoint directory
    (no ``..``, not absolute, no NUL, no symlink that leads out), and every
    offset and length non-negative integers whose sum fits in 63 bits.
    """
    if not isinstance(storage_data, dict):
        raise CorruptCheckpointError(f"{directory}: the metadata's storage_data is a "
                                     f"{type(storage_data).__name__}, not a dict", filename=directory)
    root = os.path.realpath(directory)
    checked: set[str] = set()
    for index, info in storage_data.items():
        try:
            rel, offset, length = info.relative_path, info.offset, info.length
        except AttributeError:
            rel = offset = length = None
        if type(rel) is not str or rel not in checked:
            check_relative_path(directory, root, rel, _key(index))
            checked.add(rel)
        if not (isinstance(offset, int) and isinstance(length, int)
                and 0 <= offset and 0 <= length and offset + length < 1 << 63):
            key = _key(index)
            raise CorruptCheckpointError(
                f"{directory}: item {key!r} in {rel} has offset {offset!r} and length {length!r}, "
                "which are not a valid file range", filename=os.path.join(directory, rel), key=key)


def _key(index: Any) -> str:
    """The key a metadata index names, for errors."""
    fqn = getattr(index, "fqn", None)
    return fqn if isinstance(fqn, str) else str(index)


def check_relative_path(directory: str, root: str, rel: Any, key: str) -> None:
    """Refuse a file name that is not a plain relative path inside ``directory`` (``root``: its realpath)."""
    why = path_problem(directory, root, rel)
    if why is not None:
        named = isinstance(rel, str) and rel and "\0" not in rel and not os.path.isabs(rel)
        raise CorruptCheckpointError(
            f"{directory}: item {key!r} names the data file {rel!r}, which {why}; refusing to read it",
            filename=os.path.join(directory, rel) if named else directory,
            key=key,
        )


def path_problem(directory: str, root: str, rel: Any) -> str | None:
    """Why ``rel`` is not a plain relative path inside ``directory`` (None: it is)."""
    if not isinstance(rel, str) or not rel:
        return "is not a file name"
    if "\0" in rel:
        return "contains a NUL byte"
    if os.path.isabs(rel):
        return "is an absolute path"
    if any(part == ".." for part in rel.replace("\\", "/").split("/")):
        return "leaves the checkpoint directory through '..'"
    resolved = os.path.realpath(os.path.join(directory, rel))
    if os.path.commonpath([root, resolved]) != root or resolved == root:
        return "resolves (through a symbolic link) outside the checkpoint directory"
    return None


def sidecar_payload(entry: tuple[int, int], length: int, offset: int, dtype: Any, size: Sequence[int]) -> int | None:
    """The payload offset a sidecar entry gives for an item (``length`` bytes at ``offset``), or None.

    dcp_native aligns a payload in the file and follows it with a trailer
    whose length depends only on where the payload ends, so in an item of the
    metadata's length one payload offset fits a ``dtype`` tensor of ``size``:
    an entry that says otherwise (shifted, negative, past the end) gives None.
    """
    entry_length, payload = entry
    nbytes = dtype.itemsize * math.prod(size)
    fits = (entry_length == length and (offset + payload) % layout.payload_alignment(nbytes) == 0
            and payload + nbytes + layout.trailer_length(offset, payload, nbytes) == length)
    return payload if fits else None


@dataclasses.dataclass
class ItemBytes:
    """What was read of one item (its head and its tail); other ranges through ``fetch``.

    Without ``fetch``, asking for bytes outside the head and tail raises
    :class:`ArchiveError` (the reader then falls back to ``torch.load``).
    """

    length: int
    head: bytes
    tail: bytes
    fetch: Callable[[int, int], bytes] | None = None

    def get(self, start: int, n: int) -> bytes:
        """Bytes ``[start, start + n)`` of the item (item-relative offsets)."""
        if start < 0 or n < 0 or start + n > self.length:
            raise ArchiveError(f"bytes {start}..{start + n} of the item lie outside it ({self.length} bytes)")
        if start + n <= len(self.head):
            return self.head[start : start + n]
        tail_start = self.length - len(self.tail)
        if start >= tail_start:
            return self.tail[start - tail_start : start - tail_start + n]
        if self.fetch is None:
            raise ArchiveError("need more bytes")
        return self.fetch(start, n)


class Archive:
    """The records of one item's ``torch.save`` archive, each bounds-checked when asked for."""

    def __init__(self, view: ItemBytes) -> None:
        self.view = view
        try:
            index = layout.parse_archive_tail(view.tail, view.length)
        except ArchiveError:
            # A central directory larger than the probe: retry once with more of the item.
            bigger = min(view.length, _MAX_DIRECTORY_BYTES)
            if bigger <= len(view.tail) or view.fetch is None:
                raise
            view.tail = view.get(view.length - bigger, bigger)
            index = layout.parse_archive_tail(view.tail, view.length)
        #: record name -> (local header offset in the item, size)
        self.index = index.records

    def record(self, name: str) -> tuple[int, int]:
        """``(data start in the item, size)`` of a record; ArchiveError if it is absent or out of bounds."""
        if name not in self.index:
            raise ArchiveError(f"the archive has no {name} record")
        header_offset, size = self.index[name]
        length = self.view.length
        if header_offset + 30 > length:
            raise ArchiveError(f"record {name}: its local header (item offset {header_offset}) lies past "
                               f"the item's end ({length} bytes)")
        data = layout.local_data_offset(self.view.get(header_offset, 30), header_offset)
        if data + size > length:
            raise ArchiveError(f"record {name} ({size} bytes at item offset {data}) runs past the item's "
                               f"end ({length} bytes)")
        return data, size

    def check_all(self) -> None:
        for name in self.index:
            self.record(name)

    def data_pickle(self) -> bytes:
        start, size = self.record("data.pkl")
        return self.view.get(start, size)


class BadExtent(ArchiveError):
    """The elements a data.pkl names do not lie inside its stored storage."""


@dataclasses.dataclass(frozen=True)
class LocatedTensor:
    saved: SavedTensor
    #: Offset of the payload (the storage's first byte) from the item's first byte.
    payload: int
    payload_size: int


def locate_tensor(archive: Archive) -> LocatedTensor:
    """Where a stock-framed tensor's payload lies, from its archive.

    Raises :class:`ArchiveError` for framing that is damaged or out of bounds
    and :class:`UnsupportedLayout` for an archive that is not one plain dense
    tensor (both: use ``torch.load`` for it, or report it).
    """
    pickled = archive.data_pickle()
    payload, payload_size = archive.record("data/0")
    saved = _safe_pickle.parse_tensor_pickle(pickled)
    if saved.storage_nbytes is not None and saved.storage_nbytes != payload_size:
        raise BadExtent(f"data.pkl declares a storage of {saved.storage_nbytes} bytes, the data/0 "
                        f"record holds {payload_size}")
    last = saved.storage_offset + sum((n - 1) * st for n, st in zip(saved.size, saved.stride))
    if all(saved.size) and (last + 1) * saved.dtype.itemsize > payload_size:
        raise BadExtent(f"the tensor's elements reach byte {(last + 1) * saved.dtype.itemsize} of "
                        f"its storage, which has {payload_size}")
    return LocatedTensor(saved, payload, payload_size)


def metadata_mismatch(saved: SavedTensor, dtype: Any, size: Sequence[int]) -> str | None:
    """Why the tensor an item holds (``saved``) is not the metadata's ``dtype`` chunk of ``size``."""
    if saved.dtype == dtype and tuple(saved.size) == tuple(size):
        return None
    return (f"holds a {saved.dtype} tensor of shape {list(saved.size)}, the metadata "
            f"declares {dtype} of shape {list(size)}")


# --------------------------------------------------------------------------- reading through the engine


def read_rounds(groups: Sequence[Sequence[tuple]], read: Callable[[dict[str, list[Box]]], None], budget: int,
                isolate: bool = False) -> Iterator[tuple[int, list[bytearray] | OSError]]:
    """Read groups of ``(file, offset, nbytes[, key])`` ranges in rounds of at most ``budget`` bytes.

    ``read`` runs one round's boxes (per data file; ``key`` names a box in errors) through the
    engine; a round holds whole groups, at least one. Yields ``(index in groups, its buffers)``
    after each round. With ``isolate``, a round that fails with an ``OSError`` is read again
    group by group, and the groups that still fail yield their error instead.
    """
    sizes = [sum(r[2] for r in group) for group in groups]
    i = 0
    while i < len(groups):
        j, used = i + 1, sizes[i]
        while j < len(groups) and used + sizes[j] <= budget:
            used += sizes[j]
            j += 1
        bufs = {k: [bytearray(r[2]) for r in groups[k]] for k in range(i, j)}

        def boxes(ks: Iterable[int]) -> dict[str, list[Box]]:
            return _boxes((*r[:2], buf, *r[3:]) for k in ks for r, buf in zip(groups[k], bufs[k]))

        try:
            read(boxes(range(i, j)))
        except OSError:
            if not isolate:
                raise
            for k in range(i, j):
                try:
                    read(boxes([k]))
                except OSError as exc:
                    yield k, exc
                    continue
                yield k, bufs[k]
        else:
            yield from bufs.items()
        i = j


def probe(items: Sequence[tuple[str, int, int]], read: Callable[[dict[str, list[Box]]], None], budget: int,
          isolate: bool = False) -> Iterator[tuple[int, ItemBytes | OSError]]:
    """Head and tail of each ``(file, offset, length)`` item (:func:`read_rounds` of them)."""
    spans = [[(rel, off, n)] if n <= 2 * PROBE_BYTES
             else [(rel, off, PROBE_BYTES), (rel, off + n - PROBE_BYTES, PROBE_BYTES)]
             for rel, off, n in items]
    for i, got in read_rounds(spans, read, budget, isolate):
        yield i, (got if isinstance(got, OSError)
                  else ItemBytes(items[i][2], bytes(got[0]), bytes(got[-1])))


def _boxes(ranges: Iterable[tuple]) -> dict[str, list[Box]]:
    """``(file, offset, buffer[, key])`` ranges as boxes per file (empty ones left out)."""
    boxes: dict[str, list[Box]] = {}
    for rel, offset, buf, *key in ranges:
        if len(buf):
            address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            boxes.setdefault(rel, []).append(Box(offset, address, len(buf), key=next(iter(key), None)))
    return boxes


def read_boxes(engine: Any, directory: str, boxes: dict[str, list[Box]], threads: int) -> None:
    """Run ``boxes`` (per data file relative to ``directory``) through the engine, in one call."""
    files = [ReadFile(os.path.join(directory, rel), 0, encode_boxes(bx)) for rel, bx in boxes.items() if bx]
    if files:
        engine.read(files, threads=threads)


def read_ranges(engine: Any, directory: str, ranges: Sequence[tuple[str, int, int]], threads: int) -> list[bytearray]:
    """Read ``(relative path, offset, nbytes)`` ranges through the engine, in one call (one round)."""
    return next(read_rounds([ranges], lambda boxes: read_boxes(engine, directory, boxes, threads), 0))[1]


@dataclasses.dataclass
class FileRead:
    """The reads of one data file in one engine call, checked against ``table`` when given."""

    path: str
    min_size: int
    boxes: list[Box]
    table: integrity.Table | None = None
    device: int = -1
    stream: int = 0


def checked_read(engine: Any, reads: Sequence[FileRead], **kwargs: Any) -> tuple[ReadStats, list[tuple[int, int]]]:
    """One engine call; returns its stats and ``(index in reads, file offset)`` of every failed block.

    The engine widens the reads of a file with a table to whole blocks and
    checks every block they touch (see "Checks" in :mod:`dcp_native.engine`).
    """
    stats = engine.read([ReadFile(r.path, r.min_size, encode_boxes(r.boxes), table=r.table, device=r.device,
                                  stream=r.stream) for r in reads], **kwargs)
    return stats, [(i, k * reads[i].table.block) for i, k in stats.failed_blocks]


def owner(boxes: Iterable[Box], lo: int, hi: int) -> str | None:
    """The key of a box that reads bytes of ``[lo, hi)`` (None: framing only)."""
    for box in boxes:
        start, end = box.file_span
        if box.key is not None and start < hi and end > lo and any(
                f < hi and f + box.inner_bytes > lo for f, _ in box.runs_iter()):
            return box.key
    return None
