"""Permutations of hidden units: `Perm = dict[name -> LongTensor]`, one currency for permute and align.

    perm = random_perm(spec, src.shapes(), seed=0)   # shapes: a source's, or a state dict
    apply_perm(model, spec, perm)                    # in place, on a loaded model
    view = permuted(src, perm)                       # the same weights as a view: each tensor permuted when read

A permutation `p` of a hidden dimension maps new index j to old index p[j]: permuting a weight along an
axis is `w.index_select(axis, p)`. Names are those of `ArchSpec.axes` ("resid", "mlp.{i}", "experts.{i}"), with
an MoE layer's per-expert neuron axis expanded to "mlp.{i}.{e}": the permutation of the neurons of the expert that
ends up in slot e (tracing/arch/spec.py). A fused axis (gate and up of the same neurons) is permuted in every part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from tracing.arch import ArchSpec, expert_mlp, expert_of, experts, experts_layer
from tracing.sources.base import Source, View

Perm = dict[str, torch.Tensor]


def perm_sizes(spec: ArchSpec, shapes: Mapping[str, Sequence[int] | torch.Tensor]) -> dict[str, int]:
    """Size of the dimension each permutation acts on; `shapes`: key -> shape (or tensor, e.g. a state dict)."""
    sizes: dict[str, int] = {}
    for key, ax in spec.axes.items():
        if key not in shapes:
            continue
        shape = shapes[key]
        shape = shape.shape if isinstance(shape, torch.Tensor) else shape
        for a, name in enumerate(ax):
            if name is None:
                continue
            units = spec.n_units(key, name, int(shape[a]))
            if name.endswith(".*"):  # each expert's neurons: one name per slot of the experts axis
                i = int(name.split(".")[1])
                sizes.update({expert_mlp(i, e): units for e in range(int(shape[0])) if expert_mlp(i, e) not in sizes})
            elif name not in sizes:
                sizes[name] = units
    return sizes


def _grouped_randperm(n: int, groups: int, g: torch.Generator) -> torch.Tensor:
    """A random permutation of n that keeps `groups` contiguous blocks whole (DeepSeek's group-limited routing):
    the blocks in random order, each block's members in random order."""
    size = n // groups
    order = torch.randperm(groups, generator=g)
    return torch.cat([order[b] * size + torch.randperm(size, generator=g) for b in range(groups)])


def random_perm(spec: ArchSpec, shapes: Mapping[str, Sequence[int] | torch.Tensor], seed: int,
                names: list[str] | None = None) -> Perm:
    """A uniformly random permutation for every (or the named) hidden dimension; the experts of a layer with
    group-limited routing are permuted within the symmetry group (whole groups, members within them)."""
    g = torch.Generator().manual_seed(seed)
    sizes = perm_sizes(spec, shapes)
    out: Perm = {}
    for n in names or [n for n in spec.perm_names() if n in sizes]:
        i = experts_layer(n)
        groups = spec.layers[i].moe.n_groups if i is not None else 1
        out[n] = _grouped_randperm(sizes[n], groups, g) if groups > 1 else torch.randperm(sizes[n], generator=g)
    return out


def _expert_slots(*perms: Perm) -> dict[int, int]:
    """layer -> number of expert slots, for every layer with expert permutations in `perms`."""
    slots: dict[int, int] = {}
    for perm in perms:
        for n, p in perm.items():
            if (i := experts_layer(n)) is not None:
                slots[i] = max(slots.get(i, 0), len(p))
            elif (at := expert_of(n)) is not None:
                slots[at[0]] = max(slots.get(at[0], 0), at[1] + 1)
    return slots


def invert(perm: Perm) -> Perm:
    """The permutation that undoes `perm` (apply `perm`, then this: the identity)."""
    out = {n: torch.argsort(p) for n, p in perm.items() if expert_of(n) is None}
    for i, n in _expert_slots(perm).items():
        back = out.get(experts(i))
        for k in range(n):  # slot k of the result holds what slot back[k] held after perm
            src = expert_mlp(i, int(back[k]) if back is not None else k)
            if src in perm:
                out[expert_mlp(i, k)] = torch.argsort(perm[src])
    return out


def compose(first: Perm, then: Perm) -> Perm:
    """The permutation equal to applying `first`, then `then` (names missing from one act as identity)."""
    out = {n: p for n, p in first.items() if expert_of(n) is None}
    for n, p in then.items():
        if expert_of(n) is None:
            out[n] = first[n][p] if n in first else p
    for i, n in _expert_slots(first, then).items():
        moved = then.get(experts(i))
        for e in range(n):  # slot e after `then` holds what slot moved[e] held after `first`
            q1, q2 = first.get(expert_mlp(i, int(moved[e]) if moved is not None else e)), then.get(expert_mlp(i, e))
            if q1 is not None or q2 is not None:
                out[expert_mlp(i, e)] = q1[q2] if q1 is not None and q2 is not None else q1 if q2 is None else q2
    return out


def is_identity(perm: Perm) -> bool:
    return all(torch.equal(p, torch.arange(len(p))) for p in perm.values())


def permute_tensor(t: torch.Tensor, key: str, spec: ArchSpec, perm: Perm, slots: torch.Tensor | None = None,
                   from_axis: int = 0) -> torch.Tensor:
    """`t` (the tensor stored under `key`) permuted by `perm` on its axes `from_axis` onwards. `slots`: the expert
    slots (after permutation) that t's axis-0 entries are, when t holds some rows of a stacked tensor."""
    for a, name in enumerate(spec.axes[key]):
        if name is None or a < from_axis:
            continue
        if name.endswith(".*"):  # expert e's neurons, for the expert in slot e
            i = int(name.split(".")[1])
            slots = torch.arange(t.shape[0]) if slots is None else slots
            ps = [perm.get(expert_mlp(i, int(s))) for s in slots]
            if any(p is not None for p in ps):
                t = torch.stack([x if p is None else x.index_select(a - 1, spec.unit_index(key, name, p.to(x.device)))
                                 for x, p in zip(t, ps)])
        elif name in perm:
            p = perm[name].to(t.device)
            t = t.index_select(a, spec.unit_index(key, name, p))
    return t


@torch.no_grad()
def apply_perm(model: torch.nn.Module, spec: ArchSpec, perm: Perm) -> None:
    """Permute `model`'s weights in place (parameters, and buffers the state dict holds, e.g. DeepSeek's expert
    score bias). Tied parameters are permuted once."""
    params = dict(model.named_parameters())  # tied weights appear once here
    params.update({k: b for k, b in model.named_buffers() if k in spec.axes})  # persistent ones only
    for key, tensor in params.items():
        if key not in spec.axes:
            raise KeyError(f"parameter {key} is not described by the {spec.family} spec")
        tensor.copy_(permute_tensor(tensor, key, spec, perm))


def permute_state_dict(state_dict: dict[str, torch.Tensor], spec: ArchSpec, perm: Perm) -> dict[str, torch.Tensor]:
    """Out-of-place variant on a state dict (used by tests and alignment)."""
    return {key: permute_tensor(tensor, key, spec, perm) for key, tensor in state_dict.items()}


class PermutedSource(View):
    """`inner` with hidden units permuted by `perm` as each tensor is read (`permuted` builds it).

    Values equal `apply_perm` on the loaded model's; nothing is permuted ahead of a read. Rows of a stacked expert
    tensor are read expert by expert (never the whole stack)."""

    def __init__(self, inner: Source, perm: Perm):
        super().__init__(inner)
        sizes = perm_sizes(inner.spec, inner.shapes())
        wrong = [n for n, p in perm.items() if len(p) != sizes.get(n)]
        if wrong:
            raise ValueError(f"permutation {wrong[0]} has {len(perm[wrong[0]])} entries, the dimension "
                             f"{sizes.get(wrong[0])}")
        self.perm = perm

    def _read(self, key: str, rows: slice | None) -> torch.Tensor:
        first = self.spec.axes[key][0]
        p = self.perm.get(first) if first is not None else None
        slots = None if rows is None else torch.arange(self.inner.shape(key)[0])[rows]
        if rows is None or p is None:
            return permute_tensor(self.inner.get(key, rows), key, self.spec, self.perm, slots)
        if experts_layer(first) is not None:  # the wanted experts, one at a time
            t = torch.cat([self.inner.get(key, slice(j, j + 1)) for j in p[slots].tolist()])
            return permute_tensor(t, key, self.spec, self.perm, slots, from_axis=1)
        return permute_tensor(self.inner.get(key), key, self.spec, self.perm)[rows]  # permuted rows are scattered


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
