"""launch.py: YAML model lists -> one submitit job array of main.py runs (debug and local executors here;
the real-Slurm run is tests/test_slurm_e2e.py)."""

import importlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tracing import cluster, zoo
from tracing.cli import parse_run_flags
from tracing.cluster.status import _last_log_line
from tracing.cluster.wait import wait_for
from tracing.config import RunConfig
from tracing.errors import TracingError
from tracing.model_lists import load_config
from tracing.results import load_record

ROOT = Path(__file__).resolve().parent.parent
wait_module = importlib.import_module("tracing.cluster.wait")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[str]:
    """Three tiny independent llama checkpoints on disk (weight statistics need no data)."""
    root = tmp_path_factory.mktemp("models")
    tok = zoo.build_tokenizer(zoo.synthetic_text(200, seed=0), vocab_size=128)
    out = []
    for seed, name in enumerate("abc"):
        model = zoo.tiny_model("llama", seed=seed, hidden=16, layers=2, intermediate=32, vocab_size=len(tok))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out.append(str(root / name))
    return out


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_plan_merges_yaml_defaults_and_cli_flags(tmp_path):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", "models: [a, b]\nmain: {stat: csu, align: true}\n"))
    (task,) = cluster.plan(cfg, tmp_path / "out", {"stat": "l2"})
    assert (task.cfg.base_model_id, task.cfg.ft_model_id, task.cfg.save) == ("a", "b", str(tmp_path / "out"))
    assert task.cfg.align and task.cfg.stat == "l2" and task.result.parent == tmp_path / "out"
    assert task.result.name == f"a__vs__b__l2__{task.cfg.result_key()}.pkl" and task.cfg.key_flags() == {"align": True}
    assert task.cfg.command_line().startswith("python main.py --base_model_id a --ft_model_id b --stat l2 --align")
    with pytest.raises(TracingError, match="unknown statistic|valid"):
        cluster.plan(cfg, tmp_path, {"stat": "nope"})
    with pytest.raises(TracingError, match="export HF_TOKEN"):
        cluster.plan(cfg, tmp_path, {"token": "hf_secret"})


def test_debug_launch_runs_every_pair_then_skips_finished_ones(tmp_path, models, capsys):
    cfg = write_yaml(tmp_path / "c.yaml", "models: [%s]\nmain: {stat: l2, device: cpu}\n" % ", ".join(models))
    out = cluster.launch(cfg, tmp_path / "out", {}, cluster="debug")
    assert len(out["jobs"]) == 3
    for task in out["tasks"]:
        rec = load_record(task.result)
        assert rec["status"] == "ok" and rec["value"] > 0 and "token" not in rec["args"]
    again = cluster.launch(cfg, tmp_path / "out", {}, cluster="debug")
    assert again["skipped"] == 3 and again["jobs"] == []
    ran = []

    def runner(run_cfg):
        ran.append(run_cfg)
        return cluster.run_main(run_cfg)

    forced = cluster.launch(cfg, tmp_path / "out", {}, cluster="debug", force=True, runner=runner)
    assert len(forced["jobs"]) == 3 and len(ran) == 3  # --force reruns the pairs, not just resubmits them
    assert all(load_record(t.result)["status"] == "ok" for t in forced["tasks"])
    assert cluster.status_table(tmp_path / "out")["counts"] == {"done": 3, "running": 0, "pending": 0, "failed": 0,
                                                                 "missing": 0}


def test_requeued_job_keeps_a_finished_result_and_preemption_writes_no_failure(tmp_path, models):
    """What submitit does around a requeue, in-process: the job is called again after its pair finished
    (it must not redo or overwrite it), or SystemExit ends it mid-run (it must not record a failure)."""
    result = tmp_path / "pair.pkl"
    cfg = RunConfig(base_model_id=models[0], ft_model_id=models[1], stat="l2", save=str(result))

    def preempted(cfg):
        raise SystemExit(-1)  # submitit's exit after requeueing a preempted job

    with pytest.raises(SystemExit):
        cluster.PairJob(runner=preempted)(cfg)
    assert not result.exists()
    assert cluster.PairJob()(cfg)["status"] == "ok"
    first = result.read_bytes()

    def must_not_run(cfg):
        raise AssertionError("a finished pair ran again")

    assert cluster.PairJob(runner=must_not_run)(cfg)["status"] == "ok"
    assert result.read_bytes() == first


def test_shell_metacharacters_in_a_model_id_stay_a_plain_string(tmp_path, models):
    marker = tmp_path / "pwned"
    evil = f"x; touch {marker} #$(touch {marker})"
    cfg = write_yaml(tmp_path / "c.yaml", json.dumps({"models": [models[0], evil], "main": {"stat": "l2"}}))
    out = cluster.launch(cfg, tmp_path / "out", {}, cluster="debug")
    (task,) = out["tasks"]
    assert not marker.exists()
    assert "/" not in task.result.name and ";" not in task.result.name and " " not in task.result.name
    rec = load_record(task.result)
    assert rec["status"] == "failed" and rec["ft_model_id"] == evil
    table = cluster.status_table(tmp_path / "out")
    assert table["counts"]["failed"] == 1 and table["rows"][0][2]  # the error line is shown


def test_dry_run_submits_nothing(tmp_path, models, capsys):
    cfg = write_yaml(tmp_path / "c.yaml", "models: [%s]\nslurm: {gpus_per_node: 0}\n" % ", ".join(models))
    out = cluster.launch(cfg, tmp_path / "out", {"stat": "l2"}, cluster="local", dry_run=True)
    assert out["jobs"] == [] and not (tmp_path / "out").exists()
    text = capsys.readouterr().out
    assert "3 pairs" in text and '"gpus_per_node": 0' in text and text.count("  run  ") == 3


def test_local_launch_runs_jobs_as_processes_and_reports_status(tmp_path, models, capsys):
    cfg = write_yaml(tmp_path / "c.yaml", "models: [%s]\nslurm: {gpus_per_node: 0, timeout_min: 5}\n"
                     % ", ".join(models[:2]))
    out = cluster.launch(cfg, tmp_path / "out", {"stat": "l2", "device": "cpu"}, cluster="local", wait=True)
    assert "done 1  running 0  pending 0  failed 0  missing 0" in capsys.readouterr().out
    (task,) = out["tasks"]
    assert load_record(task.result)["status"] == "ok"
    assert list((tmp_path / "out" / "submitit").glob("*_log.out"))  # it ran as a submitit job


def test_launch_cli_bad_input_exits_2_with_one_line(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", "models: [a, b]\nfoo: 1\n")
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--config", str(cfg), "--cluster", "local",
                           "--dry_run"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "valid keys" in proc.stderr


def test_abbreviated_or_reserved_flags_never_reach_a_job(tmp_path, capsys):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", "models: [a, b]\n"))

    def plan(argv):  # what launch.py does with the flags that are not its own
        return cluster.plan(cfg, tmp_path, parse_run_flags(argv))

    for argv in (["--tok", "hf_secret"], ["--toke=hf_secret"]):
        with pytest.raises(TracingError, match="export HF_TOKEN") as err:
            plan(argv)
        assert "hf_secret" not in str(err.value)
    for argv in (["--base_model_id", "x"], ["--sav", "elsewhere"], ["--demo"]):
        with pytest.raises(TracingError, match="set by launch.py per pair"):
            plan(argv)
    for argv in (["--hf_tok", "hf_secret"], ["--hf_tok=hf_secret"]):  # unknown flags are named, values are not
        with pytest.raises(TracingError, match="--hf_tok") as err:
            plan(argv)
        assert "hf_secret" not in str(err.value)


def test_a_job_that_crashes_leaves_a_failed_record_naming_its_pair(tmp_path):
    result = tmp_path / "pair.pkl"
    cfg = RunConfig(base_model_id="org/a", ft_model_id="org/b", stat="l2", save=str(result))

    def crash(cfg):
        raise RuntimeError("CUDA out of memory\n")

    with pytest.raises(RuntimeError):
        cluster.PairJob(runner=crash)(cfg)
    rec = load_record(result)
    assert (rec["status"], rec["base_model_id"], rec["ft_model_id"], rec["stat"]) == ("failed", "org/a", "org/b", "l2")
    assert cluster.record_status(result) == ("failed", "RuntimeError: CUDA out of memory")


def test_status_reads_the_log_of_its_own_array_task(tmp_path):
    for task in ("4", "40"):
        (tmp_path / f"77_{task}_0_log.err").write_text(f"error of task {task}\n\n")
    assert _last_log_line(tmp_path, "77_4") == "error of task 4"
    assert _last_log_line(tmp_path, "77_5") is None


def test_non_numeric_resources_are_a_tracing_error():
    with pytest.raises(TracingError, match="slurm: mem_gb must be a number, got 'lots'"):
        cluster.executor_parameters({"mem_gb": "lots"}, {}, "slurm", "x")
    with pytest.raises(TracingError, match="timeout_min"):
        cluster.executor_parameters({"timeout_min": None}, {}, "local", "x")


@pytest.mark.parametrize("executor", ["slurm", "local", "debug"])
@pytest.mark.parametrize("yaml_slurm, flags, said", [
    ("{cpus_per_task: -2, mem_gb: 0}", [], "slurm: cpus_per_task must be at least 1, got -2"),
    ("{mem_gb: 0}", [], "slurm: mem_gb must be a positive number, got 0"),
    ("{}", ["--cpus_per_task", "0"], "--cpus_per_task must be at least 1, got 0"),
    ("{}", ["--gpus_per_node", "-1"], "--gpus_per_node must be at least 0"),
    ("{}", ["--timeout_min", "1"], "--timeout_min must be at least 2"),
    ("{}", ["--array_parallelism", "0"], "--array_parallelism must be at least 1"),
])
def test_resources_below_their_minimum_are_refused_before_anything_runs(tmp_path, executor, yaml_slurm, flags, said):
    """sbatch would refuse these; a local or debug run used to go ahead with them (exit 0)."""
    overrides = dict(zip([f[2:] for f in flags[::2]], [float(v) for v in flags[1::2]]))
    lc = load_config(write_yaml(tmp_path / "c.yaml", f"models: [a, b]\nslurm: {yaml_slurm}\n"))
    with pytest.raises(TracingError) as err:
        cluster.executor_parameters(lc.slurm, overrides, executor, "x")
    assert said in str(err.value)


def test_dry_run_refuses_a_save_folder_under_a_regular_file(tmp_path, models):
    (tmp_path / "file").write_text("not a folder")
    cfg = write_yaml(tmp_path / "c.yaml", "models: [%s]\n" % ", ".join(models[:2]))
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--config", str(cfg), "--cluster", "local",
                           "--save", str(tmp_path / "file" / "out"), "--dry_run"], capture_output=True, text=True)
    assert proc.returncode == 2 and "is a file, not a folder; pass --save a writable folder" in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_launch_cli_exits_1_when_a_waited_pair_failed(tmp_path, models):
    cfg = write_yaml(tmp_path / "c.yaml", "models: [%s, %s]\nmain: {stat: l2, device: cpu}\n"
                     % (models[0], tmp_path / "no-such-model"))
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--config", str(cfg), "--save",
                           str(tmp_path / "out"), "--cluster", "debug"], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the debug executor waits: its failures count
    assert "failed 1" in proc.stdout


def test_status_counts_each_pair_once_in_a_moved_or_copied_folder_from_any_directory(tmp_path, models):
    """Records are found by what they are the result of, not by the path a launch wrote them to."""
    cfg = write_yaml(tmp_path / "c.yaml", "models: [%s]\nmain: {stat: l2, device: cpu}\n" % ", ".join(models))
    cluster.launch(cfg, tmp_path / "out", {}, cluster="debug")
    shutil.copytree(tmp_path / "out", tmp_path / "out" / "backup")  # a copy inside the folder
    moved = shutil.move(tmp_path / "out", tmp_path / "moved")  # then the folder moves
    counts = {"done": 3, "running": 0, "pending": 0, "failed": 0, "missing": 0}
    assert cluster.status_table(moved)["counts"] == counts
    for cwd in (tmp_path, ROOT):  # --status from another directory, with a relative and an absolute --save
        save = "moved" if cwd == tmp_path else str(moved)
        proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--config", str(cfg), "--save", save,
                               "--status"], capture_output=True, text=True, cwd=cwd)
        assert proc.returncode == 0 and "done 3  running 0  pending 0  failed 0  missing 0" in proc.stdout, proc.stdout
    again = cluster.launch(cfg, moved, {}, cluster="debug")
    assert again["skipped"] == 3 and again["jobs"] == []  # nothing reruns in the moved folder


GATED = """
import os, time
from tracing.cluster import run_main

def run(cfg):
    while not os.path.exists(os.environ["GATE"]):
        time.sleep(0.1)
    return run_main(cfg)
"""


def test_max_wait_ends_a_wait_and_names_the_open_pairs(tmp_path, models, capsys, monkeypatch):
    """A local job that cannot finish (it waits for a gate file): --max_wait returns with the pair open."""
    gate = tmp_path / "gate"
    (tmp_path / "gated_job.py").write_text(GATED)
    monkeypatch.setenv("GATE", str(gate))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the job process imports the gate module too
    monkeypatch.syspath_prepend(str(tmp_path))
    import gated_job

    cfg = write_yaml(tmp_path / "c.yaml", "models: [%s]\nslurm: {gpus_per_node: 0, timeout_min: 5}\n"
                     "main: {stat: l2, device: cpu}\n" % ", ".join(models[:2]))
    out = cluster.launch(cfg, tmp_path / "out", {}, cluster="local", wait=True, max_wait=1, runner=gated_job.run)
    try:
        assert [t.pair.ft for t in out["open"]] == [models[1]]
        text = capsys.readouterr().out
        assert "waiting: 0/1 ended" in text and "stopped waiting after" in text and "1 pair(s) still open" in text
    finally:
        gate.touch()
        out["jobs"][0].result()
    assert cluster.status_table(tmp_path / "out")["counts"]["done"] == 1



class _Clock:
    """A fake clock for wait_for: sleeping advances it, so a wait of minutes takes no time."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


class _Job:
    def __init__(self, job_id: str, ends_at: float, clock: _Clock):
        self.job_id, self.ends_at, self.clock = job_id, ends_at, clock

    def done(self) -> bool:
        return self.clock() >= self.ends_at


def test_wait_reports_at_most_once_a_minute_and_max_wait_bounds_it():
    clock, out = _Clock(), io.StringIO()
    jobs = [_Job("1_0", 30, clock), _Job("1_1", 200, clock)]
    assert wait_for(jobs, "local", out=out, clock=clock, sleep=clock.sleep) == []
    assert clock() >= 200
    lines = out.getvalue().splitlines()  # at the start, then once when a job ended (not every poll)
    assert [ln.split(" (")[0] for ln in lines] == ["waiting: 0/2 ended", "waiting: 1/2 ended"], lines
    clock = _Clock()
    jobs = [_Job("2_0", 30, clock), _Job("2_1", 10_000, clock)]
    assert wait_for(jobs, "local", max_wait=100, out=io.StringIO(), clock=clock, sleep=clock.sleep) == [1]
    assert 100 <= clock() < 110


def test_a_slurm_job_has_ended_when_squeue_no_longer_holds_it(monkeypatch):
    """Cancelled array tasks that never started vanish from squeue: the wait ends; pending reasons are said."""
    clock, out = _Clock(), io.StringIO()
    answers = iter([None, {"7_0": ("PENDING", "PartitionConfig"), "7_1": ("PENDING", "PartitionConfig")}, {}])
    monkeypatch.setattr(wait_module, "queue", lambda ids: next(answers))
    monkeypatch.setattr(wait_module, "REPORT_S", 0.0)
    jobs = [_Job("7_0", float("inf"), clock), _Job("7_1", float("inf"), clock)]
    assert wait_for(jobs, "slurm", out=out, clock=clock, sleep=clock.sleep) == []
    text = out.getvalue()
    assert "squeue did not answer" in text and "2 pending, reasons: PartitionConfig x2" in text
    assert "never starts as it is: scancel it and relaunch with resources that fit" in text


def test_preflight_names_the_flag_and_the_largest_value_that_fits(monkeypatch):
    slurm = importlib.import_module("tracing.cluster.slurm")
    nodes = ("NodeName=g1 CPUTot=8 CPUEfctv=8 RealMemory=256000 Gres=gpu:a100:4(S:0-1),shard:8 Partitions=gpu,mixed\n"
             "NodeName=c1 CPUTot=64 RealMemory=512000 Gres=(null) Partitions=cpu,mixed")
    parts = ("PartitionName=gpu Default=NO MaxTime=2-00:00:00 MaxNodes=UNLIMITED State=UP\n"
             "PartitionName=cpu Default=YES MaxTime=UNLIMITED MaxMemPerNode=64000 State=UP\n"
             "PartitionName=mixed Default=NO MaxTime=UNLIMITED State=UP")
    monkeypatch.setattr(slurm, "_run", lambda cmd, timeout=30: parts if cmd[2] == "partition" else nodes)
    ok = {"slurm_partition": "gpu", "gpus_per_node": 4, "cpus_per_task": 8, "mem_gb": 250, "timeout_min": 2880}
    assert slurm.preflight(ok).name == "gpu"
    for change, needle in (({"gpus_per_node": 8}, "at most 4 GPUs; pass --gpus_per_node 4"),
                           ({"cpus_per_task": 16}, "at most 8 CPUs; pass --cpus_per_task 8"),
                           ({"mem_gb": 300}, "at most 250 GB of memory; pass --mem_gb 250"),
                           ({"timeout_min": 3000}, "time limit is 2880 minutes; pass --timeout_min 2880"),
                           ({"slurm_partition": "gpus"}, "no partition 'gpus': pass --partition with one of cpu, gpu")):
        with pytest.raises(TracingError, match=needle):
            slurm.preflight({**ok, **change})
    default = {"gpus_per_node": 1, "cpus_per_task": 4, "mem_gb": 8, "timeout_min": 60}  # partition cpu: no GPU
    with pytest.raises(TracingError, match="partition cpu: its nodes have no GPUs; pass --gpus_per_node 0"):
        slurm.preflight(default)
    with pytest.raises(TracingError, match="at most 62 GB of memory"):  # MaxMemPerNode caps the node's memory
        slurm.preflight({**default, "gpus_per_node": 0, "mem_gb": 100})
    with pytest.raises(TracingError, match="no node of partition mixed has 16 CPUs, 8 GB and 1 GPUs at once"):
        slurm.preflight({**default, "slurm_partition": "mixed", "cpus_per_task": 16})  # each fits one node only
    assert slurm.minutes("1-02:03:04") == 1 * 1440 + 2 * 60 + 3 + 1 and slurm.minutes("UNLIMITED") is None
    assert slurm.gpus("gpu:2,gpu:tesla:1") == 3 and slurm.gpus("(null)") == 0
