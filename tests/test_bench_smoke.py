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
WORKLOADS = ("model", "cold", "many", "load", "small", "save", "reshard", "async")

MAIN = {"stock", "python", "native", "raw"}
#: Systems each case must report. --quick sweeps threads 1 and 2 (main: 2).
EXPECTED = {
    "model_save": MAIN | {"native_nocrc"},
    "model_load": MAIN,
    "model_save_t1": MAIN,
    "model_load_t1": {"python", "native", "raw"},
    "model_load_cold": MAIN | {"raw_direct"},
    "many_save": MAIN | {"noio"},
    "many_load": MAIN | {"noio"},
    "load": MAIN | {"python_on_stock_ckpt", "native_on_stock_ckpt"},
    "peak": MAIN | {"python_on_stock_ckpt", "native_on_stock_ckpt"},
    "small_save": MAIN | {"noio"},
    "small_load": MAIN | {"noio"},
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


def test_markdown_table_written(quick_run):
    out, _, _ = quick_run
    doc = json.loads((out / "latest.json").read_text())
    text = (out / "latest.md").read_text()
    assert "## summary" in text and "ratio vs stock" in text and "% of raw" in text
    for label in ("stock DCP", "dcp_native python", "dcp_native native", "raw pread/pwrite", "raw pread, O_DIRECT"):
        assert label in text, label
    for case in doc["cases"].values():
        if not case["title"].startswith(("save the model state, 1 threads", "load the model state, 1 threads")):
            assert case["title"] in text, case["title"]
    assert "thread counts" in text


def test_chart_written(quick_run):
    out, _, _ = quick_run
    doc = json.loads((out / "latest.json").read_text())
    chart = doc["chart"]
    panels = {p["case"]: p for p in chart["panels"]}
    for case, systems in EXPECTED.items():
        if case in ("peak",) or case.endswith("_t1"):
            continue
        p = panels[case]
        unsupported = set(doc["cases"][case].get("unsupported", {}))
        assert set(p["systems"]) | {p["reference"]} | unsupported == systems, case
        assert p["reference"] == "raw", case
    assert "thread_sweep" in panels
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
