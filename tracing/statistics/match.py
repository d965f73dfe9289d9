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

from tracing import matching
from tracing.activations import check_same_mlp, layer_grams
from tracing.statistics import StatContext, StatResult, register
from tracing.statistics.common import check_gated, two_matchings_agree
from tracing.statistics.pvalues import fisher_log10p


@register("match", needs_data=True, scalar=False,
          help="robust test: neuron matching from gate vs up activations agree (Spearman, Fisher over layers)")
def match(ctx: StatContext) -> StatResult:
    check_gated(ctx, "match")
    check_same_mlp(ctx.base, ctx.ft, ctx.spec_base, ctx.spec_ft, "match")
    counter: dict = {}
    grams = layer_grams(ctx.base, ctx.ft, ctx.spec_base, ctx.spec_ft, ctx.blocks, projs=("gate", "up"),
                        layers=ctx.layers, batch_size=ctx.batch_size, counter=counter, progress=ctx.progress)
    # similarities are new tensors, taken in this thread before the accumulators move on to the next chunk
    sims = ((lg.layer, *(matching.euclid_similarity(lg.gram[p], lg.sq_base[p], lg.sq_ft[p]) for p in ("gate", "up")))
            for lg in grams)
    per_layer, lap_s = [], 0.0
    for layer, (rho, log10p, dt) in matching.map_in_threads(lambda it: (it[0], two_matchings_agree(it[1], it[2])),
                                                            sims):
        lap_s += dt
        per_layer.append({"layer": layer, "rho": rho, "log10_pvalue": log10p})
    combined, n_nan = fisher_log10p([r["log10_pvalue"] for r in per_layer])
    return StatResult(value=float(combined), log10_pvalue=float(combined), per_layer=per_layer,
                      extras={"forward_passes": counter["forward_passes"], "n_tokens": counter["n_tokens"],
                              "lap_seconds": lap_s, "layers_skipped_nan": int(n_nan)})
