"""emb: embedding similarity, the mean cosine similarity of corresponding token-embedding rows (higher = related).

Rows are paired by token string when both tokenizers are known (ctx.tokenizer_base / _ft), else by token id
over the shared id range. Not robust to a permuted residual stream.
"""

from __future__ import annotations

import torch

from tracing.errors import TracingError
from tracing.statistics import StatContext, StatResult, register


def shared_rows(ctx: StatContext, n_a: int, n_b: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Row indices (k,) into each embedding for the shared vocabulary, and how they were paired."""
    ta, tb = ctx.tokenizer_base, ctx.tokenizer_ft
    if ta is not None and tb is not None and hasattr(ta, "get_vocab") and hasattr(tb, "get_vocab"):
        va, vb = ta.get_vocab(), tb.get_vocab()
        common = sorted((i, vb[t]) for t, i in va.items() if t in vb and i < n_a and vb[t] < n_b)
        if common:
            ia, ib = zip(*common)
            return torch.tensor(ia), torch.tensor(ib), "token string"
    v = min(n_a, n_b)
    return torch.arange(v), torch.arange(v), "token id"


@register("emb", help="mean cosine similarity of corresponding token embeddings over the shared vocabulary")
@torch.no_grad()
def emb(ctx: StatContext) -> StatResult:
    ea = ctx.base.state_dict()[ctx.spec_base.embed]  # (vocab_a, hidden)
    eb = ctx.ft.state_dict()[ctx.spec_ft.embed]  # (vocab_b, hidden)
    if ea.shape[1] != eb.shape[1]:
        raise TracingError(f"embedding widths differ ({ea.shape[1]} vs {eb.shape[1]}): use match_all, which "
                           "handles different depth and width")
    ia, ib, paired_by = shared_rows(ctx, ea.shape[0], eb.shape[0])
    a = ea.index_select(0, ia.to(ea.device)).double()  # (k, hidden)
    b = eb.index_select(0, ib.to(eb.device)).to(ea.device).double()  # (k, hidden)
    norms = a.norm(dim=1) * b.norm(dim=1)  # (k,)
    keep = norms > 0  # all-zero rows (e.g. a padding embedding) have no direction
    if not keep.any():
        raise TracingError("every shared embedding row is zero in one of the models: use another statistic")
    row_cos = (a * b).sum(1)[keep] / norms[keep]  # (k_nonzero,)
    return StatResult(value=float(row_cos.mean()), log10_pvalue=None, per_layer=[],
                      extras={"median": float(row_cos.median()), "shared_vocab": int(len(ia)),
                              "zero_rows_skipped": int((~keep).sum()), "paired_by": paired_by})
