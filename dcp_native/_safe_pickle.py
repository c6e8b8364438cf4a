"""Loading what a checkpoint directory holds without running code it brings along.

Two pickles live in a DCP checkpoint:

* ``.metadata``, which stock DCP loads with ``pickle.load``: a crafted file runs
  whatever it names. ``MetadataUnpickler`` imports only the globals some
  released DCP version (torch 1.13 through 2.13) wrote there, listed in
  ``_ADMITTED`` with the versions that wrote them, and refuses anything else
  before importing it.
* the saved objects (BYTE_IO items, ``torch.save`` archives), which stock DCP
  loads with ``torch.load(weights_only=False)``. ``check_object`` lets one
  through only if ``torch.load(weights_only=True)`` loads it.
"""

from __future__ import annotations

import functools
import importlib
import io
import os
import pickle
import pickletools
import re
import zipfile
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint import metadata as _md

from ._errors import CorruptCheckpointError, RefusedObjectError

# ----------------------------------------------------------------------------- .metadata

_MD = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"
_SHARDED = "torch.distributed._shard.sharded_tensor.metadata"

#: The metadata classes every DCP version has had, under their module since 2.0.
_CORE = ("ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata", "Metadata", "MetadataIndex")

#: The globals DCP metadata may name, as the pickle names them, and what each is
#: loaded as. Evidence for the versions: each release's torch/distributed sources.
_ADMITTED: dict[tuple[str, str], tuple[str, str]] = {
    # 2.0+: the package as it is today. TensorProperties and its memory format
    # enum moved here in 2.3, StorageMeta arrived in 2.4.
    **{(_MD, name): (_MD, name) for name in _CORE},
    (_MD, "TensorProperties"): (_MD, "TensorProperties"),
    (_MD, "_MEM_FORMAT_ENCODING"): (_MD, "_MEM_FORMAT_ENCODING"),
    (_MD, "StorageMeta"): (_MD, "StorageMeta"),
    (_FS, "_StorageInfo"): (_FS, "_StorageInfo"),
    # 1.13 wrote the same classes from torch.distributed._shard.checkpoint. Stock
    # still resolves that name (the old package aliases itself to the new one),
    # but by running metadata.py and filesystem.py a second time under the old
    # name, which gives look-alike classes; today's classes are the same code.
    **{("torch.distributed._shard.checkpoint.metadata", name): (_MD, name) for name in _CORE},
    ("torch.distributed._shard.checkpoint.filesystem", "_StorageInfo"): (_FS, "_StorageInfo"),
    # 2.1 and 2.2's FsspecWriter had its own copy of _StorageInfo (same fields).
    # Stock 2.13 cannot load it (the class is gone, and the module needs fsspec).
    ("torch.distributed.checkpoint._fsspec_filesystem", "_StorageInfo"): (_FS, "_StorageInfo"),
    # 1.13 to 2.2 took TensorProperties from ShardedTensor's metadata, which still
    # has it (stock loads this class, and so do we).
    (_SHARDED, "TensorProperties"): (_SHARDED, "TensorProperties"),
    (_SHARDED, "MEM_FORMAT_ENCODING"): (_SHARDED, "MEM_FORMAT_ENCODING"),
    # Tensor sizes and offsets, and layouts (torch.serialization registers this
    # reducer for torch.layout; dtypes are handled in find_class).
    ("torch", "Size"): ("torch", "Size"),
    ("torch.serialization", "_get_layout"): ("torch.serialization", "_get_layout"),
    # 2.4+: StorageMeta.checkpoint_id, which FileSystemWriter makes a pathlib.Path.
    # Python 3.13 pickles paths from pathlib._local (3.14 from pathlib again): the
    # same classes, which pathlib re-exports. A path from the other platform loads
    # as its pure variant (stock cannot instantiate it at all).
    ("pathlib", "PosixPath"): ("pathlib", "PurePosixPath" if os.name == "nt" else "PosixPath"),
    ("pathlib", "WindowsPath"): ("pathlib", "WindowsPath" if os.name == "nt" else "PureWindowsPath"),
    ("pathlib._local", "PosixPath"): ("pathlib", "PurePosixPath" if os.name == "nt" else "PosixPath"),
    ("pathlib._local", "WindowsPath"): ("pathlib", "WindowsPath" if os.name == "nt" else "PureWindowsPath"),
}


@functools.lru_cache(maxsize=None)
def _resolve(module: str, name: str) -> Any:
    # Only ever called with a target from _ADMITTED: these modules are torch's own
    # (already imported with torch.distributed.checkpoint) and the standard library.
    return getattr(importlib.import_module(module), name)


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names something DCP metadata never holds."""


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler for DCP metadata only (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        target = _ADMITTED.get((module, name))
        if target is not None:
            return _resolve(*target)
        if module == "torch":
            # vars(), not getattr(): torch's module __getattr__ imports submodules.
            obj = vars(torch).get(name)
            if isinstance(obj, torch.dtype):
                return obj
        raise RefusedGlobal(
            f"it refers to {module}.{name}, which DCP metadata never holds; refusing to import it"
        )


def load_metadata(f: BinaryIO, path: str) -> _md.Metadata:
    """Unpickle DCP metadata from ``f`` (read from ``path``), refusing foreign globals.

    Raises:
        CorruptCheckpointError: the file is not DCP metadata, or names a global
            outside DCP's metadata classes (nothing it names is imported).
    """
    try:
        metadata = MetadataUnpickler(f).load()
    except RefusedGlobal as exc:
        raise CorruptCheckpointError(f"{path} is refused: {exc}", filename=path) from None
    except OSError:
        raise
    except Exception as exc:  # a malformed pickle raises many types
        raise CorruptCheckpointError(
            f"{path} cannot be read as DCP metadata: {type(exc).__name__}: {exc}", filename=path
        ) from None
    if not isinstance(metadata, _md.Metadata):
        raise CorruptCheckpointError(
            f"{path} does not hold DCP metadata (found {type(metadata).__name__})", filename=path
        )
    return metadata


# ----------------------------------------------------------------------------- saved objects

#: torch's weights-only unpickler names the global it refuses in one of these
#: (stable from torch 2.6 to 2.14); it writes builtins without their module.
_REFUSED_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global by default"),
    re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked"),
)
#: Lines of torch's error that say why, as opposed to its advice around them.
_REASON_PREFIXES = (
    "Unsupported global",
    "Trying to",
    "Unsupported operand",
    "Can only",
    "unsupported persistent id",
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def check_object(
    data: bytes | memoryview,
    *,
    key: str,
    filename: str,
    offset: int,
    map_location: Any = "cpu",
) -> Any:
    """Refuse a saved object unless ``torch.load(weights_only=True)`` would load it.

    ``data`` is what ``torch.save(obj)`` wrote for one non-tensor item of a
    checkpoint: a zip archive, or the legacy non-zip stream. The check is one
    ``torch.load(..., weights_only=True)`` of the bytes, so it allows exactly
    what torch does, including globals the user allowed with
    ``torch.serialization.add_safe_globals`` or the ``safe_globals`` context
    manager. torch's weights-only unpickler imports nothing: it looks globals
    up in its allowlists and calls only what it found there.

    Args:
        data: the item's bytes.
        key: the checkpoint key of the item, for messages.
        filename: the file the bytes were read from, for messages.
        offset: where in ``filename`` they start, for messages.
        map_location: passed to ``torch.load``; ``"cpu"`` by default, so that
            the check needs no device (stock DCP's own ``torch.load`` of the
            same bytes restores the saved devices).

    Returns:
        The object as ``torch.load(weights_only=True, map_location=map_location)``
        loads it, for a caller that wants to use it rather than load it again.

    Raises:
        RefusedObjectError: loading the bytes needs something torch's
            weights-only load refuses; ``refused`` names the global when there
            is one.
        CorruptCheckpointError: the bytes are not a torch.save archive or
            pickle at all.

    Example:
        >>> import io, torch
        >>> buf = io.BytesIO(); torch.save({"step": 7}, buf)
        >>> check_object(buf.getvalue(), key="step", filename="__0_0.distcp", offset=0)
        {'step': 7}
    """
    where = f"{filename} at offset {offset}"
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        message = _ANSI.sub("", str(exc))
        reason = _torch_reason(message)
        refused = _refused_in_message(message)
        if refused is None:
            decodes, refused = _scan(bytes(data))
            if not decodes:
                raise _undecodable(where, key, filename, offset, reason) from None
        raise _refusal(where, key, filename, offset, refused, reason) from None
    except RuntimeError as exc:
        # TorchScript archives (and legacy .tar files, from real files only) are
        # refused outright under weights_only=True.
        message = _ANSI.sub("", str(exc))
        if "Cannot use ``weights_only=True``" in message:
            reason = message.split(". ", 1)[0].strip()  # the rest is torch's advice
            raise _refusal(where, key, filename, offset, None, reason) from None
        raise _undecodable(where, key, filename, offset, _exc_text(exc, message)) from None
    except Warning:
        raise  # torch's warnings, turned into errors by the caller's filters
    except Exception as exc:  # a malformed archive or pickle raises many types
        raise _undecodable(where, key, filename, offset, _exc_text(exc, str(exc))) from None


def _refusal(
    where: str, key: str, filename: str, offset: int, refused: str | None, reason: str
) -> RefusedObjectError:
    trust_checkpoint = (
        "if you trust this checkpoint, read it with "
        "dcp_native.FileSystemReader(path, allow_pickle=True)"
    )
    if refused is None:
        what = f"needs more than torch.load(weights_only=True) allows ({reason})"
        advice = trust_checkpoint
    else:
        what = f"refers to {refused}, which torch.load(weights_only=True) does not allow"
        if "must be imported" in reason:  # DTensors, nested tensors: torch says what to import
            what += f" ({reason})"
        module = refused.rpartition(".")[0]
        if module in _blocked_modules():
            advice = f"no allowlist admits it (torch blocks the module {module}); {trust_checkpoint}"
        else:
            advice = (
                f"if you trust {refused}, allow it with "
                f"torch.serialization.add_safe_globals([{refused}]) (or the "
                f"torch.serialization.safe_globals context manager); {trust_checkpoint}"
            )
    return RefusedObjectError(
        f"{where}: the saved object {key!r} {what}; loading it could run code the "
        f"checkpoint brings along, so it was not loaded. {advice[0].upper()}{advice[1:]}",
        refused=refused,
        key=key,
        filename=filename,
        offset=offset,
    )


def _undecodable(where: str, key: str, filename: str, offset: int, reason: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{where}: the saved object {key!r} cannot be decoded as a torch.save archive or pickle ({reason})",
        key=key,
        filename=filename,
        offset=offset,
    )


def _exc_text(exc: BaseException, message: str) -> str:
    line = message.strip().split("\n", 1)[0][:300]
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _torch_reason(message: str) -> str:
    """The line of torch's weights-only error that says what it refused."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        line = line.split("WeightsUnpickler error:", 1)[-1].strip()
        if line.startswith(_REASON_PREFIXES) or "must be imported" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no reason given"


def _refused_in_message(message: str) -> str | None:
    for pattern in _REFUSED_PATTERNS:
        m = pattern.search(message)
        if m:
            name = m.group(1)
            # torch drops "builtins." from the names it reports.
            return name if "." in name else f"builtins.{name}"
    return None


def _blocked_modules() -> frozenset:
    from torch import _weights_only_unpickler as wo

    return frozenset(getattr(wo, "_blocklisted_modules", ("sys", "os", "posix", "nt")))


def _allowed_by_torch(full_path: str) -> bool:
    from torch import _weights_only_unpickler as wo

    try:
        return full_path in wo._get_allowed_globals() or full_path in wo._get_user_allowed_globals()
    except AttributeError:  # a torch without these helpers: report every global
        return False


def _scan(data: bytes) -> tuple[bool, str | None]:
    """Whether the pickles torch reads decode, and the first global torch does not allow.

    Used only to word the error when torch's message names no global: the
    decision to refuse is torch's. Parses opcodes, executes nothing.
    """
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
                if not names:
                    return False, None
                stream = io.BytesIO(zf.read(names[0]))
        except Exception:
            return False, None
        pickles = 1
    else:
        # The legacy format: magic number, protocol, system info and the object,
        # each a pickle of its own, then storage keys and raw storage bytes.
        stream = io.BytesIO(data)
        pickles = 4
    for _ in range(pickles):
        try:
            refused = _first_refused_global(stream)
        except Exception:
            return False, None
        if refused is not None:
            return True, refused
    return True, None


def _first_refused_global(stream: BinaryIO) -> str | None:
    """Reads one pickle from ``stream``; returns the first global torch does not allow."""
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING

    strings: list[str] = []  # what a STACK_GLOBAL would take its names from
    memo: dict[int, str] = {}
    memo_size = 0
    top: str | None = None  # the string on top of the stack, if the top is one
    for op, arg, _pos in pickletools.genops(stream):
        name = op.name
        full = None
        if name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
            index = memo_size if name == "MEMOIZE" else arg
            memo_size += name == "MEMOIZE"
            if top is not None:
                memo[index] = top
            continue  # the stack is unchanged
        top = None
        if name in ("GLOBAL", "INST"):
            module, _, attr = arg.partition(" ")
            # torch's unpickler renames Python 2 names as pickle does.
            if (module, attr) in NAME_MAPPING:
                module, attr = NAME_MAPPING[(module, attr)]
            elif module in IMPORT_MAPPING:
                module = IMPORT_MAPPING[module]
            full = f"{module}.{attr}"
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            full = f"{strings[-2]}.{strings[-1]}"
        elif isinstance(arg, str) and "UNICODE" in name:
            top = arg
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            top = memo.get(arg)
        if top is not None:
            strings.append(top)
        if full is not None and not _allowed_by_torch(full):
            return full
    return None
