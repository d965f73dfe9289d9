"""Every supported family: the spec covers the state dict, and permuting hidden units keeps the function."""

import pytest
import torch

from tracing import zoo
from tracing.arch import UnsupportedArchitecture, check_covers, get_spec
from tracing.perm import apply_perm, compose, invert, is_identity, random_perm


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_spec_covers_every_state_dict_key(family):
    model = zoo.tiny_model(family, layers=3)
    spec = get_spec(model.config)
    check_covers(spec, model.state_dict())
    assert spec.n_layers == 3 and len(spec.layers) == 3
    assert spec.gated == (family not in ("gpt2", "gpt_neox"))


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_permutation_preserves_logits(family):
    model = zoo.tiny_model(family, layers=2)
    spec = get_spec(model.config)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    perm = random_perm(spec, model.state_dict(), seed=1)
    apply_perm(model, spec, perm)
    with torch.no_grad():
        after = model(ids).logits
    assert (before - after).abs().max() <= 1e-4
    up = spec.layers[0].up
    assert not torch.equal(model.state_dict()[up], zoo.tiny_model(family).state_dict()[up])


def test_unsupported_architecture_lists_supported_ones():
    class Cfg:
        model_type = "bert"
    with pytest.raises(UnsupportedArchitecture, match="supported model types: llama"):
        get_spec(Cfg())


def test_invert_and_compose():
    model = zoo.tiny_model("llama")
    spec = get_spec(model.config)
    p = random_perm(spec, model.state_dict(), seed=3)
    assert is_identity(compose(p, invert(p)))
