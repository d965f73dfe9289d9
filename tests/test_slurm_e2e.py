"""End to end on a real Slurm cluster (start one with `bash .ci/slurm-single-node.sh`, root, ~1 min):
launch 6 pairs as one job array of CPU jobs, kill one mid-run, relaunch (only that pair runs), aggregate;
and a job preempted mid-run (SIGUSR2) is requeued by submitit and finishes.

Skipped, with the reason, when `sinfo` does not answer. The killed job is held deterministically: its job
function waits for a gate file that never appears, so it is RUNNING (not finished) when it is cancelled.
"""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from submitit.core.utils import UncompletedJobError

from tracing import cluster, zoo
from tracing.aggregate import aggregate
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
    status = cluster.status_table(save)
    assert status["counts"] == {"done": 5, "failed": 0, "running": 0, "missing": 1}

    t1 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--config", str(cfg), "--save", str(save),
                           "--cluster", "slurm", "--wait"], capture_output=True, text=True, timeout=300)
    print(proc.stdout, proc.stderr, f"relaunch: {time.perf_counter() - t1:.1f}s", flush=True)
    assert proc.returncode == 0
    assert "5 already done, 1 to run on slurm" in proc.stdout
    summary_lines.append(f"Slurm: relaunch ran only the cancelled pair ({time.perf_counter() - t1:.1f} s): "
                         + next(line for line in proc.stdout.splitlines() if "submitted job array" in line))
    assert "done 6  running 0  failed 0  missing 0" in proc.stdout
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
