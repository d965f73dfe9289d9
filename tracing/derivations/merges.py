"""Merges of two fine-tunes of one base, computed tensor by tensor as mergekit's merge methods compute them.

    d = merge_linear(base, tok, ids, weights=(0.7, 0.3))    # sum(w_i x_i) / sum(w_i)
    d = merge_slerp(base, tok, ids, t=0.5)                  # spherical interpolation of the flattened tensors
    d = merge_task_arithmetic(base, tok, ids)               # base + sum(w_i (x_i - base))
    d = merge_ties(base, tok, ids, density=0.5)             # top-|delta| kept, sign consensus, normalised
    d = merge_dare(base, tok, ids, density=0.5)             # random drop, rescaled 1/density (dare_ties)

The two fine-tunes ("ft-a", "ft-b") are trained from the base on the two halves of `ids` (or passed as
`models=(a, b)`). mergekit's rules followed: linear normalises by the weights' sum; SLERP falls back to lerp
when the normalised tensors are nearly colinear (|dot| > 0.9995); task arithmetic does not normalise; TIES keeps
the `density` largest |delta| of each tensor, elects the sign by the sum of weighted deltas and divides by the
weights that agree with it; DARE keeps each delta entry with probability `density` and rescales by 1/density
(dare_ties adds TIES' sign election, dare_linear does not).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tracing.derivations.core import BASE, Derived, Model, recipe, same_layers, truth
from tracing.derivations.train import tuned

FT_STEPS, FT_LR = 60, 1e-3
Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------------- per tensor, as mergekit
def linear(xs: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    w = torch.tensor(list(weights), dtype=xs[0].dtype).view(-1, *[1] * xs[0].dim())
    out = (w * torch.stack(list(xs))).sum(0)
    return out / w.sum(0) if normalize else out


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    a, b = v0.float(), v1.float()
    na, nb = a.norm(), b.norm()
    dot = float(((a / na if na > eps else a) * (b / nb if nb > eps else b)).sum())
    if abs(dot) > dot_threshold:
        return ((1 - t) * a + t * b).to(v0.dtype)
    theta = math.acos(dot)
    s0, s1 = math.sin(theta - theta * t) / math.sin(theta), math.sin(theta * t) / math.sin(theta)
    return (s0 * a + s1 * b).to(v0.dtype)


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The `density` fraction of entries with the largest |delta| kept, the rest zero (no rescaling)."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.argsort(delta.abs().flatten(), descending=True, stable=True)[:k]] = 1
    return delta * mask.view_as(delta)


def bernoulli(delta: torch.Tensor, density: float, g: torch.Generator) -> torch.Tensor:
    """Each entry kept with probability `density` and rescaled by 1/density (DARE)."""
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full(delta.shape, density), generator=g).to(delta.dtype)
    return delta * mask / density


def task_vectors(base: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float],
                 sparsify: Callable[[torch.Tensor], torch.Tensor] | None, consensus: bool,
                 normalize: bool) -> torch.Tensor:
    """mergekit's generalized task arithmetic: base + mix of the (sparsified) weighted deltas."""
    deltas = torch.stack([sparsify(x - base) if sparsify else x - base for x in xs])  # (models, ...)
    w = torch.tensor(list(weights), dtype=base.dtype).view(-1, *[1] * base.dim())
    weighted = deltas * w
    if consensus:
        sign = (weighted.sum(0) >= 0).to(base.dtype) * 2 - 1
        mask = (weighted.sign() == sign).to(base.dtype)
        mixed, divisor = (weighted * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(0), w.sum(0).expand_as(base).clone()
        divisor[divisor.abs() < 1e-8] = 1
    return base + (mixed / divisor if normalize else mixed)


# ---------------------------------------------------------------------- recipes
def two_finetunes(base: Model, ids: torch.Tensor, seed: int, steps: int = FT_STEPS,
                  lr: float = FT_LR) -> tuple[Model, Model, dict]:
    """Fine-tunes "ft-a" and "ft-b" of the base, on the first and the second half of `ids`."""
    half = len(ids) // 2
    a, b = tuned(base, ids[:half], steps, lr, seed), tuned(base, ids[half:], steps, lr, seed + 1)
    lineage = {n: {"from": [BASE], "kind": "finetune", "steps": steps, "lr": lr, "seed": s, "data": d}
               for n, s, d in (("ft-a", seed, "first half"), ("ft-b", seed + 1, "second half"))}
    return a, b, lineage


def merged(models: Sequence[Model], fn: Callable[[str, list[torch.Tensor]], torch.Tensor]) -> Model:
    """A copy of models[0] whose every tensor is fn(key, [that tensor of each model]) (a tied one computed once)."""
    sds = [m.state_dict() for m in models]
    done: dict[int, torch.Tensor] = {}  # storage of models[0]'s tensor -> its merge
    state = {}
    for k, v in sds[0].items():
        if v.data_ptr() not in done:
            done[v.data_ptr()] = fn(k, [sd[k] for sd in sds])
        state[k] = done[v.data_ptr()]
    out = copy.deepcopy(models[0])
    out.load_state_dict(state, strict=True)
    return out.eval()


def merge(kind: str, base: Model, tok: Any, models: Sequence[Model], names: tuple[str, ...],
          fn: Callable[[str, list[torch.Tensor]], torch.Tensor], shares: dict[str, float], method: dict, *,
          derived: bool = True, lineage: dict | None = None, root: str = BASE) -> Derived:
    """The Derived of `fn` applied to `models` (named `names`; "base" first means the base is an input)."""
    parents = {n: m for n, m in zip(names, models) if n != BASE}
    model = merged(models, fn)
    return Derived(kind, model, tok, truth(kind, base, model, parents=list(names), derived=derived,
                                           layer_map=same_layers(model, root), lineage=lineage or {},
                                           shares=[shares] * len(same_layers(model)), merge=method,
                                           embed_from="merged"), parents=parents)


def _pair(base, ids, models, seed, steps, lr):
    if models is not None:
        return models[0], models[1], {n: {"from": [BASE], "kind": "given"} for n in ("ft-a", "ft-b")}
    return two_finetunes(base, ids, seed, steps, lr)


@recipe("merge-linear")
def merge_linear(base: Model, tok: Any, ids: torch.Tensor, *, weights: tuple[float, float] = (0.5, 0.5),
                 models: tuple[Model, Model] | None = None, seed: int = 1,
                 steps: int = FT_STEPS, lr: float = FT_LR) -> Derived:
    """mergekit linear: sum(w_i x_i) / sum(w_i) of two fine-tunes of the base."""
    a, b, lineage = _pair(base, ids, models, seed, steps, lr)
    total = sum(weights)
    return merge("merge-linear", base, tok, (a, b), ("ft-a", "ft-b"),
                 lambda k, xs: linear(xs, weights), {"ft-a": weights[0] / total, "ft-b": weights[1] / total},
                 {"method": "linear", "weights": list(weights), "normalize": True}, lineage=lineage)


@recipe("merge-slerp")
def merge_slerp(base: Model, tok: Any, ids: torch.Tensor, *, t: float = 0.5,
                models: tuple[Model, Model] | None = None, seed: int = 1,
                steps: int = FT_STEPS, lr: float = FT_LR) -> Derived:
    """mergekit slerp between two fine-tunes of the base (t = 0: ft-a, t = 1: ft-b)."""
    a, b, lineage = _pair(base, ids, models, seed, steps, lr)
    return merge("merge-slerp", base, tok, (a, b), ("ft-a", "ft-b"),
                 lambda k, xs: slerp(t, xs[0], xs[1]), {"ft-a": 1 - t, "ft-b": t},
                 {"method": "slerp", "t": t}, lineage=lineage)


def _task(kind: str, method: str, base, tok, ids, weights, density, models, seed, steps, lr, sparsify,
          consensus, normalize) -> Derived:
    a, b, lineage = _pair(base, ids, models, seed, steps, lr)
    shares = {BASE: 1 - sum(weights), "ft-a": weights[0], "ft-b": weights[1]}
    return merge(kind, base, tok, (base, a, b), (BASE, "ft-a", "ft-b"),
                 lambda k, xs: task_vectors(xs[0], xs[1:], weights, sparsify, consensus, normalize), shares,
                 {"method": method, "weights": list(weights), "density": density, "normalize": normalize},
                 lineage=lineage)


@recipe("merge-task-arithmetic")
def merge_task_arithmetic(base: Model, tok: Any, ids: torch.Tensor, *, weights: tuple[float, float] = (1.0, 1.0),
                          models: tuple[Model, Model] | None = None, seed: int = 1,
                          steps: int = FT_STEPS, lr: float = FT_LR) -> Derived:
    """mergekit task_arithmetic: base + sum(w_i (x_i - base)), not normalised."""
    return _task("merge-task-arithmetic", "task_arithmetic", base, tok, ids, weights, 1.0, models, seed,
                 steps, lr, None, False, False)


@recipe("merge-ties")
def merge_ties(base: Model, tok: Any, ids: torch.Tensor, *, weights: tuple[float, float] = (1.0, 1.0),
               density: float = 0.5, models: tuple[Model, Model] | None = None, seed: int = 1,
               steps: int = FT_STEPS, lr: float = FT_LR) -> Derived:
    """mergekit ties: each delta cut to its `density` largest entries, sign elected, normalised."""
    return _task("merge-ties", "ties", base, tok, ids, weights, density, models, seed,
                 steps, lr, lambda d: magnitude(d, density), True, True)


@recipe("merge-dare")
def merge_dare(base: Model, tok: Any, ids: torch.Tensor, *, weights: tuple[float, float] = (1.0, 1.0),
               density: float = 0.5, consensus: bool = True, models: tuple[Model, Model] | None = None,
               seed: int = 1, steps: int = FT_STEPS, lr: float = FT_LR) -> Derived:
    """mergekit dare_ties (consensus=True) or dare_linear: random drop with rescaling, not normalised."""
    g = torch.Generator().manual_seed(seed)
    return _task("merge-dare", "dare_ties" if consensus else "dare_linear", base, tok, ids, weights, density,
                 models, seed, steps, lr, lambda d: bernoulli(d, density, g), consensus, False)
