"""The dtype table shared by the format and interop tests: every dtype torch can save."""

from __future__ import annotations

import ctypes

import torch

_CANDIDATES = [
    "float64", "float32", "float16", "bfloat16",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "int64", "int32", "int16", "int8",
    "uint64", "uint32", "uint16", "uint8",
    "bool",
    "complex128", "complex64", "complex32",
    "bits8", "bits16",
]

DTYPES = [getattr(torch, name) for name in _CANDIDATES if hasattr(torch, name)]
#: DCP's own planning cannot size the bits* dtypes (torch._utils._element_size fails),
#: so checkpoints of them cannot exist; the item format still handles them.
DCP_DTYPES = [d for d in DTYPES if not str(d).startswith("torch.bits")]


def make_tensor(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    """Deterministic values of any dtype, built from random bytes (covers every bit pattern)."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for s in shape:
        numel *= s
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return (raw % 2).to(torch.bool).reshape(shape)
    return raw.view(dtype).reshape(shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, to compare values exactly whatever the dtype (NaNs included)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.view(torch.uint8)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's bytes as Python bytes (without needing numpy)."""
    b = bits(t)
    return ctypes.string_at(b.data_ptr(), b.numel()) if b.numel() else b""


def blank_like(t: torch.Tensor) -> torch.Tensor:
    """A zero-filled tensor like ``t``, for any dtype (some have no fill kernel)."""
    out = torch.empty(t.shape, dtype=t.dtype)
    if out.numel():
        out.reshape(-1).view(torch.uint8).zero_()
    return out
