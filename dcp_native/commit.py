"""The commit protocol: what makes a directory hold exactly one complete checkpoint.

Saves name their files after themselves (tags), hold a marker while in progress and take turns
on a directory lock to commit and clean up; only provably dead saves' files are ever removed.
The guarantees and the steps: "The commit protocol" in docs/ARCHITECTURE.md. Every system call
here goes through DCP_NATIVE_FAULT (one commit is one fault scope; see :mod:`dcp_native._fileio`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import re
import socket
import time
from typing import Any, Iterator

from . import _fileio, checkpoint, sidecar
from ._errors import CheckpointBusyError, CheckpointError

LOCK_NAME = ".dcp_native.lock"
#: How long a save waits for another one's commit or clean-up before it gives up.
LOCK_TIMEOUT = 600.0
#: flock failures that mean "this filesystem has no locks", not "someone holds it".
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

_TAG = r"[0-9a-f]{8}"
#: Files a save writes, by kind; each pattern's groups: rank (or None), tag (or None).
_NAMES = [
    ("data", re.compile(rf"^__(\d+)_\d+(?:\.({_TAG}))?\.distcp(?:\.crc32c)?$")),
    ("sidecar", re.compile(rf"^(?:__(\d+))?\.metadata\.({_TAG})\.dcp_native$")),
    ("temp", re.compile(rf"^(?:__(\d+))?\.metadata\.({_TAG})\.tmp$")),
    ("marker", re.compile(rf"^\.dcp_native\.()({_TAG})\.lock$")),
    # What stock DCP and earlier dcp_native versions leave (no tag).
    ("legacy", re.compile(r"^(?:__(\d+))?\.metadata(?:\.dcp_native)?\.tmp$()")),
    ("legacy", re.compile(r"^(?:__(\d+))?\.metadata\.dcp_native$()")),
]
_METADATA_RE = re.compile(r"^(?:__\d+)?\.metadata$")


def _marker_path(directory: str, tag: str) -> str:
    return os.path.join(directory, f".dcp_native.{tag}.lock")


def remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


# --------------------------------------------------------------------------- locks


def _flock(fd: int, operation: int) -> bool:
    """flock; False when the filesystem has no locks."""
    try:
        fcntl.flock(fd, operation)
        return True
    except OSError as exc:
        if exc.errno in _NO_LOCKS:
            return False
        raise


class DirectoryLock:
    """Exclusive ``flock`` on the directory's lock file, for commits and clean-ups (short)."""

    def __init__(self, directory: str, faults: _fileio.Faults | None = None,
                 timeout: float = LOCK_TIMEOUT) -> None:
        self.path = os.path.join(directory, LOCK_NAME)
        self.faults = faults
        self.timeout = timeout
        self.fd = -1

    def __enter__(self) -> "DirectoryLock":
        self.fd = _fileio.open_regular(self.path, os.O_RDWR | os.O_CREAT, 0o644,
                                       faults=self.faults, what="lock file")
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        try:
            while True:
                try:
                    _flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return self
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise CheckpointBusyError(
                            f"{os.path.dirname(self.path)}: another save has held {LOCK_NAME} for "
                            f"more than {self.timeout:.0f} s (committing or cleaning up); giving up",
                            filename=self.path,
                        ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        except BaseException:
            _fileio.close_quietly(self.fd)
            raise

    def __exit__(self, *exc) -> None:
        # Closing the descriptor drops the lock.
        _fileio.close_quietly(self.fd)
        self.fd = -1


class SaveMarker:
    """The marker of one save in progress: ``.dcp_native.<tag>.lock``, flocked while it runs.

    Made under the :class:`DirectoryLock`, so a clean-up never sees it half
    made. Released by :meth:`release` (which removes it) or, if its owner
    dies or drops it, by the kernel when the descriptor closes.
    """

    def __init__(self, directory: str, tag: str) -> None:
        self.directory = directory
        self.tag = tag
        self.path = _marker_path(directory, tag)
        self.fd = _fileio.open_regular(self.path, os.O_RDWR | os.O_CREAT, 0o644, what="lock file")
        try:
            # On a filesystem without locks the marker's presence is all there is
            # (save_alive then never calls a save dead).
            _flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except BaseException as exc:
            _fileio.close_quietly(self.fd)
            if isinstance(exc, BlockingIOError):
                raise CheckpointBusyError(
                    f"{directory}: a save with the same tag {tag} is in progress", filename=self.path
                ) from None
            raise

    @property
    def held(self) -> bool:
        return self.fd >= 0

    def release(self) -> None:
        """Remove the marker and drop its lock (idempotent)."""
        if self.fd >= 0:
            remove_quietly(self.path)
            _fileio.close_quietly(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        # Dropped without release (the save's owner went away): the lock goes
        # with the descriptor, the file stays and says the save is dead.
        if self.fd >= 0:
            _fileio.close_quietly(self.fd)
            self.fd = -1


def save_alive(directory: str, tag: str) -> bool:
    """Whether save ``tag`` is provably alive: its marker exists and someone holds its lock."""
    try:
        fd = _fileio.open_regular(_marker_path(directory, tag), os.O_RDONLY, what="lock file")
    except FileNotFoundError:
        return False
    except (OSError, CheckpointError):
        return True  # cannot tell: keep its files
    try:
        # True without locks on this filesystem: the save cannot be proved dead.
        return not _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        _fileio.close_quietly(fd)


# --------------------------------------------------------------------------- what is committed


def committed_files(directory: str, known: dict[str, Any] | None = None) -> set[str] | None:
    """Every file some committed metadata in ``directory`` names (data files, tables, sidecars).

    ``known`` maps metadata file names to their parsed metadata (not read
    again). None when a metadata file cannot be read: then nothing may be removed.
    """
    keep: set[str] = set()
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    for name in names:
        if not _METADATA_RE.match(name):
            continue
        metadata = (known or {}).get(name)
        if metadata is None:
            try:
                metadata, _ = checkpoint.load_metadata(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            except (OSError, CheckpointError):
                return None
        keep |= checkpoint.named_files(name, metadata)
    return keep


def _listing(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _save_files(names: list[str], rank: int | None = None) -> Iterator[tuple[str, str, str | None]]:
    """``(name, kind, tag)`` of the files saves write among ``names`` (``rank``'s, if given): the
    only files in a directory ever touched."""
    for name in names:
        for kind, pattern in _NAMES:
            m = pattern.match(name)
            if m:
                if rank is None or (int(m[1]) if m[1] else None) == rank:
                    yield name, kind, m[2] or None
                break


def remove_dead(directory: str, keep: set[str], own_tag: str | None, rank: int | None) -> None:
    """Remove files of dead saves and untagged data files (stock's, earlier dcp_native's) that no
    committed metadata names (best effort; under the :class:`DirectoryLock`). With ``rank`` (a
    rank-local save) only that rank's files are considered."""
    alive = functools.cache(lambda tag: save_alive(directory, tag))
    for name, _, tag in _save_files(_listing(directory), rank):
        if name not in keep and (tag is None or (tag != own_tag and not alive(tag))):
            remove_quietly(os.path.join(directory, name))


def clean_before_save(directory: str, own_tag: str, rank: int | None) -> None:
    """Before a save writes anything: remove leftovers of dead saves (under the directory lock).

    Reading the committed metadata costs time on large checkpoints, so it is
    read only when there can be something to remove: files of more than one
    dead save, or untagged data files, or no metadata at all.
    """
    names = _listing(directory)
    dead: set[str] = set()
    untagged = False
    for _, _, tag in _save_files(names, rank):
        if tag is None:
            untagged = True
        elif tag != own_tag and tag not in dead and not save_alive(directory, tag):
            dead.add(tag)
    if not dead and not untagged:
        return
    has_metadata = any(_METADATA_RE.match(name) for name in names)
    if has_metadata and not untagged and len(dead) == 1:
        return  # the one dead save is, in all likelihood, the committed checkpoint
    keep = committed_files(directory) if has_metadata else set()
    if keep is not None:
        remove_dead(directory, keep, own_tag, rank)


def remove_own(directory: str, tag: str, keep: set[str] | None) -> None:
    """Remove every file of save ``tag`` except its marker and what ``keep`` names (best effort).

    For a save that failed: its files are garbage, unless a committed metadata
    names them (``keep``; None means it cannot be known, and nothing but
    temporary files goes).
    """
    for name, kind, file_tag in _save_files(_listing(directory)):
        if file_tag != tag or kind == "marker":
            continue
        if (kind == "temp") if keep is None else (name not in keep):
            remove_quietly(os.path.join(directory, name))


# --------------------------------------------------------------------------- the commit


def _write_file(path: str, data: bytes, sync: bool, faults: _fileio.Faults) -> None:
    """Create ``path`` (which must not exist), write ``data``, fsync when ``sync``, close."""
    fd = _fileio.open_regular(
        path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, faults=faults, what="metadata file"
    )
    try:
        view = memoryview(data)
        offset = 0
        while offset < len(view):
            done = _fileio.os_call(faults, _fileio.WRITE, os.pwrite, "pwrite", path, offset, fd,
                                   view[offset:], offset)
            if done == 0:
                raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (pwrite at offset {offset})", path)
            offset += done
        if sync:
            _fileio.os_call(faults, _fileio.FSYNC, os.fsync, "fsync", path, -1, fd)
    except BaseException:
        _fileio.close_quietly(fd)
        raise
    _fileio.os_call(faults, _fileio.CLOSE, os.close, "close", path, -1, fd)


def _fsync_directory(directory: str, faults: _fileio.Faults) -> None:
    fd = _fileio.os_call(faults, _fileio.OPEN, os.open, "open", directory, -1, directory,
                         os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    try:
        _fileio.os_call(faults, _fileio.FSYNC, os.fsync, "fsync", directory, -1, fd)
    finally:
        _fileio.close_quietly(fd)


def commit(
    directory: str,
    metadata_name: str,
    metadata_bytes: bytes,
    sidecar_bytes: bytes,
    save_id: str,
    *,
    sync: bool,
    overwrite: bool,
    rank: int | None,
    metadata: Any,
) -> None:
    """Commit one save: sidecar, ``.metadata`` (temp, fsync, rename), directory fsync, clean-up.

    Runs under the directory lock. On failure before the rename, the save's
    own sidecar and temporary file are removed and the error raised; the
    previous checkpoint is untouched. A failure after the rename (the
    directory fsync) raises too, but the new checkpoint is already the
    committed one and nothing of it is removed.
    """
    faults = _fileio.Faults()
    tag = sidecar.save_tag(save_id)
    metadata_path = os.path.join(directory, metadata_name)
    temp_path = os.path.join(directory, f"{metadata_name}.{tag}.tmp")
    sidecar_path = os.path.join(directory, sidecar.file_name(metadata_name, save_id))
    with DirectoryLock(directory, faults):
        renamed = False
        try:
            if not overwrite and os.path.lexists(metadata_path):
                raise CheckpointBusyError(
                    f"{directory}: another save committed a checkpoint here while this one was "
                    "writing, and overwrite=False; this save is abandoned",
                    filename=metadata_path,
                )
            _write_file(sidecar_path, sidecar_bytes, sync, faults)
            _write_file(temp_path, metadata_bytes, sync, faults)
            _fileio.os_call(faults, _fileio.RENAME, os.rename, "rename", temp_path, -1,
                            temp_path, metadata_path)
            renamed = True
            if sync:
                _fsync_directory(directory, faults)
        except BaseException:
            if not renamed:
                remove_quietly(temp_path)
                remove_quietly(sidecar_path)
            raise
        keep = committed_files(directory, {metadata_name: metadata})
        if keep is not None:
            remove_dead(directory, keep, tag, rank)
