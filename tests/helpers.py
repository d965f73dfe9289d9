"""Small helpers shared by test modules."""

from pathlib import Path

from tracing.cli import parse_run_flags
from tracing.config import RunConfig
from tracing.errors import TracingError


def record_path(argv: list[str]) -> Path | None:
    """Where main.py writes the record of `argv` (None: options refused before anything is written)."""
    flags = parse_run_flags(argv)
    flags.pop("token", None)
    try:
        return RunConfig.from_dict(flags).result_path()
    except TracingError:
        return None
