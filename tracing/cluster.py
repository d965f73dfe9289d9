"""Fan model pairs out as one submitit job array: YAML model list -> plan -> jobs -> result records.

    python launch.py --config config/demo.yaml --cluster local --save results/demo_runs --stat csu --wait
    python launch.py --config config/llama7b.yaml --dry_run        # the plan: pairs, result paths, resources
    python launch.py --config config/llama7b.yaml --status         # done / running / failed / missing

Each job runs `PairJob()(argv)`, i.e. exactly `python main.py ARGV...` in-process (tracing.cli.main):
no shell, no models pickled, no token on any command line (jobs read HF_TOKEN from their environment).
A pair whose result record already says "ok" is skipped unless --force. PairJob is submitit
Checkpointable, so a preempted or timed-out job is requeued; finished pairs live in their own
atomically written records and are never redone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import yaml

from tracing.errors import TracingError
from tracing.naming import safe_name

# ---------------------------------------------------------------------------------------- YAML config

MODEL_KEYS = {"all": ("models",), "split": ("base_models", "ft_models"),
              "specified": ("models_1", "models_2", "names_1", "names_2")}
SLURM_KEYS = ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "account", "qos",
              "constraint", "array_parallelism", "nodes")
TOP_KEYS = ("models", "base_models", "ft_models", "models_1", "models_2", "names_1", "names_2", "slurm", "main")
SLURM_DEFAULTS = {"gpus_per_node": 1, "cpus_per_task": 4, "mem_gb": 64, "timeout_min": 240,
                  "array_parallelism": 64}


@dataclass(frozen=True)
class Pair:
    """One job: base and fine-tuned model ids as given in the YAML, plus display names."""

    base: str
    ft: str
    base_name: str
    ft_name: str


@dataclass
class LaunchConfig:
    pairs: list[Pair]
    flat: str
    slurm: dict = field(default_factory=dict)
    main: dict = field(default_factory=dict)
    source: str = ""
    duplicates: int = 0


def read_yaml(path: Path, what: str = "config") -> Any:
    """yaml.safe_load of a file; unreadable or malformed YAML is a TracingError naming the file (and line)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise TracingError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TracingError(f"malformed YAML in {where}: {problem}; fix the syntax on that line") from None


def _model_list(doc: dict, key: str, path: Path) -> list[str]:
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise TracingError(f"{path}: '{key}' must be a list of model ids (strings)")
    return [str(v).strip() for v in value]


def infer_flat(doc: Any) -> str:
    """The pairing a YAML document asks for, from its keys: 'all', 'split' or 'specified'."""
    if isinstance(doc, list) or "models" in doc:
        return "all"
    if "base_models" in doc or "ft_models" in doc:
        return "split"
    if "models_1" in doc or "models_2" in doc:
        return "specified"
    return "all"


def load_config(path: str | Path, flat: str | None = None) -> LaunchConfig:
    """Parse and validate a model-list YAML (flat list | base_models x ft_models | models_1/models_2 pairs).

    A bare top-level list (the original tool's format) is a flat list. Duplicate pairs are kept once;
    a pair of a model with itself is dropped.
    """
    path = Path(path)
    doc = read_yaml(path)
    if doc is None:
        raise TracingError(f"{path} is empty; list models under 'models:' (see config/demo.yaml)")
    if isinstance(doc, list):
        doc = {"models": doc}
    if not isinstance(doc, dict):
        raise TracingError(f"{path}: expected a mapping with 'models:' (or a list of model ids)")
    unknown = sorted(set(map(str, doc)) - set(TOP_KEYS))
    if unknown:
        raise TracingError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(TOP_KEYS)}")
    flat = flat or infer_flat(doc)
    if flat not in MODEL_KEYS:
        raise TracingError(f"--flat must be one of {', '.join(MODEL_KEYS)}, got '{flat}'")

    if flat == "all":
        models = _model_list(doc, "models", path)
        raw = [(a, b, a, b) for i, a in enumerate(models) for b in models[i + 1:]]
    elif flat == "split":
        bases, fts = _model_list(doc, "base_models", path), _model_list(doc, "ft_models", path)
        raw = [(a, b, a, b) for a in bases for b in fts]
    else:
        m1, m2 = _model_list(doc, "models_1", path), _model_list(doc, "models_2", path)
        n1, n2 = _model_list(doc, "names_1", path) or m1, _model_list(doc, "names_2", path) or m2
        if not (len(m1) == len(m2) == len(n1) == len(n2)):
            raise TracingError(f"{path}: models_1, models_2 (and names_1, names_2) must have the same length, "
                               f"got {len(m1)}, {len(m2)}, {len(n1)}, {len(n2)}")
        raw = list(zip(m1, m2, n1, n2))
    if any(not m for pair in raw for m in pair[:2]):
        raise TracingError(f"{path}: empty model id in the model list")

    seen, pairs = set(), []
    for base, ft, bn, fn in raw:
        key = frozenset((base, ft)) if flat == "all" else (base, ft)  # flat lists pair models unordered
        if base == ft or key in seen:
            continue
        seen.add(key)
        pairs.append(Pair(base, ft, str(bn), str(fn)))
    if not pairs:
        keys = " / ".join(MODEL_KEYS[flat][:2])
        raise TracingError(f"{path}: no model pairs (flat={flat}); list at least two models under {keys}")

    slurm = doc.get("slurm") or {}
    main = doc.get("main") or {}
    if not isinstance(slurm, dict) or not isinstance(main, dict):
        raise TracingError(f"{path}: 'slurm:' and 'main:' must be mappings of name: value")
    bad = sorted(set(slurm) - set(SLURM_KEYS))
    if bad:
        raise TracingError(f"{path}: unknown slurm key(s) {', '.join(bad)}; valid: {', '.join(SLURM_KEYS)}")
    flags = _main_flags()
    bad = sorted(set(main) - set(flags))
    if bad:
        raise TracingError(f"{path}: unknown main key(s) {', '.join(bad)}; valid: {', '.join(sorted(flags))}")
    return LaunchConfig(pairs=pairs, flat=flat, slurm=dict(slurm), main=dict(main), source=str(path),
                        duplicates=len(raw) - len(pairs))


# ---------------------------------------------------------------------------------------- job argv

# main.py flags a launch sets itself (per pair) or that must never travel on a job's command line
_RESERVED = {"base_model_id", "ft_model_id", "save", "token", "demo"}


def _main_flags() -> dict[str, argparse.Action]:
    from tracing.cli import build_parser

    return {a.dest: a for a in build_parser()._actions if a.option_strings and a.dest not in _RESERVED | {"help"}}


def flags_to_argv(flags: dict) -> list[str]:
    """{'stat': 'csu', 'align': True, 'alphas': [0, 0.5]} -> ['--stat', 'csu', '--align', '--alphas', '0,0.5']."""
    actions = _main_flags()
    argv: list[str] = []
    for key, value in flags.items():
        if key not in actions:
            raise TracingError(f"unknown main.py flag '{key}'; valid: {', '.join(sorted(actions))}")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(f"--{key}")
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        argv += [f"--{key}", str(value)]
    return argv


def parse_main_argv(argv: list[str]) -> argparse.Namespace:
    """Parse a job's argv with main.py's parser and check it (TracingError instead of SystemExit)."""
    from tracing.cli import build_parser, validate

    parser = build_parser()
    parser.exit_on_error = False
    try:
        args, unknown = parser.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit) as e:
        raise TracingError(f"bad main.py flags: {e}; see python main.py --help") from None
    unknown_flags = [a for a in unknown if a.startswith("-")]  # not their values, which may be secrets
    if unknown:
        raise TracingError(f"unknown flag(s) {' '.join(unknown_flags) or '(a stray value)'}: neither launch.py's "
                           "nor main.py's; see python launch.py --help and python main.py --help")
    validate(args)
    return args


@dataclass
class Task:
    pair: Pair
    argv: list[str]
    result: Path
    name: str


def plan(cfg: LaunchConfig, save: str | Path, extra_argv: list[str]) -> list[Task]:
    """One Task per pair: the argv main.py gets (YAML main: defaults, then CLI flags) and its result path."""
    from tracing.cli import result_path

    common = flags_to_argv(cfg.main) + list(extra_argv) + ["--no_progress"]
    tasks = []
    for pair in cfg.pairs:
        argv = ["--base_model_id", pair.base, "--ft_model_id", pair.ft, "--save", str(save), *common]
        args = parse_main_argv(argv)
        # checked on the parsed flags, so that abbreviations (--tok, --sav) are caught too
        if args.token is not None:
            raise TracingError("--token is not passed to jobs; export HF_TOKEN in the submitting shell instead")
        if (args.base_model_id, args.ft_model_id, args.save, args.demo) != (pair.base, pair.ft, str(save), False):
            raise TracingError("--base_model_id, --ft_model_id, --save and --demo are set by launch.py per pair; "
                               "list models in the YAML and pass --save to launch.py")
        tasks.append(Task(pair, argv, result_path(save, pair.base, pair.ft, args.stat),
                          safe_name(f"{pair.base_name}__vs__{pair.ft_name}", max_len=120)))
    return tasks


# ---------------------------------------------------------------------------------------- the job


def _failed_record(argv: list[str], result: Path, error: str) -> None:
    """The record of a job that ended without one, naming its pair like main.py's own records do."""
    from tracing.results import new_record, save_record

    try:
        args = vars(parse_main_argv(argv))
    except TracingError:  # unreachable for planned argv (validated before submission)
        args = {"argv": argv}
    rec = new_record(args)
    rec.update(status="failed", error=error, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               stat=args.get("stat"), base_model_id=args.get("base_model_id"), ft_model_id=args.get("ft_model_id"))
    save_record(rec, result)


def record_status(path: Path) -> tuple[str, str | None]:
    """('ok'|'failed'|'corrupt'|'missing', error line) of one result file."""
    from tracing.results import error_line, load_record

    if not path.exists():
        return "missing", None
    try:
        rec = load_record(path)
    except TracingError as e:
        return "corrupt", str(e)
    return str(rec.get("status")), error_line(rec.get("error"))


def run_main(argv: list[str]) -> int:
    """What a job runs: tracing.cli.main(argv) in-process. Exposed so tests can swap it."""
    from tracing.cli import main

    return main(argv)


try:  # submitit requeues Checkpointable callables on preemption / timeout
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - submitit is a runtime dependency
    _Checkpointable = object  # type: ignore[assignment,misc]


class PairJob(_Checkpointable):
    """Job function: run main.py on one argv list; always leaves a result record (ok or failed)."""

    def __init__(self, runner: Callable[[list[str]], int] | None = None):
        self.runner = runner

    def __call__(self, argv: list[str], result: str) -> dict:
        path = Path(result)
        status, _ = record_status(path)
        if status == "ok":  # a requeued job whose pair finished before preemption
            return {"result": result, "status": "ok", "code": 0}
        print(f"model-tracing job: {' '.join(argv)}", flush=True)
        try:  # SystemExit passes through: it is how submitit ends a job it has requeued (argv was validated
            code = int((self.runner or run_main)(list(argv)))  # before submission, so argparse never exits here)
        except Exception as e:
            _failed_record(argv, path, f"{type(e).__name__}: {e}")
            raise
        status, error = record_status(path)
        if status in ("missing", "corrupt"):
            _failed_record(argv, path, f"main.py exited with code {code} without writing a result")
            status, error = "failed", f"exit code {code}"
        print(f"model-tracing job: {status} -> {result}", flush=True)
        return {"result": result, "status": status, "code": code, "error": error}


# ---------------------------------------------------------------------------------------- submission


def default_cluster() -> str:
    return "slurm" if shutil.which("sbatch") else "local"


def executor_parameters(cfg_slurm: dict, overrides: dict, cluster: str, name: str) -> dict:
    """submitit AutoExecutor parameters from SLURM_DEFAULTS < YAML slurm: < CLI flags."""
    s = {**SLURM_DEFAULTS, **cfg_slurm, **{k: v for k, v in overrides.items() if v is not None}}

    def number(key: str, kind: type = int, default: Any = None) -> Any:
        try:
            return kind(s.get(key, default))
        except (TypeError, ValueError):
            raise TracingError(f"slurm: {key} must be a number, got {s.get(key)!r}") from None

    params: dict[str, Any] = {"name": name, "timeout_min": number("timeout_min"),
                              "gpus_per_node": number("gpus_per_node"), "cpus_per_task": number("cpus_per_task"),
                              "mem_gb": number("mem_gb", float), "nodes": number("nodes", default=1)}
    if cluster == "slurm":
        params["slurm_array_parallelism"] = number("array_parallelism")
        for key in ("partition", "account", "qos", "constraint"):
            if s.get(key):
                params[f"slurm_{key}"] = str(s[key])
        if params["gpus_per_node"] == 0:
            params.pop("gpus_per_node")
    return params


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def submit(tasks: list[Task], folder: Path, cluster: str, params: dict,
           runner: Callable[[list[str]], int] | None = None) -> list:
    """Submit every task as one job array; returns the submitit jobs (same order as tasks)."""
    import submitit

    folder.mkdir(parents=True, exist_ok=True)
    # jobs import `tracing` from this checkout whatever their working directory
    paths = [_repo_root(), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**params)
    job_fn = PairJob(runner)
    jobs = executor.map_array(job_fn, [t.argv for t in tasks], [str(t.result) for t in tasks])
    return jobs


# ---------------------------------------------------------------------------------------- manifest + status

MANIFEST = "launches.jsonl"


def write_manifest(save: Path, cluster: str, tasks: list[Task], jobs: list, folder: Path) -> None:
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
        import submitit
        return submitit.SlurmJob(folder=Path(entry["folder"]), job_id=job_id).state
    except Exception:
        return "UNKNOWN"


def _last_log_line(entry: dict, job_id: str) -> str | None:
    """Last non-blank line of the job's stderr log (its task 0; array task 4 must not read task 40's log)."""
    from submitit.core.utils import JobPaths

    from tracing.results import error_line

    log = JobPaths(entry["folder"], job_id=job_id, task_id=0).stderr
    return error_line(log.read_text(errors="replace")) if log.is_file() else None


def status_table(save: Path, tasks: list[Task] | None = None) -> dict:
    """Counts of done / failed / running / missing over the pairs of every launch into `save`.

    Returns {"counts": {...}, "rows": [(pair name, state, error line)]}.
    """
    latest: dict[str, tuple[dict, dict]] = {}
    for entry in read_manifest(save):
        for t in entry["tasks"]:
            latest[t["result"]] = (entry, t)
    if tasks is not None:
        for t in tasks:
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
            if job_state in ("RUNNING", "PENDING", "REQUEUED", "CONFIGURING", "COMPLETING"):
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


def print_status(save: Path, tasks: list[Task] | None = None, out: TextIO | None = None) -> dict:
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


# ---------------------------------------------------------------------------------------- launch


def launch(config: str | Path, save: str | Path, extra_argv: list[str], cluster: str | None = None,
           flat: str | None = None, force: bool = False, dry_run: bool = False, wait: bool = False,
           slurm_overrides: dict | None = None, runner: Callable[[list[str]], int] | None = None,
           out: TextIO | None = None) -> dict:
    """Plan, skip finished pairs, submit the rest as one job array.

    Returns {"tasks", "skipped", "jobs", "status"}; "status" is the status_table after waiting, else None.
    """
    out = out or sys.stdout
    cfg = load_config(config, flat)
    cluster = cluster or default_cluster()
    if cluster not in ("slurm", "local", "debug"):
        raise TracingError(f"--cluster must be slurm, local or debug, got '{cluster}'")
    if cluster == "slurm" and not shutil.which("sbatch"):
        raise TracingError("--cluster slurm needs sbatch on PATH; use --cluster local on a machine without Slurm")
    save = Path(save)
    tasks = plan(cfg, save, extra_argv)
    todo = [t for t in tasks if force or record_status(t.result)[0] != "ok"]
    skipped = len(tasks) - len(todo)
    name = safe_name(f"tracing-{Path(config).stem}", max_len=60)
    params = executor_parameters(cfg.slurm, slurm_overrides or {}, cluster, name)
    print(f"{len(tasks)} pairs from {config} (flat={cfg.flat}"
          + (f", {cfg.duplicates} duplicate/self pairs dropped" if cfg.duplicates else "")
          + f"); {skipped} already done, {len(todo)} to run on {cluster}", file=out, flush=True)
    if dry_run:
        print(f"resources: {json.dumps(params)}", file=out)
        for t in tasks:
            mark = "run " if t in todo else "skip"
            print(f"  {mark} {t.pair.base_name} vs {t.pair.ft_name} -> {t.result}", file=out)
        return {"tasks": tasks, "skipped": skipped, "jobs": [], "status": None}
    if not todo:
        return {"tasks": tasks, "skipped": skipped, "jobs": [], "status": None}
    folder = save / "submitit"
    wait = wait or cluster == "debug"  # the debug executor runs a job when its result is asked for
    if force:  # a job skips a pair whose record is ok (a requeue after it finished): remove the old ones first
        for t in todo:
            for path in (t.result, t.result.with_suffix(".json")):
                path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    jobs = submit(todo, folder, cluster, params, runner)
    write_manifest(save, cluster, todo, jobs, folder)
    print(f"submitted job array {jobs[0].job_id.split('_')[0]} ({len(jobs)} tasks), logs in {folder}",
          file=out, flush=True)
    table = None
    if wait:
        from tracing.results import error_line

        for job in jobs:
            try:
                job.result()
            except Exception as e:
                print(f"job {job.job_id} did not finish: {error_line(e)}", file=out, flush=True)
        print(f"all jobs ended in {time.perf_counter() - t0:.1f}s", file=out, flush=True)
        table = print_status(save, tasks, out)
    return {"tasks": tasks, "skipped": skipped, "jobs": jobs, "status": table}
