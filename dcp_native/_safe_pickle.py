"""Loading ``.metadata`` without running code a checkpoint directory brings along.

``.metadata`` is a pickle, and stock DCP loads it with ``pickle.load``: a
crafted file runs whatever it names. This unpickler imports only what DCP
writes there — its metadata classes, ``_StorageInfo``, ``torch.Size``, dtypes,
layouts and memory formats, paths and plain containers — and refuses anything
else before importing it.
"""

from __future__ import annotations

import functools
import pickle
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint import metadata as _md

from ._errors import CorruptCheckpointError

#: Module-level names a DCP metadata pickle may refer to, besides the classes of
#: torch.distributed.checkpoint.metadata.
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("builtins", "object"),
    ("copyreg", "_reconstructor"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


@functools.lru_cache(maxsize=None)
def _metadata_classes() -> frozenset:
    return frozenset(name for name, obj in vars(_md).items() if isinstance(obj, type) and obj.__module__ == _md.__name__)


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names something DCP metadata never holds."""


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler for DCP metadata only (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == _md.__name__ and name in _metadata_classes():
            return getattr(_md, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
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
