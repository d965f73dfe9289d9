"""Runs you can trust: each damaged input is one line naming the fix (exit 2) and a failed record; a result,
once ok, is never replaced by a failed rerun; nothing is computed that cannot be saved; --threads applies."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tracing.pair
from tracing import matching, zoo
from tracing.aggregate import load_results
from tracing.cli import main
from tracing.config import RunConfig
from tracing.devices import threads, usable_cpus
from tracing.naming import failed_path
from tracing.results import load_record

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-input")
    tok = zoo.build_tokenizer(zoo.synthetic_text(300, seed=0), vocab_size=128)
    zoo.tiny_model("llama", seed=0, hidden=16, layers=2, intermediate=32, vocab_size=len(tok)).save_pretrained(
        root / "good")
    tok.save_pretrained(root / "good")
    (root / "text.txt").write_text(zoo.synthetic_text(200, seed=3))
    return root / "good"


def damaged(good: Path, tmp_path: Path, what: str) -> Path:
    """A copy of the good checkpoint with one file damaged the way downloads and disks damage them."""
    if what == "adapter_config.json":
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": ')
        return tmp_path / "adapter"
    bad = shutil.copytree(good, tmp_path / "bad")
    if what == "config.json":
        (bad / "config.json").write_text('{"model_type": "llama", ')
    else:  # a download cut off halfway
        weights = bad / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return bad


def run_main(capsys, *argv) -> tuple[int, str]:
    code = main([*argv, "--no_progress"])
    return code, capsys.readouterr().err.strip()


def assert_one_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert all(n in err for n in needles), err


@pytest.mark.parametrize("what, needles", [
    ("config.json", ["config.json is not valid JSON", "repair it or save the checkpoint again"]),
    ("safetensors", ["a weight file is truncated or corrupt", "download or save the checkpoint again"]),
    ("adapter_config.json", ["adapter_config.json is not valid JSON", "repair it"]),
])
def test_a_damaged_checkpoint_is_one_line_exit_2_and_a_failed_record(what, needles, good, tmp_path, capsys):
    bad = damaged(good, tmp_path, what)
    cfg = RunConfig(base_model_id=str(good), ft_model_id=str(bad), stat="l2", save=str(tmp_path / "out"))
    code, err = run_main(capsys, "--base_model_id", str(good), "--ft_model_id", str(bad), "--stat", "l2",
                         "--save", cfg.save)
    assert code == 2
    assert_one_line(err, *needles)
    rec = load_record(cfg.result_path())
    assert (rec["status"], rec["error_kind"]) == ("failed", "input") and needles[0] in rec["error"]


def test_a_corrupt_parquet_dataset_is_one_line(good, tmp_path, capsys):
    (tmp_path / "d.parquet").write_bytes(b"PAR1 this is not parquet")
    code, err = run_main(capsys, "--base_model_id", str(good), "--ft_model_id", str(good), "--stat", "match",
                         "--dataset", str(tmp_path / "d.parquet"), "--block_size", "32",
                         "--save", str(tmp_path / "out"))
    assert code == 2
    assert_one_line(err, "cannot read", "as parquet", "pass a valid .parquet file with a 'text' column")
    assert load_record(next((tmp_path / "out").glob("*.pkl")))["status"] == "failed"


def test_an_unwritable_save_is_refused_before_any_model_is_loaded(good, tmp_path, capsys, monkeypatch):
    def never(*a, **k):
        raise AssertionError("a model was loaded although its result could not be saved")

    monkeypatch.setattr(tracing.pair, "load_model", never)
    (tmp_path / "a-file").write_text("")
    code, err = run_main(capsys, "--base_model_id", str(good), "--ft_model_id", str(good), "--stat", "l2",
                         "--save", str(tmp_path / "a-file" / "results"))
    assert code == 2
    assert_one_line(err, "cannot write to", "pass --save a writable folder")


def test_a_failed_rerun_never_replaces_an_ok_record(good, tmp_path, capsys):
    """The user's story: a good `csu --align` record, then a rerun with a typo, then one that breaks while
    loading. The first gets its own file (its flags differ); the second lands beside the ok record."""
    ft = shutil.copytree(good, tmp_path / "ft")
    argv = ["--base_model_id", str(good), "--ft_model_id", str(ft), "--stat", "csu", "--align",
            "--save", str(tmp_path / "out")]
    path = RunConfig(base_model_id=str(good), ft_model_id=str(ft), stat="csu", align=True,
                     save=str(tmp_path / "out")).result_path()
    assert run_main(capsys, *argv)[0] == 0
    ok = path.read_bytes()
    assert run_main(capsys, *argv, "--dtype", "bf61")[0] == 2
    (ft / "config.json").write_text("{")  # the same configuration now fails while loading
    assert main([*argv, "--no_progress"]) == 2
    assert f"saved {failed_path(path)}" in capsys.readouterr().out
    assert path.read_bytes() == ok and load_record(path)["status"] == "ok"
    assert load_record(failed_path(path))["status"] == "failed"
    df, problems, _ = load_results(tmp_path / "out")  # two results: the ok one (its failed rerun set aside), bf61
    assert dict(zip(df["key"], df["status"])) == {path.stem.rsplit("__", 1)[1]: "ok",
                                                 RunConfig.from_dict(load_record(path)["args"] | {"dtype": "bf61"},
                                                                     ).result_key(): "failed"}
    assert "1 record(s) of results already counted" in problems[-1]


def test_records_name_the_flags_that_change_the_numbers():
    cfg = RunConfig(base_model_id="a", ft_model_id="b", stat="csu", align=True)
    same = cfg.replace(threads=3, no_progress=True, save="elsewhere", device_map="auto")
    assert cfg.result_path().name == same.result_path().name  # where and how it ran: same result
    for other in (cfg.replace(align=False), cfg.replace(dtype="bfloat16"), cfg.replace(seed=1),
                  cfg.replace(device="cpu"), cfg.replace(layers="0")):
        assert other.result_key() != cfg.result_key()
    assert cfg.key_flags() == {"align": True}


def test_threads_bound_torch_and_the_assignment_workers(monkeypatch):
    before = torch.get_num_threads()
    with threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1 and matching.default_workers() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")  # inside a Slurm job: its cpus_per_task, not the node's cores
    assert usable_cpus() == 1
    with threads(None) as n:
        assert n == 1 and torch.get_num_threads() == 1 and matching.default_workers() == 1


def test_generate_without_a_tokenizer_or_a_writable_save_is_one_line(good, tmp_path):
    bare = shutil.copytree(good, tmp_path / "bare")
    for f in bare.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            f.unlink()
    (tmp_path / "a-file").write_text("")
    for argv, needles in ((["--model_id", str(bare), "--save", str(tmp_path / "gen")],
                           ["has no tokenizer", "tokenizer.save_pretrained"]),
                          (["--model_id", str(good), "--save", str(tmp_path / "a-file" / "gen")],
                           ["cannot write to", "pass --save a writable folder"])):
        proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), *argv, "--n", "2", "--no_progress"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2
        assert_one_line(proc.stderr.strip().splitlines()[-1], *needles)
        assert "Traceback" not in proc.stderr


def test_aggregate_to_an_unwritable_out_is_one_line(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "a-file").write_text("")
    from tracing.aggregate import main as aggregate_main

    assert aggregate_main([str(tmp_path / "results"), "--out", str(tmp_path / "a-file" / "agg")]) == 2
    assert_one_line(capsys.readouterr().err.strip(), "cannot write to", "pass --out a writable folder")
