"""Cooperative loads: bytes several ranks need are read once, by one of them, and shared.

With DDP or HSDP every replica reads the whole checkpoint: R replicas read R times its bytes from
shared storage. ``FileSystemReader(path, cooperative=True)`` has the ranks of its process group
split those reads between them and pass the bytes on over the process group (gloo on the CPU,
NCCL on the GPU). One ``read_data`` call, on every rank of the group:

1. **Spans.** Each rank locates its reads (:meth:`dcp_native.load_plan.LoadRun.locate`) and names
   the file span ``[lo, hi)`` covering each tensor read it can share: every located tensor read
   whose needed bytes are at least a quarter of its span (a narrow column of wide rows is read by
   its own rank, as objects and transformed items are).
2. **Schedule** (:func:`schedule`, on the group's first rank, which gathers the spans and scatters
   every rank's part). Each file is cut at every span's ends into pieces needed by one set of
   ranks; neighbouring pieces needed by the same set make a segment, split at ``SEGMENT_BYTES``.
   Every segment goes to the rank of its set that holds the fewest bytes so far, largest first
   (pieces only one rank needs go to it). Segments are grouped in file order into rounds in which
   no rank reads and receives more than ``exchange_bytes`` (ranks that share nothing fill their
   rounds side by side); within a round, what one rank sends another is one message per large
   segment and one per few MiB of small ones, packed. The schedule costs time in proportion to
   the segments times the ranks that need each (DDP: every segment to every rank; 64 replicas of
   1,000 tensors of 4 MB: 0.4 s on the first rank here, 256 replicas: 3.4 s).
3. **Rounds.** A rank reads the segments it was given straight into the destinations (a tensor
   whose saved bytes are its own bytes: same dtype, contiguous, on the group's device) or into
   scratch covering its span, then every rank says whether it failed (one ``all_reduce`` per
   round), then the round's messages go out and in while the next round is read. Messages land
   straight in a destination or scratch when they fit one, else in a buffer that is unpacked.
   A read whose segments have all arrived is copied from its scratch into its destination (and
   cast, as DCP would) and the scratch freed; destinations are committed to the planner at the
   end.
4. **Everything else** (objects, stream transforms, narrow spans, reads needing no peer) goes
   through the usual path after the rounds, on each rank alone.

Errors reach every rank, so nobody waits forever for a peer that stopped: a rank that fails before
the schedule says so in the gather, one that fails reading or unpacking says so in the next
round's ``all_reduce``; then every rank raises (the failed rank its own error, the others
:class:`~dcp_native.CooperativeLoadError` naming the rank and its error). Every rank must load the
same checkpoint through the same group at the same time, as DCP's collectives already require;
ranks that name different checkpoints are told so. Failures of the process group itself (a peer
that dies mid-message) surface as the group's own errors after its timeout, as in any collective.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ._errors import CooperativeLoadError
from .load_plan import LoadRun, Located, _saved_view
from .plan import Box, read_box

#: Largest segment one rank reads for the others (larger shared ranges are split, so that the
#: reads of one large tensor spread over the ranks that need it).
SEGMENT_BYTES = 16 << 20
#: ... and shared ranges are cut into pieces of about a quarter of each rank's share of all the
#: shared bytes, but not below this (neighbouring small tensors are one range in the file).
MIN_SEGMENT_BYTES = 256 << 10
#: Segments at least this large travel in a message of their own (straight into place where it
#: fits); smaller ones are packed into messages of about PACK_BYTES.
ALONE_BYTES = 1 << 20
PACK_BYTES = 4 << 20
#: A tensor read is shared only if the bytes it needs are at least 1/MAX_SPREAD of its span.
MAX_SPREAD = 4


# ------------------------------------------------------------------ the schedule (pure)


@dataclasses.dataclass(frozen=True)
class Message:
    """Segments ``segments`` (ids, in order, their bytes back to back) between this rank and
    ``peer`` (a rank of the group), matched by ``tag``."""

    peer: int
    tag: int
    segments: tuple[int, ...]


@dataclasses.dataclass
class Round:
    reads: list[int] = dataclasses.field(default_factory=list)
    sends: list[Message] = dataclasses.field(default_factory=list)
    recvs: list[Message] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Schedule:
    """One rank's part: ``segments[id] = (file, lo, hi, spans)`` for every segment it reads, sends
    or receives (``spans``: indices of its own spans that overlap it), and the rounds, the same
    number on every rank."""

    segments: dict[int, tuple[str, int, int, tuple[int, ...]]]
    rounds: list[Round]


def schedule(spans: Sequence[Sequence[tuple[str, int, int]]], exchange_bytes: int,
             segment_bytes: int | None = None) -> list[Schedule]:
    """Every rank's :class:`Schedule` for the spans ``spans[rank] = [(file, lo, hi), ...]``.

    Every byte a rank's spans cover is in exactly one segment it either reads or receives from
    the segment's reader; every byte any span covers is read once. Segments are at most
    ``segment_bytes`` (default :data:`SEGMENT_BYTES`; see :data:`MIN_SEGMENT_BYTES`).
    """
    segment_bytes = segment_bytes or SEGMENT_BYTES
    n = len(spans)
    by_file: dict[str, list[tuple[int, int, int]]] = {}
    for rank, mine in enumerate(spans):
        for rel, lo, hi in mine:
            if hi > lo:
                by_file.setdefault(rel, []).append((lo, hi, rank))
    # Ranges of the files needed by one set of ranks: (file, lo, hi, ranks).
    ranges: list[tuple[str, int, int, frozenset[int]]] = []
    for rel in sorted(by_file):
        for lo, hi, ranks in _pieces(by_file[rel]):
            if ranges and ranges[-1][0] == rel and ranges[-1][2] == lo and ranges[-1][3] == ranks:
                ranges[-1] = (rel, ranges[-1][1], hi, ranks)
            else:
                ranges.append((rel, lo, hi, ranks))
    shared_bytes = sum(hi - lo for _, lo, hi, ranks in ranges if len(ranks) > 1)
    cut = min(segment_bytes, max(MIN_SEGMENT_BYTES, shared_bytes // (4 * n)))
    find = _SpanIndex(spans)
    # Segments: (file, lo, hi, {rank: its span indices that overlap the segment}).
    segments: list[tuple[str, int, int, dict[int, list[int]]]] = []
    for rel, lo, hi, ranks in ranges:
        for start in range(lo, hi, cut):
            end = min(hi, start + cut)
            segments.append((rel, start, end, {r: find(r, rel, start, end) for r in sorted(ranks)}))
    # Readers: a segment only one rank needs is its own; the others largest first, each to the
    # rank of its set holding the fewest bytes so far.
    load = [0] * n
    reader = [0] * len(segments)
    shared: list[int] = []
    for sid, (_, lo, hi, owners) in enumerate(segments):
        if len(owners) == 1:
            reader[sid] = next(iter(owners))
            load[reader[sid]] += hi - lo
        else:
            shared.append(sid)
    shared.sort(key=lambda sid: (segments[sid][1] - segments[sid][2], sid))
    for sid in shared:
        _, lo, hi, owners = segments[sid]
        reader[sid] = min(owners, key=lambda r: (load[r], r))
        load[reader[sid]] += hi - lo
    # Rounds, in file order per rank: no rank reads and receives more than exchange_bytes in
    # one; ranks that share nothing fill their rounds side by side.
    round_of = [0] * len(segments)
    current = [0] * n
    used = [0] * n
    for sid, (_, lo, hi, owners) in enumerate(segments):
        k = max(current[r] for r in owners)
        if any(current[r] == k and used[r] and used[r] + hi - lo > exchange_bytes for r in owners):
            k += 1
        for r in owners:
            if current[r] != k:
                current[r], used[r] = k, 0
            used[r] += hi - lo
        round_of[sid] = k
    count = max(round_of) + 1 if segments else 0
    out = [Schedule({}, [Round() for _ in range(count)]) for _ in range(n)]
    for sid, (rel, lo, hi, owners) in enumerate(segments):
        for r, js in owners.items():
            out[r].segments[sid] = (rel, lo, hi, tuple(js))
        out[reader[sid]].rounds[round_of[sid]].reads.append(sid)
    # Messages: per round and (sender, receiver), in file order.
    tag = 0
    pairs: dict[tuple[int, int, int], list[int]] = {}
    for sid, (_, lo, hi, owners) in enumerate(segments):
        for r in owners:
            if r != reader[sid]:
                pairs.setdefault((round_of[sid], reader[sid], r), []).append(sid)
    for (k, src, dst), sids in sorted(pairs.items()):
        for group in _pack(sids, segments):
            out[src].rounds[k].sends.append(Message(dst, tag, group))
            out[dst].rounds[k].recvs.append(Message(src, tag, group))
            tag += 1
    return out


def _pieces(spans: list[tuple[int, int, int]]) -> list[tuple[int, int, frozenset[int]]]:
    """One file cut at every span's ends: ``(lo, hi, ranks)`` of every piece some span of
    ``spans`` (``(lo, hi, rank)``) covers, in order. Linear in the spans after sorting their ends,
    plus the size of the rank set each time it changes (ends at one offset are taken together:
    the tensors of replicas, which start and end together, never change it)."""
    events: list[tuple[int, int, int]] = []  # (offset, -1 end / +1 start, rank)
    for lo, hi, rank in spans:
        events.append((lo, 1, rank))
        events.append((hi, -1, rank))
    events.sort()
    count: dict[int, int] = {}
    ranks: frozenset[int] = frozenset()
    out: list[tuple[int, int, frozenset[int]]] = []
    i, at = 0, None
    while i < len(events):
        offset = events[i][0]
        if at is not None and ranks and offset > at:
            out.append((at, offset, ranks))
        changed = False
        while i < len(events) and events[i][0] == offset:
            _, kind, rank = events[i]
            before = count.get(rank, 0)
            count[rank] = before + kind
            changed |= (before == 0) != (count[rank] == 0)
            i += 1
        if changed:
            ranks = frozenset(r for r, c in count.items() if c)
        at = offset
    return out


class _SpanIndex:
    """``find(rank, file, lo, hi)``: indices of the rank's spans in ``file`` overlapping
    ``[lo, hi)``, by bisection (spans sorted by start, with the running maximum of their ends)."""

    def __init__(self, spans: Sequence[Sequence[tuple[str, int, int]]]) -> None:
        self._by: dict[tuple[int, str], tuple[list[int], list[int], list[tuple[int, int, int]]]] = {}
        for rank, mine in enumerate(spans):
            per: dict[str, list[tuple[int, int, int]]] = {}
            for j, (rel, lo, hi) in enumerate(mine):
                if hi > lo:
                    per.setdefault(rel, []).append((lo, hi, j))
            for rel, items in per.items():
                items.sort()
                reach, top = [], -1
                for _, hi, _ in items:
                    top = max(top, hi)
                    reach.append(top)
                self._by[(rank, rel)] = ([lo for lo, _, _ in items], reach, items)

    def __call__(self, rank: int, rel: str, lo: int, hi: int) -> list[int]:
        starts, reach, items = self._by[(rank, rel)]
        first = bisect.bisect_right(reach, lo)  # spans before it end at or before lo
        last = bisect.bisect_left(starts, hi)   # spans from it start at or after hi
        return sorted(j for s, e, j in items[first:last] if e > lo and s < hi)


def _pack(sids: list[int], segments: list) -> list[tuple[int, ...]]:
    """Messages for segments going one way: a large one alone, small ones packed."""
    out: list[tuple[int, ...]] = []
    packed: list[int] = []
    size = 0
    for sid in sids:
        n = segments[sid][2] - segments[sid][1]
        if n >= ALONE_BYTES:
            out.append((sid,))
            continue
        packed.append(sid)
        size += n
        if size >= PACK_BYTES:
            out.append(tuple(packed))
            packed, size = [], 0
    if packed:
        out.append(tuple(packed))
    return out


# ------------------------------------------------------------------ one rank's part of a load


@dataclasses.dataclass
class _Image:
    """The bytes of file span ``[lo, hi)`` of one read: its destination itself (``direct``) or
    scratch on the exchange device, filled by reads and messages, then copied into ``target``;
    or, for an item decoded whole (``located`` None: objects, transformed items), the item's
    bytes, decoded as the usual path does."""

    rel: str
    lo: int
    hi: int
    index: int
    target: torch.Tensor | None
    located: Located | None
    key: str
    direct: bool
    remaining: int = 0
    data: torch.Tensor | None = None
    #: The host bytes of a whole item's scratch (on the CPU, ``data`` is a view of them).
    host: bytearray | None = None


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view of the bytes of contiguous ``t``."""
    n = t.numel() * t.element_size()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(
        t.untyped_storage(), t.storage_offset() * t.element_size(), (n,), (1,))


def exchange_device(group: Any) -> torch.device:
    """The device the group moves tensors from: CUDA for NCCL, the CPU otherwise (gloo)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Cooperation:
    """One rank's cooperative ``read_data``: ``run`` (a LoadRun) for ``items`` over ``group``."""

    def __init__(self, run: LoadRun, items: Sequence[Any], group: Any, exchange_bytes: int) -> None:
        self.run = run
        self.items = items
        self.group = group
        self.exchange_bytes = exchange_bytes
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.device = exchange_device(group)
        self.error: BaseException | None = None
        self.images: list[_Image] = []
        self.sched: Schedule | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    # -------------------------------------------------------------- the steps

    def execute(self) -> None:
        located: Sequence[Located | None] = []
        try:
            located = self.run.locate(self.items)
            spans = self._spans(located)
        except Exception as exc:  # noqa: BLE001 - every rank hears of it in the schedule step
            self.error, spans = exc, []
        self._negotiate(spans)
        self._rounds()
        shared = {image.index for image in self.images}
        rest = [i for i in range(len(self.items)) if i not in shared]
        self.run.run_located([self.items[i] for i in rest], [located[i] for i in rest])
        for image in self.images:
            if image.target is not None:
                self.run.planner.commit_tensor(self.items[image.index], image.target)

    def _spans(self, located: Sequence[Located | None]) -> list[tuple[str, int, int]]:
        """The file span of every read this rank may share (sets up its image)."""
        out: list[tuple[str, int, int]] = []
        for i, loc in enumerate(located):
            req = self.items[i]
            if loc is None:  # decoded whole: share the item's bytes
                info = self.run._info(req)
                if info.length > 0:
                    self.images.append(_Image(info.relative_path, info.offset, info.offset + info.length, i,
                                              None, None, req.storage_index.fqn, False))
                    out.append((info.relative_path, info.offset, info.offset + info.length))
                continue
            saved = loc.saved
            box = read_box(loc.payload, saved.dtype.itemsize, saved.stride, saved.storage_offset,
                           req.storage_offsets, req.lengths, 0, [0] * len(req.lengths))
            if box is None:
                continue
            lo, hi = box.file_span
            if (hi - lo) > MAX_SPREAD * box.inner_bytes * box.runs:
                continue
            target = self.run._target(req)
            rel = self.run._info(req).relative_path
            self.images.append(_Image(rel, lo, hi, i, target, loc, req.storage_index.fqn,
                                      self._direct(target, loc, req, lo, hi)))
            out.append((rel, lo, hi))
        return out

    def _direct(self, target: torch.Tensor, loc: Located, req: Any, lo: int, hi: int) -> bool:
        """Whether ``target``'s own bytes are the file's bytes ``[lo, hi)``."""
        if (target.dtype != loc.saved.dtype or target.layout != torch.strided or target.is_quantized
                or type(target) is not torch.Tensor or target.device != self.device
                or not target.is_contiguous()):
            return False
        saved = loc.saved
        box = read_box(loc.payload, saved.dtype.itemsize, saved.stride, saved.storage_offset,
                       req.storage_offsets, req.lengths, target.data_ptr(), target.stride())
        return box is not None and not box.counts and box.inner_bytes == hi - lo

    def _negotiate(self, spans: list[tuple[str, int, int]]) -> None:
        """Gather every rank's spans on the group's first rank, scatter the schedules back."""
        identity = self.run.ck.digest if self.run.ck is not None else None
        mine = (_describe(self.error) if self.error is not None else None, identity, spans)
        first = self._global(0)
        gathered: list[Any] | None = [None] * self.size if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=first, group=self.group)
        answers: list[Any] | None = None
        if self.rank == 0:
            assert gathered is not None
            failed = [(r, g[0]) for r, g in enumerate(gathered) if g[0] is not None]
            ids = {g[1] for g in gathered}
            if not failed and len(ids) > 1:
                failed = [(r, f"loads the checkpoint whose metadata has SHA-256 {g[1]}, rank 0 the one with "
                              f"{gathered[0][1]}: every rank must load the same checkpoint")
                          for r, g in enumerate(gathered) if g[1] != gathered[0][1]]
            if failed:
                answers = [("failed", failed)] * self.size
            else:
                try:
                    answers = [("ok", s) for s in schedule([g[2] for g in gathered], self.exchange_bytes)]
                except Exception as exc:  # noqa: BLE001 - told to every rank
                    self.error = exc
                    answers = [("failed", [(0, _describe(exc))])] * self.size
        out: list[Any] = [None]
        dist.scatter_object_list(out, answers, src=first, group=self.group)
        status, value = out[0]
        if status == "failed":
            self._raise(value)
        self.sched = value

    def _rounds(self) -> None:
        """Each round: read this rank's segments; finish the previous round's messages; agree
        that nobody failed; start this round's messages (they travel while the next is read)."""
        assert self.sched is not None
        for _, _, _, js in self.sched.segments.values():
            for j in js:  # the images are in the order of this rank's spans
                self.images[j].remaining += 1
        pending = None
        for rnd in self.sched.rounds:
            if self.error is None:
                try:
                    self._read(rnd)
                except Exception as exc:  # noqa: BLE001 - every rank hears of it below
                    self.error = exc
            if pending is not None:
                self._complete(pending)
            self._agree()
            pending = self._post(rnd)
        if pending is not None:
            self._complete(pending)
            self._agree()

    def _parts(self, sid: int) -> list[tuple[_Image, int, int]]:
        """``(image, offset in the segment, bytes)`` of every image a segment fills, allocating
        scratch on first use."""
        assert self.sched is not None
        rel, lo, hi, js = self.sched.segments[sid]
        out = []
        for j in js:
            image = self.images[j]
            if image.data is None:
                if image.direct:
                    assert image.target is not None
                    image.data = _bytes_of(image.target)
                elif image.located is None and self.device.type == "cpu":
                    image.host = bytearray(image.hi - image.lo)
                    image.data = torch.frombuffer(image.host, dtype=torch.uint8)
                else:
                    image.data = torch.empty(image.hi - image.lo, dtype=torch.uint8, device=self.device)
            a, b = max(lo, image.lo), min(hi, image.hi)
            out.append((image, a - lo, b - a))
        return out

    def _slice(self, image: _Image, sid: int, at: int, n: int) -> torch.Tensor:
        assert self.sched is not None and image.data is not None
        start = self.sched.segments[sid][1] + at - image.lo
        return image.data[start:start + n]

    def _read(self, rnd: Round) -> None:
        """This round's segments, read into their images (in one engine call)."""
        assert self.sched is not None
        host: dict[str, list[Box]] = {}
        device: dict[tuple[str, int], list[Box]] = {}
        bounce: list[tuple[torch.Tensor, torch.Tensor]] = []
        for sid in rnd.reads:
            rel, lo, _, _ = self.sched.segments[sid]
            for image, at, n in self._parts(sid):
                dest = self._slice(image, sid, at, n)
                if dest.device.type == "cuda" and not self.run._device_fast:
                    host_buf = torch.empty(n, dtype=torch.uint8)
                    bounce.append((host_buf, dest))
                    dest = host_buf
                box = Box(lo + at, dest.data_ptr(), n, key=image.key)
                if dest.device.type == "cuda":
                    device.setdefault((rel, dest.device.index), []).append(box)
                else:
                    host.setdefault(rel, []).append(box)
        if host or device:
            self.run._run_engine(host, device)
        for src, dest in bounce:
            dest.copy_(src)

    def _post(self, rnd: Round) -> tuple[Round, list[Any], list[tuple[Message, torch.Tensor]], list[torch.Tensor]]:
        """Start the round's messages; returns what :meth:`_complete` needs. After a failure here
        the messages still go (with whatever bytes): the peers learn of it at the next agreement."""
        ops: list[tuple[bool, torch.Tensor, Message]] = []
        unpack: list[tuple[Message, torch.Tensor]] = []
        for send, msg in [*((True, m) for m in rnd.sends), *((False, m) for m in rnd.recvs)]:
            tensor = None
            if self.error is None:
                try:
                    tensor = self._message(msg, pack=send)
                except Exception as exc:  # noqa: BLE001 - the peers still get their messages
                    self.error = exc
            if tensor is None:
                tensor = torch.empty(self._message_bytes(msg), dtype=torch.uint8, device=self.device)
                if not send:
                    unpack.append((msg, tensor))
            ops.append((send, tensor, msg))
            if send:
                self.bytes_sent += tensor.numel()
            else:
                self.bytes_received += tensor.numel()
        works: list[Any] = []
        if ops:  # one batch: NCCL groups it (its ops must be issued together), gloo runs each
            works = dist.batch_isend_irecv([
                dist.P2POp(dist.isend if send else dist.irecv, t, self._global(m.peer), self.group, m.tag)
                for send, t, m in ops])
        return rnd, works, unpack, [t for _, t, _ in ops]

    def _message_bytes(self, msg: Message) -> int:
        assert self.sched is not None
        return sum(self.sched.segments[sid][2] - self.sched.segments[sid][1] for sid in msg.segments)

    def _message(self, msg: Message, pack: bool) -> torch.Tensor | None:
        """The message's bytes in place (one segment filling one image), else for a send a
        packed copy, for a receive None."""
        if len(msg.segments) == 1:
            sid = msg.segments[0]
            parts = self._parts(sid)
            whole = [p for p in parts if p[1] == 0 and p[2] == self._message_bytes(msg)]
            if whole and (pack or len(parts) == 1):
                return self._slice(whole[0][0], sid, 0, whole[0][2])
        if not pack:
            for sid in msg.segments:
                self._parts(sid)  # scratch exists before the bytes come
            return None
        chunks = []
        assert self.sched is not None
        for sid in msg.segments:
            seg = torch.empty(self.sched.segments[sid][2] - self.sched.segments[sid][1], dtype=torch.uint8,
                              device=self.device)
            for image, at, n in self._parts(sid):
                seg[at:at + n].copy_(self._slice(image, sid, at, n))
            chunks.append(seg)
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]

    def _complete(self, pending: tuple) -> None:
        """Wait for a round's messages, unpack them, and finish the reads all of whose segments
        are in."""
        rnd, works, unpack, _ = pending
        for work in works:
            work.wait()
        if self.error is not None:
            return
        try:
            assert self.sched is not None
            for msg, buf in unpack:
                at = 0
                for sid in msg.segments:
                    for image, off, n in self._parts(sid):
                        self._slice(image, sid, off, n).copy_(buf[at + off:at + off + n])
                    at += self.sched.segments[sid][2] - self.sched.segments[sid][1]
            done = [sid for sid in rnd.reads] + [sid for m in rnd.recvs for sid in m.segments]
            for sid in done:
                for j in self.sched.segments[sid][3]:
                    image = self.images[j]
                    image.remaining -= 1
                    if image.remaining == 0:
                        self._finish(image)
        except Exception as exc:  # noqa: BLE001 - every rank hears of it in the next round
            self.error = exc

    def _finish(self, image: _Image) -> None:
        """Scratch complete: copy (and cast) the read's elements into its destination, or decode
        the whole item."""
        assert image.data is not None
        req = self.items[image.index]
        if image.located is None:
            if image.host is None:
                image.host = bytearray(image.hi - image.lo)
                torch.frombuffer(image.host, dtype=torch.uint8).copy_(image.data)
            self.run.finish_buffered(self.run._whole_item_op(req, self.run._info(req)), memoryview(image.host))
        elif not image.direct:  # the scratch starts at the read's first element (the span's start)
            assert image.target is not None
            image.target.copy_(_saved_view(image.data, image.located.saved, tuple(req.lengths)))
        image.data = image.host = None

    def _agree(self) -> None:
        """Every rank says whether it failed; if any did, every rank raises."""
        flag = torch.tensor([0 if self.error is None else 1], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if int(flag.item()):
            said: list[Any] = [None] * self.size
            dist.all_gather_object(said, _describe(self.error) if self.error is not None else None,
                                   group=self.group)
            self._raise([(r, text) for r, text in enumerate(said) if text is not None])

    def _raise(self, failed: list[tuple[int, str]]) -> None:
        if self.error is not None:
            raise self.error
        rank, text = failed[0]
        more = f" (and ranks {[r for r, _ in failed[1:]]})" if len(failed) > 1 else ""
        raise CooperativeLoadError(
            f"{self.run.reader.path}: cooperative load stopped: rank {rank}{more} failed: {text}",
            filename=str(self.run.reader.path), rank=rank)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def group_size(group: Any) -> int:
    """Ranks in ``group`` (1 without an initialised default group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)

