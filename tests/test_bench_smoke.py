"""Smoke test of the benchmark suite: every workload and system at tiny size, no timing assertions."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# The quick run forks gloo ranks (the resharding cases).
pytestmark = pytest.mark.multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "run.py")
#: Every workload that runs without a GPU.
WORKLOADS = ("model", "cold", "many", "load", "small", "save", "reshard", "async", "repeat", "savesweep")

MAIN = {"stock", "python", "native", "raw"}
#: The save thread sweep's systems, at every thread count, sync off and on.
SWEEP = {"stock", "python_nocrc", "python_crc", "native_nocrc", "native_crc", "raw"}
#: Long-lived (one process, several saves / loads) systems of the small case.
LONG_SAVE = {"stock", "stock_cached", "python", "native", "noio"}
LONG_LOAD = {"stock", "python", "native", "noio"}
#: Systems each case must report. --quick sweeps threads 1 and 2 (main: 2).
EXPECTED = {
    "model_save": MAIN | {"native_nocrc"},
    "model_load": MAIN,
    "model_save_t1": MAIN,
    "model_load_t1": {"python", "native", "raw"},
    "model_load_cold": MAIN | {"raw_direct"},
    "many_save": MAIN | {"noio", "stock_cached"},
    "many_load": MAIN | {"noio"},
    "load": MAIN | {"python_on_stock_ckpt", "native_on_stock_ckpt"},
    "peak": MAIN | {"python_on_stock_ckpt", "native_on_stock_ckpt"},
    "small_save": MAIN | {"noio", "stock_cached"},
    "small_load": MAIN | {"noio"},
    "small_save_longlived": LONG_SAVE,
    "small_load_longlived": LONG_LOAD,
    # dcp_native's caching planners (*_cached) run where dcp_native exports them, else are reported as not run.
    "repeat_save": LONG_SAVE | {"native_stock_cached", "python_cached", "native_cached"},
    "repeat_load": LONG_LOAD | {"python_cached", "native_cached"},
    **{f"savesweep_{sync}_t{t}": SWEEP for sync in ("nosync", "sync") for t in (1, 2)},
    "save_nosync": MAIN | {"native_nocrc"},
    "save_sync": MAIN | {"native_nocrc"},
    "reshard": MAIN | {"native_on_stock_ckpt"},
    "reshard_3": MAIN | {"native_on_stock_ckpt"},
    "async": MAIN | {"stock_pinned"},
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    scratch = tmp_path_factory.mktemp("bench_scratch")
    cmd = [sys.executable, SCRIPT, "--quick", "--device", "cpu", "--out", str(out), "--dir", str(scratch)]
    for w in WORKLOADS:
        cmd += ["--workload", w]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, scratch, proc


def test_json_has_every_case_and_system(quick_run):
    out, _, _ = quick_run
    doc = json.loads((out / "latest.json").read_text())
    assert doc["errors"] == []
    for key in ("cpu", "cores", "ram_bytes", "filesystem", "kernel"):
        assert doc["machine"][key], key
    assert doc["versions"]["torch"] and doc["versions"]["dcp_native"]
    assert doc["versions"]["native_engine"] is True
    assert set(doc["engines"]) == {"stock", "python", "native"}
    assert set(doc["cases"]) == set(EXPECTED)
    for case, systems in EXPECTED.items():
        c = doc["cases"][case]
        assert c["page_cache"], case
        got = c["systems"]
        # A system this torch cannot run is reported as such (stock's DefaultStager on torch 2.11).
        assert set(got) | set(c.get("unsupported", {})) == systems, case
        for name, entry in got.items():
            figures = [v for v in entry.values() if isinstance(v, dict) and "median" in v]
            assert figures, (case, name)
            for fig in figures:
                assert fig["min"] <= fig["median"] <= fig["max"], (case, name, fig)
            if case != "peak":
                assert entry["gbps"]["median"] > 0 and entry["peak_mib"]["median"] >= 0, (case, name)
    for kind in ("small_save", "small_load"):
        for name in ("stock", "python", "native", "noio"):
            assert "total" in doc["cases"][kind]["systems"][name]["phases_s"]
    for key in ("reshard", "reshard_3"):
        systems = doc["cases"][key]["systems"]
        for name in ("python", "native", "raw"):
            assert systems[name]["bytes_read"]["median"] > 0
            assert systems[name]["read_over_needed"]["median"] >= 1.0
    # Page-cache state measured per load figure: warm loads cached, cold loads evicted.
    for name, e in doc["cases"]["model_load"]["systems"].items():
        assert e["resident_before"]["median"] > 0.9, name
    for name, e in doc["cases"]["model_load_cold"]["systems"].items():
        assert e["resident_before"]["median"] < 0.1, name
    assert doc["cases"]["async"]["systems"]["native"]["blocking_s"]["median"] > 0
    assert doc["targets"], "targets are evaluated"
    # Issue 13: stock's plan cache as a system (this torch has enable_plan_caching).
    for case in ("many_save", "small_save", "small_save_longlived", "repeat_save"):
        assert "stock_cached" in doc["cases"][case]["systems"], case
    # Long-lived figures: the median of the 2nd and later of --repeat-iters (3 in --quick) per process.
    for case in ("small_save_longlived", "small_load_longlived", "repeat_save", "repeat_load"):
        c = doc["cases"][case]
        assert c["params"]["iters"] == 3, case
        for name, e in c["systems"].items():
            assert e["first_seconds"]["median"] > 0, (case, name)
            assert [len(run) for run in e["iter_seconds"]] == [3] * c["reps"], (case, name)
    # Per-item cost above DCP's floor, fresh and long-lived, save and load.
    for case in ("small_save", "small_load", "small_save_longlived", "small_load_longlived"):
        systems = doc["cases"][case]["systems"]
        assert systems["noio"]["us_above_floor"] == 0, case
        for name in ("python", "native"):
            assert isinstance(systems[name]["us_above_floor"], float), (case, name)
    # The save sweep's ratios, per thread count and sync.
    for sync in ("nosync", "sync"):
        for t in (1, 2):
            c = doc["cases"][f"savesweep_{sync}_t{t}"]
            assert c["threads"] == t and c["params"]["sync_files"] == (sync == "sync")
            for ratio in ("native_crc/native_nocrc", "native_crc/python_crc", "native_crc/python_nocrc",
                          "native_crc/raw"):
                assert c["ratios"][ratio] > 0, (sync, t, ratio)
    issue13 = {t["target"] for t in doc["targets"] if t["source"] == "issue13"}
    for what in ("save sweep, sync off: native, checksums on / off", "save sweep, sync on: native / python",
                 "small load, long-lived process: native's own cost above DCP's floor",
                 "second and later saves: native", "second and later loads: native"):
        assert any(t.startswith(what) for t in issue13), (what, issue13)


def test_markdown_table_written(quick_run):
    out, _, _ = quick_run
    doc = json.loads((out / "latest.json").read_text())
    text = (out / "latest.md").read_text()
    assert "## summary" in text and "ratio vs stock" in text and "% of raw" in text
    for label in ("stock DCP", "dcp_native python", "dcp_native native", "raw pread/pwrite", "raw pread, O_DIRECT"):
        assert label in text, label
    for case in doc["cases"].values():
        if case["workload"] == "savesweep":
            continue  # tabulated together, below
        if not case["title"].startswith(("save the model state, 1 threads", "load the model state, 1 threads")):
            assert case["title"] in text, case["title"]
    assert "thread counts" in text
    assert "## save thread sweep" in text and "| native_crc/native_nocrc |" in text
    assert "GB/s, sync_files off" in text and "GB/s, sync_files on" in text
    assert "## per-item cost above DCP's floor" in text
    assert "stock DCP + its plan cache" in text and "first ms" in text


def test_chart_written(quick_run):
    out, _, _ = quick_run
    doc = json.loads((out / "latest.json").read_text())
    chart = doc["chart"]
    panels = {p["case"]: p for p in chart["panels"]}
    for case, systems in EXPECTED.items():
        if case in ("peak",) or case.endswith("_t1") or case.startswith("savesweep_"):
            continue
        p = panels[case]
        unsupported = set(doc["cases"][case].get("unsupported", {}))
        assert set(p["systems"]) | {p["reference"]} - {None} | unsupported == systems, case
        assert p["reference"] == ("raw" if "raw" in systems else None), case
    assert "thread_sweep" in panels
    for sync in ("nosync", "sync"):
        assert set(panels[f"savesweep_{sync}"]["systems"]) == SWEEP
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed here (`make bench` installs it): latest.png not drawn")
    png = out / "latest.png"
    assert chart["path"] == "latest.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_scratch_directory_cleaned_up(quick_run):
    _, scratch, _ = quick_run
    assert os.listdir(scratch) == []


def test_cuda_without_a_gpu_fails_clearly(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--device", "cuda", "--out", str(tmp_path), "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode != 0
    assert "torch.cuda.is_available() is False" in proc.stderr
    assert not (tmp_path / "latest.json").exists()


def test_caching_planner_systems_are_feature_detected(tmp_path, monkeypatch):
    """dcp_native's caching planners are found in dcp_native.__all__ at run time; without them the system
    reports itself not run. Checked with stand-in planners through the long-lived save and load."""
    pytest.importorskip("torch")
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

    import dcp_native

    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    from dcpbench import ops

    monkeypatch.setenv("DCP_NATIVE_BACKEND", os.environ.get("DCP_NATIVE_BACKEND", "native"))
    threads = torch.get_num_threads()
    assert isinstance(ops.make_planner("stock", save=True), DefaultSavePlanner)
    # Without caching planners in dcp_native.__all__ (or enable_plan_caching in torch): not run, and why.
    with monkeypatch.context() as m:
        m.setattr(dcp_native, "__all__", [n for n in dcp_native.__all__ if not n.endswith("Planner")])
        for save in (True, False):
            with pytest.raises(ops.Unsupported, match="exports no"):
                ops.make_planner("native_cached", save=save)

        class OldSavePlanner(DefaultSavePlanner):
            def __init__(self, flatten_state_dict: bool = True) -> None:
                super().__init__(flatten_state_dict)

        m.setattr("torch.distributed.checkpoint.default_planner.DefaultSavePlanner", OldSavePlanner)
        with pytest.raises(ops.Unsupported, match="no enable_plan_caching"):
            ops.make_planner("stock_cached", save=True)

    class CachingSavePlanner(DefaultSavePlanner):
        saves = 0

        def create_local_plan(self):
            CachingSavePlanner.saves += 1
            return super().create_local_plan()

    class CachingLoadPlanner(DefaultLoadPlanner):
        loads = 0

        def create_local_plan(self):
            CachingLoadPlanner.loads += 1
            return super().create_local_plan()

    monkeypatch.setattr(dcp_native, "CachingSavePlanner", CachingSavePlanner, raising=False)
    monkeypatch.setattr(dcp_native, "CachingLoadPlanner", CachingLoadPlanner, raising=False)
    monkeypatch.setattr(dcp_native, "__all__", list(dcp_native.__all__) + ["CachingSavePlanner", "CachingLoadPlanner"])
    data = {"kind": "uniform", "count": 20, "numel": 64, "shape": [8, 8], "prefix": "opt"}
    base = {"bench": str(tmp_path), "seed": 3, "data": data, "threads": 2, "iters": 2, "verify": True}
    try:
        res = ops.op_repeat_save(dict(base, system="native_cached", sync=False, dir=str(tmp_path / "s"),
                                      verifier="native"))
        assert CachingSavePlanner.saves == 2 and len(res["iter_seconds"]) == 2 and res["bytes"] == 20 * 64 * 4
        res = ops.op_repeat_load(dict(base, system="native_cached", dir=str(tmp_path / "s" / "1")))
        assert CachingLoadPlanner.loads == 2 and len(res["iter_seconds"]) == 2
        if "enable_plan_caching" in DefaultSavePlanner.__init__.__code__.co_varnames:
            assert ops.make_planner("stock_cached", save=True)._enable_plan_caching
        with pytest.raises(ops.Unsupported):
            ops.make_planner("stock_cached", save=False)  # stock caches no load plans
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------- issue 14: planning at scale

#: What one row of the planning case holds (benchmarks/planning_scale.py).
PLANNING_ROW = {"ranks", "layers", "parameters", "items_per_rank", "items", "reps", "coordinator", "metadata",
                "load", "peak_rss_gib", "model", "full_layers", "reps_items", "faithful"}


@pytest.fixture(scope="module")
def planning_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("planning_out")
    scratch = tmp_path_factory.mktemp("planning_scratch")
    cmd = [sys.executable, SCRIPT, "--quick", "--device", "cpu", "--workload", "planning", "--out", str(out),
           "--dir", str(scratch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, scratch


def test_planning_case_structure(planning_run):
    out, scratch = planning_run
    doc = json.loads((out / "latest.json").read_text())
    assert doc["errors"] == [] and set(doc["cases"]) == {"planning"}
    case = doc["cases"]["planning"]
    assert case["workload"] == "planning" and case["params"]["ranks"] == [4, 16]
    assert "real DTensors" in case["params"]["faithful"] and case["params"]["model"].startswith("Llama-like")
    assert [r["ranks"] for r in case["rows"]] == [4, 16]
    for row in case["rows"]:
        assert set(row) == PLANNING_ROW, row.keys()
        coord = row["coordinator"]
        assert coord["same_as_stock"] is True
        for name in ("stock", "dcp_native", "dcp_native_same_structure"):
            assert coord[name] > 0 and len(coord["samples"][name]) == row["reps"], name
        md = row["metadata"]
        assert md["bytes"] > 0
        for name in ("pickle_gc_on", "pickle_gc_paused", "unpickle_gc_on", "unpickle_dcp_native", "unpickle_gc_paused"):
            assert md[name] > 0, name
        load = row["load"]
        assert load["rank"] == row["ranks"] // 2 and 0 < load["read_items"] <= row["items_per_rank"]
        for name in ("stock", "dcp_native", "dcp_native_search"):
            assert load[name] > 0, name
    # Growth per doubling of N, for every series, between the two rank counts.
    assert {s["from"] for steps in case["growth"].values() for s in steps} == {4}
    assert "coordinator_stock" in case["growth"] and "load_dcp_native_search" in case["growth"]
    issue14 = [t for t in doc["targets"] if t["source"] == "issue14"]
    assert any(t["target"].startswith("planning: one rank's load search") for t in issue14)
    assert os.listdir(scratch) == []


def test_planning_case_in_tables_and_chart(planning_run):
    out, _ = planning_run
    doc = json.loads((out / "latest.json").read_text())
    text = (out / "latest.md").read_text()
    assert doc["cases"]["planning"]["title"] in text
    assert "| ranks | write items | reps | coordinator: stock | dcp_native | dcp_native / stock |" in text
    assert "Growth with N at a fixed model" in text and "| coordinator step, stock |" in text
    assert [p["case"] for p in doc["chart"]["panels"]] == ["planning"]


def test_planning_script_runs_alone(tmp_path):
    """benchmarks/planning_scale.py on its own: the faithfulness check, the rows, the table, --json."""
    path = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "planning_scale.py"), "--quick",
                           "--ranks", "3,6", "--reps", "1", "--json", str(path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    case = json.loads(path.read_text())
    assert [r["ranks"] for r in case["rows"]] == [3, 6]
    assert all(r["coordinator"]["same_as_stock"] for r in case["rows"])
    assert "| 6 |" in proc.stdout and "Growth with N" in proc.stdout


# ---------------------------------------------------------------------- cooperative loads

COOP_CASES = {f"cooperative_{layout}_{cache}" for layout in ("replicated", "hsdp") for cache in ("cold", "warm")}
COOP_SYSTEMS = {"stock", "native", "native_coop"}


@pytest.fixture(scope="module")
def cooperative_run(tmp_path_factory):
    # 4 ranks, not 2: the hsdp layout needs a (2 x 2) mesh (forked ranks: ~2 s more than 2 ranks).
    out = tmp_path_factory.mktemp("coop_out")
    scratch = tmp_path_factory.mktemp("coop_scratch")
    cmd = [sys.executable, SCRIPT, "--quick", "--device", "cpu", "--workload", "cooperative", "--coop-ranks", "4",
           "--coop-size", "4M", "--reps", "1", "--out", str(out), "--dir", str(scratch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, scratch


def test_cooperative_case_structure(cooperative_run):
    out, scratch = cooperative_run
    doc = json.loads((out / "latest.json").read_text())
    assert doc["errors"] == [] and set(doc["cases"]) == COOP_CASES
    for key in COOP_CASES:
        c = doc["cases"][key]
        assert c["workload"] == "cooperative" and c["kind"] == "cooperative", key
        assert c["params"]["ranks"] == 4 and c["params"]["backend"] == "gloo"
        assert key == f"cooperative_{c['case']}_{c['cache']}" and c["page_cache"].startswith(c["cache"])
        assert set(c["systems"]) == COOP_SYSTEMS, key
        ckpt = c["params"]["checkpoint_bytes"]
        for name, e in c["systems"].items():
            assert e["bytes"] == ckpt and len(e["gbps"]["samples"]) == 1, (key, name)
            assert e["gbps"]["median"] > 0 and e["rchar"]["median"] > 0, (key, name)
            assert len(e["per_rank_last"]["bytes_read"]) == 4, (key, name)
            # Cold: rank 0 evicted the files before the load; warm: the loads before read them.
            assert (e["resident_before"]["median"] < 0.1) == (c["cache"] == "cold"), (key, name)
        stock, alone, coop = (c["systems"][n] for n in ("stock", "native", "native_coop"))
        assert stock["read_source"] == "rchar" and "bytes_read" not in stock
        assert alone["bytes_sent"]["median"] == 0 and alone["bytes_read"]["median"] > 0
        # What one rank sends another receives; shared bytes are read once.
        assert coop["bytes_sent"]["median"] == coop["bytes_received"]["median"] > 0, key
        assert coop["read_over_ckpt"]["median"] < alone["read_over_ckpt"]["median"], key
    targets = [t for t in doc["targets"] if t["source"] == "cooperative"]
    assert len(targets) == 4
    for t in targets:
        on = t["target"].endswith("cooperative on")
        assert (t["op"], t["limit"]) == (("<=", 1.15) if on else ("info", None)), t
        assert (t["met"] is None) == (not on), t
    assert os.listdir(scratch) == []


def test_cooperative_case_in_tables_and_chart(cooperative_run):
    out, _ = cooperative_run
    doc = json.loads((out / "latest.json").read_text())
    text = (out / "latest.md").read_text()
    assert "## cooperative loads: 4 ranks (gloo) load one checkpoint" in text
    assert "| layout | page cache | system | s (median) | min–max | GB/s | read / ckpt | sent |" in text
    assert "one disk and one page cache" in text
    for layout in ("replicated", "hsdp"):
        for cache in ("cold", "warm"):
            assert f"| {layout} | {cache} | dcp_native native, cooperative |" in text, (layout, cache)
        assert f"cooperative loads, {layout}, 4 ranks: bytes read by all ranks / checkpoint, cooperative on" in text
    assert [p["case"] for p in doc["chart"]["panels"]] == ["cooperative"]
    assert set(doc["chart"]["panels"][0]["systems"]) == COOP_SYSTEMS
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cooperative_script_runs_alone(tmp_path):
    """benchmarks/cooperative.py on its own (as gpu_check.sh runs it, on the CPU): 2 ranks, the
    table, the JSON, and a last line saying what cooperation saved."""
    path = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "cooperative.py"), "--ranks", "2",
                           "--mb", "4", "--reps", "1", "--warmup", "0", "--cache", "warm", "--dir", str(tmp_path),
                           "--out", str(path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("hsdp: not run: needs an even number of ranks, at least 4")
    assert lines[-1].startswith("replicated: read/ckpt ")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["case"], r["system"], r["cache"]) for r in rows] == [
        ("replicated", s, "warm") for s in ("stock", "native", "native_coop")]
    coop = rows[2]
    assert coop["cooperative"] is True and coop["bytes_sent"] > 0 and coop["read_over_checkpoint"] < 1.15
    assert sorted(os.listdir(tmp_path)) == ["rows.json"]


def test_cooperative_script_skips_without_gpus(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has two GPUs: the script would run")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "cooperative.py"), "--device", "cuda",
                           "--ranks", "2", "--mb", "256", "--reps", "2", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.startswith("SKIP"), proc.stdout + proc.stderr
    assert os.listdir(tmp_path) == []
