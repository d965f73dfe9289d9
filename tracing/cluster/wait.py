"""`launch.py --wait`: block until every job of a launch has ended, saying why the others still wait.

    still_open = wait_for(jobs, "slurm", max_wait=3600)   # [] when everything ended

A Slurm job counts as ended as soon as Slurm no longer holds it (`squeue`): done, failed, cancelled, or an
array task that never started and was cancelled with its array. Nothing waits on a result file that will
never appear, so `--wait` always ends; `--max_wait` bounds it (the caller then names the open pairs).
Pending reasons are printed as they change (at most once a minute, and every ten minutes if nothing does).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import TextIO

from tracing.cluster.slurm import NEVER_STARTS, queue
from tracing.results import error_line

POLL_S = 2.0  # between two looks at the queue
REPORT_S = 60.0  # at most one progress line a minute


def _open_jobs(jobs: list, cluster: str) -> tuple[list[int], dict[str, tuple[str, str]] | None]:
    """(indices of the jobs that have not ended, Slurm's {job id: (state, reason)} for them, None when squeue
    did not answer: then nothing is known to have ended)."""
    if cluster == "slurm":
        held = queue(j.job_id for j in jobs)
        if held is None:
            return list(range(len(jobs))), None
        return [i for i, j in enumerate(jobs) if j.job_id in held], held
    return [i for i, j in enumerate(jobs) if not j.done()], {}


def describe(held: dict[str, tuple[str, str]]) -> str:
    """'1 running, 2 pending (Resources: 2)' for the jobs Slurm holds."""
    states = Counter(state for state, _ in held.values())
    reasons = Counter(reason for state, reason in held.values() if state == "PENDING" and reason)
    parts = [f"{n} {state.lower()}" for state, n in sorted(states.items())]
    if reasons:
        parts.append("reasons: " + ", ".join(f"{r} x{n}" for r, n in reasons.most_common()))
    if any(r in NEVER_STARTS for r in reasons):
        parts.append("a job pending for " + "/".join(sorted(set(reasons) & set(NEVER_STARTS)))
                     + " never starts as it is: scancel it and relaunch with resources that fit")
    return ", ".join(parts)


def wait_for(jobs: list, cluster: str, max_wait: float | None = None, out: TextIO | None = None,
             clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> list[int]:
    """Wait until every job has ended or `max_wait` seconds passed; returns the indices of the open jobs."""
    if cluster == "debug":  # the debug executor runs each job in-process when its result is asked for
        for job in jobs:
            try:
                job.result()
            except Exception as e:
                print(f"job {job.job_id} did not finish: {error_line(e)}", file=out, flush=True)
        return []
    t0, last_report, last_line = clock(), None, None
    while True:
        still, held = _open_jobs(jobs, cluster)
        now = clock()
        if not still:
            return []
        if max_wait is not None and now - t0 >= max_wait:
            return still
        line = f"waiting: {len(jobs) - len(still)}/{len(jobs)} ended" + (
            ", squeue did not answer" if held is None else f", {describe(held)}" if held else "")
        if last_report is None or now - last_report >= (REPORT_S if line != last_line else 10 * REPORT_S):
            print(f"{line} ({now - t0:.0f} s)", file=out, flush=True)
            last_report, last_line = now, line
        sleep(POLL_S)
