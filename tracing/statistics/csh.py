"""φ_CSH: cosine similarity of MLP up-projection activations, matched neuron to neuron.

Per layer: hook the up-projection outputs (pre-activation) of both models on the same tokens, match A's
neurons to B's by cosine similarity (`--matching`, tracing/matching.py: units constant or non-finite over the
tokens left out, ties in random order), test whether the matching is the identity with a one-sided
Spearman correlation, and combine the layers with Fisher's method. One forward pass per model: the cosines
come from streaming Gram accumulators (tracing/grams.py).

Mixtures of experts: an expert computes only on the tokens routed to it, so its up projection cannot be hooked over
all tokens; instead every MLP input is hooked (tracing/moments.py: `input_moments`, its second moments in both models)
and each unit matrix csu tests (tracing/units.py: each routed expert's up rows, the router's rows, the shared
expert's up rows) is compared as the activations u = W x it would give on every token (biases left out): expert e of
base against expert e of ft, exact under H0 like the dense test; a layer's tests combined by Bonferroni (an upcycle's
experts are not independent: csu.py), the layers by Fisher.
"""

from __future__ import annotations

import math

from tracing import matching
from tracing.activations import mlp_width
from tracing.grams import LayerGram, layer_grams
from tracing.moments import input_moments
from tracing.statistics import StatContext, StatResult, register
from tracing.statistics.common import identity_test, matching_extras
from tracing.statistics.fits import mlps_differ, require_fit, vocab_disagrees
from tracing.statistics.pvalues import bonferroni_log10p, fisher_log10p
from tracing.units import up_matrices


@register("csh", aliases=("csh_sp",), needs_data=True, fits=(mlps_differ, vocab_disagrees), scalar=False,
          help="cosine similarity of MLP up-projection activations: matching vs identity, Spearman, Fisher")
def csh(ctx: StatContext) -> StatResult:
    require_fit(ctx, "csh")
    if ctx.spec_base.is_moe or ctx.spec_ft.is_moe:
        return _csh_units(ctx)
    counter: dict = {}
    grams = layer_grams(ctx.base, ctx.ft, ctx.spec_base, ctx.spec_ft, ctx.blocks, projs=("up",),
                        layers=ctx.layers, batch_size=ctx.batch_size, budget_bytes=ctx.memory_budget,
                        counter=counter, progress=ctx.progress)

    def test_layer(lg: LayerGram) -> dict:  # runs in a worker thread
        ok_a, ok_b = lg.usable("up")
        return {"layer": lg.layer, **identity_test(lg.cosine("up"), ok_a, ok_b, ctx.matching, (ctx.seed, lg.layer))}

    width = mlp_width(ctx.base, ctx.spec_base)
    per_layer = list(matching.map_in_threads(test_layer, grams, item_bytes=4 * width * width * 8))
    combined, n_nan = fisher_log10p([r["log10_pvalue"] for r in per_layer])
    return StatResult(value=float(combined), log10_pvalue=float(combined), per_layer=per_layer,
                      extras={"forward_passes": counter["forward_passes"], "n_tokens": counter["n_tokens"],
                              "layers_skipped_nan": int(n_nan), **matching_extras(ctx.matching, per_layer)})


def _csh_units(ctx: StatContext) -> StatResult:
    """csh over the unit matrices of each layer (MoE models), from the moments of the MLP inputs."""
    counter: dict = {}
    moments = input_moments(ctx.base, ctx.ft, ctx.spec_base, ctx.spec_ft, ctx.blocks, layers=ctx.layers,
                            batch_size=ctx.batch_size, counter=counter, progress=ctx.progress)
    per_layer, tests = [], []
    for m in moments:
        recs = []
        for ma, mb in zip(up_matrices(ctx.spec_base, m.layer), up_matrices(ctx.spec_ft, m.layer)):
            if ma.kind == "router" and ctx.spec_base.layers[m.layer].moe.n_experts < matching.MIN_UNITS:
                continue  # too few experts to test their order (as csu)
            cos, ok_a, ok_b = m.compare(ma.read(ctx.source_base), mb.read(ctx.source_ft))
            seed = (ctx.seed, m.layer, 1 + (ma.expert or 0) if ma.kind == "expert" else 0)
            recs.append((ma, identity_test(cos, ok_a, ok_b, ctx.matching, seed)))
        tests += [r for _, r in recs]
        per_layer.append({"layer": m.layer, "log10_pvalue": bonferroni_log10p([r["log10_pvalue"] for _, r in recs]),
                          "n_tests": len(recs),
                          "experts": [{"expert": u.expert, **r} for u, r in recs if u.kind == "expert"],
                          **{u.kind: r for u, r in recs if u.kind in ("router", "shared", "mlp")}})
    combined, _ = fisher_log10p([r["log10_pvalue"] for r in per_layer])
    return StatResult(value=float(combined), log10_pvalue=float(combined), per_layer=per_layer,
                      extras={"forward_passes": counter["forward_passes"], "n_tokens": counter["n_tokens"],
                              "n_tests": len(tests), "layer_combination": "bonferroni",
                              "tests_skipped_nan": sum(math.isnan(r["log10_pvalue"]) for r in tests),
                              **matching_extras(ctx.matching, tests)})
