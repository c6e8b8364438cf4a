"""Engine choice: DCP_NATIVE_BACKEND=auto|native|python (see :mod:`dcp_native.config`), read at
every use.

``auto`` (the default) uses the native engine when ``dcp_native._C`` imports and
falls back to the pure-Python engine with one warning otherwise; ``native``
raises :class:`BackendUnavailableError` when the extension cannot be loaded;
``python`` always uses the pure-Python engine.
"""

from __future__ import annotations

import threading
import warnings

from . import config
from ._errors import BackendUnavailableError
from .engine import Engine

ENV = config.BACKEND_ENV

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_native_error: BaseException | None = None
_warned = False


def _load(name: str) -> Engine:
    global _native_error
    with _lock:
        if name in _engines:
            return _engines[name]
        if name == "native":
            if _native_error is not None:
                raise _native_error
            try:
                from ._engine_native import NativeEngine

                engine: Engine = NativeEngine()
            except ImportError as exc:
                _native_error = exc
                raise
        else:
            from ._engine_python import PythonEngine

            engine = PythonEngine()
        _engines[name] = engine
        return engine


def get_engine() -> Engine:
    """The engine DCP_NATIVE_BACKEND selects now."""
    global _warned
    requested = config.backend()
    if requested == "python":
        return _load("python")
    try:
        return _load("native")
    except ImportError as exc:
        if requested == "native":
            raise BackendUnavailableError(
                f"{ENV}=native, but the native extension dcp_native._C cannot be loaded: {exc}. "
                "Rebuild it with `pip install -e .` (or `make venv`), or set "
                f"{ENV}=python to use the pure-Python engine."
            ) from exc
        if not _warned:
            _warned = True
            warnings.warn(
                f"dcp_native: the native extension could not be loaded ({exc}); using the "
                f"pure-Python engine. Set {ENV}=python to silence this warning.",
                RuntimeWarning,
                stacklevel=3,
            )
        return _load("python")


def backend() -> str:
    """Return the name of the active engine: ``"native"`` or ``"python"``.

    Example:
        >>> import dcp_native
        >>> dcp_native.backend() in ("native", "python")
        True
    """
    return get_engine().name
