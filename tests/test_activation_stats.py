"""csh, match, match_all and jsd on tiny models: derived pairs are detected (also rotated or pruned),
independent pairs are not, and p-values are calibrated."""

import copy
import math

import numpy as np
import pytest
import torch

from tracing import zoo
from tracing.arch import get_spec
from tracing.errors import TracingError
from tracing.statistics import StatContext, get_stat
from tracing.statistics.pvalues import holm_log10
from tracing.transforms import rotate_residual

SHAPE = dict(vocab_size=256, hidden=32, layers=3, intermediate=96, heads=2, kv_heads=1)


def _noisy_copy(model, scale=0.01, seed=1):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return out


def _run(stat, a, b, blocks, **kw):
    ctx = StatContext(base=a, ft=b, spec_base=get_spec(a.config), spec_ft=get_spec(b.config), blocks=blocks,
                      progress=False, **kw)
    return get_stat(stat).fn(ctx)


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))  # (n_blocks, T)


@pytest.fixture(scope="module")
def base():
    return zoo.tiny_model("llama", seed=0, **SHAPE)


@pytest.fixture(scope="module")
def rotated(base):
    """A derivative whose residual stream was rotated: weights + noise, then an orthogonal change of basis."""
    b = _noisy_copy(base)
    rotate_residual(b, get_spec(b.config), seed=3)
    return b


@pytest.fixture(scope="module")
def independent():
    return zoo.tiny_model("llama", seed=7, **SHAPE)


def test_match_detects_a_rotated_derivative(base, rotated, blocks):
    r = _run("match", base, rotated, blocks)
    assert r.log10_pvalue < -6
    assert all(x["log10_pvalue"] < -6 for x in r.per_layer) and len(r.per_layer) == 3
    assert r.extras["forward_passes"] == 1


def test_csh_detects_a_derivative_and_accepts_the_alias(base, rotated, blocks):
    r = _run("csh_sp", base, rotated, blocks)  # activations do not depend on the residual basis
    assert r.log10_pvalue < -6 and r.extras["forward_passes"] == 1


@pytest.mark.parametrize("stat", ["match", "csh"])
def test_independent_models_are_not_flagged(base, independent, blocks, stat):
    r = _run(stat, base, independent, blocks)
    assert r.log10_pvalue > -3  # p > 0.001


def test_match_is_calibrated_over_40_independent_pairs(summary_lines):
    """Under H0 P(p < 0.05) should be 0.05; observed on this grid of seeds: 2/40 = 0.050 (7/100 on a 100-pair grid)."""
    small = dict(vocab_size=128, hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1)
    g = torch.Generator().manual_seed(0)
    log10ps = []
    for k in range(40):
        a = zoo.tiny_model("llama", seed=1000 + 2 * k, **small)
        b = zoo.tiny_model("llama", seed=1001 + 2 * k, **small)
        log10ps.append(_run("match", a, b, torch.randint(0, 128, (2, 32), generator=g)).log10_pvalue)
    frac = float(np.mean(np.array(log10ps) < math.log10(0.05)))
    summary_lines.append(f"match calibration: {frac * 40:.0f}/40 independent pairs with p < 0.05")
    assert frac < 0.15


def _pruned(model, keep_layers, keep_frac, seed=0):
    """Drop layers and MLP neurons of a Llama by slicing its weights into a smaller config."""
    cfg = copy.deepcopy(model.config)
    inter = int(cfg.intermediate_size * keep_frac)
    cfg.num_hidden_layers, cfg.intermediate_size = len(keep_layers), inter
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        if ".layers." not in k:
            out[k] = v
    for new, old in enumerate(keep_layers):
        keep = torch.randperm(model.config.intermediate_size, generator=g)[:inter].sort().values
        for k, v in sd.items():
            prefix = f"model.layers.{old}."
            if not k.startswith(prefix):
                continue
            nk = f"model.layers.{new}." + k[len(prefix):]
            if "gate_proj" in k or "up_proj" in k:
                v = v[keep]  # (inter, hidden)
            elif "down_proj" in k:
                v = v[:, keep]  # (hidden, inter)
            out[nk] = v
    import transformers
    pruned = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    pruned.load_state_dict(out)
    return pruned


def test_match_all_maps_each_kept_layer_of_a_pruned_derivative(tmp_path, blocks):
    a = zoo.tiny_model("llama", seed=11, vocab_size=256, hidden=32, layers=6, intermediate=96, heads=2, kv_heads=1)
    b = _pruned(_noisy_copy(a, seed=2), keep_layers=[0, 2, 3, 5], keep_frac=2 / 3)
    r = _run("match_all", a, b, blocks, max_tokens=96, out_dir=str(tmp_path))
    assert r.extras["mapping"] == [0, 2, 3, 5]
    assert r.extras["correction"] == "holm" and r.extras["forward_passes"] == {"base": 1, "ft": 1}
    assert np.array(r.extras["log10_pvalue_matrix"]).shape == (6, 4)
    assert r.log10_pvalue < -6 and r.extras["n_tokens_sampled"] == 96
    assert (tmp_path / "match_all_heatmap.png").stat().st_size > 1000


def test_match_all_maps_nothing_for_independent_models(base, independent, blocks):
    r = _run("match_all", base, independent, blocks)
    assert r.extras["mapping"] == [None, None, None] and r.log10_pvalue > math.log10(0.05)


def test_holm_correction_in_log_space():
    # p = 1e-400 cannot be a float; Holm multiplies the smallest by m, the next by m - 1, keeps the order
    adj = holm_log10(np.array([[-400.0, -1.0], [-2.0, 0.0]]))
    np.testing.assert_allclose(adj, [[-400 + math.log10(4), -1 + math.log10(2)], [-2 + math.log10(3), 0.0]])


def test_jsd_is_zero_for_identical_models_and_grows_with_noise(base, blocks, tokenizer):
    same = _run("jsd", base, base, blocks, tokenizer_base=tokenizer, tokenizer_ft=tokenizer)
    assert same.value == pytest.approx(0.0, abs=1e-12) and same.log10_pvalue is None
    near = _run("jsd", base, _noisy_copy(base, 0.1), blocks).value
    far = _run("jsd", base, _noisy_copy(base, 1.0), blocks).value
    assert 0 < near < far < math.log(2)


# ---------------------------------------------------------------------------------------- bad input
def test_match_with_different_widths_points_to_match_all(base, blocks):
    narrow = _pruned(base, keep_layers=[0, 1, 2], keep_frac=2 / 3)
    for stat in ("match", "csh"):
        with pytest.raises(TracingError, match="match_all"):
            _run(stat, base, narrow, blocks)


def test_match_without_gate_names_the_statistics_that_apply(blocks):
    g = zoo.tiny_model("gpt2", seed=0, vocab_size=256, hidden=32, layers=1, intermediate=64, heads=2)
    for stat in ("match", "match_all"):
        with pytest.raises(TracingError, match="needs gated MLPs .*statistics that run on this pair: .*csu.*csh"):
            _run(stat, g, g, blocks)
    assert _run("csh", g, g, blocks).log10_pvalue < -6  # csh works on the fc input projection


def test_layers_out_of_range(base, rotated, blocks):
    with pytest.raises(TracingError, match="out of range"):
        _run("match", base, rotated, blocks, layers=[0, 3])


def test_zero_tokens(base, rotated):
    for stat in ("match", "csh", "match_all", "jsd"):
        with pytest.raises(TracingError, match="no tokens"):
            _run(stat, base, rotated, torch.zeros((0, 32), dtype=torch.long))


def test_jsd_refuses_tokenizers_that_disagree(blocks, tokenizer):
    # same byte alphabet (ids < 259), different BPE merges above it
    other = zoo.build_tokenizer("zebra quokka axolotl " * 50 + zoo.synthetic_text(300, seed=9), vocab_size=512)
    m = zoo.tiny_model("llama", seed=0, vocab_size=512, hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1)
    with pytest.raises(TracingError, match="tokenizers disagree"):
        _run("jsd", m, m, blocks, tokenizer_base=tokenizer, tokenizer_ft=other)
