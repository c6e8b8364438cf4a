"""``dcp-native verify``: check a checkpoint without loading it, listing every problem.

It runs in passes, each adding problems to one list so that every problem is
reported, not only the first: metadata, data files and sizes, item framing
(zip end records, central directory, local headers, ``data.pkl`` against the
metadata, the sidecar against the archive), the CRC32C of every 4 KiB block of
each data file that has a checksum table (read in bounded rounds, checked by
the engine), and with ``--read-all`` every byte of every item, also of files
without checksums.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import math
import os
import sys
import time
from typing import Any, Callable, Iterator

from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from .. import checkpoint, integrity
from .._errors import CheckpointError, IntegrityError
from .._safe_pickle import describe_pickle
from ..checkpoint import Archive, ArchiveError, FileRead, Item, UnsupportedLayout
from ..plan import Box
from ..reader import default_thread_count
from .common import (
    _archives, _checkpoint_dir, _describe_sidecar, _engine, _human, _json, _listing, _METADATA,
    _open_checkpoint, _os_error_text, _plural, _PROGRESS_MIN_BYTES, _PROGRESS_MIN_ITEMS,
    _READ_BUDGET, _written_by, EXIT_OK, EXIT_PROBLEMS,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Problem:
    """One thing wrong with a checkpoint, and where (the fields in the order --json prints them)."""

    file: str | None = None
    offset: int | None = None
    key: str | None = None
    message: str

    def __str__(self) -> str:
        where = ", ".join(w for w in (self.file, self.offset is not None and f"offset {self.offset}",
                                      self.key is not None and f"key {self.key!r}") if w)
        return f"{where}: {self.message}" if where else self.message


class _Verifier:
    """The verify passes over the checkpoint in ``directory``; each appends to ``problems``."""

    def __init__(self, directory: str, progress: str) -> None:
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        self.progress_mode = progress
        self.checked: collections.Counter[str] = collections.Counter()  # items by kind, framing parsed
        self.checked_bytes = self.checked_files = 0
        self.ck = _open_checkpoint(directory, lambda why: self.problem(why, file=_METADATA))

    def problem(self, message: str, item: Item | None = None, **where: Any) -> None:
        if item is not None:
            where = {"file": item.file, "offset": item.offset, "key": item.key, **where}
        self.problems.append(Problem(message=message, **where))

    @contextlib.contextmanager
    def _progress(self, label: str, total: int,
                  count: Callable[[int, int], str]) -> Iterator[Callable[[int], None]]:
        """A one-line progress bar on stderr (\\r updates), or nothing; yields what advances it."""
        big = len(self.ck.item_list) >= _PROGRESS_MIN_ITEMS or sum(self.ck.sizes.values()) >= _PROGRESS_MIN_BYTES
        enabled = self.progress_mode == "always" or (self.progress_mode == "auto" and big and sys.stderr.isatty())
        done, last, total = 0, 0.0, max(total, 1)

        def advance(n: int) -> None:
            nonlocal done, last
            done += n
            if not enabled or (time.monotonic() - last < 0.1 and done < total):
                return
            last, frac = time.monotonic(), min(1.0, done / total)
            sys.stderr.write(f"\r{label} [{'#' * int(30 * frac):<30}] {frac:4.0%} {count(done, total)}")
            sys.stderr.flush()

        try:
            yield advance
        finally:
            if enabled:
                sys.stderr.write("\n")
                sys.stderr.flush()

    def run(self, read_all: bool) -> None:
        self.check_metadata()
        self.check_files()
        self.check_framing()
        self.check_checksums()
        if read_all:
            self.read_all()

    # -------------------------------------------------------------- pass 1: metadata

    def check_metadata(self) -> None:
        md = self.ck.metadata
        saved: dict[str, set[tuple]] = collections.defaultdict(set)
        for item in self.ck.item_list:
            saved[item.key].add(item.chunk_offsets)
            if item.key not in md.state_dict_metadata:
                self.problem("the item's key is not in the metadata's state dict", item)
            elif item.kind == "tensor" and item.chunk_sizes is None:
                self.problem(f"no saved chunk of the tensor starts at {list(item.chunk_offsets)}", item)
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
            for chunk in entry.chunks:
                offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
                if offsets not in saved.get(key, ()):
                    self.problem(f"chunk at {list(offsets)} has no saved item", key=key)
                if len(offsets) != len(entry.size) or any(
                    o < 0 or n < 0 or o + n > s for o, n, s in zip(offsets, sizes, entry.size)
                ):
                    self.problem(f"chunk at {list(offsets)} of size {list(sizes)} lies outside the "
                                 f"tensor's shape {list(entry.size)}", key=key)
            total, numel = sum(math.prod(c.sizes) for c in entry.chunks), math.prod(entry.size)
            if total != numel:
                self.problem(f"the saved chunks hold {total} elements, the tensor's shape "
                             f"{list(entry.size)} has {numel}", key=key)
        for items in self.ck.by_file.values():
            for a, b in zip(items, items[1:]):
                if a.offset + a.length > b.offset:
                    self.problem(f"the item overlaps the one before it ({a.key!r} at offset "
                                 f"{a.offset}, {a.length} bytes)", b)
        self._check_sidecar_entries()

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
            for offset, (length, _) in entries.items():
                item = known.get((rel, offset))
                if item is None:
                    self.problem("the sidecar names an item the metadata does not have",
                                 file=rel, offset=offset)
                elif item.kind != "tensor":
                    self.problem("the sidecar gives a payload offset for an object item", item)
                elif length != item.length:
                    self.problem(f"the sidecar says the item has {length} bytes, "
                                 f"the metadata {item.length}", item)

    # -------------------------------------------------------------- pass 2: files and sizes

    def check_files(self) -> None:
        for rel, items in self.ck.by_file.items():
            exc = self.ck.size_errors.get(rel)
            if isinstance(exc, FileNotFoundError):
                keys = sorted({it.key for it in items})
                self.problem(f"the data file is missing; it holds {_plural(len(items), 'item')} "
                             f"of {_plural(len(keys), 'key')}: {_listing(map(repr, keys), 5)}", file=rel)
            elif isinstance(exc, CheckpointError):  # a name outside the directory, a FIFO, ...
                self.problem(str(exc).removeprefix(f"{self.ck.path(rel)}: "), file=rel)
            elif exc is not None:
                self.problem(f"cannot stat the data file: {exc.strerror}", file=rel)
            else:
                for item in items:
                    if item.offset + item.length > self.ck.sizes[rel]:
                        self.problem(f"the file is truncated: the item ends at byte "
                                     f"{item.offset + item.length}, the file has "
                                     f"{self.ck.sizes[rel]} bytes", item)
        try:
            strays = sorted(n for n in os.listdir(self.ck.directory)
                            if n.endswith(".distcp") and n not in self.ck.by_file)
        except OSError:
            strays = []
        if strays:
            self.notes.append(f"{_plural(len(strays), 'data file')} not referenced by the metadata "
                              f"(left over from another save?): {_listing(strays, 5)}")

    # -------------------------------------------------------------- pass 3: framing

    def check_framing(self) -> None:
        items = [it for it in self.ck.readable if not it.transformed]
        if len(items) < len(self.ck.readable):
            self.notes.append(f"{_plural(len(self.ck.readable) - len(items), 'item')} written with "
                              "stream transforms: bounds checked, framing not parsed")
        with self._progress("verify", len(items), lambda done, total: f"{done}/{total} items") as advance:
            for item, archive in _archives(self.ck, items):
                advance(1)
                try:
                    if isinstance(archive, Exception):
                        raise archive
                    self._check_item(item, archive)
                    self.checked[item.kind] += 1
                except ArchiveError as exc:
                    self.problem(f"not a readable torch.save archive: {exc}", item)
                except OSError as exc:
                    self.problem(f"cannot read the item: {_os_error_text(exc)}", item)

    def _check_item(self, item: Item, archive: Archive) -> None:
        """Its data.pkl and, for a tensor, where the payload lies, against the metadata and sidecar.

        Framing that is damaged or out of bounds raises ArchiveError (reported by the caller).
        """
        try:
            describe_pickle(archive.data_pickle())
        except ValueError as exc:
            self.problem(f"data.pkl is not a valid pickle: {exc}", item)
            return
        if item.kind != "tensor":
            return
        try:
            located = checkpoint.locate_tensor(archive)
        except checkpoint.BadExtent as exc:
            self.problem(str(exc), item)
            return
        except UnsupportedLayout as exc:
            # Legitimate for tensors stock frames with torch.save (sparse, quantized, ...).
            self.notes.append(f"{item.file}, offset {item.offset}, key {item.key!r}: a tensor layout "
                              f"dcp-native does not parse ({exc}); its archive was checked, its data.pkl not")
            return
        if item.dtype is not None and item.chunk_sizes is not None:
            mismatch = checkpoint.metadata_mismatch(located.saved, item.dtype, item.chunk_sizes)
            if mismatch:
                self.problem(f"data.pkl {mismatch}", item)
        entry = self.ck.sidecar.entries.get(item.file, {}).get(item.offset)
        if entry is not None and entry[1] != located.payload:
            self.problem(f"the sidecar puts the payload at item offset {entry[1]}, "
                         f"the archive at {located.payload}", item)

    # -------------------------------------------------------------- pass 4: every byte

    def _read(self, label: str, spans: list[tuple[Any, str, int, int]], read: Callable) -> tuple[int, dict]:
        """Read ``(owner, file, offset, length)`` spans through ``read`` (one round's boxes per
        data file) in rounds of _READ_BUDGET bytes, with a progress bar. Returns the bytes read
        and each owner's first failure: ``{owner: (file offset, OSError)}``."""
        pieces = [(owner, rel, offset + start, min(_READ_BUDGET, length - start))
                  for owner, rel, offset, length in spans for start in range(0, length, _READ_BUDGET)]
        done, failed = 0, {}
        with self._progress(label, sum(p[3] for p in pieces),
                            lambda done, total: f"{_human(done)}/{_human(total)}") as advance:
            for k, got in checkpoint.read_rounds([[p[1:]] for p in pieces], read, _READ_BUDGET, isolate=True):
                owner, _, offset, n = pieces[k]
                advance(n)
                if isinstance(got, OSError):
                    failed.setdefault(owner, (offset, got))
                else:
                    done += n
        return done, failed

    def read_all(self) -> None:
        """Read every byte of every item through the engine: finds unreadable ranges of every file,
        also of files without checksum tables (those with tables are read whole by
        :meth:`check_checksums`)."""
        read = functools.partial(checkpoint.read_boxes, _engine(), self.ck.directory,
                                 threads=default_thread_count())
        spans = [(i, it.file, it.offset, it.length) for i, it in enumerate(self.ck.readable)]
        for i, (_, exc) in self._read("verify --read-all", spans, read)[1].items():
            self.problem(f"cannot read the item: {_os_error_text(exc)}", self.ck.readable[i])

    def check_checksums(self) -> None:
        """Read every data file that has a CRC32C table and check each block.

        The engine checks the blocks as it reads them (ReadFile.table), all files
        together; a mismatch names the block's file offset and the item that holds it.
        """
        tables = {rel: table for rel in self.ck.files
                  if rel in self.ck.sidecar.tables and rel in self.ck.sizes
                  and (table := self._table(rel)) is not None}
        owners = {rel: [Box(it.offset, 0, it.length, key=it.key) for it in self.ck.by_file[rel]]
                  for rel in tables}
        engine, threads = _engine(), default_thread_count()

        def read(boxes: dict[str, list[Box]]) -> None:
            reads = [FileRead(self.ck.path(rel), tables[rel].size, bx, tables[rel]) for rel, bx in boxes.items()]
            for i, offset in checkpoint.checked_read(engine, reads, threads=threads)[1]:
                rel, block = list(boxes)[i], reads[i].table.block
                self.problem(f"checksum mismatch in the {block}-byte block: the bytes on disk are "
                             "not those written", file=rel, offset=offset,
                             key=checkpoint.owner(owners[rel], offset, offset + block))

        spans = [(rel, rel, 0, table.size) for rel, table in tables.items()]
        self.checked_bytes, failed = self._read("verify checksums", spans, read)
        for rel, (offset, exc) in failed.items():
            self.problem(f"cannot be read: {_os_error_text(exc)}", file=rel, offset=offset)
        self.checked_files = len(tables) - len(failed)

    def _table(self, rel: str) -> integrity.Table | None:
        """The checksum table of ``rel``, or None with the problem noted."""
        table_file = checkpoint.table_name(rel)
        try:
            return self.ck.table(rel, self.ck.sizes[rel])
        except IntegrityError as exc:
            which = table_file if exc.filename == self.ck.path(table_file) else rel
            self.problem(str(exc).split(": ", 1)[-1], file=which)
        except OSError as exc:
            self.problem(f"the checksum table cannot be read: {_os_error_text(exc)}", file=table_file)
        return None


def cmd_verify(args: argparse.Namespace) -> int:
    directory = _checkpoint_dir(args.path)
    v = _Verifier(directory, args.progress)
    ck = v.ck
    if ck is not None:
        v.run(args.read_all)
    problems = sorted(v.problems, key=lambda p: (p.file or "", -1 if p.offset is None else p.offset, p.key or ""))
    tables = ck.sidecar.tables if ck else {}
    if args.json:
        print(_json({
            "path": os.path.abspath(directory),
            "ok": not problems,
            "written_by": _written_by(ck.sidecar) if ck else None,
            "problems": [dataclasses.asdict(p) for p in problems],
            "notes": v.notes,
            "read_all": bool(args.read_all),
            "checksums": {"files": v.checked_files, "bytes_checked": v.checked_bytes} if tables else None,
        }))
        return EXIT_PROBLEMS if problems else EXIT_OK
    print(f"{os.path.abspath(directory)}:" + (f" DCP checkpoint, {_describe_sidecar(ck.sidecar)}" if ck else ""))
    if ck is not None:
        print(f"  checked: {_plural(len(ck.item_list), 'item')} in {_plural(len(ck.files), 'data file')} "
              f"({_human(sum(ck.sizes.values()))}); framing parsed for "
              f"{_plural(v.checked['tensor'], 'tensor item')} and {_plural(v.checked['object'], 'object item')}")
        checksums = (f"CRC32C of every 4 KiB block checked ({_human(v.checked_bytes)} in "
                     f"{_plural(v.checked_files, 'data file')})" if tables else "no checksums recorded")
        extent = ("; every byte read" if args.read_all
                  else "" if tables else "; payload bytes not read (--read-all reads them)")
        print(f"  {checksums}{extent}")
        for note in v.notes:
            print(f"  note: {note}")
    if problems:
        print(f"FAILED: {_plural(len(problems), 'problem')}")
        for p in problems:
            print(f"  {p}")
    else:
        print("OK: intact")
    return EXIT_PROBLEMS if problems else EXIT_OK
