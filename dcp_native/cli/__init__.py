"""The ``dcp-native`` command line: inspect, verify and convert DCP checkpoints.

Works on checkpoints written by dcp_native and by stock DCP, on any machine,
without a process group. ``inspect`` and ``verify`` never run code from the
checkpoint: ``.metadata`` is read by an unpickler that admits only DCP's
metadata classes, and objects saved as bytes are described from their pickle
opcodes (``pickletools``), never unpickled. They read only item headers and
trailers (a few KiB per item), in batches through the engine; ``verify`` also
reads the data files that have checksum tables (see :mod:`.verify`).
"""

from .common import CommandFailed, UsageError
from .main import build_parser, main, quiet_warnings

__all__ = ["main", "build_parser", "quiet_warnings", "UsageError", "CommandFailed"]
