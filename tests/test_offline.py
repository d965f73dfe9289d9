"""Without a network, hub ids and WikiText fail at once (one connection attempt, no retry storm) with an error
that names a local path as the fix, before any model is loaded: no record is written.

The hub endpoint is pointed at a closed local port (HF_ENDPOINT), so these tests mean the same on a machine
with or without internet access."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tracing import hub

ROOT = Path(__file__).resolve().parent.parent


def no_network_env(tmp_path: Path, **extra: str) -> dict:
    """The environment of a machine without network access that never set an offline switch."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                             "TRANSFORMERS_OFFLINE")}
    return env | {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf-home")} | extra


def main_py(tmp_path, env, *argv):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--save", str(tmp_path / "out"), "--no_progress",
                           *argv], capture_output=True, text=True, env=env, timeout=300)
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize("case", ["hub id", "wikitext"])
def test_no_network_fails_at_once_naming_a_local_path(case, model_dir, tmp_path, summary_lines):
    if case == "hub id":
        argv = ["--base_model_id", model_dir, "--ft_model_id", "org-x/not-cached-model", "--stat", "l2"]
        needles = ["org-x/not-cached-model is neither a local directory", "127.0.0.1 cannot be reached",
                   "pass a local path"]
    else:
        argv = ["--base_model_id", model_dir, "--ft_model_id", model_dir, "--stat", "match", "--dataset", "wikitext",
                "--block_size", "32"]
        needles = ["cannot load WikiText-103", "not in the datasets cache and 127.0.0.1 cannot be reached",
                   "pass a local .txt/.jsonl/.parquet file"]
    proc, wall = main_py(tmp_path, no_network_env(tmp_path), *argv)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "Retrying" not in err and err.count("\n") == 0, err
    assert all(n in err for n in needles) and "HF_HUB_OFFLINE=0" not in err, err
    assert not list((tmp_path / "out").glob("*")), "bad input before loading: no record"
    summary_lines.append(f"offline ({case}): exit 2 after {wall:.1f} s (the whole process, imports included), no "
                         f"record written: {err}")


def test_offline_switch_set_by_the_user_is_named(model_dir, tmp_path):
    env = no_network_env(tmp_path, HF_HUB_OFFLINE="1")
    proc, _ = main_py(tmp_path, env, "--base_model_id", model_dir, "--ft_model_id", "org-x/not-cached", "--stat", "l2")
    assert proc.returncode == 2
    assert "HF_HUB_OFFLINE=1 is set: pass a local path, or unset HF_HUB_OFFLINE to download" in proc.stderr


def test_the_probe_goes_where_the_hub_client_goes(monkeypatch):
    """Behind a proxy the hub is reached through it, so the proxy is what is probed; NO_PROXY bypasses it."""
    monkeypatch.setattr(hub.hub_constants, "ENDPOINT", "https://huggingface.co")
    for var in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert hub._endpoint() == ("huggingface.co", 443)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub._endpoint() == ("proxy.example", 3128)
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    assert hub._endpoint() == ("huggingface.co", 443)


def test_only_the_datasets_switch_keeps_models_online(monkeypatch):
    for var in hub.DATASETS_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub.set_by_user() is None and hub.set_by_user(datasets=True) == "HF_DATASETS_OFFLINE=1"
