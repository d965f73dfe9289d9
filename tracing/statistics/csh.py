"""φ_CSH: cosine similarity of MLP up-projection activations, matched neuron to neuron.

Per layer: hook the up-projection outputs (pre-activation) of both models on the same tokens, match A's
neurons to B's by cosine similarity (`--matching`, tracing/matching.py: units constant or non-finite over the
tokens left out, ties in random order), test whether the matching is the identity with a one-sided
Spearman correlation, and combine the layers with Fisher's method. One forward pass per model: the cosines
come from streaming Gram accumulators (tracing/grams.py).
"""

from __future__ import annotations

from tracing import matching
from tracing.activations import mlp_width
from tracing.grams import LayerGram, layer_grams
from tracing.statistics import StatContext, StatResult, register
from tracing.statistics.common import identity_test, matching_extras
from tracing.statistics.fits import mlps_differ, require_fit, vocab_disagrees
from tracing.statistics.pvalues import fisher_log10p


@register("csh", aliases=("csh_sp",), needs_data=True, fits=(mlps_differ, vocab_disagrees), scalar=False,
          help="cosine similarity of MLP up-projection activations: matching vs identity, Spearman, Fisher")
def csh(ctx: StatContext) -> StatResult:
    require_fit(ctx, "csh")
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
