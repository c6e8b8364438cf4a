"""Smoke test of the benchmark: every case and every system at tiny size, no timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# The quick run forks gloo ranks (the resharding case).
pytestmark = pytest.mark.multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "run.py")

#: Systems each case must report (the script runs both engines itself).
EXPECTED = {
    "load": {"stock", "python", "native", "python_on_stock_ckpt", "native_on_stock_ckpt", "raw"},
    "peak": {"stock", "python", "native", "python_on_stock_ckpt", "native_on_stock_ckpt", "raw"},
    "small_save": {"stock", "python", "native", "noio", "raw"},
    "small_load": {"stock", "python", "native", "noio", "raw"},
    "save_nosync": {"stock", "python", "native", "raw"},
    "save_sync": {"stock", "python", "native", "raw"},
    "reshard": {"stock", "python", "native", "native_on_stock_ckpt", "raw"},
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    scratch = tmp_path_factory.mktemp("bench_scratch")
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--out", str(out), "--dir", str(scratch)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, scratch, proc


def test_json_has_every_case_and_system(quick_run):
    out, _, _ = quick_run
    doc = json.loads((out / "latest.json").read_text())
    assert doc["errors"] == []
    for key in ("cpu", "cores", "ram_bytes", "filesystem", "kernel"):
        assert doc["machine"][key], key
    assert doc["versions"]["torch"] and doc["versions"]["dcp_native"]
    assert set(doc["cases"]) == set(EXPECTED)
    for case, systems in EXPECTED.items():
        got = doc["cases"][case]["systems"]
        assert set(got) == systems, case
        for name, entry in got.items():
            figures = [v for v in entry.values() if isinstance(v, dict) and "median" in v]
            assert figures, (case, name)
            for fig in figures:
                assert fig["min"] <= fig["median"] <= fig["max"], (case, name, fig)
    for kind in ("small_save", "small_load"):
        for name in ("stock", "python", "native", "noio"):
            assert "total" in doc["cases"][kind]["systems"][name]["phases_s"]
    reshard = doc["cases"]["reshard"]["systems"]
    for name in ("python", "native", "raw"):
        assert reshard[name]["bytes_read"]["median"] > 0
    assert doc["targets"], "targets are evaluated"


def test_markdown_table_written(quick_run):
    out, _, _ = quick_run
    text = (out / "latest.md").read_text()
    assert "ratio vs stock" in text and "% of raw" in text
    assert "dcp_native native" in text and "raw pread/pwrite" in text


def test_scratch_directory_cleaned_up(quick_run):
    _, scratch, _ = quick_run
    assert os.listdir(scratch) == []
