"""The ``dcp-native`` command line: inspect, verify and convert DCP checkpoints.

Works on checkpoints written by dcp_native and by stock DCP, on any machine,
without a process group. ``inspect`` and ``verify`` never run code from the
checkpoint: ``.metadata`` is read by an unpickler that admits only DCP's
metadata classes, and objects saved as bytes are described from their pickle
opcodes (``pickletools``), never unpickled. They read only item headers and
trailers (a few KiB per item), in batches through the engine.

``verify`` runs in passes, each adding problems to one list so that every
problem is reported, not only the first: metadata, data files and sizes, item
framing (zip end records, central directory, local headers, ``data.pkl``
against the metadata, the sidecar against the archive), the CRC32C of every
4 KiB block of each data file that has a checksum table (read in bounded
rounds, checked by the engine), and with ``--read-all`` every byte of every
item, also of files without checksums.
"""

from .._safe_pickle import describe_pickle
from .common import UsageError, CommandFailed
from .main import build_parser, main, quiet_warnings

__all__ = ["main", "build_parser", "quiet_warnings", "describe_pickle", "UsageError", "CommandFailed"]
