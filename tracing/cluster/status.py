"""Where a launch stands: the records found in the results folder (by content), the manifest of launches, and
the scheduler's view of the jobs that have no record yet.

    status_table("results/demo_runs")["counts"]    # {"done": 3, "running": 0, "pending": 0, "failed": 0, "missing": 0}
    print_status("results/demo_runs", tasks)       # one line per pair that is not done, with its error or reason

A pair is identified by what defines its result (base, ft, statistic, RunConfig.result_key), never by a file
path: a results folder that was moved, copied or renamed, or a status asked from another directory, counts
each pair once. An ok record wins over a failed one of the same configuration.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import submitit
from submitit.core.utils import JobPaths

from tracing.cluster.slurm import queue
from tracing.config import RunConfig
from tracing.errors import TracingError
from tracing.naming import MANIFEST
from tracing.result_folder import read_records, record_key
from tracing.results import error_line, load_record

Key = tuple[str, str, str, str]  # (base id, ft id, stat as given, result key)
KINDS = ("done", "running", "pending", "failed", "missing")


def record_status(path: Path) -> tuple[str, str | None]:
    """('ok'|'failed'|'corrupt'|'missing', error line) of one result file."""
    if not path.exists():
        return "missing", None
    try:
        rec = load_record(path)
    except TracingError as e:
        return "corrupt", str(e)
    return str(rec.get("status")), error_line(rec.get("error"))


def task_key(cfg: RunConfig) -> Key:
    return cfg.base_model_id, cfg.ft_model_id, cfg.stat, cfg.result_key()


def scan_records(folder: Path) -> dict[Key, tuple[str, str | None]]:
    """{key: (status, error line)} of every record under `folder` (results.read_records: ok wins)."""
    records, _, _ = read_records(folder)
    return {key: (str(rec.get("status")), error_line(rec.get("error")))
            for _, rec in records if (key := record_key(rec)) is not None}


def write_manifest(save: Path, cluster: str, tasks: list, jobs: list, folder: Path) -> None:
    """Append one line per launch so that --status can find the jobs later (paths relative to `save`)."""
    save.mkdir(parents=True, exist_ok=True)
    try:
        folder = folder.resolve().relative_to(save.resolve())
    except ValueError:
        pass
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cluster": cluster,
             "folder": str(folder),
             "tasks": [{"base": t.pair.base, "ft": t.pair.ft, "base_name": t.pair.base_name,
                        "ft_name": t.pair.ft_name, "stat": t.cfg.stat, "key": t.cfg.result_key(),
                        "job_id": str(j.job_id)} for t, j in zip(tasks, jobs)]}
    with open(save / MANIFEST, "a") as f:
        f.write(json.dumps(entry) + "\n")


def read_manifest(save: Path) -> list[dict]:
    path = save / MANIFEST
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a launch interrupted mid-write; the others still count
        if isinstance(entry, dict) and all("key" in t for t in entry.get("tasks", ())):
            out.append(entry)
    return out


def _job_state(entry: dict, save: Path, job_id: str) -> str:
    """Final scheduler state of a job Slurm no longer holds (sacct, through submitit)."""
    if entry.get("cluster") != "slurm":
        return "UNKNOWN"
    try:
        return submitit.SlurmJob(folder=save / entry["folder"], job_id=job_id).state
    except Exception:
        return "UNKNOWN"


def _last_log_line(folder: Path, job_id: str) -> str | None:
    """Last non-blank line of the job's stderr log (its task 0; array task 4 must not read task 40's log)."""
    log = JobPaths(folder, job_id=job_id, task_id=0).stderr
    return error_line(log.read_text(errors="replace")) if log.is_file() else None


def status_table(save: Path, tasks: list | None = None) -> dict:
    """Counts of done / running / pending / failed / missing over the pairs of `tasks` and of every launch
    into `save`. Returns {"counts": {...}, "rows": [(pair name, kind, error line or pending reason)]}."""
    save = Path(save)
    pairs: dict[Key, tuple[dict, dict]] = {}
    for entry in read_manifest(save):
        for t in entry["tasks"]:
            pairs[(t["base"], t["ft"], t["stat"], t["key"])] = (entry, t)
    for t in tasks or ():
        pairs.setdefault(task_key(t.cfg), ({}, {"base": t.pair.base, "ft": t.pair.ft}))
    records = scan_records(save)
    waiting = [t["job_id"] for k, (e, t) in pairs.items() if k not in records and e.get("cluster") == "slurm"]
    held = (queue(waiting) or {}) if waiting else {}
    counts = dict.fromkeys(KINDS, 0)
    rows = []
    for key, (entry, t) in sorted(pairs.items()):
        state, detail = records.get(key, ("missing", None))
        job = t.get("job_id")
        if state == "ok":
            kind = "done"
        elif state != "missing":
            kind = "failed"
        elif job in held:
            kind = "pending" if held[job][0] == "PENDING" else "running"
            detail = held[job][1] or None
        else:
            kind = "missing"
            if job and entry:
                detail = _last_log_line(save / entry["folder"], job)
                job_state = _job_state(entry, save, job)
                if job_state not in ("UNKNOWN", "COMPLETED"):
                    detail = f"job {job} {job_state}" + (f": {detail}" if detail else "")
        counts[kind] += 1
        rows.append((f"{key[0]} vs {key[1]} ({key[2]})", kind, detail))
    return {"counts": counts, "rows": rows}


def print_status(save: Path, tasks: list | None = None, out: TextIO | None = None) -> dict:
    """Print the status_table summary line and one line per pair that is not done; returns the table."""
    out = out or sys.stdout
    table = status_table(save, tasks)
    print(f"{save}: " + "  ".join(f"{k} {table['counts'][k]}" for k in KINDS), file=out, flush=True)
    for name, kind, detail in table["rows"]:
        if kind != "done":
            print(f"  {kind:8s} {name}" + (f"  | {detail}" if detail else ""), file=out, flush=True)
    return table
