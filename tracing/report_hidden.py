"""Representation change: how far the fine-tuned model's hidden states moved from the base model's.

    states, logits = forward(model, ids)        # one pass: L+1 hidden states (T, H) and logits (T, V)
    sim = token_similarity(states_b, states_f)  # (L+1, T) cosine; row 0 = embeddings, row i+1 = after layer i
    cmp = compare_words(base, ft, tok, "foo", "Paris", prompts)   # ft(foo) vs base(Paris), per layer

Both models read the same token ids (the base tokenizer's), so positions line up. Part of the
fine-tuning diff report (tracing/report.py).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from tracing.errors import TracingError

DEFAULT_TEMPLATE = "The capital of France is {w}."


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def forward(model: torch.nn.Module, ids: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Hidden states [(T, H)] * (L+1) and logits (T, V) of one prompt, in one forward pass."""
    vocab = model.get_input_embeddings().num_embeddings
    if ids and max(ids) >= vocab:
        raise TracingError(f"token id {max(ids)} is outside the model's vocabulary of {vocab}; the report feeds "
                           "both models the base tokenizer's ids, so give models with compatible tokenizers")
    x = torch.tensor([ids], device=model_device(model))  # (1, T)
    out = model(input_ids=x, output_hidden_states=True)
    return [h[0] for h in out.hidden_states], out.logits[0]


def token_similarity(states_base: list[torch.Tensor], states_ft: list[torch.Tensor]) -> torch.Tensor:
    """Cosine similarity (L+1, T) between base and ft hidden states at each layer and token (float64)."""
    dev = states_base[0].device
    b = torch.stack(states_base).to(torch.float64)  # (L+1, T, H)
    f = torch.stack([s.to(dev) for s in states_ft]).to(torch.float64)
    return F.cosine_similarity(b, f, dim=-1)


def _variants(tokenizer, word: str) -> list[list[int]]:
    """Token ids of `word` as it appears mid-sentence (leading space) and at the start."""
    out = []
    for text in (" " + word, word):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and ids not in out:
            out.append(ids)
    return out


def find_word(tokenizer, ids: list[int], word: str) -> int | None:
    """Position of the last sub-token of the first occurrence of `word` in `ids`, or None."""
    best = None
    for pat in _variants(tokenizer, word):
        n = len(pat)
        for s in range(len(ids) - n + 1):
            if ids[s:s + n] == pat:
                if best is None or s + n - 1 < best:
                    best = s + n - 1
                break
    return best


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.to(torch.float64), b.to(a.device, torch.float64), dim=0))


def compare_words(base: torch.nn.Module, ft: torch.nn.Module, tokenizer, word: str, other: str,
                  prompts: list[str]) -> dict:
    """Per layer: cos(ft's state for `word`, base's state for `other`) vs cos(base(word), base(other)).

    Templates are the prompts containing `word` (it is substituted by `other`), else DEFAULT_TEMPLATE.
    Both curves are averaged over templates; index 0 is the embedding output, i+1 the output of layer i.
    """
    pat = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")
    pairs = [(p, pat.sub(other, p, count=1)) for p in prompts if pat.search(p)]
    if not pairs:
        pairs = [(DEFAULT_TEMPLATE.format(w=word), DEFAULT_TEMPLATE.format(w=other))]
    ft_vs, base_vs, used = [], [], []
    for text_a, text_b in pairs:
        ids_a = tokenizer(text_a)["input_ids"]
        ids_b = tokenizer(text_b)["input_ids"]
        pa, pb = find_word(tokenizer, ids_a, word), find_word(tokenizer, ids_b, other)
        if pa is None or pb is None:
            continue
        base_a, _ = forward(base, ids_a)
        ft_a, _ = forward(ft, ids_a)
        base_b, _ = forward(base, ids_b)
        ft_vs.append([_cos(f[pa], b[pb]) for f, b in zip(ft_a, base_b)])
        base_vs.append([_cos(a[pa], b[pb]) for a, b in zip(base_a, base_b)])
        used.append(text_a)
    if not used:
        raise TracingError(f"--compare '{word}={other}': neither word could be located in any template; "
                           "check the spelling or give a prompt containing the first word")
    mean = lambda rows: [sum(col) / len(col) for col in zip(*rows)]  # noqa: E731
    return dict(word=word, other=other, templates=used, ft_vs_base=mean(ft_vs), base_vs_base=mean(base_vs))
