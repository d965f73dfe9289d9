"""User-facing errors: each carries a one-line message that names the fix. Entry points print it and exit 2.

    sys.exit(exit_on_error(lambda: run(args)))    # every entry point: main.py, launch.py, generate.py, aggregate

Ctrl-C and SIGTERM end an entry point with one line instead of a traceback (exit 130 and 143, the shell's codes
for those signals); results are written atomically, so an interrupted run leaves no temporary file and never
a half-written record.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM
INTERRUPTED = "interrupted; nothing written (earlier results are untouched)"


class TracingError(Exception):
    """Bad input or an unusable environment; the message is shown to the user as is."""


class Terminated(BaseException):
    """SIGTERM arrived (raised in the main thread by the handler `on_sigterm` installs)."""


@contextlib.contextmanager
def on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated in the main thread (unwinding `finally` clauses as Ctrl-C does)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def exit_on_error(fn: Callable[[], int], interrupted: str = INTERRUPTED) -> int:
    """fn()'s exit code; a TracingError becomes its one-line message on stderr and exit code 2; Ctrl-C or SIGTERM
    the line `interrupted` (what was kept, how to resume) and exit code 130 or 143."""
    try:
        with on_sigterm():
            return fn()
    except TracingError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr, flush=True)
        return EXIT_SIGINT
    except Terminated:
        print(interrupted, file=sys.stderr, flush=True)
        return EXIT_SIGTERM
