"""Targets, the markdown tables and the chart of a run (no torch)."""

from __future__ import annotations

import math
import os
from typing import Any

SYSTEM_LABELS = {
    "stock": "stock DCP",
    "python": "dcp_native python",
    "native": "dcp_native native",
    "native_nocrc": "dcp_native native, checksums off",
    "native_crc": "dcp_native native, checksums on",
    "python_crc": "dcp_native python, checksums on",
    "python_nocrc": "dcp_native python, checksums off",
    "stock_cached": "stock DCP + its plan cache",
    "native_stock_cached": "dcp_native native + stock's plan cache",
    "python_cached": "dcp_native python + caching planners",
    "native_cached": "dcp_native native + caching planners",
    "native_coop": "dcp_native native, cooperative",
    "stock_pinned": "stock DCP, DefaultStager (pinned)",
    "python_on_stock_ckpt": "dcp_native python, stock-written ckpt",
    "native_on_stock_ckpt": "dcp_native native, stock-written ckpt",
    "noio": "DCP floor (no-I/O storage)",
    "raw": "raw pread/pwrite",
    "raw_direct": "raw pread, O_DIRECT",
    "torch_pinned": "torch pinned copy",
    "torch_pinned_d2h": "torch pinned D2H copy (no file)",
    "torch_pinned_h2d": "torch pinned H2D copy (no file)",
}

#: Case order in the tables and the chart; cases not listed follow in run order.
CASE_ORDER = ("model_save", "model_load", "model_load_cold", "many_save", "many_load", "load", "peak",
              "small_save", "small_load", "small_save_longlived", "small_load_longlived", "repeat_save",
              "repeat_load", "save_nosync", "save_sync", "reshard", "reshard_3", "cooperative_replicated_cold",
              "cooperative_replicated_warm", "cooperative_hsdp_cold", "cooperative_hsdp_warm", "async", "stage")

#: The save thread sweep's ratios (numerator, denominator): GB/s medians of the same case.
SWEEP_RATIOS = (
    ("native_crc", "native_nocrc"),
    ("native_crc", "python_crc"),
    ("native_crc", "python_nocrc"),
    ("python_crc", "python_nocrc"),
    ("native_crc", "raw"),
    ("native_nocrc", "raw"),
    ("python_nocrc", "raw"),
    ("native_crc", "stock"),
)

#: The system each case's "% of" column refers to.
def reference_of(key: str, case: dict) -> str:
    return "torch_pinned" if case.get("workload") == "stage" else "raw"


def ordered_cases(cases: dict) -> list[str]:
    keys = [k for k in CASE_ORDER if k in cases]
    sweep = sorted((k for k in cases if k not in keys and "_t" in k), key=lambda k: (k.split("_t")[0], int(k.split("_t")[-1])))
    return keys + [k for k in cases if k not in keys and k not in sweep] + sweep


def is_sweep(key: str) -> bool:
    return key.startswith(("model_save_t", "model_load_t")) or is_savesweep(key)


def is_savesweep(key: str) -> bool:
    return key.startswith("savesweep_")


def sweep_ratios(case: dict) -> dict[str, float]:
    """The save sweep's ratios of one case (thread count, sync): ``"a/b"`` -> GB/s(a) / GB/s(b)."""
    out = {}
    for a, b in SWEEP_RATIOS:
        r = _ratio(case, a, b)
        if r is not None:
            out[f"{a}/{b}"] = r
    return out


def savesweep_points(cases: dict, sync: bool) -> dict[int, dict]:
    """threads -> case of the save sweep with sync_files ``sync``."""
    tag = "sync" if sync else "nosync"
    return {c["threads"]: c for k, c in cases.items() if k.startswith(f"savesweep_{tag}_t")}


# ----------------------------------------------------------------------------- targets


def _med(cases: dict, case: str, system: str, field: str) -> float | None:
    try:
        return cases[case]["systems"][system][field]["median"]
    except KeyError:
        return None


def evaluate_targets(cases: dict) -> list[dict]:
    """The core issue's targets, and the GPU / async-save issues' where their figures exist."""
    out: list[dict] = []

    def add(name: str, value: float | None, op: str, limit: float | None, unit: str, source: str = "core") -> None:
        """``op`` "info": a figure shown for contrast, with no requirement (``met`` None)."""
        if value is None:
            return
        ok = None if op == "info" else value >= limit if op == ">=" else value <= limit
        out.append({"target": name, "value": value, "op": op, "limit": limit, "unit": unit, "met": ok,
                    "source": source})

    def ratio_tp(case, a, b):
        x, y = _med(cases, case, a, "gbps"), _med(cases, case, b, "gbps")
        return None if x is None or y is None else x / y

    def ratio_time(case, a, b, field="seconds"):  # speed-up of a over b
        x, y = _med(cases, case, a, field), _med(cases, case, b, field)
        return None if x is None or y is None else y / x

    add("load: native vs stock", ratio_tp("load", "native", "stock"), ">=", 5.0, "x")
    add("load: native vs raw", ratio_tp("load", "native", "raw"), ">=", 0.70, "of raw")
    add("load: python vs stock", ratio_tp("load", "python", "stock"), ">=", 1.0, "x")
    for e in ("python", "native"):
        add(f"small save: {e} vs stock", ratio_time("small_save", e, "stock"), ">=", 3.0 if e == "native" else 1.0, "x")
        add(f"small load: {e} vs stock", ratio_time("small_load", e, "stock"), ">=", 3.0 if e == "native" else 1.0, "x")
    add("save sync off: native vs stock", ratio_tp("save_nosync", "native", "stock"), ">=", 1.3, "x")
    add("save sync off: native (checksums off) vs stock", ratio_tp("save_nosync", "native_nocrc", "stock"), ">=", 1.3,
        "x")
    add("save sync off: python vs stock", ratio_tp("save_nosync", "python", "stock"), ">=", 1.0, "x")
    add("save sync on: native vs raw", ratio_tp("save_sync", "native", "raw"), ">=", 0.90, "of raw")
    add("save sync on: native (checksums off) vs raw", ratio_tp("save_sync", "native_nocrc", "raw"), ">=", 0.90,
        "of raw")
    add("save sync on: python vs stock", ratio_tp("save_sync", "python", "stock"), ">=", 1.0, "x")
    for e in ("python", "native", "native_on_stock_ckpt"):
        add(f"reshard: {e} bytes read / needed", _med(cases, "reshard", e, "read_over_needed"), "<=", 1.1, "x")
    add("reshard: python vs stock (time)", ratio_time("reshard", "python", "stock"), ">=", 1.0, "x")
    for e in ("python", "native"):
        add(f"peak: {e} above destination", _med(cases, "peak", e, "peak_mib"), "<=", 64.0, "MiB")
    # Issue 13: the save thread sweep (worst thread count per ratio), per-item cost above DCP's floor,
    # second and later saves / loads of one structure.
    for sync in (False, True):
        pts = savesweep_points(cases, sync)
        tag = "sync on" if sync else "sync off"
        for a, b, limit, what in (("native_crc", "native_nocrc", 0.85, "native, checksums on / off"),
                                  ("native_crc", "python_crc", 1.0, "native / python, both with checksums"),
                                  ("native_crc", "python_nocrc", 1.0,
                                   "native with checksums / python with its default (none)")):
            vals = {t: _ratio(c, a, b) for t, c in sorted(pts.items())}
            vals = {t: v for t, v in vals.items() if v is not None}
            if vals:
                worst = min(vals, key=vals.__getitem__)
                add(f"save sweep, {tag}: {what} (worst of {'/'.join(map(str, vals))} threads: {worst})",
                    vals[worst], ">=", limit, "x", "issue13")
        if 4 in pts:
            add(f"save sweep, {tag}, 4 threads: native with checksums vs raw pwrite",
                _ratio(pts[4], "native_crc", "raw"), ">=", 1.0 if sync else 0.80, "of raw", "issue13")
    for key, what in (("small_save", "small save, fresh process"), ("small_load", "small load, fresh process"),
                      ("small_save_longlived", "small save, long-lived process"),
                      ("small_load_longlived", "small load, long-lived process")):
        for e in ("native",):
            v = cases.get(key, {}).get("systems", {}).get(e, {}).get("us_above_floor")
            add(f"{what}: {e}'s own cost above DCP's floor (noio)", v, "<=", 10.0, "µs/item", "issue13")
    if "repeat_save" in cases or "repeat_load" in cases:
        for op in ("save", "load"):
            systems = cases.get(f"repeat_{op}", {}).get("systems", {})
            mine = "native_cached" if "native_cached" in systems else "native"
            add(f"second and later {op}s: {mine} vs stock", ratio_time(f"repeat_{op}", mine, "stock"), ">=", 6.0,
                "x", "issue13")
            if op == "save":
                add(f"second and later saves: {mine} vs stock with its plan cache",
                    ratio_time("repeat_save", mine, "stock_cached"), ">=", 4.0, "x", "issue13")
    # Issue 14: planning at scale (dcp_native's coordinator step at 1024 simulated ranks against
    # stock's; one rank's load planning once its indexes are built, against N).
    rows = cases.get("planning", {}).get("rows", [])
    ratio, capped = planning_ratio(rows, 1024)
    add("planning, 1024 ranks: dcp_native's coordinator step / stock's" + (" (stock stopped at its cap: at most)"
                                                                          if capped else ""),
        ratio, "<=", 0.2, "of stock", "issue14")
    search = planning_growth(rows).get("load_dcp_native_search", [])
    if search:
        worst = max(search, key=lambda s: s["exponent"])
        add(f"planning: one rank's load search (indexes built) against N, worst step ({worst['from']}→{worst['to']}"
            " ranks): factor per doubling", worst["per_doubling"], "<=", 1.25, "per doubling", "issue14")
    # Cooperative loads: bytes read from storage by all ranks together, over the checkpoint (the
    # larger of the cold and warm figures); without cooperation for contrast.
    for case in ("replicated", "hsdp"):
        keys = [k for k in (f"cooperative_{case}_cold", f"cooperative_{case}_warm") if k in cases]
        if not keys:
            continue
        ranks = cases[keys[0]]["params"]["ranks"]
        for name, op, limit, how in (("native_coop", "<=", 1.15, "cooperative on"),
                                     ("native", "info", None, "cooperative off (for contrast)")):
            vals = [v for v in (_med(cases, k, name, "read_over_ckpt") for k in keys) if v is not None]
            if vals:
                add(f"cooperative loads, {case}, {ranks} ranks: bytes read by all ranks / checkpoint, {how}",
                    max(vals), op, limit, "x", "cooperative")
    # GPU issue: D2H staging.
    stage = _med(cases, "stage", "native", "gbps")
    if stage is not None:
        add("GPU: D2H staging (native stage())", stage, ">=", 45.0, "GB/s", "gpu")
        add("GPU: D2H staging vs torch pinned copy", ratio_tp("stage", "native", "torch_pinned"), ">=", 0.85,
            "of torch", "gpu")
    if cases.get("model_save", {}).get("device") == "cuda":
        add("GPU: save (CUDA) native vs stock", ratio_tp("model_save", "native", "stock"), ">=", 1.0, "x", "gpu")
        add("GPU: load (CUDA) native vs stock", ratio_tp("model_load", "native", "stock"), ">=", 1.0, "x", "gpu")
    # Async-save issue: blocking time.
    for e in ("python", "native"):
        raw = _med(cases, "async", "raw", "blocking_s")
        mine = _med(cases, "async", e, "blocking_s")
        if raw and mine:
            add(f"async_save: {e} blocking vs plain copy", mine / raw, "<=", 1.2, "x", "async")
        add(f"async_save: {e} blocking vs stock", ratio_time("async", e, "stock", "blocking_s"), ">=", 1.0, "x", "async")
        add(f"async_save: {e} blocking vs stock with DefaultStager",
            ratio_time("async", e, "stock_pinned", "blocking_s"), ">=", 1.0, "x", "async")
    return out


# ----------------------------------------------------------------------------- numbers


def _fmt_num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "–"
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits - 1}f}" if abs(v) >= 1 else f"{v:.{digits}f}"


def _spread(s: dict, scale: float = 1.0) -> tuple[str, str]:
    return _fmt_num(s["median"] * scale), f"{_fmt_num(s['min'] * scale)}–{_fmt_num(s['max'] * scale)}"


def _label(name: str) -> str:
    return SYSTEM_LABELS.get(name, name)


def _ratio(case: dict, name: str, other: str, field: str = "gbps") -> float | None:
    """How much better ``name`` is than ``other``: throughput ratio, or speed-up for times."""
    s = case["systems"]
    if name not in s or other not in s:
        return None
    if field == "gbps":
        return s[name]["gbps"]["median"] / s[other]["gbps"]["median"]
    return s[other][field]["median"] / s[name][field]["median"]


def _cache_short(case: dict) -> str:
    pc = case.get("page_cache", "")
    if pc.startswith("cold"):
        return "cold"
    if pc.startswith("warm"):
        return "warm"
    if "fsync" in pc:
        return "fsync"
    if pc.startswith("save"):
        return "writeback"
    return "–"


# ----------------------------------------------------------------------------- markdown


def render_summary(doc: dict) -> list[str]:
    """One row per case: the medians of the four main systems, native vs stock and % of raw."""
    cases = doc["cases"]
    lines = [
        "| case | page cache | stock DCP | dcp_native python | dcp_native native | raw | native vs stock | native % of raw |",
        "|---|:-:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in ordered_cases(cases):
        c = cases[key]
        if c.get("kind") not in ("throughput", "time") or is_sweep(key) or c.get("workload") == "stage":
            continue
        field = "blocking_s" if c.get("op") == "async_save" else ("gbps" if c["kind"] == "throughput" else "seconds")
        cells = []
        for name in ("stock", "python", "native", "raw"):
            e = c["systems"].get(name)
            if e is None or field not in e:
                cells.append("–")
            elif field == "gbps":
                cells.append(f"{_fmt_num(e['gbps']['median'])} GB/s")
            else:
                cells.append(f"{_fmt_num(e[field]['median'] * 1e3)} ms")
        vs = _ratio(c, "native", "stock", field)
        pct = _ratio(c, "native", "raw", field)
        title = c["title"].replace("|", "/")
        lines.append(f"| {title} | {_cache_short(c)} | " + " | ".join(cells)
                     + f" | {_fmt_num(vs) + 'x' if vs else '–'} | {f'{100 * pct:.0f}%' if pct else '–'} |")
    return lines


def render_tables(doc: dict) -> str:
    cases = doc["cases"]
    lines: list[str] = []
    m = doc["machine"]
    v = doc["versions"]
    meth = doc["method"]
    lines.append("# dcp_native benchmark")
    lines.append("")
    if doc.get("partial"):
        lines.append("**Partial results**: the run has not finished (or was cut short); the workloads below are "
                     "those done so far.")
        lines.append("")
    gpu = m.get("gpu")
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, kernel {m['kernel']}, "
                 f"bench dir on {m['filesystem']} ({m['filesystem_device']})"
                 + (f", GPU {gpu['name']}" if gpu else "") + ".  ")
    lines.append(f"torch {v['torch']}, dcp_native {v['dcp_native']}"
                 + (f" (git {v['git'].get('commit', '')[:10]})" if v.get("git") else "")
                 + f"; native engine {'available' if v.get('native_engine') else 'NOT available'}; "
                 f"device {doc.get('device', 'cpu')}.  ")
    lines.append(f"{meth['reps']} reps after {meth['warmup_rounds']} warm-up round(s), interleaved across systems; "
                 f"median with min–max; one fresh process per figure ({meth['isolation']}); "
                 f"run took {doc['duration_s']} s; load average {m.get('loadavg_1_5_15')} at start, "
                 f"{m.get('loadavg_at_end')} at end.  ")
    lines.append(f"Thread counts: {meth['main_threads']} for every case; the model's save and load also at "
                 f"{', '.join(str(t) for t in meth['sweep_threads'] if t != meth['main_threads']) or '–'}.  ")
    if meth.get("reduced"):
        lines.append("Reduced to fit the time budget: " + "; ".join(meth["reduced"]) + ".  ")
    lines.append(f"Checks: {meth['check']}.")
    for note in doc.get("notes", []):
        lines.append(f"Note: {note}.")
    lines.append("")
    lines.append("## summary")
    lines.append("")
    lines.append("Medians; GB/s = the state dict's tensor bytes (bytes needed, for resharded loads) per second; "
                 "ms for cases of many small tensors and resharded loads (for `async_save`: the time it blocks). "
                 "Page cache: `warm` = files in the page cache, `cold` = evicted before each load, `writeback` = "
                 "saved into the page cache (sync_files off), `fsync` = sync_files on. Every figure's spread, peak "
                 "memory and page-cache residency are in the tables below.")
    lines.append("")
    lines += render_summary(doc)
    lines.append("")
    if any(is_sweep(k) and not is_savesweep(k) for k in cases):
        lines += render_sweep(doc)
    if any(is_savesweep(k) for k in cases):
        lines += render_savesweep(doc)
    if any(k in cases for k, _ in FLOOR_CASES):
        lines += render_floor(doc)
    coop_done = False
    for key in ordered_cases(cases):
        if is_sweep(key):
            continue
        c = cases[key]
        if c.get("workload") == "cooperative":  # one section for all of its cases
            if not coop_done:
                lines += render_cooperative(cases)
                coop_done = True
            continue
        lines.append(f"## {c['title']}")
        lines.append("")
        lines.append(f"`{key}`; page cache: {c.get('page_cache', '–')}; {c.get('reps')} reps after "
                     f"{c.get('warmup')} warm-up round(s).")
        la = c.get("loadavg_before_after")
        if la and la[0] and la[1]:
            lines[-1] += f" Load average (1 min) {la[0][0]:.2f} before, {la[1][0]:.2f} after."
        lines.append("")
        kind, op = c.get("kind"), c.get("op")
        if c.get("workload") == "planning":
            lines += render_planning(c)
        elif kind == "memory":
            lines += _memory_table(c)
        elif c.get("workload") == "reshard":
            lines += _reshard_table(c)
        elif op == "async_save":
            lines += _async_table(c)
        elif kind == "time":
            lines += _time_table(c)
        else:
            lines += _throughput_table(key, c)
        for name, why in c.get("unsupported", {}).items():
            lines.append(f"{_label(name)}: not run here: {why}.")
            lines.append("")
        if any("phases_s" in e for e in c["systems"].values()):
            lines += _phase_table(c)
    if doc.get("targets"):
        lines.append("## targets")
        lines.append("")
        lines.append("| target | measured | required | met |")
        lines.append("|---|---:|---:|:-:|")
        for t in doc["targets"]:
            if t["op"] == "info":  # shown for contrast: no requirement
                val, lim = f"{t['value']:.2f}{'x' if t['unit'] == 'x' else ' ' + t['unit']}", "–"
            elif t["unit"] in ("of raw", "of torch"):
                val, lim = f"{100 * t['value']:.0f}% {t['unit']}", f"{t['op']} {100 * t['limit']:.0f}%"
            elif t["unit"] == "MiB":
                val, lim = f"{t['value']:.1f} MiB", f"{t['op']} {t['limit']:.0f} MiB"
            elif t["unit"] == "GB/s":
                val, lim = f"{t['value']:.1f} GB/s", f"{t['op']} {t['limit']:.0f} GB/s"
            elif t["unit"] == "µs/item":
                val, lim = f"{t['value']:.1f} µs", f"{t['op']} {t['limit']:.0f} µs"
            else:
                val, lim = f"{t['value']:.2f}x", f"{t['op']} {t['limit']:.2f}x"
            met = "–" if t["met"] is None else "yes" if t["met"] else "**no**"
            lines.append(f"| {t['target']} | {val} | {lim} | {met} |")
        lines.append("")
    if doc.get("errors"):
        lines.append("## errors")
        lines.append("")
        for e in doc["errors"]:
            lines.append("```")
            lines.append(e.strip())
            lines.append("```")
        lines.append("")
    return "\n".join(lines)


def _extra_cols(c: dict) -> list[tuple[str, str, float]]:
    """Optional columns: (header, field, scale) present for at least one system."""
    cols = []
    systems = c["systems"].values()
    if any("gpu_peak_mib" in e for e in systems):
        cols.append(("GPU peak MiB", "gpu_peak_mib", 1.0))
    if any("resident_before" in e for e in systems):
        cols.append(("cached before", "resident_before", 100.0))
    if c.get("op") == "load" and any("read_over_needed" in e for e in systems):
        cols.append(("bytes read / needed", "read_over_needed", 1.0))
    if any("plan_reused" in e for e in systems):
        cols.append(("plan reused (2nd+)", "plan_reused", 100.0))
    return cols


def _extra_cells(e: dict, cols: list[tuple[str, str, float]]) -> str:
    out = []
    for header, field, scale in cols:
        if field not in e:
            out.append("–")
        elif field in ("resident_before", "plan_reused"):
            out.append(f"{e[field]['median'] * scale:.0f}%")
        elif field == "read_over_needed":
            out.append(f"{e[field]['median']:.3f}")
        else:
            out.append(_fmt_num(e[field]["median"] * scale))
    return "".join(f" {x} |" for x in out)


def _throughput_table(key: str, c: dict) -> list[str]:
    ref = reference_of(key, c)
    cols = _extra_cols(c)
    ref_label = "raw" if ref == "raw" else "torch pinned"
    lines = ["| system | GB/s (median) | min–max | ratio vs stock | % of " + ref_label + " | peak MiB |"
             + "".join(f" {h} |" for h, _, _ in cols),
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(cols)]
    for name, e in c["systems"].items():
        med, rng = _spread(e["gbps"])
        vs = _ratio(c, name, "stock")
        pct = _ratio(c, name, ref)
        lines.append(f"| {_label(name)} | {med} | {rng} | {_fmt_num(vs) + 'x' if vs else '–'} | "
                     f"{f'{100 * pct:.0f}%' if pct else '–'} | {_fmt_num(e['peak_mib']['median'])} |"
                     + _extra_cells(e, cols))
    lines.append("")
    return lines


def _time_table(c: dict) -> list[str]:
    cols = _extra_cols(c)
    systems = c["systems"].values()
    floor = any("us_above_floor" in e for e in systems)
    first = any("first_seconds" in e for e in systems)
    cached = "stock_cached" in c["systems"]
    lines = []
    if first:
        p = c.get("params", {})
        op = c.get("op", "save")
        lines += [f"{p.get('iters', '?')} {op}s per process; the figure is the median of the 2nd and later {op}s of "
                  f"the process (`first ms`: its first); {p.get('planner', '')}.", ""]
    lines += ["| system | ms (median) | min–max | µs/tensor |" + (" µs/tensor above floor |" if floor else "")
              + (" first ms |" if first else "") + " speed-up vs stock |"
              + (" vs stock + plan cache |" if cached else "") + " % of raw | peak MiB |"
              + "".join(f" {h} |" for h, _, _ in cols),
              "|---|---:|---:|---:|" + ("---:|" if floor else "") + ("---:|" if first else "") + "---:|"
              + ("---:|" if cached else "") + "---:|---:|" + "---:|" * len(cols)]
    for name, e in c["systems"].items():
        med, rng = _spread(e["seconds"], 1e3)
        vs = _ratio(c, name, "stock", "seconds")
        vc = _ratio(c, name, "stock_cached", "seconds")
        pct = _ratio(c, name, "raw", "seconds")
        us = _fmt_num(e["us_per_tensor"]["median"]) if "us_per_tensor" in e else "–"
        cells = [us]
        if floor:
            cells.append(_fmt_num(e["us_above_floor"]) if "us_above_floor" in e else "–")
        if first:
            cells.append(_fmt_num(e["first_seconds"]["median"] * 1e3) if "first_seconds" in e else "–")
        cells.append(_fmt_num(vs) + "x" if vs else "–")
        if cached:
            cells.append(_fmt_num(vc) + "x" if vc else "–")
        lines.append(f"| {_label(name)} | {med} | {rng} | " + " | ".join(cells) + " | "
                     f"{f'{100 * pct:.0f}%' if pct else '–'} | {_fmt_num(e['peak_mib']['median'])} |"
                     + _extra_cells(e, cols))
    lines.append("")
    return lines


def _memory_table(c: dict) -> list[str]:
    lines = ["| system | MiB above destination (median) | min–max |", "|---|---:|---:|"]
    for name, e in c["systems"].items():
        med, rng = _spread(e["peak_mib"])
        lines.append(f"| {_label(name)} | {med} | {rng} |")
    lines.append("")
    return lines


def _reshard_table(c: dict) -> list[str]:
    p = c["params"]
    lines = [f"Columns per rank: {p.get('columns_per_rank')}; each needed run is {p.get('run_bytes')} bytes or more; "
             "bytes needed = all ranks' destinations; time = slowest rank's dcp.load.", "",
             "| system | ms (median) | min–max | GB/s needed | speed-up vs stock | % of raw | bytes read / needed (engine) "
             "| rchar / needed | peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in c["systems"].items():
        med, rng = _spread(e["seconds"], 1e3)
        vs = _ratio(c, name, "stock", "seconds")
        pct = _ratio(c, name, "raw", "seconds")
        br = f"{e['read_over_needed']['median']:.3f}" if "read_over_needed" in e else "–"
        rc = f"{e['rchar_over_needed']['median']:.3f}" if "rchar_over_needed" in e else "–"
        lines.append(f"| {_label(name)} | {med} | {rng} | {_fmt_num(e['gbps']['median'])} | "
                     f"{_fmt_num(vs) + 'x' if vs else '–'} | {f'{100 * pct:.0f}%' if pct else '–'} | {br} | {rc} | "
                     f"{_fmt_num(e['peak_mib']['median'])} |")
    lines.append("")
    return lines


def _async_table(c: dict) -> list[str]:
    lines = [f"Blocking: {c['params'].get('blocking')}; total: {c['params'].get('total')}; raw: {c['params'].get('raw')}; "
             f"{c['params'].get('writer')}.", "",
             "| system | blocking ms (median) | min–max | total ms | blocking vs stock | blocking / raw copy "
             "| first save blocking ms | peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    raw = c["systems"].get("raw", {}).get("blocking_s", {}).get("median")
    for name, e in c["systems"].items():
        med, rng = _spread(e["blocking_s"], 1e3)
        vs = _ratio(c, name, "stock", "blocking_s")
        over = e["blocking_s"]["median"] / raw if raw else None
        first = _fmt_num(e["first_blocking_s"]["median"] * 1e3) if "first_blocking_s" in e else "–"
        label = "raw copy into preallocated memory" if name == "raw" else _label(name)
        lines.append(f"| {label} | {med} | {rng} | {_fmt_num(e['total_s']['median'] * 1e3)} | "
                     f"{_fmt_num(vs) + 'x' if vs else '–'} | {_fmt_num(over) + 'x' if over else '–'} | {first} | "
                     f"{_fmt_num(e['peak_mib']['median'])} |")
    lines.append("")
    return lines


PHASE_NOTE = (
    "Phases: `dcp.planner` = the planner's set_up/create_local/create_global(/finish) plan calls; "
    "`dcp.other` = the rest of dcp.save/load outside the storage layer and the planner "
    "(metadata assembly, dedup, no_dist collectives); `storage.plan` = the storage layer's "
    "set_up/prepare_local/prepare_global; `write_data.resolve_data` and `read_data.resolve_tensor/"
    "commit_tensor` are planner callbacks made from inside the storage layer; `*.engine` = "
    "dcp_native's engine call, or for stock the sum of its per-item `_write_item` (torch.save + write) "
    "or `torch.load` calls (summed over threads where stock uses threads); `*.other` = the rest of "
    "write_data/read_data (framing, read planning, probing, bookkeeping); `storage.finish` = metadata "
    "(and sidecar) pickling, writing and fsync. Stock's writer runs `_write_item` on its "
    "`thread_count` threads, so its write_data split is in thread-seconds and has no `other`."
)


def _phase_table(c: dict) -> list[str]:
    names = [n for n in c["systems"] if "phases_s" in c["systems"][n]]
    labels: list[str] = []
    for n in names:
        for k in c["systems"][n]["phases_s"]:
            if k not in labels:
                labels.append(k)
    rounds = c.get("params", {}).get("phase_rounds")
    lines = [f"### where the time goes: {c['title']} (ms, median of {rounds or 'the'} instrumented run(s))", "",
             "| phase | " + " | ".join(_label(n) for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for k in labels:
        row = []
        for n in names:
            val = c["systems"][n]["phases_s"].get(k, 0.0)
            row.append("n/a (threads)" if val is None else _fmt_num(val * 1e3))
        lines.append(f"| {k} | " + " | ".join(row) + " |")
    lines += ["", PHASE_NOTE, ""]
    return lines


def sweep_points(cases: dict, op: str) -> dict[str, dict[int, dict]]:
    """system -> threads -> gbps summary, for the model's save or load, main thread count included."""
    out: dict[str, dict[int, dict]] = {}
    for key, c in cases.items():
        if key == f"model_{op}" or key.startswith(f"model_{op}_t"):
            for name, e in c["systems"].items():
                if name.startswith("torch_pinned"):
                    continue
                out.setdefault(name, {})[c["threads"]] = e["gbps"]
    return out


def render_sweep(doc: dict) -> list[str]:
    cases = doc["cases"]
    meth = doc["method"]
    threads = sorted(set(meth["sweep_threads"]) | {meth["main_threads"]})
    lines = ["## thread counts: the model's save and load", "",
             f"GB/s (median); {meth['main_threads']} threads: {meth['reps']} reps (the cases below); other thread "
             f"counts: {meth['sweep_reps']} rep(s). Stock's reader reads on one thread whatever `thread_count`, so "
             "its load is measured at one setting only. Raw: as many threads, one file (save) or one contiguous "
             "range of the files (load) per thread.", ""]
    for op in ("save", "load"):
        pts = sweep_points(cases, op)
        if not pts:
            continue
        lines.append(f"| {op} | " + " | ".join(f"{t} threads" for t in threads) + " |")
        lines.append("|---|" + "---:|" * len(threads))
        for name, by_t in pts.items():
            lines.append(f"| {_label(name)} | " + " | ".join(
                _fmt_num(by_t[t]["median"]) if t in by_t else "–" for t in threads) + " |")
        lines.append("")
    return lines


def render_savesweep(doc: dict) -> list[str]:
    """The save thread sweep: GB/s per system by thread count, sync off and on, then the ratios."""
    cases = doc["cases"]
    lines = ["## save thread sweep: checksums on and off, each engine", ""]
    any_case = next(c for k, c in cases.items() if is_savesweep(k))
    p = any_case.get("params", {})
    lines.append(f"The model state ({p.get('tensors')} tensors, {p.get('tensor_bytes')} bytes) saved at each thread "
                 f"count, {any_case.get('reps')} reps each (medians). {p.get('checksums', '')}. Raw: "
                 f"{p.get('raw', '')}. Ratios: GB/s medians of the same case, e.g. `native_crc/native_nocrc` = what "
                 "the native engine keeps of its speed with checksums on.")
    lines.append("")
    for sync in (False, True):
        pts = savesweep_points(cases, sync)
        if not pts:
            continue
        threads = sorted(pts)
        names: list[str] = []
        for c in pts.values():
            names += [n for n in c["systems"] if n not in names]
        tag = "sync_files on (fsync)" if sync else "sync_files off (page cache)"
        lines.append(f"| GB/s, {tag} | " + " | ".join(f"{t} threads" for t in threads) + " |")
        lines.append("|---|" + "---:|" * len(threads))
        for n in names:
            lines.append(f"| {_label(n)} | " + " | ".join(
                _fmt_num(pts[t]["systems"][n]["gbps"]["median"]) if n in pts[t]["systems"] else "–"
                for t in threads) + " |")
        lines.append("")
        lines.append(f"| ratio, {tag} | " + " | ".join(f"{t} threads" for t in threads) + " |")
        lines.append("|---|" + "---:|" * len(threads))
        for a, b in SWEEP_RATIOS:
            key = f"{a}/{b}"
            vals = [pts[t].get("ratios", {}).get(key) for t in threads]
            if all(v is None for v in vals):
                continue
            lines.append(f"| {key} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in vals) + " |")
        lines.append("")
        unsupported = {n: why for c in pts.values() for n, why in c.get("unsupported", {}).items()}
        for n, why in unsupported.items():
            lines.append(f"{_label(n)}: not run here: {why}.")
            lines.append("")
    return lines


#: The small-tensor cases whose per-item cost above DCP's floor is tabulated: (key, column).
FLOOR_CASES = (("small_save", "save, fresh process"), ("small_save_longlived", "save, long-lived process"),
               ("small_load", "load, fresh process"), ("small_load_longlived", "load, long-lived process"))


def render_floor(doc: dict) -> list[str]:
    """µs per item, and above DCP's floor (the noio row), fresh and long-lived, save and load."""
    cases = doc["cases"]
    cols = [(k, label) for k, label in FLOOR_CASES if k in cases]
    names: list[str] = []
    for k, _ in cols:
        names += [n for n in cases[k]["systems"] if n not in names and n != "raw"]
    first = cases[cols[0][0]]
    p = first.get("params", {})
    lines = ["## per-item cost above DCP's floor: small tensors", "",
             f"{p.get('tensors')} tensors of {p.get('tensor_bytes')} bytes; µs per tensor (median), and in brackets "
             "the system's own cost above DCP's floor: its µs per tensor minus the `noio` row's (DCP with a storage "
             "layer that does no I/O) in the same case. Fresh process: one save (load) per process; long-lived: "
             "the median of the 2nd and later saves (loads) of one process.", "",
             "| system | " + " | ".join(label for _, label in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for n in names:
        cells = []
        for k, _ in cols:
            e = cases[k]["systems"].get(n)
            if e is None or "us_per_tensor" not in e:
                cells.append("–")
            elif "us_above_floor" in e and n != "noio":
                cells.append(f"{_fmt_num(e['us_per_tensor']['median'])} ({e['us_above_floor']:+.1f})")
            else:
                cells.append(_fmt_num(e["us_per_tensor"]["median"]))
        lines.append(f"| {_label(n)} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


# ----------------------------------------------------------------------------- chart


COLORS = {
    "stock": "#7f7f7f", "python": "#ff7f0e", "native": "#2ca02c", "noio": "#9467bd",
    "python_on_stock_ckpt": "#ffbb78", "native_on_stock_ckpt": "#98df8a", "raw_direct": "#1f77b4",
    "torch_pinned": "#17becf", "torch_pinned_d2h": "#17becf", "torch_pinned_h2d": "#17becf", "raw": "#d62728",
    "stock_cached": "#c7c7c7", "native_stock_cached": "#bcbd22", "python_cached": "#e377c2",
    "native_cached": "#006400", "native_crc": "#2ca02c", "native_nocrc": "#98df8a", "python_crc": "#ff7f0e",
    "python_nocrc": "#ffbb78", "native_coop": "#1f77b4",
}


def chart_panels(doc: dict) -> list[dict]:
    """What the chart shows: one panel per throughput/time case, plus the thread sweep."""
    panels = []
    for key in ordered_cases(doc["cases"]):
        c = doc["cases"][key]
        if c.get("kind") not in ("throughput", "time") or is_sweep(key):
            continue
        ref = reference_of(key, c)
        field = "blocking_s" if c.get("op") == "async_save" else "gbps"
        bars = [n for n in c["systems"] if n != ref]
        panels.append({"case": key, "title": c["title"], "systems": bars, "reference": ref
                       if ref in c["systems"] else None, "field": field})
    coop = cooperative_keys(doc["cases"])
    if coop:
        panels.append({"case": "cooperative", "title": "cooperative loads: GB/s and bytes read / checkpoint",
                       "systems": sorted({n for k in coop for n in doc["cases"][k]["systems"]}), "reference": None,
                       "field": "gbps"})
    if "planning" in doc["cases"]:
        panels.append({"case": "planning", "title": doc["cases"]["planning"]["title"],
                       "systems": ["stock", "dcp_native"], "reference": None, "field": "seconds"})
    if any(is_sweep(k) and not is_savesweep(k) for k in doc["cases"]):
        panels.append({"case": "thread_sweep", "title": "model: GB/s by thread count",
                       "systems": sorted(set(sweep_points(doc["cases"], "save")) | set(sweep_points(doc["cases"], "load"))),
                       "reference": "raw", "field": "gbps"})
    for sync in (False, True):
        pts = savesweep_points(doc["cases"], sync)
        if pts:
            names = sorted({n for c in pts.values() for n in c["systems"]})
            panels.append({"case": f"savesweep_{'sync' if sync else 'nosync'}",
                           "title": f"save sweep, sync_files {'on' if sync else 'off'}: GB/s by thread count",
                           "systems": names, "reference": "raw" if "raw" in names else None, "field": "gbps"})
    return panels


def _wrap(text: str, width: int = 42) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:3])


def render_chart(doc: dict, path: str) -> dict[str, Any]:
    """Draw the chart (matplotlib, Agg) to ``path``; returns what it shows, or why it was not drawn."""
    panels = chart_panels(doc)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return {"path": None, "panels": panels,
                "skipped": f"matplotlib is not installed ({exc}); `make bench` installs it (pip install matplotlib)"}
    cases = doc["cases"]
    n = len(panels)
    if n == 0:
        return {"path": None, "panels": [], "skipped": "no figures to draw"}
    cols = 4 if n > 6 else min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.9 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        if panel["case"] == "thread_sweep":
            _draw_sweep(ax, doc)
            continue
        if is_savesweep(panel["case"]):
            _draw_savesweep(ax, doc, panel["case"].endswith("_sync"))
            continue
        if panel["case"] == "planning":
            draw_planning(ax, cases["planning"])
            continue
        if panel["case"] == "cooperative":
            draw_cooperative(ax, cases)
            continue
        c = cases[panel["case"]]
        field = panel["field"]
        names = panel["systems"]
        if field == "blocking_s":
            vals = [1e3 * c["systems"][s][field]["median"] for s in names]
            lo = [v - 1e3 * c["systems"][s][field]["min"] for v, s in zip(vals, names)]
            hi = [1e3 * c["systems"][s][field]["max"] - v for v, s in zip(vals, names)]
            ax.set_ylabel("blocking ms (lower is better)")
        else:
            vals = [c["systems"][s]["gbps"]["median"] for s in names]
            lo = [v - c["systems"][s]["gbps"]["min"] for v, s in zip(vals, names)]
            hi = [c["systems"][s]["gbps"]["max"] - v for v, s in zip(vals, names)]
            ax.set_ylabel("GB/s")
        x = list(range(len(names)))
        ax.bar(x, vals, color=[COLORS.get(s, "#8c564b") for s in names], yerr=[lo, hi], capsize=3)
        ax.set_xticks(x)
        ax.set_xticklabels([_label(s).replace("dcp_native ", "").replace(", stock-written ckpt", "\n(stock ckpt)")
                            for s in names], rotation=30, ha="right", fontsize=7)
        ref = panel["reference"]
        if ref:
            rv = c["systems"][ref][field]["median"] * (1e3 if field == "blocking_s" else 1.0)
            ax.axhline(rv, color=COLORS["raw"], linestyle="--", linewidth=1.5)
            ref_name = "raw" if ref == "raw" else _label(ref)
            ax.text(len(names) - 0.5, rv, f"{ref_name} {_fmt_num(rv)}", color=COLORS["raw"], ha="right",
                    va="bottom", fontsize=7)
        ax.set_title(_wrap(f"{c['title']} [{_cache_short(c)}]"), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylim(0, max(vals + [rv if ref else 0]) * 1.18 or 1)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    m = doc["machine"]
    fig.suptitle(f"dcp_native benchmark — {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, {m['filesystem']}, "
                 f"device {doc.get('device', 'cpu')}; torch {doc['versions']['torch']}; median of "
                 f"{doc['method']['reps']} reps, min–max bars; dashed red line: raw baseline", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"path": os.path.basename(path), "panels": panels}


def _draw_sweep(ax, doc: dict) -> None:
    cases = doc["cases"]
    for op, style in (("save", "-"), ("load", "--")):
        for name, by_t in sweep_points(cases, op).items():
            ts = sorted(by_t)
            ax.plot(ts, [by_t[t]["median"] for t in ts], style, marker="o", markersize=3,
                    color=COLORS.get(name, "#8c564b"), label=f"{op}: {_label(name).replace('dcp_native ', '')}")
    ax.set_xscale("log", base=2)
    ts = sorted(set(doc["method"]["sweep_threads"]) | {doc["method"]["main_threads"]})
    ax.set_xticks(ts)
    ax.set_xticklabels([str(t) for t in ts])
    ax.set_xlabel("threads", fontsize=8)
    ax.set_ylabel("GB/s")
    ax.set_title("model state: save (solid) and load (dashed)\nby thread count [writeback / warm]", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    ax.tick_params(labelsize=7)


def _draw_savesweep(ax, doc: dict, sync: bool) -> None:
    pts = savesweep_points(doc["cases"], sync)
    threads = sorted(pts)
    names = sorted({n for c in pts.values() for n in c["systems"]})
    for name in names:
        ts = [t for t in threads if name in pts[t]["systems"]]
        style = "--" if name == "raw" or name.endswith("_nocrc") else "-"
        ax.plot(ts, [pts[t]["systems"][name]["gbps"]["median"] for t in ts], style, marker="o", markersize=3,
                color=COLORS.get(name, "#8c564b"), label=_label(name).replace("dcp_native ", ""))
    ax.set_xscale("log", base=2)
    ax.set_xticks(threads)
    ax.set_xticklabels([str(t) for t in threads])
    ax.set_xlabel("threads", fontsize=8)
    ax.set_ylabel("GB/s")
    ax.set_title(f"model state save by thread count, sync_files {'on [fsync]' if sync else 'off [writeback]'}\n"
                 "checksums on (solid) / off (dashed)", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    ax.tick_params(labelsize=7)


# ----------------------------------------------------------------------------- planning at scale (issue 14)

#: The series of the planning case: key -> (label, section of a row, field).
PLANNING_SERIES = {
    "coordinator_stock": ("coordinator step, stock", "coordinator", "stock"),
    "coordinator_dcp_native": ("coordinator step, dcp_native (first plan)", "coordinator", "dcp_native"),
    "coordinator_dcp_native_same": ("coordinator step, dcp_native (same structure)", "coordinator",
                                    "dcp_native_same_structure"),
    "pickle_gc_on": ("metadata pickle, collector on (stock's writer)", "metadata", "pickle_gc_on"),
    "pickle_gc_paused": ("metadata pickle, collector paused (dcp_native's writer)", "metadata", "pickle_gc_paused"),
    "unpickle_gc_on": ("metadata unpickle, stock's reader (collector on)", "metadata", "unpickle_gc_on"),
    "unpickle_dcp_native": ("metadata unpickle, dcp_native's reader", "metadata",
                            "unpickle_dcp_native"),
    "unpickle_gc_paused": ("metadata unpickle, collector paused", "metadata", "unpickle_gc_paused"),
    "load_stock": ("one rank's load planning, stock", "load", "stock"),
    "load_dcp_native": ("one rank's load planning, dcp_native", "load", "dcp_native"),
    "load_dcp_native_search": ("one rank's load planning, dcp_native's search (indexes built)", "load",
                               "dcp_native_search"),
}


def planning_point(row: dict, series: str) -> tuple[float | None, bool]:
    """(seconds, capped) of one series in one row; capped: stock was stopped at that many seconds."""
    _, section, field = PLANNING_SERIES[series]
    part = row.get(section, {})
    if field in part:
        return part[field], False
    if series == "coordinator_stock" and "stock_capped_s" in part:
        return part["stock_capped_s"], True
    return None, False


def planning_growth(rows: list[dict]) -> dict[str, list[dict]]:
    """Per series, between consecutive rank counts: the exponent k of time ~ N^k at a fixed model
    (each time divided by the items of one rank, so rows with a reduced model compare) and the
    factor per doubling (2^k); ``at_least`` where the larger N's stock time is a cap."""
    rows = sorted(rows, key=lambda r: r["ranks"])
    out: dict[str, list[dict]] = {}
    for series in PLANNING_SERIES:
        steps = []
        for a, b in zip(rows, rows[1:]):
            ta, capped_a = planning_point(a, series)
            tb, capped_b = planning_point(b, series)
            if not ta or not tb or capped_a or b["ranks"] <= a["ranks"]:
                continue
            k = math.log((tb / b["items_per_rank"]) / (ta / a["items_per_rank"])) / math.log(b["ranks"] / a["ranks"])
            steps.append({"from": a["ranks"], "to": b["ranks"], "exponent": k, "per_doubling": 2 ** k,
                          "at_least": capped_b})
        if steps:
            out[series] = steps
    return out


def planning_ratio(rows: list[dict], ranks: int) -> tuple[float | None, bool]:
    """dcp_native's coordinator step over stock's at ``ranks`` (an upper bound where stock was capped)."""
    for row in rows:
        if row["ranks"] == ranks:
            stock, capped = planning_point(row, "coordinator_stock")
            mine, _ = planning_point(row, "coordinator_dcp_native")
            if stock and mine:
                return mine / stock, capped
    return None, False


def _secs(v: float | None, capped: bool = False) -> str:
    if v is None:
        return "–"
    return ("> " if capped else "") + (f"{v * 1e3:.1f} ms" if v < 0.1 else f"{v:.2f} s")


def render_planning(case: dict) -> list[str]:
    """The planning-at-scale table: per N the coordinator step, the metadata, one rank's load
    planning; then the growth per doubling of N."""
    p = case.get("params", {})
    rows = sorted(case.get("rows", []), key=lambda r: r["ranks"])
    lines = [f"{p.get('model', '')}", "",
             "Times per N (median of the reps stated); `coordinator` = `planner.create_global_plan` + "
             "`writer.prepare_global_plan` on the N ranks' plans (stock: DefaultSavePlanner + its FileSystemWriter; "
             "dcp_native: CachingSavePlanner + its FileSystemWriter, first plan and a save of the same structure); "
             "both make the same global plan and metadata (checked). `metadata`: the committed `.metadata` (with each "
             "item's storage entry): size; pickle with the cyclic collector on (stock's writer) / paused "
             "(dcp_native's); unpickle by stock's reader (collector on) and dcp_native's (its reader pauses the collector) "
             "and with it paused. `load`: "
             "`set_up_planner` + `create_local_plan` of one rank (real DTensors), stock's DefaultLoadPlanner vs "
             "dcp_native's CachingLoadPlanner, and its search alone once its chunk indexes are built; the same "
             "read items (checked)." + (f" Stock's coordinator step is stopped after {p['stock_cap_s']:g} s "
                                        "(`>`)." if p.get("stock_cap_s") else ""), "",
             "| ranks | write items | reps | coordinator: stock | dcp_native | dcp_native / stock | same structure | "
             ".metadata | pickle: gc on / paused | unpickle: stock / dcp_native / gc paused | load, 1 rank: stock | "
             "dcp_native | "
             "search alone | peak RSS |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        stock, capped = planning_point(r, "coordinator_stock")
        mine, _ = planning_point(r, "coordinator_dcp_native")
        ratio = f"{'≤ ' if capped else ''}{mine / stock:.3f}" if stock and mine else "–"
        md, ld = r.get("metadata", {}), r.get("load", {})
        items = f"{r['items']:,}" + ("" if r.get("layers") == p.get("layers") else f" ({r['layers']} layers)")
        lines.append(
            f"| {r['ranks']} | {items} | {r.get('reps', 1)} | {_secs(stock, capped)} | {_secs(mine)} | {ratio} | "
            f"{_secs(planning_point(r, 'coordinator_dcp_native_same')[0])} | "
            f"{md['bytes'] / 2**20:.1f} MiB | {_secs(md.get('pickle_gc_on'))} / {_secs(md.get('pickle_gc_paused'))} | "
            f"{_secs(md.get('unpickle_gc_on'))} / {_secs(md.get('unpickle_dcp_native'))} / "
            f"{_secs(md.get('unpickle_gc_paused'))} | {_secs(ld.get('stock'))} | "
            f"{_secs(ld.get('dcp_native'))} | {_secs(ld.get('dcp_native_search'))} | "
            f"{r.get('peak_rss_gib', 0):.1f} GiB |" if md else f"| {r['ranks']} | {items} | – |" + " – |" * 11)
    reduced = [r for r in rows if r.get("layers") != p.get("layers")]
    if reduced:
        lines += ["", "Rows marked with fewer layers hold a reduced model (the N ranks' plans of the full one would "
                  f"exceed {p.get('max_items', 0):,} write items in memory); the growth below compares time per item "
                  "of one rank."]
    growth = case.get("growth") or planning_growth(rows)
    if growth:
        spans = [f"{s['from']}→{s['to']}" for s in next(iter(growth.values()))]
        lines += ["", "Growth with N at a fixed model: the factor per doubling of N (exponent k of time ~ N^k: "
                  "1 = linear in N, 2 = quadratic; for one rank's load planning 0 = independent of N).", "",
                  "| series | " + " | ".join(spans) + " |", "|---|" + "---:|" * len(spans)]
        for series, steps in growth.items():
            by_span = {f"{s['from']}→{s['to']}": s for s in steps}
            cells = [(f"{'≥ ' if by_span[sp]['at_least'] else ''}{by_span[sp]['per_doubling']:.2f}x "
                      f"(k {by_span[sp]['exponent']:.2f})") if sp in by_span else "–" for sp in spans]
            lines.append(f"| {PLANNING_SERIES[series][0]} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def draw_planning(ax, case: dict) -> None:
    """Seconds against ranks (log-log): the coordinator step and one rank's load planning, stock
    and dcp_native; a capped stock point is drawn at its cap with an up-arrow marker. Rows of a
    reduced model are scaled to the full one by item count (hollow markers)."""
    rows = sorted(case.get("rows", []), key=lambda r: r["ranks"])
    full = max((r["items_per_rank"] for r in rows), default=1)
    styles = {"coordinator_stock": ("-", COLORS["stock"], "o"), "coordinator_dcp_native": ("-", COLORS["native"], "o"),
              "load_stock": ("--", COLORS["stock"], "s"), "load_dcp_native": ("--", COLORS["native"], "s"),
              "load_dcp_native_search": (":", COLORS["native_cached"], "s")}
    for series, (style, color, marker) in styles.items():
        pts = [(r["ranks"], *planning_point(r, series), full / r["items_per_rank"]) for r in rows]
        pts = [(n, v * scale, c, scale != 1) for n, v, c, scale in pts if v]
        if not pts:
            continue
        ax.plot([n for n, _, _, _ in pts], [v for _, v, _, _ in pts], style, color=color, marker=marker,
                markersize=3, label=PLANNING_SERIES[series][0].replace("one rank's ", "").replace(" (first plan)", ""))
        for n, v, capped, scaled in pts:
            if capped:
                ax.plot([n], [v], marker="^", color=color, markersize=8)
            if scaled:
                ax.plot([n], [v], marker=marker, markersize=7, markerfacecolor="white", color=color)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks (simulated)", fontsize=8)
    ax.set_ylabel("seconds")
    scaled = any(r["items_per_rank"] != full for r in rows)
    ax.set_title("planning at scale: coordinator step (solid), one rank's load\nplanning (dashed); ^ = stock stopped "
                 "at its cap" + ("; hollow: reduced model,\nscaled to the full one by item count" if scaled else ""),
                 fontsize=8)
    ax.legend(fontsize=6)
    ax.tick_params(labelsize=7)


# ----------------------------------------------------------------------------- cooperative loads

#: The cooperative workload's systems, in table and chart order.
COOP_SYSTEMS = ("stock", "native", "native_coop")


def cooperative_keys(cases: dict) -> list[str]:
    """The cooperative workload's cases: replicated then hsdp, cold then warm."""
    return [k for k in ordered_cases(cases) if cases[k].get("workload") == "cooperative"]


def _mib(n: float) -> str:
    if n == 0:
        return "0"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**20:.2f} MiB"


def render_cooperative(cases: dict) -> list[str]:
    """All the cooperative cases in one table: per layout and page cache, each system's time, GB/s,
    bytes read by all ranks over the checkpoint and bytes sent."""
    keys = cooperative_keys(cases)
    first = cases[keys[0]]
    p = first["params"]
    lines = [f"## cooperative loads: {p['ranks']} ranks ({p['backend']}) load one checkpoint", "",
             f"`{'`, `'.join(keys)}`; {first.get('reps')} reps after {first.get('warmup')} untimed load per system "
             f"and layout. Checkpoint: {_mib(p['checkpoint_bytes'])} of tensors ({p['layout']}; data files "
             f"{_mib(p['data_file_bytes'])}). Layouts: `replicated`, every rank loads every tensor (DDP); `hsdp`, a "
             f"({p['ranks'] // 2} x 2) mesh with (Replicate(), Shard(0)): every shard is needed by {p['ranks'] // 2} "
             f"ranks. {p['native_coop']}; dcp_native's reader: {p['reader_threads_per_rank']} threads a rank, "
             f"exchange_bytes {_mib(p['exchange_bytes'])}. Time: {p['time']}; GB/s: {p['gbps']}. `read / ckpt`: "
             f"bytes read from the checkpoint's files by all ranks together over the checkpoint's tensor bytes "
             f"({p['bytes_read']}; `*`: rchar); `sent`: bytes the ranks sent one another, all ranks together. "
             f"Process: {p['process']}. Peak: {p.get('peak', 'VmHWM above the start of the load')}. Every load's "
             "values are checked.", "",
             "On one machine the ranks share one disk and one page cache: a byte one rank reads is in the cache "
             "for the others, and an exchange goes over loopback. The time here therefore shows mostly what the "
             "exchange costs; what shared storage (NFS, Lustre, object stores) saves is the `read / ckpt` column: "
             "the bytes no rank had to fetch.", "",
             "| layout | page cache | system | s (median) | min–max | GB/s | read / ckpt | sent | cached before | "
             "peak MiB (max rank) |",
             "|---|:-:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in keys:
        c = cases[key]
        for name in [n for n in COOP_SYSTEMS if n in c["systems"]] + [n for n in c["systems"] if n not in COOP_SYSTEMS]:
            e = c["systems"][name]
            med, rng = _spread(e["seconds"])
            read = e.get("read_over_ckpt")
            read_cell = "–" if read is None else f"{read['median']:.2f}x" + ("*" if e.get("read_source") else "")
            sent = _mib(e["bytes_sent"]["median"]) if "bytes_sent" in e else "–"
            cached = f"{100 * e['resident_before']['median']:.0f}%" if "resident_before" in e else "–"
            lines.append(f"| {c.get('case', key)} | {_cache_short(c)} | {_label(name)} | {med} | {rng} | "
                         f"{_fmt_num(e['gbps']['median'])} | {read_cell} | {sent} | {cached} | "
                         f"{_fmt_num(e['peak_mib']['median'])} |")
    lines.append("")
    la = [cases[k].get("loadavg_before_after") for k in keys]
    if la and la[0] and la[0][0] and la[0][1]:
        lines += [f"Load average (1 min) {la[0][0][0]:.2f} before, {la[0][1][0]:.2f} after.", ""]
    return lines


def draw_cooperative(ax, cases: dict) -> None:
    """GB/s per layout and page cache, a bar per system (min–max); above each bar, the bytes all
    ranks read over the checkpoint."""
    keys = cooperative_keys(cases)
    names = [n for n in COOP_SYSTEMS if any(n in cases[k]["systems"] for k in keys)]
    width = 0.8 / max(1, len(names))
    top = 0.0
    for j, name in enumerate(names):
        xs, vals, lo, hi, reads = [], [], [], [], []
        for i, k in enumerate(keys):
            e = cases[k]["systems"].get(name)
            if e is None:
                continue
            g = e["gbps"]
            xs.append(i + (j - (len(names) - 1) / 2) * width)
            vals.append(g["median"])
            lo.append(g["median"] - g["min"])
            hi.append(g["max"] - g["median"])
            reads.append(e.get("read_over_ckpt", {}).get("median"))
        ax.bar(xs, vals, width, yerr=[lo, hi], capsize=2, color=COLORS.get(name, "#8c564b"),
               label=_label(name).replace("dcp_native ", ""))
        for x, v, h, r in zip(xs, vals, hi, reads):
            if r is not None:
                ax.text(x, v + h, f"{r:.1f}x", ha="center", va="bottom", fontsize=6)
            top = max(top, v + h)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{cases[k].get('case', k)}\n{cases[k].get('cache', '')}" for k in keys], fontsize=7)
    ax.set_ylabel("GB/s (checkpoint / slowest rank)")
    ax.set_ylim(0, top * 1.25 or 1)
    p = cases[keys[0]]["params"] if keys else {}
    ax.set_title(f"cooperative loads, {p.get('ranks')} ranks ({p.get('backend')}): GB/s; above the bars: bytes\n"
                 "read by all ranks / checkpoint (one machine: one disk, one page cache)", fontsize=8)
    ax.legend(fontsize=6)
    ax.tick_params(axis="y", labelsize=7)
