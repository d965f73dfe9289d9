"""Permutations of hidden units: `Perm = dict[name -> LongTensor]`, one currency for permute and align.

A permutation `p` of a hidden dimension maps new index j to old index p[j]: permuting a weight along an
axis is `w.index_select(axis, p)`. Names are those of `ArchSpec.axes` ("resid", "mlp.{i}").
"""

from __future__ import annotations

import torch

from tracing.arch import ArchSpec

Perm = dict[str, torch.Tensor]


def perm_sizes(spec: ArchSpec, state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """Size of the dimension each permutation acts on."""
    sizes: dict[str, int] = {}
    for key, ax in spec.axes.items():
        for a, name in enumerate(ax):
            if name is not None and name not in sizes:
                sizes[name] = state_dict[key].shape[a]
    return sizes


def random_perm(spec: ArchSpec, state_dict: dict[str, torch.Tensor], seed: int,
                names: list[str] | None = None) -> Perm:
    """A uniformly random permutation for every (or the named) hidden dimension."""
    g = torch.Generator().manual_seed(seed)
    sizes = perm_sizes(spec, state_dict)
    return {n: torch.randperm(sizes[n], generator=g) for n in (names or spec.perm_names())}


def invert(perm: Perm) -> Perm:
    return {n: torch.argsort(p) for n, p in perm.items()}


def compose(first: Perm, then: Perm) -> Perm:
    """The permutation equal to applying `first`, then `then` (names missing from one act as identity)."""
    out = dict(first)
    for n, p in then.items():
        out[n] = first[n][p] if n in first else p
    return out


def is_identity(perm: Perm) -> bool:
    return all(torch.equal(p, torch.arange(len(p))) for p in perm.values())


@torch.no_grad()
def apply_perm(model: torch.nn.Module, spec: ArchSpec, perm: Perm) -> None:
    """Permute `model`'s weights in place. Tied parameters are permuted once."""
    params = dict(model.named_parameters())  # tied weights appear once here
    for key, tensor in params.items():
        axes = spec.axes.get(key)
        if axes is None:
            raise KeyError(f"parameter {key} is not described by the {spec.family} spec")
        for a, name in enumerate(axes):
            if name in perm:
                p = perm[name].to(tensor.device)
                tensor.copy_(tensor.index_select(a, p))


def permute_state_dict(state_dict: dict[str, torch.Tensor], spec: ArchSpec, perm: Perm) -> dict[str, torch.Tensor]:
    """Out-of-place variant on a state dict (used by tests and alignment)."""
    out = {}
    for key, tensor in state_dict.items():
        for a, name in enumerate(spec.axes[key]):
            if name in perm:
                tensor = tensor.index_select(a, perm[name].to(tensor.device))
        out[key] = tensor
    return out
