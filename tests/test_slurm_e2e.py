"""End to end on a real Slurm cluster (start one with `bash .ci/slurm-single-node.sh`, root, ~1 min):
launch 6 pairs as one job array of CPU jobs, kill one mid-run, relaunch (only that pair runs), aggregate;
and a job preempted mid-run (SIGUSR2) is requeued by submitit and finishes.

Skipped, with the reason, when `sinfo` does not answer. The killed job is held deterministically: its job
function waits for a gate file that never appears, so it is RUNNING (not finished) when it is cancelled.
"""

import importlib
import io
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from submitit.core.utils import UncompletedJobError

from tracing import cluster, zoo
from tracing.aggregate import aggregate
from tracing.errors import TracingError
from tracing.results import load_record

ROOT = Path(__file__).resolve().parent.parent


def _slurm_problem() -> str | None:
    for tool in ("sbatch", "sinfo", "squeue", "scancel", "sacct"):
        if not shutil.which(tool):
            return f"{tool} not on PATH (start a cluster with: bash .ci/slurm-single-node.sh)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld not answering"
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s in ("idle", "mix", "alloc") for s in states):
        return f"no usable Slurm node (sinfo rc={proc.returncode}: {(proc.stderr or proc.stdout).strip()[:200]})"
    return None


pytestmark = pytest.mark.skipif(_slurm_problem() is not None, reason=f"SLURM UNAVAILABLE: {_slurm_problem()}")

GATE_MODULE = '''
import os, time
from tracing.cluster import run_main

def run(cfg):
    """Run the pair, except for c vs held: wait for GATE (never created)."""
    if cfg.base_model_id.endswith("/c") and cfg.ft_model_id.endswith("/held"):
        while not os.path.exists(os.environ.get("GATE", "/nonexistent")):
            time.sleep(0.2)
    return run_main(cfg)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    tok = zoo.build_tokenizer(zoo.synthetic_text(200, seed=0), vocab_size=128)
    models = []
    for seed, name in enumerate(["a", "b", "c", "held"]):
        model = zoo.tiny_model("llama", seed=seed, hidden=16, layers=2, intermediate=32, vocab_size=len(tok))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        models.append(str(root / name))
    (root / "e2e_gate.py").write_text(GATE_MODULE)
    cfg = root / "models.yaml"
    cfg.write_text("models: [%s]\nslurm: {gpus_per_node: 0, cpus_per_task: 1, mem_gb: 1, timeout_min: 5}\n"
                   "main: {stat: l2, device: cpu}\n" % ", ".join(models))
    tree = root / "tree.yaml"
    tree.write_text("- %s:\n    - %s\n- %s\n- %s\n" % tuple(models))
    return root, cfg, tree


def _sacct(job_id: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,JobName,State"],
                         capture_output=True, text=True, timeout=30).stdout
    print(f"sacct -j {job_id}:\n{out}", flush=True)
    return out


def test_slurm_launch_kill_relaunch_aggregate(setup, monkeypatch, summary_lines):
    root, cfg, tree = setup
    save = root / "results"
    monkeypatch.setenv("GATE", str(root / "gate-never-created"))
    monkeypatch.setenv("PYTHONPATH", str(root))
    monkeypatch.syspath_prepend(str(root))
    import e2e_gate

    t0 = time.perf_counter()
    out = cluster.launch(cfg, save, {}, cluster="slurm", runner=e2e_gate.run)
    tasks, jobs = out["tasks"], out["jobs"]
    assert len(jobs) == 6
    held = next(i for i, t in enumerate(tasks) if t.pair.ft.endswith("/held") and t.pair.base.endswith("/c"))
    deadline = time.time() + 180
    state = ""
    while state != "RUNNING":  # the gate keeps it RUNNING until we cancel it (squeue: no sacct cache delay)
        assert time.time() < deadline, f"held job never started: {state}"
        time.sleep(0.5)
        state = subprocess.run(["squeue", "-h", "-j", jobs[held].job_id, "-o", "%T"], capture_output=True,
                               text=True, timeout=30).stdout.strip()
    subprocess.run(["scancel", jobs[held].job_id], check=True)
    for i, job in enumerate(jobs):
        if i != held:
            assert job.result()["status"] == "ok"
    with pytest.raises(UncompletedJobError):  # cancelled: no result
        jobs[held].result()
    first = time.perf_counter() - t0
    array_id = jobs[0].job_id.split("_")[0]
    accounting = _sacct(array_id)
    assert accounting.count("COMPLETED") == 5 and "CANCELLED" in accounting  # they ran on Slurm
    summary_lines.append(f"Slurm: job array {array_id} on {_node(jobs[0].job_id)}: 6 tasks, "
                         f"{accounting.count('COMPLETED')} COMPLETED, 1 CANCELLED mid-run ({first:.1f} s)")

    for i, t in enumerate(tasks):
        if i == held:
            assert not t.result.exists() and not list(save.glob(f"{t.result.stem}*"))  # nothing half-written
        else:
            rec = load_record(t.result)
            assert rec["status"] == "ok" and rec["value"] > 0 and rec["versions"]["torch"]
            assert rec["threads"] == 1  # cpus_per_task 1 on a 2-CPU node: the job used what it was given
    status = cluster.status_table(save)
    assert status["counts"] == {"done": 5, "running": 0, "pending": 0, "failed": 0, "missing": 1}

    t1 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--config", str(cfg), "--save", str(save),
                           "--cluster", "slurm", "--wait"], capture_output=True, text=True, timeout=300)
    print(proc.stdout, proc.stderr, f"relaunch: {time.perf_counter() - t1:.1f}s", flush=True)
    assert proc.returncode == 0
    assert "5 already done, 1 to run on slurm" in proc.stdout
    summary_lines.append(f"Slurm: relaunch ran only the cancelled pair ({time.perf_counter() - t1:.1f} s): "
                         + next(line for line in proc.stdout.splitlines() if "submitted job array" in line))
    assert "done 6  running 0  pending 0  failed 0  missing 0" in proc.stdout
    assert load_record(tasks[held].result)["status"] == "ok"

    agg = aggregate(save, truth=tree, figures=False)
    assert len(agg["table"]) == 6 and agg["problems"] == []
    l2 = agg["scores"].query("stat == 'l2' and variant == 'non-aligned'").iloc[0]
    assert l2["n"] == 6


def _job_info(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout


def _node(job_id: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "NodeList"], capture_output=True,
                         text=True, timeout=30).stdout.split()
    return f"node {out[0]}" if out else "a Slurm node"


def test_slurm_preempted_job_is_requeued_and_finishes(setup, monkeypatch, summary_lines):
    """SIGUSR2 (what Slurm sends before a preemption or time limit) makes submitit checkpoint the job and
    requeue it; the requeued job runs the pair again and writes its record."""
    root, _, _ = setup
    save, gate = root / "requeue", root / "requeue-gate"
    cfg = root / "requeue.yaml"
    cfg.write_text("models: [%s, %s]\nslurm: {gpus_per_node: 0, cpus_per_task: 1, mem_gb: 1, timeout_min: 5}\n"
                   "main: {stat: l2, device: cpu}\n" % (root / "c", root / "held"))
    monkeypatch.setenv("GATE", str(gate))  # the pair c vs held waits for this file
    monkeypatch.setenv("PYTHONPATH", str(root))
    monkeypatch.syspath_prepend(str(root))
    import e2e_gate

    job = cluster.launch(cfg, save, {}, cluster="slurm", runner=e2e_gate.run)["jobs"][0]
    deadline = time.time() + 180
    while "JobState=RUNNING" not in _job_info(job.job_id):
        assert time.time() < deadline, "job never started"
        time.sleep(0.5)
    log = Path(job.paths.stdout)
    while "model-tracing job:" not in (log.read_text() if log.exists() else ""):  # handler installed by now
        assert time.time() < deadline, "job never reached the pair"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    while "Restarts=1" not in (info := _job_info(job.job_id)) or "JobState=RUNNING" not in info:
        assert time.time() < deadline, f"job was not requeued:\n{info}"
        if "Restarts=1" in info and "JobState=PENDING" in info:  # skip Slurm's requeue delay (~2 min)
            subprocess.run(["scontrol", "update", f"jobid={job.job_id}", "StartTime=now"], check=True)
        time.sleep(0.5)
    gate.touch()
    assert job.result()["status"] == "ok"
    assert load_record(next(save.glob("*.pkl")))["status"] == "ok"
    out = log.read_text()
    print(out, flush=True)
    assert "Requeued job" in out and out.count("model-tracing job: ok") == 1
    summary_lines.append(f"Slurm: job {job.job_id} got SIGUSR2 mid-run, was requeued by submitit "
                         "(Restarts=1) and wrote its record (status ok)")


def test_slurm_preflight_refuses_a_request_that_can_never_run(setup, summary_lines):
    """The default resources ask for a GPU this partition lacks, and more CPUs and memory than its node has:
    each is refused before submission, in one line naming the flag and the largest value that fits;
    a refusal that only sbatch can see (an unknown feature) is one line too. Nothing is queued."""
    root, cfg, _ = setup
    node = _scontrol_node()
    cpus, mem_gb = int(node["CPUTot"]), int(node["RealMemory"]) // 1024
    yaml = root / "defaults.yaml"
    yaml.write_text("models: [%s, %s]\nmain: {stat: l2, device: cpu}\n" % (root / "a", root / "b"))
    save = root / "refused"
    for flags, *needles in [([], "--gpus_per_node 1 can never run", "pass --gpus_per_node 0"),
                            (["--gpus_per_node", "0", "--cpus_per_task", "1", "--mem_gb", "1", "--constraint",
                              "nosuchfeature"], "sbatch refused the job array", "--constraint")]:  # the CLI: exit 2
        proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--config", str(yaml), "--save", str(save),
                               "--cluster", "slurm", *flags], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert all(n in proc.stderr for n in needles), proc.stderr
        summary_lines.append(f"Slurm preflight: launch.py {' '.join(flags) or '(default resources)'} -> exit 2: "
                             f"{proc.stderr.strip()}")
    for over, needle in (({"cpus_per_task": cpus + 6}, f"pass --cpus_per_task {cpus}"),  # in-process: same code
                         ({"cpus_per_task": 1, "mem_gb": mem_gb + 57}, f"pass --mem_gb {mem_gb}")):
        with pytest.raises(TracingError, match=needle) as err:
            cluster.launch(yaml, save, {}, cluster="slurm", slurm_overrides={"gpus_per_node": 0, **over})
        summary_lines.append(f"Slurm preflight: {over} -> {err.value}")
    assert not (save / "launches.jsonl").exists()  # nothing was submitted


def _scontrol_node() -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0]))


def _pending_array(monkeypatch):
    """Make the launch's job array pend (Slurm reason BeginTime): what any busy cluster does to a launch."""
    module = importlib.import_module("tracing.cluster.submit")
    real = module.executor_parameters

    def later(*args, **kw):
        return {**real(*args, **kw), "slurm_additional_parameters": {"begin": "now+1hour"}}

    monkeypatch.setattr(module, "executor_parameters", later)


def _our_jobs(save: Path) -> list[str]:
    text = (save / "launches.jsonl").read_text() if (save / "launches.jsonl").exists() else ""
    return [t["job_id"] for line in text.splitlines() for t in json.loads(line)["tasks"]]


def _squeue(job_ids: list[str]) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T %r"], capture_output=True, text=True, timeout=30).stdout
    return {f[0]: " ".join(f[1:]) for f in map(str.split, out.splitlines()) if f and f[0] in job_ids}


def test_slurm_wait_ends_when_a_pending_array_is_cancelled(setup, monkeypatch, summary_lines):
    """A pending array: --max_wait ends the wait with the pairs named as open, --status shows why they wait;
    then a second launch waits, its pending array is cancelled (its tasks never start), and --wait returns."""
    root, cfg, _ = setup
    yaml = root / "pending.yaml"
    yaml.write_text("models: [%s, %s, %s]\nslurm: {gpus_per_node: 0, cpus_per_task: 1, mem_gb: 1, timeout_min: 5}\n"
                    "main: {stat: l2, device: cpu}\n" % (root / "a", root / "b", root / "c"))
    _pending_array(monkeypatch)
    save, out = root / "pending", io.StringIO()
    t0 = time.perf_counter()
    first = cluster.launch(yaml, save, {}, cluster="slurm", wait=True, max_wait=3, out=out)
    assert len(first["open"]) == 3 and first["status"]["counts"]["pending"] == 3, out.getvalue()
    assert "BeginTime" in out.getvalue()  # the wait said why
    status = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--config", str(yaml), "--save", str(save),
                             "--status"], capture_output=True, text=True, timeout=120, cwd=root.parent)
    assert "pending 3" in status.stdout and status.stdout.count("| BeginTime") == 3, status.stdout
    subprocess.run(["scancel", first["jobs"][0].job_id.split("_")[0]], check=True)
    summary_lines.append(f"Slurm: --wait --max_wait 3 on a pending array returned after "
                         f"{time.perf_counter() - t0:.1f} s with 3 pairs open; --status: "
                         + status.stdout.splitlines()[0].split(": ", 1)[1])

    cancelled: list[str] = []

    def cancel_when_pending():
        deadline = time.time() + 120
        while time.time() < deadline:
            ids = [j for j in _our_jobs(save) if j not in first_ids]
            queued = _squeue(ids)
            if ids and len(queued) == len(ids) and all(s.startswith("PENDING") for s in queued.values()):
                cancelled.append(ids[0].split("_")[0])
                subprocess.run(["scancel", cancelled[0]], check=True)
                return
            time.sleep(0.3)

    first_ids = {j.job_id for j in first["jobs"]}
    canceller = threading.Thread(target=cancel_when_pending, daemon=True)
    canceller.start()
    t1, out = time.perf_counter(), io.StringIO()
    second = cluster.launch(yaml, save, {}, cluster="slurm", wait=True, max_wait=300, out=out)
    waited = time.perf_counter() - t1
    canceller.join(timeout=10)
    assert cancelled and second["open"] == [], out.getvalue()  # ended by the cancel, not by max_wait
    assert second["status"]["counts"]["missing"] == 3 and "all jobs ended" in out.getvalue()
    assert _squeue([j.job_id for j in second["jobs"]]) == {}
    summary_lines.append(f"Slurm: pending array {cancelled[0]} cancelled while --wait ran: --wait returned "
                         f"{waited:.1f} s after submission (3 tasks never started)")
