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

from tracing.devices import model_device
from tracing.errors import TracingError

DEFAULT_TEMPLATE = "The capital of France is {w}."


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


def _word_pattern(word: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")


def token_ending_at(tokenizer, text: str, char_end: int) -> int | None:
    """Index of the token of tokenizer(text) that covers character char_end - 1 (offsets), or None."""
    enc = tokenizer(text, return_offsets_mapping=True)
    hit = None
    for i, (s, e) in enumerate(enc["offset_mapping"]):
        if s <= char_end - 1 < e:
            hit = i  # the last token covering it (a multi-byte character may span several)
    return hit


def word_position(tokenizer, text: str, word: str) -> int | None:
    """Position in tokenizer(text) of the last sub-token of the first whole-word occurrence of `word`."""
    m = _word_pattern(word).search(text)
    if m is None:
        return None
    try:
        pos = token_ending_at(tokenizer, text, m.end())
    except (NotImplementedError, TypeError, KeyError):  # slow tokenizers have no offsets
        pos = None
    return pos if pos is not None else find_word(tokenizer, tokenizer(text)["input_ids"], word)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.to(torch.float64), b.to(a.device, torch.float64), dim=0))


def compare_words(base: torch.nn.Module, ft: torch.nn.Module, tokenizer, word: str, other: str,
                  prompts: list[str]) -> dict:
    """Per layer: cos(ft's state for `word`, base's state for `other`) vs cos(base(word), base(other)).

    Templates are the prompts containing `word` (its first occurrence is replaced by `other`), else
    DEFAULT_TEMPLATE; each state is read at the last sub-token of the word.
    Both curves are averaged over templates; index 0 is the embedding output, i+1 the output of layer i.
    """
    pat = _word_pattern(word)
    found = [(p, m) for p in prompts if (m := pat.search(p))]
    if not found:
        t = DEFAULT_TEMPLATE.format(w=word)
        found = [(t, pat.search(t))]
    ft_vs, base_vs, used = [], [], []
    for text_a, m in found:
        text_b = text_a[:m.start()] + other + text_a[m.end():]  # the same template, `other` in its place
        ids_a = tokenizer(text_a)["input_ids"]
        ids_b = tokenizer(text_b)["input_ids"]
        try:
            pa = token_ending_at(tokenizer, text_a, m.end())
            pb = token_ending_at(tokenizer, text_b, m.start() + len(other))
        except (NotImplementedError, TypeError, KeyError):  # slow tokenizers: search the tokens instead
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
    mean = lambda rows: [sum(col) / len(col) for col in zip(*rows)]
    return dict(word=word, other=other, templates=used, ft_vs_base=mean(ft_vs), base_vs_base=mean(base_vs))
