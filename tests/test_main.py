"""main.py end to end on tiny saved models: the flow, the result record, and every bad-input case."""

import copy
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import record_path

from tracing import zoo
from tracing.cli import main
from tracing.statistics.pvalues import permtest_log10p

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def models(tmp_path_factory, tokenizer, text_ids) -> dict[str, str]:
    """Local model dirs: base, derived (fine-tuned), independent, wider (other MLP width), gpt2, bert."""
    root = tmp_path_factory.mktemp("models")
    base = zoo.tiny_model("llama", seed=0, vocab_size=len(tokenizer))
    made = {
        "base": base,
        "derived": zoo.finetune(copy.deepcopy(base), text_ids, steps=5),
        "independent": zoo.tiny_model("llama", seed=1, vocab_size=len(tokenizer)),
        "wider": zoo.tiny_model("llama", seed=2, vocab_size=len(tokenizer), intermediate=192),
        "gpt2": zoo.tiny_model("gpt2", seed=0, vocab_size=len(tokenizer)),
    }
    paths = {}
    for name, model in made.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(root / "bert")
    paths["bert"] = str(root / "bert")
    (root / "short.txt").write_text("only a few words")
    paths["short"] = str(root / "short.txt")
    (root / "text.txt").write_text(zoo.synthetic_text(300, seed=5))
    paths["text"] = str(root / "text.txt")
    return paths


def run(models, tmp_path, base, ft, *extra):
    argv = ["--base_model_id", models[base], "--ft_model_id", models[ft], "--save", str(tmp_path),
            "--no_progress", *extra]
    code = main(argv)
    path = record_path(argv)
    record = pickle.loads(path.read_bytes()) if path and path.exists() else None
    return code, record


# ---------------------------------------------------------------- the flow
def test_derived_pair_is_related_and_record_is_plain(models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    code, rec = run(models, tmp_path, "base", "derived", "--stat", "csu", "--token", "hf_other_secret_456")
    assert code == 0 and rec["status"] == "ok"
    assert rec["log10_pvalue"] < -6
    assert rec["aligned_log10_pvalue"] is None
    text = json.dumps(rec)  # plain data only: JSON-serialisable as is
    assert "secret" not in text
    argv = ["--base_model_id", models["base"], "--ft_model_id", models["derived"], "--save", str(tmp_path),
            "--stat", "csu"]
    twin = json.loads(record_path(argv).with_suffix(".json").read_text())
    assert twin["log10_pvalue"] == rec["log10_pvalue"]
    assert set(rec["git"]) >= {"commit", "dirty"}


def test_independent_pair_is_not_related_with_or_without_align(models, tmp_path):
    code, rec = run(models, tmp_path, "base", "independent", "--stat", "csu", "--align")
    assert code == 0 and rec["log10_pvalue"] > -3 and rec["aligned_log10_pvalue"] > -3


def test_permuted_derived_pair_needs_align(models, tmp_path):
    code, rec = run(models, tmp_path, "base", "derived", "--stat", "csu", "--permute", "--align")
    assert code == 0
    assert rec["log10_pvalue"] > -3  # permutation hides the relation from csu ...
    assert rec["aligned_log10_pvalue"] < -6  # ... until the models are aligned


def test_permtest_is_not_applied_after_align(models, tmp_path, capsys):
    code, rec = run(models, tmp_path, "base", "derived", "--stat", "l2", "--permute", "--align", "--num_perm", "9")
    assert code == 0
    null = rec["extras"]["null"]  # PERMTEST ran on the permuted (non-aligned) pair
    assert rec["extras"]["num_perm"] == len(null) == 9
    assert rec["log10_pvalue"] == permtest_log10p(rec["value"], null, higher_is_related=False)
    assert rec["aligned_log10_pvalue"] is None and "not valid after --align" in rec["aligned_extras"]["permtest"]
    assert rec["aligned_value"] < rec["value"]  # alignment brought the weights back together
    assert "PERMTEST is not valid after --align" in capsys.readouterr().err


@pytest.mark.parametrize("stat", ["l2", "cos", "emb", "csu", "csu_all", "mode", "jsd", "csh", "match", "match_all"])
def test_every_statistic_runs_after_permute_rotate_and_align(models, tmp_path, stat):
    code, rec = run(models, tmp_path, "base", "derived", "--stat", stat, "--permute", "--rotate", "--align",
                    "--dataset", models["text"], "--block_size", "32", "--max_blocks", "8")
    assert code == 0 and rec["status"] == "ok"
    assert isinstance(rec["value"], float) and isinstance(rec["aligned_value"], float)
    if stat == "match":  # function-level: sees through the permutation and the rotation
        assert rec["log10_pvalue"] < -6 and rec["aligned_log10_pvalue"] < -6


def test_eval_reports_losses(models, tmp_path):
    code, rec = run(models, tmp_path, "base", "derived", "--stat", "l2", "--eval", "--dataset", models["text"],
                    "--block_size", "32", "--max_blocks", "4")
    assert code == 0
    assert rec["base_loss"] > 0 and rec["ft_loss"] < rec["base_loss"]  # derived was trained on this kind of text
    assert rec["base_ppl"] == pytest.approx(2.718281828 ** rec["base_loss"], rel=1e-6)


def test_weight_statistics_need_no_dataset(models, tmp_path):
    # --dataset points nowhere: weight statistics must not touch it
    code, rec = run(models, tmp_path, "base", "derived", "--stat", "cos", "--dataset", "/nonexistent.txt")
    assert code == 0 and rec["status"] == "ok"


def test_original_save_file_form(models, tmp_path):
    out = tmp_path / "results.p"
    assert main(["--base_model_id", models["base"], "--ft_model_id", models["derived"], "--stat", "l2",
                 "--save", str(out), "--no_progress"]) == 0
    assert pickle.loads(out.read_bytes())["stat"] == "l2"


# ---------------------------------------------------------------- bad input
def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message"
    last = err[-1]
    for n in needles:
        assert n in last, last
    return last


def test_missing_path(models, tmp_path, capsys):
    code, rec = run(models | {"nope": str(tmp_path / "no_such_model")}, tmp_path, "base", "nope")
    assert code == 2
    _one_line_error(capsys, "no_such_model")
    assert rec is None and list(tmp_path.iterdir()) == []  # bad input before loading: nothing written


def test_unsupported_architecture_lists_supported(models, tmp_path, capsys):
    code, _ = run(models, tmp_path, "base", "bert")
    assert code == 2
    _one_line_error(capsys, "bert", "llama", "gpt2")


def test_shape_mismatch_names_statistics_that_handle_it(models, tmp_path, capsys):
    code, rec = run(models, tmp_path, "base", "wider", "--stat", "csu")
    assert code == 2
    _one_line_error(capsys, "match_all")


def test_unknown_stat_lists_valid_names_and_writes_nothing(models, tmp_path, capsys):
    code, rec = run(models, tmp_path, "base", "derived", "--stat", "csx")
    assert code == 2 and rec is None
    _one_line_error(capsys, "csu", "match", "mode")
    assert list(tmp_path.iterdir()) == []


def test_dataset_too_short(models, tmp_path, capsys):
    code, _ = run(models, tmp_path, "base", "derived", "--stat", "mode", "--dataset", models["short"],
                  "--block_size", "64")
    assert code == 2
    _one_line_error(capsys, "64")


@pytest.mark.parametrize("alpha", ["-0.1", "1.5"])
def test_alpha_outside_unit_interval(models, tmp_path, capsys, alpha):
    code, rec = run(models, tmp_path, "base", "derived", "--stat", "mode", "--alpha", alpha)
    assert code == 2 and rec is None
    _one_line_error(capsys, "[0, 1]")


@pytest.mark.parametrize("flag, value, needle", [("--matching", "hungarian", "valid: fast"),
                                                 ("--memory_budget", "lots", "8GiB")])
def test_bad_matching_and_memory_budget_are_one_line_errors(models, tmp_path, capsys, flag, value, needle):
    code, rec = run(models, tmp_path, "base", "derived", "--stat", "match", flag, value)
    assert code == 2 and rec is None
    _one_line_error(capsys, flag, needle)


@pytest.mark.parametrize("method", ["fast", "exact"])
def test_the_record_names_the_matching(models, tmp_path, method):
    code, rec = run(models, tmp_path, "base", "derived", "--stat", "match", "--matching", method, "--dataset",
                    models["text"], "--block_size", "32", "--align")
    assert code == 0 and rec["extras"]["matching"] == rec["aligned_extras"]["matching"] == method
    assert rec["args"]["matching"] == method and rec["log10_pvalue"] < -6
    assert {"n_units", "excluded_base", "excluded_ft", "solver"} <= set(rec["per_layer"][0])


def test_rotate_refused_on_layernorm_family(models, tmp_path, capsys):
    code, _ = run(models, tmp_path, "gpt2", "gpt2", "--rotate")
    assert code == 2
    _one_line_error(capsys, "LayerNorm", "--permute")


def test_entry_point_exit_code_and_single_line(tmp_path):
    proc = subprocess.run([sys.executable, "main.py", "--base_model_id", "a", "--ft_model_id", "b",
                           "--stat", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown statistic" in proc.stderr


def test_weight_statistics_stream_from_the_files_and_never_load_a_model(models, tmp_path, monkeypatch):
    """csu, --permute and --align (and --rotate) read tensors from the checkpoint files one at a time; a model
    is loaded only for what runs it (data statistics, --eval, --report). The record says which, and how long."""
    import tracing.pair

    def no_loading(*args, **kw):
        raise AssertionError("a weight-only run loaded a model")

    with monkeypatch.context() as m:
        m.setattr(tracing.pair, "load_model", no_loading)
        code, rec = run(models, tmp_path, "base", "derived", "--stat", "csu", "--permute", "--align")
        assert run(models, tmp_path, "base", "derived", "--stat", "l2", "--rotate", "--num_perm", "3")[0] == 0
    assert code == 0 and rec["streamed"] and rec["compute_device"] == "cpu"
    assert rec["aligned_log10_pvalue"] < -6 < rec["log10_pvalue"]
    assert rec["load_s"] > 0 and rec["stat_s"] > 0 and rec["read_s"] > 0 and rec["read_gib"] > 0
    assert rec["load_s"] + rec["stat_s"] <= rec["wall_time_s"] and rec["peak_rss_mib"] > 100
    code, rec = run(models, tmp_path, "base", "derived", "--stat", "l2", "--eval", "--dataset", models["text"],
                    "--block_size", "32", "--max_blocks", "2")
    assert code == 0 and rec["streamed"] is False and rec["load_s"] > 0 and "read_s" not in rec
