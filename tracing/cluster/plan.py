"""The plan of a launch: one Task per pair (its RunConfig, result path and job name), and the resources.

    lc = load_config("config/demo.yaml")
    tasks = plan(lc, "results/demo_runs", {"stat": "l2"})        # YAML main: < command-line flags
    executor_parameters(lc.slurm, {"mem_gb": 8}, "slurm", "tracing-demo")
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracing import naming
from tracing.config import PER_PAIR, RunConfig
from tracing.errors import TracingError
from tracing.model_lists import LaunchConfig, Pair
from tracing.pipeline import check

CLUSTERS = ("slurm", "local", "debug")
SLURM_DEFAULTS = {"gpus_per_node": 1, "cpus_per_task": 4, "mem_gb": 64, "timeout_min": 240,
                  "array_parallelism": 64}
# the smallest value each resource may take (submitit warns a job with --signal=USR2@90 that its time is up at
# once when timeout_min < 2); checked for every executor, so --dry_run and --cluster local refuse what sbatch would
MINIMUM = {"gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 1e-3, "timeout_min": 2, "array_parallelism": 1,
           "nodes": 1}


@dataclass(frozen=True)
class Task:
    pair: Pair
    cfg: RunConfig  # what the job runs: exactly `python main.py` with cfg.command_line()
    result: Path
    name: str


def plan(lc: LaunchConfig, save: str | Path, flags: dict[str, Any]) -> list[Task]:
    """One Task per pair: the YAML's main: options, then `flags` (main.py flags given to launch.py).

    The token never travels with a job, and the per-pair options are launch.py's to set."""
    if "token" in flags:
        raise TracingError("--token is not passed to jobs; export HF_TOKEN in the submitting shell instead")
    if set(flags) & {*PER_PAIR, "demo"}:
        raise TracingError("--base_model_id, --ft_model_id, --save and --demo are set by launch.py per pair; "
                           "list models in the YAML and pass --save to launch.py")
    options = {**lc.main, **flags, "no_progress": True}
    save = os.path.abspath(save)  # jobs may start in another directory
    tasks = []
    for pair in lc.pairs:
        cfg = RunConfig.from_dict({**options, "base_model_id": pair.base, "ft_model_id": pair.ft,
                                   "save": save}, f"{lc.source} main:")
        check(cfg)
        tasks.append(Task(pair, cfg, cfg.result_path(), naming.job_name(pair.base_name, pair.ft_name)))
    return tasks


def default_cluster() -> str:
    return "slurm" if shutil.which("sbatch") else "local"


def executor_parameters(cfg_slurm: dict, overrides: dict, cluster: str, name: str) -> dict:
    """submitit AutoExecutor parameters from SLURM_DEFAULTS < YAML slurm: < CLI flags."""
    s = {**SLURM_DEFAULTS, **cfg_slurm, **{k: v for k, v in overrides.items() if v is not None}}

    def number(key: str, kind: type = int, default: Any = None) -> Any:
        where = f"--{key}" if overrides.get(key) is not None else f"slurm: {key}"
        try:
            value = kind(s.get(key, default))
        except (TypeError, ValueError):
            raise TracingError(f"{where} must be a number, got {s.get(key)!r}") from None
        if value < MINIMUM[key]:
            least = "a positive number" if kind is float else f"at least {MINIMUM[key]}"
            raise TracingError(f"{where} must be {least}, got {s.get(key)!r}")
        return value

    params: dict[str, Any] = {"name": name, "timeout_min": number("timeout_min"),
                              "gpus_per_node": number("gpus_per_node"), "cpus_per_task": number("cpus_per_task"),
                              "mem_gb": number("mem_gb", float), "nodes": number("nodes", default=1)}
    parallel = number("array_parallelism")
    if cluster == "slurm":
        params["slurm_array_parallelism"] = parallel
        for key in ("partition", "account", "qos", "constraint"):
            if s.get(key):
                params[f"slurm_{key}"] = str(s[key])
        if params["gpus_per_node"] == 0:
            params.pop("gpus_per_node")
    return params
