"""Merge attribution: a merge built as mergekit builds it gets its shares back per block (linear, task arithmetic),
its parents (TIES, DARE) or each block's source model and block (passthrough); a model that is no merge gets one
parent, an independent one none; the CLI writes the JSON identify carries and a figure; bad input is one line."""

import copy
import json

import pytest
import torch

from tracing import zoo
from tracing.arch import get_spec
from tracing.attribution import attribute, main
from tracing.derivations import derive
from tracing.derivations.core import stack
from tracing.derivations.train import tuned
from tracing.errors import TracingError
from tracing.perm import apply_perm, random_perm
from tracing.sources import ModuleSource

SHAPE = dict(hidden=64, layers=4, intermediate=128)


@pytest.fixture(scope="module")
def family(tokenizer, text_ids) -> dict:
    """A briefly trained base, two fine-tunes of it on the two halves of the text, and an independent model."""
    base = zoo.finetune(zoo.tiny_model("llama", seed=0, vocab_size=len(tokenizer), **SHAPE), text_ids, steps=30,
                        lr=3e-3)
    half = len(text_ids) // 2
    other = zoo.finetune(zoo.tiny_model("llama", seed=1, vocab_size=len(tokenizer), **SHAPE), text_ids, steps=30,
                         lr=3e-3)
    return {"base": base, "ft-a": tuned(base, text_ids[:half], 15, 1e-3, 1),
            "ft-b": tuned(base, text_ids[half:], 15, 1e-3, 2), "other": other}


def _src(m):
    return ModuleSource(m)


def _attr(suspect, family, names, base=False, **kw):
    return attribute(_src(suspect), {n: _src(family[n]) for n in names},
                     _src(family["base"]) if base else None, **kw)


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.7, 0.3)])
def test_a_linear_merge_gets_its_weights_back_in_every_block(family, tokenizer, text_ids, weights):
    merged = derive("merge-linear", family["base"], tokenizer, text_ids, weights=weights,
                    models=(family["ft-a"], family["ft-b"])).model
    res = _attr(merged, family, ["ft-a", "ft-b"])
    assert res["kind"] == "linear" and res["parents"] == ["ft-a", "ft-b"]
    for lay in res["layers"]:
        got = {s["model"]: s for s in lay["sources"]}
        assert set(got) == {"ft-a", "ft-b"}
        for name, w in zip(("ft-a", "ft-b"), weights):
            assert got[name]["share"] == pytest.approx(w, abs=1e-3)
            assert got[name]["layer"] == lay["layer"] and got[name]["log10_pvalue"] < -10


def test_task_arithmetic_gives_the_base_one_minus_the_sum(family, tokenizer, text_ids):
    merged = derive("merge-task-arithmetic", family["base"], tokenizer, text_ids,
                    models=(family["ft-a"], family["ft-b"])).model
    res = _attr(merged, family, ["ft-a", "ft-b"], base=True)
    assert res["kind"] == "task_arithmetic"
    truth = {"base": -1.0, "ft-a": 1.0, "ft-b": 1.0}
    for lay in res["layers"]:
        assert {s["model"]: round(s["share"], 3) for s in lay["sources"]} == truth


@pytest.mark.parametrize("kind", ["merge-ties", "merge-dare"])
def test_sparsified_merges_name_both_parents(family, tokenizer, text_ids, kind):
    merged = derive(kind, family["base"], tokenizer, text_ids, models=(family["ft-a"], family["ft-b"])).model
    res = _attr(merged, family, ["ft-a", "ft-b"], base=True)
    assert res["kind"] == "sparse"
    assert sorted(m for m in res["parents"] if res["shares"][m]["mean_share"] > 0) == ["ft-a", "ft-b"]
    assert res["shares"]["base"]["equal"] > 0.1  # values the trimming / dropping left at the base's


def test_a_frankenmerge_names_the_model_and_block_of_every_block(family):
    layer_map = [["other", 3], ["base", 0], ["base", 1], ["other", 1], ["base", 1], ["base", 3]]
    franken = stack({"base": family["base"], "other": family["other"]}, layer_map, "base")
    res = _attr(franken, family, ["base", "other"])
    assert res["kind"] == "passthrough"
    assert [[s["model"], s["layer"]] for lay in res["layers"] for s in lay["sources"]] == layer_map
    assert all(s["share"] == pytest.approx(1.0, abs=1e-3) for lay in res["layers"] for s in lay["sources"])


def test_a_fine_tune_of_one_candidate_is_no_merge(family, text_ids):
    res = _attr(tuned(family["ft-a"], text_ids, 10, 1e-3, 9), family, ["ft-a", "ft-b"], base=True)
    assert res["kind"] in ("single", "related") and res["parents"] == ["ft-a"]
    assert res["shares"]["ft-a"]["mean_share"] > 0.85


def test_an_independent_model_gets_no_source(family):
    res = _attr(family["other"], family, ["ft-a", "ft-b"], base=True)
    assert res["kind"] == "none" and not any(lay["sources"] for lay in res["layers"])
    assert min(t["log10_pvalue_holm"] for lay in res["layers"] for t in lay["tested"]) > -2


def test_a_permuted_merge_is_aligned_first(family, tokenizer, text_ids):
    merged = derive("merge-linear", family["base"], tokenizer, text_ids, weights=(0.7, 0.3),
                    models=(family["ft-a"], family["ft-b"])).model
    spec = get_spec(merged.config)
    apply_perm(merged, spec, random_perm(spec, merged.state_dict(), seed=5))
    res = _attr(merged, family, ["ft-a", "ft-b"], base=True)
    assert res["aligned"] and res["kind"] == "linear"
    assert res["shares"]["ft-a"]["mean_share"] == pytest.approx(0.7, abs=0.02)


def test_bootstrap_and_sandwich_intervals_agree(family, tokenizer, text_ids):
    merged = derive("merge-ties", family["base"], tokenizer, text_ids, models=(family["ft-a"], family["ft-b"])).model
    sandwich = _attr(merged, family, ["ft-a", "ft-b"], base=True)
    boot = _attr(merged, family, ["ft-a", "ft-b"], base=True, ci="bootstrap", n_boot=300)
    for ls, lb in zip(sandwich["layers"], boot["layers"]):
        for ts, tb in zip(ls["tested"], lb["tested"]):
            ws, wb = ts["ci"][1] - ts["ci"][0], tb["ci"][1] - tb["ci"][0]
            assert 0.5 < wb / ws < 2.0 and tb["ci"][0] <= ts["share"] <= tb["ci"][1]


def test_bad_input_is_one_line(family, tokenizer, text_ids):
    pruned = derive("width-prune-mlp", family["base"], tokenizer, text_ids).model
    with pytest.raises(TracingError, match="do not line up"):
        _attr(family["ft-a"], {"base": family["base"], "p": pruned}, ["p"])
    with pytest.raises(TracingError, match="both the base and a candidate"):
        attribute(_src(family["ft-a"]), {"base": _src(family["base"])}, _src(family["base"]))
    with pytest.raises(TracingError, match="at least one candidate"):
        attribute(_src(family["ft-a"]), {})
    with pytest.raises(TracingError, match="align is auto, yes or no"):
        _attr(family["ft-a"], family, ["ft-b"], align="maybe")


def test_the_command_line_writes_the_json_identify_carries(family, tokenizer, text_ids, tmp_path, capsys):
    merged = derive("merge-linear", family["base"], tokenizer, text_ids, weights=(0.7, 0.3),
                    models=(family["ft-a"], family["ft-b"])).model
    paths = {}
    for name, model in (("merged", merged), ("a", family["ft-a"]), ("b", family["ft-b"])):
        copy.deepcopy(model).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        paths[name] = str(tmp_path / name)
    out = tmp_path / "out"
    assert main(["--suspect", paths["merged"], "--parents", f"{paths['a']},{paths['b']}", "--out", str(out)]) == 0
    res = json.loads((out / "attribution.json").read_text())
    first = res["layers"][0]["sources"][0]
    assert {"model", "layer", "share", "ci", "log10_pvalue"} <= set(first)
    assert first["model"] == paths["a"] and first["share"] == pytest.approx(0.7, abs=1e-3)
    assert (out / "attribution.png").stat().st_size > 0
    assert "merge of" in capsys.readouterr().out
    assert main(["--suspect", paths["merged"], "--parents", str(tmp_path / "missing")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_shares_are_computed_in_float64_from_any_storage_dtype(family, tokenizer, text_ids):
    merged = derive("merge-linear", family["base"], tokenizer, text_ids, weights=(0.7, 0.3),
                    models=(family["ft-a"], family["ft-b"])).model
    res = attribute(_src(merged.to(torch.bfloat16)),
                    {n: _src(copy.deepcopy(family[n]).to(torch.bfloat16)) for n in ("ft-a", "ft-b")})
    assert res["kind"] == "linear" and res["shares"]["ft-a"]["mean_share"] == pytest.approx(0.7, abs=0.01)
