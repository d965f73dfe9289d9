"""l2: Euclidean distance between all corresponding weights of the two models (a baseline; lower = related).

value = sqrt(sum over every parameter of sum (w_base - w_ft)^2). The token embedding and LM head are
compared over the shared vocabulary rows. per_layer: the same distance restricted to each transformer
block. The original code reported the mean of per-parameter distances; it is kept in extras.
"""

from __future__ import annotations

import math
import re

import torch

from tracing.arch import ArchSpec
from tracing.statistics import StatContext, StatResult, register
from tracing.statistics.shapes import check_same_shapes, vocab_keys


def layer_of_keys(spec: ArchSpec) -> dict[str, int]:
    """State-dict key -> index of the transformer block it belongs to (keys outside blocks are absent)."""
    prefixes = [re.escape(roles.up.split(".mlp.")[0] + ".") for roles in spec.layers]  # e.g. "model.layers.3."
    out: dict[str, int] = {}
    for key in spec.axes:
        for i, p in enumerate(prefixes):
            if re.match(p, key):
                out[key] = i
                break
    return out


def paired_weights(ctx: StatContext):
    """Yield (key, w_base, w_ft) for every weight once (tied LM head skipped), vocab keys cut to shared rows.

    Tensors are views of the models' own storage (no copies); w_ft is on w_base's device.
    """
    sd_a, sd_b = ctx.base.state_dict(), ctx.ft.state_dict()
    vocab = set(vocab_keys(ctx.spec_base))
    tied = ctx.spec_base.tied and ctx.spec_ft.tied
    for key, a in sd_a.items():
        if key not in sd_b or (tied and key == ctx.spec_base.lm_head):
            continue
        b = sd_b[key].to(a.device)
        if key in vocab:
            v = min(a.shape[0], b.shape[0])
            a, b = a[:v], b[:v]  # (shared_vocab, hidden)
        yield key, a, b


@register("l2", higher_is_related=False,
          help="Euclidean distance between all corresponding weights (lower = more related; no p-value)")
@torch.no_grad()
def l2(ctx: StatContext) -> StatResult:
    check_same_shapes(ctx.spec_base, ctx.base.state_dict(), ctx.spec_ft, ctx.ft.state_dict(), "l2")
    layer_of = layer_of_keys(ctx.spec_base)
    per_layer_sq = [0.0] * ctx.spec_base.n_layers
    total_sq, dists = 0.0, []
    for key, a, b in paired_weights(ctx):
        sq = float((a.double() - b.double()).pow(2).sum())
        total_sq += sq
        dists.append(math.sqrt(sq))
        if key in layer_of:
            per_layer_sq[layer_of[key]] += sq
    per_layer = [{"layer": i, "l2": math.sqrt(s)} for i, s in enumerate(per_layer_sq)]
    return StatResult(value=math.sqrt(total_sq), log10_pvalue=None, per_layer=per_layer,
                      extras={"mean_param_l2": sum(dists) / max(len(dists), 1), "n_params": len(dists)})
