"""Engine plans (dcp_native.engine) on both engines: round trips, boxes, exact read stats,
errors and malformed plans, and random plans both engines must execute identically."""

from __future__ import annotations

import ctypes
import errno
import itertools
import math
import os
import random
from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcp_native._errors import TruncatedFileError
from dcp_native.engine import (
    MAX_IOVECS,
    SRC_BLOB,
    SRC_HOST,
    ReadFile,
    ReadStats,
    WriteFile,
    WriteStats,
    should_merge,
)
from helpers import (
    SIZES,
    THREADS,
    Mem,
    apply_box,
    blob_seg,
    both_engines,
    box,
    copies,
    host_seg,
    open_fds,
    pattern,
    segments,
    write_file,
)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("size", SIZES)
def test_round_trip_sizes(engine, tmp_path, size, threads):
    data = pattern(size, size)
    src = Mem(data=data)
    path = tmp_path / "f.distcp"
    header = b"HDR"
    written = engine.write(
        [WriteFile(str(path), header, segments(blob_seg(0, 0, 3), host_seg(3, src.addr, size)))],
        threads=threads,
        sync=True,
        chunk_bytes=4096,
    )
    assert written == WriteStats([size + 3], [None])
    assert path.read_bytes() == header + data

    dest = Mem(size + 3)
    stats = engine.read(
        [ReadFile(str(path), size + 3, copies(box(0, dest.addr, size + 3)))],
        threads=threads,
        chunk_bytes=4096,
    )
    assert dest.bytes() == header + data
    assert stats == ReadStats(bytes_read=size + 3, calls=math.ceil((size + 3) / 4096))


def test_many_small_segments(engine, tmp_path):
    """More segments than IOV_MAX, from both sources, listed out of order."""
    n, length = 3000, 7
    data = pattern(n * length, 1)
    host = Mem(data=data)
    blob = bytes(data)
    segs = [
        blob_seg(i * length, i * length, length)
        if i % 2
        else host_seg(i * length, host.addr + i * length, length)
        for i in range(n)
    ]
    path = tmp_path / "small.distcp"
    written = engine.write(
        [WriteFile(str(path), blob, segments(*reversed(segs)))], threads=3, sync=False
    )
    assert written.bytes_written == [n * length]
    assert path.read_bytes() == data

    # Each run to its own 8-byte slot: n runs, contiguous in the file, so
    # they merge and only IOV_MAX splits the calls.
    dest = Mem(n * 8, fill=0xEE)
    plan = copies(*(box(i * length, dest.addr + i * 8, length) for i in range(n)))
    stats = engine.read([ReadFile(str(path), 0, plan)], threads=3)
    assert stats == ReadStats(bytes_read=n * length, calls=math.ceil(n / MAX_IOVECS))
    expected = bytearray([0xEE]) * (n * 8)
    for i in range(n):
        expected[i * 8 : i * 8 + length] = data[i * length : (i + 1) * length]
    assert dest.bytes() == bytes(expected)


def test_write_holes_and_order(engine, tmp_path):
    blob = b"abcdefghij"
    host = Mem(data=b"0123456789")
    path = tmp_path / "holes.distcp"
    plan = segments(
        host_seg(50, host.addr, 10),
        blob_seg(5, 0, 4),  # hole [0, 5) before it
        blob_seg(9, 4, 6),  # contiguous with the previous one
        blob_seg(1000, 0, 0),  # empty: writes nothing, does not extend the file
        host_seg(30, 0, 0),  # empty host segment: the address is not used
    )
    written = engine.write([WriteFile(str(path), blob, plan)], threads=3, sync=True)
    assert written.bytes_written == [20]
    expected = bytearray(60)
    expected[5:15] = blob
    expected[50:60] = b"0123456789"
    assert path.read_bytes() == bytes(expected)


def test_write_replaces_existing_file(engine, tmp_path):
    path = tmp_path / "old.distcp"
    write_file(path, b"x" * 1000)
    written = engine.write(
        [WriteFile(str(path), b"new", segments(blob_seg(0, 0, 3)))], threads=1, sync=False
    )
    assert written.bytes_written == [3]
    assert path.read_bytes() == b"new"


@pytest.mark.parametrize("blob_type", ["bytes", "bytearray", "memoryview", "int64_array"])
def test_blob_buffer_types(engine, tmp_path, blob_type):
    raw = pattern(64, 3)
    blob = {
        "bytes": raw,
        "bytearray": bytearray(raw),
        "memoryview": memoryview(raw),
        "int64_array": memoryview(array("q", raw)),
    }[blob_type]
    path = tmp_path / "b.distcp"
    plan = memoryview(segments(blob_seg(0, 8, 56), blob_seg(56, 0, 8)))  # segments as a view
    written = engine.write([WriteFile(str(path), blob, plan)], threads=2, sync=False)
    assert written.bytes_written == [64]
    assert path.read_bytes() == raw[8:] + raw[:8]


@pytest.mark.parametrize("threads", THREADS)
def test_multiple_files(engine, tmp_path, threads):
    sizes = [0, 1, 999, 1000, 1001, 5000, 12345]
    datas = [pattern(s, i) for i, s in enumerate(sizes)]
    srcs = [Mem(data=d) for d in datas]
    paths = [str(tmp_path / f"__0_{i}.distcp") for i in range(len(sizes))]
    written = engine.write(
        [
            WriteFile(p, b"", segments(host_seg(0, m.addr, s)))
            for p, m, s in zip(paths, srcs, sizes)
        ],
        threads=threads,
        sync=True,
        chunk_bytes=1000,
    )
    assert written.bytes_written == sizes
    for p, d in zip(paths, datas):
        with open(p, "rb") as f:
            assert f.read() == d

    dests = [Mem(s) for s in sizes]
    stats = engine.read(
        [ReadFile(p, s, copies(box(0, m.addr, s))) for p, m, s in zip(paths, dests, sizes)],
        threads=threads,
        chunk_bytes=1000,
    )
    assert [m.bytes() for m in dests] == datas
    assert stats == ReadStats(sum(sizes), sum(math.ceil(s / 1000) for s in sizes))


def test_torch_destination(engine, tmp_path):
    """A column slice of a row-major matrix straight into a tensor."""
    torch = pytest.importorskip("torch")
    rows, cols = 37, 11
    matrix = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    path = tmp_path / "m.distcp"
    write_file(path, ctypes.string_at(matrix.data_ptr(), matrix.nbytes))
    out = torch.zeros(rows, 4, dtype=torch.float32)
    item = 4
    plan = copies(box(3 * item, out.data_ptr(), 4 * item, (rows,), (cols * item,), (4 * item,)))
    engine.read([ReadFile(str(path), rows * cols * item, plan)], threads=3)
    assert torch.equal(out, matrix[:, 3:7])


# --------------------------------------------------------------------------- boxes

# (file_offset, inner, counts, file_strides, dest_strides); dest offsets are laid
# out by the test. The file is a 4096-byte pattern.
BOXES = {
    "ndim0": (100, 33, (), (), ()),
    "ndim0_empty": (100, 0, (), (), ()),
    "column_slice": (8, 12, (20,), (64,), (12,)),
    "column_slice_padded_dest": (8, 12, (20,), (64,), (16,)),
    "zero_count": (0, 8, (0,), (8,), (8,)),
    "ndim2": (64, 5, (3, 4), (512, 16), (20, 5)),
    "ndim2_transposed": (0, 4, (3, 5), (4, 100), (4, 12)),  # not in file order
    "ndim2_zero_count": (0, 4, (3, 0), (100, 4), (16, 4)),
    "ndim3": (7, 3, (2, 3, 4), (1000, 100, 10), (36, 12, 3)),
    "ndim4": (1, 2, (2, 2, 3, 2), (1500, 300, 40, 7), (24, 12, 4, 2)),
    "zero_strides": (10, 6, (3,), (0,), (6,)),  # the same bytes three times
}


def box_dest_span(inner, counts, dest_strides) -> int:
    if inner == 0 or 0 in counts:
        return 0
    return sum((c - 1) * s for c, s in zip(counts, dest_strides)) + inner


def box_runs(file_offset, inner, counts, file_strides):
    if inner == 0 or 0 in counts:
        return []
    return sorted(
        (file_offset + sum(i * s for i, s in zip(idx, file_strides)), inner)
        for idx in itertools.product(*(range(c) for c in counts))
    )


@pytest.mark.parametrize("name", BOXES)
def test_boxes(engine, tmp_path, name):
    file_offset, inner, counts, fs, ds = BOXES[name]
    data = pattern(4096, 7)
    path = tmp_path / "boxes.distcp"
    write_file(path, data)
    span = box_dest_span(inner, counts, ds)
    dest = Mem(span + 16, fill=0xEE)  # 8 guard bytes either side
    plan = copies(box(file_offset, dest.addr + 8, inner, counts, fs, ds))
    engine.read([ReadFile(str(path), 0, plan)], threads=3, max_gap=0)
    expected = bytearray([0xEE]) * (span + 16)
    apply_box(data, expected, file_offset, 8, inner, counts, fs, ds)
    assert dest.bytes() == bytes(expected)


def test_many_boxes_one_plan(engine, tmp_path):
    """All the boxes above in one plan, over two files, on several threads."""
    data = [pattern(4096, 8), pattern(4096, 9)]
    paths = [tmp_path / "a.distcp", tmp_path / "b.distcp"]
    for p, d in zip(paths, data):
        write_file(p, d)
    spans = [box_dest_span(b[1], b[2], b[4]) for b in BOXES.values()]
    dest = Mem(2 * sum(spans), fill=0xEE)
    expected = bytearray(dest.bytes())
    plans: list[list[int]] = [[], []]
    pos = 0
    for k in range(2):
        for (file_offset, inner, counts, fs, ds), span in zip(BOXES.values(), spans):
            plans[k] += box(file_offset, dest.addr + pos, inner, counts, fs, ds)
            apply_box(data[k], expected, file_offset, pos, inner, counts, fs, ds)
            pos += span
    engine.read(
        [ReadFile(str(p), 4096, array("q", plan)) for p, plan in zip(paths, plans)],
        threads=16,
        chunk_bytes=100,
    )
    assert dest.bytes() == bytes(expected)


# --------------------------------------------------------------------------- exact stats

# name: (runs as (file_offset, length), max_gap, chunk_bytes, bytes_read, calls)
STATS_CASES = {
    "merge_one_eighth": ([(0, 4096), (4608, 4096)], 65536, 1 << 20, 8704, 1),
    "no_merge_one_eighth": ([(0, 4096), (4609, 4096)], 65536, 1 << 20, 8192, 2),
    "tiny_span": ([(0, 100), (1100, 100)], 65536, 1 << 20, 1200, 1),
    "tiny_span_exact": ([(0, 100), (3996, 100)], 65536, 1 << 20, 4096, 1),
    "tiny_span_exceeded": ([(0, 100), (3997, 100)], 65536, 1 << 20, 200, 2),
    "max_gap_below": ([(0, 100), (1100, 100)], 999, 1 << 20, 200, 2),
    "max_gap_equal": ([(0, 100), (1100, 100)], 1000, 1 << 20, 1200, 1),
    "contiguous_max_gap_zero": ([(0, 100), (100, 100)], 0, 1 << 20, 200, 1),
    "iov_max": ([(16 * i, 16) for i in range(MAX_IOVECS + 1)], 0, 1 << 20, 16 * 1025, 2),
    "iov_max_exact": ([(16 * i, 16) for i in range(MAX_IOVECS)], 0, 1 << 20, 16 * 1024, 1),
    # 600 runs of 8 bytes, 8-byte gaps: run, gap, run, ... 512 runs and 511
    # gaps fill 1023 iovecs; a gap and a run do not fit in the last one.
    "iov_max_with_gaps": ([(16 * i, 8) for i in range(600)], 65536, 1 << 20, 8 * (1023 + 175), 2),
    "chunk_split": ([(0, 10000)], 65536, 4096, 10000, 3),
    "chunk_greedy_fill": ([(0, 3000), (3000, 3000)], 65536, 4096, 6000, 2),
    "gap_does_not_fit_chunk": ([(0, 3000), (3100, 3000)], 65536, 3050, 6000, 2),
    "gap_then_split": ([(0, 3000), (3100, 3000)], 65536, 4096, 6100, 2),
    "overlapping_runs": ([(0, 100), (50, 100)], 65536, 1 << 20, 200, 2),
    "duplicate_runs": ([(0, 100), (0, 100)], 65536, 1 << 20, 200, 2),
    "unsorted_runs": ([(5000, 100), (0, 100), (100, 100)], 65536, 1 << 20, 300, 2),
    "same_offset_ties": ([(0, 200), (0, 100), (200, 8)], 65536, 1 << 20, 308, 2),
    "no_runs": ([], 65536, 1 << 20, 0, 0),
}


@pytest.mark.parametrize("name", STATS_CASES)
def test_read_stats_exact(engine, tmp_path, name):
    runs, max_gap, chunk_bytes, bytes_read, calls = STATS_CASES[name]
    size = max((o + n for o, n in runs), default=0) + 10
    data = pattern(size, 11)
    path = tmp_path / "stats.distcp"
    write_file(path, data)
    dest = Mem(sum(n for _, n in runs) + 8, fill=0xEE)
    plan, pos = [], 0
    for offset, length in runs:
        plan += box(offset, dest.addr + pos, length)
        pos += length
    stats = engine.read(
        [ReadFile(str(path), 0, array("q", plan))],
        threads=3,
        max_gap=max_gap,
        chunk_bytes=chunk_bytes,
    )
    assert stats == ReadStats(bytes_read=bytes_read, calls=calls)
    expected = b"".join(data[o : o + n] for o, n in runs) + b"\xee" * 8
    assert dest.bytes() == expected


def test_stats_count_every_file(engine, tmp_path):
    """Calls never span files; a file without runs costs no call."""
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.distcp")
        write_file(paths[-1], pattern(300, i))
    dest = Mem(200)
    files = [
        ReadFile(str(paths[0]), 0, copies(box(0, dest.addr, 100))),
        ReadFile(str(paths[1]), 300, copies()),
        ReadFile(
            str(paths[2]), 0, copies(box(0, dest.addr + 100, 50), box(60, dest.addr + 150, 50))
        ),
    ]
    assert engine.read(files, threads=2) == ReadStats(bytes_read=210, calls=2)
    assert dest.bytes() == pattern(300, 0)[:100] + pattern(300, 2)[:50] + pattern(300, 2)[60:110]


# --------------------------------------------------------------------------- errors


def test_read_missing_file(engine, tmp_path):
    path = str(tmp_path / "missing.distcp")
    dest = Mem(10)
    with pytest.raises(FileNotFoundError) as info:
        engine.read([ReadFile(path, 0, copies(box(0, dest.addr, 10)))], threads=1)
    assert info.value.filename == path
    assert info.value.strerror == f"{os.strerror(errno.ENOENT)} (open)"


def test_error_in_one_file_closes_everything(engine, tmp_path):
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"{i}.distcp"))
        if i != 3:
            write_file(paths[-1], pattern(50_000, i))
    dest = Mem(6 * 50_000)
    before = open_fds()
    files = [
        ReadFile(p, 0, copies(box(0, dest.addr + i * 50_000, 50_000))) for i, p in enumerate(paths)
    ]
    with pytest.raises(FileNotFoundError) as info:
        engine.read(files, threads=4, chunk_bytes=1000)
    assert info.value.filename == paths[3]
    assert open_fds() == before


def test_write_into_missing_directory(engine, tmp_path):
    path = str(tmp_path / "no" / "such" / "dir.distcp")
    with pytest.raises(FileNotFoundError) as info:
        engine.write([WriteFile(path, b"abc", segments(blob_seg(0, 0, 3)))], threads=1, sync=False)
    assert info.value.filename == path


def test_write_under_a_file(engine, tmp_path):
    (tmp_path / "file").write_bytes(b"")
    path = str(tmp_path / "file" / "x.distcp")
    with pytest.raises(NotADirectoryError) as info:
        engine.write([WriteFile(path, b"abc", segments(blob_seg(0, 0, 3)))], threads=1, sync=False)
    assert info.value.filename == path


def test_write_onto_a_directory(engine, tmp_path):
    good = str(tmp_path / "good.distcp")
    bad = str(tmp_path)
    before = open_fds()
    with pytest.raises(IsADirectoryError) as info:
        engine.write(
            [
                WriteFile(good, b"abc", segments(blob_seg(0, 0, 3))),
                WriteFile(bad, b"abc", segments(blob_seg(0, 0, 3))),
            ],
            threads=2,
            sync=True,
        )
    assert info.value.filename == bad
    assert open_fds() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_write_permission_denied(engine, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    path = str(locked / "x.distcp")
    try:
        with pytest.raises(PermissionError) as info:
            engine.write(
                [WriteFile(path, b"a", segments(blob_seg(0, 0, 1)))], threads=1, sync=False
            )
    finally:
        locked.chmod(0o700)
    assert info.value.filename == path


def test_truncated_below_min_size(engine, tmp_path):
    path = str(tmp_path / "short.distcp")
    write_file(path, b"x" * 100)
    with pytest.raises(TruncatedFileError) as info:
        engine.read([ReadFile(path, 200, copies())], threads=1)
    assert (info.value.filename, info.value.expected, info.value.actual) == (path, 200, 100)


def test_truncated_run_past_eof(engine, tmp_path):
    path = str(tmp_path / "short.distcp")
    write_file(path, b"x" * 100)
    dest = Mem(200)
    plan = copies(box(0, dest.addr, 10), box(50, dest.addr + 10, 100), box(20, dest.addr + 110, 90))
    with pytest.raises(TruncatedFileError) as info:
        engine.read([ReadFile(path, 120, plan)], threads=3)
    # The size needed is the furthest run's end, whichever run fails first.
    assert (info.value.filename, info.value.expected, info.value.actual) == (path, 150, 100)


SYSFS_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def test_eof_mid_read(engine):
    """A file whose size is larger than its contents ends in the middle of a read."""
    try:
        with open(SYSFS_FILE, "rb") as f:
            content = f.read()
        size = os.stat(SYSFS_FILE).st_size
    except OSError:
        pytest.skip(f"{SYSFS_FILE} is not readable here")
    if size <= len(content):
        pytest.skip(f"{SYSFS_FILE} reports its true size")
    dest = Mem(size)
    with pytest.raises(TruncatedFileError) as info:
        engine.read([ReadFile(SYSFS_FILE, 0, copies(box(0, dest.addr, size)))], threads=1)
    error = info.value
    assert (error.filename, error.expected, error.actual) == (SYSFS_FILE, size, len(content))
    assert dest.bytes()[: len(content)] == content


NULL = object()  # placeholder for a valid destination address

BAD_COPIES = {
    "truncated_header": [0, NULL, 4],
    "truncated_dims": [0, NULL, 4, 2, 3, 3, 10],
    "negative_ndim": [0, NULL, 4, -1],
    "huge_ndim": [0, NULL, 4, 65] + [1] * 195,
    "negative_offset": [-1, NULL, 4, 0],
    "negative_inner": [0, NULL, -4, 0],
    "negative_count": [0, NULL, 4, 1, -2, 4, 4],
    "negative_file_stride": [8, NULL, 4, 1, 2, -4, 4],
    "negative_dest_stride": [0, NULL, 4, 1, 2, 4, -4],
    "null_dest": [0, 0, 4, 0],
    "negative_dest": [0, -4096, 4, 0],
    "offset_overflow": [(1 << 63) - 2, NULL, 4, 0],
    "extent_overflow": [0, NULL, 4, 1, 3, 1 << 62, 4],
    "dest_overflow": [0, NULL, 4, 1, 3, 4, 1 << 62],
    "runs_overflow": [0, NULL, 1, 2, 1 << 32, 1 << 32, 0, 0, 0, 0],
    "second_record_bad": [0, NULL, 4, 0, 0, NULL, 4, 1, 2],
}


@pytest.mark.parametrize("name", BAD_COPIES)
def test_malformed_copies(engine, tmp_path, name):
    path = tmp_path / "f.distcp"
    write_file(path, bytes(4096))
    dest = Mem(64, fill=0xEE)
    plan = array("q", [dest.addr if v is NULL else v for v in BAD_COPIES[name]])
    with pytest.raises(ValueError):
        engine.read([ReadFile(str(path), 0, plan)], threads=2)
    assert dest.bytes() == b"\xee" * 64  # validation comes before any read


@pytest.mark.parametrize(
    "plan",
    [
        array("i", [0, 0, 0, 0]),
        b"\0" * 32,
        array("d", [0.0] * 4),
        memoryview(array("q", [0] * 8))[::2],
    ],
    ids=["int32", "bytes", "float64", "strided"],
)
def test_copies_must_be_int64(engine, tmp_path, plan):
    path = tmp_path / "f.distcp"
    write_file(path, b"")
    with pytest.raises(ValueError):
        engine.read([ReadFile(str(path), 0, plan)], threads=1)


BAD_SEGMENTS = {
    "not_multiple_of_4": [0, SRC_BLOB, 0],
    "negative_offset": [-1, SRC_BLOB, 0, 1],
    "negative_length": [0, SRC_BLOB, 0, -1],
    "offset_overflow": [(1 << 63) - 1, SRC_BLOB, 0, 1],
    "unknown_kind": [0, 7, 0, 1],
    "blob_out_of_range": [0, SRC_BLOB, 2, 3],
    "blob_negative_source": [0, SRC_BLOB, -1, 1],
    "null_host": [0, SRC_HOST, 0, 4],
    "negative_host": [0, SRC_HOST, -8, 4],
    "host_overflow": [0, SRC_HOST, (1 << 63) - 2, 4],
    "overlap": [0, SRC_BLOB, 0, 3, 2, SRC_BLOB, 0, 3],
    "overlap_unsorted": [10, SRC_BLOB, 0, 4, 0, SRC_BLOB, 0, 4, 12, SRC_BLOB, 0, 1],
}


@pytest.mark.parametrize("name", BAD_SEGMENTS)
def test_malformed_segments(engine, tmp_path, name):
    good = tmp_path / "good.distcp"
    path = tmp_path / "bad.distcp"
    with pytest.raises(ValueError):
        engine.write(
            [
                WriteFile(str(good), b"abcd", segments(blob_seg(0, 0, 4))),
                WriteFile(str(path), b"abcd", array("q", BAD_SEGMENTS[name])),
            ],
            threads=2,
            sync=False,
        )
    # The whole plan is checked before any file is created.
    assert not good.exists() and not path.exists()


def test_non_contiguous_blob(engine, tmp_path):
    blob = memoryview(bytearray(16))[::2]
    with pytest.raises(ValueError):
        engine.write(
            [WriteFile(str(tmp_path / "x"), blob, segments(blob_seg(0, 0, 4)))],
            threads=1,
            sync=False,
        )


@pytest.mark.parametrize(
    "kwargs",
    [{"threads": 0}, {"chunk_bytes": 0}, {"max_gap": -1}],
    ids=["threads", "chunk", "max_gap"],
)
def test_bad_options(engine, tmp_path, kwargs):
    path = tmp_path / "f.distcp"
    write_file(path, b"abc")
    options = {"threads": 1, **kwargs}
    with pytest.raises(ValueError):
        engine.read([ReadFile(str(path), 0, copies())], **options)
    if "max_gap" not in kwargs:
        with pytest.raises(ValueError):
            engine.write([WriteFile(str(path), b"", segments())], sync=False, **options)
        assert path.read_bytes() == b"abc"


def test_negative_min_size(engine, tmp_path):
    path = tmp_path / "f.distcp"
    write_file(path, b"abc")
    with pytest.raises(ValueError):
        engine.read([ReadFile(str(path), -1, copies())], threads=1)


# --------------------------------------------------------------------------- both engines


@given(
    prev_len=st.integers(0, 1 << 62),
    gap=st.integers(-(1 << 62), 1 << 62) | st.integers(-10, 5000),
    next_len=st.integers(0, 1 << 62) | st.integers(0, 5000),
    max_gap=st.integers(0, 1 << 62) | st.integers(0, 70000),
)
def test_should_merge_matches_native(prev_len, gap, next_len, max_gap):
    _C = pytest.importorskip("dcp_native._C")
    args = (prev_len, gap, next_len, max_gap)
    assert _C.should_merge(*args) == should_merge(*args)


def random_write_plan(rng: random.Random, host: Mem, blob: bytes) -> array:
    segs, offset = [], rng.randrange(0, 50)
    for _ in range(rng.randrange(1, 300)):
        length = rng.choice([0, 1, 7, 100, 4096, rng.randrange(1, 20000)])
        if rng.random() < 0.5:
            segs.append(blob_seg(offset, rng.randrange(0, len(blob) - length + 1), length))
        else:
            address = host.addr + rng.randrange(0, host.size - length + 1)
            segs.append(host_seg(offset, address, length))
        offset += length + rng.choice([0, 0, 0, 1, 5000])
    rng.shuffle(segs)
    return segments(*segs)


def random_box(rng: random.Random, size: int):
    ndim = rng.randrange(0, 4)
    counts = [rng.randrange(0, 6) for _ in range(ndim)]
    inner = rng.choice([1, 3, 8, 64, 500])
    file_strides = [rng.choice([0, inner, inner + 1, 2 * inner + 5, 700]) for _ in range(ndim)]
    # Destinations laid out densely (row-major over counts), so boxes never overlap in memory.
    dest_strides, stride = [], inner
    for c in reversed(counts):
        dest_strides.insert(0, stride)
        stride *= max(c, 1)
    extent = 0
    if 0 not in counts:
        extent = sum((c - 1) * s for c, s in zip(counts, file_strides)) + inner
    file_offset = rng.randrange(0, max(1, size - extent))
    return file_offset, inner, counts, file_strides, dest_strides


@pytest.mark.parametrize("seed", range(6))
def test_engines_agree(tmp_path, seed):
    native, python = both_engines()
    rng = random.Random(seed)
    host = Mem(data=pattern(30000, seed))
    blob = pattern(30000, seed + 100)
    plans = [random_write_plan(rng, host, blob) for _ in range(3)]
    threads = rng.choice(THREADS)
    chunk = rng.choice([1000, 4096, 1 << 20])
    outputs = {}
    for eng in (native, python):
        paths = [str(tmp_path / f"{eng.name}_{i}.distcp") for i in range(3)]
        written = eng.write(
            [WriteFile(p, blob, plan) for p, plan in zip(paths, plans)],
            threads=threads,
            sync=False,
            chunk_bytes=chunk,
        )
        contents = []
        for p in paths:
            with open(p, "rb") as f:
                contents.append(f.read())
        outputs[eng.name] = (written, contents)
    assert outputs["native"] == outputs["python"]
    contents = outputs["native"][1]

    boxes = [[random_box(rng, len(c)) for _ in range(rng.randrange(0, 40))] for c in contents]
    spans = [[box_dest_span(b[1], b[2], b[4]) for b in bs] for bs in boxes]
    total = sum(map(sum, spans))
    expected = bytearray([0xEE]) * total
    pos = 0
    for data, bs, ss in zip(contents, boxes, spans):
        for (file_offset, inner, counts, fs, ds), span in zip(bs, ss):
            apply_box(data, expected, file_offset, pos, inner, counts, fs, ds)
            pos += span
    max_gap = rng.choice([0, 100, 65536])
    read_chunk = rng.choice([64, 1000, 1 << 20])
    results = {}
    for eng in (native, python):
        dest = Mem(total, fill=0xEE)
        files, pos = [], 0
        for i, (bs, ss) in enumerate(zip(boxes, spans)):
            plan = []
            for (file_offset, inner, counts, fs, ds), span in zip(bs, ss):
                plan += box(file_offset, dest.addr + pos, inner, counts, fs, ds)
                pos += span
            files.append(ReadFile(str(tmp_path / f"native_{i}.distcp"), 0, array("q", plan)))
        stats = eng.read(files, threads=threads, max_gap=max_gap, chunk_bytes=read_chunk)
        results[eng.name] = (stats, dest.bytes())
    assert results["native"] == results["python"]
    assert results["native"][1] == bytes(expected)


def test_empty_plans(engine):
    assert engine.write([], threads=4, sync=True) == WriteStats([], [])
    assert engine.read([], threads=4) == ReadStats(0, 0)


def test_pathlike_paths(engine, tmp_path):
    path = tmp_path / "p.distcp"
    plan = segments(blob_seg(0, 0, 3))
    written = engine.write([WriteFile(path, b"xyz", plan)], threads=1, sync=False)
    assert written.bytes_written == [3]
    dest = Mem(3)
    stats = engine.read([ReadFile(path, 3, copies(box(0, dest.addr, 3)))], threads=1)
    assert stats == ReadStats(3, 1)
    assert dest.bytes() == b"xyz"
    with pytest.raises(FileNotFoundError) as info:
        engine.read([ReadFile(tmp_path / "nope", 0, copies())], threads=1)
    assert info.value.filename == str(tmp_path / "nope")
