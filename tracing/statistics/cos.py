"""cos: per-layer mean cosine similarity of corresponding weight matrices (a baseline; higher = related).

For each transformer block, every 2-D weight of the block (attention and MLP projections) is flattened
and compared with its counterpart by cosine similarity; the layer's value is the mean over its matrices,
and `value` is the mean over layers (ctx.layers when set). Not robust to permuted hidden units.
"""

from __future__ import annotations

import math

import torch

from tracing.statistics import StatContext, StatResult, register
from tracing.statistics.common import dot_and_norms, paired_weights, selected_layers
from tracing.statistics.fits import require_fit, weights_differ


@register("cos", fits=(weights_differ,),
          help="per-layer mean cosine similarity of corresponding weight matrices (no p-value)")
@torch.no_grad()
def cos(ctx: StatContext) -> StatResult:
    require_fit(ctx, "cos")
    layers = selected_layers(ctx)
    layer_of = ctx.spec_base.layer_of
    sims: dict[int, list[float]] = {i: [] for i in layers}
    for key, pieces in paired_weights(ctx):
        i = layer_of.get(key)
        if i not in sims or len(ctx.spec_base.axes[key]) != 2:
            continue
        dot = sq_a = sq_b = 0.0
        for a, b in pieces:
            d, na, nb = dot_and_norms(a, b)
            dot, sq_a, sq_b = dot + d, sq_a + na, sq_b + nb
        sims[i].append(dot / max(math.sqrt(sq_a) * math.sqrt(sq_b), 1e-300))
    per_layer = [{"layer": i, "cos": sum(s) / len(s)} for i, s in sims.items() if s]
    value = sum(r["cos"] for r in per_layer) / len(per_layer)
    return StatResult(value=value, log10_pvalue=None, per_layer=per_layer, extras={})
