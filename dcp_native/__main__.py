"""``python -m dcp_native``: the ``dcp-native`` command line (see :mod:`dcp_native.cli`)."""

from __future__ import annotations

import sys


def main() -> int:
    """Entry point of the ``dcp-native`` console script."""
    from .cli import main as cli_main, quiet_warnings

    quiet_warnings()
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
