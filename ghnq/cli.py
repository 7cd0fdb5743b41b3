"""Command-line plumbing shared by every `python -m ...` entry point.

One rule for the whole toolkit: bad input (a spec, a checkpoint, a flag) is a `UserError`, printed as one
line on stderr with exit code 2 — never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator


class UserError(Exception):
    """An error caused by the user's input: reported as one line, exit code 2."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main(argv)`, turning UserError into a one-line message and exit code 2."""
    try:
        code = main(argv)
    except UserError as err:
        _close_progress_bars()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def _close_progress_bars() -> None:
    """End any open tqdm bar on its own line, so the error that follows starts a line (and the bar is not
    redrawn under it when the interpreter exits)."""
    tqdm = sys.modules.get("tqdm")
    # tqdm keeps its live bars in the class attribute `_instances` (a WeakSet; no public accessor).
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


@contextlib.contextmanager
def drop_native_log_lines(pattern: str) -> Iterator[None]:
    """Catch file descriptor 2 for the duration and pass on every line except those matching `pattern`.

    The runtimes' C++ loggers print start-up chatter straight to fd 2 (LiteRT's "Created TensorFlow Lite
    XNNPACK delegate", ExecuTorch's cpuinfo probing), even under --quiet, and neither exposes a Python switch
    to turn it off; `sys.stderr` redirection cannot reach them.
    """
    drop = re.compile(pattern)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not drop.match(line)))
            sys.stderr.flush()
