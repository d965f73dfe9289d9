"""Mixtures of experts made from a dense base (tracing/recipes.py does the surgery): sparse upcycling, a partial
upcycle, and an upcycle of an independent model (a null).

    d = derive("moe-upcycle", base, tok, ids)        # every expert a copy of its layer's dense MLP, + noise, tuned
"""

from __future__ import annotations

from typing import Any

import torch

from tracing.derivations.core import BASE, Derived, Model, recipe, same_layers, trained, truth
from tracing.derivations.train import PRETRAIN_STEPS, independent_name, train
from tracing.derivations.train import independent as independent_model
from tracing.recipes import UPCYCLE_TO, reinit_experts, upcycle

N_EXPERTS, NOISE = 4, 0.01
TUNE_STEPS, TUNE_LR = 30, 5e-4


def no_upcycle(config: Any) -> str | None:
    if config.model_type in UPCYCLE_TO:
        return None
    return f"sparse upcycling here makes an MoE of {', '.join(UPCYCLE_TO)} models only"


def _moe(kind: str, base: Model, tok: Any, model: Model, parents: list[str], derived: bool = True,
         **done: Any) -> Derived:
    return Derived(kind, model, tok, truth(kind, base, model, parents=parents, derived=derived,
                                           layer_map=same_layers(model, parents[0]), **done))


@recipe("moe-upcycle", refusal=no_upcycle)
def moe_upcycle(base: Model, tok: Any, ids: torch.Tensor, *, n_experts: int = N_EXPERTS, noise: float = NOISE,
                steps: int = TUNE_STEPS, lr: float = TUNE_LR, seed: int = 1) -> Derived:
    """Sparse upcycling: every expert a copy of its layer's dense MLP (+ noise), router random, then tuned."""
    model = train(upcycle(base, n_experts, noise, seed), ids, steps, lr, seed)
    return _moe("moe-upcycle", base, tok, model, [BASE], training=trained(steps, lr, seed))


@recipe("moe-upcycle-partial", refusal=no_upcycle)
def moe_upcycle_partial(base: Model, tok: Any, ids: torch.Tensor, *, n_experts: int = N_EXPERTS,
                        noise: float = NOISE, steps: int = TUNE_STEPS, lr: float = TUNE_LR, seed: int = 1) -> Derived:
    """A partial upcycle: half of the experts re-initialised (attention, norms, embeddings and the rest kept)."""
    moe = reinit_experts(upcycle(base, n_experts, noise, seed), which=list(range(n_experts // 2)), seed=seed + 7)
    model = train(moe, ids, steps, lr, seed)
    return _moe("moe-upcycle-partial", base, tok, model, [BASE], training=trained(steps, lr, seed))


@recipe("moe-of-independent", derived=False, refusal=no_upcycle)
def moe_of_independent(base: Model, tok: Any, ids: torch.Tensor, *, n_experts: int = N_EXPERTS,
                       noise: float = NOISE, seed: int = 2, steps: int = PRETRAIN_STEPS) -> Derived:
    """An upcycle of an independent model of the base's family (a null)."""
    other = independent_model(base, ids, seed=seed, steps=steps)
    name = independent_name(seed)
    return _moe("moe-of-independent", base, tok, upcycle(other, n_experts, noise, seed), [name], derived=False,
                lineage={name: {"from": None, "kind": "independent", "seed": seed, "steps": steps}})
