"""Choosing the engine: DCP_NATIVE_BACKEND (native, python, auto), and a clear error or a warning
when the native engine cannot be loaded (dcp_native._backend)."""

from __future__ import annotations

import sys
import warnings

import pytest

import dcp_native
from dcp_native import _backend


def test_backend_reports_engine(engine_name):
    assert dcp_native.backend() == engine_name


def test_invalid_backend_value(monkeypatch):
    monkeypatch.setenv("DCP_NATIVE_BACKEND", "gpu")
    with pytest.raises(ValueError, match="DCP_NATIVE_BACKEND"):
        dcp_native.backend()


def test_native_requested_but_unavailable(monkeypatch):
    monkeypatch.setattr(_backend, "_engines", {})
    monkeypatch.setattr(_backend, "_native_error", None)
    monkeypatch.setattr(_backend, "_warned", False)
    monkeypatch.setitem(sys.modules, "dcp_native._C", None)  # makes the import fail
    monkeypatch.delitem(sys.modules, "dcp_native._engine_native", raising=False)
    monkeypatch.setenv("DCP_NATIVE_BACKEND", "native")
    with pytest.raises(dcp_native.BackendUnavailableError, match="DCP_NATIVE_BACKEND=python"):
        dcp_native.backend()
    monkeypatch.setenv("DCP_NATIVE_BACKEND", "auto")
    with pytest.warns(RuntimeWarning, match="pure-Python engine"):
        assert dcp_native.backend() == "python"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert dcp_native.backend() == "python"
