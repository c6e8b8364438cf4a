"""``dcp-native inspect``: keys, dtypes, shapes, sizes, chunks and files of a checkpoint."""

from __future__ import annotations

import argparse
import collections
import math
import os
from typing import Any, Sequence

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .._safe_pickle import describe_pickle
from ..checkpoint import ArchiveError, Item
from .common import _archives, _describe_sidecar, _human, _json, _Opened, _open_checkpoint, _plural, _written_by, EXIT_OK


def _inspect_doc(ck: _Opened) -> dict[str, Any]:
    by_key: dict[str, list[Item]] = collections.defaultdict(list)
    for item in ck.item_list:
        by_key[item.key].append(item)
    # (type name, short value) of each object item, from its data.pkl's opcodes.
    types = {(it.file, it.offset): ("unknown (stream-transformed)" if it.transformed
                                     else "unknown (data file missing or short)", None)
             for it in ck.item_list if it.kind == "object"}
    for item, archive in _archives(ck, [it for it in ck.readable if it.kind == "object" and not it.transformed]):
        try:
            if isinstance(archive, Exception):
                raise archive
            types[(item.file, item.offset)] = describe_pickle(archive.data_pickle())
        except (ArchiveError, ValueError, OSError):
            types[(item.file, item.offset)] = ("unknown (unreadable; run verify)", None)
    tensors, objects = [], []
    for key, md in ck.metadata.state_dict_metadata.items():
        saved = by_key.get(key, [])
        files, stored = sorted({it.file for it in saved}), sum(it.length for it in saved)
        if isinstance(md, TensorStorageMetadata):
            numel = math.prod(md.size)
            tensors.append({
                "key": key, "dtype": str(md.properties.dtype).removeprefix("torch."),
                "shape": list(md.size), "numel": numel, "bytes": numel * md.properties.dtype.itemsize,
                "chunks": len(md.chunks), "files": files, "stored_bytes": stored,
            })
        else:
            first = (saved[0].file, saved[0].offset) if saved else None
            type_name, value = types.get(first, ("unknown (no item)", None))
            objects.append({"key": key, "type": type_name, "bytes": stored, "files": files,
                            **({"value": value} if value is not None else {})})
    files_out = [{"name": rel, "bytes": ck.sizes.get(rel)} for rel in ck.files]
    return {
        "path": os.path.abspath(ck.directory),
        "written_by": _written_by(ck.sidecar),
        "sidecar": ck.sidecar.status,
        "dcp_version": getattr(ck.metadata, "version", None),
        "save_id": getattr(getattr(ck.metadata, "storage_meta", None), "save_id", None),
        "tensors": tensors,
        "objects": objects,
        "files": files_out,
        "totals": {
            "tensors": len(tensors),
            "tensor_elements": sum(t["numel"] for t in tensors),
            "tensor_bytes": sum(t["bytes"] for t in tensors),
            "objects": len(objects),
            "object_bytes": sum(o["bytes"] for o in objects),
            "files": len(files_out),
            "file_bytes": sum(f["bytes"] or 0 for f in files_out),
        },
    }


def _table(header: list[str], rows: list[list[str]], right: Sequence[int]) -> list[str]:
    """An empty line, then ``header`` and ``rows`` in aligned columns (``right``: right-aligned)."""
    rows = [header] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return [""] + ["  " + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                    for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def _inspect_text(doc: dict[str, Any], ck: _Opened) -> str:
    t = doc["totals"]
    lines = [f"{doc['path']}: DCP checkpoint, {_describe_sidecar(ck.sidecar)}"]
    if doc["tensors"]:
        lines += _table(["tensor", "dtype", "shape", "bytes", "chunks", "files"], [
            [e["key"], e["dtype"], str(e["shape"]), _human(e["bytes"]), str(e["chunks"]), str(len(e["files"]))]
            for e in doc["tensors"]], right=(3, 4, 5))
    if doc["objects"]:
        lines += _table(["object", "type", "bytes", "files", "value"], [
            [e["key"], e["type"], _human(e["bytes"]), str(len(e["files"])), repr(e["value"]) if "value" in e else ""]
            for e in doc["objects"]], right=(2, 3))
    files = ", ".join(f"{f['name']} ({'missing' if f['bytes'] is None else _human(f['bytes'])})"
                      for f in doc["files"])
    lines += [
        "",
        f"totals: {_plural(t['tensors'], 'tensor')} ({t['tensor_elements']:,} elements, "
        f"{_human(t['tensor_bytes'])}), {_plural(t['objects'], 'object')} "
        f"({_human(t['object_bytes'])}), {_plural(t['files'], 'data file')} "
        f"({_human(t['file_bytes'])}): {files}",
    ]
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    ck = _open_checkpoint(args.path)
    doc = _inspect_doc(ck)
    print(_json(doc) if args.json else _inspect_text(doc, ck))
    return EXIT_OK
