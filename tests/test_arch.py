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
    assert spec.is_moe == (family in zoo.MOE_FAMILIES)


def _up(roles) -> str:
    """The key holding a block's up projection: its dense MLP's, else its stacked experts'."""
    return roles.up or roles.moe.key_of("up")


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
        mlp_keys = {roles.up, roles.down} - {None}
        if roles.moe is not None:  # router and stacked experts are MLP weights too
            mlp_keys |= {roles.moe.router, roles.moe.key_of("up"), roles.moe.down}
        assert mlp_keys and mlp_keys <= groups["mlp"] and set(roles.attn_in) <= groups["attn"]
        assert set(roles.mlp_in) <= groups["mlp"]
        in_block = {k for k in spec.axes if k.startswith(roles.prefix + ".")}
        assert {k for k, j in spec.layer_of.items() if j == i} == in_block
        if roles.pre_mlp_norm:
            assert roles.pre_mlp_norm in groups["norm"]
        same_kind = next(r for r in spec.layers if (r.moe is None) == (roles.moe is None))  # DeepSeek: dense, MoE
        assert spec.local_key(_up(roles)) == spec.local_key(_up(same_kind))  # same role, any layer
    assert spec.embed in groups["emb"] and spec.embed not in spec.layer_of
    if family == "qwen2":
        assert "model.layers.1.self_attn.q_proj.bias" in groups["attn"]


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_permutation_preserves_logits(family):
    model = zoo.tiny_model(family, layers=2)
    spec = get_spec(model.config)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for key, b in model.named_buffers():  # DeepSeek-V3's expert score bias: nonzero, so its permutation counts
            if key in spec.axes:
                b.normal_(generator=torch.Generator().manual_seed(1))
        before = model(ids).logits
    perm = random_perm(spec, model.state_dict(), seed=1)
    apply_perm(model, spec, perm)
    with torch.no_grad():
        after = model(ids).logits
    assert (before - after).abs().max() <= 1e-4
    up = _up(spec.layers[-1])
    assert not torch.equal(model.state_dict()[up], zoo.tiny_model(family).state_dict()[up])
    if spec.is_moe:  # the experts moved, and each expert's neurons
        assert {"experts.1", "mlp.1.0", "mlp.1.3"} <= set(perm)


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
