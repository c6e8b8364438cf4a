"""FileSystemReader: DCP's StorageReader protocol over the engine, a thin adapter as stock's is.

``read_metadata`` opens the checkpoint through the checkpoint model, ``set_up_storage_reader``
validates every item location, and ``read_data`` hands the plan to :mod:`dcp_native.load_plan`.

Opened checkpoints are kept per process (:func:`open_checkpoint`): a ``.metadata`` whose bytes
equal the ones read last time is not parsed again, and DCP gets the same ``state_dict_metadata``
and ``storage_data`` objects as then, which is what :class:`~dcp_native.CachingLoadPlanner`
keys its cached plan on.
"""

from __future__ import annotations

import collections
import copy
import os
import threading
from typing import Any

from torch.distributed.checkpoint import filesystem as _stock
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.futures import Future

from . import _device, _fileio, checkpoint, cooperative, sidecar
from ._errors import CheckpointError, IncompleteCheckpointError
from .checkpoint import METADATA_NAME
from .engine import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_GAP, DEFAULT_STAGING_BYTES, ReadStats
from .load_plan import LoadRun


def default_thread_count() -> int:
    return min(16, max(4, os.cpu_count() or 1))


#: Checkpoints opened last, by (directory, metadata name): (metadata bytes, sidecar stat, checkpoint).
_opened: collections.OrderedDict[tuple[str, str], tuple[bytes, Any, checkpoint.Checkpoint]] = \
    collections.OrderedDict()
_opened_lock = threading.Lock()
#: How many opened checkpoints are kept (each holds its parsed metadata and sidecar).
KEEP_OPENED = 4


def _sidecar_stat(ck_dir: str, name: str, metadata: Any) -> Any:
    save_id = getattr(getattr(metadata, "storage_meta", None), "save_id", None)
    if not save_id:
        return None
    try:
        st = os.stat(os.path.join(ck_dir, sidecar.file_name(name, save_id)))
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def open_checkpoint(directory: str, name: str) -> checkpoint.Checkpoint:
    """The checkpoint in ``directory`` through its metadata file ``name``, parsed at most once
    per content.

    The one opened last from the same place is handed out again, unparsed, when the metadata's
    bytes are identical to the ones it was parsed from and its sidecar file is the same file,
    unchanged (device, inode, size, times): it then describes the very same save (dcp_native
    names every save's files and sidecar after the save). Anything else is opened afresh. The
    checkpoint is shared: nothing may change it (DCP gets copies of its ``Metadata``).
    """
    key = (directory, name)
    raw = _fileio.read_regular(os.path.join(directory, name), None, what="metadata")
    with _opened_lock:
        kept = _opened.get(key)
    if kept is not None and kept[0] == raw and kept[1] == _sidecar_stat(directory, name, kept[2].metadata):
        with _opened_lock:
            _opened.move_to_end(key)
        return kept[2]
    ck = checkpoint.Checkpoint(directory, name)
    # Kept only if the file did not change while it was parsed (the bytes read are the ones parsed).
    if _fileio.read_regular(os.path.join(directory, name), None, what="metadata") == raw:
        entry = (raw, _sidecar_stat(directory, name, ck.metadata), ck)
        with _opened_lock:
            _opened[key] = entry
            _opened.move_to_end(key)
            while len(_opened) > KEEP_OPENED:
                _opened.popitem(last=False)
    return ck


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
        cooperative: bytes that several ranks need (replicated tensors, overlapping shards) are
            read by one of them and sent to the others over ``process_group`` (gloo on the
            CPU, NCCL on the GPU), instead of every rank reading them from storage. Every rank
            of the group must load through such a reader at once (as ``dcp.load`` does). Off
            by default; see the README ("Cooperative loads") for what it costs.
        process_group: the group the ranks share bytes over (default: DCP's default group);
            pass the group given to ``dcp.load``.
        exchange_bytes: most bytes one rank reads and receives in one round of a cooperative
            load (rounds overlap reading with sending; memory beyond the destinations stays
            within about twice this).

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
        cooperative: bool = False,
        process_group: Any = None,
        exchange_bytes: int = 64 << 20,
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
        self.cooperative = bool(cooperative)
        self.process_group = process_group
        if exchange_bytes < 1:
            raise ValueError(f"exchange_bytes must be at least 1, got {exchange_bytes}")
        self.exchange_bytes = int(exchange_bytes)
        #: Pinned staging pools per (engine, CUDA device), made by the first load into the device.
        self._pools = _device.PinnedPools()
        #: The checkpoint as the metadata read last opened it (sidecar, tables).
        self._checkpoint: checkpoint.Checkpoint | None = None
        self._metadata: Metadata | None = None
        self._missing_metadata: CheckpointError | None = None
        #: Statistics of the last read_data call (bytes read, calls).
        self.last_read_stats = ReadStats()

    def staging_pool(self, engine: Any, device: int) -> Any:
        """The pinned pool of ``device`` for ``engine``, created on first use."""
        return self._pools.get(engine, device, self.staging_bytes)

    @property
    def staging_bytes_held(self) -> int:
        """Pinned bytes this reader holds now (0 before the first CUDA load and after close)."""
        return self._pools.bytes_held

    def close(self) -> None:
        """Release the pinned staging memory (idempotent; a later load allocates it again)."""
        self._pools.close()

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        super().reset(checkpoint_id)
        self._checkpoint = None
        self._metadata = None

    # ------------------------------------------------------------------ metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = METADATA_NAME if rank is None else f"__{rank}{METADATA_NAME}"
        try:
            ck = open_checkpoint(str(self.path), name)
        except FileNotFoundError:
            err: CheckpointError = IncompleteCheckpointError(
                f"{self.path} holds no complete checkpoint: {METADATA_NAME} is missing "
                "(it is written last, when every rank has finished its data files)",
                filename=os.path.join(self.path, METADATA_NAME),
            ) if os.path.isdir(self.path) else IncompleteCheckpointError(
                f"{self.path} holds no checkpoint: the directory does not exist", filename=str(self.path)
            )
            if rank is not None and self._missing_metadata is not None:
                # The global metadata exists but was refused: that is the error to report.
                err = self._missing_metadata
            elif rank is None or os.path.lexists(os.path.join(self.path, METADATA_NAME)):
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
        self._checkpoint = ck
        # A copy: the checkpoint's own metadata is shared by every load of it (see open_checkpoint).
        metadata = copy.copy(ck.metadata)
        metadata.storage_meta = copy.copy(metadata.storage_meta) or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        missing, self._missing_metadata = self._missing_metadata, None
        if missing is not None:
            raise missing
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        checkpoint.validate_storage_data(str(self.path), self.storage_data)
        self._metadata = metadata

    # ------------------------------------------------------------------ reading

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        run = LoadRun(self, planner, self._checkpoint, self._metadata)
        if self.cooperative and cooperative.group_size(self.process_group) > 1:
            share = cooperative.Cooperation(run, plan.items, self.process_group, self.exchange_bytes)
            share.execute()
            run.stats.bytes_sent, run.stats.bytes_received = share.bytes_sent, share.bytes_received
        else:
            run.execute(plan.items)
        self.last_read_stats = run.stats
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut
