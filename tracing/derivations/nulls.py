"""Function-preserving symmetries of the base (permute, rotate) and the nulls: models not derived from the base
(independent ones, damaged copies of an independent model, and a merge of two independent models).

    d = permute(base, tok, ids)                  # hidden units permuted: same logits
    d = independent(base, tok, ids, seed=1)      # another init, same data: truth["derived"] is False
    d = damaged_duplicated(base, tok, ids)       # half of an independent model's MLP neurons copies of others
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from tracing.arch import get_spec, mlp
from tracing.derivations.core import BASE, Derived, Model, recipe, same_layers, truth
from tracing.derivations.merges import linear, merge
from tracing.derivations.train import PRETRAIN_LR, PRETRAIN_STEPS, independent_name, other_ids
from tracing.derivations.train import independent as independent_model
from tracing.perm import apply_perm, random_perm
from tracing.transforms import rotate_residual


@recipe("permute")
def permute(base: Model, tok: Any, ids: torch.Tensor | None = None, *, seed: int = 1) -> Derived:
    """Every hidden dimension (residual stream, each block's MLP neurons) randomly permuted: same function."""
    model = copy.deepcopy(base)
    spec = get_spec(model.config)
    apply_perm(model, spec, random_perm(spec, model.state_dict(), seed))
    return Derived("permute", model, tok, truth("permute", base, model, parents=[BASE],
                                                 layer_map=same_layers(model), permuted=True))


def rotate_refusal(config: Any) -> str | None:
    spec = get_spec(config)
    if spec.rotate_refusal:
        return spec.rotate_refusal
    return None if spec.norm in ("rms", "rms_1p") else f"its {spec.norm} norms do not commute with a rotation"


@recipe("rotate", refusal=rotate_refusal)
def rotate(base: Model, tok: Any, ids: torch.Tensor | None = None, *, seed: int = 1) -> Derived:
    """The residual stream rotated by a random orthogonal matrix, norm gains folded (RMSNorm families only):
    same function, the head untied."""
    model = copy.deepcopy(base)
    rotate_residual(model, get_spec(model.config), seed)
    return Derived("rotate", model, tok, truth("rotate", base, model, parents=[BASE],
                                                layer_map=same_layers(model), rotated=True))


# ---------------------------------------------------------------------- nulls
def _null(kind: str, base: Model, tok: Any, model: Model, seed: int, how: dict, **done: Any) -> Derived:
    name = independent_name(seed)
    return Derived(kind, model, tok, truth(kind, base, model, parents=[name], derived=False,
                                           layer_map=same_layers(model, name), lineage={name: how}, **done))


@recipe("independent", derived=False)
def independent(base: Model, tok: Any, ids: torch.Tensor, *, seed: int = 1, steps: int = PRETRAIN_STEPS,
                lr: float = PRETRAIN_LR) -> Derived:
    """Same family and shape, another initialisation, trained on the same data in the same batch order."""
    model = independent_model(base, ids, seed, steps, lr)
    how = {"from": [], "kind": "independent", "seed": seed, "steps": steps, "lr": lr, "data": "given"}
    return _null("independent", base, tok, model, seed, how)


@recipe("independent-other-data", derived=False)
def independent_other_data(base: Model, tok: Any, ids: torch.Tensor, *, seed: int = 1,
                           steps: int = PRETRAIN_STEPS, lr: float = PRETRAIN_LR) -> Derived:
    """Same family and shape, another initialisation, trained on other text (another sample of the grammar)."""
    model = independent_model(base, other_ids(tok, len(ids), seed), seed, steps, lr, data_seed=seed)
    how = {"from": [], "kind": "independent", "seed": seed, "steps": steps, "lr": lr, "data": "other"}
    return _null("independent-other-data", base, tok, model, seed, how)


@torch.no_grad()
def damage_neurons(model: Model, how: str, frac: float, seed: int) -> Model:
    """In every block, a random `frac` of the MLP neurons (every tensor with the block's "mlp.{i}" axis):
    zeroed; duplicated (overwritten by copies of untouched neurons); or constant (each such neuron's slice of
    every tensor set to its mean). In place."""
    spec = get_spec(model.config)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    for i in range(spec.n_layers):
        keys = [k for k in spec.keys_for(mlp(i)) if k in params]
        n = params[keys[0]].shape[spec.axis(keys[0], mlp(i))]
        order = torch.randperm(n, generator=g)
        k = int(frac * n)
        hit, rest = order[:k], order[k:]
        for key in keys:
            rows = spec.neuron_rows(params[key], key, mlp(i))  # a view: (n, ...) with the neuron axis first
            if how == "zeroed":
                rows[hit] = 0.0
            elif how == "duplicated":
                rows[hit] = rows[rest[torch.arange(k) % len(rest)]]
            else:
                flat = rows[hit].reshape(k, -1)
                rows[hit] = flat.mean(dim=1, keepdim=True).expand_as(flat).reshape(rows[hit].shape)
    return model


def _damaged(how: str):
    kind = f"damaged-{how}"

    def damaged(base: Model, tok: Any, ids: torch.Tensor, *, frac: float = 0.5, seed: int = 1,
                steps: int = PRETRAIN_STEPS, lr: float = PRETRAIN_LR) -> Derived:
        model = damage_neurons(independent_model(base, ids, seed, steps, lr), how, frac, seed)
        built = {"from": [], "kind": "independent", "seed": seed, "steps": steps, "lr": lr, "data": "given"}
        return _null(kind, base, tok, model, seed, built, damage={"kind": how, "frac": frac})

    damaged.__doc__ = f"An independent model with a random `frac` of its MLP neurons {how} in every block."
    return recipe(kind, derived=False)(damaged)


damaged_zeroed, damaged_duplicated, damaged_constant = (_damaged(h) for h in ("zeroed", "duplicated", "constant"))


@recipe("merge-of-independents", derived=False)
def merge_of_independents(base: Model, tok: Any, ids: torch.Tensor, *, seed: int = 1,
                          weights: tuple[float, float] = (0.5, 0.5), steps: int = PRETRAIN_STEPS,
                          lr: float = PRETRAIN_LR) -> Derived:
    """Two independent models (seeds `seed`, `seed + 1`) merged linearly: unrelated to the base."""
    names = (independent_name(seed), independent_name(seed + 1))
    models = [independent_model(base, ids, s, steps, lr) for s in (seed, seed + 1)]
    lineage = {n: {"from": [], "kind": "independent", "seed": s, "steps": steps, "lr": lr, "data": "given"}
               for n, s in zip(names, (seed, seed + 1))}
    total = sum(weights)
    return merge("merge-of-independents", base, tok, models, names, lambda k, xs: linear(xs, weights),
                 {names[0]: weights[0] / total, names[1]: weights[1] / total},
                 {"method": "linear", "weights": list(weights), "normalize": True}, derived=False,
                 lineage=lineage, root=names[0])
