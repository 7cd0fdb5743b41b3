"""Command-line plumbing shared by every `python -m ...` entry point.

One rule for the whole toolkit: bad input (a spec, a checkpoint, a flag) is a `UserError`, printed as one
line on stderr with exit code 2 — never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """An error caused by the user's input: reported as one line, exit code 2."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main(argv)`, turning UserError into a one-line message and exit code 2."""
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
