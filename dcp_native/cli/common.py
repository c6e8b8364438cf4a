"""What the commands share: exit codes, output helpers, and opening a checkpoint through the model."""

from __future__ import annotations

import collections
import functools
import json
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

from .. import checkpoint
from .._backend import get_engine
from .._errors import BackendUnavailableError, CheckpointError
from ..checkpoint import Archive, ArchiveError, Checkpoint, Item
from ..reader import default_thread_count
from ..sidecar import Sidecar

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_FAILED, EXIT_BUG = range(5)

PROG = "dcp-native"
_METADATA = checkpoint.METADATA_NAME
#: Bytes of temporary buffers verify and inspect hold at once.
_READ_BUDGET = 64 << 20
#: Items per batch of header reads.
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


def _human(n: float) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def _plural(n: int, word: str) -> str:
    return f"{n} {word if n == 1 else word + 's'}"


def _listing(names: Iterable[str], most: int) -> str:
    """The first ``most`` names, comma-separated, with ", ..." when there are more."""
    names = list(names)
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


def _os_error_text(exc: OSError) -> str:
    if exc.filename and exc.strerror and not isinstance(exc, CheckpointError):
        return f"{exc.filename}: {exc.strerror}"
    return _one_line(exc)


def _engine():
    """The engine DCP_NATIVE_BACKEND selects; a bad choice is the user's to fix (exit 2)."""
    try:
        return get_engine()
    except (BackendUnavailableError, ValueError) as exc:
        raise UsageError(_one_line(exc)) from None


def _json(doc: Any) -> str:
    """Indented JSON with lists of scalars (shapes, file names) kept on one line."""
    nonce = os.urandom(6).hex()
    inline: dict[str, str] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list) and any(isinstance(v, (dict, list)) for v in x):
            return [walk(v) for v in x]
        if isinstance(x, list):
            token = f"{nonce}:{len(inline)}"
            inline[json.dumps(token)] = json.dumps(x)
            return token
        return x

    text = json.dumps(walk(doc), indent=2)
    for token, value in inline.items():
        text = text.replace(token, value, 1)
    return text


def _select_keys(keys: Sequence[str], patterns: Sequence[str] | None, where: str) -> list[str]:
    """Keys named by ``patterns`` (exact keys or dotted prefixes), in checkpoint order."""
    if not patterns:
        return list(keys)
    chosen = set()
    for pattern in patterns:
        prefix = pattern.rstrip(".") + "."
        hits = [k for k in keys if k == pattern or k.startswith(prefix)]
        if not hits:
            raise UsageError(f"no key in {where} is {pattern!r} or starts with {prefix!r} "
                             f"(list them with `{PROG} inspect {where}`)")
        chosen.update(hits)
    return [k for k in keys if k in chosen]


# --------------------------------------------------------------------------- the checkpoint


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


class _Opened(Checkpoint):
    """A checkpoint as the commands see it: its items listed, grouped by file and stat'ed once."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.item_list = self.items()
        by_file = collections.defaultdict(list)
        for item in sorted(self.item_list, key=lambda it: it.offset):
            by_file[item.file].append(item)
        #: Each data file's items, by offset, the files by name.
        self.by_file: dict[str, list[Item]] = dict(sorted(by_file.items()))
        self.files = list(self.by_file)
        #: Sizes of the data files that can be read; why the others cannot.
        self.sizes: dict[str, int] = {}
        self.size_errors: dict[str, OSError] = {}
        for rel in self.files:
            try:
                self.sizes[rel] = self.data_file_size(rel)
            except OSError as exc:
                self.size_errors[rel] = exc
        #: Items whose bytes lie inside their file, by file and offset.
        self.readable = [it for rel, items in self.by_file.items() for it in items
                         if rel in self.sizes and it.inside(self.sizes[rel])]


def _open_checkpoint(path: str, damaged: Callable[[str], None] | None = None) -> _Opened | None:
    """The checkpoint at ``path``: UsageError when it is none. A ``.metadata`` that does not load,
    or is missing beside data files, goes to ``damaged`` (verify: None is returned) or, without
    it, raises (exit 2 for a missing one, 3 for one that does not load)."""
    directory = _checkpoint_dir(path)
    md_path = os.path.join(directory, _METADATA)
    try:
        return _Opened(directory)
    except FileNotFoundError:
        try:
            found = sorted(n for n in os.listdir(directory) if n.endswith(".distcp") or n.startswith(_METADATA))
        except OSError:
            found = []
        if damaged is None or not found:
            hint = f" (it holds {_listing(found, 3)}: an unfinished save, or .metadata was lost)" if found else ""
            raise UsageError(f"{directory} is not a DCP checkpoint: it has no {_METADATA}{hint}") from None
        damaged(f"missing: the directory holds {_listing(found, 3)} but no committed {_METADATA} "
                "(the save did not finish, or the file was lost)")
    except CheckpointError as exc:  # not a regular file, refused, or not DCP metadata
        why = _one_line(exc).removeprefix(md_path).lstrip(":").strip()
        if damaged is None:
            raise CommandFailed(f"{md_path} {why} (run `{PROG} verify` on it)") from None
        damaged(why)
    except OSError as exc:
        raise CommandFailed(_os_error_text(exc)) from None
    return None


def _archives(ck: Checkpoint, items: Sequence[Item]) -> Iterator[tuple[Item, Archive | Exception]]:
    """Each item's archive, its records bounds-checked, or the ArchiveError or OSError that
    stopped it. Heads and tails are read through the engine in rounds; other ranges on demand."""
    engine, threads = _engine(), default_thread_count()

    def fetch(item: Item, start: int, n: int) -> bytes:
        return bytes(checkpoint.read_ranges(engine, ck.directory, [(item.file, item.offset + start, n)], threads)[0])

    spans = [(it.file, it.offset, it.length) for it in items]
    budget = _ITEMS_PER_ROUND * 2 * checkpoint.PROBE_BYTES
    read = functools.partial(checkpoint.read_boxes, engine, ck.directory, threads=threads)
    for i, view in checkpoint.probe(spans, read, budget, isolate=True):
        if not isinstance(view, OSError):
            view.fetch = functools.partial(fetch, items[i])
            try:
                view = Archive(view)
                view.check_all()
            except (ArchiveError, OSError) as exc:
                view = exc
        yield items[i], view
