"""Every ``DCP_NATIVE_*`` setting, read and validated in one place.

Nothing else in dcp_native reads the environment: an engine call, a commit or
a checksum asks :func:`current` once and passes the values down (to the C++
side as arguments; ``csrc/`` never calls ``getenv``). The environment is read
at each such use, so tests can change a variable with monkeypatch between
calls; parsing is cached per distinct set of values. A malformed value
raises ``ValueError`` naming the variable.

=============================  ==============================================
``DCP_NATIVE_BACKEND``         ``auto`` (default), ``native`` or ``python``: the engine
                               (see :mod:`dcp_native._backend`).
``DCP_NATIVE_CRC32C``          ``auto`` (default: the fastest) or ``portable``
                               (table-driven): the native CRC32C implementation.
``DCP_NATIVE_CUDART``          A CUDA runtime library to use instead of the one torch
                               loaded (tests point it at a fake runtime).
``DCP_NATIVE_FAULT``           ``op:errno:nth[,...]``: fail the nth system call of
                               ``op`` (see "Testing hooks" in :mod:`dcp_native.engine`).
``DCP_NATIVE_TEST_SHORT_IO``   N > 0: every read and write moves at most N bytes.
``DCP_NATIVE_TEST_NO_DIRECT``  ``open`` or ``transfer``: O_DIRECT fails at that step, as
                               on filesystems without it.
=============================  ==============================================
"""

from __future__ import annotations

import dataclasses
import errno
import os
import threading
from array import array
from typing import Mapping

BACKEND_ENV = "DCP_NATIVE_BACKEND"
CRC32C_ENV = "DCP_NATIVE_CRC32C"
CUDART_ENV = "DCP_NATIVE_CUDART"
FAULT_ENV = "DCP_NATIVE_FAULT"
SHORT_IO_ENV = "DCP_NATIVE_TEST_SHORT_IO"
NO_DIRECT_ENV = "DCP_NATIVE_TEST_NO_DIRECT"
_NAMES = (BACKEND_ENV, CRC32C_ENV, CUDART_ENV, FAULT_ENV, SHORT_IO_ENV, NO_DIRECT_ENV)

BACKENDS = ("auto", "native", "python")
#: The operations DCP_NATIVE_FAULT can fail; a fault triple names one by index.
FAULT_OPS = ("open", "read", "write", "fsync", "close", "rename")
#: DCP_NATIVE_TEST_NO_DIRECT values, by the index the native engine takes.
NO_DIRECT_MODES = ("", "open", "transfer")
#: Linux errno values are below 4096 (MAX_ERRNO).
_MAX_ERRNO = 4095
_INT64_MAX = (1 << 63) - 1


@dataclasses.dataclass(frozen=True)
class Config:
    backend: str = "auto"
    #: True: the portable (table-driven) CRC32C instead of the fastest.
    portable_crc32c: bool = False
    #: The CUDA runtime library to load ("" for the one torch loaded).
    cudart: str = ""
    #: DCP_NATIVE_FAULT as flat ``(op, errno, nth)`` triples, ``op`` an index into FAULT_OPS.
    faults: tuple[int, ...] = ()
    #: Most bytes one system call moves (0: no limit).
    short_io: int = 0
    #: Index into NO_DIRECT_MODES.
    no_direct: int = 0

    def fault_triples(self) -> array:
        return array("q", self.faults)

    def native(self) -> tuple:
        """What the native engine's calls take (see csrc/bindings.cpp)."""
        return (self.fault_triples(), self.short_io, self.portable_crc32c, self.no_direct)


_lock = threading.Lock()
_cache: dict[tuple[str, ...], Config] = {}


def current(environ: Mapping[str, str] | None = None) -> Config:
    """The settings the environment holds now (``environ``: another mapping, for tests)."""
    env = os.environ if environ is None else environ
    raw = tuple(env.get(name, "") for name in _NAMES)
    with _lock:
        found = _cache.get(raw)
    if found is not None:
        return found
    backend, crc, cudart, fault, short_io, no_direct = raw
    backend = parse_backend(backend)
    if crc not in ("", "auto", "portable"):
        raise ValueError(f"{CRC32C_ENV}={crc} is not one of auto, portable")
    faults = _parse_faults(fault)
    # Digits only: int() would also take signs, spaces and "_".
    if short_io and (not _is_digits(short_io) or int(short_io) > _INT64_MAX):
        raise ValueError(f"{SHORT_IO_ENV}={short_io} is not a non-negative integer")
    if no_direct not in NO_DIRECT_MODES:
        raise ValueError(f"{NO_DIRECT_ENV}={no_direct} is not one of open, transfer")
    config = Config(backend, crc == "portable", cudart, faults, int(short_io or 0),
                    NO_DIRECT_MODES.index(no_direct))
    with _lock:
        if len(_cache) > 64:  # tests try many values; keep the cache small
            _cache.clear()
        _cache[raw] = config
    return config


def backend() -> str:
    """DCP_NATIVE_BACKEND alone (choosing the engine does not depend on the test hooks)."""
    return parse_backend(os.environ.get(BACKEND_ENV, ""))


def parse_backend(value: str) -> str:
    value = value.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def _parse_faults(value: str) -> tuple[int, ...]:
    triples: list[int] = []
    seen = set()
    for item in value.split(",") if value else ():
        parts = item.split(":")
        spec = _parse_fault(parts) if len(parts) == 3 else None
        if spec is None:
            raise ValueError(
                f"{FAULT_ENV}={value!r}: {item!r} is not op:errno:nth (op one of "
                f"{', '.join(FAULT_OPS)}; errno a name such as ENOSPC or a number in "
                f"[1, {_MAX_ERRNO}]; nth a positive integer)"
            )
        if (spec[0], spec[2]) in seen:
            raise ValueError(f"{FAULT_ENV}={value!r}: {item!r} fails a call another item fails")
        seen.add((spec[0], spec[2]))
        triples.extend(spec)
    return tuple(triples)


def _parse_fault(parts: list[str]) -> tuple[int, int, int] | None:
    op, name, nth = parts
    if op not in FAULT_OPS or not _is_digits(nth) or int(nth) < 1 or int(nth) >= 1 << 63:
        return None
    if _is_digits(name):
        number = int(name)
    elif name.startswith("E") and isinstance(getattr(errno, name, None), int):
        number = getattr(errno, name)
    else:
        return None
    if not 1 <= number <= _MAX_ERRNO:
        return None
    return FAULT_OPS.index(op), number, int(nth)


def _is_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()
