"""Mode connectivity: the loss of the weight-interpolated model (1 - alpha) base + alpha ft.

    python main.py --base_model_id A --ft_model_id B --stat mode --alpha 0.5
    python main.py --base_model_id A --ft_model_id B --stat mode --alphas 0,0.25,0.5,0.75,1 --attn --emb

Related models stay connected: the interpolated model is about as good as the endpoints. Independent models
show a loss barrier. As in the original code (salzhu/model-tracing, `avg_model`), the default interpolates
each layer's MLP and its norms and keeps base's attention and embeddings; `--attn` / `--emb` add those.

value: the mean token loss (nats) of the interpolated model at `--alpha` (lower = more related; the
original reported the sum of per-batch mean losses, we report the token-weighted mean, which does not
depend on the batch size). extras: the endpoint losses `loss_base`, `loss_ft` and the
`barrier` = value - ((1 - alpha) loss_base + alpha loss_ft); with `--alphas` the whole curve
{"alphas": [...], "losses": [...]} including alpha = 0 and 1, and `max_barrier` over the curve.
No p-value: `--num_perm` wraps `value` in PERMTEST.
"""

from __future__ import annotations

from tracing.errors import TracingError
from tracing.evaluate import mean_loss
from tracing.statistics import StatContext, StatResult, register
from tracing.statistics.fits import require_fit, vocab_disagrees, weights_or_vocab_differ
from tracing.transforms import check_alpha, interpolate_, restore_


def groups_for(ctx: StatContext) -> tuple[str, ...]:
    """Parameter groups interpolated: MLP + per-layer norms, plus attention / embeddings on request."""
    return ("mlp", "norm") + (("attn",) if ctx.attn else ()) + (("emb",) if ctx.emb else ())


def interpolated_loss(ctx: StatContext, alpha: float, groups: tuple[str, ...]) -> float:
    """Loss of base interpolated towards ft; base is restored exactly afterwards, also on error."""
    saved = interpolate_(ctx.base, ctx.ft, alpha, ctx.spec_base, groups)
    try:
        return mean_loss(ctx.base, ctx.blocks, batch_size=ctx.batch_size, progress=ctx.progress)
    finally:
        restore_(ctx.base, saved)


@register("mode", aliases=("mc",), needs_data=True, fits=(weights_or_vocab_differ, vocab_disagrees),
          help="loss of the weight-interpolated model at --alpha (curve with --alphas); low = related")
def mode(ctx: StatContext) -> StatResult:
    require_fit(ctx, "mode")
    if ctx.blocks is None:
        raise TracingError("mode needs token blocks: pass --dataset (wikitext, random or a local file)")
    groups = groups_for(ctx)
    alpha = float(ctx.alpha)
    check_alpha(alpha)
    curve = sorted({0.0, 1.0, *map(float, ctx.alphas)}) if ctx.alphas else []
    for a in curve:
        check_alpha(a)

    def lm(name: str) -> float:  # endpoint losses do not change when ft's hidden units are permuted
        if name not in ctx.cache:
            model = ctx.base if name == "loss_base" else ctx.ft
            ctx.cache[name] = mean_loss(model, ctx.blocks, batch_size=ctx.batch_size, progress=ctx.progress)
        return ctx.cache[name]

    loss_base, loss_ft = lm("loss_base"), lm("loss_ft")
    losses = {0.0: loss_base}  # alpha = 0 is base itself
    if ctx.emb and ctx.attn:
        losses[1.0] = loss_ft  # every group interpolated: alpha = 1 is ft itself
    for a in [*curve, alpha]:
        if a not in losses:
            losses[a] = interpolated_loss(ctx, a, groups)

    def barrier(a: float) -> float:
        return losses[a] - ((1 - a) * loss_base + a * loss_ft)

    value = losses[alpha]
    extras = {"alpha": alpha, "groups": list(groups), "loss_base": loss_base, "loss_ft": loss_ft,
              "barrier": barrier(alpha)}
    if curve:
        extras.update(alphas=curve, losses=[losses[a] for a in curve], max_barrier=max(map(barrier, curve)))
    return StatResult(value=value, log10_pvalue=None, per_layer=[], extras=extras)
