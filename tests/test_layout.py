"""The item framing: generated archives agree with torch.save/torch.load; stock archives parse."""

from __future__ import annotations

import functools
import io
import mmap
import os
import struct
import zipfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from dcp_native import _safe_pickle, checkpoint, layout
from dcp_native.plan import Box
from helpers import DTYPES, bits, make_tensor, tensor_bytes

SID = layout.new_serialization_id()


def _torch_save_bytes(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def _frame(t: torch.Tensor, item_offset: int = 0) -> tuple[bytes, layout.TensorFrame]:
    fr = layout.frame_tensor(t.dtype, tuple(t.shape), item_offset, SID)
    payload = tensor_bytes(t)
    raw = fr.header + payload + fr.trailer
    assert len(raw) == fr.length
    return raw, fr


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_data_pkl_is_byte_identical_to_torch_save(dtype):
    for shape in [(), (0,), (7,), (3, 5), (2, 1, 4)]:
        t = make_tensor(dtype, shape)
        ref = zipfile.ZipFile(io.BytesIO(_torch_save_bytes(t))).read("archive/data.pkl")
        assert layout.tensor_pickle(dtype, shape) == ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("item_offset", [0, 1, 63, 4095, 4096, 123457])
def test_generated_archive_loads_with_torch_load(dtype, item_offset):
    for shape in [(), (0,), (5, 3), (70000,)]:
        t = make_tensor(dtype, shape, seed=item_offset)
        raw, fr = _frame(t, item_offset)
        loaded = torch.load(io.BytesIO(raw), weights_only=True)
        assert loaded.dtype == dtype and loaded.shape == t.shape
        assert torch.equal(bits(loaded), bits(t))
        align = layout.payload_alignment(t.nbytes)
        assert (item_offset + fr.payload_offset) % align == 0
        # A well-formed zip by Python's own reader too (CRC of the payload is 0 by design).
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            assert z.testzip() in (None, "archive/data/0")
            assert z.read("archive/byteorder") == b"little"


def test_large_payloads_are_page_aligned_in_the_file():
    t = torch.zeros(1 << 16)
    for off in (0, 17, 4000, 1 << 33):
        fr = layout.frame_tensor(t.dtype, tuple(t.shape), off, SID)
        assert (off + fr.payload_offset) % 4096 == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(4, 6),
        lambda: torch.randn(4, 6).T,  # non-contiguous storage of exact size: stride kept
        lambda: torch.randn(3, 4, 5).permute(2, 0, 1),
        lambda: torch.tensor(3.5),
        lambda: torch.empty(0, 3),
        lambda: torch.arange(10, dtype=torch.int16),
        lambda: make_tensor(torch.float8_e5m2, (8,)),
    ],
)
def test_parse_stock_archive(make):
    t = make()
    raw = _torch_save_bytes(t)
    probe = checkpoint.PROBE_BYTES
    view = checkpoint.ItemBytes(len(raw), raw[:probe], raw[-probe:])
    located = checkpoint.locate_tensor(checkpoint.Archive(view))
    saved, payload, size = located.saved, located.payload, located.payload_size
    assert saved.dtype == t.dtype and saved.size == tuple(t.shape) and saved.stride == t.stride()
    assert size == t.untyped_storage().nbytes()
    stored = torch.frombuffer(bytearray(raw[payload : payload + size]) or bytearray(1), dtype=torch.uint8)[:size]
    rebuilt = stored.view(t.dtype).as_strided(t.shape, t.stride(), saved.storage_offset)
    assert torch.equal(rebuilt, t)


def test_parse_rejects_what_a_strided_copy_cannot_express():
    # A tensor inside a container, and a pickle that names an arbitrary global.
    with pytest.raises(_safe_pickle.UnsupportedLayout):
        _safe_pickle.parse_tensor_pickle(
            zipfile.ZipFile(io.BytesIO(_torch_save_bytes([torch.ones(2)]))).read("archive/data.pkl")
        )
    evil = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85q\x01Rq\x02."
    with pytest.raises(_safe_pickle.UnsupportedLayout):
        _safe_pickle.parse_tensor_pickle(evil)


def test_parse_tail_needs_whole_central_directory():
    raw = _torch_save_bytes(torch.ones(3))
    with pytest.raises(layout.ArchiveError):
        layout.parse_archive_tail(raw[-100:], len(raw))
    with pytest.raises(layout.ArchiveError):
        layout.parse_archive_tail(b"\0" * 200, 200)


def test_zip64_archive_for_a_storage_over_4_gib(tmp_path):
    """A 5 GiB payload: ZIP64 local extra, descriptor, central entries and end records.

    The file is sparse (the payload is a hole), and torch.load maps it rather
    than reading it, so this checks the format, not the disk.
    """
    numel = (5 << 30) // 2
    dtype = torch.bfloat16
    item_offset = 12345
    fr = layout.frame_tensor(dtype, (numel,), item_offset, SID)
    path = tmp_path / "big.pt"
    with open(path, "wb") as f:
        f.truncate(item_offset + fr.length)
        f.seek(item_offset)
        f.write(fr.header)
        f.seek(item_offset + fr.payload_offset + numel * 2 - 2)
        f.write(struct.pack("<H", 0x3F80))  # bf16 1.0 as the last element
        f.write(fr.trailer)
    assert (item_offset + fr.payload_offset) % 4096 == 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        tail = m[item_offset + fr.length - checkpoint.PROBE_BYTES : item_offset + fr.length]
        index = layout.parse_archive_tail(tail, fr.length)
        assert index.records["data/0"][1] == numel * 2
        head = m[item_offset : item_offset + checkpoint.PROBE_BYTES]
        assert layout.local_data_offset(head[index.records["data/0"][0] :], index.records["data/0"][0]) == fr.payload_offset
    # torch.load reads an archive from its first byte: copy the item into its own sparse file.
    single = tmp_path / "single.pt"
    fr0 = layout.frame_tensor(dtype, (numel,), 0, SID)
    with open(single, "wb") as f:
        f.truncate(fr0.length)
        f.write(fr0.header)
        f.seek(fr0.payload_offset + numel * 2 - 2)
        f.write(struct.pack("<H", 0x3F80))
        f.write(fr0.trailer)
    loaded = torch.load(single, mmap=True, weights_only=True)
    assert loaded.shape == (numel,) and loaded.dtype == dtype
    assert loaded[-1].item() == 1.0 and loaded[0].item() == 0.0
    with zipfile.ZipFile(single) as z:
        assert z.getinfo("archive/data/0").file_size == numel * 2
    del loaded
    os.remove(single)


def test_trailer_length_without_framing():
    """layout.trailer_length (what readers check sidecar entries with) agrees with the framing."""
    import random

    rng = random.Random(0)
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.float64, torch.bool]
    for _ in range(2000):
        dtype = rng.choice(dtypes)
        size = tuple(rng.choice([0, 1, 3, 7, 64, 100, 1000]) for _ in range(rng.randint(0, 3)))
        offset = rng.randint(0, 1 << 20)
        frame = layout.frame_tensor(dtype, size, offset, b"7" * 40)
        nbytes = layout._nbytes(dtype, size)
        assert layout.trailer_length(offset, frame.payload_offset, nbytes) == len(frame.trailer)
    for nbytes in ((1 << 32) - 100, 1 << 32):  # ZIP64 records near and past 4 GiB
        frame = layout.frame_tensor(torch.uint8, (nbytes,), 12345, b"7" * 40)
        assert layout.trailer_length(12345, frame.payload_offset, nbytes) == len(frame.trailer)


# --------------------------------------------------------------------------- the checkpoint model


@pytest.mark.parametrize("size", [(0,), (3,), (1000, 17), (20000,)])
@pytest.mark.parametrize("item_offset", [0, 100, 4095, 1 << 20])
def test_sidecar_payload_accepts_only_the_framed_offset(size, item_offset):
    """checkpoint.sidecar_payload: the payload offset dcp_native framed fits, every shift is refused."""
    frame = layout.frame_tensor(torch.float32, size, item_offset, SID)
    check = functools.partial(checkpoint.sidecar_payload, length=frame.length, offset=item_offset,
                              dtype=torch.float32, size=size)
    assert check((frame.length, frame.payload_offset)) == frame.payload_offset
    for shift in (-4096, -64, -1, 1, 8, 64, 4096):
        assert check((frame.length, frame.payload_offset + shift)) is None
    assert check((frame.length + 1, frame.payload_offset)) is None


def test_archive_records_are_bounds_checked():
    """A record whose header or data lies outside the item is an ArchiveError, not a read."""
    raw = _torch_save_bytes(torch.arange(10.0))
    probe = checkpoint.PROBE_BYTES
    view = checkpoint.ItemBytes(len(raw), raw[:probe], raw[-probe:])
    archive = checkpoint.Archive(view)
    archive.check_all()
    header, size = archive.index["data/0"]
    archive.index["data/0"] = (header, len(raw))  # data running past the item's end
    with pytest.raises(checkpoint.ArchiveError, match="runs past the item's end"):
        archive.record("data/0")
    archive.index["data/0"] = (len(raw) - 10, size)  # a local header past the end
    with pytest.raises(checkpoint.ArchiveError, match="past the item's end"):
        archive.record("data/0")
    with pytest.raises(checkpoint.ArchiveError, match="no data/1 record"):
        archive.record("data/1")
    with pytest.raises(checkpoint.ArchiveError, match="outside it"):
        view.get(len(raw) - 4, 8)


def test_item_bytes_fetch_only_what_the_probe_lacks():
    raw = bytes(range(256)) * 64  # 16 KiB: head and tail of 4 KiB, a middle to fetch
    asked = []

    def fetch(start, n):
        asked.append((start, n))
        return raw[start : start + n]

    view = checkpoint.ItemBytes(len(raw), raw[:4096], raw[-4096:], fetch)
    assert view.get(10, 20) == raw[10:30] and view.get(len(raw) - 30, 20) == raw[-30:-10]
    assert asked == []
    assert view.get(5000, 100) == raw[5000:5100] and asked == [(5000, 100)]
    with pytest.raises(checkpoint.ArchiveError, match="need more bytes"):
        checkpoint.ItemBytes(len(raw), raw[:4096], raw[-4096:]).get(5000, 100)


def test_a_failed_block_names_the_key_that_reads_it():
    boxes = [
        Box(0, 0, 100, key="header"),
        Box(4096, 0, 16, (4,), (1024,), (16,), key="strided"),  # runs at 4096, 5120, 6144, 7168
        Box(8192, 0, 4096, key="next"),
    ]
    assert checkpoint.owner(boxes, 0, 4096) == "header"
    assert checkpoint.owner(boxes, 4096, 8192) == "strided"
    assert checkpoint.owner(boxes, 8192, 12288) == "next"
    assert checkpoint.owner(boxes, 12288, 16384) is None
    assert checkpoint.owner([Box(4096, 0, 16, (2,), (8192,), (16,), key="gap")], 8192, 12288) is None


@pytest.mark.parametrize(
    "rel, why",
    [
        ("", "is not a file name"),
        ("a\0b", "contains a NUL byte"),
        ("/etc/passwd", "is an absolute path"),
        ("x/../../y", "leaves the checkpoint directory"),
        ("__0_0.distcp", None),
    ],
)
def test_data_file_names_stay_inside_the_directory(tmp_path, rel, why):
    got = checkpoint.path_problem(str(tmp_path), os.path.realpath(tmp_path), rel)
    assert (got is None) if why is None else why in got
    (tmp_path / "link").symlink_to("/")
    assert "outside" in checkpoint.path_problem(str(tmp_path), os.path.realpath(tmp_path), "link/etc")


@pytest.mark.parametrize("files", [1, 3])
def test_items_go_to_the_files_stock_puts_them_in(tmp_path, files):
    """layout.lay_out assigns items to data files as stock's writer does, byte items first."""
    import re

    import torch.distributed.checkpoint as dcp

    import dcp_native

    gen = torch.Generator().manual_seed(0)
    sd = {f"t{i}": torch.randn(1 + 97 * i, generator=gen) for i in range(9)}
    sd.update(step=3, name="x", nested={"a": [1, 2]})

    def placement(writer_cls, path):
        dcp.save(sd, storage_writer=writer_cls(path, thread_count=files), no_dist=True)
        md = dcp.FileSystemReader(path).read_metadata()
        by_file = {}
        for index, info in sorted(md.storage_data.items(), key=lambda kv: kv[1].offset):
            n = re.match(r"__0_(\d+)\.", info.relative_path).group(1)
            by_file.setdefault(n, []).append(index.fqn)
        return by_file

    assert placement(dcp_native.FileSystemWriter, tmp_path / "ours") == placement(
        dcp.FileSystemWriter, tmp_path / "stock"
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([torch.float32, torch.bfloat16, torch.int8, torch.float64]),
                          st.lists(st.integers(0, 9), max_size=3), st.booleans()), max_size=40),
       st.integers(1, 6))
def test_items_go_to_files_as_stock_assigns_them(specs, bins):
    """Byte items round-robin, tensors largest first to the emptiest file: stock's own function
    gives the same files, in the same order."""
    from torch.distributed.checkpoint import filesystem as stock_fs
    from torch.distributed.checkpoint.planner_helpers import _create_write_items

    items = []
    for i, (dtype, shape, is_bytes) in enumerate(specs):
        items += _create_write_items(f"k{i}", b"x" if is_bytes else torch.zeros(shape, dtype=dtype))
    ours = layout._split_by_size_and_type(bins, items)
    assert [[wi.index for wi in b] for b in ours] == \
        [[wi.index for wi in b] for b in stock_fs._split_by_size_and_type(bins, items)]


def test_dense_host_tensors_are_laid_out_as_the_general_route_lays_them_out(monkeypatch):
    """lay_out's shortcut for dense host tensors gives the bytes, segments and results that
    _add_item gives (tensors of many sizes, some past PAYLOAD_ALIGN_MIN_BYTES, objects between)."""
    from torch.distributed.checkpoint.planner_helpers import _create_write_items

    sd = {f"t{i}": make_tensor(dtype, shape) for i, (dtype, shape) in enumerate(
        [(torch.float32, (3, 5)), (torch.bfloat16, (7,)), (torch.int64, (40000,)), (torch.float32, (3, 5)),
         (torch.uint8, (1,)), (torch.float64, (100, 200)), (torch.bool, (9,))] * 3)}
    sd["obj"] = b"payload"
    items = [it for k, v in sd.items() for it in _create_write_items(k, v)]

    def resolve(item):
        return sd[item.index.fqn]

    sid = layout.new_serialization_id()
    monkeypatch.setattr(layout, "new_serialization_id", lambda: sid)
    files, results = layout.lay_out(items, resolve, "/d", "__0_", "t", files=2, transforms=None,
                                    cuda_usable=lambda: False)
    for fl in files:
        general = layout.FileLayout("/d", fl.relative_path)
        expected = []
        for wr in results:
            if wr.storage_data.relative_path != fl.relative_path:
                continue
            item = next(it for it in items if it.index == wr.index)
            data = resolve(item)
            if isinstance(data, bytes):
                data = io.BytesIO(data)
            expected.append(layout._add_item(general, item, data, sid, layout._DeviceRoute(lambda: False)))
        got = [wr for wr in results if wr.storage_data.relative_path == fl.relative_path]
        assert got == expected
        assert bytes(fl.blob) == bytes(general.blob) and list(fl.segments) == list(general.segments)
        assert fl.size == general.size
