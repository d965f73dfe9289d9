"""Loss/perplexity, and mode connectivity: derived pairs stay connected, independent trained pairs do not."""

import copy
import math

import pytest
import torch

from tracing import zoo
from tracing.arch import get_spec
from tracing.errors import TracingError
from tracing.evaluate import mean_loss, perplexity
from tracing.statistics import StatContext, get_stat


@pytest.fixture(scope="module")
def blocks(text_ids):
    return text_ids[-16 * 64:].reshape(16, 64)  # held-out tail of the text: (16, 64)


@pytest.fixture(scope="module")
def trained(text_ids):
    """base and an independent model (two seeds, 20 steps each) and a derived one (base + 3 steps)."""
    train = text_ids[: -16 * 64]
    kw = dict(block_size=32, batch_size=8)
    base = zoo.finetune(zoo.tiny_model("llama", seed=0), train, steps=20, lr=5e-3, seed=0, **kw)
    indep = zoo.finetune(zoo.tiny_model("llama", seed=1), train, steps=20, lr=5e-3, seed=1, **kw)
    derived = zoo.finetune(copy.deepcopy(base), train, steps=3, lr=1e-3, seed=2, **kw)
    return base, derived, indep


def _ctx(base, ft, blocks, **kw):
    spec = get_spec(base.config)
    return StatContext(base=base, ft=ft, spec_base=spec, spec_ft=spec, blocks=blocks, batch_size=8,
                       progress=False, **kw)


def test_mean_loss_is_token_weighted_cross_entropy(trained, blocks):
    base = trained[0]
    with torch.no_grad():
        hf = base(input_ids=blocks, labels=blocks).loss.item()  # mean over 16 * 63 predictions
    assert mean_loss(base, blocks, batch_size=16, progress=False) == pytest.approx(hf, rel=1e-5)
    assert mean_loss(base, blocks, batch_size=3, progress=False) == pytest.approx(hf, rel=1e-5)
    assert perplexity(hf) == pytest.approx(math.exp(hf)) and perplexity(1e6) == math.inf


def test_mean_loss_bf16_and_bad_blocks(trained, blocks):
    bf16 = copy.deepcopy(trained[0]).to(torch.bfloat16)
    full = mean_loss(trained[0], blocks[:4], progress=False)
    assert mean_loss(bf16, blocks[:4], progress=False) == pytest.approx(full, abs=0.05)
    with pytest.raises(TracingError, match="block_size"):
        mean_loss(bf16, blocks[:, :1], progress=False)


def test_mode_derived_pair_is_connected(trained, blocks):
    base, derived, _ = trained
    before = {k: v.clone() for k, v in base.state_dict().items()}
    res = get_stat("mc").fn(_ctx(base, derived, blocks, alpha=0.5))
    e = res.extras
    assert res.log10_pvalue is None and e["groups"] == ["mlp", "norm"]
    assert abs(res.value - 0.5 * (e["loss_base"] + e["loss_ft"])) < 0.1  # no barrier
    assert e["barrier"] == pytest.approx(res.value - 0.5 * (e["loss_base"] + e["loss_ft"]))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # base restored exactly


def test_mode_independent_pair_has_a_barrier(trained, blocks):
    base, _, indep = trained
    res = get_stat("mode").fn(_ctx(base, indep, blocks, alpha=0.5))
    assert res.value > max(res.extras["loss_base"], res.extras["loss_ft"]) + 0.2


def test_mode_curve_includes_endpoints(trained, blocks):
    base, derived, _ = trained
    before = {k: v.clone() for k, v in base.state_dict().items()}
    res = get_stat("mode").fn(_ctx(base, derived, blocks, alpha=0.5, alphas=[0.5, 0.25], attn=True, emb=True))
    e = res.extras
    assert e["alphas"] == [0.0, 0.25, 0.5, 1.0] and len(e["losses"]) == 4
    assert e["losses"][0] == e["loss_base"] and e["losses"][-1] == e["loss_ft"]  # all groups: ends are the models
    assert e["losses"][2] == res.value and e["max_barrier"] >= e["barrier"]
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_mode_rejects_bad_input(trained, blocks):
    base, derived, _ = trained
    with pytest.raises(TracingError, match=r"alpha must be in \[0, 1\]"):
        get_stat("mode").fn(_ctx(base, derived, blocks, alpha=1.5))
    with pytest.raises(TracingError, match="--dataset"):
        get_stat("mode").fn(_ctx(base, derived, None))


def test_permtest_of_mode_evaluates_the_endpoints_once(trained, blocks, monkeypatch):
    """Permuting ft's hidden units cannot change the endpoint losses, so PERMTEST pays only for the
    interpolated model: 2 endpoint evaluations + (1 + T) interpolations."""
    import tracing.statistics.mode as mode_module
    from tracing.statistics.permtest import permtest

    calls = []
    monkeypatch.setattr(mode_module, "mean_loss", lambda *a, **kw: calls.append(1) or mean_loss(*a, **kw))
    base, derived, _ = trained
    res = permtest(get_stat("mode"), _ctx(base, derived, blocks), num_perm=4, seed=0, progress=False)
    assert len(calls) == 2 + 5
    assert res.log10_pvalue == -math.log10(5)  # the unpermuted derived pair has the lowest loss
