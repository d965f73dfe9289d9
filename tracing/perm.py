"""Permutations of hidden units: `Perm = dict[name -> LongTensor]`, one currency for permute and align.

    perm = random_perm(spec, src.shapes(), seed=0)   # shapes: a source's, or a state dict
    apply_perm(model, spec, perm)                    # in place, on a loaded model
    view = permuted(src, perm)                       # the same weights as a view: each tensor permuted when read

A permutation `p` of a hidden dimension maps new index j to old index p[j]: permuting a weight along an
axis is `w.index_select(axis, p)`. Names are those of `ArchSpec.axes` ("resid", "mlp.{i}").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from tracing.arch import ArchSpec
from tracing.sources.base import Source, View

Perm = dict[str, torch.Tensor]


def perm_sizes(spec: ArchSpec, shapes: Mapping[str, Sequence[int] | torch.Tensor]) -> dict[str, int]:
    """Size of the dimension each permutation acts on; `shapes`: key -> shape (or tensor, e.g. a state dict)."""
    sizes: dict[str, int] = {}
    for key, ax in spec.axes.items():
        for a, name in enumerate(ax):
            if name is not None and name not in sizes:
                shape = shapes[key]
                sizes[name] = int((shape.shape if isinstance(shape, torch.Tensor) else shape)[a])
    return sizes


def random_perm(spec: ArchSpec, shapes: Mapping[str, Sequence[int] | torch.Tensor], seed: int,
                names: list[str] | None = None) -> Perm:
    """A uniformly random permutation for every (or the named) hidden dimension."""
    g = torch.Generator().manual_seed(seed)
    sizes = perm_sizes(spec, shapes)
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


class PermutedSource(View):
    """`inner` with hidden units permuted by `perm` as each tensor is read (`permuted` builds it).

    Values equal `apply_perm` on the loaded model's; nothing is permuted ahead of a read."""

    def __init__(self, inner: Source, perm: Perm):
        super().__init__(inner)
        sizes = perm_sizes(inner.spec, inner.shapes())
        wrong = [n for n, p in perm.items() if len(p) != sizes.get(n)]
        if wrong:
            raise ValueError(f"permutation {wrong[0]} has {len(perm[wrong[0]])} entries, the dimension "
                             f"{sizes.get(wrong[0])}")
        self.perm = perm

    def _read(self, key: str, rows: slice | None) -> torch.Tensor:
        axes = self.spec.axes[key]
        whole = rows is not None and axes[0] in self.perm  # permuted rows are scattered: read them all
        t = self.inner.get(key, None if whole else rows)
        for a, name in enumerate(axes):
            if name in self.perm:
                t = t.index_select(a, self.perm[name].to(t.device))
        return t[rows] if whole else t


class SelectedSource(View):
    """`inner` keeping only the units `keep[name]` (in that order) of each named dimension, as each tensor is read:
    a base cut down to the residual channels a width-pruned derivative kept (`selected` builds it)."""

    def __init__(self, inner: Source, keep: Perm):
        super().__init__(inner)
        self.keep = keep

    def shape(self, key: str) -> tuple[int, ...]:
        shape = list(self.inner.shape(key))
        for a, name in enumerate(self.spec.axes[key]):
            if name in self.keep:
                shape[a] = len(self.keep[name])
        return tuple(shape)

    def _read(self, key: str, rows: slice | None) -> torch.Tensor:
        axes = self.spec.axes[key]
        whole = rows is not None and axes[0] in self.keep  # selected rows are scattered: read them all
        t = self.inner.get(key, None if whole else rows)
        for a, name in enumerate(axes):
            if name in self.keep:
                t = t.index_select(a, self.keep[name].to(t.device))
        return t[rows] if whole else t


def selected(source: Source, keep: Perm) -> Source:
    """A view of `source` keeping only the units `keep[name]` of each named dimension (SelectedSource)."""
    return SelectedSource(source, keep)


def permuted(source: Source, perm: Perm) -> Source:
    """A view of `source` permuted by `perm` (after any permutation it already applies: one gather per read)."""
    if isinstance(source, PermutedSource):
        return PermutedSource(source.inner, compose(source.perm, perm))
    return PermutedSource(source, perm)
