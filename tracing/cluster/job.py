"""The job function of a launch: one pair through `tracing.pipeline.run_pair`, always leaving a record (also for
bad input that `run_pair` refuses before loading anything, where main.py writes none).

    PairJob()(task.cfg)          # what each array task runs (in-process: no shell, no argv)

PairJob is submitit Checkpointable, so a preempted or timed-out job is requeued with the same RunConfig;
a requeued job whose pair already finished returns at once. The token is read from the job's environment
($HF_TOKEN, inherited from the submitting shell), never carried in the job's pickle or command line.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from submitit.helpers import Checkpointable

from tracing.cluster.status import record_status
from tracing.config import RunConfig
from tracing.devices import threads
from tracing.errors import TracingError
from tracing.pipeline import run_pair
from tracing.results import new_record, save_outcome


def run_main(cfg: RunConfig) -> dict:
    """What a job runs: the single-pair pipeline, in-process, with --threads (default: the job's
    SLURM_CPUS_PER_TASK, i.e. the YAML's cpus_per_task). Exposed so tests can wrap it."""
    with threads(cfg.threads):
        return run_pair(cfg)


def result_of(cfg: RunConfig) -> Path:
    return cfg.result_path()


def _failed_record(cfg: RunConfig, error: str, kind: str = "internal") -> None:
    """The record of a job that ended without one, naming its pair like the pipeline's own records do."""
    rec = new_record(cfg.to_dict())
    rec.update(status="failed", error=error, error_kind=kind, command=cfg.command_line(),
               finished=datetime.now(timezone.utc).isoformat(timespec="seconds"), stat=cfg.stat,
               base_model_id=cfg.base_model_id, ft_model_id=cfg.ft_model_id, key=cfg.result_key(),
               key_flags=cfg.key_flags())
    save_outcome(rec, result_of(cfg))


class PairJob(Checkpointable):
    """Job function: run one pair; always leaves a result record (ok or failed)."""

    def __init__(self, runner: Callable[[RunConfig], dict] | None = None):
        self.runner = runner

    def __call__(self, cfg: RunConfig) -> dict:
        path = result_of(cfg)
        status, _ = record_status(path)
        if status == "ok":  # a requeued job whose pair finished before preemption
            return {"result": str(path), "status": "ok"}
        print(f"model-tracing job: {cfg.command_line()}", flush=True)
        try:  # SystemExit passes through: it is how submitit ends a job it has requeued
            (self.runner or run_main)(cfg)
        except TracingError as e:  # bad input found before anything was loaded: the launch still shows why
            _failed_record(cfg, str(e), kind="input")
        except Exception as e:
            _failed_record(cfg, f"{type(e).__name__}: {e}")
            raise
        status, error = record_status(path)
        if status in ("missing", "corrupt"):
            _failed_record(cfg, "the run ended without writing a result")
            status, error = "failed", "no result written"
        print(f"model-tracing job: {status} -> {path}", flush=True)
        return {"result": str(path), "status": status, "error": error}
