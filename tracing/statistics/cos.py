"""cos: per-layer mean cosine similarity of corresponding weight matrices (a baseline; higher = related).

For each transformer block, every 2-D weight of the block (attention and MLP projections) is flattened
and compared with its counterpart by cosine similarity; the layer's value is the mean over its matrices,
and `value` is the mean over layers (ctx.layers when set). Not robust to permuted hidden units.
"""

from __future__ import annotations

import torch

from tracing.statistics import StatContext, StatResult, register
from tracing.statistics.common import check_same_shapes, paired_weights, selected_layers


@register("cos", help="per-layer mean cosine similarity of corresponding weight matrices (no p-value)")
@torch.no_grad()
def cos(ctx: StatContext) -> StatResult:
    check_same_shapes(ctx.spec_base, ctx.base.state_dict(), ctx.spec_ft, ctx.ft.state_dict(), "cos")
    layers = selected_layers(ctx)
    layer_of = ctx.spec_base.layer_of
    sims: dict[int, list[float]] = {i: [] for i in layers}
    for key, a, b in paired_weights(ctx):
        i = layer_of.get(key)
        if i in sims and a.dim() == 2:
            a64, b64 = a.double().flatten(), b.double().flatten()  # (out*in,)
            denom = (a64.norm() * b64.norm()).clamp_min(1e-300)
            sims[i].append(float(a64 @ b64 / denom))
    per_layer = [{"layer": i, "cos": sum(s) / len(s)} for i, s in sims.items() if s]
    value = sum(r["cos"] for r in per_layer) / len(per_layer)
    return StatResult(value=value, log10_pvalue=None, per_layer=per_layer, extras={})
