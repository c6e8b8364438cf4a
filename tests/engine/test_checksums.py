"""The one checksum mechanism on both engines: block CRCs of writes, reads checked against
checksum tables (widened to whole blocks), and random plans both engines must check alike."""

from __future__ import annotations

import random
from array import array

import pytest

from dcp_native.engine import (
    ReadFile,
    ReadStats,
    WriteFile,
    WriteStats,
)
from dcp_native.integrity import Table
from helpers import (
    THREADS,
    Mem,
    block_crcs,
    blob_seg,
    both_engines,
    box,
    contiguous_plan,
    copies,
    host_seg,
    pattern,
    segments,
    write_file,
)

SHORT_IO_ENV = "DCP_NATIVE_TEST_SHORT_IO"


# --------------------------------------------------------------------------- block CRCs


CRC_LAYOUTS = {
    "one_segment": [10_000],
    "exact_blocks": None,  # two segments, of 2 and 3 blocks: the file ends on a block
    "header_payload_trailer": [3, 12_000, 1, 57],
    "many_segments": [(i * 37) % 301 for i in range(300)],  # zero-length ones too
    "empty": [],
}


@pytest.mark.parametrize("block", [1, 4096, 4097, 1 << 20])
@pytest.mark.parametrize("layout", CRC_LAYOUTS)
def test_block_crcs(engine, tmp_path, block, layout):
    lengths = CRC_LAYOUTS[layout]
    if lengths is None:
        lengths = [2 * block, 3 * block]
    if block == 1 and sum(lengths) > 20_000:
        pytest.skip("a CRC per byte of a large file only costs time")
    rng = random.Random(block)
    host = Mem(data=pattern(max(lengths, default=0) + 100, 5))
    blob = pattern(max(lengths, default=0) + 100, 6)
    plan, content = contiguous_plan(rng, lengths, host, blob)
    path = tmp_path / "crc.distcp"
    stats = engine.write(
        [WriteFile(str(path), blob, plan, crc_block=block)], threads=3, sync=False,
        chunk_bytes=5000,
    )
    assert path.read_bytes() == content
    assert stats == WriteStats([len(content)], [block_crcs(content, block)])
    assert stats.block_crcs[0].typecode == "I"


def test_block_crcs_per_file(engine, tmp_path):
    """Files with and without CRCs, of different blocks, in one call on many threads."""
    rng = random.Random(9)
    host = Mem(data=pattern(50_000, 7))
    blob = pattern(50_000, 8)
    files, contents, blocks = [], [], [4096, 0, 1000, 0, 8192, 333]
    for i, block in enumerate(blocks):
        lengths = [rng.randrange(0, 9000) for _ in range(rng.randrange(0, 12))]
        plan, content = contiguous_plan(rng, lengths, host, blob)
        files.append(WriteFile(str(tmp_path / f"{i}.distcp"), blob, plan, crc_block=block))
        contents.append(content)
    stats = engine.write(files, threads=16, sync=True, chunk_bytes=3000)
    assert stats.bytes_written == [len(c) for c in contents]
    assert stats.block_crcs == [block_crcs(c, b) if b else None for c, b in zip(contents, blocks)]


def test_block_crcs_portable(engine, tmp_path, monkeypatch):
    """The table-driven native implementation gives the same CRCs as the hardware one."""
    monkeypatch.setenv("DCP_NATIVE_CRC32C", "portable")
    host = Mem(data=pattern(70_001, 10))
    path = tmp_path / "p.distcp"
    stats = engine.write(
        [WriteFile(str(path), b"HD", segments(blob_seg(0, 0, 2), host_seg(2, host.addr, 70_001)),
                   crc_block=4096)],
        threads=3, sync=False, chunk_bytes=10_000,
    )
    assert stats.block_crcs == [block_crcs(b"HD" + host.bytes(), 4096)]


def test_block_crcs_with_short_io(engine, tmp_path, monkeypatch):
    monkeypatch.setenv(SHORT_IO_ENV, "333")
    host = Mem(data=pattern(20_000, 11))
    path = tmp_path / "s.distcp"
    stats = engine.write(
        [WriteFile(str(path), b"", segments(host_seg(0, host.addr, 20_000)), crc_block=4096)],
        threads=2, sync=False, chunk_bytes=3000,
    )
    assert path.read_bytes() == host.bytes()
    assert stats.block_crcs == [block_crcs(host.bytes(), 4096)]


BAD_CRC_PLANS = {
    "hole_at_start": [blob_seg(5, 0, 4)],
    "hole_in_middle": [blob_seg(0, 0, 4), blob_seg(5, 0, 4)],
    "hole_unsorted": [blob_seg(6, 0, 4), blob_seg(0, 0, 4), blob_seg(4, 0, 1)],
    "overlap": [blob_seg(0, 0, 4), blob_seg(3, 0, 4)],
}


@pytest.mark.parametrize("name", BAD_CRC_PLANS)
def test_block_crcs_need_contiguous_segments(engine, tmp_path, name):
    good = tmp_path / "good.distcp"
    bad = tmp_path / "bad.distcp"
    with pytest.raises(ValueError, match="overlap" if name == "overlap" else "nothing covers"):
        engine.write(
            [
                WriteFile(str(good), b"abcd", segments(blob_seg(0, 0, 4)), crc_block=2),
                WriteFile(str(bad), b"abcd", segments(*BAD_CRC_PLANS[name]), crc_block=4096),
            ],
            threads=2,
            sync=False,
        )
    # Rejected before any file is created.
    assert not good.exists() and not bad.exists()


def test_holes_allowed_without_crcs(engine, tmp_path):
    path = tmp_path / "h.distcp"
    stats = engine.write(
        [WriteFile(str(path), b"abcd", segments(blob_seg(5, 0, 4)), crc_block=0)],
        threads=1, sync=False,
    )
    assert stats == WriteStats([4], [None])


def test_negative_crc_block(engine, tmp_path):
    with pytest.raises(ValueError, match="crc_block"):
        engine.write(
            [WriteFile(str(tmp_path / "x"), b"ab", segments(blob_seg(0, 0, 2)), crc_block=-1)],
            threads=1, sync=False,
        )
    assert not (tmp_path / "x").exists()


def test_empty_segments_are_not_holes(engine, tmp_path):
    """Zero-length segments anywhere (even past the end) neither leave nor fill holes."""
    path = tmp_path / "z.distcp"
    plan = segments(blob_seg(0, 0, 3), blob_seg(100, 0, 0), blob_seg(3, 3, 3), blob_seg(3, 0, 0))
    stats = engine.write(
        [WriteFile(str(path), b"abcdef", plan, crc_block=4)], threads=2, sync=False
    )
    assert path.read_bytes() == b"abcdef"
    assert stats == WriteStats([6], [block_crcs(b"abcdef", 4)])


# --------------------------------------------------------------------------- checks


def table_of(content: bytes, block: int = 4096, flip: set[int] = frozenset()) -> Table:
    """The checksum table of ``content``, with the CRCs of the blocks in ``flip`` wrong."""
    crcs = block_crcs(content, block)
    for k in flip:
        crcs[k] ^= 1
    return Table(block, len(content), crcs)


def touched_blocks(runs, block: int) -> set[int]:
    return {k for a, n in runs if n for k in range(a // block, (a + n - 1) // block + 1)}


def test_checks_pass_and_fail(engine, tmp_path):
    data = pattern(10_000, 20)
    path = tmp_path / "c.distcp"
    write_file(path, data)
    a, b = Mem(6000), Mem(4000)
    plan = copies(box(0, a.addr, 6000), box(6000, b.addr, 4000))
    stats = engine.read([ReadFile(str(path), 0, plan, table=table_of(data))], threads=3)
    assert a.bytes() + b.bytes() == data
    assert stats == ReadStats(10_000, 1, [])
    stats = engine.read([ReadFile(str(path), 0, plan, table=table_of(data, flip={0, 2}))], threads=3)
    assert a.bytes() + b.bytes() == data  # the bytes are there; the caller decides
    assert stats.failed_blocks == [(0, 0), (0, 2)]


def test_checks_widen_reads_to_whole_blocks(engine, tmp_path):
    """A run inside a block reads the whole block (into scratch, not the destination); runs
    in blocks apart stay apart; the widened bytes count as read."""
    data = bytearray(pattern(10_000, 24))
    path = tmp_path / "w.distcp"
    table = table_of(bytes(data))
    data[4100] ^= 1  # in block 1, outside the run read from it
    write_file(path, bytes(data))
    a, b = Mem(1000, fill=0xEE), Mem(100, fill=0xEE)
    plan = copies(box(5000, a.addr, 1000), box(9000, b.addr, 100))
    stats = engine.read([ReadFile(str(path), 0, plan, table=table)], threads=2)
    assert a.bytes() == bytes(data[5000:6000]) and b.bytes() == bytes(data[9000:9100])
    assert stats == ReadStats(4096 + (10_000 - 8192), 2, [(0, 1)])
    plain = engine.read([ReadFile(str(path), 0, plan)], threads=2)
    assert plain == ReadStats(1100, 2, [])


@pytest.mark.parametrize("chunk", [1000, 4096, 1 << 20])
def test_checks_of_blocks_split_between_calls(engine, tmp_path, chunk):
    """Calls cut inside blocks (chunk_bytes, 1024 iovecs of tiny runs): the parts of a block
    are joined; failures are found wherever the block was cut, in every file, sorted."""
    size = 300_000
    data = pattern(size, 21)
    paths = [tmp_path / "a.distcp", tmp_path / "b.distcp"]
    for p in paths:
        write_file(p, data)
    flips = [{0, 17, 40, 73}, {2, 70}]
    whole, rows = Mem(size), Mem(size // 2)
    files = [
        ReadFile(str(paths[0]), size, copies(box(0, whole.addr, size)),
                 table=table_of(data, flip=flips[0])),
        # 2-byte runs every 4 bytes: far more than 1024 iovecs in a row.
        ReadFile(str(paths[1]), size, copies(box(0, rows.addr, 2, (size // 4,), (4,), (2,))),
                 table=table_of(data, flip=flips[1])),
    ]
    stats = engine.read(files, threads=3, chunk_bytes=chunk)
    assert whole.bytes() == data
    assert rows.bytes() == b"".join(data[i : i + 2] for i in range(0, size, 4))
    assert stats.failed_blocks == [(f, k) for f in range(2) for k in sorted(flips[f])]


def test_checks_of_overlapping_runs(engine, tmp_path):
    """The same bytes read to two places: both reads are checked, a failure reported once."""
    data = pattern(20_000, 25)
    path = tmp_path / "o.distcp"
    write_file(path, data)
    a, b = Mem(9000), Mem(9000)
    plan = copies(box(1000, a.addr, 9000), box(5000, b.addr, 9000))
    stats = engine.read([ReadFile(str(path), 0, plan, table=table_of(data, flip={1, 3}))], threads=2)
    assert a.bytes() == data[1000:10_000] and b.bytes() == data[5000:14_000]
    assert stats.failed_blocks == [(0, 1), (0, 3)]


def test_empty_checks(engine, tmp_path):
    path = tmp_path / "e.distcp"
    write_file(path, b"abc")
    dest = Mem(3)
    for table in (None, table_of(b"abc")):
        plan = copies(box(0, dest.addr, 3))
        assert engine.read([ReadFile(str(path), 3, plan, table=table)], threads=2) == ReadStats(3, 1, [])
    empty = tmp_path / "empty.distcp"
    write_file(empty, b"")
    assert engine.read([ReadFile(str(empty), 0, copies(), table=table_of(b""))], threads=1) == ReadStats()


BAD_TABLES = {
    "too_few_crcs": (4096, 10_000, 2),
    "too_many_crcs": (4096, 10_000, 4),
    "zero_block": (0, 10_000, 0),
    "negative_size": (4096, -1, 0),
    "runs_past_the_table": (4096, 4000, 1),
}


@pytest.mark.parametrize("name", BAD_TABLES)
def test_malformed_tables(engine, tmp_path, name):
    path = tmp_path / "f.distcp"
    write_file(path, pattern(10_000, 23))
    dest = Mem(10_000, fill=0xEE)
    block, size, count = BAD_TABLES[name]
    table = Table(block, size, array("I", [0] * count))
    with pytest.raises(ValueError, match="checksum table"):
        engine.read([ReadFile(str(path), 0, copies(box(0, dest.addr, 10_000)), table=table)],
                    threads=2)
    assert dest.bytes() == b"\xee" * 10_000  # validation comes before any read


def test_table_crcs_must_be_uint32(engine, tmp_path):
    path = tmp_path / "f.distcp"
    write_file(path, b"abc")
    with pytest.raises(ValueError, match="crcs"):
        engine.read([ReadFile(str(path), 0, copies(), table=Table(4096, 3, array("q", [0])))],
                    threads=1)


# --------------------------------------------------------------------------- both engines, CRCs


@pytest.mark.parametrize("seed", range(4))
def test_engines_agree_on_checksums(tmp_path, seed):
    """Random contiguous plans with random blocks, then random strided reads checked against
    tables with random wrong CRCs: identical WriteStats and ReadStats (the same widened calls),
    equal to the reference, and the failures are exactly the wrong blocks the reads touch."""
    native, python = both_engines()
    rng = random.Random(seed)
    host = Mem(data=pattern(40_000, seed))
    blob = pattern(40_000, seed + 50)
    plans, contents, blocks = [], [], []
    for _ in range(3):
        lengths = [rng.choice([0, 1, 7, 4096, rng.randrange(1, 20_000)])
                   for _ in range(rng.randrange(0, 40))]
        plan, content = contiguous_plan(rng, lengths, host, blob)
        plans.append(plan)
        contents.append(content)
        blocks.append(rng.choice([0, 1, 100, 4096, 4097, 1 << 16]) if len(content) < 50_000 or
                      rng.random() < 0.5 else 4096)
    threads = rng.choice(THREADS)
    chunk = rng.choice([1000, 4096, 1 << 20])
    results = {}
    for eng in (native, python):
        paths = [str(tmp_path / f"{eng.name}_{i}.distcp") for i in range(3)]
        stats = eng.write(
            [WriteFile(p, blob, plan, crc_block=b) for p, plan, b in zip(paths, plans, blocks)],
            threads=threads, sync=False, chunk_bytes=chunk,
        )
        results[eng.name] = stats
    assert results["native"] == results["python"]
    assert results["native"] == WriteStats(
        [len(c) for c in contents],
        [block_crcs(c, b) if b else None for c, b in zip(contents, blocks)],
    )

    # Read random boxes of everything back against tables with random wrong CRCs.
    reads = {}
    for eng in (native, python):
        check_rng = random.Random(seed + 1000)
        dests, files, expected, wanted = [], [], [], []
        for f, content in enumerate(contents):
            size = len(content)
            block = check_rng.choice([1, 100, 4096, 4097, 1 << 16])
            flips = {k for k in range(-(-size // block)) if check_rng.random() < 0.1}
            boxes, runs = [], []
            for _ in range(check_rng.randrange(0, 6) if size else 0):
                inner = check_rng.randrange(1, min(size, 3000) + 1)
                count = check_rng.randrange(1, 8)
                stride = check_rng.randrange(inner, inner + 5000)
                count = min(count, (size - inner) // stride + 1)
                start = check_rng.randrange(0, size - (count - 1) * stride - inner + 1)
                dest = Mem(inner * count)
                dests.append(dest)
                wanted.append(b"".join(content[start + i * stride :][:inner] for i in range(count)))
                boxes.append(box(start, dest.addr, inner, (count,), (stride,), (inner,)))
                runs += [(start + i * stride, inner) for i in range(count)]
            expected += [(f, k) for k in sorted(touched_blocks(runs, block) & flips)]
            files.append(ReadFile(str(tmp_path / f"native_{f}.distcp"), size, copies(*boxes),
                                  table=table_of(content, block, flips)))
        stats = eng.read(files, threads=threads, chunk_bytes=chunk, max_gap=check_rng.choice([0, 4096, 1 << 16]))
        reads[eng.name] = (stats, [d.bytes() for d in dests])
        assert stats.failed_blocks == expected
        assert [d.bytes() for d in dests] == wanted
    assert reads["native"] == reads["python"]
