"""Shared fixtures: every I/O test runs on both engines."""

from __future__ import annotations

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
