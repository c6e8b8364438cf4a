"""Read planning math: the strided copy of a box equals stock's narrow + copy_ (property tests)."""

from __future__ import annotations

import itertools
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed._shard._utils import narrow_tensor_by_index

from dcp_native.plan import Box, collapse, read_box
from helpers import make_tensor, tensor_bytes

DTYPES = [torch.uint8, torch.int16, torch.float32, torch.float64]


def execute(box: Box, file: bytes, dest: bytearray, dest_base: int) -> None:
    """Reference executor of one box: addresses relative to ``dest_base``."""
    for idx in itertools.product(*[range(c) for c in box.counts]):
        f = box.file_offset + sum(i * s for i, s in zip(idx, box.file_strides))
        d = box.dest_addr - dest_base + sum(i * s for i, s in zip(idx, box.dest_strides))
        dest[d : d + box.inner_bytes] = file[f : f + box.inner_bytes]


@st.composite
def scenarios(draw):
    dtype = draw(st.sampled_from(DTYPES))
    ndim = draw(st.integers(0, 4))
    size = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    # The saved chunk: contiguous, or a permutation of a contiguous buffer (what
    # torch.save keeps for e.g. a transposed tensor), with a storage offset.
    perm = draw(st.permutations(range(ndim)))
    storage_offset = draw(st.integers(0, 3))
    offsets = tuple(draw(st.integers(0, s - 1)) for s in size)
    lengths = tuple(draw(st.integers(0, s - o)) for s, o in zip(size, offsets))
    # The destination: a view of a larger tensor, possibly permuted.
    pad = tuple(draw(st.integers(0, 2)) for _ in range(ndim))
    dperm = draw(st.permutations(range(ndim)))
    payload_offset = draw(st.integers(0, 100))
    return dtype, size, perm, storage_offset, offsets, lengths, pad, dperm, payload_offset


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_read_box_matches_stock_narrowing(case):
    dtype, size, perm, storage_offset, offsets, lengths, pad, dperm, payload_offset = case
    itemsize = dtype.itemsize
    numel = 1
    for s in size:
        numel *= s
    base = make_tensor(dtype, (numel + storage_offset,), seed=len(size))
    permuted_size = tuple(size[p] for p in perm)
    contiguous = base[storage_offset:].reshape(permuted_size) if size else base[storage_offset:].reshape(())
    inverse = [perm.index(d) for d in range(len(size))]
    saved = contiguous.permute(*inverse) if size else contiguous
    assert tuple(saved.shape) == size

    # Bytes of the "file": the saved storage at payload_offset.
    storage = tensor_bytes(base)
    file = b"\xee" * payload_offset + storage

    # Destination view inside a bigger, permuted buffer.
    outer = tuple(n + p for n, p in zip(lengths, pad))
    holder_shape = tuple(outer[d] for d in dperm)
    holder = torch.zeros(holder_shape, dtype=dtype)
    dinv = [dperm.index(d) for d in range(len(size))]
    dest = holder.permute(*dinv) if size else holder
    for d, n in enumerate(lengths):
        dest = dest.narrow(d, 0, n)

    expected = holder.clone()
    expected_dest = expected.permute(*dinv) if size else expected
    for d, n in enumerate(lengths):
        expected_dest = expected_dest.narrow(d, 0, n)
    expected_dest.copy_(narrow_tensor_by_index(saved, offsets, lengths))

    box = read_box(
        payload_offset,
        itemsize,
        saved.stride(),
        saved.storage_offset(),
        offsets,
        lengths,
        dest.data_ptr(),
        dest.stride(),
    )
    raw = bytearray(tensor_bytes(holder))
    if box is None:
        assert 0 in lengths
    else:
        # No box reads outside the saved storage.
        lo, hi = box.file_span
        assert payload_offset <= lo and hi <= len(file)
        execute(box, file, raw, holder.data_ptr())
        # Collapsing never leaves a dimension of extent 1.
        assert all(c > 1 for c in box.counts)
    assert bytes(raw) == tensor_bytes(expected)


def test_collapse_examples():
    # Contiguous item: one run.
    assert collapse(4, (8, 16), (16, 1), (16, 1)) == (512, (), (), ())
    # Column slice of a row-major chunk into a contiguous destination: one run per row.
    assert collapse(4, (8, 5), (16, 1), (5, 1)) == (20, (8,), (64,), (20,))
    # Rows of a chunk into a column slice of a wider destination.
    assert collapse(2, (3, 4), (4, 1), (10, 1)) == (8, (3,), (8,), (20,))
    # Element-wise: transposed destination.
    assert collapse(4, (2, 3), (3, 1), (1, 2)) == (4, (2, 3), (12, 4), (4, 8))
    # Mergeable outer dims.
    assert collapse(1, (2, 3, 4), (24, 8, 1), (12, 4, 1)) == (4, (6,), (8,), (4,))
    # Empty box.
    assert collapse(4, (3, 0), (1, 1), (1, 1)) is None
    # 0-d.
    assert collapse(8, (), (), ()) == (8, (), (), ())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 7), max_size=5), st.sampled_from([1, 2, 4, 8]), st.integers(0, 1 << 40))
def test_a_whole_contiguous_chunk_into_a_dense_tensor_is_one_run(size, itemsize, payload):
    """What the load's shortcut for whole chunks (load_plan.LoadRun._plan_tensor) assumes."""
    from dcp_native.layout import contiguous_stride

    stride = contiguous_stride(tuple(size))
    box = read_box(payload, itemsize, stride, 0, [0] * len(size), size, 4096, stride)
    assert box == Box(payload, 4096, itemsize * math.prod(size))
