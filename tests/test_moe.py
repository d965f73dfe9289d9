"""Mixtures of experts traced like dense models (issue 21), through main.py as users run it, streamed and loaded:

upcycled MoE vs its dense base (and the reverse), MoE vs its fine-tune, MoE vs its expert-permuted copy (--align)
give log10 p < -6 and the right expert map; independent MoE vs MoE and MoE vs an independent dense model give > -3;
zeroed and duplicated experts are degenerate units, never "related"; a partial upcycle and re-initialised experts
behind kept attention are reported as such; bad input is one line.
"""

import copy
import math
import pickle
import shutil

import pytest
import torch
from helpers import record_path
from safetensors.torch import load_file, save_file

from tracing import recipes, zoo
from tracing.align import align_weights
from tracing.arch import get_spec
from tracing.cli import main
from tracing.perm import apply_perm, invert, random_perm
from tracing.sources import open_source
from tracing.statistics import StatContext, get_stat

RELATED, UNRELATED = -6, -3


@pytest.fixture(scope="module")
def models(tokenizer, text_ids) -> dict:
    """dense base; its 4-expert upcycle (Mixtral), fine-tuned; that fine-tune with experts and neurons permuted;
    an independent dense model and an independent MoE of the same shapes."""
    dense = zoo.tiny_model("llama", seed=0, vocab_size=len(tokenizer))
    moe = zoo.finetune(recipes.upcycle(dense, 4, noise=0.01, seed=3), text_ids, steps=5, block_size=32)
    return {"dense": dense, "moe": moe, "tuned": zoo.finetune(copy.deepcopy(moe), text_ids, steps=5, block_size=32),
            "permuted": recipes.permute_experts(moe, seed=5),
            "other_dense": zoo.tiny_model("llama", seed=7, vocab_size=len(tokenizer)),
            "other_moe": recipes.upcycle(zoo.tiny_model("llama", seed=8, vocab_size=len(tokenizer)), 4, 0.01, seed=9)}


@pytest.fixture(scope="module")
def saved(models, tokenizer, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("moe")
    for name, model in models.items():
        model.save_pretrained(root / name)  # transformers 5 writes MoE experts one tensor per expert
        tokenizer.save_pretrained(root / name)
    return {name: str(root / name) for name in models}


def cli(saved, tmp_path, base, ft, *flags, loaded=False):
    """main.py on two saved models: (exit code, record or None). loaded: --eval, so both models are loaded whole."""
    argv = ["--base_model_id", saved.get(base, base), "--ft_model_id", saved.get(ft, ft), "--save", str(tmp_path),
            "--no_progress", *flags] + (["--eval", "--dataset", "random", "--block_size", "8", "--max_blocks", "1"]
                                        if loaded else [])
    code = main(argv)
    path = record_path(argv)
    return code, pickle.loads(path.read_bytes()) if code == 0 else None


def ctx(base, ft, **kw) -> StatContext:
    return StatContext(base=base, ft=ft, progress=False, **kw)


# ---------------------------------------------------------------- derived pairs, through main.py
@pytest.mark.parametrize("loaded", [False, True])
def test_upcycled_moe_traces_every_expert_to_its_dense_layer(saved, tmp_path, loaded):
    for base, ft in (("dense", "moe"), ("moe", "dense")):  # and the reverse
        code, rec = cli(saved, tmp_path / base, base, ft, "--stat", "csu_all", loaded=loaded)
        assert code == 0 and rec["streamed"] is not loaded
        assert rec["log10_pvalue"] < RELATED
        experts = rec["extras"]["experts"]
        assert [(r["layer"], r["expert"]) for r in experts] == [(i, e) for i in range(2) for e in range(4)]
        assert all(r["source_layer"] == r["layer"] and r["source_unit"] == "mlp" for r in experts), experts
        assert rec["extras"]["groups"]["attn"]["related"] and "8 of 8 related" in rec["extras"]["verdict"]


@pytest.mark.parametrize("loaded", [False, True])
def test_moe_vs_its_finetune_and_its_expert_permuted_copy(saved, tmp_path, loaded):
    code, rec = cli(saved, tmp_path, "moe", "tuned", "--stat", "csu", loaded=loaded)
    assert code == 0 and rec["log10_pvalue"] < RELATED
    layer = rec["per_layer"][1]
    assert [r["expert"] for r in layer["experts"]] == [0, 1, 2, 3] and layer["n_tests"] == 4
    assert all(r["log10_pvalue"] < RELATED for r in layer["experts"])  # each expert with its own
    code, rec = cli(saved, tmp_path, "moe", "permuted", "--stat", "csu", "--align", loaded=loaded)
    assert code == 0 and rec["log10_pvalue"] > UNRELATED and rec["aligned_log10_pvalue"] < RELATED
    code, rec = cli(saved, tmp_path, "moe", "tuned", "--stat", "csu", "--permute", "--align", loaded=loaded)
    assert code == 0 and rec["log10_pvalue"] > UNRELATED and rec["aligned_log10_pvalue"] < RELATED


def test_csu_all_maps_each_expert_to_its_own_despite_an_upcycle_s_lookalikes(models):
    """The experts of an upcycle are near-copies of one MLP (all at the p floor against each other): the map still
    names the expert each came from, by the closest matched units."""
    shuffled = recipes.permute_experts(models["tuned"], seed=14, neurons=False)
    stacked = "model.layers.1.mlp.experts.gate_up_proj"
    moved = [next(f for f in range(4) if torch.equal(shuffled.state_dict()[stacked][e],
                                                     models["tuned"].state_dict()[stacked][f])) for e in range(4)]
    assert moved != [0, 1, 2, 3]
    for ft, order in ((models["tuned"], [0, 1, 2, 3]), (shuffled, moved)):
        experts = get_stat("csu_all").fn(ctx(models["moe"], ft)).extras["experts"]
        assert [r["source_unit"] for r in experts if r["layer"] == 1] == [f"expert {f}" for f in order]


def test_auto_the_default_statistic_runs_on_moe_pairs(saved, tmp_path):
    """auto plans csu (and csu --align) for two MoE models of one shape, csu_all for MoE vs dense."""
    for base, ft, first in (("moe", "permuted", "csu"), ("dense", "moe", "csu_all")):
        code, rec = cli(saved, tmp_path / ft, base, ft)
        assert code == 0 and rec["stat"] == "auto" and rec["log10_pvalue"] < RELATED, rec and rec["error"]
        assert rec["extras"]["plan"][0] == first


def test_align_recovers_the_expert_order_of_a_finetuned_permuted_copy(models):
    spec = get_spec(models["moe"].config)
    planted = random_perm(spec, models["tuned"].state_dict(), seed=11)
    shuffled = copy.deepcopy(models["tuned"])
    apply_perm(shuffled, spec, planted)
    perm, want = align_weights(models["moe"], shuffled, spec, progress=False), invert(planted)
    for i in spec.moe_layers:  # the expert map, then each expert's neurons
        assert torch.equal(perm[f"experts.{i}"], want[f"experts.{i}"])
        assert all(torch.equal(perm[f"mlp.{i}.{e}"], want[f"mlp.{i}.{e}"]) for e in range(4))


def test_csh_tests_expert_activations(models, text_ids):
    blocks = text_ids[:8 * 32].reshape(8, 32)
    csh = get_stat("csh").fn
    derived = csh(ctx(models["moe"], models["tuned"], blocks=blocks))
    assert derived.log10_pvalue < RELATED and derived.extras["forward_passes"] == 1
    assert len(derived.per_layer[0]["experts"]) == 4
    assert csh(ctx(models["moe"], models["other_moe"], blocks=blocks)).log10_pvalue > UNRELATED
    assert csh(ctx(models["moe"], models["permuted"], blocks=blocks)).log10_pvalue > UNRELATED


# ---------------------------------------------------------------- independent pairs
def test_independent_pairs_are_not_related(saved, tmp_path):
    for base, ft, stat in (("moe", "other_moe", "csu"), ("moe", "other_moe", "csu_all"),
                           ("other_dense", "moe", "csu_all"), ("moe", "other_dense", "csu_all")):
        code, rec = cli(saved, tmp_path / f"{base}-{ft}", base, ft, "--stat", stat)
        assert code == 0 and rec["log10_pvalue"] > UNRELATED, (base, ft, stat)
    code, rec = cli(saved, tmp_path, "moe", "other_moe", "--stat", "csu", "--align")
    assert rec["aligned_log10_pvalue"] > UNRELATED


def test_csu_is_calibrated_on_independent_moe_pairs(summary_lines):
    """40 independent pairs of random-init tiny Mixtrals: the count of p < 0.05 is Binomial(40, 0.05)-like."""
    shape = dict(vocab_size=128, hidden=32, intermediate=64, heads=4, kv_heads=2, n_experts=4)
    lps = [get_stat("csu").fn(ctx(zoo.tiny_model("mixtral", seed=100 + 2 * k, **shape),
                                  zoo.tiny_model("mixtral", seed=101 + 2 * k, **shape))).log10_pvalue
           for k in range(40)]
    hits = sum(v < math.log10(0.05) for v in lps)
    summary_lines.append(f"null, csu on 40 independent Mixtral pairs: {hits}/40 p < 0.05, smallest log10 p "
                         f"{min(lps):.2f}")
    assert hits <= 5 and min(lps) > -4  # 5: the 99.5% quantile of Binomial(40, 0.05)


def test_independent_upcycles_are_not_related(text_ids, summary_lines):
    """Two MoEs upcycled from independent dense models: every expert of a layer is a near-copy of one MLP, so the
    experts' tests are dependent; combined by Bonferroni within a layer (Fisher over them gave log10 p -3.99 in 2 of
    10 such pairs), the p-value stays valid."""
    shape = dict(vocab_size=512, hidden=64, intermediate=64, heads=4, kv_heads=2)
    lps = {"csu": [], "csh": []}
    blocks = text_ids[:4 * 32].reshape(4, 32)
    for k in range(10):
        a, b = (zoo.finetune(recipes.upcycle(zoo.tiny_model("llama", seed=300 + 2 * k + j, **shape), 16, 0.01,
                                             seed=2 * k + j), text_ids, steps=3, block_size=32, seed=j) for j in (0, 1))
        for stat in lps:
            lps[stat].append(get_stat(stat).fn(ctx(a, b, blocks=blocks)).log10_pvalue)
    for stat, v in lps.items():
        summary_lines.append(f"null, {stat} on 10 independent 16-expert upcycles: smallest log10 p {min(v):.2f}")
        assert sum(p < math.log10(0.05) for p in v) <= 3 and min(v) > UNRELATED, (stat, v)


# ---------------------------------------------------------------- partial upcycles, re-initialised and damaged experts
def test_partial_upcycle_and_reinitialised_experts_are_reported_as_such(models):
    partial = recipes.reinit_experts(models["moe"], which=[2, 3], seed=21)
    res = get_stat("csu_all").fn(ctx(models["dense"], partial))
    assert [r["source_layer"] is not None for r in res.extras["experts"]] == [True, True, False, False] * 2
    assert res.extras["expert_summary"]["independent"] == 4
    fresh = recipes.reinit_experts(models["moe"], seed=21)  # attention kept, every expert and router new
    res = get_stat("csu_all").fn(ctx(models["dense"], fresh))
    assert res.log10_pvalue < RELATED  # not "unrelated": the attention was kept
    assert res.extras["groups"]["attn"]["related"] and not res.extras["groups"]["expert"]["related"]
    assert "attention related" in res.extras["verdict"] and "0 of 8 related" in res.extras["verdict"]


@pytest.mark.parametrize("kind", ["zero", "duplicate"])
def test_damaged_experts_are_degenerate_units_not_related(models, kind):
    a = recipes.damage_experts(models["other_moe"], kind, which=[1, 2, 3])
    b = recipes.damage_experts(recipes.reinit_experts(models["moe"], seed=31), kind, which=[1, 2, 3])
    for stat in ("csu", "csu_all"):
        assert get_stat(stat).fn(ctx(a, b)).log10_pvalue > UNRELATED, stat
    res = get_stat("csu_all").fn(ctx(models["other_dense"], b))
    assert res.extras["expert_summary"]["related"] == 0
    if kind == "zero":  # no usable unit: no p-value, counted, never related
        assert res.extras["expert_summary"]["degenerate"] == 6
        tested = get_stat("csu").fn(ctx(models["moe"], recipes.damage_experts(models["tuned"], kind, which=[3])))
        assert tested.log10_pvalue < RELATED and tested.extras["tests_skipped_nan"] == 2
    align_weights(a, b, get_spec(a.config), progress=False)  # ties between identical experts: no crash


# ---------------------------------------------------------------- sources and bad input
def test_sources_read_one_expert_from_either_layout(models, saved, tmp_path):
    fused = tmp_path / "fused"
    models["tuned"].save_pretrained(fused)
    sd = models["tuned"].state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, fused / "model.safetensors")  # transformers 5's own names
    key = "model.layers.1.mlp.experts.gate_up_proj"
    for path in (saved["tuned"], fused):
        src = open_source(str(path), progress=False)
        assert all(torch.equal(src.get(k), v) for k, v in sd.items())
        src.read_bytes = 0
        assert torch.equal(src.get(key, slice(2, 3)), sd[key][2:3]) and src.read_bytes == sd[key][2].numel() * 4


def _drop(src_dir: str, dst, drop) -> str:
    """A copy of a saved checkpoint without the tensors `drop(key)` selects."""
    shutil.copytree(src_dir, dst)
    sd = load_file(f"{src_dir}/model.safetensors")
    save_file({k: v for k, v in sd.items() if not drop(k)}, f"{dst}/model.safetensors")
    return str(dst)


def test_bad_moe_input_is_one_line(saved, models, tmp_path, capsys):
    no_experts = _drop(saved["tuned"], tmp_path / "router_only", lambda k: ".experts." in k)
    lacking = _drop(saved["tuned"], tmp_path / "lacking", lambda k: ".experts.3." in k and "layers.1." in k)
    truncated = tmp_path / "truncated"
    models["tuned"].save_pretrained(truncated)
    sd = {k: v.contiguous() for k, v in models["tuned"].state_dict().items()}
    sd["model.layers.1.mlp.experts.gate_up_proj"] = sd["model.layers.1.mlp.experts.gate_up_proj"][:3].clone()
    save_file(sd, truncated / "model.safetensors")  # a stacked tensor with 3 of its 4 experts
    eight = tmp_path / "eight"
    recipes.upcycle(models["dense"], 8, seed=1).save_pretrained(eight)
    cases = [(no_experts, "missing"), (lacking, "lacks expert 3"), (str(truncated), "other shapes than its config"),
             (str(eight), "mismatched expert counts")]
    for ft, message in cases:
        capsys.readouterr()
        code, _ = cli(saved, tmp_path / "out", "moe", ft, "--stat", "csu")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and message in err[0] and len(err) == 1, err
