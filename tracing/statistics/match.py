"""φ_MATCH: do the neuron matchings from gate activations and from up activations agree?

Per layer, B's MLP neurons are matched to A's twice by linear assignment minimising the squared Euclidean
distance of activation vectors (as in the original; float64), once with the gate_proj outputs and once with the up_proj
outputs (pre-activation, on the same tokens). For independent models the two matchings are unrelated;
for related ones they coincide. Spearman between the two index vectors gives a one-sided log10 p per
layer; Fisher combines the layers. Invariant to permutations and rotations of the residual stream (the
activations do not depend on its basis). One forward pass per model (tracing/activations.py).
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


def max_assignment(sim: torch.Tensor) -> np.ndarray:
    """Maximum-similarity assignment of the rows of `sim` (n, m), n <= m: row i <-> column idx[i].

    Fast path: when every row's best column is distinct, that choice reaches the upper bound
    sum_i max_j sim[i, j] of any assignment, so it is optimal and no linear assignment is needed (the
    usual case for related models). Otherwise: linear assignment in float64 (tracing/lap.py).
    """
    best = sim.argmax(dim=1)  # (n,)
    if len(torch.unique(best)) == len(best):
        return best.cpu().numpy()
    return lap.match(sim)


def assign(sim_ab: torch.Tensor) -> np.ndarray:
    """Match B's neurons into A's for a similarity (width_A, width_B), width_B <= width_A.

    Returns `idx` (width_B,): neuron j of B <-> neuron idx[j] of A. Square inputs give a permutation.
    """
    return max_assignment(sim_ab.T)


def euclid_similarity(gram: torch.Tensor, sq_base: torch.Tensor) -> torch.Tensor:
    """Similarity whose maximum assignment of all of B's neurons into A's is the minimum total squared
    Euclidean distance: |a_i - b_j|² = |a_i|² + |b_j|² - 2 a_i·b_j, and sum_j |b_j|² is the same for every
    assignment, so maximise 2 a_i·b_j - |a_i|². gram (width_A, width_B), sq_base (width_A,) -> float64."""
    return 2 * gram.double() - sq_base.double()[:, None]


def rank(idx: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of distinct indices (a permutation), so index vectors of a rectangular matching compare."""
    return np.argsort(np.argsort(idx, kind="stable"), kind="stable")


def match_pair(gram_gate: torch.Tensor, sq_gate: torch.Tensor, gram_up: torch.Tensor,
               sq_up: torch.Tensor) -> tuple[float, float, float]:
    """(rho, log10 p, seconds in assignment) for one layer pair, from Gram matrices (width_A, width_B) and
    A's squared activation norms (width_A,) of the gate and up projections."""
    from tracing.statistics.pvalues import perm_pair_spearman

    if gram_gate.shape[1] > gram_gate.shape[0]:
        raise ValueError("match_pair needs width_B <= width_A; swap the models")
    t0 = time.perf_counter()
    g = assign(euclid_similarity(gram_gate, sq_gate))
    u = assign(euclid_similarity(gram_up, sq_up))
    dt = time.perf_counter() - t0
    rho, log10p = perm_pair_spearman(torch.as_tensor(rank(g)), torch.as_tensor(rank(u)))
    return float(rho), float(log10p), dt


def match_from_context(ctx: StatContext, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> StatResult:
    from tracing.statistics.pvalues import fisher_log10p

    for spec in (ctx.spec_base, ctx.spec_ft):
        if not spec.gated:
            raise TracingError(NO_GATE.format(stat="match", model_type=spec.model_type))
    check_same_mlp(ctx.base, ctx.ft, ctx.spec_base, ctx.spec_ft, "match")
    counter: dict = {}
    per_layer, lap_s = [], 0.0
    for lg in layer_grams(ctx.base, ctx.ft, ctx.spec_base, ctx.spec_ft, ctx.blocks, projs=("gate", "up"),
                          layers=ctx.layers, batch_size=ctx.batch_size, budget_bytes=budget_bytes,
                          counter=counter, progress=ctx.progress):
        rho, log10p, dt = match_pair(lg.gram["gate"], lg.sq_base["gate"], lg.gram["up"], lg.sq_base["up"])
        lap_s += dt
        per_layer.append({"layer": lg.layer, "rho": rho, "log10_pvalue": log10p})
    combined, n_nan = fisher_log10p([r["log10_pvalue"] for r in per_layer])
    return StatResult(value=float(combined), log10_pvalue=float(combined), per_layer=per_layer,
                      extras={"forward_passes": counter["forward_passes"], "n_tokens": counter["n_tokens"],
                              "lap_seconds": lap_s, "layers_skipped_nan": int(n_nan)})


@register("match", needs_data=True, scalar=False,
          help="robust test: neuron matching from gate vs up activations agree (Spearman, Fisher over layers)")
def match(ctx: StatContext) -> StatResult:
    return match_from_context(ctx)
