"""Derivations that move whole blocks: depth up-scaling (SOLAR), layer pruning, a passthrough frankenmerge.

    d = depth_upscale(base, tok, ids)           # n=4: blocks 0..2 then 1..3 (6 blocks), healed
    d = layer_prune(base, tok, ids, drop=[2])   # blocks 0, 1, 3, each bit for bit
    d = passthrough(base, tok, ids, other=m)    # blocks 0..k-1 of the base, k..n-1 of m
"""

from __future__ import annotations

from typing import Any

import torch

from tracing.arch import get_spec
from tracing.derivations.core import BASE, Derived, LayerMap, Model, recipe, stack, trained, truth
from tracing.derivations.train import (
    HEAL_LR,
    HEAL_STEPS,
    PRETRAIN_LR,
    PRETRAIN_STEPS,
    independent,
    independent_name,
    train,
)
from tracing.errors import TracingError


def _n(model: Model) -> int:
    return get_spec(model.config).n_layers


def _healed(kind: str, base: Model, tok: Any, ids: torch.Tensor, layer_map: LayerMap, steps: int, lr: float,
            seed: int) -> Derived:
    model = train(stack({BASE: base}, layer_map, BASE), ids, steps, lr, seed)
    return Derived(kind, model, tok, truth(kind, base, model, parents=[BASE], layer_map=layer_map,
                                           training=trained(steps, lr, seed)))


@recipe("depth-upscale")
def depth_upscale(base: Model, tok: Any, ids: torch.Tensor, *, front: int | None = None, back: int | None = None,
                  steps: int = HEAL_STEPS, lr: float = HEAL_LR, seed: int = 1) -> Derived:
    """SOLAR-style depth up-scaling: blocks 0..front-1, then back..n-1 of the same model, healed by training.
    Defaults as SOLAR (32 -> 48): front = n - n//4, back = n//4 (a model under 4 blocks is stacked twice)."""
    n = _n(base)
    front = n - n // 4 if front is None else front
    back = n // 4 if back is None else back
    if not (0 < front <= n and 0 <= back < n):
        raise TracingError(f"depth-upscale: front={front}, back={back} must satisfy 0 < front <= {n} and "
                           f"0 <= back < {n} (the base has {n} blocks)")
    layer_map = [[BASE, i] for i in [*range(front), *range(back, n)]]
    return _healed("depth-upscale", base, tok, ids, layer_map, steps, lr, seed)


def _dropped(n: int, drop: list[int] | None) -> list[int]:
    """Blocks to drop: given, or a contiguous quarter (at least one) ending just before the last block."""
    drop = sorted(set(drop)) if drop is not None else list(range(n - 1 - max(1, n // 4), n - 1))
    if not drop or any(not 0 <= i < n for i in drop) or len(drop) >= n:
        raise TracingError(f"layer-prune: drop={drop} must name between 1 and {n - 1} of the base's blocks "
                           f"0..{n - 1}")
    return drop


@recipe("layer-prune")
def layer_prune(base: Model, tok: Any, ids: torch.Tensor, *, drop: list[int] | None = None) -> Derived:
    """Blocks dropped (a contiguous quarter before the last block, as ShortGPT-style pruning does), no healing:
    every kept block is the base's, bit for bit."""
    n = _n(base)
    gone = _dropped(n, drop)
    layer_map = [[BASE, i] for i in range(n) if i not in gone]
    return _healed("layer-prune", base, tok, ids, layer_map, 0, 0.0, 0)


@recipe("layer-prune-healed")
def layer_prune_healed(base: Model, tok: Any, ids: torch.Tensor, *, drop: list[int] | None = None,
                       steps: int = HEAL_STEPS, lr: float = HEAL_LR, seed: int = 1) -> Derived:
    """The same blocks dropped, then healed by training."""
    n = _n(base)
    gone = _dropped(n, drop)
    layer_map = [[BASE, i] for i in range(n) if i not in gone]
    return _healed("layer-prune-healed", base, tok, ids, layer_map, steps, lr, seed)


@recipe("passthrough")
def passthrough(base: Model, tok: Any, ids: torch.Tensor, *, other: Model | None = None, split: int | None = None,
                seed: int = 1, steps: int = PRETRAIN_STEPS, lr: float = PRETRAIN_LR) -> Derived:
    """Frankenmerge (mergekit passthrough): blocks 0..split-1 of the base, split..n-1 of another model of the
    same architecture (default: an independent model, seed `seed`, trained `steps` at `lr`); embeddings, final
    norm and head from the base."""
    n = _n(base)
    split = n // 2 if split is None else split
    if not 0 < split < n:
        raise TracingError(f"passthrough: split={split} must be between 1 and {n - 1}")
    name = independent_name(seed) if other is None else "other"
    other = independent(base, ids, seed, steps, lr) if other is None else other
    if _n(other) != n or other.config.model_type != base.config.model_type:
        raise TracingError("passthrough: the other model must have the base's architecture and depth")
    layer_map = [[BASE, i] for i in range(split)] + [[name, i] for i in range(split, n)]
    model = stack({BASE: base, name: other}, layer_map, BASE)
    shares = [{src: 1.0} for src, _ in layer_map]
    lineage = {name: {"from": [], "kind": "independent", "seed": seed}} if name != "other" else {}
    return Derived("passthrough", model, tok,
                   truth("passthrough", base, model, parents=[BASE, name], layer_map=layer_map, shares=shares,
                         lineage=lineage, merge={"method": "passthrough", "split": split}),
                   parents={name: other})
