"""FileSystemWriter: DCP's StorageWriter protocol over the engine, and its AsyncStager.

``write_data`` lays the items out (:mod:`dcp_native.layout`), the engine writes
them straight from tensor memory (CUDA tensors through a pinned pool the writer
keeps), and ``finish`` commits (:mod:`dcp_native.commit`); ``stage()`` copies
the state dict into a staging area kept across saves (:mod:`dcp_native.staging`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import pickle
import time
from typing import Any, Sequence

from torch.distributed.checkpoint import filesystem as _stock
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from . import _device, checkpoint, commit, integrity, layout, sidecar
from ._backend import get_engine
from .engine import DEFAULT_STAGING_BYTES
from .staging import StagingArea


@dataclasses.dataclass
class _SavePrefix(_stock._StoragePrefix):
    """Stock's per-rank file prefix plus the tag of this save (every rank's files carry it)."""

    tag: str = ""


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
    _RUNTIME = ("_staging", "_pools", "_marker")

    def _init_runtime(self) -> None:
        self._staging: StagingArea | None = None
        self._pools = _device.PinnedPools()
        #: The marker of this writer's save in progress (coordinator only; dcp_native.commit).
        self._marker: commit.SaveMarker | None = None

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
        I/O threads at hardware speed (about +35% on a 1 GiB save into the page
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
        try:
            engine = get_engine()
            storage = plan.storage_data
            files, results = layout.lay_out(
                plan.items, planner.resolve_data, self.path, storage.prefix,
                getattr(storage, "tag", ""),
                files=self.thread_count if self.single_file_per_rank else 0,
                transforms=self.transforms if self.transforms.extensions else None,
                cuda_usable=lambda: engine.cuda_status().usable,
            )
            self._write(engine, files, results)
        except BaseException:
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

    def _write(self, engine: Any, files: list[layout.FileLayout], results: list[WriteResult]) -> None:
        """One engine call writes the data files, a second their CRC32C tables (noted in results)."""
        crc_block = self._checksum_block(engine)
        device = max((fl.device for fl in files), default=-1)
        # The engine's copy stream waits for the work queued so far on the
        # producer's stream (e.g. the layout's .contiguous() copies).
        stream = _device.current_stream(device) if device >= 0 else 0
        capacity = self.staging_bytes if self.staging_bytes is not None else DEFAULT_STAGING_BYTES
        with self._pools.lock if device >= 0 else contextlib.nullcontext():
            pool = {} if device < 0 else {"pool": self._pools.get(engine, device, capacity),
                                          "direct_io": self.direct_io}
            stats = engine.write([fl.write_file(crc_block, stream) for fl in files],
                                 threads=self.thread_count, sync=self.sync_files,
                                 chunk_bytes=self.chunk_bytes, **pool)
        if not crc_block:
            return
        tables = [layout.FileLayout(self.path, checkpoint.table_name(fl.relative_path)) for fl in files]
        for table, fl, crcs in zip(tables, files, stats.block_crcs):
            table.add_bytes(integrity.encode_table(crc_block, fl.size, crcs))
        engine.write([t.write_file() for t in tables], threads=self.thread_count, sync=self.sync_files)
        infos = {fl.relative_path: sidecar.TableInfo(t.relative_path, t.size, sidecar.digest(t.blob))
                 for fl, t in zip(files, tables)}
        for wr in results:
            wr.storage_data.table = infos.get(wr.storage_data.relative_path)

    # ------------------------------------------------------------------ commit

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit (see :mod:`dcp_native.commit`): sidecar, then ``.metadata`` through a rename."""
        marker = self._marker
        try:
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
        metadata.storage_data = {}
        # Items lie in increasing offsets within a file, in the order of the results.
        payloads: dict[str, list[list[int]]] = {}
        tables: dict[str, sidecar.TableInfo] = {}
        for wr in itertools.chain.from_iterable(results):
            info = wr.storage_data
            if isinstance(info, layout.StorageInfo):
                if info.payload_offset >= 0:
                    payloads.setdefault(info.relative_path, []).append(
                        [info.offset, info.length, info.payload_offset]
                    )
                if info.table is not None:
                    tables[info.relative_path] = info.table
                info = info.stock()
            metadata.storage_data[wr.index] = info
        metadata.storage_meta = self.storage_meta()
        rank = self._local_rank()
        metadata_name = f"__{rank}{checkpoint.METADATA_NAME}" if rank is not None else checkpoint.METADATA_NAME
        metadata_bytes = pickle.dumps(metadata)
        side = sidecar.document(self.save_id, metadata_name, metadata_bytes, payloads, tables)
        commit.commit(str(self.path), metadata_name, metadata_bytes, side, self.save_id,
                      sync=self.sync_files, overwrite=self.overwrite, rank=rank, metadata=metadata)
