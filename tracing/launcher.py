"""launch.py: fan model pairs from a YAML list out to Slurm (or local processes) through submitit.

    python launch.py --config config/demo.yaml --cluster local --save results/demo_runs --stat csu --wait
    python launch.py --config config/llama7b.yaml --save results/llama7b --stat csu --align --dry_run
    python launch.py --config config/llama7b.yaml --save results/llama7b --status
    python launch.py --config config/llama7b.yaml --save results/llama7b --stat csu --wait --max_wait 3600
    python -m tracing.aggregate results/llama7b --truth config/llama7b_tree.yaml

Flags not listed here (--stat, --align, --dataset, ...) are main.py's and go to every job unchanged;
they override the YAML's `main:` block. The Hugging Face token comes from $HF_TOKEN, never a flag.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from tracing import cluster
from tracing.cli import parse_run_flags
from tracing.errors import EXIT_FAILED, EXIT_OK, TracingError, exit_on_error
from tracing.model_lists import SLURM_KEYS, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", description=__doc__.splitlines()[0], allow_abbrev=False,
                                epilog="Other flags are main.py's (python main.py --help).")
    p.add_argument("--config", "--models", dest="config", required=True, help="model-list YAML (see config/)")
    p.add_argument("--save", default="results", help="results folder (one .pkl + .json per pair)")
    p.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                   help="default: slurm when sbatch is on PATH, else local")
    p.add_argument("--flat", choices=("all", "split", "specified"), default=None,
                   help="pairing of the YAML's models (default: inferred from its keys)")
    p.add_argument("--force", action="store_true", help="rerun pairs whose result is already ok")
    p.add_argument("--dry_run", action="store_true", help="print the plan, submit nothing")
    p.add_argument("--status", action="store_true", help="print done / running / failed counts and exit")
    p.add_argument("--wait", action="store_true", help="block until every job ends (cancelled or never started "
                   "counts as ended), printing pending reasons at most once a minute; then print the status")
    p.add_argument("--max_wait", type=float, default=None, metavar="SECONDS",
                   help="with --wait: stop waiting after this long and exit 1, naming the pairs still open")
    g = p.add_argument_group("resources (override the YAML's slurm: block)")
    for key, typ in (("partition", str), ("gpus_per_node", int), ("cpus_per_task", int), ("mem_gb", float),
                     ("timeout_min", int), ("account", str), ("qos", str), ("constraint", str),
                     ("array_parallelism", int)):
        g.add_argument(f"--{key}", type=typ, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    overrides = {k: getattr(args, k) for k in SLURM_KEYS if hasattr(args, k)}

    def run() -> int:
        flags = parse_run_flags(extra)  # main.py's flags for every pair
        if args.status:
            tasks = cluster.plan(load_config(args.config, args.flat), Path(args.save), flags)
            counts = cluster.print_status(Path(args.save), tasks)["counts"]
            return EXIT_FAILED if counts["failed"] else EXIT_OK
        if args.max_wait is not None and (args.max_wait <= 0 or not args.wait):
            raise TracingError("--max_wait takes a positive number of seconds and goes with --wait")
        out = cluster.launch(args.config, args.save, flags, cluster=args.cluster, flat=args.flat,
                             force=args.force, dry_run=args.dry_run, wait=args.wait, slurm_overrides=overrides,
                             max_wait=args.max_wait)
        for t in out["open"]:
            print(f"  open     {t.pair.base_name} vs {t.pair.ft_name}", file=sys.stderr)
        if out["open"]:
            return EXIT_FAILED
        if out["status"] is not None:  # waited (--wait, or the debug executor): a pair without an ok record fails
            counts = out["status"]["counts"]
            return EXIT_FAILED if counts["failed"] or counts["missing"] else EXIT_OK
        return EXIT_OK

    again = shlex.join(["python", "launch.py", *(sys.argv[1:] if argv is None else argv)])
    status = shlex.join(["python", "launch.py", "--config", args.config, "--save", args.save, "--status"])
    return exit_on_error(run, interrupted=f"interrupted; submitted jobs keep running (see them: {status}); "
                                          f"resume: {again} (pairs with an ok record are skipped)")

