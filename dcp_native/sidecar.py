"""The sidecar: what dcp_native adds to a stock checkpoint (payload offsets, the CRC32C tables'
sizes and SHA-256), and when to trust it: a SHA-256 header over its body, bound to its metadata's
exact bytes, each entry checked against the metadata before use; one that fails a check is
ignored and :attr:`Sidecar.reason` says why. Its file layout: "The sidecar" in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from typing import Any

from . import _fileio
from ._errors import CorruptCheckpointError

#: The sidecar of metadata file ``M`` for save tag ``T`` is ``f"{M}.{T}{SUFFIX}"``.
SUFFIX = ".dcp_native"
FORMAT_VERSION = 2
MAGIC = b"DCPNSIDE"
_HEADER = struct.Struct("<8sIIQ32s")
#: A sidecar larger than this is refused unread (about 20 million items).
MAX_BYTES = 1 << 30
#: Suffix of a data file's CRC32C table (dcp_native.integrity).
TABLE_SUFFIX = ".crc32c"


def save_tag(save_id: str) -> str:
    """The 8 hex digits that name one save's files (data files, sidecar, temp and lock files)."""
    return hashlib.sha256(str(save_id).encode()).hexdigest()[:8]


def file_name(metadata_name: str, save_id: str) -> str:
    return f"{metadata_name}.{save_tag(save_id)}{SUFFIX}"


@dataclasses.dataclass(frozen=True)
class TableInfo:
    """A data file's CRC32C table as the sidecar records it."""

    file: str
    size: int
    sha256: str


@dataclasses.dataclass
class Sidecar:
    #: "matching" (usable), "absent", "legacy", "stale", "damaged", "unknown version"
    status: str
    #: Why it is not usable, in words (empty when usable).
    reason: str = ""
    version: Any = None
    #: The file it was read from (relative to the checkpoint directory), if any.
    name: str | None = None
    #: relative path -> item offset -> (item length, payload offset within the item)
    entries: dict[str, dict[int, tuple[int, int]]] = dataclasses.field(default_factory=dict)
    #: data file -> its CRC32C table
    tables: dict[str, TableInfo] = dataclasses.field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.status == "matching"


def digest(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def document(save_id: str, metadata_name: str, metadata_bytes: bytes,
             items: dict[str, list[list[int]]], tables: dict[str, TableInfo]) -> bytes:
    """The sidecar's bytes for one save, bound to the metadata file's bytes."""
    body = json.dumps(
        {
            "format": "dcp_native",
            "version": FORMAT_VERSION,
            "save_id": save_id,
            "metadata": metadata_name,
            "metadata_sha256": digest(metadata_bytes),
            "metadata_size": len(metadata_bytes),
            "items": items,
            "tables": {rel: dataclasses.asdict(t) for rel, t in tables.items()},
        },
        separators=(",", ":"),
    ).encode()
    return _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(body), hashlib.sha256(body).digest()) + body


_LIMIT = 1 << 63


def _entries(items: Any) -> dict[str, dict[int, tuple[int, int]]]:
    if not isinstance(items, dict):
        raise ValueError("items is not a mapping")
    out: dict[str, dict[int, tuple[int, int]]] = {}
    for rel, rows in items.items():
        if not isinstance(rows, list):
            raise ValueError(f"the items of {rel!r} are not a list")
        file_rows = out[rel] = {}
        for row in rows:
            try:
                offset, length, payload = row
            except (TypeError, ValueError):
                raise ValueError(f"entry {row!r} of {rel!r} is not [offset, length, payload offset]") from None
            if not (type(offset) is int and type(length) is int and type(payload) is int
                    and 0 <= offset < _LIMIT and 0 <= payload <= length < _LIMIT):
                raise ValueError(f"entry {row!r} of {rel!r} is not three file offsets with the "
                                 "payload inside the item")
            file_rows[offset] = (length, payload)
    return out


def _tables(tables: Any) -> dict[str, TableInfo]:
    if not isinstance(tables, dict):
        raise ValueError("tables is not a mapping")
    out = {}
    for rel, t in tables.items():
        if not isinstance(t, dict) or set(t) != {"file", "size", "sha256"}:
            raise ValueError(f"the table entry of {rel!r} is malformed")
        # A table lies beside its data file under a fixed name: nothing else may be named here.
        if t["file"] != rel + TABLE_SUFFIX:
            raise ValueError(f"the table of {rel!r} is named {t['file']!r}, not {rel + TABLE_SUFFIX!r}")
        sha = t["sha256"]
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError(f"the table digest of {rel!r} is not a SHA-256")
        if type(t["size"]) is not int or not 0 <= t["size"] < _LIMIT:
            raise ValueError(f"{t['size']!r} is not a file offset or length")
        out[rel] = TableInfo(t["file"], t["size"], sha)
    return out


def read(directory: str, metadata_name: str, metadata: Any, metadata_bytes: bytes) -> Sidecar:
    """The sidecar of the metadata ``metadata_name`` (parsed ``metadata``, raw ``metadata_bytes``);
    never raises for a bad one: the result says whether it is usable and why not."""
    save_id = getattr(getattr(metadata, "storage_meta", None), "save_id", None)
    if not save_id:
        return Sidecar("absent", "the metadata names no save (written by stock DCP)")
    name = file_name(metadata_name, save_id)
    try:
        data = _fileio.read_regular(os.path.join(directory, name), MAX_BYTES, what="sidecar")
    except FileNotFoundError:
        # Earlier dcp_native versions wrote format 1 (no checksum, not bound to the metadata) here.
        legacy = metadata_name + SUFFIX
        if os.path.lexists(os.path.join(directory, legacy)):
            return Sidecar("legacy", f"{legacy} is in the unprotected format of an earlier dcp_native "
                           "(no checksum, not bound to the metadata) and is ignored", 1, legacy)
        return Sidecar("absent", f"there is no {name} (written by stock DCP, or the sidecar was lost)")
    except (OSError, CorruptCheckpointError) as exc:
        return Sidecar("damaged", f"{name} cannot be read: {exc}", name=name)

    def damaged(why: str, version: Any = None) -> Sidecar:
        return Sidecar("damaged", f"{name} is damaged: {why}", version, name)

    if len(data) < _HEADER.size:
        return damaged("it is shorter than its header")
    magic, version, _, length, body_sha = _HEADER.unpack_from(data)
    if magic != MAGIC:
        return damaged("it does not start with a dcp_native sidecar header")
    if version != FORMAT_VERSION:
        return Sidecar("unknown version", f"{name} has format {version}, which this dcp_native "
                       "does not know", version, name)
    body = data[_HEADER.size :]
    if length != len(body):
        return damaged(f"its header says {length} bytes of body, the file has {len(body)}", version)
    if hashlib.sha256(body).digest() != body_sha:
        return damaged("its SHA-256 does not match its contents", version)
    try:
        doc = json.loads(body)
        if not isinstance(doc, dict) or doc.get("format") != "dcp_native" or doc.get("version") != version:
            raise ValueError("its body is not a dcp_native sidecar")
        if doc.get("save_id") != save_id or doc.get("metadata") != metadata_name:
            return Sidecar("stale", f"{name} belongs to another save", version, name)
        if (doc.get("metadata_sha256"), doc.get("metadata_size")) != (digest(metadata_bytes),
                                                                        len(metadata_bytes)):
            return Sidecar("stale", f"{name} was written for other bytes of {metadata_name}: the "
                           "metadata changed after the save", version, name)
        entries = _entries(doc.get("items"))
        tables = _tables(doc.get("tables"))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return damaged(str(exc), version)
    return Sidecar("matching", "", version, name, entries, tables)
