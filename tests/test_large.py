"""Data files with items past 4 GiB, and a storage over 4 GiB (ZIP64 framing), in both directions."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcp_native

pytestmark = pytest.mark.slow

BIG = (4 << 30) + 3 * 4096 + 5  # bytes: a ZIP64 storage; everything after it lies past 4 GiB


def _state():
    big = torch.empty(BIG, dtype=torch.uint8)
    # Mark a few places (the rest is whatever the allocator gives: compared bit-exactly).
    big[:4096] = 7
    big[(2 << 30) : (2 << 30) + 100] = 9
    big[-4096:] = 11
    return {
        "big": big,
        "after": torch.arange(1000, dtype=torch.float32),
        "after_bf16": torch.linspace(-3, 3, 5000).to(torch.bfloat16),
        "note": "past four gibibytes",
    }


@pytest.fixture(scope="module")
def state():
    return _state()


def _offsets(path):
    with open(path / ".metadata", "rb") as f:
        md = pickle.load(f)
    return {idx.fqn: info.offset for idx, info in md.storage_data.items()}


def _load_small(reader):
    out = {"after": torch.zeros(1000), "after_bf16": torch.zeros(5000, dtype=torch.bfloat16), "note": ""}
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


@pytest.mark.parametrize("writer", ["native", "stock"])
def test_items_past_4_gib(engine_name, tmp_path, state, writer):
    if writer == "native":
        w = dcp_native.FileSystemWriter(tmp_path, sync_files=False)
    else:
        if engine_name == "python":
            pytest.skip("the stock writer does not depend on the engine; covered once")
        w = dcp.FileSystemWriter(tmp_path, sync_files=False)
    dcp.save(state, storage_writer=w, no_dist=True)
    offsets = _offsets(tmp_path)
    assert offsets["after"] > 1 << 32 and offsets["after_bf16"] > 1 << 32

    # Small items past 4 GiB, with both readers.
    for reader in (dcp_native.FileSystemReader(tmp_path), dcp.FileSystemReader(tmp_path)):
        out = _load_small(reader)
        assert torch.equal(out["after"], state["after"])
        assert torch.equal(out["after_bf16"], state["after_bf16"])
        assert out["note"] == "past four gibibytes"

    # The ZIP64 storage itself, with dcp_native; and once with stock's reader
    # (torch.load decodes the ZIP64 framing we generate).
    readers = [dcp_native.FileSystemReader(tmp_path)]
    if writer == "native" and engine_name == "native":
        readers.append(dcp.FileSystemReader(tmp_path))
    for reader in readers:
        dest = {"big": torch.zeros(BIG, dtype=torch.uint8)}
        dcp.load(dest, storage_reader=reader, no_dist=True)
        assert torch.equal(dest["big"], state["big"])
        del dest
    for f in tmp_path.iterdir():
        f.unlink()

