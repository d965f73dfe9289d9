"""`--stat auto`, the default: which tests it plans for which pair, when it stops, the combined p-value (valid under
H0: independent pairs called related at most as often as the level says), and the derivation line."""

import copy
import math

import numpy as np
import pytest
import scipy.stats
import torch

from tracing import zoo
from tracing.arch import get_spec
from tracing.config import RunConfig
from tracing.derivations import derive
from tracing.perm import apply_perm, random_perm
from tracing.pipeline import run_pair
from tracing.sources import ModuleSource
from tracing.statistics.auto import combined_log10p, plan, quant_bits

SHAPE = dict(hidden=32, layers=3, intermediate=64, heads=4, kv_heads=2)


def _plan(a, b) -> list[str]:
    return [s.name for s in plan(ModuleSource(a), ModuleSource(b))]


def test_the_plan_follows_the_shapes(tokenizer):
    v = len(tokenizer)
    llama = zoo.tiny_model("llama", seed=0, vocab_size=v, **SHAPE)
    assert _plan(llama, zoo.tiny_model("llama", seed=1, vocab_size=v, **SHAPE)) == ["csu", "csu --align", "match"]
    gpt2 = zoo.tiny_model("gpt2", seed=0, vocab_size=v, hidden=32, layers=3, intermediate=64, heads=4)
    assert _plan(gpt2, zoo.tiny_model("gpt2", seed=1, vocab_size=v, hidden=32, layers=3, intermediate=64,
                                      heads=4)) == ["csu", "csu --align"]  # no gated MLP: match cannot run
    deeper = zoo.tiny_model("llama", seed=2, vocab_size=v, **{**SHAPE, "layers": 5})
    assert _plan(llama, deeper) == ["csu_all", "match_all"]
    narrower = zoo.tiny_model("llama", seed=3, vocab_size=v, **{**SHAPE, "hidden": 24})
    assert _plan(llama, narrower) == ["csu_all --narrow", "match_all"]  # base cut to the channels ft kept
    assert _plan(narrower, llama) == ["match_all"]  # a wider ft: only activations compare


def test_bonferroni_over_the_planned_tests():
    assert combined_log10p([-10.0, -0.5], 3) == pytest.approx(-10 + math.log10(3))
    assert combined_log10p([-0.1], 3) == 0.0  # capped at p = 1
    assert combined_log10p([math.nan, -4.0], 2) == pytest.approx(-4 + math.log10(2))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tokenizer, text_ids) -> dict:
    """Saved trained tiny models: base, a fine-tune, a permuted fine-tune, an independent model, a text file."""
    root = tmp_path_factory.mktemp("auto")
    base = zoo.finetune(zoo.tiny_model("llama", seed=0, vocab_size=len(tokenizer), **SHAPE), text_ids, steps=20,
                        lr=3e-3, block_size=32)
    ft = zoo.finetune(copy.deepcopy(base), text_ids, steps=5, lr=1e-3, block_size=32, seed=1)
    permuted = copy.deepcopy(ft)
    spec = get_spec(permuted.config)
    apply_perm(permuted, spec, random_perm(spec, permuted.state_dict(), seed=5))
    independent = zoo.finetune(zoo.tiny_model("llama", seed=9, vocab_size=len(tokenizer), **SHAPE), text_ids,
                               steps=20, lr=3e-3, block_size=32)
    out = {}
    for name, model in (("base", base), ("ft", ft), ("permuted", permuted), ("independent", independent)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = str(root / name)
    (root / "text.txt").write_text(zoo.synthetic_text(300, seed=5))
    out["text"], out["root"] = str(root / "text.txt"), root
    return out


def _auto(pairs, ft: str) -> dict:
    cfg = RunConfig(base_model_id=pairs["base"], ft_model_id=pairs[ft], device="cpu", no_progress=True,
                    save=str(pairs["root"] / "records"), dataset=pairs["text"], block_size=32, max_blocks=4)
    assert cfg.stat == "auto"  # the default
    rec = run_pair(cfg)
    assert rec["status"] == "ok", rec["error"]
    return rec


def test_a_fine_tune_is_settled_by_the_weights_alone(pairs):
    rec = _auto(pairs, "ft")
    ex = rec["extras"]
    assert [t["test"] for t in ex["tests"]] == ["csu"] and ex["decided_by"] == "csu"  # stopped: decisive
    assert rec["log10_pvalue"] < -6 and ex["related"]
    assert rec["log10_pvalue"] == pytest.approx(ex["tests"][0]["log10_pvalue"] + math.log10(3))
    assert ex["derivation"].startswith("related: fine-tuned (MLP weights changed")
    assert "n_tokens" not in ex  # no token was read


def test_a_permuted_derivative_is_found_after_alignment(pairs):
    ex = _auto(pairs, "permuted")["extras"]
    assert [t["test"] for t in ex["tests"]] == ["csu", "csu --align"] and ex["decided_by"] == "csu --align"
    assert ex["derivation"].startswith("related: hidden units permuted")


def test_an_independent_model_runs_every_test_and_is_unrelated(pairs):
    rec = _auto(pairs, "independent")
    ex = rec["extras"]
    assert [t["test"] for t in ex["tests"]] == ["csu", "csu --align", "match"]
    assert rec["log10_pvalue"] > -2 and not ex["related"] and ex["decided_by"] is None
    assert ex["derivation"].startswith("unrelated:")


def test_a_narrower_independent_model_is_not_called_related(pairs, tokenizer, text_ids, tmp_path):
    """csu_all --narrow matches ft's residual channels to base's on the embeddings, then tests MLP rows: on an
    independent model with a smaller hidden size that must stay a test (nothing to find)."""
    other = zoo.finetune(zoo.tiny_model("llama", seed=11, vocab_size=len(tokenizer), **{**SHAPE, "hidden": 24}),
                         text_ids, steps=20, lr=3e-3, block_size=32)
    other.save_pretrained(tmp_path / "narrow")
    tokenizer.save_pretrained(tmp_path / "narrow")
    pairs = {**pairs, "narrow": str(tmp_path / "narrow")}
    rec = _auto(pairs, "narrow")
    assert rec["extras"]["tests"][0]["test"] == "csu_all --narrow" and rec["log10_pvalue"] > -2


def test_auto_refuses_align_and_says_why(pairs, capsys):
    from tracing.cli import main

    code = main(["--base_model_id", pairs["base"], "--ft_model_id", pairs["ft"], "--align", "--save",
                 str(pairs["root"] / "records"), "--no_progress"])
    assert code == 2 and "auto aligns by itself" in capsys.readouterr().err


def test_quantization_is_recognised_from_the_values():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    row_scale = w.abs().amax(1, keepdim=True) / 127
    assert quant_bits((w / row_scale).round() * row_scale) == 8
    groups = w.reshape(-1, 32)
    step = groups.abs().amax(1, keepdim=True) / 7
    assert quant_bits(((groups / step).round() * step).reshape(64, 128)) == 4
    assert quant_bits(w) is None


def test_auto_is_calibrated_on_independent_trained_pairs(tokenizer, text_ids, tmp_path, summary_lines):
    """H0: over 40 independent trained pairs auto calls at most about 5% related at the 0.05 level (Bonferroni over
    its three planned tests is conservative, so fewer). Each pair runs every planned test, match included."""
    logps = []
    shape = dict(SHAPE, layers=2)
    for k in range(40):
        for side, seed in (("a", 3000 + 2 * k), ("b", 3001 + 2 * k)):
            m = zoo.finetune(zoo.tiny_model("llama", seed=seed, vocab_size=len(tokenizer), **shape), text_ids,
                             steps=10, lr=3e-3, block_size=32, seed=seed)
            m.save_pretrained(tmp_path / side)
            tokenizer.save_pretrained(tmp_path / side)
        cfg = RunConfig(base_model_id=str(tmp_path / "a"), ft_model_id=str(tmp_path / "b"), device="cpu",
                        no_progress=True, save=str(tmp_path / f"records{k}"), block_size=32, max_blocks=4, seed=k)
        rec = run_pair(cfg)  # token blocks: random ids (auto's default), seeded by the pair
        assert rec["status"] == "ok", rec["error"]
        logps.append(rec["log10_pvalue"])
    hits = int((np.array(logps) < math.log10(0.05)).sum())
    hi = int(scipy.stats.binom.interval(0.95, 40, 0.05)[1])
    summary_lines.append(f"auto calibration: {hits}/40 independent trained pairs with p < 0.05 (upper end of the 95% "
                         f"binomial interval {hi}), smallest log10 p {min(logps):.2f}")
    assert hits <= hi and min(logps) > -4


def test_derivations_are_named(tokenizer, text_ids, tmp_path):
    """The derivation line on a few kinds of the recipes (the scoreboard checks every kind)."""
    base = zoo.finetune(zoo.tiny_model("llama", seed=0, vocab_size=len(tokenizer), **{**SHAPE, "layers": 4}),
                        text_ids, steps=20, lr=3e-3, block_size=32)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    from tracing.derivations import save

    want = {"depth-upscale": "depth up-scaled", "layer-prune": "3 of 4 layers kept", "quant-int4": "4-bit quantized",
            "vocab-extend": "vocabulary extended"}
    for kind, phrase in want.items():
        path = save(derive(kind, base, tokenizer, text_ids), tmp_path / kind, base_dir=tmp_path / "base")
        cfg = RunConfig(base_model_id=str(tmp_path / "base"), ft_model_id=str(path), device="cpu", no_progress=True,
                        save=str(tmp_path / "records"), dataset="random", block_size=32, max_blocks=4)
        rec = run_pair(cfg)
        assert rec["status"] == "ok" and rec["log10_pvalue"] < -6, (kind, rec["error"])
        assert phrase in rec["extras"]["derivation"], (kind, rec["extras"]["derivation"])
