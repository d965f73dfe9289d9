"""φ_MATCH: do the neuron matchings from gate activations and from up activations agree?

Per layer, B's MLP neurons are matched to A's twice by linear assignment minimising the squared
Euclidean distance of activation vectors (as in the original; float64), once with the gate_proj outputs
and once with the up_proj outputs (pre-activation, on the same tokens). For independent models the two
matchings are unrelated; for related ones they coincide. Spearman between the two index vectors gives a
one-sided log10 p per layer; Fisher combines the layers. Invariant to permutations and rotations of the
residual stream (the activations do not depend on its basis). One forward pass per model
(tracing/activations.py).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from tracing import lap
from tracing.activations import DEFAULT_BUDGET_BYTES, check_same_mlp, layer_grams
from tracing.errors import TracingError
from tracing.statistics import StatContext, StatResult, register

NO_GATE = ("{stat} needs a gated MLP (gate_proj and up_proj), which {model_type} does not have; "
           "use csh or csu instead")


def assign(sim_ab: torch.Tensor) -> np.ndarray:
    """Match B's neurons into A's for a similarity (width_A, width_B), width_B <= width_A.

    Returns `idx` (width_B,): neuron j of B <-> neuron idx[j] of A. Square inputs give a permutation.
    (lap.match: float64 assignment with an exact argmax fast path.)
    """
    if sim_ab.shape[0] == sim_ab.shape[1]:  # square: lap.match gives A -> B; its inverse is B -> A
        return np.argsort(lap.match(sim_ab))
    return lap.match(sim_ab)  # more rows than columns: one row of A per column of B


def euclid_similarity(gram: torch.Tensor, sq_base: torch.Tensor, sq_ft: torch.Tensor) -> torch.Tensor:
    """-|a_i - b_j|² / 2 = a_i·b_j - |a_i|²/2 - |b_j|²/2 from the Gram matrix (width_A, width_B) and the
    squared norms (width_A,), (width_B,): maximising it minimises the total squared Euclidean distance of
    matched activation vectors (the original's cost). float64."""
    sim = gram.to(torch.float64, copy=True)  # in-place below: no further (width_A, width_B) temporaries
    sim.sub_(sq_base.double()[:, None], alpha=0.5)
    return sim.sub_(sq_ft.double()[None, :], alpha=0.5)


def rank(idx: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of distinct indices (a permutation), so index vectors of a rectangular matching compare."""
    return np.argsort(np.argsort(idx, kind="stable"), kind="stable")


def match_similarities(sim_gate: torch.Tensor, sim_up: torch.Tensor) -> tuple[float, float, float]:
    """(rho, log10 p, seconds in assignment) for one layer pair from its gate and up similarity matrices,
    each (width_A, width_B) with width_B <= width_A."""
    from tracing.statistics.pvalues import perm_pair_spearman

    if sim_gate.shape[1] > sim_gate.shape[0]:
        raise ValueError("match needs width_B <= width_A; swap the models")
    t0 = time.perf_counter()
    g, u = assign(sim_gate), assign(sim_up)
    dt = time.perf_counter() - t0
    rho, log10p = perm_pair_spearman(torch.as_tensor(rank(g)), torch.as_tensor(rank(u)))
    return float(rho), float(log10p), dt


def match_pair(gate: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               up: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[float, float, float]:
    """match_similarities from accumulators: `gate` and `up` are each (Gram (width_A, width_B),
    squared norms of A (width_A,), squared norms of B (width_B,))."""
    return match_similarities(euclid_similarity(*gate), euclid_similarity(*up))


def match_from_context(ctx: StatContext, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> StatResult:
    from tracing.statistics.pvalues import fisher_log10p

    for spec in (ctx.spec_base, ctx.spec_ft):
        if not spec.gated:
            raise TracingError(NO_GATE.format(stat="match", model_type=spec.model_type))
    check_same_mlp(ctx.base, ctx.ft, ctx.spec_base, ctx.spec_ft, "match")
    counter: dict = {}
    grams = layer_grams(ctx.base, ctx.ft, ctx.spec_base, ctx.spec_ft, ctx.blocks, projs=("gate", "up"),
                        layers=ctx.layers, batch_size=ctx.batch_size, budget_bytes=budget_bytes,
                        counter=counter, progress=ctx.progress)
    # similarities are new tensors, taken in this thread before the accumulators move on to the next chunk
    sims = ((lg.layer, *(euclid_similarity(lg.gram[p], lg.sq_base[p], lg.sq_ft[p]) for p in ("gate", "up")))
            for lg in grams)
    per_layer, lap_s = [], 0.0
    for layer, (rho, log10p, dt) in lap.map_in_threads(lambda it: (it[0], match_similarities(it[1], it[2])), sims):
        lap_s += dt
        per_layer.append({"layer": layer, "rho": rho, "log10_pvalue": log10p})
    combined, n_nan = fisher_log10p([r["log10_pvalue"] for r in per_layer])
    return StatResult(value=float(combined), log10_pvalue=float(combined), per_layer=per_layer,
                      extras={"forward_passes": counter["forward_passes"], "n_tokens": counter["n_tokens"],
                              "lap_seconds": lap_s, "layers_skipped_nan": int(n_nan)})


@register("match", needs_data=True, scalar=False,
          help="robust test: neuron matching from gate vs up activations agree (Spearman, Fisher over layers)")
def match(ctx: StatContext) -> StatResult:
    return match_from_context(ctx)
