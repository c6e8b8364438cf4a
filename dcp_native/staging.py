"""Staging for async saves: a state dict copied into host memory that is reused across saves.

``async_save`` blocks the training loop for as long as ``stage()`` takes: one
memory copy into a buffer laid out once per state dict layout and reused
(page-locked when a tensor is on a CUDA device). The design, the lease rules
that keep a buffer from being overwritten while a save may still read it, and
how staged DTensors cross to DCP's checkpoint process are in "Async saves:
staging" of docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import copy
import io
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from . import _device, config

try:  # torch.distributed may be built without these
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None  # type: ignore[assignment,misc]
try:
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
except ImportError:  # pragma: no cover - depends on the torch build
    Shard = ShardedTensor = None  # type: ignore[assignment,misc]

#: Offsets of tensors in the buffer: cache-line aligned, page aligned from _PAGE_FROM bytes on.
_ALIGN = 64
_PAGE = 4096
_PAGE_FROM = 64 << 10
#: Seconds between checks of a lease that is waited for, without and with a known save thread.
_POLL_S = 0.002
_JOIN_S = 0.05

_IMMUTABLE = (int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device)


class StagingBusyError(RuntimeError):
    """The previous save still uses the staging area and did not finish within the timeout."""


class StagedStateDict(dict):
    """The state dict ``stage()`` returns: a weakly referable dict that pickles DTensors as their parts."""

    __slots__ = ("__weakref__",)

    def __reduce__(self) -> tuple:
        # Only containers _build made are walked; everything else it deep-copied has storages of its own.
        by_parts = _map(self, lambda v, _: _DTensorParts(v) if _is(v, DTensor) else v)
        return (_unpickle_staged, (by_parts,))


def _unpickle_staged(items: dict[str, Any]) -> StagedStateDict:
    return StagedStateDict(items)


class _DTensorParts:
    """A staged DTensor in pickle: sent as its local tensor and spec, a DTensor again when unpickled."""

    __slots__ = ("dtensor",)

    def __init__(self, dtensor: Any) -> None:
        self.dtensor = dtensor

    def __reduce__(self) -> tuple:
        d = self.dtensor
        return (_dtensor_from_parts, (d._local_tensor, d._spec, d.requires_grad))


def _dtensor_from_parts(local: torch.Tensor, spec: Any, requires_grad: bool) -> Any:
    return DTensor(local, spec, requires_grad=requires_grad)


def _is(obj: Any, cls: type | None) -> bool:
    """isinstance for the classes this torch build may lack (None)."""
    return cls is not None and isinstance(obj, cls)


def _map(obj: Any, fn: Any, path: tuple = ()) -> Any:
    """``obj``'s dicts, lists and tuples rebuilt (plain; named tuples kept), ``fn(value, path)`` in
    place of everything else, called in order."""
    if isinstance(obj, dict):
        return {k: _map(v, fn, path + (k,)) for k, v in obj.items()}
    if not isinstance(obj, (list, tuple)):
        return fn(obj, path)
    items = [_map(v, fn, path + (i,)) for i, v in enumerate(obj)]
    if isinstance(obj, list):
        return items
    return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)


class Lease:
    """One staged state dict's claim on the staging buffer (see docs/ARCHITECTURE.md)."""

    def __init__(self, previous: "Lease | None" = None) -> None:
        self.released = threading.Event()
        #: The thread that called stage(); never taken for the background save.
        self.stager = threading.current_thread()
        #: The thread running the save in the background, once known.
        self.owner: threading.Thread | None = None
        self.staged: weakref.ref | None = None
        #: The lease this one waits for before copying (asynchronous staging).
        self.previous = previous

    def release(self) -> None:
        self.released.set()

    def claim(self) -> bool:
        """Record the calling thread as the background save's, unless it is the stager's; True if it was."""
        thread = threading.current_thread()
        if self.owner is None and thread is not self.stager and not self.released.is_set():
            self.owner = thread
            return True
        return False

    def free(self) -> bool:
        # A lease whose staging gave up waiting (StagingBusyError) is released,
        # but the buffer is no freer than the lease it waited for.
        previous = self.previous
        if previous is not None and not previous.free():
            return False
        if self.released.is_set():
            return True
        owner = self.owner
        if owner is not None:
            return not owner.is_alive()
        staged = self.staged
        return staged is not None and staged() is None

    def wait(self, timeout: float | None) -> None:
        """Wait until the lease is free; StagingBusyError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.previous is not None:
            self.previous.wait(timeout)
        while not self.free():
            if deadline is not None and time.monotonic() >= deadline:
                what = (
                    f"the save running in thread {self.owner.name!r}"
                    if self.owner is not None
                    else "a staged state dict that is still referenced but not being saved"
                )
                raise StagingBusyError(
                    f"dcp_native: cannot stage: the staging area is still used by {what} "
                    f"after {timeout:g} s. Wait for the previous async_save's future before "
                    "the next one, raise the writer's staging_timeout, or use one writer per "
                    "concurrent save."
                )
            owner = self.owner
            if owner is not None:
                # Returns the moment the save's thread ends (it releases, if at all, just before).
                owner.join(_JOIN_S if deadline is None else max(0.0, min(_JOIN_S, deadline - time.monotonic())))
            else:
                self.released.wait(_POLL_S)


def _stageable(t: torch.Tensor) -> bool:
    """A dense tensor whose values can be copied into the buffer as they are."""
    return (
        (type(t) is torch.Tensor or type(t) is torch.nn.Parameter)
        and t.layout == torch.strided
        and not t.is_quantized
        and t.device.type in ("cpu", "cuda")
    )


def _leaves(obj: Any) -> list[tuple[tuple, torch.Tensor]]:
    """``(path, tensor)`` of every tensor :func:`_build` copies into the buffer, in its order."""
    out: list[tuple[tuple, torch.Tensor]] = []

    def visit(obj: Any, path: tuple) -> None:
        if _is(obj, DTensor):
            obj = obj._local_tensor
        elif _is(obj, ShardedTensor):
            out.extend((path + (i,), s.tensor) for i, s in enumerate(obj.local_shards())
                       if _stageable(s.tensor))
            return
        if isinstance(obj, torch.Tensor) and _stageable(obj):
            out.append((path, obj))

    _map(obj, visit)
    return out


def _pin(ptr: int, nbytes: int, device: int, pin: bool = True) -> bool:
    """Pin (or unpin) the buffer through the native engine's CUDA runtime, from one of its threads on
    ``device`` (the tensors' own: the calling thread may sit on a device without a context, where a
    runtime call would create one). False without the native module or when pinning fails."""
    try:
        from ._C import host_register
    except ImportError:
        return False
    try:
        host_register(ptr, nbytes, device, config.current().cudart, pin)
    except (RuntimeError, ValueError):  # CudaError, or a runtime not loaded
        return False
    return True


def _allocate(nbytes: int, device: int) -> tuple[torch.Tensor, int]:
    """A uint8 buffer of ``nbytes``; page-locked when ``device`` >= 0 (the device of the staged CUDA
    tensors). Returns it and its registered address (or 0)."""
    if device < 0 or nbytes == 0:
        return torch.empty(nbytes, dtype=torch.uint8), 0
    try:
        new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
        if new_shared is not None:
            buf = torch.empty(0, dtype=torch.uint8).set_(new_shared(nbytes))
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        if _pin(buf.data_ptr(), nbytes, device):
            return buf, buf.data_ptr()
    except RuntimeError:
        pass  # no (or not enough) shared memory: torch's pinned allocator below
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), 0


class StagingArea:
    """Host memory that state dicts are staged into for async saves, reused across saves.

    Args:
        capacity: most bytes the buffer may hold (None: no bound).
        timeout: seconds ``stage()`` waits for the previous save to release the
            buffer before it raises :class:`StagingBusyError` (None: no limit).

    Example:
        >>> import torch
        >>> area = StagingArea()
        >>> sd = {"w": torch.ones(3), "step": 7}
        >>> staged = area.stage(sd)
        >>> sd["w"].add_(1)[0].item(), staged["w"][0].item(), staged["step"], area.bytes_held
        (2.0, 1.0, 7, 12)
        >>> area.close(); area.bytes_held
        0
    """

    def __init__(self, capacity: int | None = None, timeout: float | None = 1800.0) -> None:
        if capacity is not None and capacity < 0:
            raise ValueError(f"staging capacity must be non-negative or None, got {capacity}")
        self.capacity = capacity
        self.timeout = timeout
        self._lock = threading.Lock()
        self._layout: tuple | None = None
        self._views: list[torch.Tensor] = []
        self._buffer: torch.Tensor | None = None
        self._registered = 0
        self._device = -1
        self._lease: Lease | None = None
        self._streams: dict[int, Any] = {}
        self._executor: ThreadPoolExecutor | None = None
        #: How many times the buffer was (re)allocated, for tests and reports.
        self.allocations = 0

    # ------------------------------------------------------------------ state

    @property
    def bytes_held(self) -> int:
        """Bytes of host memory the staging buffer holds now (0 before the first stage and after close)."""
        buf = self._buffer
        return 0 if buf is None else buf.numel()

    @property
    def lease(self) -> Lease | None:
        """The lease of the latest ``stage()``."""
        return self._lease

    def claim(self) -> bool:
        """Record the calling thread as the one saving the latest staged state dict; True when this
        call recorded it (the save's first call on that thread; see docs/ARCHITECTURE.md)."""
        lease = self._lease
        return lease is not None and lease.claim()

    def close(self) -> None:
        """Free the buffer (idempotent). Staged state dicts still referenced keep their memory alive."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        with self._lock:
            self._free()
            self._streams.clear()

    def _free(self) -> None:
        if self._registered:
            _pin(self._registered, 0, self._device, pin=False)
            self._registered = 0
        self._buffer = None
        self._layout = None
        self._views = []

    def __del__(self) -> None:
        try:
            self._free()
        except Exception:  # noqa: BLE001 - interpreter shutdown; nothing to report to
            pass

    # ------------------------------------------------------------------ staging

    def stage(self, state_dict: dict[str, Any]) -> StagedStateDict:
        """Copy ``state_dict`` into the buffer once the previous staged state dict's lease is free
        (docs/ARCHITECTURE.md); return the staged state dict: CPU views of the buffer with the values
        as of this call (the caller may change its tensors once this returns)."""
        with self._lock:
            if self._lease is not None:
                self._lease.wait(self.timeout)
            # Taken once the previous one is free: until then the previous save's
            # thread may still claim the previous lease.
            lease = self._lease = Lease()
            return self._stage_leased(lease, state_dict, None)

    def stage_async(self, state_dict: dict[str, Any]) -> "Future[StagedStateDict]":
        """Like :meth:`stage`, on a background thread: the caller may change the tensors once the
        future is done. Copies of CUDA tensors wait for the work queued on their devices' current
        streams at this call; stagings run one after the other, each once the previous lease is free."""
        events = self._record_events(state_dict)
        lease = self._lease = Lease(previous=self._lease)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="dcp_native-staging")

        def run() -> StagedStateDict:
            with self._lock:
                return self._stage_leased(lease, state_dict, events)

        try:
            return self._executor.submit(run)
        except BaseException:
            lease.release()
            raise

    def _stage_leased(self, lease: Lease, state_dict: dict[str, Any], events: dict[int, Any] | None) -> StagedStateDict:
        """Under the lock: wait for the previous lease, stage; a failure releases ``lease``."""
        try:
            if lease.previous is not None:
                lease.previous.wait(self.timeout)
                lease.previous = None
            staged = self._stage_locked(state_dict, events)
        except BaseException:
            lease.release()
            raise
        lease.staged = weakref.ref(staged)
        return staged

    @staticmethod
    def _record_events(state_dict: dict[str, Any]) -> dict[int, Any]:
        events = {}
        for _, t in _leaves(state_dict):
            if t.is_cuda and t.device.index not in events:
                events[t.device.index] = torch.cuda.current_stream(t.device).record_event()
        return events

    def _stage_locked(self, state_dict: dict[str, Any], events: dict[int, Any] | None) -> StagedStateDict:
        leaves = _leaves(state_dict)
        device = max((_device.cuda_index(t) for _, t in leaves), default=-1)
        layout = (device,) + tuple((path, tuple(t.shape), t.dtype, t.device.type) for path, t in leaves)
        if layout != self._layout:
            self._lay_out(leaves, device, layout)
        with torch.no_grad():
            streams = self._copy(leaves, self._views, events)
        staged = _build(state_dict, iter(self._views))
        for stream in streams:
            stream.synchronize()
        return StagedStateDict(staged)

    def _lay_out(self, leaves: list, device: int, layout: tuple) -> None:
        slots = []
        offset = 0
        for _, t in leaves:
            nbytes = t.numel() * t.element_size()
            align = _PAGE if nbytes >= _PAGE_FROM else _ALIGN
            offset = -(-offset // align) * align
            slots.append((offset, nbytes, t.dtype, t.shape))
            offset += nbytes
        if self.capacity is not None and offset > self.capacity:
            raise ValueError(
                f"dcp_native: the state dict needs {offset} bytes of staging memory "
                f"({len(leaves)} tensors), more than the writer's staging_bytes={self.capacity}; "
                "raise staging_bytes (None: no bound) or save it synchronously with dcp.save"
            )
        self._free()
        self._buffer, self._registered = _allocate(offset, device)
        self._device = device
        # One view per tensor, made once per layout: the staged state dicts of
        # every save with this layout hold these same tensors.
        self._views = [self._buffer[at : at + n].view(dtype).view(shape) for at, n, dtype, shape in slots]
        self._layout = layout
        self.allocations += 1

    def _copy(self, leaves: list, views: list, events: dict[int, Any] | None) -> list:
        """Copy every leaf into its view (under no_grad); return the side streams to synchronize."""
        used: dict[int, Any] = {}
        for (_, src), dst in zip(leaves, views):
            if not src.is_cuda:
                dst.copy_(src)
                continue
            index = src.device.index
            if index not in used:
                if index not in self._streams:
                    self._streams[index] = torch.cuda.Stream(src.device)
                stream = used[index] = self._streams[index]
                if events is not None and index in events:
                    stream.wait_event(events[index])
                else:
                    stream.wait_stream(torch.cuda.current_stream(src.device))
            with torch.cuda.stream(used[index]):
                dst.copy_(src, non_blocking=True)
        return list(used.values())


def _build(state_dict: dict[str, Any], views) -> dict[str, Any]:
    """The staged copy of ``state_dict``; takes the views of :func:`_leaves`'s tensors in order."""
    memo: dict[int, Any] = {}

    def staged(obj: Any, _: tuple) -> Any:
        if _is(obj, DTensor):
            return DTensor(staged(obj._local_tensor, _), obj._spec, requires_grad=False)
        if _is(obj, ShardedTensor):
            return _sharded(obj, views)
        if isinstance(obj, torch.Tensor):
            return next(views) if _stageable(obj) else _copy_other(obj)
        if isinstance(obj, _IMMUTABLE):
            return obj
        if isinstance(obj, io.BytesIO):
            return io.BytesIO(obj.getvalue())
        return copy.deepcopy(obj, memo)

    return _map(state_dict, staged)


def _copy_other(t: torch.Tensor) -> torch.Tensor:
    """Tensors the buffer does not take (sparse, quantized, meta, subclasses): a fresh CPU copy."""
    t = t.detach()
    return t.cpu() if t.device.type not in ("cpu", "meta") else t.clone()


def _sharded(obj: Any, views) -> Any:
    staged = []
    for shard in obj.local_shards():
        t = shard.tensor
        s = next(views) if _stageable(t) else _copy_other(t)
        staged.append(s.detach().requires_grad_(True) if _stageable(t) and t.requires_grad else s)
    try:
        shards = [Shard(s, shard.metadata) for s, shard in zip(staged, obj.local_shards())]
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards,
            obj.metadata(),
            process_group=obj._process_group,
            init_rrefs=getattr(obj, "_init_rrefs", False),
            sharding_spec=obj.sharding_spec(),
        )
    except (ValueError, RuntimeError):
        # The metadata does not accept host copies (shards on a device, pinned
        # properties): torch's own way, a fresh CPU copy.
        return obj.to(device="cpu") if obj.local_shards() and obj.local_shards()[0].tensor.is_cuda else copy.deepcopy(obj)

