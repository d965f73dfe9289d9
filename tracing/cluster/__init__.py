"""Fan model pairs out as one submitit job array: YAML model list -> plan -> jobs -> result records.

    python launch.py --config config/demo.yaml --cluster local --save results/demo_runs --stat csu --wait
    python launch.py --config config/llama7b.yaml --dry_run        # the plan: pairs, result paths, resources
    python launch.py --config config/llama7b.yaml --status         # done / running / failed / missing

plan.py (tasks and resources) -> slurm.py (preflight against the partition, sbatch's refusals, the queue)
-> job.py (what each array task runs) -> submit.py (the job array) -> wait.py (--wait, --max_wait)
-> status.py (records found by content, manifest, pending reasons, final states). Each job runs one RunConfig through
tracing.pipeline.run_pair in-process: no shell, no models pickled, no token on any command line.
A pair whose record already says "ok" is skipped unless --force.
"""

from tracing.cluster.job import PairJob, run_main
from tracing.cluster.plan import Task, default_cluster, executor_parameters, plan
from tracing.cluster.slurm import preflight
from tracing.cluster.status import print_status, record_status, status_table
from tracing.cluster.submit import launch, submit, submit_array
from tracing.cluster.wait import wait_for

__all__ = ["PairJob", "Task", "default_cluster", "executor_parameters", "launch", "plan", "preflight",
           "print_status", "record_status", "run_main", "status_table", "submit", "submit_array", "wait_for"]
