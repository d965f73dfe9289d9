"""No verdict without a number, and a checkpoint must be what it says: every bad-input row of issue 11 is a
one-line error (exit 2), never an `ok` run that computed nothing or ran random weights. What the configs and
headers show is refused before any model is loaded, and writes nothing; what only the statistic finds is a
failed record."""

import copy
import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import record_path
from safetensors.torch import load_file, save_file

from tracing import zoo
from tracing.cli import main
from tracing.config import RunConfig
from tracing.errors import TracingError


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer, text_ids) -> dict[str, str]:
    """Local model dirs (context 256): base, derived, gpt2, and checkpoints that are not what they say."""
    root = tmp_path_factory.mktemp("checks")
    base = zoo.tiny_model("llama", seed=0, vocab_size=len(tokenizer))
    nan_up = copy.deepcopy(base)
    with torch.no_grad():
        for layer in nan_up.model.layers:
            layer.mlp.up_proj.weight.fill_(math.nan)  # every layer's csu input is NaN
    one_nan = copy.deepcopy(zoo.finetune(copy.deepcopy(base), text_ids, steps=3, block_size=32))
    with torch.no_grad():
        one_nan.model.layers[1].mlp.up_proj.weight[0] = math.nan
    tied_cfg = zoo.tiny_config("llama", vocab_size=len(tokenizer))
    tied_cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    made = {"base": base, "derived": zoo.finetune(copy.deepcopy(base), text_ids, steps=3, block_size=32),
            "gpt2": zoo.tiny_model("gpt2", seed=0, vocab_size=len(tokenizer)), "nan_up": nan_up,
            "one_nan": one_nan, "tied": zoo.transformers.AutoModelForCausalLM.from_config(tied_cfg).eval()}
    paths = {}
    for name, model in made.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    # a llama config.json next to GPT-2 weights: transformers would initialise every weight at random
    shutil.copytree(root / "gpt2", root / "llama_on_gpt2")
    shutil.copy(root / "base" / "config.json", root / "llama_on_gpt2" / "config.json")
    # an untied llama whose checkpoint lost its lm_head
    shutil.copytree(root / "base", root / "no_head")
    weights = load_file(root / "no_head" / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, root / "no_head" / "model.safetensors", metadata={"format": "pt"})
    # config.json says a wider MLP than the weights have
    shutil.copytree(root / "base", root / "wrong_width")
    cfg = json.loads((root / "base" / "config.json").read_text())
    (root / "wrong_width" / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 192}))
    for name in ("llama_on_gpt2", "no_head", "wrong_width"):
        paths[name] = str(root / name)
    (root / "text.txt").write_text(zoo.synthetic_text(300, seed=5))
    paths["text"] = str(root / "text.txt")
    return paths


def run(models, tmp_path, base, ft, *extra):
    argv = ["--base_model_id", models[base], "--ft_model_id", models[ft], "--save", str(tmp_path), "--no_progress",
            *extra]
    code = main(argv)
    path = record_path(argv)
    return code, (pickle.loads(path.read_bytes()) if path and path.exists() else None), path


def error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def strict_json(path: Path) -> dict:
    """Parse like a strict JSON reader: a bare NaN / Infinity is an error."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(path.with_suffix(".json").read_text(), parse_constant=refuse)


# ---------------------------------------------------------------------------------- a checkpoint must be what it says
def test_config_of_another_architecture_next_to_the_weights_is_an_error_naming_the_keys(models, tmp_path, capsys):
    code, rec, _ = run(models, tmp_path, "base", "llama_on_gpt2")  # was: status ok, csu -0.70 on random weights
    line = error_line(capsys)
    assert code == 2 and rec is None and list(tmp_path.iterdir()) == []  # seen in the headers: nothing written
    assert "missing from the checkpoint" in line and "model.embed_tokens.weight" in line
    assert "unexpected" in line and "transformer.h.0.attn.c_attn.bias" in line and "--allow_keys" in line


def test_missing_lm_head_is_an_error_unless_allowed_and_then_noted(models, tmp_path, capsys):
    code, rec, _ = run(models, tmp_path, "base", "no_head", "--stat", "csu")
    assert code == 2 and "lm_head.weight" in error_line(capsys) and rec is None
    code, rec, _ = run(models, tmp_path, "base", "no_head", "--stat", "csu", "--allow_keys", "lm_head.*")
    assert code == 0 and rec["status"] == "ok" and rec["log10_pvalue"] < -6  # the MLP weights are all there
    assert any("lm_head.weight" in n and "allowed by --allow_keys" in n for n in rec["notes"])
    assert rec["args"]["allow_keys"] == ["lm_head.*"] and "--allow_keys 'lm_head.*'" in rec["command"]


def test_a_tied_lm_head_needs_no_flag(models, tmp_path):
    assert "lm_head.weight" not in load_file(Path(models["tied"]) / "model.safetensors")
    code, rec, _ = run(models, tmp_path, "tied", "tied", "--stat", "l2")
    assert code == 0 and rec["value"] == 0.0 and rec["notes"] == []


def test_weights_of_another_shape_than_the_config_says(models, tmp_path, capsys):
    code, rec, _ = run(models, tmp_path, "base", "wrong_width")  # was: RuntimeError from inside transformers
    line = error_line(capsys)
    assert code == 2 and rec is None
    assert "other shapes than its config.json says" in line and "mlp" in line and "(64, 128)" in line


def test_a_given_block_longer_than_the_context_names_block_size(models, tmp_path, capsys):
    code, rec, _ = run(models, tmp_path, "gpt2", "gpt2", "--stat", "jsd", "--dataset", models["text"],
                       "--block_size", "1024")
    line = error_line(capsys)
    assert code == 2 and rec is None  # from the configs, before any model is loaded
    assert "--block_size 1024 is longer than the base model's context (256 positions" in line
    assert "pass --block_size 256 or less" in line
    code, rec, _ = run(models, tmp_path, "gpt2", "gpt2", "--stat", "jsd", "--dataset", models["text"],
                       "--block_size", "256", "--max_blocks", "1")
    assert code == 0 and rec["block_size"] == 256


def test_the_default_block_fits_both_contexts_and_says_so(models, tmp_path, capsys):
    """No --block_size: 512 tokens, shortened to the shorter context (256 here), with one note saying so."""
    code, rec, _ = run(models, tmp_path, "gpt2", "gpt2", "--stat", "jsd", "--dataset", models["text"],
                       "--max_blocks", "1")
    assert code == 0 and rec["block_size"] == 256
    assert rec["notes"] == ["blocks of 256 tokens, the base model's context (default 512; set --block_size)"]
    assert "note: blocks of 256 tokens" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- no verdict without a number
@pytest.mark.parametrize("flag,value,needle", [("--layers", "2-0", "is empty: write the lower index first (0-2)"),
                                               ("--layers", ",", "names no layer"),
                                               ("--alphas", ",", "holds no number")])
def test_empty_layer_range_and_empty_alphas_are_errors(models, tmp_path, capsys, flag, value, needle):
    with pytest.raises(SystemExit) as e:  # was: ok with nothing computed / --alphas ',' silently 0.5
        run(models, tmp_path, "base", "derived", "--stat", "mode", flag, value)
    assert e.value.code == 2 and list(tmp_path.iterdir()) == []  # refused before anything was loaded or written
    assert needle in capsys.readouterr().err
    with pytest.raises(TracingError, match=needle.split(":")[0]):  # the same from a launch YAML's main: block
        RunConfig.from_dict({"base_model_id": "a", "ft_model_id": "b", flag[2:]: value})


def test_csu_all_compares_mlps_across_families_and_finds_independent_models_unrelated(models, tmp_path):
    """A Llama's up_proj and a GPT-2's c_fc play the same role (mlp.up) at the same hidden size: csu_all compares
    them (it used to find nothing comparable); the two are independent, so no layer maps."""
    code, rec, _ = run(models, tmp_path, "base", "gpt2", "--stat", "csu_all")
    assert code == 0 and rec["log10_pvalue"] > -3 and set(rec["extras"]["log10p"]) == {"mlp.up", "attn.out"}  # the screened roles
    assert rec["extras"]["mapping"] == [None] * len(rec["extras"]["mapping"])


@pytest.fixture
def every_layer_degenerate(monkeypatch):
    """csu's per-layer test reports every layer as untestable (NaN), as it does for degenerate layers."""
    record = {"rho": math.nan, "log10_pvalue": math.nan, "n_units": 0, "excluded_base": 0, "excluded_ft": 0,
              "solver": "lap", "lap_seconds": 0.0}
    monkeypatch.setattr("tracing.statistics.csu.match_rows", lambda *args, **kw: dict(record))


def test_all_layers_nan_is_a_failed_run_not_ok(models, tmp_path, capsys, every_layer_degenerate):
    code, rec, _ = run(models, tmp_path, "base", "derived", "--stat", "csu")  # was: status ok, log10 p NaN
    line = error_line(capsys)
    assert code == 2 and rec["status"] == "failed" and rec["error_kind"] == "input"
    assert "csu computed no number: all 2 layers gave no p-value" in line


def test_a_model_whose_every_mlp_is_nan_gets_no_verdict(models, tmp_path):
    """NaN weights gave constant similarities matched in index order (log10 p -215); now every unit is left out,
    every layer skipped and counted, and the run fails: no number, no verdict."""
    code, rec, _ = run(models, tmp_path, "base", "nan_up", "--stat", "csu")
    assert code == 2 and rec["status"] == "failed"
    assert all(r["n_units"] == 0 for r in rec["per_layer"]) and rec["extras"]["layers_skipped_degenerate"] == 2


def test_a_nan_value_is_no_verdict_either(models, tmp_path, capsys):
    code, rec, _ = run(models, tmp_path, "base", "one_nan", "--stat", "cos")  # one NaN weight: mean cosine NaN
    assert code == 2 and rec["status"] == "failed" and "cos computed no number: its value is nan" in error_line(capsys)


def test_records_are_strict_json_with_non_finite_values_listed(models, tmp_path, every_layer_degenerate):
    code, rec, path = run(models, tmp_path, "base", "derived", "--stat", "csu")
    assert code == 2 and rec["per_layer"]  # failed, but what was computed is kept
    twin = strict_json(path)  # a bare NaN would raise here
    assert twin == rec  # the pickle holds the same strict content
    assert rec["nonfinite"]["per_layer[0].log10_pvalue"] == "nan" and rec["value"] is None
    assert all(v in ("nan", "inf", "-inf") for v in rec["nonfinite"].values())
    for where in rec["nonfinite"]:  # each listed path holds null
        node = rec
        for part in where.replace("[", ".").replace("]", "").split("."):
            node = node[int(part)] if part.isdigit() else node[part]
        assert node is None
