"""Submit a launch: plan, skip finished pairs, check the request fits (Slurm), one submitit job array for
the rest, optionally wait (bounded by max_wait).

    launch("config/demo.yaml", "results/demo_runs", {"stat": "csu"}, cluster="local", wait=True)
    launch("config/llama7b.yaml", "results/llama7b", {"stat": "csu"}, wait=True, max_wait=3600)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import submitit
from submitit.core.utils import FailedJobError

from tracing import naming
from tracing.cluster.job import PairJob
from tracing.cluster.plan import CLUSTERS, Task, default_cluster, executor_parameters, plan
from tracing.cluster.slurm import preflight, sbatch_error
from tracing.cluster.status import print_status, scan_records, task_key, write_manifest
from tracing.cluster.wait import wait_for
from tracing.config import RunConfig
from tracing.errors import TracingError
from tracing.model_lists import load_config
from tracing.naming import failed_path
from tracing.results import check_writable


def _repo_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def submit_array(fn: Callable, args: list, folder: Path, cluster: str, params: dict) -> list:
    """Submit fn(arg) for each of `args` as one submitit job array (`fn`: an importable callable, e.g. a
    Checkpointable job object); returns the jobs, in the order of `args`. sbatch's refusal is one line."""
    folder.mkdir(parents=True, exist_ok=True)
    # jobs import `tracing` from this checkout whatever their working directory
    paths = [_repo_root(), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**params)
    said = io.StringIO()  # submitit echoes sbatch's stderr on a refusal; sbatch_error says it in one line
    try:
        with contextlib.redirect_stderr(said):
            jobs = executor.map_array(fn, args)
    except FailedJobError as e:
        raise sbatch_error(e) from None
    sys.stderr.write(said.getvalue())
    return jobs


def submit(tasks: list[Task], folder: Path, cluster: str, params: dict,
           runner: Callable[[RunConfig], dict] | None = None) -> list:
    """Submit every task as one job array; returns the submitit jobs (same order as tasks)."""
    return submit_array(PairJob(runner), [t.cfg for t in tasks], folder, cluster, params)


def launch(config: str | Path, save: str | Path, flags: dict, cluster: str | None = None,
           flat: str | None = None, force: bool = False, dry_run: bool = False, wait: bool = False,
           slurm_overrides: dict | None = None, runner: Callable[[RunConfig], dict] | None = None,
           out: TextIO | None = None, max_wait: float | None = None) -> dict:
    """Plan, skip finished pairs, submit the rest as one job array. `flags`: main.py options for every pair.

    On Slurm the request is checked against the partition first (preflight: a request no node can ever run
    is a TracingError naming the flag and the largest value that fits). `wait` blocks until every job ended,
    at most `max_wait` seconds. Returns {"tasks", "skipped", "jobs", "status", "open"}: "status" is the
    status_table after waiting (else None), "open" the tasks still running when max_wait ran out.
    """
    out = out or sys.stdout
    lc = load_config(config, flat)
    cluster = cluster or default_cluster()
    if cluster not in CLUSTERS:
        raise TracingError(f"--cluster must be slurm, local or debug, got '{cluster}'")
    if cluster == "slurm" and not shutil.which("sbatch"):
        raise TracingError("--cluster slurm needs sbatch on PATH; use --cluster local on a machine without Slurm")
    save = Path(save)
    tasks = plan(lc, save, flags)
    done = {k for k, (state, _) in scan_records(save).items() if state == "ok"}  # by content, not by path
    todo = [t for t in tasks if force or task_key(t.cfg) not in done]
    skipped = len(tasks) - len(todo)
    name = naming.safe_name(f"tracing-{Path(config).stem}", max_len=60)
    params = executor_parameters(lc.slurm, slurm_overrides or {}, cluster, name)
    print(f"{len(tasks)} pairs from {config} (flat={lc.flat}"
          + (f", {lc.duplicates} duplicate/self pairs dropped" if lc.duplicates else "")
          + f"); {skipped} already done, {len(todo)} to run on {cluster}", file=out, flush=True)
    result = {"tasks": tasks, "skipped": skipped, "jobs": [], "status": None, "open": []}
    check_writable(save, create=not dry_run)
    if cluster == "slurm" and todo:
        preflight(params, out)
    if dry_run:
        print(f"resources: {json.dumps(params)}", file=out)
        for t in tasks:
            mark = "run " if t in todo else "skip"
            print(f"  {mark} {t.pair.base_name} vs {t.pair.ft_name} -> {t.result}", file=out)
        return result
    if not todo:
        return result
    folder = save / naming.SUBMITIT_SUBDIR
    wait = wait or cluster == "debug"  # the debug executor runs a job when its result is asked for
    if force:  # a job skips a pair whose record is ok (a requeue after it finished): remove the old ones first
        for t in todo:
            for path in (t.result, failed_path(t.result)):
                path.unlink(missing_ok=True)
                path.with_suffix(".json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    jobs = submit(todo, folder, cluster, params, runner)
    write_manifest(save, cluster, todo, jobs, folder)
    print(f"submitted job array {jobs[0].job_id.split('_')[0]} ({len(jobs)} tasks), logs in {folder}",
          file=out, flush=True)
    result["jobs"] = jobs
    if wait:
        still = wait_for(jobs, cluster, max_wait, out)
        result["open"] = [todo[i] for i in still]
        if still:
            print(f"stopped waiting after {time.perf_counter() - t0:.0f} s (--max_wait): {len(still)} pair(s) "
                  f"still open; their jobs keep running (launch.py --status shows them)", file=out, flush=True)
        else:
            print(f"all jobs ended in {time.perf_counter() - t0:.1f}s", file=out, flush=True)
        result["status"] = print_status(save, tasks, out)
    return result
