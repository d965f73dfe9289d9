"""Runs you can trust: each damaged input is one line naming the fix (exit 2); bad input found before any model
is loaded writes no record, a failure once weights are read leaves a failed record; a result, once ok, is never
replaced by a failed rerun; nothing is computed that cannot be saved; --threads applies."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

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
def test_a_damaged_checkpoint_is_one_line_exit_2_and_no_record(what, needles, good, tmp_path, capsys):
    bad = damaged(good, tmp_path, what)
    code, err = run_main(capsys, "--base_model_id", str(good), "--ft_model_id", str(bad), "--stat", "l2",
                         "--save", str(tmp_path / "out"))
    assert code == 2
    assert_one_line(err, *needles)
    assert list((tmp_path / "out").iterdir()) == []  # found in its config or headers: nothing written


def test_a_corrupt_parquet_dataset_is_one_line(good, tmp_path, capsys):
    (tmp_path / "d.parquet").write_bytes(b"PAR1 this is not parquet")
    code, err = run_main(capsys, "--base_model_id", str(good), "--ft_model_id", str(good), "--stat", "match",
                         "--dataset", str(tmp_path / "d.parquet"), "--block_size", "32",
                         "--save", str(tmp_path / "out"))
    assert code == 2
    assert_one_line(err, "cannot read", "as parquet", "pass a valid .parquet file with a 'text' column")
    assert list((tmp_path / "out").iterdir()) == []  # the data is made before any model is loaded


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
    """The user's story: a good `csu --align` record, then a rerun with a typo (refused before anything is
    loaded: nothing written), then one whose weights have turned NaN (the statistic computes no number): that
    failed record lands beside the ok record."""
    ft = shutil.copytree(good, tmp_path / "ft")
    out = tmp_path / "out"
    argv = ["--base_model_id", str(good), "--ft_model_id", str(ft), "--stat", "csu", "--align", "--save", str(out)]
    path = RunConfig(base_model_id=str(good), ft_model_id=str(ft), stat="csu", align=True,
                     save=str(out)).result_path()
    assert run_main(capsys, *argv)[0] == 0
    ok = path.read_bytes()
    assert run_main(capsys, *argv, "--dtype", "bf61")[0] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted([path.name, path.with_suffix(".json").name])
    weights = load_file(ft / "model.safetensors")
    save_file({k: v.fill_(math.nan) if "up_proj" in k else v for k, v in weights.items()}, ft / "model.safetensors",
              metadata={"format": "pt"})
    assert main([*argv, "--no_progress"]) == 2  # the same configuration now fails in the statistic
    assert f"saved {failed_path(path)}" in capsys.readouterr().out
    assert path.read_bytes() == ok and load_record(path)["status"] == "ok"
    assert load_record(failed_path(path))["status"] == "failed"
    df, problems, _ = load_results(out)  # one result: the ok one (its failed rerun set aside)
    assert dict(zip(df["key"], df["status"])) == {path.stem.rsplit("__", 1)[1]: "ok"}
    assert "1 record(s) of results already counted" in problems[-1]


@pytest.fixture(scope="module")
def others(good, tmp_path_factory) -> dict[str, Path]:
    """A bert (unsupported), a wider llama (other MLP width), a gpt2 (LayerNorm: no rotation), and the good llama
    saved as PyTorch .bin weights missing one tensor (only loading finds that out)."""
    import transformers

    root = tmp_path_factory.mktemp("others")
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64).save_pretrained(root / "bert")
    zoo.tiny_model("llama", seed=1, hidden=16, layers=2, intermediate=48, vocab_size=128).save_pretrained(
        root / "wider")
    zoo.tiny_model("gpt2", seed=0, vocab_size=128).save_pretrained(root / "gpt2")
    model = transformers.AutoModelForCausalLM.from_pretrained(good)
    model.config.save_pretrained(root / "bin")
    state = model.state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    torch.save(state, root / "bin" / "pytorch_model.bin")
    return {name: root / name for name in ("bert", "wider", "gpt2", "bin")}


@pytest.mark.parametrize("ft, extra, needles", [
    ("nowhere", [], ["nowhere is neither a local directory"]),
    ("bert", [], ["unsupported architecture 'bert'"]),
    ("wider", ["--stat", "csu"], ["shapes differ", "statistics that run on this pair: auto, emb, csu_all"]),
    ("good", ["--stat", "match", "--block_size", "4096"], ["--block_size 4096 is longer than"]),
    ("gpt2", ["--rotate", "--stat", "match_all"], ["--rotate is not function-preserving for gpt2"]),
    ("good", ["--dtype", "bf61"], ["bf61"]),
])
def test_bad_input_before_loading_is_one_line_and_writes_no_record(ft, extra, needles, good, others, tmp_path,
                                                                   capsys, monkeypatch):
    def never(*a, **k):
        raise AssertionError("a model was loaded for a run whose input was bad")

    monkeypatch.setattr(tracing.pair, "load_model", never)
    path = {"good": good, "nowhere": tmp_path / "nowhere"}.get(ft) or others[ft]
    code, err = run_main(capsys, "--base_model_id", str(good), "--ft_model_id", str(path), "--save",
                         str(tmp_path / "out"), "--dataset", str(good.parent / "text.txt"), *extra)
    assert code == 2
    assert_one_line(err, *needles)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_failure_while_loading_keeps_a_failed_record(good, others, tmp_path, capsys):
    """.bin weights have no headers to check: the missing tensor shows when the model loads, and that run is
    recorded (failed, bad input)."""
    cfg = RunConfig(base_model_id=str(good), ft_model_id=str(others["bin"]), stat="l2", save=str(tmp_path / "out"))
    code, err = run_main(capsys, "--base_model_id", cfg.base_model_id, "--ft_model_id", cfg.ft_model_id,
                         "--stat", "l2", "--save", cfg.save)
    assert code == 2
    assert_one_line(err, "1 weights missing from the checkpoint", "model.layers.1.mlp.up_proj.weight")
    rec = load_record(cfg.result_path())
    assert (rec["status"], rec["error_kind"]) == ("failed", "input") and "up_proj" in rec["error"]
    assert rec["checkpoints"]["ft"]["kind"] == "dir" and rec["checkpoints"]["base"]["content_hash"]


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
