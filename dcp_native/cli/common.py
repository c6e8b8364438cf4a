"""What the commands share: exit codes, output helpers, and opening a checkpoint through the model."""

from __future__ import annotations

import functools
import io
import json
import os
from typing import Any, Iterator, Sequence

import torch

from .. import checkpoint
from .._backend import get_engine
from .._errors import BackendUnavailableError, CheckpointError
from ..checkpoint import Checkpoint, Item, ItemBytes
from ..reader import default_thread_count
from ..sidecar import Sidecar

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_BUG = 4

PROG = "dcp-native"
_METADATA = checkpoint.METADATA_NAME
#: Bytes of temporary buffers verify and inspect hold at once.
_READ_BUDGET = 64 << 20
#: Items per batch of header reads (also the progress bar's step).
_ITEMS_PER_ROUND = 1024
#: Progress bar (auto) for checkpoints with at least this many items or bytes to read.
_PROGRESS_MIN_ITEMS = 1000
_PROGRESS_MIN_BYTES = 1 << 30

EXIT_CODES_HELP = """\
exit codes:
  0  success; for verify: the checkpoint is intact
  1  verify found problems (each printed with its key, file and offset)
  2  usage error or bad input: a path that is not a checkpoint or not a
     torch.save file, an unknown key, an output that exists (without --force),
     DCP_NATIVE_BACKEND naming an engine that cannot be loaded
  3  the command could not finish: an I/O error, or a checkpoint too damaged
     to read (run `dcp-native verify` on it)
  4  internal error (a bug in dcp-native; the traceback is printed)
"""


class UsageError(Exception):
    """Bad input from the user: exit 2 with a one-line message."""


class CommandFailed(Exception):
    """The command could not finish: exit 3 with a one-line message."""


# --------------------------------------------------------------------------- small helpers


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _os_error_text(exc: OSError) -> str:
    if exc.filename and exc.strerror and not isinstance(exc, CheckpointError):
        return f"{exc.filename}: {exc.strerror}"
    return _one_line(exc)


def _weights_only_reason(exc: BaseException) -> str:
    """The line of torch.load's weights_only refusal that names the refused global."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        for line in text.split(marker, 1)[1].splitlines():
            if line.strip():
                return line.strip().split(". ", 1)[0]
    return _one_line(exc)


def _torch_load_objects(source: Any, weights_only: bool, **kwargs: Any) -> Any:
    """torch.load, with io.BytesIO allowed under weights_only (DCP saves BytesIO values as such)."""
    if not weights_only:
        return torch.load(source, weights_only=False, **kwargs)
    with torch.serialization.safe_globals([io.BytesIO]):
        return torch.load(source, weights_only=True, **kwargs)


def _engine():
    """The engine DCP_NATIVE_BACKEND selects; a bad choice is the user's to fix (exit 2)."""
    try:
        return get_engine()
    except (BackendUnavailableError, ValueError) as exc:
        raise UsageError(_one_line(exc)) from None


def _threads() -> int:
    return default_thread_count()


def _json(doc: Any) -> str:
    """Indented JSON with lists of scalars (shapes, file names) kept on one line."""
    nonce = os.urandom(6).hex()
    inline: dict[str, str] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            if any(isinstance(v, (dict, list)) for v in x):
                return [walk(v) for v in x]
            token = f"{nonce}:{len(inline)}"
            inline[json.dumps(token)] = json.dumps(x)
            return token
        return x

    text = json.dumps(walk(doc), indent=2)
    for token, value in inline.items():
        text = text.replace(token, value, 1)
    return text


def _keys_match(key: str, pattern: str) -> bool:
    prefix = pattern if pattern.endswith(".") else pattern + "."
    return key == pattern or key.startswith(prefix)


def _select_keys(keys: Sequence[str], patterns: Sequence[str] | None, where: str) -> list[str]:
    """Keys named by ``patterns`` (exact keys or dotted prefixes), in checkpoint order."""
    if not patterns:
        return list(keys)
    chosen = set()
    for pattern in patterns:
        hits = [k for k in keys if _keys_match(k, pattern)]
        if not hits:
            raise UsageError(
                f"no key in {where} is {pattern!r} or starts with {pattern.rstrip('.') + '.'!r} "
                f"(list them with `{PROG} inspect {where}`)"
            )
        chosen.update(hits)
    return [k for k in keys if k in chosen]


# --------------------------------------------------------------------------- the checkpoint


class _BadMetadata(Exception):
    """``.metadata`` exists but does not load (the message says why, without the path)."""


def _written_by(sc: Sidecar) -> str:
    if sc.usable:
        return "dcp_native"
    return "stock DCP" if sc.status == "absent" else "dcp_native (sidecar not usable)"


def _describe_sidecar(sc: Sidecar) -> str:
    if sc.usable:
        return f"written by dcp_native (sidecar {sc.name}, format {sc.version})"
    if sc.status == "absent":
        return "written by stock DCP (no dcp_native sidecar)"
    return f"sidecar ignored: {sc.reason}"


def _checkpoint_dir(path: str) -> str:
    """The checkpoint directory PATH names (PATH itself, or the folder of PATH/.metadata)."""
    if os.path.basename(os.path.normpath(path)) == _METADATA and os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        raise UsageError(f"{path} is a file, not a DCP checkpoint directory")
    return path


def _looks_like_unfinished_save(directory: str) -> list[str]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(n for n in names if n.endswith(".distcp") or n.startswith(_METADATA))


class _Opened(Checkpoint):
    """A checkpoint as the commands see it: its items listed once."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.item_list = self.items()
        self.files = sorted({item.file for item in self.item_list})
        self._sizes: dict[str, int] | None = None

    def file_sizes(self) -> dict[str, int]:
        """Sizes of the data files that can be read (missing, refused and irregular ones left out)."""
        if self._sizes is None:
            self._sizes = {}
            for rel in self.files:
                try:
                    self._sizes[rel] = self.data_file_size(rel)
                except OSError:
                    pass
        return self._sizes


def _open_checkpoint(path: str) -> _Opened:
    """The checkpoint at ``path``; UsageError when it is none, _BadMetadata when it does not load."""
    directory = _checkpoint_dir(path)
    md_path = os.path.join(directory, _METADATA)
    try:
        return _Opened(directory)
    except FileNotFoundError:
        found = _looks_like_unfinished_save(directory)
        hint = (
            f" (it holds {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}: "
            "an unfinished save, or .metadata was lost)"
            if found
            else ""
        )
        raise UsageError(f"{directory} is not a DCP checkpoint: it has no {_METADATA}{hint}") from None
    except CheckpointError as exc:  # not a regular file, refused, or not DCP metadata
        text = _one_line(exc)
        raise _BadMetadata(text[len(md_path):].lstrip(":").strip() if text.startswith(md_path) else text) from None
    except OSError as exc:
        raise CommandFailed(_os_error_text(exc)) from None


def _open_or_fail(path: str) -> _Opened:
    """:func:`_open_checkpoint` for the commands that cannot report a damaged .metadata (exit 3)."""
    try:
        return _open_checkpoint(path)
    except _BadMetadata as exc:
        raise CommandFailed(
            f"{os.path.join(path, _METADATA)} {exc} (run `{PROG} verify` on it)"
        ) from None


def _item_views(ck: Checkpoint, items: Sequence[Item]) -> Iterator[tuple[Item, ItemBytes | OSError]]:
    """Head and tail of each item through the engine, in rounds (an item that cannot be read
    yields its error); other ranges of an item are read on demand."""
    engine, threads = _engine(), _threads()

    def read(boxes: dict) -> None:
        checkpoint.read_boxes(engine, ck.directory, boxes, threads)

    def fetch(item: Item, start: int, n: int) -> bytes:
        return bytes(checkpoint.read_ranges(engine, ck.directory, [(item.file, item.offset + start, n)], threads)[0])

    spans = [(it.file, it.offset, it.length) for it in items]
    budget = _ITEMS_PER_ROUND * 2 * checkpoint.PROBE_BYTES
    for i, view in checkpoint.probe(spans, read, budget, isolate=True):
        if not isinstance(view, OSError):
            view.fetch = functools.partial(fetch, items[i])
        yield items[i], view
