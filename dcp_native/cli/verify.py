"""``dcp-native verify``: check a checkpoint without loading it, listing every problem.

It runs in passes, each adding problems to one list so that every problem is
reported, not only the first: metadata, data files and sizes, item framing
(zip end records, central directory, local headers, ``data.pkl`` against the
metadata, the sidecar against the archive), the CRC32C of every 4 KiB block of
each data file that has a checksum table (read in bounded rounds, checked by
the engine), and with ``--read-all`` every byte of every item.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys
import time
from typing import Any

from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from .. import checkpoint, integrity
from .._errors import CheckpointError, IntegrityError
from .._safe_pickle import describe_pickle
from ..checkpoint import Archive, ArchiveError, FileRead, Item, UnsupportedLayout
from ..plan import Box
from .common import (
    _BadMetadata,
    _checkpoint_dir,
    _describe_sidecar,
    _engine,
    EXIT_OK,
    EXIT_PROBLEMS,
    _human,
    _item_views,
    _json,
    _looks_like_unfinished_save,
    _METADATA,
    _Opened,
    _open_checkpoint,
    _os_error_text,
    _plural,
    _PROGRESS_MIN_BYTES,
    _PROGRESS_MIN_ITEMS,
    _READ_BUDGET,
    _threads,
    UsageError,
    _written_by,
)

# --------------------------------------------------------------------------- verify


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint, and where."""

    message: str
    file: str | None = None
    offset: int | None = None
    key: str | None = None

    def where(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(self.file)
        if self.offset is not None:
            parts.append(f"offset {self.offset}")
        if self.key is not None:
            parts.append(f"key {self.key!r}")
        return ", ".join(parts)

    def __str__(self) -> str:
        where = self.where()
        return f"{where}: {self.message}" if where else self.message


class _Progress:
    """A one-line progress bar on stderr (\\r updates), or nothing."""

    def __init__(self, label: str, total: int, unit: str, enabled: bool) -> None:
        self.label, self.total, self.unit, self.enabled = label, max(total, 1), unit, enabled
        self.done = 0
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and self.done < self.total:
            return
        self._last = now
        frac = min(1.0, self.done / self.total)
        bar = "#" * int(30 * frac)
        if self.unit == "bytes":
            count = f"{_human(self.done)}/{_human(self.total)}"
        else:
            count = f"{self.done}/{self.total} {self.unit}"
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac:4.0%} {count}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


class _Verifier:
    """The verify passes over one checkpoint; each appends to ``problems``."""

    def __init__(self, ck: _Opened, progress: str) -> None:
        self.ck = ck
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        self.progress_mode = progress
        self.sizes: dict[str, int] = {}
        #: Items whose bytes lie inside an existing file (later passes read only these).
        self.readable: list[Item] = []
        self.checked_tensors = 0
        self.checked_objects = 0
        self.checked_files = 0

    def problem(self, message: str, item: Item | None = None, **where: Any) -> None:
        if item is not None:
            where = {"file": item.file, "offset": item.offset, "key": item.key, **where}
        self.problems.append(Problem(message, **where))

    def _progress(self, label: str, total: int, unit: str, nbytes: int) -> _Progress:
        enabled = self.progress_mode == "always" or (
            self.progress_mode == "auto"
            and sys.stderr.isatty()
            and (total >= _PROGRESS_MIN_ITEMS or nbytes >= _PROGRESS_MIN_BYTES)
        )
        return _Progress(label, total, unit, enabled)

    # -------------------------------------------------------------- pass 1: metadata

    def check_metadata(self) -> None:
        md = self.ck.metadata
        saved: dict[str, dict[tuple, Item]] = collections.defaultdict(dict)
        for item in self.ck.item_list:
            saved[item.key][item.chunk_offsets] = item
            if item.key not in md.state_dict_metadata:
                self.problem("the item's key is not in the metadata's state dict", item)
            elif item.kind == "tensor" and item.chunk_sizes is None:
                self.problem(
                    f"no saved chunk of the tensor starts at {list(item.chunk_offsets)}", item
                )
            if item.offset < 0 or item.length < 0:
                self.problem(f"negative offset or length ({item.length})", item)
        for key, entry in md.state_dict_metadata.items():
            if isinstance(entry, BytesStorageMetadata):
                if not saved.get(key):
                    self.problem("the object has no saved item", key=key)
                continue
            if not isinstance(entry, TensorStorageMetadata):
                self.problem(f"unknown metadata type {type(entry).__name__}", key=key)
                continue
            total = 0
            for chunk in entry.chunks:
                offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
                if offsets not in saved.get(key, {}):
                    self.problem(f"chunk at {list(offsets)} has no saved item", key=key)
                if len(offsets) != len(entry.size) or any(
                    o < 0 or n < 0 or o + n > s for o, n, s in zip(offsets, sizes, entry.size)
                ):
                    self.problem(
                        f"chunk at {list(offsets)} of size {list(sizes)} lies outside the "
                        f"tensor's shape {list(entry.size)}",
                        key=key,
                    )
                n = 1
                for s in sizes:
                    n *= s
                total += n
            numel = 1
            for s in entry.size:
                numel *= s
            if total != numel:
                self.problem(
                    f"the saved chunks hold {total} elements, the tensor's shape "
                    f"{list(entry.size)} has {numel}",
                    key=key,
                )
        self._check_overlaps()
        self._check_sidecar_entries()

    def _check_overlaps(self) -> None:
        by_file: dict[str, list[Item]] = collections.defaultdict(list)
        for item in self.ck.item_list:
            by_file[item.file].append(item)
        for items in by_file.values():
            items.sort(key=lambda it: it.offset)
            for a, b in zip(items, items[1:]):
                if a.offset + a.length > b.offset:
                    self.problem(
                        f"the item overlaps the one before it ({a.key!r} at offset {a.offset}, "
                        f"{a.length} bytes)",
                        b,
                    )

    def _check_sidecar_entries(self) -> None:
        sidecar = self.ck.sidecar
        if sidecar.status in ("unknown version", "legacy"):
            self.notes.append(f"{sidecar.reason}; it was not checked")
        elif sidecar.status in ("damaged", "stale"):
            self.problem(f"{sidecar.reason}; it is ignored", file=sidecar.name)
        if sidecar.status != "matching":
            return
        known = {(it.file, it.offset): it for it in self.ck.item_list}
        for rel, entries in sidecar.entries.items():
            for offset, entry in entries.items():
                item = known.get((rel, offset))
                if item is None:
                    self.problem("the sidecar names an item the metadata does not have",
                                 file=rel, offset=offset)
                elif item.kind != "tensor":
                    self.problem("the sidecar gives a payload offset for an object item", item)
                elif entry[0] != item.length:
                    self.problem(
                        f"the sidecar says the item has {entry[0]} bytes, "
                        f"the metadata {item.length}",
                        item,
                    )

    # -------------------------------------------------------------- pass 2: files and sizes

    def check_files(self) -> None:
        by_file: dict[str, list[Item]] = collections.defaultdict(list)
        for item in self.ck.item_list:
            by_file[item.file].append(item)
        for rel, items in sorted(by_file.items()):
            try:
                size = self.ck.data_file_size(rel)
            except FileNotFoundError:
                keys = sorted({it.key for it in items})
                shown = ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
                self.problem(
                    f"the data file is missing; it holds {_plural(len(items), 'item')} "
                    f"of {_plural(len(keys), 'key')}: {shown}",
                    file=rel,
                )
                continue
            except CheckpointError as exc:  # a name outside the directory, a FIFO, ...
                self.problem(str(exc).removeprefix(f"{self.ck.path(rel)}: "), file=rel)
                continue
            except OSError as exc:
                self.problem(f"cannot stat the data file: {exc.strerror}", file=rel)
                continue
            self.sizes[rel] = size
            for item in sorted(items, key=lambda it: it.offset):
                end = item.offset + item.length
                if item.inside(size):
                    self.readable.append(item)
                elif end > size:
                    self.problem(
                        f"the file is truncated: the item ends at byte {end}, the file has "
                        f"{size} bytes",
                        item,
                    )
        referenced = set(by_file)
        try:
            strays = sorted(
                n for n in os.listdir(self.ck.directory) if n.endswith(".distcp") and n not in referenced
            )
        except OSError:
            strays = []
        if strays:
            self.notes.append(
                f"{_plural(len(strays), 'data file')} not referenced by the metadata "
                f"(left over from another save?): {', '.join(strays[:5])}"
                + (", ..." if len(strays) > 5 else "")
            )

    # -------------------------------------------------------------- pass 3: framing

    def check_framing(self) -> None:
        items = [it for it in self.readable if not it.transformed]
        transformed = len(self.readable) - len(items)
        if transformed:
            self.notes.append(
                f"{_plural(transformed, 'item')} written with stream transforms: "
                "bounds checked, framing not parsed"
            )
        progress = self._progress("verify", len(items), "items", 0)
        try:
            for item, view in _item_views(self.ck, items):
                progress.update(1)
                if isinstance(view, OSError):
                    self.problem(f"cannot read the item: {_os_error_text(view)}", item)
                    continue
                try:
                    archive = Archive(view)
                    archive.check_all()
                    if item.kind == "tensor":
                        self._check_tensor(item, archive)
                        self.checked_tensors += 1
                    else:
                        self._check_object(item, archive)
                        self.checked_objects += 1
                except ArchiveError as exc:
                    self.problem(f"not a readable torch.save archive: {exc}", item)
                except OSError as exc:
                    self.problem(f"cannot read the item: {_os_error_text(exc)}", item)
        finally:
            progress.close()

    def _check_object(self, item: Item, archive: Archive) -> bool:
        try:
            describe_pickle(archive.data_pickle())
        except ValueError as exc:
            self.problem(f"data.pkl is not a valid pickle: {exc}", item)
            return False
        return True

    def _check_tensor(self, item: Item, archive: Archive) -> None:
        """The archive, its data.pkl, and where the payload lies, against the metadata and sidecar.

        Framing that is damaged or out of bounds raises ArchiveError (reported by the caller).
        """
        if not self._check_object(item, archive):
            return
        try:
            located = checkpoint.locate_tensor(archive)
        except checkpoint.BadExtent as exc:
            self.problem(str(exc), item)
            return
        except UnsupportedLayout as exc:
            # Legitimate for tensors stock frames with torch.save (sparse, quantized, ...).
            self.notes.append(
                f"{item.file}, offset {item.offset}, key {item.key!r}: a tensor layout "
                f"dcp-native does not parse ({exc}); its archive was checked, its data.pkl not"
            )
            return
        if item.dtype is not None and item.chunk_sizes is not None:
            mismatch = checkpoint.metadata_mismatch(located.saved, item.dtype, item.chunk_sizes)
            if mismatch:
                self.problem(f"data.pkl {mismatch}", item)
        entry = self.ck.sidecar.entries.get(item.file, {}).get(item.offset)
        if entry is not None and entry[1] != located.payload:
            self.problem(
                f"the sidecar puts the payload at item offset {entry[1]}, "
                f"the archive at {located.payload}",
                item,
            )

    # -------------------------------------------------------------- pass 4: every byte

    def read_all(self) -> None:
        """Read every byte of every item, in rounds within _READ_BUDGET, through the engine.

        Finds unreadable ranges of every file, also of files without checksum
        tables (those with tables are read whole by :meth:`check_checksums`).
        """
        items = sorted(self.readable, key=lambda it: (it.file, it.offset))
        total = sum(it.length for it in items)
        pieces = [
            (it, [(it.file, it.offset + start, min(_READ_BUDGET, it.length - start))])
            for it in items
            for start in range(0, max(it.length, 1), _READ_BUDGET)
        ]
        engine, threads = _engine(), _threads()
        failed: set[int] = set()
        progress = self._progress("verify --read-all", total, "bytes", total)
        try:
            for k, got in checkpoint.read_rounds(
                [ranges for _, ranges in pieces],
                lambda boxes: checkpoint.read_boxes(engine, self.ck.directory, boxes, threads),
                _READ_BUDGET,
                isolate=True,
            ):
                item, ranges = pieces[k]
                progress.update(ranges[0][2])
                if isinstance(got, OSError) and id(item) not in failed:
                    failed.add(id(item))
                    self.problem(f"cannot read the item: {_os_error_text(got)}", item)
        finally:
            progress.close()

    def check_checksums(self) -> int:
        """Read every data file that has a CRC32C table and check each block; returns bytes checked.

        The engine checks the blocks as it reads them (ReadFile.table), all
        files together in rounds of _READ_BUDGET bytes; a mismatch names the
        block's file offset and the item that holds it.
        """
        tables = {rel: table for rel in self.ck.files
                  if rel in self.ck.sidecar.tables and rel in self.sizes
                  and (table := self._table(rel)) is not None}
        pieces = [
            [(rel, start, min(_READ_BUDGET, table.size - start))]
            for rel, table in tables.items()
            for start in range(0, table.size, _READ_BUDGET)
        ]
        owners = {rel: [Box(it.offset, 0, it.length, key=it.key)
                        for it in self.ck.item_list if it.file == rel] for rel in tables}
        engine, threads = _engine(), _threads()

        def read(boxes: dict[str, list[Box]]) -> None:
            reads = [FileRead(self.ck.path(rel), tables[rel].size, bx, tables[rel]) for rel, bx in boxes.items()]
            for i, offset in checkpoint.checked_read(engine, reads, threads=threads)[1]:
                rel, block = list(boxes)[i], reads[i].table.block
                self.problem(f"checksum mismatch in the {block}-byte block: the bytes on disk are "
                             "not those written", file=rel, offset=offset,
                             key=checkpoint.owner(owners[rel], offset, offset + block))

        total = sum(table.size for table in tables.values())
        progress = self._progress("verify checksums", total, "bytes", total)
        checked, unreadable = 0, set()
        try:
            for k, got in checkpoint.read_rounds(pieces, read, _READ_BUDGET, isolate=True):
                rel, start, n = pieces[k][0]
                progress.update(n)
                if not isinstance(got, OSError):
                    checked += n
                elif rel not in unreadable:
                    unreadable.add(rel)
                    self.problem(f"cannot be read: {_os_error_text(got)}", file=rel, offset=start)
        finally:
            progress.close()
        self.checked_files = len(tables) - len(unreadable)
        return checked

    def _table(self, rel: str) -> integrity.Table | None:
        """The checksum table of ``rel``, or None with the problem noted."""
        table_file = checkpoint.table_name(rel)
        try:
            return self.ck.table(rel, self.sizes[rel])
        except IntegrityError as exc:
            which = table_file if exc.filename == self.ck.path(table_file) else rel
            self.problem(str(exc).split(": ", 1)[-1], file=which)
        except OSError as exc:
            self.problem(f"the checksum table cannot be read: {_os_error_text(exc)}", file=table_file)
        return None

    # -------------------------------------------------------------- report

    def summary(self) -> str:
        n_files = len(self.ck.files)
        total = sum(self.sizes.values())
        return (
            f"{_plural(len(self.ck.item_list), 'item')} in {_plural(n_files, 'data file')} "
            f"({_human(total)}); framing parsed for {_plural(self.checked_tensors, 'tensor item')} "
            f"and {_plural(self.checked_objects, 'object item')}"
        )


def _problem_json(p: Problem) -> dict[str, Any]:
    return {"file": p.file, "offset": p.offset, "key": p.key, "message": p.message}


def cmd_verify(args: argparse.Namespace) -> int:
    directory = _checkpoint_dir(args.path)
    problems: list[Problem] = []
    verifier = None
    checked = 0
    try:
        ck = _open_checkpoint(directory)
    except UsageError:
        found = _looks_like_unfinished_save(directory)
        if not found:
            raise
        # Data files without .metadata: a damaged or unfinished checkpoint, which is
        # what verify is for (exit 1), not a wrong path (exit 2).
        problems.append(Problem(
            f"missing: the directory holds {', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''} but no committed {_METADATA} "
            "(the save did not finish, or the file was lost)",
            file=_METADATA,
        ))
    except _BadMetadata as exc:
        problems.append(Problem(str(exc), file=_METADATA))
    else:
        verifier = _Verifier(ck, args.progress)
        verifier.check_metadata()
        verifier.check_files()
        verifier.check_framing()
        checked = verifier.check_checksums()
        if args.read_all:
            verifier.read_all()
        problems = sorted(
            verifier.problems,
            key=lambda p: (p.file or "", -1 if p.offset is None else p.offset, p.key or ""),
        )

    tables = verifier.ck.sidecar.tables if verifier else {}
    files_checked = verifier.checked_files if verifier else 0
    checksums = (
        f"CRC32C of every 4 KiB block checked ({_human(checked)} in "
        f"{_plural(files_checked, 'data file')})"
        if tables else "no checksums recorded"
    )
    if args.json:
        doc = {
            "path": os.path.abspath(directory),
            "ok": not problems,
            "written_by": _written_by(verifier.ck.sidecar) if verifier else None,
            "problems": [_problem_json(p) for p in problems],
            "notes": verifier.notes if verifier else [],
            "read_all": bool(args.read_all),
            "checksums": {"files": files_checked, "bytes_checked": checked} if tables else None,
        }
        print(_json(doc))
    else:
        head = os.path.abspath(directory)
        if verifier is not None:
            print(f"{head}: DCP checkpoint, {_describe_sidecar(verifier.ck.sidecar)}")
        else:
            print(f"{head}:")
        if verifier is not None:
            print(f"  checked: {verifier.summary()}")
            if tables and not args.read_all:
                print(f"  {checksums}")
            else:
                extent = (
                    "every byte read" if args.read_all
                    else "payload bytes not read (--read-all reads them)"
                )
                print(f"  {checksums}; {extent}")
            for note in verifier.notes:
                print(f"  note: {note}")
        if problems:
            print(f"FAILED: {_plural(len(problems), 'problem')}")
            for p in problems:
                print(f"  {p}")
        else:
            print("OK: intact")
    return EXIT_PROBLEMS if problems else EXIT_OK
