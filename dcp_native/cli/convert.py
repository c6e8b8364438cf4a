"""``dcp-native convert``: a checkpoint to one torch.save file, or a torch.save file to a checkpoint."""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .. import _fileio
from .._errors import CheckpointError
from ..reader import FileSystemReader
from ..writer import FileSystemWriter
from .common import (
    CommandFailed,
    _engine,
    EXIT_OK,
    _human,
    _METADATA,
    _one_line,
    _open_or_fail,
    _os_error_text,
    _plural,
    PROG,
    _select_keys,
    _torch_load_objects,
    UsageError,
    _weights_only_reason,
)

# --------------------------------------------------------------------------- convert


class _PickleRefused(Exception):
    """torch.load(weights_only=True) refused an object.

    Not a ValueError or UnpicklingError: the reader would wrap those as corruption.
    """


class _Unimportable(Exception):
    """An object's pickle names code that this environment cannot import."""


def _unwrap_checkpoint_exception(exc: BaseException) -> BaseException:
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return exc


def _wrote(dst: str, values: dict[str, Any], size: str, total: int, what: str) -> int:
    """Say what was written: ``values`` (the keys converted) of ``total`` keys."""
    n_tensors = sum(isinstance(v, torch.Tensor) for v in values.values())
    print(
        f"wrote {dst}: {_plural(n_tensors, 'tensor')}, {_plural(len(values) - n_tensors, 'object')}"
        f"{size} from {_plural(len(values), 'key')} of {total}{what}"
    )
    return EXIT_OK


def _check_output(dst: str, force: bool, want_dir: bool) -> None:
    if os.path.lexists(dst):
        if want_dir:
            if not os.path.isdir(dst):
                raise UsageError(f"{dst} exists and is not a directory")
            if os.listdir(dst) and not force:
                raise UsageError(f"{dst} exists and is not empty (--force writes into it)")
        else:
            if os.path.isdir(dst):
                raise UsageError(f"{dst} is a directory; give the path of the file to write")
            if not force:
                raise UsageError(f"{dst} exists (--force overwrites it)")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise UsageError(f"{parent}: no such directory")


def _convert_to_file(args: argparse.Namespace) -> int:
    ck = _open_or_fail(args.src)
    _check_output(args.dst, args.force, want_dir=False)
    sd_md = ck.metadata.state_dict_metadata
    keys = _select_keys(list(sd_md), args.keys, args.src)
    _engine()  # a bad DCP_NATIVE_BACKEND is a usage error, reported before any work

    # Preallocated outputs for the chosen keys only: the load reads nothing else.
    # A tensor cannot hold more bytes than the items on disk that store it; a
    # metadata file declaring more is refused before anything is allocated.
    stored: dict[str, int] = collections.defaultdict(int)
    file_sizes = ck.file_sizes()
    for index, info in (ck.metadata.storage_data or {}).items():
        stored[index.fqn] += max(0, min(info.length, file_sizes.get(info.relative_path, 0) - info.offset))
    flat: dict[str, Any] = {}
    for key in keys:
        md = sd_md[key]
        if isinstance(md, TensorStorageMetadata):
            nbytes = md.properties.dtype.itemsize
            for s in md.size:
                nbytes *= s
            if nbytes > stored[key]:
                raise CommandFailed(
                    f"{key!r}: the metadata declares a tensor of {nbytes} bytes, but its items "
                    f"in the data files hold {stored[key]} bytes; refusing to allocate it "
                    f"(run `{PROG} verify {args.src}`)"
                )
            flat[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        else:
            flat[key] = None
    objects: dict[str, Any] = {}
    weights_only = not args.allow_pickle

    class Planner(DefaultLoadPlanner):
        # DCP's own load_bytes unpickles with weights_only=False; we only do with --allow-pickle.
        def load_bytes(self, read_item, value):
            try:
                objects[read_item.dest_index.fqn] = _torch_load_objects(value, weights_only)
            except pickle.UnpicklingError as exc:
                raise _PickleRefused(
                    f"{read_item.dest_index.fqn!r} ({_weights_only_reason(exc)})"
                ) from None
            except (AttributeError, ImportError) as exc:
                raise _Unimportable(
                    f"object {read_item.dest_index.fqn!r}: {_one_line(exc)}"
                ) from None

    try:
        # The planner decides how objects unpickle (--allow-pickle), not the reader.
        reader = FileSystemReader(ck.directory, allow_pickle=True)
        dcp.load(flat, storage_reader=reader, planner=Planner(), no_dist=True)
    except BaseException as exc:  # DCP raises CheckpointException, a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        err = _unwrap_checkpoint_exception(exc)
        if isinstance(err, _PickleRefused):
            raise UsageError(
                f"torch.load(weights_only=True) refuses object {err}; if you trust "
                f"{args.src}, rerun with --allow-pickle"
            ) from None
        if isinstance(err, _Unimportable):
            raise CommandFailed(f"cannot unpickle {err} (is its package installed?)") from None
        if isinstance(err, OSError):
            raise CommandFailed(
                f"cannot load {args.src}: {_os_error_text(err)} (run `{PROG} verify` on it)"
            ) from None
        raise
    flat.update(objects)

    out: Any = flat
    mapping = getattr(ck.metadata, "planner_data", None)
    if not args.flat and isinstance(mapping, dict) and all(k in mapping for k in flat):
        out = unflatten_state_dict(flat, {k: mapping[k] for k in flat})
    tmp = f"{args.dst}.tmp{os.getpid()}"
    try:
        torch.save(out, tmp)
        os.replace(tmp, args.dst)
    except OSError as exc:
        raise CommandFailed(f"cannot write {args.dst}: {_os_error_text(exc)}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return _wrote(args.dst, flat, f" ({_human(os.path.getsize(args.dst))})", len(sd_md), "")


#: The pickled magic number that starts a torch.save file in the legacy (pre-zip) format.
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[2:]


def _is_torch_save_file(path: str) -> bool:
    try:
        fd = _fileio.open_regular(path, what="input")
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    try:
        start = os.pread(fd, 64, 0)
    finally:
        os.close(fd)
    return zipfile.is_zipfile(path) or _LEGACY_MAGIC in start[:16]


def _torch_load(src: str, weights_only: bool) -> Any:
    try:
        if not _is_torch_save_file(src):
            raise UsageError(
                f"{src} is not a torch.save file (neither a zip archive nor torch's legacy format)"
            )
    except OSError as exc:
        raise UsageError(_os_error_text(exc)) from None
    try:
        try:
            return _torch_load_objects(src, weights_only, map_location="cpu", mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files in the legacy (non-zip) format cannot be memory-mapped.
            return _torch_load_objects(src, weights_only, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if weights_only and "Unsupported global" in str(exc):
            raise UsageError(
                f"torch.load(weights_only=True) refuses {src} ({_weights_only_reason(exc)}); "
                "if you trust the file, rerun with --allow-pickle"
            ) from None
        raise UsageError(
            f"{src} is not a readable torch.save file: {_weights_only_reason(exc)}"
        ) from None
    except OSError as exc:
        raise UsageError(_os_error_text(exc)) from None
    except (AttributeError, ImportError) as exc:
        raise CommandFailed(
            f"cannot unpickle {src}: {_one_line(exc)} (is its package installed?)"
        ) from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise UsageError(f"{src} is not a readable torch.save file: {_one_line(exc)}") from None


def _convert_to_dcp(args: argparse.Namespace) -> int:
    _check_output(args.dst, args.force, want_dir=True)
    _engine()
    obj = _torch_load(args.src, weights_only=not args.allow_pickle)
    if not isinstance(obj, Mapping):
        raise UsageError(f"{args.src} holds a {type(obj).__name__}, not a state dict (a dict)")
    flat, mapping = flatten_state_dict(dict(obj))
    keys = _select_keys(list(flat), args.keys, args.src)
    chosen = {k: flat[k] for k in keys}
    if args.flat:
        state_dict = chosen
    else:
        state_dict = unflatten_state_dict(chosen, {k: mapping[k] for k in keys})
    try:
        dcp.save(state_dict, storage_writer=FileSystemWriter(args.dst), no_dist=True)
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        err = _unwrap_checkpoint_exception(exc)
        if isinstance(err, OSError):
            raise CommandFailed(f"cannot write {args.dst}: {_os_error_text(err)}") from None
        raise
    return _wrote(args.dst, chosen, "", len(flat), " (DCP checkpoint, written by dcp_native)")


def cmd_convert(args: argparse.Namespace) -> int:
    src = args.src
    if os.path.isdir(src) or os.path.basename(os.path.normpath(src)) == _METADATA:
        return _convert_to_file(args)
    if not os.path.exists(src):
        raise UsageError(f"{src}: no such file or directory")
    return _convert_to_dcp(args)
