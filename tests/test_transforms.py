"""Rotation keeps the function (RMSNorm families) or is refused clearly; interpolation is exact and undoable."""

import pytest
import torch

from tracing import zoo
from tracing.arch import get_spec
from tracing.errors import TracingError
from tracing.transforms import interpolate_, random_orthogonal, restore_, rotate_residual

REFUSED = ("olmo", "olmo2", "gemma2", "gemma3", "gpt2", "gpt_neox")
ROTATABLE = tuple(f for f in zoo.FAMILIES if f not in REFUSED)


def _ids():
    return torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))


def _randomize_norms(model, spec):
    """Fresh models have unit norm gains; make them non-trivial so that folding is really tested."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.dim() == 1 and spec.axes[key] == ("resid",):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = random_orthogonal(32, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(32, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, random_orthogonal(32, seed=3)) and not torch.equal(q, random_orthogonal(32, seed=4))


@pytest.mark.parametrize("family", ROTATABLE)
def test_rotation_preserves_logits(family):
    model = zoo.tiny_model(family)
    spec = get_spec(model.config)
    _randomize_norms(model, spec)
    with torch.no_grad():
        before = model(_ids()).logits
    emb_before = model.get_input_embeddings().weight.clone()
    q = rotate_residual(model, spec, seed=1)
    with torch.no_grad():
        after = model(_ids()).logits
    assert (before - after).abs().max() <= 1e-4
    emb = model.get_input_embeddings().weight
    assert torch.allclose(emb.double(), emb_before.double() @ q.T, atol=1e-5)  # rows e -> Q e
    assert model.get_output_embeddings().weight is not emb  # untied: the final-norm gain is folded in
    assert not get_spec(model.config).tied


@pytest.mark.parametrize("family", REFUSED)
def test_rotation_refused_where_not_function_preserving(family):
    model = zoo.tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TracingError, match="--rotate is not function-preserving.*--permute"):
        rotate_residual(model, get_spec(model.config), seed=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing touched


@pytest.fixture(scope="module")
def pair():
    a, b = zoo.tiny_model("qwen2", seed=0), zoo.tiny_model("qwen2", seed=1)
    return a, b, get_spec(a.config)


def test_interpolate_endpoints_and_restore(pair):
    a, b, spec = pair
    orig = {k: v.clone() for k, v in a.state_dict().items()}
    saved = interpolate_(a, b, 0.0, spec, groups=("mlp", "attn"))
    assert all(torch.equal(orig[k], v) for k, v in a.state_dict().items())
    restore_(a, saved)

    saved = interpolate_(a, b, 1.0, spec, groups=("mlp",))
    chosen = set(spec.keys_in(["mlp"]))
    sa, sb = a.state_dict(), b.state_dict()
    assert set(saved) == chosen and all(v.device.type == "cpu" for v in saved.values())
    assert all(torch.equal(sa[k], sb[k]) for k in chosen)
    assert all(torch.equal(sa[k], orig[k]) for k in sa if k not in chosen)
    restore_(a, saved)
    assert all(torch.equal(orig[k], v) for k, v in a.state_dict().items())


def test_interpolate_midpoint_and_bad_alpha(pair):
    a, b, spec = pair
    key = spec.layers[0].up
    expected = 0.75 * a.state_dict()[key] + 0.25 * b.state_dict()[key]
    saved = interpolate_(a, b, 0.25, spec, groups=("mlp",))
    assert torch.allclose(a.state_dict()[key], expected, atol=1e-7)
    restore_(a, saved)
    with pytest.raises(TracingError, match=r"alpha must be in \[0, 1\]"):
        interpolate_(a, b, 1.5, spec)
    with pytest.raises(TracingError, match="choose from"):
        interpolate_(a, b, 0.5, spec, groups=("mlps",))
