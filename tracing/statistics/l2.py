"""l2: Euclidean distance between all corresponding weights of the two models (a baseline; lower = related).

value = sqrt(sum over every parameter of sum (w_base - w_ft)^2) (differences in float32, sums in float64).
The token embedding and LM head are compared over the shared vocabulary rows. per_layer: the same distance
restricted to each transformer block. The original code reported the mean of per-parameter distances; it is
kept in extras.
"""

from __future__ import annotations

import math

import torch

from tracing.statistics import StatContext, StatResult, register
from tracing.statistics.common import paired_weights, squared_distance
from tracing.statistics.fits import require_fit, weights_differ


@register("l2", fits=(weights_differ,),
          help="Euclidean distance between all corresponding weights (lower = more related; no p-value)")
@torch.no_grad()
def l2(ctx: StatContext) -> StatResult:
    require_fit(ctx, "l2")
    layer_of = ctx.spec_base.layer_of
    per_layer_sq = [0.0] * ctx.spec_base.n_layers
    total_sq, dists = 0.0, []
    for key, pieces in paired_weights(ctx):
        sq = sum(squared_distance(a, b) for a, b in pieces)
        total_sq += sq
        dists.append(math.sqrt(sq))
        if key in layer_of:
            per_layer_sq[layer_of[key]] += sq
    per_layer = [{"layer": i, "l2": math.sqrt(s)} for i, s in enumerate(per_layer_sq)]
    return StatResult(value=math.sqrt(total_sq), log10_pvalue=None, per_layer=per_layer,
                      extras={"mean_param_l2": sum(dists) / max(len(dists), 1), "n_params": len(dists)})
