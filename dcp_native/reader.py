"""FileSystemReader: DCP's StorageReader protocol over the engine.

Every tensor read becomes a strided copy of exactly the bytes it needs,
straight into the destination tensor, handed to the engine with all the other
reads of the same load (sorted, coalesced and spread over threads there).
Where a payload lies comes from dcp_native's sidecar, or for checkpoints
written by stock DCP from the item's own zip headers (two small probe reads
per item, no ``torch.load``). What a strided copy cannot do takes a buffered
path with bounded memory: a destination of another dtype or device (read,
then ``copy_`` with DCP's casting), element-wise layouts (read the covering
range, then ``copy_``), stream transforms and exotic payloads (read the item,
then stock's decoding).
"""

from __future__ import annotations

import ctypes
import dataclasses
import io
import os
import pickle
from typing import Any, Callable, Sequence

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import filesystem as _stock
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from . import _device, _fileio, _safe_pickle, integrity, layout, sidecar
from ._backend import get_engine
from ._errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    IntegrityError,
    TruncatedFileError,
)
from .engine import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_GAP, DEFAULT_STAGING_BYTES, ReadFile, ReadStats
from .plan import Box, encode_boxes, read_box

_METADATA_NAME = ".metadata"
#: A box whose runs are shorter than this, with more runs than _MANY_RUNS, is read
#: as its covering range and scattered by torch (cheaper than one iovec per element).
_SHORT_RUN = 512
_MANY_RUNS = 64


def default_thread_count() -> int:
    return min(16, max(4, os.cpu_count() or 1))


@dataclasses.dataclass
class _Buffered:
    """A read into temporary memory followed by a step on the CPU."""

    relative_path: str
    file_offset: int
    nbytes: int
    finish: Callable[[memoryview], None]
    key: str


def _bytearray_address(buf: bytearray) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf)) if len(buf) else 0


class FileSystemReader(_stock.FileSystemReader):
    """Drop-in ``torch.distributed.checkpoint.FileSystemReader`` with a faster engine.

    Loads checkpoints written by dcp_native and by stock DCP.

    Args:
        path: the checkpoint directory.
        _extension_registry: stream transform registry (as stock).
        thread_count: I/O threads (default: CPU count clamped to 4..16).
        max_gap: largest gap between two needed byte ranges that one read may cover.
        chunk_bytes: most bytes one read call moves; the unit of work of the threads.
        memory_budget: bytes of temporary buffers a load may hold at once (the
            buffered paths; fast-path reads need none).
        verify: check every byte the load returns against the CRC32C tables
            the writer recorded (4 KiB blocks), raising IntegrityError (key,
            file, offset) on a mismatch, and IntegrityError saying why before
            anything is read when some bytes cannot be checked (no tables:
            written by stock DCP or with ``checksums=False``; sidecar missing,
            damaged or another save's; a table damaged).
        allow_pickle: load saved objects (non-tensor entries) however their
            pickles say, running whatever code they name. Off by default:
            objects load only as ``torch.load(weights_only=True)`` allows
            (plus what ``torch.serialization.add_safe_globals`` adds) and
            anything else raises :class:`~dcp_native.RefusedObjectError`.
            Turn it on only for checkpoints you trust.
        staging_bytes: pinned host memory for loads into CUDA tensors (per
            device; allocated on first use, reused by later loads, freed by
            :meth:`close`).
        direct_io: let the engine read pinned staging buffers with O_DIRECT
            where the filesystem allows it (silently buffered elsewhere).

    Example:
        >>> import tempfile, torch, torch.distributed.checkpoint as dcp, dcp_native
        >>> path = tempfile.mkdtemp()
        >>> _ = dcp.save({"w": torch.ones(3)}, storage_writer=dcp_native.FileSystemWriter(path), no_dist=True)
        >>> out = {"w": torch.zeros(3)}
        >>> dcp.load(out, storage_reader=dcp_native.FileSystemReader(path, thread_count=2), no_dist=True)
        >>> out["w"].tolist()
        [1.0, 1.0, 1.0]
    """

    def __init__(
        self,
        path: str | os.PathLike,
        _extension_registry: Any = None,
        *,
        thread_count: int | None = None,
        max_gap: int = DEFAULT_MAX_GAP,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        memory_budget: int = 32 << 20,
        verify: bool = False,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        direct_io: bool = True,
        allow_pickle: bool = False,
    ) -> None:
        super().__init__(path, _extension_registry=_extension_registry)
        self.thread_count = default_thread_count() if thread_count is None else int(thread_count)
        if self.thread_count < 1:
            raise ValueError(f"thread_count must be at least 1, got {thread_count}")
        if max_gap < 0 or chunk_bytes < 4096 or memory_budget < 1:
            raise ValueError("max_gap must be >= 0, chunk_bytes >= 4096, memory_budget >= 1")
        self.max_gap = max_gap
        self.chunk_bytes = chunk_bytes
        self.memory_budget = memory_budget
        #: Check every block read against the checksums the writer recorded. Off
        #: by default: it costs about +80% on a load from the page cache here
        #: (CRC32C over every byte read); `dcp-native verify` checks a whole
        #: checkpoint out of band.
        self.verify = bool(verify)
        if staging_bytes < 2 * 4096:
            raise ValueError(f"staging_bytes must be at least 8192, got {staging_bytes}")
        self.staging_bytes = int(staging_bytes)
        self.direct_io = bool(direct_io)
        self.allow_pickle = bool(allow_pickle)
        #: (engine, CUDA device) -> pinned staging pool, created by the first load into the device.
        self._pools: dict[tuple[str, int], Any] = {}
        #: The sidecar of the metadata read last (whether it is usable, and why not).
        self._sidecar = sidecar.Sidecar("absent", "no metadata read yet")
        self._metadata: Metadata | None = None
        self._missing_metadata: CheckpointError | None = None
        #: Statistics of the last read_data call (bytes read, calls).
        self.last_read_stats = ReadStats()

    def staging_pool(self, engine: Any, device: int) -> Any:
        """The pinned pool of ``device`` for ``engine``, created on first use."""
        key = (engine.name, device)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = engine.pinned_pool(device, self.staging_bytes)
        return pool

    @property
    def staging_bytes_held(self) -> int:
        """Pinned bytes this reader holds now (0 before the first CUDA load and after close)."""
        return sum(pool.bytes_held for pool in self._pools.values())

    def close(self) -> None:
        """Release the pinned staging memory (idempotent; a later load allocates it again)."""
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pools"] = {}  # pinned memory belongs to this process
        return state

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        super().reset(checkpoint_id)
        self._sidecar = sidecar.Sidecar("absent", "no metadata read yet")
        self._metadata = None

    # ------------------------------------------------------------------ metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = _METADATA_NAME if rank is None else f"__{rank}{_METADATA_NAME}"
        path = os.path.join(self.path, name)
        try:
            raw = _fileio.read_regular(path, None, what="metadata")
            metadata = _safe_pickle.load_metadata(io.BytesIO(raw), path)
        except FileNotFoundError:
            if not os.path.isdir(self.path):
                err: CheckpointError = IncompleteCheckpointError(
                    f"{self.path} holds no checkpoint: the directory does not exist",
                    filename=str(self.path),
                )
            else:
                err = IncompleteCheckpointError(
                    f"{self.path} holds no complete checkpoint: {_METADATA_NAME} is missing "
                    "(it is written last, when every rank has finished its data files)",
                    filename=os.path.join(self.path, _METADATA_NAME),
                )
            if rank is not None and self._missing_metadata is not None:
                # The global metadata exists but was refused: that is the error to report.
                err = self._missing_metadata
            elif rank is None or os.path.lexists(os.path.join(self.path, _METADATA_NAME)):
                raise err from None
            # DCP asks for the global metadata, then for this rank's, and when both
            # fail it discards both errors ("metadata is None"). Hand it an empty
            # placeholder instead, so that set_up_storage_reader raises the real error.
            self._missing_metadata = err
            return Metadata(state_dict_metadata={})
        except CheckpointError as exc:
            if rank is None:
                self._missing_metadata = exc  # DCP may swallow it and ask for __{rank}.metadata
            raise
        self._missing_metadata = None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        self._sidecar = sidecar.read(str(self.path), name, metadata, raw)
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        missing, self._missing_metadata = self._missing_metadata, None
        if missing is not None:
            raise missing
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        _validate_storage_data(str(self.path), self.storage_data)
        self._metadata = metadata

    # ------------------------------------------------------------------ reading

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        run = _ReadRun(self, planner)
        run.execute(plan.items)
        self.last_read_stats = run.stats
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut


_TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")


def _unpickles(planner: LoadPlanner, data: bytes) -> bool:
    """Whether ``planner.load_bytes`` will unpickle ``data``: stock's does, and any bytes that
    look like ``torch.save`` output (a zip archive, a pickle) are assumed to be."""
    stock = getattr(type(planner), "load_bytes", None) is DefaultLoadPlanner.load_bytes
    return stock or data.startswith(_TORCH_SAVE_MAGIC)


def _validate_storage_data(directory: str, storage_data: Any) -> None:
    """Refuse item locations that leave the directory or cannot be file ranges.

    Every path must be a plain relative path inside the checkpoint directory
    (no ``..``, not absolute, no NUL, no symlink that leads out), and every
    offset and length non-negative integers whose sum fits in 63 bits.
    """
    if not isinstance(storage_data, dict):
        raise CorruptCheckpointError(
            f"{directory}: the metadata's storage_data is a {type(storage_data).__name__}, not a dict",
            filename=directory,
        )
    root = os.path.realpath(directory)
    checked: set[str] = set()
    for index, info in storage_data.items():
        key = getattr(index, "fqn", str(index))
        rel = getattr(info, "relative_path", None)
        offset = getattr(info, "offset", None)
        length = getattr(info, "length", None)
        if rel not in checked:
            _check_relative_path(directory, root, rel, key)
            checked.add(rel)
        if (
            not isinstance(offset, int)
            or not isinstance(length, int)
            or offset < 0
            or length < 0
            or offset + length >= 1 << 63
        ):
            raise CorruptCheckpointError(
                f"{directory}: item {key!r} in {rel} has offset {offset!r} and length {length!r}, "
                "which are not a valid file range",
                filename=os.path.join(directory, rel),
                key=key,
            )


def _check_relative_path(directory: str, root: str, rel: Any, key: str) -> None:
    def refuse(why: str) -> None:
        named = isinstance(rel, str) and rel and "\0" not in rel and not os.path.isabs(rel)
        raise CorruptCheckpointError(
            f"{directory}: item {key!r} names the data file {rel!r}, which {why}; refusing to read it",
            filename=os.path.join(directory, rel) if named else directory,
            key=key,
        )

    if not isinstance(rel, str) or not rel:
        refuse("is not a file name")
    if "\0" in rel:
        refuse("contains a NUL byte")
    if os.path.isabs(rel):
        refuse("is an absolute path")
    if any(part == ".." for part in rel.replace("\\", "/").split("/")):
        refuse("leaves the checkpoint directory through '..'")
    resolved = os.path.realpath(os.path.join(directory, rel))
    if os.path.commonpath([root, resolved]) != root or resolved == root:
        refuse("resolves (through a symbolic link) outside the checkpoint directory")


class _ReadRun:
    """One read_data call: classifies items, probes stock items, runs the engine in rounds."""

    def __init__(self, reader: FileSystemReader, planner: LoadPlanner) -> None:
        self.reader = reader
        self.planner = planner
        self.engine = get_engine()
        self.storage_data = reader.storage_data
        self.state_md = reader._metadata.state_dict_metadata if reader._metadata else {}
        self.min_sizes: dict[str, int] = {}
        self.stats = ReadStats()
        self._chunks: dict[str, dict[tuple, Any]] = {}
        #: data file -> its checksum table window, for the files this read verifies
        self.tables: dict[str, integrity.Table] = {}
        #: (data file, CUDA device) -> boxes whose destinations are device memory
        self.device_direct: dict[tuple[str, int], list[Box]] = {}
        self._cuda_usable: bool | None = None

    # -------------------------------------------------------------- helpers

    def _path(self, rel: str) -> str:
        return os.path.join(self.reader.path, rel)

    def _info(self, req: ReadItem) -> _stock._StorageInfo:
        return self.storage_data[req.storage_index]

    def _chunk_size(self, req: ReadItem) -> tuple[torch.dtype, tuple[int, ...]]:
        index = req.storage_index
        md = self.state_md[index.fqn]
        chunks = self._chunks.get(index.fqn)
        if chunks is None:
            chunks = {tuple(c.offsets): c for c in md.chunks}
            self._chunks[index.fqn] = chunks
        chunk = chunks[tuple(index.offset)]
        return md.properties.dtype, tuple(chunk.sizes)

    def _run_engine(
        self,
        boxes_by_file: dict[str, list[Box]],
        device_boxes: dict[tuple[str, int], list[Box]] | None = None,
    ) -> None:
        files = []
        checks: list[tuple[str, integrity.CheckPlan | None]] = []
        for rel, boxes in boxes_by_file.items():
            if not boxes:
                continue
            table = self.tables.get(rel)
            plan = None
            if table is not None:
                plan = integrity.CheckPlan(table)
                for box in boxes:
                    for f, d in box.runs_iter():
                        plan.add_run(f, d, box.inner_bytes, box.key)
                plan.finish()
                boxes = boxes + plan.gap_boxes
            rf = ReadFile(self._path(rel), self.min_sizes.get(rel, 0), encode_boxes(boxes))
            if plan is not None:
                rf.checks = plan.records
            files.append(rf)
            checks.append((rel, plan))
        by_device: dict[int, list[ReadFile]] = {}
        for (rel, device), boxes in (device_boxes or {}).items():
            if boxes:
                rf = ReadFile(
                    self._path(rel),
                    self.min_sizes.get(rel, 0),
                    encode_boxes(boxes),
                    device=device,
                    stream=_device.current_stream(device),
                )
                by_device.setdefault(device, []).append(rf)
        if not files and not by_device:
            return
        failed = self._engine_read(files)
        # Loads into CUDA memory: one engine call per device (a pool serves one device).
        for device, device_files in by_device.items():
            self._engine_read(device_files, device)
        for file_index, record in failed:
            rel, plan = checks[file_index]
            offset = plan.block_offsets[record]
            key = plan.owner(record)
            raise IntegrityError(
                f"{self._path(rel)}: checksum mismatch in the {plan.table.block}-byte block at "
                f"offset {offset}" + (f", read for {key!r}" if key else "")
                + ": the data on disk is not what was written",
                filename=self._path(rel),
                key=key,
                offset=offset,
            )

    def _engine_read(self, files: list[ReadFile], device: int = -1) -> list[tuple[int, int]]:
        """One engine call; returns its failed checks."""
        if not files:
            return []
        kwargs: dict[str, Any] = {}
        if device >= 0:
            kwargs = {"pool": self.reader.staging_pool(self.engine, device), "direct_io": self.reader.direct_io}
        try:
            stats = self.engine.read(
                files,
                threads=self.reader.thread_count,
                max_gap=self.reader.max_gap,
                chunk_bytes=self.reader.chunk_bytes,
                **kwargs,
            )
        except TruncatedFileError as exc:
            raise self._explain_truncation(exc) from None
        self.stats.bytes_read += stats.bytes_read
        self.stats.calls += stats.calls
        return list(getattr(stats, "failed_checks", ()) or ())

    def _explain_truncation(self, exc: TruncatedFileError) -> TruncatedFileError:
        for rel, reqs in self._reqs_by_file.items():
            if os.path.abspath(self._path(rel)) != os.path.abspath(exc.filename):
                continue
            for req in reqs:
                info = self._info(req)
                if info.offset + info.length > exc.actual:
                    return TruncatedFileError(
                        exc.filename,
                        max(exc.expected, info.offset + info.length),
                        exc.actual,
                        key=req.storage_index.fqn,
                        offset=info.offset,
                    )
        return exc

    # -------------------------------------------------------------- main flow

    def execute(self, items: Sequence[ReadItem]) -> None:
        self._reqs_by_file: dict[str, list[ReadItem]] = {}
        for req in items:
            info = self._info(req)
            self._reqs_by_file.setdefault(info.relative_path, []).append(req)
            end = info.offset + info.length
            if end > self.min_sizes.get(info.relative_path, 0):
                self.min_sizes[info.relative_path] = end

        # Sizes are checked before anything is allocated or read: a metadata
        # file declaring absurd items fails here, naming file and item. Only
        # regular files are read (stat never blocks; a FIFO would block open).
        sizes: dict[str, int] = {}
        for rel, needed in self.min_sizes.items():
            path = self._path(rel)
            try:
                actual = sizes[rel] = _fileio.check_regular(path, "data file").st_size
            except CorruptCheckpointError as exc:
                key = self._reqs_by_file[rel][0].storage_index.fqn
                raise CorruptCheckpointError(
                    f"{exc} (it holds {key!r})", filename=path, key=key
                ) from None
            if actual < needed:
                raise self._explain_truncation(TruncatedFileError(path, needed, actual))
        if self.reader.verify:
            self._load_tables(sizes)

        direct: dict[str, list[Box]] = {}
        commits: list[tuple[ReadItem, torch.Tensor]] = []
        buffered: list[_Buffered] = []
        unknown: list[ReadItem] = []
        side = self.reader._sidecar
        entries = side.entries if side.usable else {}

        for req in items:
            info = self._info(req)
            if req.type == LoadItemType.BYTE_IO:
                buffered.append(self._bytes_op(req, info))
                continue
            if info.transform_descriptors:
                buffered.append(self._whole_item_op(req, info))
                continue
            entry = entries.get(info.relative_path, {}).get(info.offset)
            if entry is None:
                unknown.append(req)
                continue
            dtype, size = self._chunk_size(req)
            payload_rel = self._check_entry(req, info, entry, dtype, size)
            saved = layout.SavedTensor(dtype, size, layout.contiguous_stride(size), 0)
            self._plan_tensor(req, info, saved, info.offset + payload_rel, direct, commits, buffered)

        if unknown:
            self._probe(unknown, direct, commits, buffered)

        self._execute_rounds(direct, buffered)
        for req, target in commits:
            self.planner.commit_tensor(req, target)

    def _check_entry(
        self, req: ReadItem, info: _stock._StorageInfo, entry: tuple[int, int], dtype, size
    ) -> int:
        """The payload offset a sidecar entry gives, once it agrees with the metadata and framing.

        dcp_native aligns a payload in the file and follows it with a trailer
        whose length depends only on where the payload ends, so in an item of
        the metadata's length one payload offset fits: an entry that says
        otherwise (shifted, negative, past the end) is refused before anything
        is allocated or read.
        """
        length, payload_rel = entry
        nbytes = dtype.itemsize
        for s in size:
            nbytes *= s
        fits = (
            length == info.length
            and (info.offset + payload_rel) % layout.payload_alignment(nbytes) == 0
            and payload_rel + nbytes + layout.trailer_length(info.offset, payload_rel, nbytes)
            == info.length
        )
        if not fits:
            raise CorruptCheckpointError(
                f"{info.relative_path}: the sidecar's entry for {req.storage_index.fqn!r} at offset "
                f"{info.offset} (item {length} bytes, payload at {payload_rel}) does not match the "
                f"metadata's {dtype} tensor of size {list(size)} in an item of {info.length} bytes",
                filename=self._path(info.relative_path),
                key=req.storage_index.fqn,
                offset=info.offset,
            )
        return payload_rel

    def _load_tables(self, sizes: dict[str, int]) -> None:
        """The checksum table of every data file this read touches; IntegrityError if one is lacking."""
        side = self.reader._sidecar
        root = os.path.realpath(self.reader.path)
        for rel, reqs in self._reqs_by_file.items():
            path = self._path(rel)
            table = side.tables.get(rel) if side.usable else None
            if table is None:
                key = reqs[0].storage_index.fqn
                why = side.reason if not side.usable else (
                    f"the save wrote no checksum table for {rel} (written with "
                    "checksums=False, or by the Python engine, which writes none by default)"
                )
                raise IntegrityError(
                    f"verify=True, but {key!r} in {path} cannot be verified: {why}",
                    filename=path,
                    key=key,
                )
            _check_relative_path(str(self.reader.path), root, table.file, reqs[0].storage_index.fqn)
            self.tables[rel] = integrity.load_table(self._path(table.file), table, path, sizes[rel])
            self.stats.bytes_read += table.size
            self.stats.calls += 1

    def _execute_rounds(self, direct: dict[str, list[Box]], buffered: list[_Buffered]) -> None:
        """Direct copies go with the first round; buffered ones in rounds within the budget."""
        budget = self.reader.memory_budget
        pending = sorted(buffered, key=lambda b: (b.relative_path, b.file_offset))
        first = True
        i = 0
        while first or i < len(pending):
            boxes: dict[str, list[Box]] = {}
            if first:
                for rel, bx in direct.items():
                    boxes.setdefault(rel, []).extend(bx)
            used = 0
            batch: list[tuple[_Buffered, bytearray]] = []
            while i < len(pending) and (not batch or used + pending[i].nbytes <= budget):
                op = pending[i]
                buf = bytearray(op.nbytes)
                batch.append((op, buf))
                if op.nbytes:
                    boxes.setdefault(op.relative_path, []).append(
                        Box(op.file_offset, _bytearray_address(buf), op.nbytes, key=op.key)
                    )
                used += op.nbytes
                i += 1
            self._run_engine(boxes, self.device_direct if first else None)
            for op, buf in batch:
                try:
                    op.finish(memoryview(buf))
                except CheckpointError:
                    raise
                except (RuntimeError, ValueError, pickle.UnpicklingError, EOFError) as exc:
                    raise CorruptCheckpointError(
                        f"{op.relative_path}: item {op.key!r} at offset {op.file_offset} "
                        f"cannot be decoded: {exc}",
                        filename=self._path(op.relative_path),
                        key=op.key,
                        offset=op.file_offset,
                    ) from exc
            first = False

    # -------------------------------------------------------------- tensor items

    def _target(self, req: ReadItem) -> torch.Tensor:
        target = self.planner.resolve_tensor(req).detach()
        if tuple(target.shape) != tuple(req.lengths):
            raise RuntimeError(
                f"{req.dest_index.fqn}: the planner resolved a destination of size "
                f"{tuple(target.shape)} for a read of size {tuple(req.lengths)}"
            )
        return target

    def _plan_tensor(
        self,
        req: ReadItem,
        info: _stock._StorageInfo,
        saved: layout.SavedTensor,
        payload_file_offset: int,
        direct: dict[str, list[Box]],
        commits: list[tuple[ReadItem, torch.Tensor]],
        buffered: list[_Buffered],
    ) -> None:
        fqn = req.storage_index.fqn
        for o, n, s in zip(req.storage_offsets, req.lengths, saved.size):
            if o < 0 or n < 0 or o + n > s:
                raise CorruptCheckpointError(
                    f"{info.relative_path}: read of {fqn!r} at offsets {list(req.storage_offsets)} "
                    f"lengths {list(req.lengths)} exceeds the saved chunk of size {list(saved.size)}",
                    filename=self._path(info.relative_path),
                    key=fqn,
                    offset=info.offset,
                )
        if len(req.lengths) != len(saved.size):
            raise CorruptCheckpointError(
                f"{info.relative_path}: {fqn!r} is saved with {len(saved.size)} dimensions, "
                f"the read asks for {len(req.lengths)}",
                filename=self._path(info.relative_path),
                key=fqn,
                offset=info.offset,
            )
        target = self._target(req)
        itemsize = saved.dtype.itemsize
        device = _device.cuda_index(target)
        fast = (
            target.dtype == saved.dtype
            and target.layout == torch.strided
            and not target.is_quantized
            and type(target) is torch.Tensor
            and (self._device_fast(info.relative_path) if device >= 0 else target.device.type == "cpu")
        )
        if fast:
            box = read_box(
                payload_file_offset, itemsize, saved.stride, saved.storage_offset,
                req.storage_offsets, req.lengths, target.data_ptr(), target.stride(),
            )
            if box is None:
                commits.append((req, target))
                return
            overlapping = any(s == 0 for s in box.dest_strides)
            if not overlapping and not (box.inner_bytes < _SHORT_RUN and box.runs > _MANY_RUNS):
                box = dataclasses.replace(box, key=fqn)
                if device < 0:
                    direct.setdefault(info.relative_path, []).append(box)
                else:
                    self.device_direct.setdefault((info.relative_path, device), []).append(box)
                commits.append((req, target))
                return
        # Buffered: read the covering byte range of the box, let torch scatter/cast.
        box = read_box(
            payload_file_offset, itemsize, saved.stride, saved.storage_offset,
            req.storage_offsets, req.lengths, 0, [0] * len(req.lengths),
        )
        if box is None:
            self.planner.commit_tensor(req, target)
            return
        lo, hi = box.file_span
        lengths = tuple(req.lengths)

        def finish(buf: memoryview, target=target, req=req) -> None:
            raw = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
            src = raw.view(saved.dtype).as_strided(lengths, saved.stride, 0)
            target.copy_(src)
            self.planner.commit_tensor(req, target)

        buffered.append(_Buffered(info.relative_path, lo, hi - lo, finish, fqn))

    def _device_fast(self, rel: str) -> bool:
        """Whether the engine reads straight into CUDA destinations (through pinned staging).

        Not when the load verifies this file: checksums are computed on host
        memory, so such items are read into a host buffer, checked, then copied.
        """
        if self.reader.verify:
            return False
        if self._cuda_usable is None:
            status = getattr(self.engine, "cuda_status", None)
            self._cuda_usable = bool(status is not None and status().usable)
        return self._cuda_usable

    # -------------------------------------------------------------- bytes / whole items

    def _transform(self, req: ReadItem, info: _stock._StorageInfo, raw: memoryview) -> io.IOBase:
        stream: Any = io.BytesIO(raw)
        if info.transform_descriptors:
            stream = self.reader.transforms.transform_load_stream(
                req, info.transform_descriptors, stream
            )
        return stream

    def _bytes_op(self, req: ReadItem, info: _stock._StorageInfo) -> _Buffered:
        check = not self.reader.allow_pickle

        def finish(buf: memoryview) -> None:
            data = self._transform(req, info, buf).read(-1) if info.transform_descriptors else bytes(buf)
            if check and _unpickles(self.planner, data):
                # The planner would torch.load(weights_only=False) these bytes:
                # first make sure that would import nothing weights_only refuses.
                _safe_pickle.check_object(
                    data, key=req.storage_index.fqn, filename=self._path(info.relative_path),
                    offset=info.offset,
                )
            self.planner.load_bytes(req, io.BytesIO(data))

        return _Buffered(info.relative_path, info.offset, info.length, finish, req.storage_index.fqn)

    def _whole_item_op(self, req: ReadItem, info: _stock._StorageInfo) -> _Buffered:
        """Stock's decoding: transforms, torch.load, narrow, copy."""

        def finish(buf: memoryview) -> None:
            stream = self._transform(req, info, buf)
            if not stream.seekable():
                stream = io.BytesIO(stream.read(-1))
            tensor = torch.load(stream, map_location="cpu", weights_only=True)
            tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
            target = self._target(req)
            target.copy_(tensor)
            self.planner.commit_tensor(req, target)

        return _Buffered(info.relative_path, info.offset, info.length, finish, req.storage_index.fqn)

    # -------------------------------------------------------------- stock items

    def _probe(
        self,
        reqs: list[ReadItem],
        direct: dict[str, list[Box]],
        commits: list[tuple[ReadItem, torch.Tensor]],
        buffered: list[_Buffered],
    ) -> None:
        """Locate payloads of items without sidecar entries from their zip headers."""
        probe = layout.PROBE_BYTES
        # Several reads may share one saved item (resharding): probe each item once.
        by_item: dict[tuple[str, int], list[ReadItem]] = {}
        for req in reqs:
            info = self._info(req)
            by_item.setdefault((info.relative_path, info.offset), []).append(req)
        keys = list(by_item)
        per_round = max(1, self.reader.memory_budget // (2 * probe))
        for start in range(0, len(keys), per_round):
            round_keys = keys[start : start + per_round]
            boxes: dict[str, list[Box]] = {}
            bufs = []
            for key in round_keys:
                info = self._info(by_item[key][0])
                if info.length <= 2 * probe:
                    head = bytearray(info.length)
                    tail = head
                    spans = [(info.offset, head)]
                else:
                    head, tail = bytearray(probe), bytearray(probe)
                    spans = [(info.offset, head), (info.offset + info.length - probe, tail)]
                for off, buf in spans:
                    if len(buf):
                        boxes.setdefault(info.relative_path, []).append(
                            Box(off, _bytearray_address(buf), len(buf))
                        )
                bufs.append((key, info, head, tail))
            self._run_engine(boxes)
            for key, info, head, tail in bufs:
                located = self._locate(info, bytes(head), bytes(tail))
                for req in by_item[key]:
                    if located is None:
                        buffered.append(self._whole_item_op(req, info))
                    else:
                        saved, payload_rel = located
                        self._check_against_metadata(req, info, saved)
                        self._plan_tensor(
                            req, info, saved, info.offset + payload_rel, direct, commits, buffered
                        )

    def _locate(
        self, info: _stock._StorageInfo, head: bytes, tail: bytes
    ) -> tuple[layout.SavedTensor, int] | None:
        """(layout, payload offset in item) from probe bytes, or None to use torch.load."""
        try:
            index = layout.parse_archive_tail(tail, info.length)
            pkl_offset, pkl_size = index.records["data.pkl"]
            data_header, data_size = index.records["data/0"]
            pkl_data = layout.local_data_offset(head[pkl_offset:], pkl_offset)
            if pkl_data + pkl_size > len(head) or data_header + 30 > len(head):
                return None
            saved = layout.parse_tensor_pickle(head[pkl_data : pkl_data + pkl_size])
            payload_rel = layout.local_data_offset(head[data_header:], data_header)
        except (layout.ArchiveError, layout.UnsupportedLayout, KeyError):
            return None
        if saved.storage_nbytes is not None and saved.storage_nbytes != data_size:
            return None
        if payload_rel + data_size > info.length:
            return None
        # Every element the layout names must lie inside the stored storage.
        if any(s == 0 for s in saved.size):
            return saved, payload_rel
        last = saved.storage_offset + sum((n - 1) * st for n, st in zip(saved.size, saved.stride))
        if (last + 1) * saved.dtype.itemsize > data_size:
            return None
        return saved, payload_rel

    def _check_against_metadata(
        self, req: ReadItem, info: _stock._StorageInfo, saved: layout.SavedTensor
    ) -> None:
        dtype, size = self._chunk_size(req)
        if saved.dtype != dtype or tuple(saved.size) != size:
            raise CorruptCheckpointError(
                f"{info.relative_path}: item {req.storage_index.fqn!r} at offset {info.offset} "
                f"holds a {saved.dtype} tensor of size {list(saved.size)}, the metadata declares "
                f"{dtype} of size {list(size)}",
                filename=self._path(info.relative_path),
                key=req.storage_index.fqn,
                offset=info.offset,
            )
