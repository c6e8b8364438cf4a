"""``dcp-native convert``: a checkpoint to one torch.save file, or a torch.save file to a checkpoint."""

from __future__ import annotations

import argparse
import collections
import io
import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .. import _fileio
from ..reader import FileSystemReader
from ..writer import FileSystemWriter
from .common import (
    CommandFailed, _engine, EXIT_OK, _human, _METADATA, _one_line, _open_checkpoint, _os_error_text,
    _plural, PROG, _select_keys, UsageError,
)


def _weights_only_reason(exc: BaseException) -> str:
    """The line of torch.load's weights_only refusal that names the refused global."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    for line in text.split(marker, 1)[1].splitlines() if marker in text else ():
        if line.strip():
            return line.strip().split(". ", 1)[0]
    return _one_line(exc)


def _torch_load(source: Any, weights_only: bool, **kwargs: Any) -> Any:
    """torch.load, with io.BytesIO allowed under weights_only (DCP saves BytesIO values as such)."""
    if not weights_only:
        return torch.load(source, weights_only=False, **kwargs)
    with torch.serialization.safe_globals([io.BytesIO]):
        return torch.load(source, weights_only=True, **kwargs)


def _run_dcp(call: Callable[[], Any], on_os_error: Callable[[str], str]) -> None:
    """Run a dcp.load or dcp.save; the error it wraps (in CheckpointException, a BaseException)
    is raised as such, an OSError as CommandFailed(``on_os_error(the error's text)``)."""
    try:
        call()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        failures = getattr(exc, "failures", None)
        err = next(iter(failures.values())) if isinstance(failures, dict) and failures else exc
        err = err[0] if isinstance(err, tuple) else err
        if isinstance(err, (UsageError, CommandFailed)):
            raise err from None
        if isinstance(err, OSError):
            raise CommandFailed(on_os_error(_os_error_text(err))) from None
        raise


def _wrote(dst: str, values: dict[str, Any], size: str, total: int, what: str) -> int:
    """Say what was written: ``values`` (the keys converted) of ``total`` keys."""
    n_tensors = sum(isinstance(v, torch.Tensor) for v in values.values())
    print(f"wrote {dst}: {_plural(n_tensors, 'tensor')}, {_plural(len(values) - n_tensors, 'object')}"
          f"{size} from {_plural(len(values), 'key')} of {total}{what}")
    return EXIT_OK


def _check_output(dst: str, force: bool, want_dir: bool) -> None:
    if want_dir and os.path.lexists(dst):
        if not os.path.isdir(dst):
            raise UsageError(f"{dst} exists and is not a directory")
        if os.listdir(dst) and not force:
            raise UsageError(f"{dst} exists and is not empty (--force writes into it)")
    elif os.path.lexists(dst):
        if os.path.isdir(dst):
            raise UsageError(f"{dst} is a directory; give the path of the file to write")
        if not force:
            raise UsageError(f"{dst} exists (--force overwrites it)")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise UsageError(f"{parent}: no such directory")


def _convert_to_file(args: argparse.Namespace) -> int:
    ck = _open_checkpoint(args.src)
    _check_output(args.dst, args.force, want_dir=False)
    sd_md = ck.metadata.state_dict_metadata
    keys = _select_keys(list(sd_md), args.keys, args.src)
    _engine()  # a bad DCP_NATIVE_BACKEND is a usage error, reported before any work

    # Preallocated outputs for the chosen keys only: the load reads nothing else.
    # A tensor cannot hold more bytes than the items on disk that store it; a
    # metadata file declaring more is refused before anything is allocated.
    stored: dict[str, int] = collections.defaultdict(int)
    for it in ck.item_list:
        stored[it.key] += max(0, min(it.length, ck.sizes.get(it.file, 0) - it.offset))
    flat: dict[str, Any] = {}
    for key in keys:
        md = sd_md[key]
        if not isinstance(md, TensorStorageMetadata):
            flat[key] = None
        elif (nbytes := md.properties.dtype.itemsize * math.prod(md.size)) > stored[key]:
            raise CommandFailed(
                f"{key!r}: the metadata declares a tensor of {nbytes} bytes, but its items in the "
                f"data files hold {stored[key]} bytes; refusing to allocate it (run `{PROG} verify {args.src}`)")
        else:
            flat[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    objects: dict[str, Any] = {}

    class Planner(DefaultLoadPlanner):
        # DCP's own load_bytes unpickles with weights_only=False; we only do with --allow-pickle.
        # Its errors are not ValueError or UnpicklingError: the reader would wrap those as corruption.
        def load_bytes(self, read_item, value):
            key = read_item.dest_index.fqn
            try:
                objects[key] = _torch_load(value, not args.allow_pickle)
            except pickle.UnpicklingError as exc:
                raise UsageError(f"torch.load(weights_only=True) refuses object {key!r} "
                                 f"({_weights_only_reason(exc)}); if you trust {args.src}, "
                                 "rerun with --allow-pickle") from None
            except (AttributeError, ImportError) as exc:
                raise CommandFailed(f"cannot unpickle object {key!r}: {_one_line(exc)} "
                                    "(is its package installed?)") from None

    # The planner decides how objects unpickle (--allow-pickle), not the reader.
    reader = FileSystemReader(ck.directory, allow_pickle=True)
    _run_dcp(lambda: dcp.load(flat, storage_reader=reader, planner=Planner(), no_dist=True),
             lambda why: f"cannot load {args.src}: {why} (run `{PROG} verify` on it)")
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


def _load_input(src: str, weights_only: bool) -> Any:
    """The object in torch.save file ``src``; what is not one is a UsageError."""
    try:
        fd = _fileio.open_regular(src, what="input")  # refuses a FIFO, which zipfile would block on
        try:
            start = os.pread(fd, 64, 0)
        finally:
            os.close(fd)
        is_zip = zipfile.is_zipfile(src)
    except OSError as exc:
        raise UsageError(_os_error_text(exc)) from None
    if not is_zip and _LEGACY_MAGIC not in start[:16]:
        raise UsageError(f"{src} is not a torch.save file (neither a zip archive nor torch's legacy format)")
    try:
        # Files in the legacy (non-zip) format cannot be memory-mapped.
        return _torch_load(src, weights_only, map_location="cpu", mmap=is_zip)
    except pickle.UnpicklingError as exc:
        if weights_only and "Unsupported global" in str(exc):
            raise UsageError(f"torch.load(weights_only=True) refuses {src} ({_weights_only_reason(exc)}); "
                             "if you trust the file, rerun with --allow-pickle") from None
        raise UsageError(f"{src} is not a readable torch.save file: {_weights_only_reason(exc)}") from None
    except OSError as exc:
        raise UsageError(_os_error_text(exc)) from None
    except (AttributeError, ImportError) as exc:
        raise CommandFailed(f"cannot unpickle {src}: {_one_line(exc)} (is its package installed?)") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise UsageError(f"{src} is not a readable torch.save file: {_one_line(exc)}") from None


def _convert_to_dcp(args: argparse.Namespace) -> int:
    _check_output(args.dst, args.force, want_dir=True)
    _engine()
    obj = _load_input(args.src, weights_only=not args.allow_pickle)
    if not isinstance(obj, Mapping):
        raise UsageError(f"{args.src} holds a {type(obj).__name__}, not a state dict (a dict)")
    flat, mapping = flatten_state_dict(dict(obj))
    keys = _select_keys(list(flat), args.keys, args.src)
    chosen = {k: flat[k] for k in keys}
    state_dict = chosen if args.flat else unflatten_state_dict(chosen, {k: mapping[k] for k in keys})
    _run_dcp(lambda: dcp.save(state_dict, storage_writer=FileSystemWriter(args.dst), no_dist=True),
             lambda why: f"cannot write {args.dst}: {why}")
    return _wrote(args.dst, chosen, "", len(flat), " (DCP checkpoint, written by dcp_native)")


def cmd_convert(args: argparse.Namespace) -> int:
    if os.path.isdir(args.src) or os.path.basename(os.path.normpath(args.src)) == _METADATA:
        return _convert_to_file(args)
    if not os.path.exists(args.src):
        raise UsageError(f"{args.src}: no such file or directory")
    return _convert_to_dcp(args)
