"""The parser and the entry point of ``dcp-native``; exit codes in EXIT_CODES_HELP."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from typing import Any, Sequence

from .common import (
    CommandFailed, EXIT_BUG, EXIT_CODES_HELP, EXIT_FAILED, EXIT_OK, EXIT_USAGE, _human, _one_line,
    _os_error_text, PROG, _PROGRESS_MIN_BYTES, _PROGRESS_MIN_ITEMS, UsageError,
)
from .convert import cmd_convert
from .inspect import cmd_inspect
from .verify import cmd_verify


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description=(
            "Inspect, verify and convert PyTorch Distributed Checkpoint (DCP) checkpoints,\n"
            "written by dcp_native or by stock torch.distributed.checkpoint. No process\n"
            "group is needed. `python -m dcp_native` is the same command.\n\n"
            "commands:\n"
            "  inspect PATH         keys, dtypes, shapes, sizes, chunks and files; --json\n"
            "  verify PATH          check metadata, files, sizes and item framing;\n"
            "                       exit 1 with every problem found\n"
            "  convert SRC DST      DCP directory -> torch.save file, or torch.save file -> DCP"
        ),
        epilog=EXIT_CODES_HELP
        + "\nThe engine that reads data files is chosen by DCP_NATIVE_BACKEND=auto|native|python.",
        formatter_class=formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(name: str, func: Any, brief: str, description: str, on_checkpoint: bool) -> Any:
        p = sub.add_parser(name, help=brief, description=description, epilog=EXIT_CODES_HELP,
                           formatter_class=formatter)
        p.set_defaults(func=func)
        if on_checkpoint:
            p.add_argument("path", metavar="PATH", help="checkpoint directory (the one holding .metadata)")
            p.add_argument("--json", action="store_true", help="print one JSON document (for scripts)")
        return p

    command("inspect", cmd_inspect, "list keys with dtype, shape, bytes, chunks and files", (
        "List every key of a DCP checkpoint: tensors with dtype, global shape, bytes,\n"
        "number of saved chunks and data files; objects (non-tensor entries) with\n"
        "their type, read from the pickle's opcodes without unpickling anything\n"
        "(short scalars show their value); totals; and whether dcp_native wrote it\n"
        "(its sidecar is present and belongs to this save) or stock DCP."
    ), on_checkpoint=True)

    p = command("verify", cmd_verify,
                "check that a checkpoint is intact (exit 0) or list what is wrong (exit 1)", (
        "Check a DCP checkpoint without loading it: .metadata loads; every chunk of\n"
        "every tensor has a saved item; every data file exists and is long enough;\n"
        "items do not overlap; every item's framing parses (zip end records, central\n"
        "directory, local headers, data.pkl), its dtype and shape agree with the\n"
        "metadata and its payload lies inside the item; the dcp_native sidecar\n"
        "agrees with the archives. Only item headers and trailers are read, unless\n"
        "--read-all. Every problem is listed with its file, offset and key. Every\n"
        "4 KiB block of each data file that has a CRC32C table (dcp_native writes\n"
        "them by default with its native engine) is read and checked, and the\n"
        "sidecar and tables are checked against what the save recorded. A directory\n"
        "with data files but no .metadata is reported as damaged (exit 1); one\n"
        "without either is not a checkpoint (exit 2)."
    ), on_checkpoint=True)
    p.add_argument("--read-all", action="store_true",
                   help="also read every byte of every item (finds unreadable sectors; slow on big checkpoints)")
    p.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="progress bar on stderr; auto: when stderr is a terminal and the checkpoint has "
                   f"{_PROGRESS_MIN_ITEMS}+ items or {_human(_PROGRESS_MIN_BYTES)}+ to read (default: auto)")

    p = command("convert", cmd_convert, "DCP checkpoint <-> single torch.save file", (
        "Convert between a DCP checkpoint directory and a single torch.save file. The\n"
        "direction follows SRC: a directory (holding .metadata) becomes a torch.save\n"
        "file of full tensors assembled from their chunks, objects included; a file\n"
        "saved with torch.save (holding a dict) becomes a DCP checkpoint written by\n"
        "dcp_native. Nested dicts are kept (the checkpoint's planner data says how);\n"
        "--flat writes dotted keys instead. Only the requested keys are read, so\n"
        "memory follows the output's size.\n\n"
        "Objects are unpickled with torch.load(weights_only=True); --allow-pickle\n"
        "unpickles anything (this runs code from the input: trusted inputs only)."
    ), on_checkpoint=False)
    p.add_argument("src", metavar="SRC", help="a DCP checkpoint directory, or a torch.save file")
    p.add_argument("dst", metavar="DST", help="the torch.save file, or DCP directory, to write")
    p.add_argument("--keys", nargs="+", action="extend", metavar="K",
                   help="convert only these keys; K takes the key K and every key under it (K.*), in "
                   "the dotted names `inspect` lists, e.g. --keys model.layer1 step. A K that "
                   "matches nothing is an error (exit 2)")
    p.add_argument("--flat", action="store_true", help="write dotted keys, not nested dicts")
    p.add_argument("-f", "--force", action="store_true",
                   help="overwrite an existing DST file, or write into a non-empty DST directory")
    p.add_argument("--allow-pickle", action="store_true",
                   help="unpickle objects with weights_only=False (runs code from SRC; trusted inputs only)")
    return parser


def quiet_warnings() -> None:
    # DCP warns about its own normal use (no process group, deprecations); a user of
    # the command cannot act on those. Others are printed on one line.
    for pattern in (".*torch.distributed is disabled.*", ".*TypedStorage is deprecated.*",
                    ".*overwriting since.*", "Failed to initialize NumPy.*"):
        warnings.filterwarnings("ignore", message=pattern)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)

    def one_line(message: Any, category: Any, *args: Any, **kwargs: Any) -> str:
        text = str(message).strip().splitlines()
        return f"{PROG}: warning: {text[0] if text else category.__name__}\n"

    warnings.formatwarning = one_line  # type: ignore[assignment]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see EXIT_CODES_HELP).

    The entry points (``dcp-native``, ``python -m dcp_native``) call
    :func:`quiet_warnings` first; this function leaves the process's warning
    filters alone, so that it can be called in-process.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # `dcp-native inspect ... | head`: not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, CommandFailed, OSError) as exc:
        usage = isinstance(exc, UsageError)
        text = _os_error_text(exc) if isinstance(exc, OSError) else exc
        print(f"{PROG}: {'error' if usage else 'failed'}: {text}", file=sys.stderr)
        return EXIT_USAGE if usage else EXIT_FAILED
    except SystemExit:
        raise
    except BaseException as exc:  # a bug: show it, with a code of its own
        traceback.print_exc()
        print(f"{PROG}: internal error (a bug in dcp-native, please report it): "
              f"{_one_line(exc)}", file=sys.stderr)
        return EXIT_BUG
