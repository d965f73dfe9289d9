"""φ_MATCH: do the neuron matchings from gate activations and from up activations agree?

Per layer, B's MLP neurons are matched to A's twice, once with the gate_proj outputs and once with the
up_proj outputs (pre-activation, on the same tokens). For independent models the two matchings are
unrelated; for related ones they coincide. Spearman between the two index vectors gives a one-sided
log10 p per layer; Fisher combines the layers. Invariant to permutations and rotations of the residual
stream (the activations do not depend on its basis). One forward pass per model (tracing/grams.py).

Matching (`--matching`, tracing/matching.py): the exact matching minimises the squared Euclidean distance
of activation vectors (as in the original; float64); "fast" first matches greedily on cosine similarity
and computes the exact matching only where that gives 1e-10 < p < 0.01 (below, the layer is decided: its greedy
p, doubled, is reported; tracing/matching.py proves it valid). Units constant or non-finite over the tokens in
either projection are left out; ties fall in random order.
"""

from __future__ import annotations

from collections.abc import Iterator

from tracing import matching
from tracing.activations import mlp_width
from tracing.grams import LayerGram, layer_grams
from tracing.statistics import StatContext, StatResult, register
from tracing.statistics.common import agreement_test, matching_extras
from tracing.statistics.fits import mlps_differ, require_fit, routed, ungated, vocab_disagrees
from tracing.statistics.pvalues import fisher_log10p


def similarities(lg: LayerGram):
    """For agreement_test: solver -> the gate and up similarities (width_A, width_B), each made when reached."""
    def make(solver: str) -> Iterator:
        for proj in ("gate", "up"):  # screen_cosine: a related layer's pairs certified without a Gram matrix
            yield lg.screen_cosine(proj) if solver == "greedy" else lg.euclid(proj)
    return make


@register("match", needs_data=True, fits=(routed, ungated, mlps_differ, vocab_disagrees), scalar=False,
          help="robust test: neuron matching from gate vs up activations agree (Spearman, Fisher over layers)")
def match(ctx: StatContext) -> StatResult:
    require_fit(ctx, "match")
    counter: dict = {}
    grams = layer_grams(ctx.base, ctx.ft, ctx.spec_base, ctx.spec_ft, ctx.blocks, projs=("gate", "up"),
                        layers=ctx.layers, batch_size=ctx.batch_size, budget_bytes=ctx.memory_budget,
                        counter=counter, progress=ctx.progress)

    def test_layer(lg: LayerGram) -> dict:  # runs in a worker thread
        ok_a, ok_b = lg.usable("gate", "up")
        return {"layer": lg.layer,
                **agreement_test(similarities(lg), ok_a, ok_b, ctx.matching, (ctx.seed, lg.layer))}

    width = mlp_width(ctx.base, ctx.spec_base)
    per_layer = list(matching.map_in_threads(test_layer, grams, item_bytes=6 * width * width * 8))
    combined, n_nan = fisher_log10p([r["log10_pvalue"] for r in per_layer])
    return StatResult(value=float(combined), log10_pvalue=float(combined), per_layer=per_layer,
                      extras={"forward_passes": counter["forward_passes"], "n_tokens": counter["n_tokens"],
                              "layers_skipped_nan": int(n_nan), **matching_extras(ctx.matching, per_layer)})
