"""Alignment undoes a planted permutation exactly, and re-aligns a fine-tuned, permuted copy."""

import copy

import pytest
import torch

from tracing import zoo
from tracing.align import align_weights
from tracing.arch import get_spec
from tracing.errors import TracingError
from tracing.perm import apply_perm, invert, random_perm


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_align_recovers_planted_permutation(family):
    base = zoo.tiny_model(family)
    spec = get_spec(base.config)
    ft = copy.deepcopy(base)
    planted = random_perm(spec, ft.state_dict(), seed=7)
    apply_perm(ft, spec, planted)

    perm = align_weights(base, ft, spec, progress=False)
    expected = invert(planted)
    assert set(perm) == set(expected)
    assert all(torch.equal(perm[n], expected[n]) for n in expected)
    apply_perm(ft, spec, perm)
    sb = base.state_dict()
    assert all(torch.equal(sb[k], v) for k, v in ft.state_dict().items())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_align_finetuned_then_permuted_copy(family, text_ids):
    base = zoo.tiny_model(family)
    spec = get_spec(base.config)
    ft = zoo.finetune(copy.deepcopy(base), text_ids, steps=3, lr=1e-3, block_size=32)
    tuned = {k: v.clone() for k, v in ft.state_dict().items()}
    planted = random_perm(spec, ft.state_dict(), seed=3)
    apply_perm(ft, spec, planted)
    sb = base.state_dict()

    def dist():  # relative L2 distance of ft's weights from base's
        sf = ft.state_dict()
        return (sum((sf[k] - sb[k]).norm() ** 2 for k in sb) / sum(v.norm() ** 2 for v in sb.values())) ** 0.5

    permuted = dist()
    perm = align_weights(base, ft, spec, progress=False)
    assert all(torch.equal(perm[n], p) for n, p in invert(planted).items())
    apply_perm(ft, spec, perm)
    assert all(torch.equal(w, tuned[k]) for k, w in ft.state_dict().items())  # the fine-tuned weights, base's basis
    assert dist() < 0.1 < permuted  # close to base again


def test_align_refuses_different_widths():
    base, wide = zoo.tiny_model("llama"), zoo.tiny_model("llama", hidden=32)
    with pytest.raises(TracingError, match="hidden sizes differ.*--stat match_all"):
        align_weights(base, wide, get_spec(base.config), progress=False)
