"""CRC32C (dcp_native._crc32c and _C.crc32c): known vectors, streaming, and agreement of the
native hardware, native portable and pure-Python implementations."""

from __future__ import annotations

import functools
import platform
import random
import threading
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_native import _crc32c
from dcp_native._crc32c import _crc32c_python

ENV = "DCP_NATIVE_CRC32C"

# RFC 3720 (iSCSI) B.4, and the CRC catalogue's check value.
ISCSI_READ_PDU = bytes.fromhex(
    "01c00000000000000000000000000000"
    "14000000000004000000001400000018"
    "28000000000000000200000000000000"
)
VECTORS = {
    "check": (b"123456789", 0xE3069283),
    "zeros_32": (bytes(32), 0x8A9136AA),
    "ones_32": (b"\xff" * 32, 0x62A8AB43),
    "ascending_32": (bytes(range(32)), 0x46DD794E),
    "descending_32": (bytes(range(31, -1, -1)), 0x113FDB5C),
    "iscsi_read_pdu": (ISCSI_READ_PDU, 0xD9963A56),
    "empty": (b"", 0),
}

# Lengths around the hardware path's stream boundaries (3 x 256 and 3 x 8192
# bytes) and the pure-Python one's pieces (256 bytes, 64 KiB).
LENGTHS = (0, 1, 7, 8, 9, 255, 256, 257, 767, 768, 769, 4096, 24575, 24576, 24577,
           65535, 65536, 65537, 2 * 24576 + 7, (1 << 20) + 3)


def native():
    return pytest.importorskip("dcp_native._C")


@pytest.fixture(params=["native", "instruction", "fold128", "fold512", "portable", "python"])
def crc(request, monkeypatch):
    """One implementation as crc(data, crc=0), selected as DCP_NATIVE_CRC32C selects it, or one
    hardware variant by name (the CPU's fastest takes only some lengths; each is checked on all)."""
    if request.param == "python":
        return _crc32c_python
    _C = native()
    if request.param in ("instruction", "fold128", "fold512"):
        if _C._crc32c_variant(request.param, b"") is None:
            pytest.skip(f"this CPU lacks {request.param}")
        return functools.partial(_C._crc32c_variant, request.param)
    monkeypatch.setenv(ENV, "auto" if request.param == "native" else "portable")
    expected = "portable" if request.param == "portable" else _C.crc32c_impl()
    assert _crc32c.implementation() == expected
    return _crc32c.crc32c


def data(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


@pytest.mark.parametrize("name", VECTORS)
def test_known_vectors(crc, name):
    message, expected = VECTORS[name]
    assert crc(message) == expected


@pytest.mark.parametrize("length", LENGTHS)
def test_implementations_agree_on_boundaries(crc, length):
    message = data(length, length)
    assert crc(message) == _crc32c_python(message)
    assert crc(message, 0x12345678) == _crc32c_python(message, 0x12345678)


def test_streaming(crc):
    message = data(3000, 1)
    whole = crc(message)
    for cut in list(range(0, 40)) + [767, 768, 1500, 2999, 3000]:
        assert crc(message[cut:], crc(message[:cut])) == whole
    # Many pieces, of every small size.
    value, pos, size = 0, 0, 0
    while pos < len(message):
        value = crc(message[pos : pos + size], value)
        pos += size
        size += 1
    assert value == whole


def test_empty_continues_crc(crc):
    assert crc(b"", 0xDEADBEEF) == 0xDEADBEEF


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "array_I", "array_d"])
def test_buffer_types(crc, kind):
    raw = data(64, 2)
    buffer = {
        "bytes": raw,
        "bytearray": bytearray(raw),
        "memoryview": memoryview(raw),
        "array_I": array("I", raw),
        "array_d": memoryview(array("d", raw)),
    }[kind]
    assert crc(buffer) == _crc32c_python(raw)


def test_non_contiguous_buffer(crc):
    with pytest.raises(ValueError):
        crc(memoryview(bytearray(16))[::2])


@pytest.mark.parametrize("bad", [-1, 1 << 32, 1 << 70])
def test_crc_out_of_range(crc, bad):
    with pytest.raises(ValueError):
        crc(b"abc", bad)


def test_crc_not_an_integer(crc):
    with pytest.raises(TypeError):
        crc(b"abc", 1.0)


@settings(max_examples=150, deadline=None)
@given(
    length=st.integers(0, 70_000) | st.integers(0, 1_000),
    offset=st.integers(0, 15),
    seed=st.integers(0, 1 << 32),
    initial=st.integers(0, 0xFFFFFFFF) | st.just(0),
)
def test_native_portable_python_agree(length, offset, seed, initial):
    """Random lengths at odd alignments (the offset shifts the buffer's address)."""
    _C = native()
    buffer = memoryview(data(length + offset, seed))[offset:]
    expected = _crc32c_python(buffer, initial)
    assert _C.crc32c(buffer, initial) == expected
    assert _C.crc32c(buffer, initial, True) == expected


def test_hardware_used_where_available():
    """The dispatch picks the CPU's CRC instructions when it has them."""
    _C = native()
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    words = set(cpuinfo.replace(":", " ").split())
    machine = platform.machine()
    if machine == "x86_64" and "sse4_2" in words:
        wide = {"pclmulqdq", "avx512f", "avx512vl", "vpclmulqdq"} <= words
        assert _C.crc32c_impl() == ("sse4.2+avx512-vpclmul" if wide else
                                    "sse4.2+pclmul" if "pclmulqdq" in words else "sse4.2")
    elif machine == "aarch64" and "crc32" in words:
        assert _C.crc32c_impl() == "armv8"
    else:
        assert _C.crc32c_impl() == "portable"


def test_module_uses_native(monkeypatch):
    _C = native()
    monkeypatch.delenv(ENV, raising=False)
    assert _crc32c.implementation() == _C.crc32c_impl()
    monkeypatch.setenv(ENV, "portable")
    assert _crc32c.implementation() == "portable"
    assert _crc32c.crc32c(b"123456789") == 0xE3069283


def test_module_falls_back_to_python(monkeypatch):
    monkeypatch.setattr(_crc32c, "_native_crc32c", None)
    monkeypatch.setattr(_crc32c, "_native_impl", None)
    assert _crc32c.implementation() == "python"
    assert _crc32c.crc32c(b"123456789") == 0xE3069283
    assert _crc32c.crc32c(b"6789", _crc32c.crc32c(b"12345")) == 0xE3069283


@pytest.mark.parametrize("value", ["sse4.2", "python", "Portable", " auto"])
def test_bad_env_value(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=ENV):
        _crc32c.crc32c(b"x")
    with pytest.raises(ValueError, match=ENV):
        _crc32c.implementation()
    monkeypatch.setattr(_crc32c, "_native_crc32c", None)
    monkeypatch.setattr(_crc32c, "_native_impl", None)
    with pytest.raises(ValueError, match=ENV):
        _crc32c.crc32c(b"x")


def test_threads_share_the_native_function():
    """Large buffers release the GIL; concurrent calls still get their own results."""
    _C = native()
    buffers = [data(200_000 + i, i) for i in range(4)]
    expected = [_C.crc32c(b) for b in buffers]
    results: list = [None] * 4

    def run(i: int) -> None:
        results[i] = [_C.crc32c(buffers[i]) for _ in range(20)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [[e] * 20 for e in expected]


@given(
    a=st.binary(max_size=300),
    b=st.binary(max_size=300),
    zeros=st.sampled_from([0, 1, 4095, 4096, 1 << 20]),
)
@settings(max_examples=60, deadline=None)
def test_combine_equals_crc_of_concatenation(a, b, zeros):
    second = b + bytes(zeros)
    combined = _crc32c.crc32c_combine(_crc32c.crc32c(a), _crc32c.crc32c(second), len(second))
    assert combined == _crc32c_python(a + second)


def test_combine_edge_cases():
    crc = _crc32c.crc32c(b"abc")
    assert _crc32c.crc32c_combine(crc, 0, 0) == crc
    assert _crc32c.crc32c_combine(0, crc, 3) == crc  # an empty first part
    with pytest.raises(ValueError):
        _crc32c.crc32c_combine(crc, crc, -1)
    with pytest.raises(ValueError):
        _crc32c.crc32c_combine(1 << 32, crc, 3)
