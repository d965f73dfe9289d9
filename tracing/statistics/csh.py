"""φ_CSH: cosine similarity of MLP up-projection activations, matched by linear assignment.

Per layer: hook the up-projection outputs (pre-activation) of both models on the same tokens, match A's
neurons to B's by maximum total cosine similarity (float64 linear assignment), test whether the matching
is the identity with a one-sided Spearman correlation, and combine the layers with Fisher's method.
One forward pass per model: the cosines come from streaming Gram accumulators (tracing/activations.py).
"""

from __future__ import annotations

import time

import torch

from tracing import matching
from tracing.activations import check_same_mlp, layer_grams
from tracing.statistics import StatContext, StatResult, register
from tracing.statistics.pvalues import fisher_log10p, identity_spearman


@register("csh", aliases=("csh_sp",), needs_data=True, scalar=False,
          help="cosine similarity of MLP up-projection activations: matching vs identity, Spearman, Fisher")
def csh(ctx: StatContext) -> StatResult:
    check_same_mlp(ctx.base, ctx.ft, ctx.spec_base, ctx.spec_ft, "csh")
    counter: dict = {}
    grams = layer_grams(ctx.base, ctx.ft, ctx.spec_base, ctx.spec_ft, ctx.blocks, projs=("up",),
                        layers=ctx.layers, batch_size=ctx.batch_size,
                        counter=counter, progress=ctx.progress)

    def test_layer(item: tuple[int, torch.Tensor]) -> tuple[dict, float]:  # runs in a worker thread
        layer, cosine = item
        t0 = time.perf_counter()
        cols = matching.match(cosine)  # (width,): neuron i of A <-> neuron cols[i] of B
        dt = time.perf_counter() - t0
        rho, log10p = identity_spearman(cols)
        return {"layer": layer, "rho": float(rho), "log10_pvalue": float(log10p)}, dt

    # the cosine matrix (width_A, width_B) is a new tensor, taken before the accumulators move on
    results = list(matching.map_in_threads(test_layer, ((lg.layer, lg.cosine("up")) for lg in grams)))
    per_layer = [r for r, _ in results]
    lap_s = sum(dt for _, dt in results)
    combined, n_nan = fisher_log10p([r["log10_pvalue"] for r in per_layer])
    return StatResult(value=float(combined), log10_pvalue=float(combined), per_layer=per_layer,
                      extras={"forward_passes": counter["forward_passes"], "n_tokens": counter["n_tokens"],
                              "lap_seconds": lap_s, "layers_skipped_nan": int(n_nan)})
