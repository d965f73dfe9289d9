"""User-facing errors: each carries a one-line message that names the fix. Entry points print it and exit 2.

    sys.exit(exit_on_error(lambda: run(args)))    # every entry point: main.py, launch.py, generate.py, aggregate
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class TracingError(Exception):
    """Bad input or an unusable environment; the message is shown to the user as is."""


def exit_on_error(fn: Callable[[], int]) -> int:
    """fn()'s exit code; a TracingError becomes its one-line message on stderr and exit code 2."""
    try:
        return fn()
    except TracingError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
