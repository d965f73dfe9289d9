"""User-facing errors: each carries a one-line message that names the fix. Entry points print it and exit 2.

    sys.exit(exit_on_error(lambda: run(args)))    # every entry point: main.py, launch.py, generate.py, aggregate
    leave(main())                                 # main.py: the process ends without tearing down the interpreter

Ctrl-C and SIGTERM end an entry point with one line instead of a traceback (exit 130 and 143, the shell's codes
for those signals); results are written atomically, so an interrupted run leaves no temporary file and never
a half-written record.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn

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


GC_THRESHOLDS = (10_000, 10, 10)  # Python's default: (700, 10, 10)


@contextlib.contextmanager
def few_collections() -> Iterator[None]:
    """Within the block, Python's cycle collector runs 14x less often, and when the process ends, the objects then
    alive are left out of the collection the interpreter makes at exit (gc.freeze at exit). Importing torch and
    transformers and building two models make about a million long-lived objects: a φ_MATCH run of two 135M
    models spent 0.7 s in collections and 0.8 s more in the one at exit (benchmarks/laptop.py)."""
    before = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    atexit.unregister(gc.freeze)  # once, however many blocks ran
    atexit.register(gc.freeze)
    try:
        yield
    finally:
        gc.set_threshold(*before)


def exit_on_error(fn: Callable[[], int], interrupted: str = INTERRUPTED) -> int:
    """fn()'s exit code; a TracingError becomes its one-line message on stderr and exit code 2; Ctrl-C or SIGTERM
    the line `interrupted` (what was kept, how to resume) and exit code 130 or 143. For entry points (the process
    ends after it): the cycle collector runs less often, and not at exit (few_collections)."""
    try:
        with on_sigterm(), few_collections():
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


def leave(code: int) -> NoReturn:
    """End the process with exit code `code`. Where no other non-daemon thread is alive: at once, after the atexit
    handlers ran and stdout and stderr were flushed, without the interpreter freeing what it holds object by object
    (a φ_MATCH run of two 135M models: 0.3 s of its ~5 s). Otherwise sys.exit(code), which waits for the threads."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if others:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing more can be written
            stream.flush()
    os._exit(code)
