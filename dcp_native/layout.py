"""The on-disk format: where each item's bytes go in a data file, and how they are framed.

A tensor item is a ``torch.save`` zip archive of one storage, framed exactly as stock DCP frames
it; we generate its small header and trailer here and write the payload straight from tensor
memory (large payloads 4 KiB-aligned in the file). :func:`lay_out` places one rank's items in its
data files as stock does and returns each file's write plan. The format in full: "The data
files' format" in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import heapq
import io
import math
import os
import pickle
import secrets
import struct
import zlib
from array import array
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch.distributed.checkpoint import filesystem as _stock
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from . import _device
from .engine import SRC_BLOB, SRC_DEVICE, SRC_HOST, WriteFile

ARCHIVE_NAME = "archive"
#: Record data alignment used by torch.save (miniz's kFieldAlignment).
RECORD_ALIGN = 64
#: Payloads of at least this many bytes are aligned to PAYLOAD_ALIGN in the file.
PAYLOAD_ALIGN_MIN_BYTES = 64 << 10
PAYLOAD_ALIGN = 4096

_U32_MAX = 0xFFFFFFFF
_LOCAL_SIG = 0x04034B50
_CENTRAL_SIG = 0x02014B50
_EOCD_SIG = 0x06054B50
_EOCD64_SIG = 0x06064B50
_EOCD64_LOCATOR_SIG = 0x07064B50
_DESCRIPTOR_SIG = 0x08074B50
_FLAG_DESCRIPTOR = 0x0008
_FLAG_UTF8 = 0x0800

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # 30 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
_EOCD = struct.Struct("<IHHHHIIH")  # 22 bytes
_EOCD64 = struct.Struct("<IQHHIIQQQQ")  # 56 bytes
_EOCD64_LOCATOR = struct.Struct("<IIQI")  # 20 bytes
_DESC32 = struct.Struct("<IIII")
_DESC64 = struct.Struct("<IIQQ")


class TensorFrame(NamedTuple):
    """Header and trailer of one tensor item; the payload goes between them."""

    header: bytes
    trailer: bytes
    #: Offset of the payload from the item's first byte.
    payload_offset: int
    #: Total item length: header + payload + trailer.
    length: int


# --------------------------------------------------------------------------- data.pkl


class _StorageRef(NamedTuple):
    storage_type: Any
    numel: int


class _TensorRef:
    """Pickles as ``reduced`` (the rebuild call torch.save records for a tensor)."""

    def __init__(self, reduced) -> None:
        self.reduced = reduced

    def __reduce_ex__(self, protocol):
        return self.reduced


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", obj.storage_type, "0", "cpu", obj.numel)


@functools.lru_cache(maxsize=4096)
def tensor_pickle(dtype: torch.dtype, size: tuple[int, ...]) -> bytes:
    """``data.pkl`` of a contiguous CPU tensor, byte-identical to ``torch.save``'s."""
    numel = math.prod(size)
    args = (0, size, contiguous_stride(size), False, collections.OrderedDict())
    if dtype in torch.storage._new_dtypes():  # as Tensor.__reduce_ex__ decides
        storage = _StorageRef(torch.storage.UntypedStorage, numel * dtype.itemsize)
        reduced = (torch._utils._rebuild_tensor_v3, (storage, *args, dtype))
    else:
        storage = _StorageRef(getattr(torch, torch.storage._dtype_to_storage_type_map()[dtype]), numel)
        reduced = (torch._utils._rebuild_tensor_v2, (storage, *args))
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(_TensorRef(reduced))
    return buf.getvalue()


@functools.lru_cache(maxsize=4096)  # a model has few distinct shapes, and this runs per item
def contiguous_stride(size: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(max(s, 1) for s in size[i + 1 :]) for i in range(len(size)))


# --------------------------------------------------------------------------- zip writer


def _padding_extra(data_start_unpadded: int, align: int) -> bytes:
    """An ``FB`` extra field that moves data from ``data_start_unpadded`` to ``align``."""
    pad = (-(data_start_unpadded + 4)) % align
    return struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB", like miniz


class _ZipBuilder:
    """Builds an archive in pieces; offsets are archive-relative, alignment file-relative."""

    def __init__(self, base: int) -> None:
        self.base = base  # file offset of the archive's first byte
        self.cursor = 0
        self.parts: list[bytes] = []
        self.central: list[bytes] = []

    def _entry(self, name: str, size: int, crc: int, align: int) -> tuple[bytes, bytes]:
        """Local header and data descriptor of a record at the cursor; notes its directory entry."""
        full = f"{ARCHIVE_NAME}/{name}".encode()
        zip64 = size >= _U32_MAX or self.cursor >= _U32_MAX
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        extra += _padding_extra(self.base + self.cursor + _LOCAL.size + len(full) + len(extra), align)
        flags = _FLAG_UTF8 | (_FLAG_DESCRIPTOR if size else 0)
        local = _LOCAL.pack(_LOCAL_SIG, 0, flags, 0, 0, 0, 0, 0, 0, len(full), len(extra))
        self._central(name, size, crc, self.cursor)
        return local + full + extra, _descriptor(size, crc, zip64)

    def _central(self, name: str, size: int, crc: int, header_offset: int) -> None:
        full = f"{ARCHIVE_NAME}/{name}".encode()
        fields = [size, size] if size >= _U32_MAX else []
        if header_offset >= _U32_MAX:
            fields.append(header_offset)
        extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        size32, offset32 = min(size, _U32_MAX), min(header_offset, _U32_MAX)
        flags = _FLAG_UTF8 | (_FLAG_DESCRIPTOR if size else 0)
        self.central.append(
            _CENTRAL.pack(
                _CENTRAL_SIG, 0, 0, flags, 0, 0, 0, crc, size32, size32,
                len(full), len(extra), 0, 0, 0, 0, offset32,
            )
            + full
            + extra
        )

    def _add(self, piece: bytes) -> None:
        self.parts.append(piece)
        self.cursor += len(piece)

    def record(self, name: str, data: bytes) -> None:
        crc = zlib.crc32(data)
        local, descriptor = self._entry(name, len(data), crc, RECORD_ALIGN)
        self._add(local + data + descriptor)

    def payload(self, name: str, size: int, align: int) -> tuple[bytes, int]:
        """Local header of the payload record; returns (its data descriptor, payload offset)."""
        local, descriptor = self._entry(name, size, 0, align)
        self._add(local)
        self.cursor += size
        return descriptor, self.cursor - size

    def end(self) -> bytes:
        cd = b"".join(self.central)
        cd_offset = self.cursor
        n = len(self.central)
        tail = cd
        if cd_offset >= _U32_MAX or len(cd) >= _U32_MAX:
            eocd64_offset = cd_offset + len(cd)
            tail += _EOCD64.pack(_EOCD64_SIG, 44, 0x031E, 0x2D, 0, 0, n, n, len(cd), cd_offset)
            tail += _EOCD64_LOCATOR.pack(_EOCD64_LOCATOR_SIG, 0, eocd64_offset, 1)
            tail += _EOCD.pack(_EOCD_SIG, 0, 0, n, n, min(len(cd), _U32_MAX), _U32_MAX, 0)
        else:
            tail += _EOCD.pack(_EOCD_SIG, 0, 0, n, n, len(cd), cd_offset, 0)
        return tail


def _descriptor(size: int, crc: int, zip64: bool) -> bytes:
    if not size:
        return b""
    return (_DESC64 if zip64 else _DESC32).pack(_DESCRIPTOR_SIG, crc, size, size)


def new_serialization_id() -> bytes:
    """A 40-digit id like the one ``torch.save`` records (only used for logging by torch.load)."""
    return str(secrets.randbits(128)).zfill(40)[:40].encode()


def payload_alignment(nbytes: int) -> int:
    return PAYLOAD_ALIGN if nbytes >= PAYLOAD_ALIGN_MIN_BYTES else RECORD_ALIGN


def frame_tensor(dtype: torch.dtype, size: tuple[int, ...], item_offset: int,
                 serialization_id: bytes) -> TensorFrame:
    """Frame a contiguous tensor of ``dtype``/``size`` whose item starts at ``item_offset``.

    The result depends on ``item_offset`` only through its remainder modulo the
    payload alignment, so callers may cache on that.
    """
    return _frame_tensor(dtype, tuple(size), item_offset % payload_alignment(
        _nbytes(dtype, size)), serialization_id)


def _nbytes(dtype: torch.dtype, size) -> int:
    return dtype.itemsize * math.prod(size)


@functools.lru_cache(maxsize=8192)
def _frame_tensor(dtype, size, base, serialization_id) -> TensorFrame:
    nbytes = _nbytes(dtype, size)
    zb = _ZipBuilder(base)
    for name, data in _header_records(dtype, size):
        zb.record(name, data)
    descriptor, payload_offset = zb.payload("data/0", nbytes, payload_alignment(nbytes))
    header = b"".join(zb.parts)
    trailer = _trailer(zb, descriptor, serialization_id)
    return TensorFrame(header, trailer, payload_offset, payload_offset + nbytes + len(trailer))


def _header_records(dtype, size) -> list[tuple[str, bytes]]:
    """The records before the payload, as torch.save writes them."""
    return [
        ("data.pkl", tensor_pickle(dtype, size)),
        (".format_version", b"1"),
        (".storage_alignment", str(RECORD_ALIGN).encode()),
        ("byteorder", b"little"),
    ]


def _trailer(zb: _ZipBuilder, descriptor: bytes, serialization_id: bytes) -> bytes:
    """Everything after the payload: its descriptor, the last records, the directory, the end."""
    zb.parts = []
    zb._add(descriptor)
    zb.record("version", b"3\n")
    zb.record(".data/serialization_id", serialization_id)
    return b"".join(zb.parts) + zb.end()


def trailer_length(item_offset: int, payload_offset: int, nbytes: int) -> int:
    """Bytes after the payload in an item dcp_native frames (payload at ``payload_offset``).

    Depends only on where the payload ends (padding to RECORD_ALIGN in the
    file, ZIP64 past 4 GiB) and whether it is empty, not on the tensor's
    dtype or shape: a reader checks a sidecar's payload offset with it
    without framing the tensor again.
    """
    end = payload_offset + nbytes
    if end + (1 << 16) >= _U32_MAX or nbytes >= _U32_MAX:
        return _trailer_length(item_offset, payload_offset, nbytes)  # rare: exact, uncached
    # As for a stand-in whose payload (1 byte, or none) at offset RECORD_ALIGN ends where this
    # one does, modulo RECORD_ALIGN: few distinct calls, cached.
    n = int(nbytes > 0)
    return _cached_trailer_length((item_offset + end) % RECORD_ALIGN + RECORD_ALIGN - n, RECORD_ALIGN, n)


def _trailer_length(item_offset: int, payload_offset: int, nbytes: int) -> int:
    zb = _ZipBuilder(item_offset)
    # The directory entries of the records before the payload: fixed-size fields and names.
    for name, _ in _header_records(torch.uint8, (1,)):
        zb._central(name, 1, 0, 0)
    zb._central("data/0", nbytes, 0, 0)
    zb.cursor = payload_offset + nbytes
    return len(_trailer(zb, _descriptor(nbytes, 0, nbytes >= _U32_MAX), b"0" * 40))


_cached_trailer_length = functools.lru_cache(maxsize=2 * RECORD_ALIGN)(_trailer_length)


# --------------------------------------------------------------------------- zip reader


class ArchiveError(Exception):
    """The bytes are not a readable single-tensor archive (message says why)."""


class ArchiveIndex(NamedTuple):
    """Central-directory facts about one item's archive."""

    #: record name (without the archive prefix) -> (local header offset, size)
    records: dict[str, tuple[int, int]]


def parse_archive_tail(tail: bytes, item_length: int) -> ArchiveIndex:
    """Parse the end records and central directory from the last bytes of an item.

    ``tail`` holds the item's last ``len(tail)`` bytes. Raises :class:`ArchiveError`
    if they do not contain the whole central directory (callers then read more)
    or are not a zip archive.
    """
    tail_start = item_length - len(tail)
    pos = tail.rfind(struct.pack("<I", _EOCD_SIG), max(0, len(tail) - 22 - 0xFFFF))
    if pos < 0:
        raise ArchiveError("no end of central directory record")
    (_, _, _, _, entries, cd_size, cd_offset, _) = _EOCD.unpack_from(tail, pos)
    if cd_offset == _U32_MAX or cd_size == _U32_MAX or entries == 0xFFFF:
        loc = pos - _EOCD64_LOCATOR.size
        if loc < 0:
            raise ArchiveError("need more bytes")
        sig, _, eocd64_offset, _ = _EOCD64_LOCATOR.unpack_from(tail, loc)
        if sig != _EOCD64_LOCATOR_SIG:
            raise ArchiveError("bad ZIP64 locator")
        rel = eocd64_offset - tail_start
        if rel < 0:
            raise ArchiveError("need more bytes")
        sig, *_, entries, cd_size, cd_offset = _EOCD64.unpack_from(tail, rel)
        if sig != _EOCD64_SIG:
            raise ArchiveError("bad ZIP64 end record")
    rel = cd_offset - tail_start
    if rel < 0:
        raise ArchiveError("need more bytes")
    if cd_offset + cd_size > item_length:
        raise ArchiveError("central directory lies past the item's end")
    records = {}
    for _ in range(entries):
        if rel + _CENTRAL.size > len(tail):
            raise ArchiveError("truncated central directory")
        f = _CENTRAL.unpack_from(tail, rel)
        if f[0] != _CENTRAL_SIG:
            raise ArchiveError("bad central directory entry")
        method, size, name_len, extra_len, comment_len, offset = f[4], f[9], f[10], f[11], f[12], f[16]
        name = bytes(tail[rel + 46 : rel + 46 + name_len]).decode("utf-8", "replace")
        zip64 = _zip64_fields(tail[rel + 46 + name_len : rel + 46 + name_len + extra_len])
        if size == _U32_MAX and zip64:
            size = zip64.pop(0)
            del zip64[:1]  # the compressed size follows the uncompressed one
        if offset == _U32_MAX and zip64:
            offset = zip64.pop(0)
        if method != 0:
            raise ArchiveError(f"record {name} is compressed")
        records[name.split("/", 1)[-1]] = (offset, size)
        rel += 46 + name_len + extra_len + comment_len
    return ArchiveIndex(records)


def _zip64_fields(extra: bytes) -> list[int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            return list(struct.unpack_from(f"<{length // 8}Q", extra, pos + 4))
        pos += 4 + length
    return []


def local_data_offset(header: bytes, header_offset: int) -> int:
    """Offset of a record's data from its local header bytes (at least 30 bytes)."""
    if len(header) < _LOCAL.size:
        raise ArchiveError("need more bytes")
    f = _LOCAL.unpack_from(header)
    if f[0] != _LOCAL_SIG:
        raise ArchiveError(f"no local header at archive offset {header_offset}")
    return header_offset + _LOCAL.size + f[9] + f[10]


# --------------------------------------------------------------------------- a rank's data files


@dataclasses.dataclass
class StorageInfo(_stock._StorageInfo):
    """The storage info of a data file's first item: stock's fields, plus what dcp_native records
    about the whole file, which travels to the coordinator with it (the file's other items get
    stock's own ``_StorageInfo``); never reaches ``.metadata``."""

    #: (item offset, item length, payload offset within the item) of each framed tensor of the
    #: file, flat, in file order: the sidecar's entries.
    payloads: array = dataclasses.field(default_factory=lambda: array("q"))
    #: The data file's checksum table (a :class:`~dcp_native.sidecar.TableInfo`), if written.
    table: Any = None

    def stock(self) -> _stock._StorageInfo:
        return _stock._StorageInfo(
            self.relative_path, self.offset, self.length, self.transform_descriptors
        )


class FileLayout:
    """One data file: its items back to back, and the segments the engine writes them from."""

    def __init__(self, directory: str | os.PathLike, name: str) -> None:
        self.path = os.path.join(directory, name)
        self.relative_path = name
        self.size = 0
        self.blob = bytearray()
        self.segments = array("q")
        #: CUDA device of the SRC_DEVICE segments (-1: none): one per engine call.
        self.device = -1
        #: What the host and device segments point into, alive until the write returns.
        self.tensors: list[torch.Tensor] = []
        #: The storage info of the first item (see StorageInfo), None while there is none.
        self.head: StorageInfo | None = None
        #: StorageInfo.payloads of this file.
        self.payloads = array("q")

    def storage_info(self, offset: int, length: int, payload_offset: int = -1,
                     transform_descriptors: Any = None) -> _stock._StorageInfo:
        """The storage info of an item laid out at ``offset`` (``payload_offset``: of its tensor
        payload within it, -1 for none): the file's head for its first item, else stock's."""
        if payload_offset >= 0:
            self.payloads.extend((offset, length, payload_offset))
        if self.head is None:
            self.head = StorageInfo(self.relative_path, offset, length, transform_descriptors, self.payloads)
            return self.head
        return _stock._StorageInfo(self.relative_path, offset, length, transform_descriptors)

    def _append(self, kind: int, source: int, nbytes: int) -> int:
        offset = self.size
        if nbytes:
            self.segments.extend((offset, kind, source, nbytes))
            self.size += nbytes
        return offset

    def add_bytes(self, data: bytes | bytearray | memoryview) -> int:
        """Append inline bytes; return their file offset."""
        offset = self._append(SRC_BLOB, len(self.blob), len(data))
        self.blob += data
        return offset

    def add_tensor(self, tensor: torch.Tensor, device: int) -> int:
        """Append a dense tensor's memory (on CUDA ``device``, or the host for -1); its offset."""
        self.tensors.append(tensor)
        if device >= 0 and tensor.nbytes:
            self.device = device
        return self._append(SRC_HOST if device < 0 else SRC_DEVICE, tensor.data_ptr(), tensor.nbytes)

    def add_framed(self, frame: TensorFrame, tensor: torch.Tensor) -> _stock._StorageInfo:
        """Append a non-empty dense host tensor in its frame (what add_bytes, add_tensor, add_bytes
        and storage_info do, in one step); the item's storage info."""
        offset, at, nbytes = self.size, len(self.blob), tensor.nbytes
        header, trailer, payload_offset, length = frame
        self.tensors.append(tensor)
        payload = offset + len(header)
        self.segments.extend((offset, SRC_BLOB, at, len(header), payload, SRC_HOST, tensor.data_ptr(), nbytes,
                              payload + nbytes, SRC_BLOB, at + len(header), len(trailer)))
        self.blob += header
        self.blob += trailer
        self.size = offset + length
        return self.storage_info(offset, length, payload_offset)

    def write_file(self, crc_block: int = 0, stream: int = 0) -> WriteFile:
        """The engine's plan of this file (``stream``: the producer's, for device segments)."""
        return WriteFile(self.path, self.blob, self.segments, crc_block, self.device,
                         stream if self.device >= 0 else 0)


def lay_out(items: Sequence[WriteItem], resolve: Callable[[WriteItem], Any],
            directory: str | os.PathLike, prefix: str, tag: str, *, files: int, transforms: Any,
            cuda_usable: Callable[[], bool],
            laid_out: Callable[[FileLayout], None] | None = None) -> tuple[list[FileLayout], list[WriteResult]]:
    """Place one rank's ``items`` (their data from ``resolve``) in its data files.

    ``files``: that many files, items assigned as stock's single_file_per_rank
    does; 0: one file per item. ``transforms``: stock's stream transforms
    (items then framed by stock's code), or None. CUDA tensors are written
    from device memory when ``cuda_usable()`` (see :class:`_DeviceRoute`).
    ``laid_out(file)`` is called as each file is complete.
    """
    groups = _split_by_size_and_type(files, items) if files else [[item] for item in items]
    serialization_id = new_serialization_id()
    route = _DeviceRoute(cuda_usable)
    frames: dict[tuple, TensorFrame] = {}  # by (dtype, shape, item offset % PAYLOAD_ALIGN)
    layouts, results = [], []
    for n, group in enumerate(groups):
        # Stock's __{rank}_{n}.distcp with the save's tag: __{rank}_{n}.{tag}.distcp.
        fl = FileLayout(directory, f"{prefix}{n}{'.' + tag if tag else ''}{_stock.DEFAULT_SUFFIX}")
        layouts.append(fl)
        # Byte items first, then tensors: stock's order within a file.
        byte_items = [item for item in group if item.type is _BYTE_IO]
        for item in byte_items + [item for item in group if item.type is not _BYTE_IO] if byte_items else group:
            data = resolve(item)
            if transforms is not None:
                results.append(_add_transformed(fl, item, data, transforms))
            elif (type(data) is torch.Tensor and data.is_cpu and _device.cuda_index(data) < 0
                  and item.type is not _BYTE_IO
                  and data.layout is torch.strided and data.is_contiguous() and not data.is_quantized
                  and not data.is_conj() and not data.is_neg() and data.nbytes):
                # The common case, without _add_item's general route: a dense host tensor.
                key = (data.dtype, data.shape, fl.size % PAYLOAD_ALIGN)
                frame = frames.get(key)
                if frame is None:
                    frame = frames[key] = frame_tensor(data.dtype, data.shape, fl.size, serialization_id)
                results.append(WriteResult(item.index, frame.length, fl.add_framed(frame, data)))
            else:
                results.append(_add_item(fl, item, data, serialization_id, route))
        if laid_out is not None:
            laid_out(fl)
    return layouts, results


_BYTE_IO = WriteItemType.BYTE_IO


def _item_nbytes(item: WriteItem) -> int:
    return _nbytes(item.tensor_data.properties.dtype, item.tensor_data.size)


def _split_by_size_and_type(bins: int, items: Sequence[WriteItem]) -> list[list[WriteItem]]:
    """Stock's assignment of items to files: byte items round-robin, tensors greedily by size.

    Stock's own function sizes items with ``torch._utils._element_size``,
    which raises for some dtypes (``torch.bits8``).
    """
    if bins <= 1:
        return [list(items)]
    buckets: list[list[WriteItem]] = [[] for _ in range(bins)]
    for i, wi in enumerate(wi for wi in items if wi.type == WriteItemType.BYTE_IO):
        buckets[i % bins].append(wi)
    tensor_items = [wi for wi in items if wi.type != WriteItemType.BYTE_IO]
    nbytes = [_item_nbytes(wi) for wi in tensor_items]
    # Largest first (stable), each to the emptiest file, the lowest-numbered among equals.
    emptiest = [(0, idx) for idx in range(bins)]
    for k in sorted(range(len(tensor_items)), key=nbytes.__getitem__, reverse=True):
        size, idx = emptiest[0]
        buckets[idx].append(tensor_items[k])
        heapq.heapreplace(emptiest, (size + nbytes[k], idx))
    return buckets


class _DeviceRoute:
    """Which CUDA tensors of one save are written from device memory.

    All of them on one device (the first one met) when the engine can use the
    CUDA runtime: an engine call stages device bytes through one pinned pool,
    which belongs to one device. Tensors on other devices, and every CUDA
    tensor when the runtime is not usable, are copied to the host first.
    """

    def __init__(self, cuda_usable: Callable[[], bool]) -> None:
        self.cuda_usable = functools.cache(cuda_usable)  # asked once, at the first CUDA tensor
        self.device = -1

    def takes(self, tensor: torch.Tensor) -> bool:
        index = _device.cuda_index(tensor)
        if index < 0 or not self.cuda_usable():
            return False
        if self.device < 0:
            self.device = index
        return index == self.device


def _dense(tensor: torch.Tensor, on_device: bool) -> torch.Tensor | None:
    """The dense tensor whose memory is written as the payload, or None (framed by torch.save).

    Non-contiguous, expanded, conjugated and negated tensors are materialised
    (their logical values are saved, as stock does); device tensors are copied
    to the host unless ``on_device``. Sparse, quantized and subclassed tensors
    return None.
    """
    if type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
        return None
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_meta:
        return None
    tensor = tensor.detach()
    if tensor.device.type != "cpu" and not on_device:
        tensor = tensor.cpu()
    if tensor.is_conj():
        tensor = tensor.resolve_conj()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    return tensor.contiguous()


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A host tensor that ``torch.save`` writes alone (not with the rest of a larger storage)."""
    tensor = tensor.detach().cpu()
    return tensor.clone() if tensor.untyped_storage().size() != tensor.nbytes else tensor


def _add_item(fl: FileLayout, item: WriteItem, data: Any, serialization_id: bytes,
              route: _DeviceRoute) -> WriteResult:
    offset, payload_offset = fl.size, -1
    on_device = item.type != WriteItemType.BYTE_IO and route.takes(data)
    tensor = None if item.type == WriteItemType.BYTE_IO else _dense(data, on_device)
    if tensor is not None:
        frame = frame_tensor(tensor.dtype, tuple(tensor.shape), offset, serialization_id)
        fl.add_bytes(frame.header)
        fl.add_tensor(tensor, route.device if on_device else -1)
        fl.add_bytes(frame.trailer)
        payload_offset = frame.payload_offset
    elif item.type == WriteItemType.BYTE_IO:
        fl.add_bytes(data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(data))
    else:
        buf = io.BytesIO()
        torch.save(_host_copy(data), buf)
        fl.add_bytes(buf.getbuffer())
    info = fl.storage_info(offset, fl.size - offset, payload_offset)
    return WriteResult(index=item.index, size_in_bytes=info.length, storage_data=info)


def _add_transformed(fl: FileLayout, item: WriteItem, data: Any, transforms: Any) -> WriteResult:
    """An item through stock's stream transforms, framed by stock's own code."""
    if isinstance(data, torch.Tensor):
        data = _host_copy(data)
    buf = io.BytesIO()
    framed = _stock._write_item(
        transforms, buf, data, item, fl.relative_path, _stock.SerializationFormat.TORCH_SAVE
    )
    info = fl.storage_info(fl.add_bytes(buf.getbuffer()), framed.storage_data.length,
                           transform_descriptors=framed.storage_data.transform_descriptors)
    return WriteResult(index=item.index, size_in_bytes=framed.size_in_bytes, storage_data=info)
