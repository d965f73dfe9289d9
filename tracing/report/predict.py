"""Prediction change: next-token distributions, entropy, perplexity and target continuations, base vs ft.

    table = next_token_change(logits_b[-1], logits_f[-1], tok, top_k=5)   # top-k of each, biggest movers
    token_entropy(logits)            # nats, one per position (T,)
    perplexity(logits, ids)          # exp(mean NLL of tokens 1..T-1 given their prefix)
    continuation_logprob(model, prompt_ids, cont_ids)   # log p(cont | prompt), all its tokens

Part of the fine-tuning diff report (tracing/report/__init__.py). Log-probabilities are natural logs.
"""

from __future__ import annotations

import math

import torch

from tracing.report.hidden import forward


def _label(tokenizer, i: int) -> str:
    return tokenizer.decode([i])


def next_token_change(logits_base: torch.Tensor, logits_ft: torch.Tensor, tokenizer, top_k: int = 5) -> dict:
    """Top-k next tokens with probabilities under both models, and the k tokens whose log-prob moved most.

    logits_*: (V,) at the last position; the comparison runs over the shared vocabulary.
    """
    v = min(logits_base.shape[-1], logits_ft.shape[-1])
    lb = torch.log_softmax(logits_base.to(torch.float64), -1)[:v]  # (V,)
    lf = torch.log_softmax(logits_ft.to(torch.float64).to(lb.device), -1)[:v]
    k = min(top_k, v)

    def top(lp):
        vals, idx = lp.topk(k)
        return [dict(token=_label(tokenizer, int(i)), id=int(i), prob=math.exp(float(x))) for x, i in zip(vals, idx)]

    delta = torch.where(lf == lb, 0.0, lf - lb)  # (V,); a token at -inf in both models did not move (not nan)
    _, moved = delta.abs().topk(k)
    return dict(top_base=top(lb), top_ft=top(lf),
                moved=[dict(token=_label(tokenizer, int(i)), id=int(i), logp_base=float(lb[i]),
                            logp_ft=float(lf[i]), delta=float(delta[i])) for i in moved])


def token_entropy(logits: torch.Tensor) -> list[float]:
    """Entropy (nats) of the next-token distribution at each position; logits (T, V)."""
    lp = torch.log_softmax(logits.to(torch.float64), -1)  # (T, V)
    plogp = torch.where(lp.isneginf(), 0.0, lp.exp() * lp)  # a -inf logit adds 0, not 0 * -inf = nan
    return [float(x) for x in -plogp.sum(-1)]


def perplexity(logits: torch.Tensor, ids: list[int]) -> float | None:
    """exp of the mean negative log-likelihood of ids[1:] given their prefixes; None for a 1-token prompt."""
    if len(ids) < 2:
        return None
    lp = torch.log_softmax(logits[:-1].to(torch.float64), -1)  # (T-1, V)
    tgt = torch.tensor(ids[1:], device=lp.device)
    nll = -lp.gather(1, tgt[:, None]).mean()
    return math.exp(float(nll))


def continuation_logprob(model: torch.nn.Module, prompt_ids: list[int], cont_ids: list[int]) -> float:
    """log p(cont_ids | prompt_ids): the sum over every token of the continuation (natural log)."""
    ids = prompt_ids + cont_ids
    _, logits = forward(model, ids)
    lp = torch.log_softmax(logits.to(torch.float64), -1)  # (T, V)
    n = len(prompt_ids)
    pos = torch.arange(n - 1, len(ids) - 1, device=lp.device)  # the position predicting each cont token
    tgt = torch.tensor(cont_ids, device=lp.device)
    return float(lp[pos, tgt].sum())


def continuation_ids(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids); a space separates them unless the prompt already ends in one."""
    sep = "" if not prompt or prompt[-1].isspace() else " "
    return tokenizer(prompt)["input_ids"], tokenizer(sep + target, add_special_tokens=False)["input_ids"]


def score_targets(base: torch.nn.Module, ft: torch.nn.Module, tokenizer, prompt: str,
                  targets: list[str]) -> list[dict]:
    """Log-prob of each target continuation of `prompt` under both models."""
    out = []
    for t in targets:
        p_ids, c_ids = continuation_ids(tokenizer, prompt, t)
        lb, lf = continuation_logprob(base, p_ids, c_ids), continuation_logprob(ft, p_ids, c_ids)
        out.append(dict(target=t, n_tokens=len(c_ids), logp_base=lb, logp_ft=lf, delta=lf - lb))
    return out
