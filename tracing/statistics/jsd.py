"""Jensen–Shannon divergence of the two models' next-token distributions (a baseline, no p-value).

Both models run once, in lockstep, over the same token blocks. At every position the logits are restricted
to the shared vocabulary (the first min(V_A, V_B) ids) and renormalised with log_softmax; the JSD (natural
log, nats, in [0, ln 2]) is computed in log space and averaged over all positions. Lower = more related.
The two tokenizers must map the shared ids to the same tokens, otherwise the distributions are not
comparable and the statistic refuses.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from tracing.activations import check_blocks
from tracing.statistics import StatContext, StatResult, register
from tracing.statistics.fits import require_fit, vocab_disagrees


def _vocab(model: torch.nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-position JSD in nats from logits (..., V) over the same vocabulary; float64 result (...)."""
    lp = torch.log_softmax(logits_a.double(), dim=-1)
    lq = torch.log_softmax(logits_b.double(), dim=-1)
    lm = torch.logaddexp(lp, lq) - math.log(2.0)  # log of the mixture (P + Q) / 2
    kl_pm = (lp.exp() * (lp - lm)).sum(-1)
    kl_qm = (lq.exp() * (lq - lm)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0)


@register("jsd", needs_data=True, fits=(vocab_disagrees,),
          help="Jensen-Shannon divergence of next-token distributions over the shared vocabulary (nats)")
@torch.no_grad()
def jsd(ctx: StatContext) -> StatResult:
    blocks = check_blocks(ctx.blocks)
    require_fit(ctx, "jsd")
    n_shared = min(_vocab(ctx.base), _vocab(ctx.ft))
    dev_a = next(ctx.base.parameters()).device
    dev_b = next(ctx.ft.parameters()).device
    total, count = 0.0, 0
    for s in tqdm(range(0, len(blocks), ctx.batch_size), desc="jsd", disable=not ctx.progress):
        ids = blocks[s:s + ctx.batch_size]  # (B, T)
        la = ctx.base(input_ids=ids.to(dev_a), use_cache=False).logits[..., :n_shared]  # (B, T, V)
        lb = ctx.ft(input_ids=ids.to(dev_b), use_cache=False).logits[..., :n_shared].to(dev_a)
        d = js_divergence(la, lb)  # (B, T)
        total += float(d.sum())
        count += d.numel()
    value = total / count
    return StatResult(value=value, log10_pvalue=None,
                      extras={"forward_passes": 1, "n_tokens": count, "shared_vocab": n_shared, "unit": "nats"})
