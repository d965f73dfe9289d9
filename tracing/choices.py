"""The named choices of options that several layers check, kept free of heavy imports (torch, scipy) so that
parsing flags, `--help` and `--dry_run` start in a fraction of a second.

    check_method("fast")        # a --matching value, or a TracingError listing the valid ones
"""

from __future__ import annotations

from tracing.errors import TracingError

METHODS = {"fast": "greedy mutual-best matching; exact assignment where its p is in (1e-10, 0.01) (default)",
           "exact": "exact linear assignment everywhere (scipy, float64): the paper's statistic bit for bit"}
DEFAULT_METHOD = "fast"

# statistics whose `value` is lower for related pairs (PERMTEST's direction, aggregate's AUC); higher for the others
LOWER_IS_RELATED = frozenset({"auto", "csu", "csu_all", "jsd", "l2", "mode"})


def check_method(name: str) -> str:
    """A --matching value, or a TracingError listing the valid ones."""
    if name in METHODS:
        return name
    raise TracingError(f"unknown --matching '{name}'; valid: " + "; ".join(f"{k} ({v})" for k, v in METHODS.items()))
