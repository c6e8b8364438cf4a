"""Shared fixtures: every I/O test runs on both engines."""

from __future__ import annotations

import gc

import pytest

ENGINES = ("native", "python")


@pytest.fixture(params=ENGINES)
def engine_name(request, monkeypatch) -> str:
    """Selects the engine through DCP_NATIVE_BACKEND for the duration of a test."""
    monkeypatch.setenv("DCP_NATIVE_BACKEND", request.param)
    return request.param


@pytest.fixture
def engine(engine_name):
    """The engine object itself, for tests of the engine seam."""
    from dcp_native._backend import get_engine

    return get_engine()


@pytest.fixture
def fake(monkeypatch):
    """The fake CUDA runtime (tests/helpers.py) selected for both engines, counters reset."""
    from helpers import FAKE_NAME, Fake, fake_path

    from dcp_native.config import CUDART_ENV

    path = fake_path()
    if path is None:
        pytest.skip(f"the fake CUDA runtime is not built ({FAKE_NAME}: run setup.py build_ext)")
    monkeypatch.setenv(CUDART_ENV, str(path))
    for name in ("DCP_NATIVE_FAKE_CUDA_FAIL", "DCP_NATIVE_FAKE_CUDA_DEVICES", "DCP_NATIVE_TEST_NO_DIRECT"):
        monkeypatch.delenv(name, raising=False)
    result = Fake(path)
    # Pools an earlier test dropped without close() are freed when collected: collect
    # now, so that it does not happen in the middle of this test's accounting.
    if result.counter("pinned_bytes"):
        gc.collect()
    result.lib.fake_cuda_wait_idle()
    result.lib.fake_cuda_reset()
    result.pinned0 = result.counter("pinned_bytes")
    result.events0 = result.counter("events_live")
    yield result
    result.lib.fake_cuda_wait_idle()
    result.lib.fake_cuda_reset()
    result.lib.cudaSetDevice(0)  # the fake's current device is per thread, as the real one's


# ------------------------------------------------------------------ CUDA tests

#: Set to 1 on a machine that must have a GPU: a skipped ``cuda`` test is then a failure.
REQUIRE_CUDA_ENV = "DCP_NATIVE_REQUIRE_CUDA"


def _require_cuda() -> bool:
    import os

    return os.environ.get(REQUIRE_CUDA_ENV, "") not in ("", "0")


def pytest_runtest_setup(item) -> None:
    if item.get_closest_marker("cuda") is None:
        return
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under DCP_NATIVE_REQUIRE_CUDA=1, a ``cuda`` test that skips (for any reason) fails."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("cuda") is not None and _require_cuda():
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_CUDA_ENV}=1 but this CUDA test was skipped: {reason}"
