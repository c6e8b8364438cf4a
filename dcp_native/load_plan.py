"""Load planning: one ``read_data`` call's ReadItems -> engine reads -> tensors handed back to DCP.

Every tensor read becomes a strided copy of exactly the bytes it needs, straight into the
destination (:func:`dcp_native.plan.read_box`), its payload located by the checkpoint model (a
checked sidecar entry, or for stock checkpoints the item's own zip headers: two small probe reads,
no ``torch.load``). Narrow rows into CUDA memory (column shards, column views) are read densely
instead: the covering file range into scratch on the device, then scattered there by torch. What
a strided copy cannot do takes a buffered path with bounded memory: other dtypes or devices and
element-wise layouts (read the covering range, then ``copy_`` with DCP's casting), stream
transforms and exotic payloads (read the item, then stock's decoding).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import pickle
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import filesystem as _stock
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlanner, ReadItem

from . import _device, _fileio, _safe_pickle, checkpoint, integrity, layout
from ._backend import get_engine
from ._errors import CheckpointError, CorruptCheckpointError, IntegrityError, TruncatedFileError
from .checkpoint import ArchiveError, FileRead, UnsupportedLayout
from .engine import ReadStats
from .plan import Box, read_box

#: A box whose runs are shorter than this, with more runs than _MANY_RUNS, is read
#: as its covering range and scattered by torch (cheaper than one iovec per element).
_SHORT_RUN = 512
_MANY_RUNS = 64
#: A box into CUDA memory whose runs are shorter than this (more than one run) is read densely:
#: its covering file range into scratch on the target's device (one dense H2D copy per pinned
#: buffer), then scattered there by torch, since the narrow cudaMemcpy2DAsync copies it would
#: otherwise take run far below PCIe speed. A first estimate, to be tuned on a GPU with
#: benchmarks/narrow_columns.py.
_NARROW_DEVICE_ROW = 1024
#: ... when the covering range is at most this many times the bytes needed (a column of wide
#: saved rows keeps its strided copies: the bytes between its runs would cross PCIe for nothing) ...
_NARROW_MAX_AMPLIFICATION = 8
#: ... and at most this or the reader's memory_budget, whichever is smaller: the device scratch
#: one engine call holds (dense reads go in rounds within it).
_NARROW_MAX_SCRATCH = 64 << 20
_TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")


_contiguous_stride = functools.lru_cache(maxsize=4096)(layout.contiguous_stride)


class Located(NamedTuple):
    """Where a tensor read's saved chunk lies: its layout and its payload's file offset (and the
    read's storage info)."""

    saved: _safe_pickle.SavedTensor
    payload: int
    info: Any = None


@dataclasses.dataclass
class _Buffered:
    """A read into temporary memory followed by a step on the CPU."""

    relative_path: str
    file_offset: int
    nbytes: int
    finish: Callable[[memoryview], None]
    key: str


@dataclasses.dataclass
class _Dense:
    """A narrow read into CUDA memory: the file range ``[lo, hi)`` covering the box, read into
    scratch on the target's device, then scattered into the target by torch on the device."""

    relative_path: str
    device: int
    file_span: tuple[int, int]
    key: str
    target: torch.Tensor
    saved: _safe_pickle.SavedTensor
    lengths: tuple[int, ...]


def _saved_view(raw: torch.Tensor, saved: _safe_pickle.SavedTensor, lengths: tuple[int, ...]) -> torch.Tensor:
    """The read's elements in ``raw``, the bytes of the file range covering its box."""
    return raw.view(saved.dtype).as_strided(lengths, saved.stride, 0)


class LoadRun:
    """One read_data call for ``planner`` of ``reader`` (a :class:`dcp_native.FileSystemReader`:
    its settings, transforms and staging pools), on checkpoint ``ck`` (None: no metadata read
    here, so no sidecar) with the metadata DCP set the reader up with."""

    def __init__(self, reader: Any, planner: LoadPlanner, ck: checkpoint.Checkpoint | None,
                 metadata: Any) -> None:
        self.reader = reader
        self.planner = planner
        self.engine = get_engine()
        self.ck = ck
        self.storage_data = reader.storage_data
        self.state_md = metadata.state_dict_metadata if metadata is not None else {}
        self.min_sizes: dict[str, int] = {}
        self.stats = ReadStats()
        self._chunks: dict[str, dict[tuple, tuple[int, ...]]] = {}
        #: data file -> its checksum table, for the files this read verifies
        self.tables: dict[str, integrity.Table] = {}
        #: Reads straight into destinations: data file -> boxes into host memory,
        #: (data file, CUDA device) -> boxes into device memory; then the tensors to commit.
        self.direct: dict[str, list[Box]] = {}
        self.device_direct: dict[tuple[str, int], list[Box]] = {}
        self.commits: list[tuple[ReadItem, torch.Tensor]] = []
        self.buffered: list[_Buffered] = []
        self.dense: list[_Dense] = []
        self._reqs_by_file: dict[str, list[ReadItem]] = {}

    # -------------------------------------------------------------- helpers

    def _path(self, rel: str) -> str:
        return os.path.join(self.reader.path, rel)

    def _info(self, req: ReadItem) -> _stock._StorageInfo:
        return self.storage_data[req.storage_index]

    def _chunk_size(self, req: ReadItem) -> tuple[torch.dtype, tuple[int, ...]]:
        index, md = req.storage_index, self.state_md[req.storage_index.fqn]
        chunks = self._chunks.get(index.fqn)
        if chunks is None:
            chunks = self._chunks[index.fqn] = {tuple(c.offsets): tuple(c.sizes) for c in md.chunks}
        return md.properties.dtype, chunks[index.offset]  # torch.Size hashes and compares as a tuple

    def _corrupt(self, rel: str, key: str, offset: int, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{rel}: item {key!r} at offset {offset} {why}", filename=self._path(rel), key=key, offset=offset
        )

    def _bad_item(self, req: ReadItem, info: Any, why: str) -> CorruptCheckpointError:
        return self._corrupt(info.relative_path, req.storage_index.fqn, info.offset, why)

    # -------------------------------------------------------------- engine calls

    def _run_engine(
        self,
        boxes_by_file: dict[str, list[Box]],
        device_boxes: dict[tuple[str, int], list[Box]] | None = None,
    ) -> None:
        """Host reads in one engine call, reads into CUDA memory in one per device (a pool
        serves one device); blocks checked against the tables of verified files."""
        calls: dict[int, list[FileRead]] = {}
        for (rel, device), boxes in [*(((rel, -1), bx) for rel, bx in boxes_by_file.items()),
                                     *(device_boxes or {}).items()]:
            if boxes:
                calls.setdefault(device, []).append(FileRead(
                    self._path(rel), self.min_sizes.get(rel, 0), boxes, self.tables.get(rel),
                    device=device, stream=_device.current_stream(device) if device >= 0 else 0,
                ))
        for device, reads in calls.items():
            staging = ({"pool": self.reader.staging_pool(self.engine, device), "direct_io": self.reader.direct_io}
                       if device >= 0 else {})
            try:
                stats, failed = checkpoint.checked_read(
                    self.engine, reads, threads=self.reader.thread_count, max_gap=self.reader.max_gap,
                    chunk_bytes=self.reader.chunk_bytes, **staging,
                )
            except TruncatedFileError as exc:
                raise self._explain_truncation(exc) from None
            self.stats.bytes_read += stats.bytes_read
            self.stats.calls += stats.calls
            for index, offset in failed:  # the first failed block raises
                read, block = reads[index], reads[index].table.block
                key = checkpoint.owner(read.boxes, offset, offset + block)
                raise IntegrityError(
                    f"{read.path}: checksum mismatch in the {block}-byte block at offset {offset}"
                    f"{f', read for {key!r}' if key else ''}: the data on disk is not what was written",
                    filename=read.path, key=key, offset=offset,
                )

    def _explain_truncation(self, exc: TruncatedFileError) -> TruncatedFileError:
        """``exc``, naming the first item of its file that ends past the file's end."""
        for rel, reqs in self._reqs_by_file.items():
            if os.path.abspath(self._path(rel)) == os.path.abspath(exc.filename):
                for req in reqs:
                    info = self._info(req)
                    if info.offset + info.length > exc.actual:
                        return TruncatedFileError(exc.filename, max(exc.expected, info.offset + info.length),
                                                  exc.actual, key=req.storage_index.fqn, offset=info.offset)
        return exc

    # -------------------------------------------------------------- main flow

    def execute(self, items: Sequence[ReadItem]) -> None:
        self.run_located(items, self.locate(items))

    def locate(self, items: Sequence[ReadItem]) -> list[Located | None]:
        """Where each tensor read's saved chunk lies (None: decoded whole, by stock's code), after
        the files' sizes (and with verify, their tables) are checked. Payloads come from checked
        sidecar entries, or for items without one from their zip headers (probe reads)."""
        infos = [self._info(req) for req in items]
        for req, info in zip(items, infos):
            self._reqs_by_file.setdefault(info.relative_path, []).append(req)
            self.min_sizes[info.relative_path] = max(self.min_sizes.get(info.relative_path, 0),
                                                     info.offset + info.length)
        self._check_files()
        located: list[Located | None] = [None] * len(items)
        unknown: list[int] = []
        contiguous: dict[tuple, _safe_pickle.SavedTensor] = {}  # the layout of a (dtype, size) saved whole
        for i, (req, info) in enumerate(zip(items, infos)):
            if req.type == LoadItemType.BYTE_IO or info.transform_descriptors:
                continue
            entry = self.ck.entry(info.relative_path, info.offset) if self.ck else None
            if entry is None:
                unknown.append(i)
                continue
            dtype, size = self._chunk_size(req)
            payload = checkpoint.sidecar_payload(entry, info.length, info.offset, dtype, size)
            if payload is None:
                raise self._bad_item(req, info, f"has a sidecar entry (item {entry[0]} bytes, payload at "
                                     f"{entry[1]}) that does not match the metadata's {dtype} tensor of size "
                                     f"{list(size)} in an item of {info.length} bytes")
            saved = contiguous.get((dtype, size))
            if saved is None:
                saved = contiguous[dtype, size] = _safe_pickle.SavedTensor(dtype, size, _contiguous_stride(size))
            located[i] = Located(saved, info.offset + payload, info)
        if unknown:
            self._probe([items[i] for i in unknown], unknown, located)
        return located

    def run_located(self, items: Sequence[ReadItem], located: Sequence[Located | None]) -> None:
        """Read ``items`` (located by :meth:`locate`) into their destinations and commit them."""
        for req, loc in zip(items, located):
            if loc is None:
                self.buffered.append(self._whole_item_op(req, self._info(req)))
            else:
                self._plan_tensor(req, loc.info or self._info(req), loc.saved, loc.payload)
        self._execute_rounds()
        for req, target in self.commits:
            self.planner.commit_tensor(req, target)

    def _check_files(self) -> None:
        """Sizes, then (with verify) tables, before anything is allocated or read: a metadata
        declaring absurd items fails here, naming file and item. Only regular files are read
        (stat never blocks; a FIFO would block open)."""
        sizes: dict[str, int] = {}
        for rel, needed in self.min_sizes.items():
            path = self._path(rel)
            try:
                actual = sizes[rel] = _fileio.check_regular(path, "data file").st_size
            except CorruptCheckpointError as exc:
                key = self._reqs_by_file[rel][0].storage_index.fqn
                raise CorruptCheckpointError(f"{exc} (it holds {key!r})", filename=path, key=key) from None
            if actual < needed:
                raise self._explain_truncation(TruncatedFileError(path, needed, actual))
        if not self.reader.verify:
            return
        for rel, size in sizes.items():
            key = self._reqs_by_file[rel][0].storage_index.fqn
            why = self.ck.missing_table(rel) if self.ck else "no metadata was read"
            if why is not None:
                raise IntegrityError(f"verify=True, but {key!r} in {self._path(rel)} cannot be verified: {why}",
                                     filename=self._path(rel), key=key)
            self.tables[rel] = self.ck.table(rel, size)
            self.stats.bytes_read += self.ck.sidecar.tables[rel].size
            self.stats.calls += 1

    def _execute_rounds(self) -> None:
        """Direct copies and the first round of dense reads go with the first engine call;
        buffered ones in rounds within the budget, then the other dense rounds."""
        ops = sorted(self.buffered, key=lambda b: (b.relative_path, b.file_offset))
        dense = self._dense_rounds()
        # taken by the first engine call
        first = [(self.direct, self.device_direct, dense.pop(0) if dense else [])]

        def read(boxes: dict[str, list[Box]]) -> None:
            host, device, scattered = first.pop() if first else ({}, {}, [])
            for rel, bx in boxes.items():
                host.setdefault(rel, []).extend(bx)
            self._run_with_dense(host, device, scattered)

        groups = [[(op.relative_path, op.file_offset, op.nbytes, op.key)] for op in ops]
        for k, (buf,) in checkpoint.read_rounds(groups, read, self.reader.memory_budget):
            self.finish_buffered(ops[k], memoryview(buf))
        if first:  # nothing buffered
            read({})
        for batch in dense:
            self._run_with_dense({}, {}, batch)

    def finish_buffered(self, op: _Buffered, view: memoryview) -> None:
        """``op``'s step on its bytes ``view``; what cannot be decoded names the item."""
        try:
            op.finish(view)
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, pickle.UnpicklingError, EOFError) as exc:
            raise self._corrupt(op.relative_path, op.key, op.file_offset, f"cannot be decoded: {exc}") from exc

    @property
    def _scratch_bound(self) -> int:
        """Most bytes of device scratch the dense reads of one engine call hold."""
        return min(_NARROW_MAX_SCRATCH, self.reader.memory_budget)

    def _dense_rounds(self) -> list[list[_Dense]]:
        """The dense reads in rounds whose scratch stays within the bound (each read fits alone)."""
        rounds: list[list[_Dense]] = []
        used = bound = self._scratch_bound
        for op in sorted(self.dense, key=lambda d: (d.relative_path, d.file_span)):
            nbytes = op.file_span[1] - op.file_span[0]
            if used + nbytes > bound:
                rounds.append([])
                used = 0
            rounds[-1].append(op)
            used += nbytes
        return rounds

    def _run_with_dense(self, host: dict[str, list[Box]], device_boxes: dict[tuple[str, int], list[Box]],
                        dense: list[_Dense]) -> None:
        """One engine call, plus the dense reads ``dense``: their scratch is allocated here (one
        round's at a time, by torch's caching allocator), filled by the call as one dense box
        each, and scattered right after it. The engine orders its copies after the current
        stream and synchronizes them before it returns, so torch's copies on the current stream
        see the bytes, and a later round reusing the memory waits for them."""
        device_boxes = {k: list(v) for k, v in device_boxes.items()}
        scratch = []
        for op in dense:
            lo, hi = op.file_span
            scratch.append(torch.empty(hi - lo, dtype=torch.uint8, device=op.target.device))
            device_boxes.setdefault((op.relative_path, op.device), []).append(
                Box(lo, scratch[-1].data_ptr(), hi - lo, key=op.key))
        self._run_engine(host, device_boxes)
        for op, raw in zip(dense, scratch):
            op.target.copy_(_saved_view(raw, op.saved, op.lengths))

    # -------------------------------------------------------------- tensor items

    def _target(self, req: ReadItem) -> torch.Tensor:
        target = self.planner.resolve_tensor(req).detach()
        if tuple(target.shape) != tuple(req.lengths):
            raise RuntimeError(f"{req.dest_index.fqn}: the planner resolved a destination of size "
                               f"{tuple(target.shape)} for a read of size {tuple(req.lengths)}")
        return target

    def _plan_tensor(self, req: ReadItem, info: _stock._StorageInfo, saved: _safe_pickle.SavedTensor,
                     payload_file_offset: int) -> None:
        if (not saved.storage_offset and req.lengths == saved.size and not any(req.storage_offsets)
                and saved.stride == _contiguous_stride(saved.size)):
            # The common case: a whole contiguous saved chunk into a dense host tensor of its dtype
            # is one run (what read_box gives it), read straight into the tensor.
            target = self._target(req)
            if (type(target) is torch.Tensor and target.is_cpu and target.dtype == saved.dtype
                    and target.layout is torch.strided and target.is_contiguous() and not target.is_quantized
                    and _device.cuda_index(target) < 0 and target.nbytes):
                self.direct.setdefault(info.relative_path, []).append(
                    Box(payload_file_offset, target.data_ptr(), target.nbytes, key=req.storage_index.fqn))
                self.commits.append((req, target))
                return
            self._plan_tensor_into(req, info, saved, payload_file_offset, target)
            return
        if len(req.lengths) != len(saved.size) or any(
            o < 0 or n < 0 or o + n > s for o, n, s in zip(req.storage_offsets, req.lengths, saved.size)
        ):
            raise self._bad_item(req, info, f"holds a chunk of size {list(saved.size)}; the read at offsets "
                                 f"{list(req.storage_offsets)} of lengths {list(req.lengths)} exceeds it")
        self._plan_tensor_into(req, info, saved, payload_file_offset, self._target(req))

    def _plan_tensor_into(self, req: ReadItem, info: _stock._StorageInfo, saved: _safe_pickle.SavedTensor,
                          payload_file_offset: int, target: torch.Tensor) -> None:
        key = req.storage_index.fqn
        box_at = functools.partial(read_box, payload_file_offset, saved.dtype.itemsize, saved.stride,
                                   saved.storage_offset, req.storage_offsets, req.lengths, key=key)
        device = _device.cuda_index(target)
        fast = (
            target.dtype == saved.dtype
            and target.layout == torch.strided
            and not target.is_quantized
            and type(target) is torch.Tensor
            and (self._device_fast if device >= 0 else target.device.type == "cpu")
        )
        if fast:
            box = box_at(target.data_ptr(), target.stride())
            if box is None:
                self.commits.append((req, target))
                return
            overlapping = any(s == 0 for s in box.dest_strides)
            if device >= 0 and not overlapping and self._reads_densely(box):
                self.dense.append(_Dense(info.relative_path, device, box.file_span, req.storage_index.fqn,
                                         target, saved, tuple(req.lengths)))
                self.commits.append((req, target))
                return
            if not overlapping and not (box.inner_bytes < _SHORT_RUN and box.runs > _MANY_RUNS):
                if device < 0:
                    self.direct.setdefault(info.relative_path, []).append(box)
                else:
                    self.device_direct.setdefault((info.relative_path, device), []).append(box)
                self.commits.append((req, target))
                return
        # Buffered: read the covering byte range of the box, let torch scatter/cast.
        box = box_at(0, [0] * len(req.lengths))
        if box is None:
            self.planner.commit_tensor(req, target)
            return
        lo, hi = box.file_span
        lengths = tuple(req.lengths)

        def finish(buf: memoryview, target=target, req=req) -> None:
            raw = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
            target.copy_(_saved_view(raw, saved, lengths))
            self.planner.commit_tensor(req, target)

        self.buffered.append(_Buffered(info.relative_path, lo, hi - lo, finish, req.storage_index.fqn))

    def _reads_densely(self, box: Box) -> bool:
        """Whether a box into CUDA memory is read densely (see _NARROW_DEVICE_ROW): narrow
        runs, and a covering range within the amplification and scratch bounds."""
        lo, hi = box.file_span
        return (box.runs > 1 and box.inner_bytes < _NARROW_DEVICE_ROW
                and hi - lo <= min(_NARROW_MAX_AMPLIFICATION * box.inner_bytes * box.runs, self._scratch_bound))

    @functools.cached_property
    def _device_fast(self) -> bool:
        """Whether the engine reads straight into CUDA destinations (through pinned staging;
        verified loads too: the engine checks each block in its pinned buffer)."""
        status = getattr(self.engine, "cuda_status", None)
        return bool(status is not None and status().usable)

    # -------------------------------------------------------------- bytes / whole items

    def _whole_item_op(self, req: ReadItem, info: _stock._StorageInfo) -> _Buffered:
        """Read the whole item, then stock's decoding: transforms, then the bytes to the planner
        (objects), or torch.load, narrow and copy (tensors)."""
        key, check = req.storage_index.fqn, not self.reader.allow_pickle

        def finish(buf: memoryview) -> None:
            data: Any = buf
            if info.transform_descriptors:
                data = self.reader.transforms.transform_load_stream(
                    req, info.transform_descriptors, io.BytesIO(buf)).read(-1)
            if req.type != LoadItemType.BYTE_IO:
                tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                target = self._target(req)
                target.copy_(narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths))
                self.planner.commit_tensor(req, target)
                return
            data = bytes(data)
            # Stock's load_bytes unpickles the bytes (torch.load(weights_only=False)), and any
            # planner is assumed to when they look like torch.save output (a zip archive, a
            # pickle): first make sure that would import nothing weights_only refuses.
            stock = getattr(type(self.planner), "load_bytes", None) is DefaultLoadPlanner.load_bytes
            if check and (stock or data.startswith(_TORCH_SAVE_MAGIC)):
                _safe_pickle.check_object(data, key=key, filename=self._path(info.relative_path),
                                          offset=info.offset)
            self.planner.load_bytes(req, io.BytesIO(data))

        return _Buffered(info.relative_path, info.offset, info.length, finish, key)

    # -------------------------------------------------------------- stock items

    def _probe(self, reqs: list[ReadItem], where: list[int], located: list[Located | None]) -> None:
        """Locate payloads of items without sidecar entries from their zip headers: ``reqs[k]``
        goes to ``located[where[k]]`` (None where stock's decoding decides)."""
        # Several reads may share one saved item (resharding): probe each item once.
        by_item: dict[tuple[str, int], list[int]] = {}
        for k, req in enumerate(reqs):
            info = self._info(req)
            by_item.setdefault((info.relative_path, info.offset), []).append(k)
        groups = list(by_item.values())
        infos = [self._info(reqs[group[0]]) for group in groups]
        spans = [(info.relative_path, info.offset, info.length) for info in infos]
        for i, view in checkpoint.probe(spans, self._run_engine, self.reader.memory_budget):
            info = infos[i]
            try:
                found = checkpoint.locate_tensor(checkpoint.Archive(view))
            except (ArchiveError, UnsupportedLayout):  # not a plain tensor: stock's decoding decides
                continue
            for k in groups[i]:
                mismatch = checkpoint.metadata_mismatch(found.saved, *self._chunk_size(reqs[k]))
                if mismatch is not None:
                    raise self._bad_item(reqs[k], info, mismatch)
                located[where[k]] = Located(found.saved, info.offset + found.payload, info)
