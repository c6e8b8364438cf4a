"""CRC32C (Castagnoli) of buffers: the checksum of checkpoint data.

CRC-32C is the iSCSI/ext4/Btrfs checksum: polynomial 0x1EDC6F41, reflected,
initial value and final xor 0xFFFFFFFF. :func:`crc32c` uses the native module
when it imports (SSE4.2 or ARMv8 CRC instructions, tens of GB/s, or its
table-driven fallback on CPUs without them) and a pure-Python implementation
otherwise.

Example:
    >>> from dcp_native._crc32c import crc32c
    >>> hex(crc32c(b"123456789"))
    '0xe3069283'
    >>> crc32c(b"6789", crc32c(b"12345")) == crc32c(b"123456789")
    True

The pure-Python implementation avoids a Python-level loop per byte, which
would run at about 10 MB/s. A CRC is the remainder of the message, seen as a
polynomial over GF(2), modulo the CRC polynomial, and Python's big integers
can hold a whole piece of the message: the front half of the piece, A, times
x^k is congruent to A times (x^k mod P), a 32-bit constant. So the piece
shrinks by half with one carry-less multiplication of A by that constant:
a shift and an xor of the big integer per set bit of the constant, each a C
loop over the digits. Halving down to a few bytes and finishing with a table
runs at about 250 MB/s.
"""

from __future__ import annotations

import functools
import operator

from . import config

try:
    from ._C import crc32c as _native_crc32c
    from ._C import crc32c_impl as _native_impl
except ImportError:  # the extension is not built: the pure-Python implementation
    _native_crc32c = None
    _native_impl = None

def crc32c(data, crc: int = 0, portable: bool | None = None) -> int:
    """The CRC32C of ``data`` (any C-contiguous buffer), continuing ``crc``.

    ``crc`` is the CRC32C of the bytes before ``data`` (0 for none), so a
    checksum can be computed piece by piece. ``portable`` picks the native
    implementation (None: as DCP_NATIVE_CRC32C says, see :mod:`dcp_native.config`).

    Example:
        >>> crc32c(bytes(32)) == 0x8A9136AA
        True
    """
    if portable is None:
        portable = config.current().portable_crc32c
    if _native_crc32c is not None:
        return _native_crc32c(data, crc, portable)
    return _crc32c_python(data, crc)


def crc32c_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC32C of ``A + B`` from ``crc1`` (of ``A``), ``crc2`` (of ``B``) and ``len(B)``.

    Pieces of a message checksummed apart (on different threads, or before and
    after their memory is reused) combine without reading them again.

    Example:
        >>> a, b = b"12345", b"6789"
        >>> crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)
        True
    """
    if length2 < 0:
        raise ValueError(f"length2 must be non-negative, got {length2}")
    if not (0 <= crc1 <= 0xFFFFFFFF and 0 <= crc2 <= 0xFFFFFFFF):
        raise ValueError("crc1 and crc2 must be in [0, 2**32)")
    if length2 == 0:
        return crc1
    # The CRC is linear once the initial and final xors cancel: the CRC of
    # A followed by len(B) zero bytes is crc1 times x^(8 len(B)) mod P (the
    # 0xFFFFFFFF conditioning of B's start cancels against B's own), and
    # xoring in B's CRC adds B's bits.
    return _multiply(_x_pow_bytes(length2), crc1) ^ crc2


def implementation() -> str:
    """The implementation :func:`crc32c` uses now: ``"sse4.2+avx512-vpclmul"``, ``"sse4.2+pclmul"``,
    ``"sse4.2"``, ``"armv8"``, ``"portable"`` (native) or ``"python"``.

    Example:
        >>> implementation() in ("sse4.2+avx512-vpclmul", "sse4.2+pclmul", "sse4.2", "armv8",
        ...                      "portable", "python")
        True
    """
    portable = config.current().portable_crc32c
    return _native_impl(portable) if _native_impl is not None else "python"


# --------------------------------------------------------------------------- pure Python

_POLY = 0x82F63B78  # 0x1EDC6F41 bit-reversed: bit 31 holds x^0


def _byte_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _byte_table()


def _crc32c_python(data, crc: int = 0) -> int:
    """Pure-Python CRC32C (see the module docs); the reference for the native ones."""
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("data must be a C-contiguous buffer")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    crc = operator.index(crc)  # TypeError for non-integers, as the native one
    if not 0 <= crc <= 0xFFFFFFFF:
        raise ValueError(f"crc must be in [0, 2**32), got {crc!r}")
    state = crc ^ 0xFFFFFFFF
    n = len(view)
    pos = 0
    # Pieces of fixed sizes, so that their folding plans are computed once:
    # 64 KiB ones, then the binary digits of the rest down to _FOLD_MIN.
    while n - pos >= _FOLD_CHUNK:
        state = _fold(view[pos : pos + _FOLD_CHUNK], state)
        pos += _FOLD_CHUNK
    size = _FOLD_CHUNK >> 1
    while size >= _FOLD_MIN:
        if n - pos >= size:
            state = _fold(view[pos : pos + size], state)
            pos += size
        size >>= 1
    return _bytewise(view[pos:], state) ^ 0xFFFFFFFF


def _bytewise(data, state: int) -> int:
    """The raw CRC state after ``data``, a table lookup per byte."""
    table = _TABLE
    for byte in data:
        state = table[(state ^ byte) & 0xFF] ^ (state >> 8)
    return state


# Pieces shorter than this are faster through the table.
_FOLD_MIN = 256
_FOLD_CHUNK = 64 << 10
_plans: dict[int, tuple[list, int]] = {}


def _fold(piece: memoryview, state: int) -> int:
    """The raw CRC state after ``piece`` (at least 4 bytes), by halving (module docs).

    The message is a little-endian integer: bit i of it is the coefficient of
    x^(N-1-i) of the N-bit message polynomial M (the CRC is reflected). The
    initial state is xored into the first 32 bits, which is what a reflected
    CRC does with it. A step splits the integer into its low m bits A (the
    highest powers) and the rest B: M = A * x^(N-m) + B, congruent to
    A * c + B with c = x^(N-m) mod P; A * c has at most m + 31 bits and lands
    at the low-power end of B, i.e. its reflection goes to the top of B's
    integer: shifted left by N - 2m - 31.
    """
    number = int.from_bytes(piece, "little") ^ state
    plan = _plans.get(len(piece))
    if plan is None:
        plan = _plans[len(piece)] = _plan(8 * len(piece))
    steps, bits_left = plan
    for m, mask, shift, bits in steps:
        front = number & mask
        product = 0
        for bit in bits:
            product ^= front << bit
        number = (number >> m) ^ (product << shift)
    return _bytewise(number.to_bytes(bits_left // 8, "little"), 0)


def _plan(nbits: int) -> tuple[list, int]:
    """The folding steps ``(m, mask, shift, bits of c)`` for an ``nbits``-bit message.

    Each step may fold up to half the message (less 31 bits, a whole number of
    bytes so the rest ends in whole bytes); among the 32 largest such m it
    takes the one whose constant has the fewest set bits per bit removed,
    since each set bit costs a shift and an xor of the front.
    """
    steps = []
    n = nbits
    while True:
        top = (n - 31) // 2 // 8 * 8
        if top <= 0:
            return steps, n
        constant = _x_pow(n - top)
        best = None
        for k in range(32):
            m = top - 8 * k
            if m <= 0:
                break
            cost = (bin(constant).count("1") * m + 2 * n) / m
            if best is None or cost < best[0]:
                best = (cost, m, constant)
            # x^(n - m) for the next m, 8 bits smaller: one more byte of x^8.
            constant = (constant >> 8) ^ _TABLE[constant & 0xFF]
        _, m, constant = best
        bits = [j for j in range(32) if constant >> j & 1]
        steps.append((m, (1 << m) - 1, n - 2 * m - 31, bits))
        n -= m


def _multiply(a: int, b: int) -> int:
    """a * b mod P, both bit-reversed."""
    product = 0
    for i in range(32):
        if a & (0x80000000 >> i):
            product ^= b
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


@functools.lru_cache(maxsize=256)
def _x_pow_bytes(n: int) -> int:
    """x^(8 n) mod P, bit-reversed; cached, since pieces of a file mostly share a few lengths."""
    return _x_pow(8 * n)


def _x_pow(n: int) -> int:
    """x^n mod P, bit-reversed."""
    result, power = 0x80000000, 0x40000000  # x^0, x^1
    while n:
        if n & 1:
            result = _multiply(power, result)
        power = _multiply(power, power)
        n >>= 1
    return result
