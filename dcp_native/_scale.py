"""Planning that scales to thousands of ranks: DCP's global save plan and a rank's read items, with
stock's results, in O(n log n).

The coordinator of a save (``DefaultSavePlanner._create_global_plan``) dedups the ranks' plans,
builds the global plan and the metadata, and validates every tensor's chunks. Stock's validation
sweeps each tensor's chunks along its *largest* dimension; an FSDP shard of a ``[d, 4d]`` weight
or of a grouped-query ``[kv, d]`` projection starts at 0 along it on every rank, so every chunk is
compared with every other: O(N²) per tensor (a third of the sharded tensors of a Llama-like model
with Adam's state: its coordinator step takes 130-175 s at 1024 ranks and grows 2.6-3x per
doubling of N, where linear would be 2x). The rest is linear, with large constants: two
``dataclasses.replace`` per item and the cyclic collector's passes over the millions of objects
the plans are made of.

:func:`global_save_plan` gives the same global plan and metadata (equal, and pickled to the same
bytes): dedup grouped by fqn, items copied without ``dataclasses.replace``, and the
validation reduced to a proof per tensor that its chunks are in bounds, fill it and do not overlap
(sorted along a dimension where their starts increase, else grouped into bands along the dimension
with the most distinct starts, recursively). A tensor it cannot prove valid is handed to stock's
``_validate_global_plan`` (alone), so invalid plans raise stock's errors word for word; plans in a
form this module does not handle (another item or index type, an item twice in one plan, ...)
return ``None`` and the caller runs stock's code on them.

A rank's load planning (``create_read_items_for_chunk_list``) sorts every tensor's saved chunks
again for each state dict and, for the same tensors, scans all N of them per local chunk.
:func:`read_items_for_chunks` finds the saved chunks a local chunk overlaps by bisection in a
:class:`ChunkIndex` (two passes over the saved chunks at C speed, kept by the planner while the
metadata is the same object) and orders its read items as stock does. The search is independent
of N; building the index is linear, at a fraction of what unpickling those chunks cost the rank.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import operator
from collections import ChainMap
from typing import Any, Sequence

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem, SavePlan, WriteItem, WriteItemType

try:  # stock's validation (torch >= 2.5) reports the errors of the tensors this module cannot prove valid
    from torch.distributed.checkpoint.default_planner import _validate_global_plan
except ImportError:  # pragma: no cover - older torch: the planners keep stock's whole path
    _validate_global_plan = None

from torch.distributed.checkpoint.planner_helpers import (
    _create_read_item_for_tensor,
    create_read_items_for_chunk_list,
)
from torch.distributed.checkpoint.resharding import (
    _check_shard_metadata_pair_overlap,
    _shards_get_overlap_region_wrt_saved_tensor,
)

__all__ = ["available", "global_save_plan", "ChunkIndex", "read_items_for_chunks"]

_SIZE = torch.Size
_new = object.__new__
_INDEX = operator.attrgetter("index")
_FQN = operator.attrgetter("fqn")
_OFFSET = operator.attrgetter("offset")
_OFFSETS = operator.attrgetter("offsets")
_SIZES = operator.attrgetter("sizes")
_BYTE_IO, _SHARD = WriteItemType.BYTE_IO, WriteItemType.SHARD
#: Plan index and item position in one int: code = plan << _SHIFT | position.
_SHIFT = 32
_MASK = (1 << _SHIFT) - 1


def available() -> bool:
    """Whether this torch has what the fast global plan relies on (stock's validation)."""
    return _validate_global_plan is not None


# ============================================================================ the global save plan


def global_save_plan(all_plans: list[SavePlan], lowest_rank: bool, flatten: bool
                     ) -> tuple[list[SavePlan], Metadata] | None:
    """``DefaultSavePlanner._create_global_plan``'s result for these arguments (its
    ``dedup_save_to_lowest_rank`` and ``flatten_state_dict``), or None where the plans are not in
    the form this function handles: the caller then runs stock's code, which gives the result or
    raises its error. Raises stock's ``ValueError`` for a plan that fails validation.
    """
    if _validate_global_plan is None or len(all_plans) >= 1 << 31:
        return None
    kept = _dedup(all_plans, lowest_rank)
    if kept is None:
        return None
    built = _build(all_plans, kept)
    if built is None:
        return None
    global_plan, md = built
    metadata = Metadata(md)
    if flatten:
        metadata = Metadata(md, planner_data=dict(ChainMap(*[p.planner_data for p in global_plan])))
    suspects = [key for key, value in md.items() if not _proven(value, len(global_plan) > 1)]
    if suspects:
        # Stock's own checks on the tensors not proven valid: its errors, in its order (the
        # others have none), and its message.
        errors = _validate_global_plan(global_plan, Metadata({k: md[k] for k in suspects}))
        if errors:
            summary = "; ".join(errors)
            if len(summary) > 500:
                summary = summary[:500] + "... (truncated)"
            raise ValueError(f"Failed to validate global plan: {summary}")
    return global_plan, metadata


def _dedup(all_plans: list[SavePlan], lowest_rank: bool) -> list[list[WriteItem]] | None:
    """Each plan's items after stock's ``dedup_save_plans``: an item (its ``MetadataIndex``: fqn
    and offset) in several plans stays in one, chosen as stock chooses (the lowest rank, or the
    plan with the fewest bytes so far, ties broken in the order of stock's set of plan indices),
    the others drop it. None unless every item is a ``WriteItem`` with a ``MetadataIndex``, each
    at most once in a plan.

    The items are grouped by fqn first (a few thousand keys: the dictionary stays in cache, where
    one over every item of every rank would not), then each fqn's offsets are checked for
    repeats at C speed.
    """
    by_fqn: dict[Any, tuple[list, list, list]] = {}  # fqn -> (offsets, plan indices, positions), scan order
    get = by_fqn.get
    longest = 0
    for plan in all_plans:
        if type(plan.items) is not list:
            return None
        longest = max(longest, len(plan.items))
    positions = list(range(longest))  # shared int objects: nothing allocated per item
    for i, plan in enumerate(all_plans):
        for pos, item in zip(positions, plan.items):
            if type(item) is not WriteItem:
                return None
            index = item.index
            if type(index) is not MetadataIndex:
                return None
            entry = get(index.fqn)
            if entry is None:
                entry = by_fqn[index.fqn] = ([], [], [])
            entry[0].append(index.offset)
            entry[1].append(i)
            entry[2].append(pos)
    multi: dict[tuple, tuple[set[int], list[int]]] = {}  # (fqn, offset) in several plans -> (plans, codes)
    for fqn, (offsets, plans, where) in by_fqn.items():
        if len(offsets) == 1 or len(set(offsets)) == len(offsets):
            continue
        groups: dict[Any, list[int]] = {}
        for k, offset in enumerate(offsets):
            groups.setdefault(offset, []).append(k)
        for offset, ks in groups.items():
            if len(ks) == 1:
                continue
            owners = [plans[k] for k in ks]
            if len(set(owners)) != len(owners):
                return None  # twice in one plan: stock's path (its errors)
            # Stock's set of plan indices, built in the same order (its iteration order breaks
            # ties); the codes of the occurrences in scan order (first and last are stock's).
            multi[(fqn, offset)] = (set(owners), [(plans[k] << _SHIFT) | where[k] for k in ks])
    if not multi:
        return [plan.items for plan in all_plans]
    chosen = _choose(all_plans, multi, lowest_rank)
    drops: dict[int, set[int]] = {}
    for key, (_, codes) in multi.items():
        keep = chosen[key]
        for code in codes:
            plan = code >> _SHIFT
            if plan != keep:
                drops.setdefault(plan, set()).add(code & _MASK)
    out = []
    for i, plan in enumerate(all_plans):
        drop = drops.get(i)
        items = plan.items
        out.append(items if drop is None else [item for pos, item in enumerate(items) if pos not in drop])
    return out


def _item_at(all_plans: list[SavePlan], code: int) -> WriteItem:
    return all_plans[code >> _SHIFT].items[code & _MASK]


def _choose(all_plans: list[SavePlan], multi: dict[tuple, tuple[set[int], list[int]]], lowest_rank: bool
            ) -> dict[tuple, int]:
    """The plan each item of several plans stays in.

    Stock walks every distinct item in the order of first occurrence (plan by plan), adding its
    bytes to the plan it stays in, and keeps an item of several plans in the one of them with the
    fewest bytes at that point. Those plans are its first plan, whose items before it have been
    walked, and later plans, which so far hold only items of several plans chosen for them. So
    the walk visits a plan's items only where such an item first occurs, and only up to it (FSDP:
    the first rank's plan; where a tensor has fewer rows than ranks, the first rank with an empty
    shard)."""
    if lowest_rank:
        return {key: min(plans) for key, (plans, _) in multi.items()}
    chosen: dict[tuple, int] = {}
    sizes = [0] * len(all_plans)
    walked: dict[int, int] = {}  # plan -> its items up to here are counted

    def walk(plan: int, stop: int) -> None:
        items = all_plans[plan].items
        for item in items[walked.get(plan, 0):stop]:
            index = item.index
            if (index.fqn, index.offset) not in multi:  # the others count where they are chosen
                sizes[plan] += item.tensor_storage_size() or 1
        walked[plan] = max(stop, walked.get(plan, 0))

    for key, (plans, codes) in sorted(multi.items(), key=lambda kv: kv[1][1][0]):
        walk(codes[0] >> _SHIFT, codes[0] & _MASK)  # the others in ``plans`` come later
        keep = min(plans, key=sizes.__getitem__)
        chosen[key] = keep
        # Stock counts the bytes of the item's last occurrence.
        sizes[keep] += _item_at(all_plans, codes[-1]).tensor_storage_size() or 1
    return chosen


def _build(all_plans: list[SavePlan], kept: list[list[WriteItem]]
           ) -> tuple[list[SavePlan], dict[str, Any]] | None:
    """``create_default_global_save_plan``: every tensor item with the index of its chunk in the
    metadata, and the metadata; None where stock's would raise (its path raises the same)."""
    md: dict[str, Any] = {}
    get = md.get
    plans = []
    for plan, items in zip(all_plans, kept):
        new_items = []
        append = new_items.append
        for item in items:
            index = item.index
            fqn = index.fqn
            kind = item.type
            if kind is _BYTE_IO:
                if fqn in md:
                    return None
                md[fqn] = BytesStorageMetadata()
                append(item)
                continue
            tmd = get(fqn)
            if tmd is not None and (kind is not _SHARD or type(tmd) is not TensorStorageMetadata):
                return None
            data = item.tensor_data
            if data is None or data.chunk is None:
                return None
            if tmd is None:
                tmd = md[fqn] = TensorStorageMetadata(properties=data.properties, size=data.size, chunks=[])
            chunks = tmd.chunks
            # As dataclasses.replace(item, index=replace(index, index=k)) makes them, without its cost:
            # the same fields in the same order. The offset is the old index's (MetadataIndex makes
            # a torch.Size of its own for each index, which nothing else refers to).
            new_index = _new(MetadataIndex)
            d = new_index.__dict__
            d["fqn"] = fqn
            d["index"] = len(chunks)
            offset = index.offset
            if offset is not None:
                d["offset"] = offset
            new_item = _new(WriteItem)
            d = new_item.__dict__
            d.update(item.__dict__)
            d["index"] = new_index
            append(new_item)
            chunks.append(data.chunk)
        plans.append(dataclasses.replace(plan, items=new_items))
    return plans, md


# ---------------------------------------------------------------------------- validation


def _proven(value: Any, check_volume: bool) -> bool:
    """Whether stock's ``_validate_global_plan`` finds nothing wrong with this metadata entry:
    every chunk in bounds, no two overlapping, their volume the tensor's (several plans). False
    means "not proven" (stock's check then decides)."""
    kind = type(value)
    if kind is BytesStorageMetadata:
        return True
    if kind is not TensorStorageMetadata or type(value.size) is not _SIZE:
        return False
    size = value.size
    ndim = len(size)
    if ndim == 0:
        return True  # stock checks nothing for 0-d tensors
    chunks = value.chunks
    if type(chunks) is not list:
        return False
    if not chunks:
        return not check_volume or math.prod(size) == 0
    try:
        offsets = list(map(_OFFSETS, chunks))
        lengths = list(map(_SIZES, chunks))
        # Stock compares a chunk with the tensor along the tensor's dimensions, and two chunks
        # along the first one's: chunks of another rank are left to it.
        if set(map(len, offsets)) != {ndim} or set(map(len, lengths)) != {ndim}:
            return False
        starts, ends = [], []
        for k in range(ndim):
            o = list(map(operator.itemgetter(k), offsets))
            n = list(map(operator.itemgetter(k), lengths))
            if min(o) < 0 or min(n) < 0:
                return False
            e = list(map(operator.add, o, n))
            if max(e) > size[k]:
                return False
            starts.append(o)
            ends.append(e)
        if check_volume and sum(map(math.prod, lengths)) != math.prod(size):
            return False
        return len(chunks) == 1 or _disjoint(starts, ends)
    except (AttributeError, TypeError):
        return False  # not chunks of numbers: stock's checks say what they make of them


def _disjoint(starts: list[list[int]], ends: list[list[int]]) -> bool:
    """Whether no two boxes overlap (stock's strict test: in every dimension each starts before
    the other ends); False also where unsure. ``starts[k][i]``, ``ends[k][i]``: box i along k."""
    for o, e in zip(starts, ends):
        # Starts increasing along k in the given order (FSDP's chunks, in rank order): disjoint
        # along k, hence as boxes, when each starts at or after every earlier one's end.
        if all(map(operator.lt, o, itertools.islice(o, 1, None))):
            return all(map(operator.ge, itertools.islice(o, 1, None), itertools.accumulate(e, max)))
    return _disjoint_bands(list(range(len(starts[0]))), starts, ends, list(range(len(starts))))


def _disjoint_bands(ids: list[int], starts: list[list[int]], ends: list[list[int]], dims: list[int]) -> bool:
    """Grouped along the dimension with the most distinct starts: boxes with the same interval
    there form a band; bands must not overlap along it, and within a band of non-empty interval
    the boxes must be disjoint in the other dimensions."""
    if len(ids) <= 1:
        return True
    if not dims:
        return False  # the same non-empty interval in every dimension: they overlap
    k = max(dims, key=lambda d: len({starts[d][i] for i in ids}))
    o, e = starts[k], ends[k]
    bands: dict[tuple[int, int], list[int]] = {}
    for i in ids:
        bands.setdefault((o[i], e[i]), []).append(i)
    reach = None
    for lo, hi in sorted(bands):
        if reach is not None and lo < reach:
            return False
        reach = hi if reach is None else max(reach, hi)
    rest = [d for d in dims if d != k]
    return all(len(band) == 1 or lo == hi or _disjoint_bands(band, starts, ends, rest)
               for (lo, hi), band in bands.items())


# ============================================================================ load planning


class ChunkIndex:
    """The saved chunks of one tensor, for finding the ones a box overlaps by bisection.

    Built lazily per dimension, each in two passes over the chunks at C speed: their starts and
    ends along the dimension they are searched along (the first along which their starts already
    increase in the saved order, as FSDP's do along dim 0; else the one with the most distinct
    starts), sorted, with the running maximum of the ends; the ends along another dimension only
    where stock's order of the read items needs them. A chunk without the dimension asked for
    raises IndexError (the caller falls back to stock's scan).
    """

    __slots__ = ("chunks", "count", "_starts", "_ends", "_sorted", "_search")

    def __init__(self, chunks: list[ChunkStorageMetadata]) -> None:
        self.chunks = chunks
        self.count = len(chunks)
        self._starts: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}
        self._sorted: dict[int, tuple[Sequence[int], list[int], list[int]]] = {}
        self._search: dict[int, int] = {}

    def current(self, chunks: list[ChunkStorageMetadata]) -> bool:
        """Whether this index still describes ``chunks`` (the same list, of the same length)."""
        return chunks is self.chunks and len(chunks) == self.count

    def starts(self, dim: int) -> list[int]:
        o = self._starts.get(dim)
        if o is None:
            o = self._starts[dim] = list(map(operator.itemgetter(dim), map(_OFFSETS, self.chunks)))
        return o

    def ends(self, dim: int) -> list[int]:
        e = self._ends.get(dim)
        if e is None:
            e = self._ends[dim] = list(map(operator.add, self.starts(dim),
                                           map(operator.itemgetter(dim), map(_SIZES, self.chunks))))
        return e

    def max_end(self, dim: int) -> int:
        return max(self.ends(dim))

    def search_dim(self, ndim: int) -> int:
        """The dimension (of the first ``ndim``) the chunks are searched along (see the class docs)."""
        found = self._search.get(ndim)
        if found is None:
            found = 0
            for dim in range(ndim):
                o = self.starts(dim)
                if o[0] != o[-1] and all(map(operator.le, o, itertools.islice(o, 1, None))):
                    found = dim
                    break
            else:
                if ndim > 1:
                    found = max(range(ndim), key=lambda d: len(set(self.starts(d))))
            self._search[ndim] = found
        return found

    def _along(self, dim: int) -> tuple[Sequence[int], list[int], list[int]]:
        """(order, starts in that order, running max of the ends in that order) along ``dim``."""
        found = self._sorted.get(dim)
        if found is None:
            o, e = self.starts(dim), self.ends(dim)
            if all(map(operator.le, o, itertools.islice(o, 1, None))):
                found = (range(len(o)), o, list(itertools.accumulate(e, max)))
            else:
                order = sorted(range(len(o)), key=o.__getitem__)
                found = (order, list(map(o.__getitem__, order)), list(itertools.accumulate(map(e.__getitem__, order), max)))
            self._sorted[dim] = found
        return found

    def overlapping(self, dim: int, lo: int, hi: int) -> list[int]:
        """The chunks whose interval along ``dim`` overlaps [lo, hi) (each starts before the other
        ends), in no particular order."""
        order, starts, reach = self._along(dim)
        ends = self.ends(dim)
        out = []
        pos = bisect.bisect_left(starts, hi) - 1
        while pos >= 0 and reach[pos] > lo:
            i = order[pos]
            if ends[i] > lo:
                out.append(i)
            pos -= 1
        return out


def _regular(chunks: list[Any], ndim: int) -> bool:
    return all(len(c.offsets) == ndim and len(c.sizes) == ndim for c in chunks)


def read_items_for_chunks(fqn: str, checkpoint_md: TensorStorageMetadata, local_chunks: list[ChunkStorageMetadata],
                          index: ChunkIndex | None) -> list[ReadItem]:
    """``create_read_items_for_chunk_list(fqn, checkpoint_md, local_chunks)``, the same read items in
    the same order, with the saved chunks found through ``index`` (built for
    ``checkpoint_md.chunks``); stock's function where the chunks are not regular."""
    saved = checkpoint_md.chunks
    if not local_chunks or not saved:
        return []
    ndim = len(local_chunks[0].offsets)
    if index is None or ndim == 0 or not index.current(saved) or not _regular(local_chunks, ndim):
        return create_read_items_for_chunk_list(fqn, checkpoint_md, local_chunks)
    try:
        found, order = _find(index, local_chunks, ndim)
    except (IndexError, TypeError, AttributeError):
        # A saved chunk short of a dimension, or not chunk metadata: stock's scan says what it makes of it.
        return create_read_items_for_chunk_list(fqn, checkpoint_md, local_chunks)
    read_items: list[ReadItem] = []
    for local_idx in order:
        local = local_chunks[local_idx]
        for storage_idx in found[local_idx]:
            stored = saved[storage_idx]
            storage_offsets, dest_offsets, lengths = [], [], []
            for _, saved_offset, local_offset, length in _shards_get_overlap_region_wrt_saved_tensor(
                    saved_shard=stored, current_shard=local):
                storage_offsets.append(saved_offset)
                dest_offsets.append(local_offset)
                lengths.append(length)
            read_items.append(_create_read_item_for_tensor(
                dest_index=MetadataIndex(fqn, local.offsets, local_idx), dest_offsets=dest_offsets,
                storage_index=MetadataIndex(fqn, stored.offsets, storage_idx), storage_offsets=storage_offsets,
                lengths=lengths))
    return read_items


def _find(index: ChunkIndex, local_chunks: list[ChunkStorageMetadata], ndim: int
          ) -> tuple[list[list[int]], Sequence[int]]:
    """Per local chunk, the saved chunks it overlaps (stock's test), and the order of the local
    chunks, both in stock's order: it sweeps along the dimension of largest extent over all chunks
    (the first such), taking the local chunks by their start along it, and a local chunk's saved
    chunks by their end along it, then by index. That dimension is needed only to order two or
    more of either."""
    saved = index.chunks
    search = index.search_dim(ndim)
    found = []
    for local in local_chunks:
        lo = local.offsets[search]
        found.append([i for i in index.overlapping(search, lo, lo + local.sizes[search])
                      if _check_shard_metadata_pair_overlap(local, saved[i])])
    order: Sequence[int] = range(len(local_chunks))
    if len(local_chunks) > 1 or len(found[0]) > 1:
        sweep = 0
        if ndim > 1:
            widest = 0
            for dim in range(ndim):
                extent = max(index.max_end(dim), max(c.offsets[dim] + c.sizes[dim] for c in local_chunks))
                if extent > widest:
                    widest, sweep = extent, dim
        ends = index.ends(sweep)
        order = sorted(order, key=lambda i: local_chunks[i].offsets[sweep])
        for f in found:
            f.sort(key=lambda i: (ends[i], i))
    return found, order
