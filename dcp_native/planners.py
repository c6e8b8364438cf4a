"""Planners that plan once per state-dict structure: repeated saves and loads skip DCP's planning.

A training loop saves (and a restart, an evaluation loop or a resharding job loads) a state dict
of the same structure again and again; DCP plans every one from scratch: a write or read item
per tensor, the global plan, its validation and the metadata, and the plans travel to the
coordinator and back. :class:`CachingSavePlanner` and :class:`CachingLoadPlanner` are drop-in
subclasses of DCP's ``DefaultSavePlanner`` / ``DefaultLoadPlanner`` that keep their plans
between calls while the structure stays the same. Use one planner object for every save (or
load) of one state dict::

    planner = dcp_native.CachingSavePlanner()
    for step in ...:
        dcp.save(sd, storage_writer=dcp_native.FileSystemWriter(path, thread_count=4),
                 planner=planner)

**The structure** of a state dict, checked on every call (about 1 µs per value): for each key
(after DCP's flattening) its flattening path and, for a tensor, its type, shape, dtype, layout,
strides, device, ``requires_grad`` and pinned state; for a DTensor its global shape, mesh,
placements and local tensor's shape, strides and device; for any other value only that it is
an object (objects are pickled afresh by every save: their bytes are never cached). Values
that plan themselves otherwise (ShardedTensor, tensor subclasses) make the state dict
uncacheable: it is then planned every time, as stock does.

**Saves** cache the local plan (each rank), the global plan and metadata (the coordinator) and
the final plan (each rank). The protocol is stock's ``enable_plan_caching`` (no collective of
its own: the plans' usual gather and scatter carry it), with tokens that make it sound. A rank
whose structure is unchanged sends a token instead of its plan; the coordinator reuses its
global plan and metadata only when every rank sent the token of the plan it holds for that
rank, and then scatters a token naming that global plan, which every rank checks against the
final plan it keeps. Any other case (a rank changed, a new rank, a planner created anew) is
planned in full from the plans each rank sent or the coordinator holds; a token nobody can
honour raises (the planners of the ranks are out of step, e.g. one rank made a new planner),
and a save that failed anywhere makes every rank send its full plan next time. The plan's
``storage_data`` always comes from this save's storage writer (dcp_native's writer names
every save's files after the save). The metadata handed to the writer is a shallow copy of the
cached one (writers set its ``storage_data``).

**Loads** cache the local and final load plan of each rank for one structure *and one
checkpoint*: the metadata's ``state_dict_metadata`` and ``storage_data`` must be the very
objects the plan was made from. dcp_native's :class:`~dcp_native.FileSystemReader` hands out
the same objects for a ``.metadata`` whose bytes are identical to the one it read before (and
parses it once); stock's reader parses it anew every time, so with it these planners plan
every load (correct, no gain). Read items name tensors by key and offsets only: each load
resolves them in the state dict it is given. DCP's default global load plan keeps every rank's
plan as it is, so a rank with a cached plan sends a token and gets it back; no rank depends on
another's cache.

**With dcp_native's storage** a reused save plan saves more: the writer keeps the last layout
of the plan (which item goes where in which file, the framing; each tensor is written from its
new memory and each object from its new pickle, and anything that no longer fits is laid out
anew) and the last pickle of the metadata (only the save id and the file names change), and the
reader parses a byte-identical ``.metadata`` once. Stock's writer and reader work too, without
those gains.

**At scale** (thousands of ranks) the first plan of a structure is fast too
(:mod:`dcp_native._scale`): the coordinator's global plan and metadata come from a dedup, a copy
and a validation in O(n log n) instead of stock's, whose validation compares every FSDP shard of
a tensor wider than tall with every other (1024 ranks, 1,000 parameters with Adam's state: 139 s
-> 12 s); a rank's load plan finds the saved chunks each local chunk overlaps by bisection in an
index of them (built once per checkpoint metadata) instead of sorting and scanning them for each
tensor. Both give stock's results: the same global plan and metadata (pickled to the same bytes),
the same read items in the same order, and stock's errors for invalid plans (stock's own checks
run on every tensor not proven valid).

:attr:`CachingSavePlanner.reused` / :attr:`CachingLoadPlanner.reused` say whether the last call
reused its cached plan (on this rank). ``CachingSavePlanner.storage_cache`` is a dict a storage
writer may keep with the cached plan (dcp_native's writer keeps its file layout there, see
:mod:`dcp_native.writer`). Like stock's plan cache, the cache assumes that nobody changes the
plans and metadata it hands out (the metadata ``dcp.save`` returns shares its
``state_dict_metadata`` with the cache).
"""

from __future__ import annotations

import copy
import dataclasses
import uuid
from typing import Any

import torch
from torch.distributed.checkpoint import _version
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, WriteItemType
from torch.distributed.checkpoint.planner_helpers import _create_chunk_list, _create_read_items

from . import _scale
from ._gc import gc_paused

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["CachingSavePlanner", "CachingLoadPlanner", "structure"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


@dataclasses.dataclass(frozen=True)
class _Token:
    """Stands for a plan the receiver holds: "use the plan cached under ``value``"."""

    value: str


@dataclasses.dataclass(frozen=True)
class _Tagged:
    """A full plan's ``planner_data`` (``data``) with the token it is cached under."""

    token: str
    data: Any


def _new_token() -> str:
    return uuid.uuid4().hex


def _tensor_part(t: torch.Tensor) -> tuple:
    cpu = t.device.type == "cpu"
    return (t.shape, t.dtype, t.device, t.stride(), t.requires_grad, cpu and t.is_pinned())


def structure(state_dict: dict[str, Any], mappings: dict[str, Any] | None = None) -> tuple | None:
    """The structure of a flattened state dict, as the caching planners compare it (see the module
    docs); None when it holds a value that is always planned afresh."""
    with gc_paused():
        return _structure(state_dict, mappings or {})


def _structure(state_dict: dict[str, Any], mappings: dict[str, Any]) -> tuple | None:
    parts: list[tuple] = []
    for fqn, value in state_dict.items():
        kind = type(value)
        if kind in _PLAIN:
            if value.layout != torch.strided:
                return None
            parts.append((fqn, mappings.get(fqn), kind, *_tensor_part(value)))
        elif DTensor is not None and kind is DTensor:
            local = value._local_tensor
            if local.layout != torch.strided or type(local) not in _PLAIN:
                return None
            parts.append((fqn, mappings.get(fqn), kind, value.shape, value.device_mesh,
                          tuple(value.placements), *_tensor_part(local)))
        elif isinstance(value, torch.Tensor) or hasattr(value, "__create_write_items__"):
            return None
        else:
            parts.append((fqn, mappings.get(fqn)))
    return tuple(parts)


def _out_of_step(what: str) -> RuntimeError:
    return RuntimeError(
        f"dcp_native caching planner: {what}; the ranks' planners are out of step (one rank made a "
        "new planner, or used it for another state dict). This save fails; the next one plans in full"
    )


@dataclasses.dataclass
class _LocalSave:
    structure: tuple
    token: str
    plan: SavePlan
    #: The save this plan was made for reached finish_plan (so the coordinator holds it).
    confirmed: bool = False


@dataclasses.dataclass
class _GlobalSave:
    tokens: tuple
    token: str
    plans: list[SavePlan]
    metadata: Any


class CachingSavePlanner(DefaultSavePlanner):
    """DCP's ``DefaultSavePlanner`` that plans once per state-dict structure (module docs).

    Takes ``DefaultSavePlanner``'s arguments except ``enable_plan_caching`` (this planner's caching
    replaces stock's). Reuse one object for every save of one state dict; its results and
    checkpoints are those of ``DefaultSavePlanner``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.pop("enable_plan_caching", False):
            raise ValueError("CachingSavePlanner caches its plans itself: leave enable_plan_caching off")
        super().__init__(*args, **kwargs)
        self._enable_plan_caching = False
        #: Whether the last save reused the cached plan on this rank.
        self.reused = False
        #: State a storage writer keeps with the cached plan (dcp_native's writer: its layout).
        self.storage_cache: dict[Any, Any] = {}
        self._local: _LocalSave | None = None
        self._final: tuple[str, SavePlan] | None = None
        self._in_flight = False
        # Coordinator: the plan each rank index sent last, with its token; the global plan.
        self._ranks: dict[int, tuple[str, SavePlan]] = {}
        self._global: _GlobalSave | None = None

    def _forget(self) -> None:
        self._local = self._final = self._global = None
        self._ranks = {}
        self.storage_cache.clear()

    def create_local_plan(self) -> SavePlan:
        if self._in_flight:
            self._forget()  # the last save failed somewhere: every rank plans in full
        self._in_flight = True
        self.reused = False
        sig = structure(self.state_dict, self.mappings if self.flatten_state_dict else None)
        sig = None if sig is None else (self.is_coordinator, sig)
        local = self._local
        if sig is not None and local is not None and local.confirmed and local.structure == sig:
            self.plan = local.plan
            return SavePlan([], planner_data=_Token(local.token), usable=False)
        plan = DefaultSavePlanner.create_local_plan(self)
        if sig is None:
            self._local = None
            return plan
        self._local = _LocalSave(sig, _new_token(), plan)
        return dataclasses.replace(plan, planner_data=_Tagged(self._local.token, plan.planner_data))

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Any]:
        tokens: list[str | None] = []
        full: list[SavePlan] = []
        for i, plan in enumerate(all_plans):
            data = plan.planner_data
            if isinstance(data, _Token):
                held = self._ranks.get(i)
                if held is None or held[0] != data.value:
                    raise _out_of_step(f"rank index {i} sent the token of a plan the coordinator does not hold")
                tokens.append(data.value)
                full.append(dataclasses.replace(held[1], storage_data=plan.storage_data))
            elif isinstance(data, _Tagged):
                tokens.append(data.token)
                full.append(dataclasses.replace(plan, planner_data=data.data))
            else:
                tokens.append(None)
                full.append(plan)
        key = tuple(tokens)
        cached = self._global
        if cached is not None and cached.tokens == key:
            # Every rank sent the token of the plan this global plan was made from.
            self.global_plan, self.metadata = cached.plans, copy.copy(cached.metadata)
            return ([SavePlan([], storage_data=p.storage_data, planner_data=_Token(cached.token), usable=False)
                     for p in all_plans], self.metadata)
        self._global = None
        global_plan, metadata = DefaultSavePlanner.create_global_plan(self, full)
        self._ranks = {i: (t, p) for i, (t, p) in enumerate(zip(tokens, full)) if t is not None}
        if None in tokens:
            return global_plan, copy.copy(metadata)
        self._global = _GlobalSave(key, _new_token(), global_plan, metadata)
        self.metadata = copy.copy(metadata)
        return ([dataclasses.replace(p, planner_data=_Tagged(self._global.token, p.planner_data))
                 for p in global_plan], self.metadata)

    def _create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        """Stock's global plan and metadata (dedup, global plan, validation), in O(n log n) with the
        cyclic collector paused (:mod:`dcp_native._scale`); stock's own code where a subclass
        changes the dedup or the plans are in a form the fast path does not handle."""
        if type(self)._dedup_save_plans is DefaultSavePlanner._dedup_save_plans and _scale.available():
            with gc_paused():
                done = _scale.global_save_plan(all_plans, getattr(self, "dedup_save_to_lowest_rank", False),
                                               self.flatten_state_dict)
            if done is not None:
                return done
        return super()._create_global_plan(all_plans)

    def resolve_data(self, write_item: Any) -> Any:
        """DefaultSavePlanner's, with a shortcut for a plain tensor saved whole (its own lookup
        makes a zero offset to compare per item); any planner that overrides the lookup, another
        value or offset takes the stock path."""
        obj = self.state_dict.get(write_item.index.fqn)
        offset = write_item.index.offset
        if (type(obj) in _PLAIN and write_item.type == WriteItemType.TENSOR and self._plain_lookup
                and offset is not None and len(offset) == obj.dim() and not any(offset)):
            return obj
        return super().resolve_data(write_item)

    @property
    def _plain_lookup(self) -> bool:
        kind = type(self)
        return (kind.lookup_object is DefaultSavePlanner.lookup_object
                and kind.transform_object is DefaultSavePlanner.transform_object)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        data = new_plan.planner_data
        if isinstance(data, _Token):
            final = self._final
            if final is None or final[0] != data.value:
                raise _out_of_step("the coordinator sent the token of a final plan this rank does not hold")
            # The same items (one list across saves); this save's storage data.
            plan = dataclasses.replace(final[1], storage_data=new_plan.storage_data)
            self.reused = True
        elif isinstance(data, _Tagged):
            plan = dataclasses.replace(new_plan, planner_data=data.data)
            self._final = (data.token, plan)
        else:
            plan, self._final = new_plan, None
        if self._local is not None:
            self._local.confirmed = True
        self._in_flight = False
        self.plan = plan
        return plan


@dataclasses.dataclass
class _LocalLoad:
    structure: tuple
    state_dict_metadata: Any
    storage_data: Any
    token: str
    plan: LoadPlan | None = None


class CachingLoadPlanner(DefaultLoadPlanner):
    """DCP's ``DefaultLoadPlanner`` that plans once per state-dict structure and checkpoint
    metadata (module docs). Takes ``DefaultLoadPlanner``'s arguments; reuse one object for every
    load of one state dict."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Whether the last load reused the cached plan on this rank.
        self.reused = False
        self._local: _LocalLoad | None = None
        self._pending: _LocalLoad | None = None
        #: (the state_dict_metadata they index, {fqn: ChunkIndex}).
        self._indexes: tuple[Any, dict[str, Any]] | None = None

    def create_local_plan(self) -> LoadPlan:
        self.reused = False
        metadata = self.metadata
        sig = structure(self.state_dict, self.mappings if self.flatten_state_dict else None)
        local = self._local
        if (sig is not None and local is not None and local.structure == sig
                and metadata is not None
                and local.state_dict_metadata is metadata.state_dict_metadata
                and local.storage_data is metadata.storage_data):
            self._pending = None
            return LoadPlan([], planner_data=_Token(local.token))
        flat = self.state_dict
        with gc_paused():
            plan = self._plan_reads()
        # DefaultLoadPlanner re-flattens the state dict for checkpoints of torch <= 2.3: not cached.
        self._pending = None if sig is None or self.state_dict is not flat or metadata is None else _LocalLoad(
            sig, metadata.state_dict_metadata, metadata.storage_data, _new_token())
        self._local = None
        return plan

    def _plan_reads(self) -> LoadPlan:
        """``DefaultLoadPlanner.create_local_plan``: the same plan, each saved chunk list searched
        through a :class:`~dcp_native._scale.ChunkIndex` (kept while the metadata is the same)."""
        metadata = self.metadata
        if metadata is None:
            raise AssertionError("self.metadata is not None")
        saved = metadata.state_dict_metadata
        if self.flatten_state_dict:
            missing = set(saved) - set(self.state_dict)
            if missing:
                # A checkpoint of torch <= 2.3 flattened keys another way: where the missing keys are
                # that way's keys of this state dict, plan with those (as stock does).
                _version._derived_version = "2_3"
                try:
                    old, old_mappings = flatten_state_dict(self.original_state_dict)
                finally:
                    _version._derived_version = None
                if set(old) & missing:
                    self.state_dict, self.mappings = old, old_mappings
        if self._indexes is None or self._indexes[0] is not saved:
            self._indexes = (saved, {})
        indexes = self._indexes[1]
        strict = not self.allow_partial_load
        requests: list[Any] = []
        for fqn, obj in self.state_dict.items():
            md = saved.get(fqn)
            if md is None and fqn not in saved:
                if strict:
                    raise RuntimeError(f"Missing key in checkpoint state_dict: {fqn}.")
                continue
            if (isinstance(md, TensorStorageMetadata) and getattr(obj, "size", None) is not None
                    and md.size != obj.size()):
                raise ValueError(f"Size mismatch between saved {md.size} and current: {obj.size()} for {fqn}")
            if DTensor is not None and isinstance(obj, DTensor) and obj.device_mesh.get_coordinate() is None:
                continue  # this rank is not in the DTensor's mesh
            if type(md) is not TensorStorageMetadata:
                requests += _create_read_items(fqn, md, obj)
                continue
            try:
                local_chunks = _create_chunk_list(obj)
            except ValueError as exc:
                raise ValueError(f"Invalid checkpoint metadata for {fqn}, expected BytesStorageMetadata "
                                 f"but found {type(md)}") from exc
            requests += _scale.read_items_for_chunks(fqn, md, local_chunks, self._index_of(indexes, fqn, md))
        return LoadPlan(requests)

    @staticmethod
    def _index_of(indexes: dict[str, Any], fqn: str, md: TensorStorageMetadata) -> Any:
        index = indexes.get(fqn)
        if index is None or not index.current(md.chunks):
            try:
                index = indexes[fqn] = _scale.ChunkIndex(md.chunks)
            except (AttributeError, TypeError):
                return None  # not chunk metadata: stock's scan reports it
        return index

    def finish_plan(self, new_plan: LoadPlan) -> LoadPlan:
        data = new_plan.planner_data
        if isinstance(data, _Token):
            local = self._local
            if local is None or local.token != data.value or local.plan is None:
                raise _out_of_step("a load plan came back as the token of a plan this rank does not hold")
            self.reused = True
            return local.plan
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.plan = new_plan
            self._local = pending
        return new_plan
