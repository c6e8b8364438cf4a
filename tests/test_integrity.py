"""Integrity: ``verify=True`` checks every byte it returns or raises; nothing dcp_native adds is
trusted unverified. Both engines.

* Bit flips in a data file (payload, zip header, trailer): ``IntegrityError`` naming the file,
  the 4 KiB block and the key; a resharded load checks exactly the blocks it reads.
* The sidecar: shifted, negative or huge payload offsets (damaged, or sealed again by hand),
  random bit flips in it or in a checksum table, a ``.metadata`` edited under it, a stale
  sidecar left by a stock save: never wrong values.
* ``verify=True`` where nothing can be checked (sidecar deleted, damaged or another save's; no
  checksum tables): ``IntegrityError`` saying why, never an unverified byte.

The engines' block checks themselves: tests/engine/test_checksums.py; ``dcp-native verify``:
tests/test_cli.py.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import dcp_native
from helpers import (
    data_file,
    failure,
    load,
    run_ranks,
    same,
    save,
    sidecar_file,
    state,
    tensor_bytes,
)


# ----------------------------------------------------------------------------------------- helpers


def _flip(path, offset, bit=0x10):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ bit]))


def _storage_data(path) -> dict:
    """The metadata's storage_data: {MetadataIndex: _StorageInfo}."""
    with open(path / ".metadata", "rb") as f:
        return pickle.load(f).storage_data


def _flip_bits(path: Path, count: int, seed: int) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for _ in range(count):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------- bit flips in data files


@pytest.mark.parametrize("where", ["payload", "header", "trailer"])
def test_flipped_bit_is_caught(engine_name, tmp_path, where):
    sd = state(1.0, n=6, cols=257)
    save(sd, tmp_path, checksums=True)
    info = next(i for idx, i in _storage_data(tmp_path).items() if idx.fqn == "w3")
    offset = {
        "payload": info.offset + info.length // 2,
        "header": info.offset + 100,
        "trailer": info.offset + info.length - 30,
    }[where]
    _flip(tmp_path / info.relative_path, offset)
    with pytest.raises(CheckpointException) as ei:
        load(tmp_path, sd, dcp_native.FileSystemReader(tmp_path, verify=True))
    err = failure(ei)
    assert isinstance(err, dcp_native.IntegrityError)
    assert err.filename == str(tmp_path / info.relative_path)
    assert err.offset == offset // 4096 * 4096
    if where == "payload":
        assert err.key == "w3"


def _reshard_verify(path, flip):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = torch.arange(256 * 4096, dtype=torch.float32).reshape(256, 4096)
    if not flip:
        dcp.save({"t": distribute_tensor(full, mesh, [Shard(0)])},
                 storage_writer=dcp_native.FileSystemWriter(path, checksums=True))
    dist.barrier()
    dest = distribute_tensor(torch.zeros(256, 4096), mesh, [Shard(1)])
    reader = dcp_native.FileSystemReader(path, verify=True)
    try:
        dcp.load({"t": dest}, storage_reader=reader)
    except CheckpointException as exc:
        return ("error", type(next(iter(exc.failures.values()))[0]).__name__, sorted(exc.failures))
    assert torch.equal(dest.to_local(), full[:, rank * 2048 : (rank + 1) * 2048])
    return ("ok", reader.last_read_stats.bytes_read, dest.to_local().nbytes)


def test_resharded_read_verifies_exactly_what_it_reads(engine_name, tmp_path):
    """Shard(0) -> Shard(1) with verification: 16 KiB runs on 4 KiB blocks, no extra bytes."""
    results = run_ranks(2, _reshard_verify, str(tmp_path), False, engine=engine_name, timeout=120)
    for status, read, needed in results:
        assert status == "ok" and read <= 1.1 * needed + 8192, results
    # A flipped bit in the right half of the rows: rank 1 reads it and fails; DCP fails both.
    info = next(i for i in _storage_data(tmp_path).values() if i.offset >= 0)
    path = tmp_path / info.relative_path
    with open(path, "rb") as f:
        data = f.read()
    needle = torch.arange(4096, dtype=torch.float32)[:16]
    start = data.index(tensor_bytes(needle))
    _flip(path, start + 3000 * 4)
    results = run_ranks(2, _reshard_verify, str(tmp_path), True, engine=engine_name, timeout=120)
    assert all(r[0] == "error" and r[1] == "IntegrityError" and r[2] == [1] for r in results), results


# ------------------------------------------------------------------------------------- the sidecar


def _sidecar_doc(path) -> tuple[Path, dict]:
    side = Path(sidecar_file(path))
    return side, json.loads(side.read_bytes()[56:])


def _write_sidecar(side: Path, doc: dict, reseal: bool) -> None:
    """Replace the sidecar's body; with ``reseal`` its header's length and SHA-256 are fixed too."""
    raw = side.read_bytes()
    body = json.dumps(doc, separators=(",", ":")).encode()
    if reseal:
        import hashlib

        header = struct.pack("<8sIIQ32s", b"DCPNSIDE", 2, 0, len(body), hashlib.sha256(body).digest())
    else:
        header = raw[:56]
    side.write_bytes(header + body)


def _shift(doc: dict, by) -> None:
    for rows in doc["items"].values():
        for row in rows:
            row[2] = by(row[2])


SHIFTS = {
    "plus-8": lambda p: p + 8,
    "plus-64": lambda p: p + 64,
    "minus-64": lambda p: p - 64,
    "plus-4096": lambda p: p + 4096,
    "negative": lambda p: -(4 << 40),
    "huge": lambda p: 1 << 62,
}


@pytest.mark.parametrize("shift", list(SHIFTS))
@pytest.mark.parametrize("reseal", [False, True], ids=["damaged", "forged"])
def test_sidecar_offsets_never_give_wrong_values(engine_name, tmp_path, shift, reseal):
    sd = state(1.0)
    save(sd, tmp_path)
    side, doc = _sidecar_doc(tmp_path)
    _shift(doc, SHIFTS[shift])
    _write_sidecar(side, doc, reseal)
    # Sealed again (a forgery), plausible offsets are checked against the metadata and the
    # framing; anything else makes the sidecar damaged, and a damaged sidecar is ignored
    # (items are found from their headers) or, under verify=True, reported.
    forged = reseal and shift in ("plus-8", "plus-64", "minus-64")
    for verify in (False, True):
        if not forged and not verify:
            assert same(load(tmp_path, sd), sd)
            continue
        with pytest.raises(CheckpointException) as ei:
            load(tmp_path, sd, verify=verify)
        err = failure(ei)
        if forged:
            assert isinstance(err, dcp_native.CorruptCheckpointError), err
            assert "does not match" in str(err) and err.key in sd
        else:
            assert isinstance(err, dcp_native.IntegrityError), err
            assert "cannot be verified" in str(err) and "is damaged" in str(err)


@pytest.mark.parametrize("which", ["sidecar", "table"])
def test_random_bit_flips_in_files_dcp_native_adds(engine_name, tmp_path, which):
    """Any damage to the sidecar or a table: exact values without verify, IntegrityError with it."""
    sd = state(1.5)
    save(sd, tmp_path)
    pristine = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    target = Path(sidecar_file(tmp_path)) if which == "sidecar" else Path(data_file(tmp_path) + ".crc32c")
    for seed in range(12):
        for name, data in pristine.items():
            (tmp_path / name).write_bytes(data)
        _flip_bits(target, 1 + seed % 3, seed)
        assert same(load(tmp_path, sd), sd)
        with pytest.raises(CheckpointException) as ei:
            load(tmp_path, sd, verify=True)
        err = failure(ei)
        assert isinstance(err, dcp_native.IntegrityError), err
        assert "cannot be verified" in str(err)


def test_metadata_dtype_of_the_same_width_is_detected(engine_name, tmp_path):
    """.metadata edited to int32 where float32 was saved: the sidecar no longer matches it, the
    item headers are read and disagree with it."""
    sd = {"a": torch.randn(1000), "b": torch.randn(7)}
    save(sd, tmp_path)
    with open(tmp_path / ".metadata", "rb") as f:
        md = pickle.load(f)
    md.state_dict_metadata["a"].properties.dtype = torch.int32
    with open(tmp_path / ".metadata", "wb") as f:
        pickle.dump(md, f)
    out = {"a": torch.zeros(1000, dtype=torch.int32), "b": torch.zeros(7)}
    for verify in (False, True):
        with pytest.raises(CheckpointException) as ei:
            dcp.load(out, storage_reader=dcp_native.FileSystemReader(tmp_path, verify=verify),
                     no_dist=True)
        err = failure(ei)
        assert isinstance(err, dcp_native.CorruptCheckpointError)
        if not verify:
            assert err.key == "a" and "torch.int32" in str(err) and "torch.float32" in str(err)
        else:
            assert "other bytes of .metadata" in str(err)


def test_stock_overwrite_ignores_old_sidecar(engine_name, tmp_path):
    """A stock save over a dcp_native one leaves an old sidecar; it must be ignored."""
    save({"a": torch.arange(10.0), "b": torch.ones(4)}, tmp_path, checksums=None)
    old_sidecar = sidecar_file(tmp_path)
    new = {"a": torch.arange(10.0) * 2, "pad": torch.randn(1000), "b": torch.full((4,), 5.0)}
    dcp.save(new, storage_writer=dcp.FileSystemWriter(tmp_path), no_dist=True)
    assert os.path.exists(old_sidecar)
    assert same(load(tmp_path, new), new)


# -------------------------------------------------------- verify=True where nothing can be checked


def _flip_payload_bit(path) -> None:
    f = data_file(path)
    _flip(f, os.path.getsize(f) // 2, 0x08)


def _drop_sidecar(path) -> None:
    os.remove(sidecar_file(path))


def _damage_sidecar(path) -> None:
    _flip_bits(Path(sidecar_file(path)), 1, 3)


def _stale_sidecar(path) -> None:
    """Another save's (sealed, intact) sidecar under this save's name."""
    other = Path(path).parent / "other"
    save(state(9.0), other)
    Path(sidecar_file(path)).write_bytes(Path(sidecar_file(other)).read_bytes())


@pytest.mark.parametrize("spoil", [_drop_sidecar, _damage_sidecar, _stale_sidecar],
                         ids=["deleted", "damaged", "stale"])
def test_verify_never_passes_unverified_bytes(engine_name, tmp_path, spoil):
    sd = state(2.5)
    path = tmp_path / "ck"
    save(sd, path)
    spoil(path)
    _flip_payload_bit(path)
    with pytest.raises(CheckpointException) as ei:
        load(path, sd, verify=True)
    err = failure(ei)
    assert isinstance(err, dcp_native.IntegrityError)
    assert "cannot be verified" in str(err) and err.filename and err.key in sd


@pytest.mark.parametrize("writer", ["no-checksums", "stock"])
def test_verify_without_checksum_tables_raises(engine_name, tmp_path, writer):
    sd = state(3.0)
    if writer == "stock":
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp_path), no_dist=True)
    else:
        save(sd, tmp_path, checksums=False)
    assert same(load(tmp_path, sd), sd)
    with pytest.raises(CheckpointException) as ei:
        load(tmp_path, sd, verify=True)
    err = failure(ei)
    assert isinstance(err, dcp_native.IntegrityError)
    expected = "no checksum table" if writer == "no-checksums" else "written by stock DCP"
    assert "cannot be verified" in str(err) and expected in str(err), err
