"""Every supported family: the spec covers the state dict, and permuting hidden units keeps the function."""

import pytest
import torch

from tracing import zoo
from tracing.arch import GROUPS, SUPPORTED_MODEL_TYPES, UnsupportedArchitecture, check_covers, get_spec
from tracing.perm import apply_perm, compose, invert, is_identity, random_perm


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_spec_covers_every_state_dict_key(family):
    model = zoo.tiny_model(family, layers=3)
    spec = get_spec(model.config)
    check_covers(spec, model.state_dict())
    assert spec.n_layers == 3 and len(spec.layers) == 3
    assert spec.gated == (family not in ("gpt2", "gpt_neox"))


def test_every_supported_model_type_has_a_zoo_model():
    zoo_types = {zoo.tiny_config(f).model_type for f in zoo.FAMILIES}
    assert set(SUPPORTED_MODEL_TYPES) - {"gemma3"} <= zoo_types  # gemma3 is the multimodal wrapper of gemma3_text


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_layer_structure_partitions_the_spec(family):
    """Every key is in exactly one group; the keys of block i are exactly those under its prefix."""
    spec = get_spec(zoo.tiny_model(family, layers=3).config)
    groups = {g: set(spec.keys_in([g])) for g in GROUPS}
    assert set().union(*groups.values()) == set(spec.axes)
    assert sum(map(len, groups.values())) == len(spec.axes)
    for i, roles in enumerate(spec.layers):
        assert {roles.up, roles.down} <= groups["mlp"] and set(roles.attn_in) <= groups["attn"]
        in_block = {k for k in spec.axes if k.startswith(roles.prefix + ".")}
        assert {k for k, j in spec.layer_of.items() if j == i} == in_block
        if roles.pre_mlp_norm:
            assert roles.pre_mlp_norm in groups["norm"]
        assert spec.local_key(roles.up) == spec.local_key(spec.layers[0].up)  # same role, any layer
    assert spec.embed in groups["emb"] and spec.embed not in spec.layer_of
    if family == "qwen2":
        assert "model.layers.1.self_attn.q_proj.bias" in groups["attn"]


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
