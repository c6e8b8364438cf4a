"""The workloads' state dicts: seeded, position-dependent data that every load checks.

Three kinds of state dict (``spec["data"]["kind"]``):

* ``uniform``: ``count`` fp32 tensors of ``numel`` elements (the core issue's cases),
  1-D, or of ``shape`` (``numel`` elements) when given.
* ``model``: a transformer-like model in bf16 with its AdamW state in fp32, plus
  the non-tensor entries a trainer saves (optimizer hyper-parameters, step,
  config): tensors from 4 bytes (AdamW's 0-d ``step``) to tens of MiB
  (embedding and LM head, and their moments). Sized from ``size`` by the
  number of layers (and the width, for small sizes).
* ``many``: optimizer state of many small parameters (``count`` tensors: a bf16
  parameter, ``exp_avg``, ``exp_avg_sq`` and a 0-d ``step`` for each of
  ``count / 4`` parameters of log-uniform size between 1 and 8192 elements).

Every tensor's bytes are a pattern of (seed, tensor index, position): an int32
``arange`` from an offset of (seed, index) over the tensor's bytes (a uint8 one
when its size is not a multiple of 4). Loads compare every byte; objects are
compared with ``==``. Nothing here times anything.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import torch

#: Elements compared per step when checking a loaded tensor (a reused buffer of 4 MiB).
_CHECK_CHUNK = 1 << 20


def pattern_offset(seed: int, index: int) -> int:
    # Different per tensor and per seed, small enough that offset + numel < 2**31.
    return (seed * 7919 + index * 1_000_003) % (1 << 20)


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """A flat int32 (or uint8, when the byte count is not a multiple of 4) view of a contiguous tensor."""
    flat = t.reshape(-1).view(torch.uint8)
    return flat.view(torch.int32) if flat.numel() % 4 == 0 else flat


def fill_pattern(t: torch.Tensor, seed: int, index: int) -> None:
    v = bits_view(t)
    off = pattern_offset(seed, index)
    if v.dtype == torch.int32:
        torch.arange(off, off + v.numel(), dtype=torch.int32, out=v)
    else:
        v.copy_(torch.arange(off, off + v.numel(), dtype=torch.int64, device=v.device).remainder_(256).to(torch.uint8))


def fill_garbage(t: torch.Tensor) -> None:
    """Touch every page; all-ones bits, which a correct load overwrites everywhere."""
    t.reshape(-1).view(torch.uint8).fill_(0xFF)


def expected_bytes(t: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """The pattern ``t`` holds when saved, as a CPU uint8 tensor (for checks of raw reads)."""
    want = torch.empty(t.shape, dtype=t.dtype)
    fill_pattern(want, seed, index)
    return want.reshape(-1).view(torch.uint8)


def check_pattern(t: torch.Tensor, seed: int, index: int, what: str, first: int = 0) -> None:
    """Compare every byte of ``t`` with its pattern, a few MiB at a time (no full-size temporary).

    ``first``: the pattern element ``t`` starts at (a shard of the saved tensor: its first row
    times the row's elements).
    """
    got = bits_view(t)
    off = pattern_offset(seed, index) + first
    n = got.numel()
    if got.dtype != torch.int32:
        want = torch.arange(off, off + n, dtype=torch.int64, device=got.device).remainder_(256).to(torch.uint8)
        if not torch.equal(got, want):
            _report_mismatch(got, want, 0, what, n)
        return
    buf = torch.empty(min(n, _CHECK_CHUNK), dtype=torch.int32, device=got.device)
    for start in range(0, n, _CHECK_CHUNK):
        stop = min(n, start + _CHECK_CHUNK)
        want = buf[: stop - start]
        torch.arange(off + start, off + stop, dtype=torch.int32, out=want)
        if not torch.equal(got[start:stop], want):
            _report_mismatch(got[start:stop], want, start, what, n)


def _report_mismatch(got: torch.Tensor, want: torch.Tensor, base: int, what: str, n: int) -> None:
    bad = (got != want).nonzero()
    i = int(bad[0])
    raise AssertionError(
        f"loaded values differ from what was saved: {what}, {len(bad)} wrong elements in "
        f"[{base}, {base + got.numel()}) of {n}, first at flat index {base + i}: got bits "
        f"{int(got[i]):#x}, want {int(want[i]):#x}"
    )


@dataclasses.dataclass
class Workload:
    """A state dict and what it must hold after a load."""

    state_dict: dict[str, Any]
    #: (flattened DCP key, tensor, pattern index) for every tensor, in pattern order.
    tensors: list[tuple[str, torch.Tensor, int]]
    #: flattened DCP key -> expected value, for every non-tensor leaf.
    objects: dict[str, Any]
    seed: int

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for _, t, _ in self.tensors)

    def check(self) -> None:
        for key, t, index in self.tensors:
            check_pattern(t, self.seed, index, f"tensor {key!r}")
        for key, want in self.objects.items():
            got = _get_flat(self.state_dict, key)
            if got != want:
                raise AssertionError(f"loaded object {key!r} is {got!r}, saved {want!r}")


def _get_flat(sd: Any, key: str) -> Any:
    for part in key.split("."):
        sd = sd[int(part)] if isinstance(sd, list) else sd[part]
    return sd


# ----------------------------------------------------------------------------- shapes


def model_shape(size: int) -> dict[str, int]:
    """Width, vocabulary and layer count of the model whose weights + AdamW state are about ``size`` bytes.

    bf16 weights (2 B) + fp32 exp_avg and exp_avg_sq (8 B) = 10 B per parameter;
    a layer has 12 d^2 + 13 d parameters, embedding + LM head + final norm 2 V d + 2 d.
    """
    for d in (1024, 512, 256, 128, 64, 32):
        vocab = 16 * d
        fixed = 10 * (2 * vocab * d + 2 * d)
        per_layer = 10 * (12 * d * d + 13 * d)
        if fixed + per_layer <= size or d == 32:
            break
    layers = max(1, round((size - fixed) / per_layer))
    return {"d_model": d, "vocab": vocab, "layers": layers}


def model_params(shape: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    d, vocab = shape["d_model"], shape["vocab"]
    params: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (vocab, d))]
    for i in range(shape["layers"]):
        p = f"layers.{i}"
        params.append((f"{p}.attn_norm.weight", (d,)))
        params.append((f"{p}.attn_norm.bias", (d,)))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            params.append((f"{p}.attn.{proj}.weight", (d, d)))
            params.append((f"{p}.attn.{proj}.bias", (d,)))
        params.append((f"{p}.mlp_norm.weight", (d,)))
        params.append((f"{p}.mlp_norm.bias", (d,)))
        params.append((f"{p}.mlp.up_proj.weight", (4 * d, d)))
        params.append((f"{p}.mlp.up_proj.bias", (4 * d,)))
        params.append((f"{p}.mlp.down_proj.weight", (d, 4 * d)))
        params.append((f"{p}.mlp.down_proj.bias", (d,)))
    params.append(("norm.weight", (d,)))
    params.append(("norm.bias", (d,)))
    params.append(("lm_head.weight", (vocab, d)))
    return params


def many_params(count: int, seed: int) -> list[tuple[str, tuple[int, ...]]]:
    rng = random.Random(seed)
    return [(f"p{i:05d}", (int(2 ** rng.uniform(0, 13)),)) for i in range(max(1, count // 4))]


# ----------------------------------------------------------------------------- builders


class _Builder:
    def __init__(self, seed: int, device: str, fill: bool) -> None:
        self.seed, self.device, self.fill = seed, device, fill
        self.tensors: list[tuple[str, torch.Tensor, int]] = []

    def tensor(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device: str | None = None) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=device or self.device)
        index = len(self.tensors)
        if self.fill:
            fill_pattern(t, self.seed, index)
        else:
            fill_garbage(t)
        self.tensors.append((key, t, index))
        return t


def _optimizer_state(b: _Builder, params: list[tuple[str, tuple[int, ...]]]) -> dict[str, Any]:
    model: dict[str, Any] = {}
    state: dict[str, Any] = {}
    for name, shape in params:
        model[name] = b.tensor(f"model.{name}", shape, torch.bfloat16)
    for name, shape in params:
        # AdamW keeps a 0-d fp32 step per parameter, on the CPU unless capturable/fused.
        state[name] = {
            "step": b.tensor(f"optim.state.{name}.step", (), torch.float32, device="cpu"),
            "exp_avg": b.tensor(f"optim.state.{name}.exp_avg", shape, torch.float32),
            "exp_avg_sq": b.tensor(f"optim.state.{name}.exp_avg_sq", shape, torch.float32),
        }
    return {"model": model, "optim": {"state": state}}


def _blank(value: Any) -> Any:
    """The same structure with every leaf DCP saves as an object replaced by None."""
    if isinstance(value, dict):
        return {k: _blank(v) for k, v in value.items()}
    if isinstance(value, list) and any(isinstance(v, (dict, list, torch.Tensor)) for v in value):
        return [_blank(v) for v in value]
    return None


def _flat_objects(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat_objects(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list) and any(isinstance(v, (dict, list, torch.Tensor)) for v in value):
        for i, v in enumerate(value):
            _flat_objects(v, f"{prefix}.{i}", out)
    else:
        out[prefix] = value


def _meta(kind: str, shape: dict[str, int], names: list[str], seed: int) -> dict[str, Any]:
    """The non-tensor entries: optimizer hyper-parameters, step, token count, config."""
    step = 1200 + seed
    group = {
        "lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
        "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
        "fused": None, "params": list(names),
    }
    train = {"step": step, "tokens_seen": step * 524288,
             "config": dict(shape, name=f"synthetic-{kind}", dtype="bfloat16", optimizer="AdamW")}
    return {"optim": {"param_groups": [group]}, "train": train}


def _params(data: dict[str, Any], seed: int) -> tuple[dict[str, int], list[tuple[str, tuple[int, ...]]]]:
    if data["kind"] == "model":
        shape = model_shape(data["size"])
        return shape, model_params(shape)
    return {"parameters": max(1, data["count"] // 4)}, many_params(data["count"], seed)


def build(data: dict[str, Any], seed: int, device: str = "cpu", fill: bool = True) -> Workload:
    """The state dict of a workload: filled with its pattern (save) or with garbage (load destination)."""
    b = _Builder(seed, device, fill)
    kind = data["kind"]
    objects: dict[str, Any] = {}
    if kind == "uniform":
        sd: dict[str, Any] = {}
        for i in range(data["count"]):
            key = f"{data['prefix']}.{i:05d}"
            sd[key] = b.tensor(key, tuple(data.get("shape") or (data["numel"],)), torch.float32)
    elif kind in ("model", "many"):
        shape, params = _params(data, seed)
        sd = _optimizer_state(b, params)
        meta = _meta(kind, shape, [n for n, _ in params], seed)
        _flat_objects(meta, "", objects)
        if not fill:
            meta = _blank(meta)
        sd["optim"]["param_groups"] = meta["optim"]["param_groups"]
        sd["train"] = meta["train"]
        if kind == "model":
            # The host RNG state as a trainer saves it: an odd-sized uint8 tensor.
            sd["train"]["rng_state"] = b.tensor("train.rng_state", (5056,), torch.uint8, device="cpu")
    else:
        raise ValueError(f"unknown data kind {kind!r}")
    return Workload(sd, b.tensors, objects, seed)


def describe(data: dict[str, Any], seed: int) -> dict[str, Any]:
    """Counts and sizes of a workload without allocating it (for titles and the JSON)."""
    kind = data["kind"]
    if kind == "uniform":
        n = data["count"] * data["numel"] * 4
        return {"tensors": data["count"], "tensor_bytes": n, "objects": 0,
                "smallest": data["numel"] * 4, "largest": data["numel"] * 4, "dtypes": ["float32"]}
    shape, params = _params(data, seed)
    sizes = []
    for _, s in params:
        numel = math.prod(s)
        sizes += [2 * numel, 4, 4 * numel, 4 * numel]
    if kind == "model":
        sizes.append(5056)
    objects: dict[str, Any] = {}
    _flat_objects(_meta(kind, shape, [n for n, _ in params], seed), "", objects)
    return {"tensors": len(sizes), "tensor_bytes": sum(sizes), "objects": len(objects),
            "smallest": min(sizes), "largest": max(sizes),
            "dtypes": ["bfloat16", "float32"] + (["uint8"] if kind == "model" else []), "shape": shape}
