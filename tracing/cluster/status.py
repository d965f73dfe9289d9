"""Where a launch stands: each pair's record, the manifest of launches, and the scheduler's view of its job.

    status_table("results/demo_runs")["counts"]    # {"done": 3, "failed": 0, "running": 0, "missing": 0}
    print_status("results/demo_runs")
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import submitit
from submitit.core.utils import JobPaths

from tracing.errors import TracingError
from tracing.naming import MANIFEST
from tracing.results import error_line, load_record

RUNNING_STATES = ("RUNNING", "PENDING", "REQUEUED", "CONFIGURING", "COMPLETING")


def record_status(path: Path) -> tuple[str, str | None]:
    """('ok'|'failed'|'corrupt'|'missing', error line) of one result file."""
    if not path.exists():
        return "missing", None
    try:
        rec = load_record(path)
    except TracingError as e:
        return "corrupt", str(e)
    return str(rec.get("status")), error_line(rec.get("error"))


def write_manifest(save: Path, cluster: str, tasks: list, jobs: list, folder: Path) -> None:
    """Append one line per launch so that --status can find the jobs later."""
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cluster": cluster,
             "folder": str(folder),
             "tasks": [{"base": t.pair.base, "ft": t.pair.ft, "base_name": t.pair.base_name,
                        "ft_name": t.pair.ft_name, "result": str(t.result), "job_id": str(j.job_id)}
                       for t, j in zip(tasks, jobs)]}
    save.mkdir(parents=True, exist_ok=True)
    with open(save / MANIFEST, "a") as f:
        f.write(json.dumps(entry) + "\n")


def read_manifest(save: Path) -> list[dict]:
    path = save / MANIFEST
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a launch interrupted mid-write; the others still count
    return out


def _job_state(entry: dict, job_id: str) -> str:
    """Scheduler state of a job we no longer hold a handle on (Slurm: through sacct)."""
    if entry.get("cluster") != "slurm":
        return "UNKNOWN"
    try:
        return submitit.SlurmJob(folder=Path(entry["folder"]), job_id=job_id).state
    except Exception:
        return "UNKNOWN"


def _last_log_line(entry: dict, job_id: str) -> str | None:
    """Last non-blank line of the job's stderr log (its task 0; array task 4 must not read task 40's log)."""
    log = JobPaths(entry["folder"], job_id=job_id, task_id=0).stderr
    return error_line(log.read_text(errors="replace")) if log.is_file() else None


def status_table(save: Path, tasks: list | None = None) -> dict:
    """Counts of done / failed / running / missing over the pairs of every launch into `save`.

    Returns {"counts": {...}, "rows": [(pair name, state, error line)]}.
    """
    latest: dict[str, tuple[dict, dict]] = {}
    for entry in read_manifest(save):
        for t in entry["tasks"]:
            latest[t["result"]] = (entry, t)
    for t in tasks or ():
        latest.setdefault(str(t.result), ({}, {"base": t.pair.base, "ft": t.pair.ft, "result": str(t.result)}))
    counts = {"done": 0, "failed": 0, "running": 0, "missing": 0}
    rows = []
    for result, (entry, t) in sorted(latest.items()):
        state, error = record_status(Path(result))
        if state == "ok":
            kind = "done"
        elif state in ("failed", "corrupt"):
            kind = "failed"
        else:
            job_state = _job_state(entry, t["job_id"]) if t.get("job_id") else "UNKNOWN"
            if job_state in RUNNING_STATES:
                kind = "running"
            else:
                kind = "missing"
                if t.get("job_id") and entry:
                    error = _last_log_line(entry, t["job_id"])
                    if job_state not in ("UNKNOWN", "COMPLETED"):
                        error = f"job {t['job_id']} {job_state}" + (f": {error}" if error else "")
        counts[kind] += 1
        rows.append((f"{t['base']} vs {t['ft']}", kind, error))
    return {"counts": counts, "rows": rows}


def print_status(save: Path, tasks: list | None = None, out: TextIO | None = None) -> dict:
    """Print the status_table summary line and one line per pair that is not done; returns the table."""
    out = out or sys.stdout
    table = status_table(save, tasks)
    c = table["counts"]
    print(f"{save}: done {c['done']}  running {c['running']}  failed {c['failed']}  missing {c['missing']}",
          file=out, flush=True)
    for name, kind, error in table["rows"]:
        if kind != "done":
            print(f"  {kind:8s} {name}" + (f"  | {error}" if error else ""), file=out, flush=True)
    return table
