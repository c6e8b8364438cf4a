"""The sidecar: what dcp_native adds to a stock checkpoint, and when to trust it.

``<metadata file>.dcp_native`` (JSON, written under the commit protocol just
before the metadata) records where each tensor payload starts within its item
and which data files have a CRC32C table. It belongs to exactly one save: the
``save_id`` it names must be the one in ``.metadata``'s storage meta, so a
sidecar left behind by an earlier save (e.g. a stock save over a dcp_native
one) is ignored, and readers fall back to parsing item headers.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

#: The sidecar of metadata file ``M`` is ``M + SUFFIX``.
SUFFIX = ".dcp_native"
FORMAT_VERSION = 1


@dataclasses.dataclass
class Sidecar:
    #: "absent", "matching", "stale" (another save's), "unreadable", "unknown version"
    status: str
    version: Any = None
    #: relative path -> item offset -> the entry's other fields (item length, payload offset)
    entries: dict[str, dict[int, list[int]]] = dataclasses.field(default_factory=dict)
    #: data file -> its CRC32C table file
    checksums: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.status == "matching"


def document(save_id: str, metadata_name: str, items: dict, checksums: dict) -> bytes:
    """The sidecar's bytes for one save."""
    doc = {
        "format": "dcp_native",
        "version": FORMAT_VERSION,
        "save_id": save_id,
        "metadata": metadata_name,
        "items": items,
        "checksums": checksums,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _entry(row: Any) -> tuple[int, list[int]]:
    """``[item offset, item length, payload offset within the item]`` as offset -> the rest."""
    if not isinstance(row, list) or len(row) != 3:
        raise ValueError(f"sidecar entry {row!r} is not [offset, length, payload offset]")
    return int(row[0]), [int(row[1]), int(row[2])]


def read(path: str, metadata: Any) -> Sidecar:
    """Read the sidecar at ``path`` and decide whether it belongs to ``metadata``."""
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return Sidecar("absent")
    except (OSError, ValueError):
        return Sidecar("unreadable")
    if not isinstance(doc, dict) or doc.get("format") != "dcp_native":
        return Sidecar("unreadable")
    version = doc.get("version")
    save_id = getattr(getattr(metadata, "storage_meta", None), "save_id", None)
    if save_id is None or doc.get("save_id") != save_id:
        return Sidecar("stale", version)
    if version != FORMAT_VERSION:
        return Sidecar("unknown version", version)
    try:
        entries = {
            rel: dict(_entry(row) for row in rows) for rel, rows in doc.get("items", {}).items()
        }
        checksums = {rel: str(e["file"]) for rel, e in (doc.get("checksums") or {}).items()}
    except (TypeError, ValueError, IndexError, KeyError, AttributeError):
        return Sidecar("unreadable", version)
    return Sidecar("matching", version, entries, checksums)
