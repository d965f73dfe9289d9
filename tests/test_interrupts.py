"""Ctrl-C and SIGTERM end a run with one line and the shell's exit code (130 / 143), leaving no temporary file
and no half-written record; an earlier result survives."""

import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tracing.errors import EXIT_SIGINT, EXIT_SIGTERM, GC_THRESHOLDS, exit_on_error

ROOT = Path(__file__).resolve().parent.parent

# A child process running main.py that interrupts itself at a known point: once the record exists in memory and
# the statistic is about to run (no timing involved).
CHILD = """
import os, signal, sys
import tracing.pipeline as pipeline
real = pipeline.execute
def execute(*args, **kwargs):
    os.kill(os.getpid(), signal.{sig})
    return real(*args, **kwargs)
pipeline.execute = execute
from tracing.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig, code", [("SIGINT", EXIT_SIGINT), ("SIGTERM", EXIT_SIGTERM)])
def test_an_interrupted_run_says_so_in_one_line_and_writes_nothing(tmp_path, model_dir, sig, code):
    save = tmp_path / "out"
    argv = ["--base_model_id", model_dir, "--ft_model_id", model_dir, "--stat", "l2", "--save", str(save),
            "--no_progress"]
    first = subprocess.run([sys.executable, "main.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p: p.read_bytes() for p in save.rglob("*") if p.is_file()}  # the earlier result: .pkl and .json
    proc = subprocess.run([sys.executable, "-c", CHILD.format(sig=sig), *argv], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert proc.stderr.strip() == "interrupted; nothing written (earlier results are untouched)"
    assert {p: p.read_bytes() for p in save.rglob("*") if p.is_file()} == before  # no new file, no temp file


def test_exit_on_error_turns_signals_into_exit_codes():
    def interrupted() -> int:
        raise KeyboardInterrupt

    def terminated() -> int:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises in this (main) thread
        return 0

    assert exit_on_error(interrupted) == EXIT_SIGINT
    assert exit_on_error(terminated) == EXIT_SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored afterwards


def test_an_interrupted_launch_says_how_to_see_and_resume_its_jobs(tmp_path, monkeypatch, capsys):
    import tracing.launcher as launcher

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(launcher.cluster, "launch", interrupted)
    argv = ["--config", "config/demo.yaml", "--save", str(tmp_path / "out"), "--wait"]
    assert launcher.main(argv) == EXIT_SIGINT
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted; submitted jobs keep running (see them: python launch.py --config "
                          "config/demo.yaml --save")
    assert err.endswith(f"resume: python launch.py --config config/demo.yaml --save {tmp_path / 'out'} --wait "
                        "(pairs with an ok record are skipped)")


def test_entry_points_run_the_cycle_collector_less_often_and_restore_it():
    before, seen = gc.get_threshold(), []
    assert exit_on_error(lambda: seen.append(gc.get_threshold()) or 0) == 0
    assert seen == [GC_THRESHOLDS] and gc.get_threshold() == before


# A child that ends through leave(3) with unflushed output, an atexit handler, and maybe a thread still working.
LEAVER = """
import atexit, sys, threading
from tracing.errors import leave
atexit.register(lambda: print("atexit ran", file=sys.stderr))
print("result line", end="")  # not flushed
if sys.argv[1] == "thread":  # a non-daemon thread that finishes only after leave() was called
    release = threading.Event()
    worker = threading.Thread(target=lambda: release.wait() and print(" thread done", end=""))
    worker.start()
    threading.Timer(0.05, release.set).start()
leave(3)
"""


@pytest.mark.parametrize("thread", ["none", "thread"])
def test_leave_flushes_runs_atexit_and_waits_for_working_threads(thread):
    """main.py ends through leave(): nothing written is lost, the exit code is kept, and a thread still working
    is waited for (then the interpreter ends as usual)."""
    proc = subprocess.run([sys.executable, "-c", LEAVER, thread], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 3
    assert proc.stdout == ("result line thread done" if thread == "thread" else "result line")
    assert proc.stderr == "atexit ran\n"
