"""save / load / async_save: DCP's functions, defaulting to dcp_native's storage for a checkpoint_id."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Callable, Iterator

import torch.distributed.checkpoint as dcp

from .reader import FileSystemReader
from .staging import StagingBusyError
from .writer import FileSystemWriter


#: Per directory, the event that the last save this process began there has completed.
_LAST_SAVES: dict[str, threading.Event] = {}
_LAST_SAVES_LOCK = threading.Lock()


@contextlib.contextmanager
def _turn(path: str | os.PathLike, timeout: float | None) -> Iterator[Callable[[], None]]:
    """Wait until the previous save to ``path`` has completed, however it ended; yield ``end``,
    which the caller calls once this one has (a body that raises ends the turn). Writers made here
    are new each call, so the order a kept writer keeps is kept per directory instead."""
    key = os.path.realpath(os.fspath(path))
    done = threading.Event()
    with _LAST_SAVES_LOCK:
        previous, _LAST_SAVES[key] = _LAST_SAVES.get(key), done

    def end() -> None:
        done.set()
        with _LAST_SAVES_LOCK:
            if _LAST_SAVES.get(key) is done:
                del _LAST_SAVES[key]

    try:
        if previous is not None and not previous.wait(timeout):
            raise StagingBusyError(
                f"{key}: the previous save to this checkpoint did not complete within "
                f"{timeout} s (saves to one directory run one after the other)"
            )
        yield end
    except BaseException:
        end()
        raise


def save(
    state_dict: dict[str, Any],
    *,
    checkpoint_id: str | os.PathLike | None = None,
    storage_writer: Any = None,
    **kwargs: Any,
):
    """``torch.distributed.checkpoint.save`` with dcp_native's writer for ``checkpoint_id``.

    All other arguments (planner, process_group, no_dist, ...) are DCP's.

    Example:
        >>> import tempfile, torch, dcp_native
        >>> path = tempfile.mkdtemp()
        >>> _ = dcp_native.save({"w": torch.ones(2)}, checkpoint_id=path, no_dist=True)
    """
    if storage_writer is not None or checkpoint_id is None:
        return dcp.save(state_dict, checkpoint_id=checkpoint_id, storage_writer=storage_writer,
                        **kwargs)
    writer = FileSystemWriter(checkpoint_id)
    with _turn(checkpoint_id, writer.staging_timeout) as end:
        result = dcp.save(state_dict, checkpoint_id=checkpoint_id, storage_writer=writer, **kwargs)
        end()
        return result


def load(
    state_dict: dict[str, Any],
    *,
    checkpoint_id: str | os.PathLike | None = None,
    storage_reader: Any = None,
    **kwargs: Any,
) -> None:
    """``torch.distributed.checkpoint.load`` with dcp_native's reader for ``checkpoint_id``.

    Example:
        >>> import tempfile, torch, dcp_native
        >>> path = tempfile.mkdtemp()
        >>> _ = dcp_native.save({"w": torch.ones(2)}, checkpoint_id=path, no_dist=True)
        >>> sd = {"w": torch.zeros(2)}
        >>> dcp_native.load(sd, checkpoint_id=path, no_dist=True)
        >>> sd["w"].tolist()
        [1.0, 1.0]
    """
    if storage_reader is None and checkpoint_id is not None:
        storage_reader = FileSystemReader(checkpoint_id)
    return dcp.load(state_dict, checkpoint_id=checkpoint_id, storage_reader=storage_reader, **kwargs)


def async_save(
    state_dict: dict[str, Any],
    *,
    checkpoint_id: str | os.PathLike | None = None,
    storage_writer: Any = None,
    **kwargs: Any,
):
    """``torch.distributed.checkpoint.async_save`` with dcp_native's writer for ``checkpoint_id``.

    Blocks while the writer stages the state dict (one copy into memory it reuses across saves:
    pass the same ``storage_writer`` to every call; one made here is closed after its save), then
    the writes run in DCP's background thread or process. Saves to one ``checkpoint_id`` run one
    after the other: a call waits up to the writer's ``staging_timeout`` (then
    :class:`~dcp_native.StagingBusyError`) for the previous one. Returns what DCP returns: a future
    of the save or, when staging is asynchronous (``async_staging``, or an ``async_stager`` that
    returns a future), a response with ``staging_completion`` and ``upload_completion``; a failed
    write raises from the future.

    Example:
        >>> import tempfile, torch, dcp_native
        >>> path = tempfile.mkdtemp()
        >>> sd = {"w": torch.ones(2)}
        >>> fut = dcp_native.async_save(sd, checkpoint_id=path, no_dist=True)
        >>> sd["w"].zero_()  # training goes on; the checkpoint holds the ones
        tensor([0., 0.])
        >>> _ = fut.result()
    """
    if storage_writer is not None or checkpoint_id is None:
        return _async_save(state_dict, checkpoint_id, storage_writer, kwargs)[0]
    writer = FileSystemWriter(checkpoint_id)
    with _turn(checkpoint_id, writer.staging_timeout) as end:
        result, upload = _async_save(state_dict, checkpoint_id, writer, kwargs)
        # A writer made for this call: its staging memory is not reused; free it now.
        upload.add_done_callback(lambda _: writer.close())
        upload.add_done_callback(lambda _: end())
    return result


def _lease(writer: Any) -> Any:
    staging = getattr(writer, "_staging", None)
    return staging.lease if staging is not None else None


def _async_save(state_dict, checkpoint_id, writer, kwargs) -> tuple[Any, Any]:
    """DCP's async_save; returns its result and the future of the upload."""
    before = _lease(writer)
    result = dcp.async_save(state_dict, checkpoint_id=checkpoint_id, storage_writer=writer, **kwargs)
    # The writer's staging area is free again once the upload has completed,
    # whichever way it ended (the writer also learns it from its own calls).
    lease = _lease(writer)
    upload = getattr(result, "upload_completion", result)
    if lease is not None and lease is not before:
        upload.add_done_callback(lambda _: lease.release())
    return result, upload


def save_state_dict(state_dict: dict[str, Any], storage_writer: Any, **kwargs: Any):
    """DCP's deprecated ``save_state_dict``; ``storage_writer`` may be a path."""
    if isinstance(storage_writer, (str, os.PathLike)):
        storage_writer = FileSystemWriter(storage_writer)
    return dcp.save_state_dict(state_dict, storage_writer, **kwargs)


def load_state_dict(state_dict: dict[str, Any], storage_reader: Any, **kwargs: Any) -> None:
    """DCP's deprecated ``load_state_dict``; ``storage_reader`` may be a path."""
    if isinstance(storage_reader, (str, os.PathLike)):
        storage_reader = FileSystemReader(storage_reader)
    return dcp.load_state_dict(state_dict, storage_reader, **kwargs)
