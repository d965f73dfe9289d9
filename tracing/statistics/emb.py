"""emb: embedding similarity, the mean cosine similarity of corresponding token-embedding rows (higher = related).

Rows are paired by token string when both tokenizers are known (ctx.tokenizer_base / _ft), else by token id
over the shared id range. Not robust to a permuted residual stream.
"""

from __future__ import annotations

import torch

from tracing.errors import TracingError
from tracing.statistics import StatContext, StatResult, register
from tracing.statistics.fits import hidden_differs, require_fit


def shared_rows(ctx: StatContext, n_a: int, n_b: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Row indices (k,) into each embedding for the shared vocabulary, and how they were paired."""
    ta = ctx.tokenizer_base if ctx.tokenizer_base is not None else ctx.source_base.tokenizer
    tb = ctx.tokenizer_ft if ctx.tokenizer_ft is not None else ctx.source_ft.tokenizer
    if ta is not None and tb is not None and hasattr(ta, "get_vocab") and hasattr(tb, "get_vocab"):
        va, vb = ta.get_vocab(), tb.get_vocab()
        common = sorted((i, vb[t]) for t, i in va.items() if t in vb and i < n_a and vb[t] < n_b)
        if common:
            ia, ib = zip(*common)
            return torch.tensor(ia), torch.tensor(ib), "token string"
    v = min(n_a, n_b)
    return torch.arange(v), torch.arange(v), "token id"


ROWS = 8192  # embedding rows compared per step (float64)


@register("emb", fits=(hidden_differs,),
          help="mean cosine similarity of corresponding token embeddings over the shared vocabulary")
@torch.no_grad()
def emb(ctx: StatContext) -> StatResult:
    src_a, src_b = ctx.source_base, ctx.source_ft
    (n_a, _h_a), (n_b, _h_b) = src_a.shape(ctx.spec_base.embed), src_b.shape(ctx.spec_ft.embed)  # (vocab, hidden)
    require_fit(ctx, "emb")
    ia, ib, paired_by = shared_rows(ctx, n_a, n_b)
    dev = ctx.compute_device
    ea = src_a.get(ctx.spec_base.embed)  # (vocab_a, hidden), stored dtype
    eb = src_b.get(ctx.spec_ft.embed)  # (vocab_b, hidden)
    dev = dev or ea.device
    parts = []
    for s in range(0, len(ia), ROWS):
        a = ea.index_select(0, ia[s:s + ROWS].to(ea.device)).to(dev, torch.float64)  # (k, hidden)
        b = eb.index_select(0, ib[s:s + ROWS].to(eb.device)).to(dev, torch.float64)  # (k, hidden)
        norms = a.norm(dim=1) * b.norm(dim=1)  # (k,)
        keep = norms > 0  # all-zero rows (e.g. a padding embedding) have no direction
        parts.append(((a * b).sum(1)[keep] / norms[keep]).cpu())
    row_cos = torch.cat(parts)  # (k_nonzero,)
    if not len(row_cos):
        raise TracingError("every shared embedding row is zero in one of the models: use another statistic")
    return StatResult(value=float(row_cos.mean()), log10_pvalue=None, per_layer=[],
                      extras={"median": float(row_cos.median()), "shared_vocab": int(len(ia)),
                              "zero_rows_skipped": int(len(ia) - len(row_cos)), "paired_by": paired_by})
