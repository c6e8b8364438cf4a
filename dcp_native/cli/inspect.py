"""``dcp-native inspect``: keys, dtypes, shapes, sizes, chunks and files of a checkpoint."""

from __future__ import annotations

import argparse
import collections
import os
from typing import Any, Sequence

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .._safe_pickle import describe_pickle
from ..checkpoint import Archive, ArchiveError, Item
from .common import (
    _describe_sidecar,
    _dtype_name,
    EXIT_OK,
    _human,
    _item_views,
    _json,
    _Opened,
    _open_or_fail,
    _plural,
    _written_by,
)

# --------------------------------------------------------------------------- inspect


def _object_types(ck: _Opened, items: list[Item]) -> dict[tuple[str, int], tuple[str, Any]]:
    """(type name, short value) of each object item, from its data.pkl's opcodes."""
    sizes = ck.file_sizes()
    readable = [
        it for it in items
        if not it.transformed and it.file in sizes and it.inside(sizes[it.file])
    ]
    out: dict[tuple[str, int], tuple[str, Any]] = {}
    for item, view in _item_views(ck, readable):
        try:
            if isinstance(view, OSError):
                raise view
            archive = Archive(view)
            archive.check_all()
            out[(item.file, item.offset)] = describe_pickle(archive.data_pickle())
        except (ArchiveError, ValueError, OSError):
            out[(item.file, item.offset)] = ("unknown (unreadable; run verify)", None)
    for it in items:
        if (it.file, it.offset) not in out:
            why = "stream-transformed" if it.transformed else "data file missing or short"
            out[(it.file, it.offset)] = (f"unknown ({why})", None)
    return out


def _inspect_doc(ck: _Opened) -> dict[str, Any]:
    by_key: dict[str, list[Item]] = collections.defaultdict(list)
    for item in ck.item_list:
        by_key[item.key].append(item)
    objects = [it for it in ck.item_list if it.kind == "object"]
    types = _object_types(ck, objects)
    tensors_out, objects_out = [], []
    for key, md in ck.metadata.state_dict_metadata.items():
        saved = by_key.get(key, [])
        files = sorted({it.file for it in saved})
        stored = sum(it.length for it in saved)
        if isinstance(md, TensorStorageMetadata):
            numel = 1
            for s in md.size:
                numel *= s
            tensors_out.append({
                "key": key,
                "dtype": _dtype_name(md.properties.dtype),
                "shape": list(md.size),
                "numel": numel,
                "bytes": numel * md.properties.dtype.itemsize,
                "chunks": len(md.chunks),
                "files": files,
                "stored_bytes": stored,
            })
        else:
            type_name, value = (
                types[(saved[0].file, saved[0].offset)] if saved else ("unknown (no item)", None)
            )
            entry = {"key": key, "type": type_name, "bytes": stored, "files": files}
            if value is not None:
                entry["value"] = value
            objects_out.append(entry)
    sizes = ck.file_sizes()
    files_out = [{"name": rel, "bytes": sizes.get(rel)} for rel in ck.files]
    storage_meta = getattr(ck.metadata, "storage_meta", None)
    return {
        "path": os.path.abspath(ck.directory),
        "written_by": _written_by(ck.sidecar),
        "sidecar": ck.sidecar.status,
        "dcp_version": getattr(ck.metadata, "version", None),
        "save_id": getattr(storage_meta, "save_id", None),
        "tensors": tensors_out,
        "objects": objects_out,
        "files": files_out,
        "totals": {
            "tensors": len(tensors_out),
            "tensor_elements": sum(t["numel"] for t in tensors_out),
            "tensor_bytes": sum(t["bytes"] for t in tensors_out),
            "objects": len(objects_out),
            "object_bytes": sum(o["bytes"] for o in objects_out),
            "files": len(files_out),
            "file_bytes": sum(f["bytes"] or 0 for f in files_out),
        },
    }


def _table(rows: list[list[str]], right: Sequence[int] = ()) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def _inspect_text(doc: dict[str, Any], ck: _Opened) -> str:
    t = doc["totals"]
    lines = [f"{doc['path']}: DCP checkpoint, {_describe_sidecar(ck.sidecar)}"]
    if doc["tensors"]:
        rows = [["tensor", "dtype", "shape", "bytes", "chunks", "files"]]
        for e in doc["tensors"]:
            rows.append([
                e["key"], e["dtype"], str(e["shape"]), _human(e["bytes"]),
                str(e["chunks"]), str(len(e["files"])),
            ])
        lines += [""] + _table(rows, right=(3, 4, 5))
    if doc["objects"]:
        rows = [["object", "type", "bytes", "files", "value"]]
        for e in doc["objects"]:
            value = repr(e["value"]) if "value" in e else ""
            rows.append([e["key"], e["type"], _human(e["bytes"]), str(len(e["files"])), value])
        lines += [""] + _table(rows, right=(2, 3))
    files = ", ".join(
        f"{f['name']} ({_human(f['bytes']) if f['bytes'] is not None else 'missing'})"
        for f in doc["files"]
    )
    lines += [
        "",
        f"totals: {_plural(t['tensors'], 'tensor')} ({t['tensor_elements']:,} elements, "
        f"{_human(t['tensor_bytes'])}), {_plural(t['objects'], 'object')} "
        f"({_human(t['object_bytes'])}), {_plural(t['files'], 'data file')} "
        f"({_human(t['file_bytes'])}): {files}",
    ]
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    ck = _open_or_fail(args.path)
    doc = _inspect_doc(ck)
    if args.json:
        print(_json(doc))
    else:
        print(_inspect_text(doc, ck))
    return EXIT_OK
