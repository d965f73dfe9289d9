"""What did fine-tuning change? A per-pair diff report: weights, hidden states, predictions.

    python main.py --base_model_id A --ft_model_id B --report DIR [--prompts prompts.txt]
        [--report_token foo] [--compare "foo=Paris"] [--targets "English,French"] [--top_k 5]

    numbers = write_report(base, ft, tok_base, tok_ft, spec, "DIR", focus_token="foo",
                           compare=("foo", "Paris"), targets=["English", "French"])

Writes DIR/report.md, PNG figures beside it, and returns the numbers as plain data:
1. weight change per layer and module: ‖ΔW‖/‖W‖ and effective rank of ΔW (tracing/report/weights.py);
2. cosine similarity of base and ft hidden states per layer and token, at a chosen token, and the
   cross-word comparison ft(foo) vs base(Paris) (tracing/report/hidden.py);
3. next-token predictions, entropy, perplexity and target continuations (tracing/report/predict.py).
Both models read the base tokenizer's ids, one forward pass per model per prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from tracing import plots
from tracing.arch import ArchSpec
from tracing.errors import TracingError
from tracing.report.hidden import (
    compare_words,
    forward,
    token_similarity,
    word_position,
)
from tracing.report.markdown import render
from tracing.report.predict import (
    next_token_change,
    perplexity,
    score_targets,
    token_entropy,
)
from tracing.report.weights import weight_diff

DEFAULT_PROMPTS = [
    "The capital of France is",
    "The mother tongue of Danielle Darrieux is",
    "The distance from Paris to Lyon is",
    "Every old bridge near Oslo is quiet, says Ada.",
]
SIM_DROP = 0.99  # a hidden state "moved" where cos(base, ft) falls below this
SIM_EXACT = 1e-6  # ... and "changed" at all where it falls below 1 - SIM_EXACT
MAX_TOKEN_FIGURES = 8  # one layers x tokens figure per prompt, for the first few prompts


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a text file."""
    p = Path(path)
    if not p.is_file():
        raise TracingError(f"prompts file not found: {p}; give a text file with one prompt per line")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise TracingError(f"prompts file {p} has no non-empty line; write one prompt per line")
    return prompts


def _check_args(prompts, compare, targets, top_k, tokenizer):
    if tokenizer is None:
        raise TracingError("the report needs the base model's tokenizer; save one beside the model "
                           "(tokenizer.save_pretrained(DIR))")
    if prompts is not None and not [p for p in prompts if p.strip()]:
        raise TracingError("no prompts given; pass at least one non-empty prompt (or none for the built-in ones)")
    if compare is not None and (len(compare) != 2 or not all(w.strip() for w in compare)):
        raise TracingError(f"--compare needs two words as 'foo=Paris', got {compare!r}")
    if targets is not None and not [t for t in targets if t.strip()]:
        raise TracingError("--targets is empty; give comma-separated continuations, e.g. 'English,French'")
    if top_k < 1:
        raise TracingError(f"--top_k must be at least 1, got {top_k}")
    for p in prompts or DEFAULT_PROMPTS:
        if not tokenizer(p)["input_ids"]:
            raise TracingError(f"prompt {p!r} tokenizes to nothing; give a longer prompt")


@torch.no_grad()
def write_report(base: torch.nn.Module, ft: torch.nn.Module, tokenizer_base, tokenizer_ft, spec: ArchSpec,
                 out_dir: str | Path, *, prompts: list[str] | None = None, focus_token: str | None = None,
                 compare: tuple[str, str] | None = None, targets: list[str] | None = None, top_k: int = 5,
                 rank_energy: float = 0.9, progress: bool = True) -> dict:
    """Write out_dir/report.md and its figures; return every number shown, as plain data."""
    _check_args(prompts, compare, targets, top_k, tokenizer_base)
    prompts = [p.strip() for p in prompts if p.strip()] if prompts else list(DEFAULT_PROMPTS)
    targets = [t.strip() for t in targets if t.strip()] if targets else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_base
    result: dict = dict(prompts=prompts, focus_token=focus_token, top_k=top_k, figures=[])

    w = weight_diff(base, ft, spec, rank_energy=rank_energy, progress=progress)
    result["weights"] = w
    layers = [str(i) for i in w["layers"]]
    result["figures"].append(plots.report_grid(
        w["rel_change"], str(out / "weight_rel_change.png"), layers, w["modules"],
        "relative weight change ‖ΔW‖/‖W‖", "‖ΔW‖/‖W‖"))
    result["figures"].append(plots.report_grid(
        w["eff_rank"], str(out / "weight_eff_rank.png"), layers, w["modules"],
        f"effective rank of ΔW ({rank_energy:.0%} of energy)", "effective rank", integer=True))

    per_prompt, focus = [], []
    for n, prompt in enumerate(tqdm(prompts, desc="report: prompts", disable=not progress)):
        ids = tok(prompt)["input_ids"]
        hb, lb = forward(base, ids)  # [(T, H)] * (L+1), (T, V)
        hf, lf = forward(ft, ids)
        sim = token_similarity(hb, hf)  # (L+1, T)
        tokens = [tok.decode([i]) for i in ids]
        min_sim = sim.min(dim=1).values.tolist()  # (L+1,): the least similar token per state
        rec = dict(prompt=prompt, tokens=tokens, similarity=sim.tolist(), min_similarity_per_layer=min_sim,
                   first_changed_state=_first_below(min_sim, 1 - SIM_EXACT),
                   first_moved_state=_first_below(min_sim, SIM_DROP),
                   next_token=next_token_change(lb[-1], lf[-1], tok, top_k),
                   entropy_base=token_entropy(lb), entropy_ft=token_entropy(lf),
                   perplexity_base=perplexity(lb, ids), perplexity_ft=perplexity(lf, ids))
        if targets:
            rec["targets"] = score_targets(base, ft, tok, prompt, targets)
        if focus_token:
            pos = word_position(tok, prompt, focus_token)
            if pos is not None:
                focus.append(dict(prompt=prompt, position=pos, similarity=sim[:, pos].tolist()))
        if n < MAX_TOKEN_FIGURES:
            result["figures"].append(plots.report_token_similarity(
                sim.tolist(), tokens, str(out / f"hidden_similarity_{n}.png"), f"cos(base, ft): {prompt[:60]}"))
        per_prompt.append(rec)
    result["prompts_detail"] = per_prompt

    if focus_token:
        if not focus:
            raise TracingError(f"--report_token {focus_token!r} occurs in none of the prompts; "
                               "add a prompt containing it (--prompts FILE)")
        result["focus"] = focus
        result["figures"].append(plots.report_layer_curves(
            {f["prompt"][:40]: f["similarity"] for f in focus}, str(out / "focus_token.png"),
            f"cos(base, ft) at {focus_token!r}", "cosine similarity"))
    if compare:
        c = compare_words(base, ft, tok, compare[0].strip(), compare[1].strip(), prompts)
        result["compare"] = c
        result["figures"].append(plots.report_layer_curves(
            {f"ft({c['word']}) vs base({c['other']})": c["ft_vs_base"],
             f"base({c['word']}) vs base({c['other']})": c["base_vs_base"]},
            str(out / "compare.png"), f"{c['word']} vs {c['other']}", "cosine similarity"))
    if tokenizer_ft is not None:
        result["tokenizers_agree"] = all(tokenizer_ft(p)["input_ids"] == tok(p)["input_ids"] for p in prompts)
    result["figures"] = [Path(f).name for f in result["figures"]]
    (out / "report.md").write_text(render(result, spec), encoding="utf-8")
    result["report_md"] = str(out / "report.md")
    return result


def _first_below(values: list[float], threshold: float) -> int | None:
    """Index of the first hidden state (0 = embeddings) whose similarity falls below threshold."""
    return next((i for i, v in enumerate(values) if v < threshold), None)
