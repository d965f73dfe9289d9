"""Render the numbers of the fine-tuning diff report (tracing/report/__init__.py) as report.md.

    text = render(result, spec)   # result: the plain-data dict write_report returns

The text names every module and layer it talks about by its state-dict path, so a reader can find it.
"""

from __future__ import annotations

from tracing.arch import ArchSpec

LOW_RANK_FRACTION = 1 / 8  # a ΔW whose effective rank is at most this fraction of its size "looks low-rank"


def _f(v, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def _tok(s: str) -> str:
    return "`" + repr(s)[1:-1].replace("`", "'").replace("|", "\\|") + "`"


def _state_name(i: int, prefixes: list[str]) -> str:
    """Hidden state index -> words: 0 = embeddings, i = output of layer i-1."""
    return "embeddings" if i == 0 else f"after layer {i - 1} (`{prefixes[i - 1]}`)"


def _weights(w: dict, prefixes: list[str]) -> list[str]:
    rows = w["per_key"]
    changed = [r for r in rows if r["abs_change"] > 0]
    lines = ["## 1. Weight change", "",
             f"{len(rows)} weights compared, {len(changed)} changed, {len(rows) - len(changed)} identical. "
             f"Relative change is ‖ΔW‖/‖W‖ (Frobenius); effective rank is the smallest k whose top-k singular "
             f"values of ΔW hold {w['rank_energy']:.0%} of Σσ² (0 for an unchanged weight).", ""]
    top = sorted(changed, key=lambda r: -(r["rel_change"] if r["rel_change"] is not None else float("inf")))[:10]
    if top:
        lines += ["Largest relative changes:", "", "| weight | layer | module | ‖ΔW‖/‖W‖ | effective rank |",
                  "|---|---|---|---|---|"]
        lines += [f"| `{r['key']}` | {_f(r['layer'], 'd')} | {r['module']} | {_f(r['rel_change'])} | "
                  f"{_rank(r)} |" for r in top]
        lines.append("")
    low = [r for r in changed if r["eff_rank"] is not None and r["eff_rank"] <= r["max_rank"] * LOW_RANK_FRACTION]
    if low:
        lines += [f"Low-rank updates (effective rank ≤ {LOW_RANK_FRACTION:.3g} of the matrix size; a merged LoRA "
                  f"looks like this): " + ", ".join(f"`{r['key']}` (rank {r['eff_rank']})" for r in low[:20])
                  + (f" and {len(low) - 20} more" if len(low) > 20 else "") + ".", ""]
    # abs_change, not rel_change: rel_change is None also for a weight that was all zeros and changed
    untouched_layers = [i for i in w["layers"] if all(a in (None, 0.0) for a in w["abs_change"][i])]
    if untouched_layers:
        lines += ["Layers with no weight change: "
                  + ", ".join(f"`{prefixes[i]}`" for i in untouched_layers) + ".", ""]
    lines += ["Relative change per layer and module (r: effective rank):", "",
              "| layer | " + " | ".join(w["modules"]) + " |",
              "|---" * (len(w["modules"]) + 1) + "|"]
    for i in w["layers"]:
        cells = ["-" if a is None else f"‖ΔW‖ {a:.3g} (W = 0)" if v is None else
                 f"{_f(v)}" + ("" if k is None else f" (r {k})")
                 for v, k, a in zip(w["rel_change"][i], w["eff_rank"][i], w["abs_change"][i])]
        lines.append(f"| `{prefixes[i]}` | " + " | ".join(cells) + " |")
    lines.append("")
    if w["globals"]:
        lines += ["Weights outside the layers:", "", "| weight | ‖ΔW‖/‖W‖ | effective rank |", "|---|---|---|"]
        lines += [f"| `{r['key']}` | {_f(r['rel_change'])} | {_rank(r)} |" for r in w["globals"]]
        lines.append("")
    lines += ["![relative change](weight_rel_change.png) ![effective rank](weight_eff_rank.png)", ""]
    return lines


def _rank(r: dict) -> str:
    return "-" if r["eff_rank"] is None else f"{r['eff_rank']} of {r['max_rank']}"


def _hidden(res: dict, prefixes: list[str]) -> list[str]:
    lines = ["## 2. Representation change", "",
             "Cosine similarity between the base and fine-tuned hidden states of the same prompt, per token; "
             "state 0 is the embedding output, state i+1 the output of layer i (most families apply the final "
             "norm to the last one). "
             "A state \"changed\" where some token's similarity is below 1 - 1e-6, \"moved\" where below 0.99.", "",
             "| prompt | first changed state | first moved state | min cos, last state | figure |",
             "|---|---|---|---|---|"]
    figs = set(res["figures"])
    for n, p in enumerate(res["prompts_detail"]):
        changed, moved = p["first_changed_state"], p["first_moved_state"]
        fig = f"hidden_similarity_{n}.png"
        lines.append(f"| {_tok(p['prompt'])} | {'none' if changed is None else _state_name(changed, prefixes)} | "
                     f"{'none' if moved is None else _state_name(moved, prefixes)} | "
                     f"{_f(p['min_similarity_per_layer'][-1], '.4f')} | "
                     + (f"[{fig}]({fig})" if fig in figs else "-") + " |")
    lines.append("")
    if "hidden_similarity_0.png" in figs:
        lines += ["![hidden-state similarity, first prompt](hidden_similarity_0.png)", ""]
    if res.get("focus"):
        f0 = res["focus"]
        lines += [f"### At token {_tok(res['focus_token'])}", "",
                  "| state | " + " | ".join(_tok(f["prompt"][:40]) for f in f0) + " |",
                  "|---" * (len(f0) + 1) + "|"]
        for i in range(len(f0[0]["similarity"])):
            lines.append(f"| {_state_name(i, prefixes)} | " + " | ".join(_f(f["similarity"][i], ".4f") for f in f0)
                         + " |")
        lines += ["", "![focus token](focus_token.png)", ""]
    if res.get("compare"):
        c = res["compare"]
        lines += [f"### {c['word']} vs {c['other']}", "",
                  f"Similarity of the fine-tuned model's state for {_tok(c['word'])} to the base model's state for "
                  f"{_tok(c['other'])} in the same template, against the base model's own state for "
                  f"{_tok(c['word'])}; averaged over {len(c['templates'])} template(s): "
                  + ", ".join(_tok(t) for t in c["templates"][:5]) + ".", "",
                  f"| state | ft({c['word']}) vs base({c['other']}) | base({c['word']}) vs base({c['other']}) |",
                  "|---|---|---|"]
        for i, (a, b) in enumerate(zip(c["ft_vs_base"], c["base_vs_base"])):
            lines.append(f"| {_state_name(i, prefixes)} | {a:.4f} | {b:.4f} |")
        lines += ["", "![compare](compare.png)", ""]
    return lines


def _predictions(res: dict) -> list[str]:
    k = res["top_k"]
    lines = ["## 3. Prediction change", "",
             "Next token after each prompt; log-probabilities are natural logs; entropy in nats (mean over "
             "positions); perplexity of the prompt's own tokens.", ""]
    for p in res["prompts_detail"]:
        nt = p["next_token"]
        eb, ef = p["entropy_base"], p["entropy_ft"]
        lines += [f"### {_tok(p['prompt'])}", "",
                  f"perplexity base {_f(p['perplexity_base'])}, ft {_f(p['perplexity_ft'])}; "
                  f"mean entropy base {sum(eb) / len(eb):.3f}, ft {sum(ef) / len(ef):.3f}", "",
                  f"| rank | base top-{k} | p | ft top-{k} | p | moved most | log p base → ft |",
                  "|---|---|---|---|---|---|---|"]
        for j, (b, f, m) in enumerate(zip(nt["top_base"], nt["top_ft"], nt["moved"])):
            lines.append(f"| {j + 1} | {_tok(b['token'])} | {b['prob']:.3f} | {_tok(f['token'])} | {f['prob']:.3f} "
                         f"| {_tok(m['token'])} | {m['logp_base']:.2f} → {m['logp_ft']:.2f} |")
        if p.get("targets"):
            lines += ["", "| continuation | tokens | log p base | log p ft | change |", "|---|---|---|---|---|"]
            lines += [f"| {_tok(t['target'])} | {t['n_tokens']} | {t['logp_base']:.3f} | {t['logp_ft']:.3f} | "
                      f"{t['delta']:+.3f} |" for t in p["targets"]]
        lines.append("")
    return lines


def render(res: dict, spec: ArchSpec) -> str:
    """The whole report.md text."""
    prefixes = [r.prefix for r in spec.layers]  # e.g. model.layers.3
    lines = ["# Fine-tuning diff report", "",
             f"Architecture `{spec.model_type}` ({spec.n_layers} layers); {len(res['prompts'])} prompt(s)."]
    if res.get("tokenizers_agree") is False:
        lines.append("Note: the two tokenizers split some prompts differently; both models were fed the base "
                     "tokenizer's ids.")
    lines.append("")
    return "\n".join(lines + _weights(res["weights"], prefixes) + _hidden(res, prefixes) + _predictions(res)) + "\n"
