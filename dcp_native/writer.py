"""FileSystemWriter: DCP's StorageWriter protocol over the engine, and its AsyncStager.

``write_data`` lays the items out (:mod:`dcp_native.layout`), the engine writes
them straight from tensor memory (CUDA tensors through a pinned pool the writer
keeps), and ``finish`` commits (:mod:`dcp_native.commit`); ``stage()`` copies
the state dict into a staging area kept across saves (:mod:`dcp_native.staging`).

A save handed the very plan of an earlier save (the same ``items`` list, as
:class:`~dcp_native.CachingSavePlanner` and stock's plan caching hand back) reuses that save's
layout (:class:`_KeptLayout`): file assignment, framing and offsets are kept, each tensor is
written from its new memory and each object from its new pickle; anything else lays out anew.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import os
import queue
import threading
import time
from array import array
from typing import Any, Callable, Iterator, Sequence

import torch

from torch.distributed.checkpoint import filesystem as _stock
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from . import _device, _metadata_pickle, checkpoint, commit, integrity, layout, sidecar
from ._backend import get_engine
from ._errors import CheckpointError
from .engine import DEFAULT_STAGING_BYTES, SRC_BLOB, SRC_HOST
from ._gc import gc_paused
from .staging import StagingArea


@dataclasses.dataclass
class _SavePrefix(_stock._StoragePrefix):
    """Stock's per-rank file prefix plus the tag of this save (every rank's files carry it)."""

    tag: str = ""


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _as_is(data: Any) -> bool:
    """Whether the layout writes tensor ``data``'s own memory as its payload (dense, on the host)."""
    return (type(data) in _PLAIN and data.device.type == "cpu" and data.layout == torch.strided
            and not data.is_quantized and data.is_contiguous() and not data.is_conj()
            and not data.is_neg())


def _file_name(prefix: str, n: int, tag: str) -> str:
    return f"{prefix}{n}{'.' + tag if tag else ''}{_stock.DEFAULT_SUFFIX}"


@dataclasses.dataclass
class _KeptLayout:
    """One save's layout, kept to write the next save of the same plan without laying it out.

    Holds no tensor. ``slots`` say, for each item in the order it was resolved, where its bytes
    go: a tensor's host segment (``(file, segment, dtype, shape)``; the segment's address becomes
    the new tensor's) or an object's bytes in its file's blob (``(file, blob offset, length)``;
    the new pickle must have that length). Kept only when every tensor was written from its own
    host memory, so that no byte of the framing depends on the values (the files' bytes then
    equal a fresh layout's but for torch.save's serialization id, which torch only logs).
    """

    key: tuple
    items: list[WriteItem]
    order: list[WriteItem]
    files: list[tuple[int, bytearray, array, array]]  # (size, blob, segments, payloads) of data file n
    slots: list[tuple]
    #: (file, index, size_in_bytes, offset, length) of each result
    results: list[tuple[int, Any, int, int, int]]

    @classmethod
    def capture(cls, key: tuple, items: list[WriteItem], prefix: str, tag: str,
                files: list[layout.FileLayout], resolved: list[tuple[WriteItem, Any]],
                results: list[WriteResult]) -> _KeptLayout | None:
        """The layout of ``files`` (laid out from ``items``, resolved as ``resolved`` lists), or
        None when it cannot be reused."""
        if len(resolved) != len(results) or any(
                fl.device >= 0 or fl.relative_path != _file_name(prefix, n, tag) for n, fl in enumerate(files)):
            return None
        number = {fl.relative_path: n for n, fl in enumerate(files)}
        host, blobs = [], []
        for fl in files:
            seg = fl.segments
            host.append([j for j in range(0, len(seg), 4) if seg[j + 1] == SRC_HOST])
            blobs.append({seg[j]: j for j in range(0, len(seg), 4) if seg[j + 1] == SRC_BLOB})
        taken = [0] * len(files)
        slots, kept_results = [], []
        for (item, data), wr in zip(resolved, results):
            info = wr.storage_data
            f = number.get(getattr(info, "relative_path", None))
            if f is None or wr.index != item.index or getattr(info, "transform_descriptors", None):
                return None
            seg = files[f].segments
            kept_results.append((f, wr.index, wr.size_in_bytes, info.offset, info.length))
            if item.type == WriteItemType.BYTE_IO:
                j = blobs[f].get(info.offset)
                if j is None or seg[j + 3] != info.length:
                    return None
                slots.append((f, seg[j + 2], info.length))
            elif not _as_is(data):
                return None
            elif data.nbytes == 0:
                slots.append((f, -1, data.dtype, data.shape))
            else:
                if taken[f] >= len(host[f]):
                    return None
                j = host[f][taken[f]]
                taken[f] += 1
                if seg[j + 2] != data.data_ptr() or seg[j + 3] != data.nbytes:
                    return None
                slots.append((f, j, data.dtype, data.shape))
        if taken != [len(h) for h in host]:
            return None
        return cls(key, items, [item for item, _ in resolved],
                   [(fl.size, bytearray(fl.blob), array("q", fl.segments), array("q", fl.payloads)) for fl in files],
                   slots, kept_results)

    def apply(self, directory: str, resolve: Any, prefix: str,
              tag: str) -> tuple[list[layout.FileLayout], list[WriteResult]] | None:
        """This layout with the data ``resolve`` gives now, in files named for ``tag``; None when
        some item no longer fits it (the caller then lays out anew)."""
        files = []
        for n, (size, blob, segments, payloads) in enumerate(self.files):
            fl = layout.FileLayout(directory, _file_name(prefix, n, tag))
            fl.size, fl.blob, fl.segments, fl.payloads = size, blob, array("q", segments), array("q", payloads)
            files.append(fl)
        copied = set()  # the files whose blob is a copy (the kept blobs never change)
        for item, slot in zip(self.order, self.slots):
            data = resolve(item)
            fl = files[slot[0]]
            if len(slot) == 3:
                buf = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(data)
                if buf.nbytes != slot[2]:
                    return None
                if slot[0] not in copied:
                    fl.blob = bytearray(fl.blob)
                    copied.add(slot[0])
                fl.blob[slot[1]:slot[1] + slot[2]] = buf
            elif not _as_is(data) or data.dtype != slot[2] or data.shape != slot[3]:
                return None
            elif slot[1] >= 0:
                fl.segments[slot[1] + 2] = data.data_ptr()
                fl.tensors.append(data)
        results = [WriteResult(index, size, files[f].storage_info(offset, length))
                   for f, index, size, offset, length in self.results]
        return files, results


@dataclasses.dataclass
class _PickledMetadata:
    """A save's pickled metadata, kept so that the next save of the same plan need not pickle it.

    That save's metadata shares this one's ``state_dict_metadata`` and ``planner_data`` (the very
    objects: a caching planner hands out the same ones) and differs at most in its save id and its
    data files' names (both carry the save), whose offsets and lengths are the same. Those strings
    are objects the save made after the planner made the rest of the metadata (the names while
    laying out its files, the save id through :func:`_fresh`), so nothing else in the metadata
    refers to them: each was pickled once (its other uses are memo references), so if its bytes
    occur exactly once in the pickle, that occurrence is it, and the new pickle is the old one
    with each such string replaced by its successor of the same length: it unpickles to the new
    metadata.
    """

    state_dict_metadata: Any
    planner_data: Any
    #: The metadata's other fields (version, and whatever later torch versions add)
    others: dict[str, Any]
    storage_meta: Any
    #: The metadata's storage_data (a dict no later save changes: each sets a new one)
    storage_data: dict
    raw: bytes

    def reuse(self, metadata: Metadata) -> bytes | None:
        """The pickle of ``metadata`` made from this one, or None."""
        old_meta, new_meta = self.storage_meta, metadata.storage_meta
        if (metadata.planner_data is not self.planner_data or _others(metadata) != self.others
                or len(metadata.storage_data) != len(self.storage_data) or type(old_meta) is not type(new_meta)
                or {**vars(old_meta), "save_id": None} != {**vars(new_meta), "save_id": None}):
            return None
        swaps = {old_meta.save_id: new_meta.save_id}
        for (i0, r0, o0, l0, t0), (i1, r1, o1, l1, t1) in zip(_entries(self.storage_data),
                                                              _entries(metadata.storage_data)):
            if (o0, l0, t0) != (o1, l1, t1) or swaps.setdefault(r0, r1) != r1 or (
                    i0 is not i1 and (i0.fqn, i0.offset, i0.index) != (i1.fqn, i1.offset, i1.index)):
                return None
        spots = []
        for old, new in swaps.items():
            if old == new:
                continue
            if not isinstance(old, str) or not isinstance(new, str):
                return None
            o, n = old.encode(), new.encode()
            if len(o) != len(n) or self.raw.count(o) != 1:
                return None
            spots.append((self.raw.find(o), n))
        raw = bytearray(self.raw)
        for at, n in spots:
            raw[at:at + len(n)] = n
        return bytes(raw)


def _entries(storage_data: dict) -> Iterator[tuple]:
    """(index, relative path, offset, length, transform descriptors) of each item, in order."""
    return ((index, info.relative_path, info.offset, info.length, getattr(info, "transform_descriptors", None))
            for index, info in storage_data.items())


def _others(metadata: Metadata) -> dict[str, Any]:
    return {k: v for k, v in vars(metadata).items()
            if k not in ("state_dict_metadata", "planner_data", "storage_data", "storage_meta")}


def _fresh(text: str) -> str:
    """A new string object equal to ``text``, which nothing else refers to (see _PickledMetadata)."""
    return (text + "\0")[:-1]


_pickled: dict[int, _PickledMetadata] = {}
_pickled_lock = threading.Lock()


def _pickle_metadata(metadata: Metadata, native: bool, keep: bool = True) -> bytes:
    """The pickle of ``metadata`` (:func:`dcp_native._metadata_pickle.dumps`; ``native``: by the
    native pickler where it can), from the last pickle of the same plan where it can be
    (:class:`_PickledMetadata`); with ``keep`` (the planner hands the plan to the next save), the
    last pickle of each of two plans is kept. The save id and the relative paths of ``metadata``
    must be objects nothing else in it refers to (one per data file)."""
    key = id(metadata.state_dict_metadata)
    with _pickled_lock:
        kept = _pickled.get(key)
    raw = None
    if kept is not None and kept.state_dict_metadata is metadata.state_dict_metadata:
        raw = kept.reuse(metadata)
    if raw is None:
        raw = _metadata_pickle.dumps(metadata, native)
    if not keep:
        return raw
    entry = _PickledMetadata(metadata.state_dict_metadata, metadata.planner_data, _others(metadata),
                             copy.copy(metadata.storage_meta), metadata.storage_data, raw)
    with _pickled_lock:
        _pickled.pop(key, None)
        _pickled[key] = entry
        while len(_pickled) > 2:
            del _pickled[next(iter(_pickled))]
    return raw


class _EarlyWrites:
    """Data files handed to the engine as soon as they are laid out, while later ones are.

    Laying out many small tensors is Python's work, writing them the engine's (threads without
    the GIL), so the two overlap: one background thread writes each complete file of small host
    tensors (the files queued meanwhile in one call). Other files wait for the final call: with
    large tensors there is no layout to overlap and one call writing every file at once is faster
    (4 files of 16 tensors of 4 MiB: 41 ms written early, 37 ms in one call, here; 4 files of
    1000 of 16 KiB: the save 5% faster early); files with device segments need the pinned pool,
    which the final call holds. At most one engine call runs at a time. Only the native engine
    writes early: the Python engine's writes need the GIL the layout holds.
    """

    #: Files whose tensors average at most this many bytes are written early.
    SMALL_TENSOR_BYTES = 64 << 10

    def __init__(self, write: Callable[[list[layout.FileLayout]], list]) -> None:
        self._write = write
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: id of each file written -> its block CRCs
        self.written: dict[int, Any] = {}
        self._error: BaseException | None = None

    def submit(self, fl: layout.FileLayout) -> None:
        if fl.device >= 0 or fl.size > len(fl.tensors) * self.SMALL_TENSOR_BYTES:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dcp_native-write", daemon=True)
            self._thread.start()
        self._queue.put(fl)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get())
            files = [fl for fl in batch if fl is not None]
            if files and self._error is None:
                try:
                    self.written.update(zip(map(id, files), self._write(files)))
                except BaseException as exc:  # raised to the save by wait()
                    self._error = exc
            if len(files) < len(batch):
                return

    def wait(self) -> dict[int, Any]:
        """Every submitted file written: the CRCs of each by id; the first write's error raised."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        return self.written


class FileSystemWriter(_stock.FileSystemWriter):
    """Drop-in ``torch.distributed.checkpoint.FileSystemWriter`` with a faster engine.

    Args:
        path: directory the checkpoint is written to.
        single_file_per_rank: one file per thread per rank (True) or one file per item.
        sync_files: fsync every data and metadata file before the save commits.
        thread_count: I/O threads, and (as stock) data files per rank.
        per_thread_copy_ahead: bytes staged from the GPU ahead of writing (as stock).
        cache_staged_state_dict: keep the staged copy between async saves (as stock).
        overwrite: allow saving over an existing checkpoint (as stock).
        _extensions: stream transforms (e.g. ``ZStandard()``); such items are framed by stock's code.
        serialization_format: ``TORCH_SAVE`` uses dcp_native's path, others stock's.
        chunk_bytes: most bytes one write call moves; the unit of work of the threads.
        checksums: write a CRC32C table of every data file (4 KiB blocks) beside
            it, for verified loads and `dcp-native verify`; default: with the
            native engine.
        staging_bytes: most bytes of host memory the writer holds for staging:
            the async staging area (``stage()``; a state dict that needs more
            raises ``ValueError``; default: no bound) and the pinned pool of
            each device CUDA tensors are written through (default 256 MiB).
        staging_timeout: seconds ``stage()`` waits for the previous
            ``async_save`` of this writer to finish reading the staging area
            before it raises :class:`~dcp_native.staging.StagingBusyError`
            (None: no limit).
        direct_io: let the engine write pinned staging buffers (CUDA tensors)
            with O_DIRECT where the filesystem allows it (silently buffered
            elsewhere).
        async_staging: ``stage()`` returns a future and copies on a background
            thread, so ``async_save`` returns at once with DCP's
            ``AsyncSaveResponse``; the caller must wait for its
            ``staging_completion`` before changing the tensors.

    Async saves: ``dcp.async_save(sd, storage_writer=writer)`` calls ``writer.stage(sd)``, which
    copies the tensors into a staging area kept between saves, whatever ``cache_staged_state_dict``
    says, while the state dict keeps its layout (see "Async saves: staging" in
    docs/ARCHITECTURE.md); a second ``async_save`` with the same writer waits until the first has
    completed. :attr:`bytes_held` reports the memory held, :meth:`close` frees it; the writer
    pickles (to DCP's checkpoint process) without it.

    Example:
        >>> import tempfile, torch, torch.distributed.checkpoint as dcp, dcp_native
        >>> path = tempfile.mkdtemp()
        >>> sd = {"w": torch.arange(4.0)}
        >>> _ = dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(path), no_dist=True)
        >>> out = {"w": torch.zeros(4)}
        >>> dcp.load(out, storage_reader=dcp_native.FileSystemReader(path), no_dist=True)
        >>> out["w"].tolist()
        [0.0, 1.0, 2.0, 3.0]
    """

    def __init__(
        self,
        path: str | os.PathLike,
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int = 1,
        per_thread_copy_ahead: int = 10_000_000,
        cache_staged_state_dict: bool = False,
        overwrite: bool = True,
        _extensions: Sequence[Any] | None = None,
        serialization_format: Any = None,
        *,
        chunk_bytes: int = 8 << 20,
        checksums: bool | None = None,
        staging_bytes: int | None = None,
        staging_timeout: float | None = 1800.0,
        async_staging: bool = False,
        direct_io: bool = True,
    ) -> None:
        if thread_count < 1:
            raise ValueError(f"thread_count must be at least 1, got {thread_count}")
        if chunk_bytes < 4096:
            raise ValueError(f"chunk_bytes must be at least 4096, got {chunk_bytes}")
        kwargs = {} if serialization_format is None else {"serialization_format": serialization_format}
        super().__init__(
            path, single_file_per_rank=single_file_per_rank, sync_files=sync_files,
            thread_count=thread_count, per_thread_copy_ahead=per_thread_copy_ahead,
            cache_staged_state_dict=cache_staged_state_dict, overwrite=overwrite,
            _extensions=_extensions, **kwargs,
        )
        if staging_bytes is not None and staging_bytes < 0:
            raise ValueError(f"staging_bytes must be non-negative or None, got {staging_bytes}")
        self.chunk_bytes = chunk_bytes
        self.checksums = checksums
        self.staging_bytes = staging_bytes
        self.staging_timeout = staging_timeout
        self.async_staging = async_staging
        self.direct_io = bool(direct_io)
        self._init_runtime()

    # ------------------------------------------------------------------ staging (AsyncStager)

    #: Attributes that never pickle: staging memory, pinned pools, the save's marker.
    _RUNTIME = ("_staging", "_pools", "_marker", "_layouts", "_plan_cached")

    def _init_runtime(self) -> None:
        self._staging: StagingArea | None = None
        self._pools = _device.PinnedPools()
        #: The marker of this writer's save in progress (coordinator only; dcp_native.commit).
        self._marker: commit.SaveMarker | None = None
        #: The last save's layout when the planner keeps none (see :class:`_KeptLayout`).
        self._layouts: dict[Any, Any] = {}
        #: Whether this save's planner hands its plan (and metadata) to the next save: only then
        #: is the metadata's pickle kept for it (see :class:`_PickledMetadata`).
        self._plan_cached = False

    def __getstate__(self) -> dict[str, Any]:
        # DCP's process executor pickles the writer on the thread that waits for
        # the checkpoint process: that thread's end marks the end of the save.
        staging = self.__dict__.get("_staging")
        if staging is not None:
            staging.claim()
        return {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def stage(self, state_dict: dict[str, Any]) -> Any:
        """DCP's ``AsyncStager.stage``: the state dict copied into the staging area (CPU tensors,
        values as of this call), or with ``async_staging`` a future of it; waits first until the
        previous async save of this writer no longer reads the area."""
        if self._staging is None:
            self._staging = StagingArea(self.staging_bytes, self.staging_timeout)
        return (self._staging.stage_async if self.async_staging else self._staging.stage)(state_dict)

    @property
    def bytes_held(self) -> int:
        """Host memory held for staging now: the async staging area plus the pinned pools."""
        staging = self._staging
        return (staging.bytes_held if staging is not None else 0) + self._pools.bytes_held

    def close(self) -> None:
        """Free the staging area and the pinned pools (idempotent); the writer stays usable."""
        staging, self._staging = self._staging, None
        if staging is not None:
            staging.close()
        self._pools.close()

    def _claim(self) -> None:
        """Note the thread DCP runs this save on (see :mod:`dcp_native.staging`)."""
        if self._staging is not None and self._staging.claim():
            # The save's first call on its new thread: hand the GIL back once, so
            # the training thread returns from async_save now rather than after
            # Python's switch interval (5 ms) of planning on this thread.
            time.sleep(0)

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self._claim()
        self._abandon()
        super().reset(checkpoint_id)

    def storage_meta(self):
        self._claim()
        return super().storage_meta()

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._claim()
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)

    # ------------------------------------------------------------------ writing

    def _local_rank(self) -> int | None:
        """This rank when each rank commits its own ``__{rank}.metadata`` (``use_collectives=False``)."""
        return None if getattr(self, "use_collectives", True) else self.rank

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """The coordinator's step before any rank writes: a fresh save id per save (DCP keeps a
        writer's id across saves without ``checkpoint_id``), whose tag names every file of the save,
        so no two saves write one file; dead saves' leftovers go and this save's marker is taken."""
        plans = super().prepare_global_plan(plans)
        self._abandon()
        self.save_id = _stock._generate_uuid()
        tag = sidecar.save_tag(self.save_id)
        directory = str(self.path)
        with commit.DirectoryLock(directory):
            commit.clean_before_save(directory, tag, self._local_rank())
            self._marker = commit.SaveMarker(directory, tag)
        return [dataclasses.replace(plan, storage_data=_SavePrefix(plan.storage_data.prefix, tag))
                for plan in plans]

    def _abandon(self) -> None:
        """End this writer's earlier save if it never committed (failed elsewhere): remove its files."""
        marker, self._marker = self._marker, None
        if marker is None or not marker.held:
            return
        try:
            with commit.DirectoryLock(marker.directory):
                commit.remove_own(marker.directory, marker.tag, commit.committed_files(marker.directory))
        except (OSError, commit.CheckpointError):
            pass  # best effort: a later save removes what is left once the marker is gone
        finally:
            marker.release()

    def _checksum_block(self, engine: Any) -> int:
        """Block size of the CRC32C tables to write; 0 for none.

        By default only the native engine writes them: it computes them on its
        I/O threads while the bytes are in cache (0-5% of a save into the page
        cache here); the Python engine computes them a block at a time.
        """
        enabled = self.checksums
        if enabled is None:
            enabled = engine.name == "native" and integrity.fast_crc32c()
        return integrity.DEFAULT_BLOCK if enabled else 0

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        self._claim()
        fmt = getattr(self, "serialization_format", None)
        if fmt is not None and fmt != _stock.SerializationFormat.TORCH_SAVE:
            return super().write_data(plan, planner)  # stock's formats other than torch.save
        files: list[layout.FileLayout] = []
        early = None
        try:
            engine = get_engine()
            storage = plan.storage_data
            tag = self._save_tag(getattr(storage, "tag", ""))
            crc_block = self._checksum_block(engine)
            early = _EarlyWrites(functools.partial(self._write_host_files, engine, crc_block))
            files, results = self._lay_out(engine, plan, planner, storage.prefix, tag,
                                           early.submit if engine.name == "native" else None)
            self._write(engine, files, crc_block, early.wait())
        except BaseException:
            if early is not None:
                with contextlib.suppress(BaseException):
                    early.wait()  # nothing may still write what is removed next
            # A failed save removes what it wrote (never another save's files:
            # the names carry this save's tag), then the save is over.
            for fl in files:
                commit.remove_quietly(fl.path)
                commit.remove_quietly(checkpoint.table_name(fl.path))
            if self._marker is not None:
                self._abandon()
            raise
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _save_tag(self, tag: str) -> str:
        """The tag this save's files carry.

        A planner that hands back an earlier save's final plan (stock's ``enable_plan_caching``)
        hands back that save's tag with it: written under it, this save would overwrite the
        committed checkpoint's files in place. The coordinator knows its own save's tag; another
        rank refuses a tag whose save is not in progress.
        """
        marker = self._marker
        if marker is not None and marker.held:
            return marker.tag
        if tag and not commit.save_alive(str(self.path), tag):
            raise CheckpointError(
                f"{self.path}: the save plan names the files of save {tag}, which is not in progress "
                "(a planner handed back an earlier save's plan, e.g. DefaultSavePlanner("
                "enable_plan_caching=True) on several ranks; dcp_native.CachingSavePlanner caches safely)",
                filename=str(self.path))
        return tag

    def _lay_out(self, engine: Any, plan: SavePlan, planner: SavePlanner, prefix: str, tag: str,
                 laid_out: Callable[[layout.FileLayout], None] | None) -> tuple[list[layout.FileLayout], list[WriteResult]]:
        """The data files of this save: the kept layout when the plan is the one it was made for
        and every item still fits it, else a fresh one (kept for the next save when it can be).

        The layout is kept in the planner's ``storage_cache`` when it has one (a
        :class:`~dcp_native.CachingSavePlanner`: the cache then lives as long as the plan,
        across writers), else in this writer.
        """
        with gc_paused():
            return self._lay_out_now(engine, plan, planner, prefix, tag, laid_out)

    def _lay_out_now(self, engine: Any, plan: SavePlan, planner: SavePlanner, prefix: str, tag: str,
                     laid_out: Callable[[layout.FileLayout], None] | None) -> tuple[list[layout.FileLayout], list[WriteResult]]:
        files_per_rank = self.thread_count if self.single_file_per_rank else 0
        transforms = self.transforms if self.transforms.extensions else None
        cache = getattr(planner, "storage_cache", None)
        if not isinstance(cache, dict):
            cache = self._layouts
        self._plan_cached = cache is not self._layouts or getattr(planner, "_enable_plan_caching", False)
        key = (prefix, files_per_rank)
        kept = cache.pop(_KeptLayout, None)
        if kept is not None and kept.items is plan.items and kept.key == key and transforms is None:
            done = kept.apply(str(self.path), planner.resolve_data, prefix, tag)
            if done is not None:
                cache[_KeptLayout] = kept
                return done
        # Only a planner that hands the same plan back can reuse a layout: for any other,
        # recording and capturing it would cost every save a few µs an item for nothing.
        reusable = transforms is None and self._plan_cached
        resolved: list[tuple[WriteItem, Any]] = []

        def resolve(item: WriteItem) -> Any:
            data = planner.resolve_data(item)
            resolved.append((item, data))
            return data

        files, results = layout.lay_out(
            plan.items, resolve if reusable else planner.resolve_data, self.path, prefix, tag,
            files=files_per_rank, transforms=transforms, cuda_usable=lambda: engine.cuda_status().usable,
            laid_out=laid_out if files_per_rank != 1 else None,  # one file: nothing to overlap
        )
        kept = _KeptLayout.capture(key, plan.items, prefix, tag, files, resolved, results) if reusable else None
        if kept is not None:
            cache[_KeptLayout] = kept
        return files, results

    def _write_host_files(self, engine: Any, crc_block: int, files: list[layout.FileLayout]) -> list:
        """Write data files with host segments only; their block CRCs."""
        return engine.write([fl.write_file(crc_block) for fl in files], threads=self.thread_count,
                            sync=self.sync_files, chunk_bytes=self.chunk_bytes).block_crcs

    def _write(self, engine: Any, files: list[layout.FileLayout], crc_block: int, written: dict[int, Any]) -> None:
        """One engine call writes the data files not ``written`` yet (by id: their block CRCs), a
        second the CRC32C tables of all (noted on each file's first item)."""
        rest = [fl for fl in files if id(fl) not in written]
        device = max((fl.device for fl in rest), default=-1)
        # The engine's copy stream waits for the work queued so far on the
        # producer's stream (e.g. the layout's .contiguous() copies).
        stream = _device.current_stream(device) if device >= 0 else 0
        capacity = self.staging_bytes if self.staging_bytes is not None else DEFAULT_STAGING_BYTES
        with self._pools.lock if device >= 0 else contextlib.nullcontext():
            pool = {} if device < 0 else {"pool": self._pools.get(engine, device, capacity),
                                          "direct_io": self.direct_io}
            if rest or not files:
                stats = engine.write([fl.write_file(crc_block, stream) for fl in rest],
                                     threads=self.thread_count, sync=self.sync_files,
                                     chunk_bytes=self.chunk_bytes, **pool)
                written = {**written, **dict(zip(map(id, rest), stats.block_crcs))}
        if not crc_block:
            return
        tables = [layout.FileLayout(self.path, checkpoint.table_name(fl.relative_path)) for fl in files]
        for table, fl in zip(tables, files):
            table.add_bytes(integrity.encode_table(crc_block, fl.size, written[id(fl)]))
        engine.write([t.write_file() for t in tables], threads=self.thread_count, sync=self.sync_files)
        for fl, t in zip(files, tables):
            if fl.head is not None:  # the file's table travels with its first item
                fl.head.table = sidecar.TableInfo(t.relative_path, t.size, sidecar.digest(t.blob))

    # ------------------------------------------------------------------ commit

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit (see :mod:`dcp_native.commit`): sidecar, then ``.metadata`` through a rename."""
        marker = self._marker
        try:
            with gc_paused():  # pickling the metadata (see gc_paused)
                self._commit(metadata, results)
        except BaseException:
            if marker is not None and marker.held:
                self._abandon()  # its files go, unless the commit got as far as the rename
            raise
        finally:
            self._marker = None
            if marker is not None:
                marker.release()

    def _commit(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.version = getattr(_stock, "CURRENT_DCP_VERSION", getattr(metadata, "version", None))
        storage = metadata.storage_data = {}
        payloads: dict[str, list[tuple[int, int, int]]] = {}
        tables: dict[str, sidecar.TableInfo] = {}
        for wrs in results:
            storage.update([(wr.index, wr.storage_data) for wr in wrs])
            # Each data file's first item carries what the sidecar records about the file.
            for wr in [wr for wr in wrs if type(wr.storage_data) is layout.StorageInfo]:
                head = wr.storage_data
                it = iter(head.payloads)
                payloads[head.relative_path] = list(zip(it, it, it))
                if head.table is not None:
                    tables[head.relative_path] = head.table
                storage[wr.index] = head.stock()
        metadata.storage_meta = self.storage_meta()
        metadata.storage_meta.save_id = _fresh(metadata.storage_meta.save_id)
        rank = self._local_rank()
        metadata_name = f"__{rank}{checkpoint.METADATA_NAME}" if rank is not None else checkpoint.METADATA_NAME
        metadata_bytes = _pickle_metadata(metadata, native=get_engine().name == "native", keep=self._plan_cached)
        side = sidecar.document(self.save_id, metadata_name, metadata_bytes, payloads, tables)
        commit.commit(str(self.path), metadata_name, metadata_bytes, side, self.save_id,
                      sync=self.sync_files, overwrite=self.overwrite, rank=rank, metadata=metadata)
