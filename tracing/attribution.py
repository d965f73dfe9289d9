"""Merge attribution: how a suspect's weights combine two or more candidate parents, block by block.

    res = attribute(suspect, {"ft-a": src_a, "ft-b": src_b}, base=src_base)   # tensor sources (tracing.sources)
    res["layers"][j]["sources"]  # [{"model", "layer", "share", "ci", "log10_pvalue", "log10_pvalue_holm"}]
    res["kind"], res["summary"]  # "linear", 'merge of ft-a (0.70) and ft-b (0.30) (linear ...)'
    python -m tracing.attribution --suspect S --parents A,B [--base B0] --out DIR   # attribution.json + .png

The model. Block j of the suspect is regressed on one block of each candidate (and of the base, when given):
    y = sum_m w_m x_m + e      y: every weight of block j; x_m: the same weights of block i_m(j) of model m
by least squares, without intercept and without constraint. A linear merge gives w = its normalised weights;
SLERP its per-tensor sine coefficients (about 1 - t and t for close parents); task arithmetic, base + sum_m
w_m (x_m - base), gives w_base = 1 - sum w_m and w_m (with the base a regressor this *is* the regression on the
deltas from the base); a passthrough block copied from block i of m gives w_m = 1 with i_m(j) = i, and 0 for
the others. The layer map i_m(j) is the block of m whose MLP units the suspect's block j finds best
(statistics/screen.py: blind to the order of units, so depths may differ and a permuted suspect maps too).

Intervals and tests. The units of resampling are an MLP neuron (its row of the gate and up matrices and its column
of the down matrix) and a row of every other matrix: errors within a unit may be correlated, units are taken as
independent. The standard error is the cluster-robust (sandwich) one, A^-1 (sum_u g_u g_u') A^-1 with A = X'X
and g_u = X_u' e_u the score of unit u, plus a floor of one rounding per value in the suspect's storage dtype (so
an exact copy still gets a finite p); ci = share +- 1.96 se, or with ci="bootstrap" the 2.5 / 97.5 percentiles
of the shares refit on units drawn with replacement (the same per-unit sums, nothing read again). Each share is
tested against zero (two-sided z; log10 p from the normal's logsf, never rounded) and Holm's correction runs over
every (block, regressor) test of the suspect; a regressor is a *source* of block j when its Holm-adjusted p <=
alpha and |share| >= MIN_SHARE (a significant share of 0.01 is not a parent). Under H0 (the suspect independent
of model m) the suspect's units are in an order unrelated to m's, so the scores have mean zero and are
independent across units; norm gains and biases stay out (shares.py). Measured calibration:
docs/generated/merges.md.

TIES and DARE (the sparsified merges) are not linear in the parents, so what is estimated is the least-squares
share: how much of each parent's task vector the merge carries. For dare_linear the drop mask is independent of
the deltas and rescaled by 1/density, so E[y] = base + sum w_m delta_m and the shares estimate the nominal
weights (the dropout is noise in e). TIES' magnitude trimming and the sign election of ties and dare_ties keep
only parts of each delta: the share is then the effective fraction carried (below the nominal weight), and the
parents are still found. `equal` (per regressor): the fraction of the block's values equal to that model's bit for
bit: trimming and dropping leave many at the base's, dense merges none; so the base of a sparsified merge is
found among the candidates without being named.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from tracing import naming, plots
from tracing.align import align_weights
from tracing.arch import mlp
from tracing.errors import TracingError, exit_on_error
from tracing.perm import permuted
from tracing.shares import block_keys, block_sums, fit
from tracing.sources import Source, open_source
from tracing.statistics import screen
from tracing.statistics.pvalues import holm_log10

ALPHA = 0.01  # family-wise level over the suspect's (block, regressor) tests (Holm)
MIN_SHARE = 0.05  # |share| below which a significant regressor is not called a source
LINED_UP = 0.8  # screen value (median best cosine of MLP rows) above which a block's units line up with a model's
MERGE_GAIN = 0.9  # share of the best single candidate's residual a dense merge's fit must remove (kind_of)
SPARSE = 0.05  # fraction of values left equal to the base's above which a merge is sparsified (TIES, DARE)
SPARSE_PARENT = 0.25  # share each of a sparsified merge's two or more parents must reach (kind_of)


def _up_rows(src: Source, i: int) -> torch.Tensor:
    key = src.spec.layers[i].up
    return src.spec.neuron_rows(src.get(key), key, mlp(i)).float()  # (n_neurons, hidden)


def check_units(suspect: Source, models: Mapping[str, Source]) -> None:
    """Every model's blocks must hold the suspect's weights with the same shapes (depth may differ)."""
    mine = {k: suspect.shape(v) for k, v in block_keys(suspect, 0).items()}
    for name, src in models.items():
        theirs = {k: src.shape(v) for k, v in block_keys(src, 0).items()}
        bad = [k for k in mine if theirs.get(k) != mine[k]]
        if bad:
            raise TracingError(
                f"attribution: {name}'s blocks do not line up with the suspect's (e.g. {bad[0]}: "
                f"{theirs.get(bad[0])} vs {mine[bad[0]]}); merges combine models of the same widths: leave "
                f"{name} out, or map widths first (a width-pruned model is no merge of these candidates)")


def layer_maps(suspect: Source, models: Mapping[str, Source],
               device: torch.device | None = None) -> dict[str, tuple[list[int], list[float]]]:
    """model -> (for each suspect block j, the model's block it finds best, and that screen value)."""
    n = suspect.spec.n_layers
    rows_s = {j: _up_rows(suspect, j) for j in range(n)}
    out = {}
    for name, src in models.items():
        m = src.spec.n_layers
        scores = screen.screen_scores(((i, _up_rows(src, i)) for i in range(m)), rows_s, list(range(m)),
                                      list(range(n)), device)  # (m, n)
        best = []
        for j in range(n):
            col = scores[:, j]
            i = int(np.nanargmax(col))
            best.append(j if j < m and col[j] >= col[i] - 1e-6 else i)  # ties: the block at the same depth
        out[name] = (best, [float(scores[i, j]) for j, i in enumerate(best)])
    return out


def lined_up(maps: dict) -> bool:
    """Whether most suspect blocks have a model whose units line up with theirs (the residual stream in the same
    basis: the screen compares rows column by column)."""
    best = np.max([scores for _, scores in maps.values()], axis=0)  # (blocks,)
    return int((best >= LINED_UP).sum()) * 2 > len(best)


def _aligned(suspect: Source, models: Mapping[str, Source], maps: dict, force: bool, notes: list[str],
             device: torch.device | None) -> tuple[Source, dict, bool]:
    """(suspect, layer maps, aligned): the suspect's hidden units permuted to line up with the first model's (the
    base when given) when that lines them up (or `force`); else the suspect as it is, with a note."""
    name, ref = next(iter(models.items()))
    if ref.spec.n_layers != suspect.spec.n_layers:
        notes.append(f"not aligned: {name} has {ref.spec.n_layers} blocks, the suspect {suspect.spec.n_layers}")
        return suspect, maps, False
    view = permuted(suspect, align_weights(ref, suspect, ref.spec, progress=False, device=device))
    maps_view = layer_maps(view, models, device)
    if force or lined_up(maps_view):
        notes.append(f"the suspect's hidden units were permuted to line up with {name}'s (align)")
        return view, maps_view, True
    notes.append(f"not aligned: even aligned to {name}, the suspect's units do not line up with any candidate's")
    return suspect, maps, False


def attribute(suspect: Source, candidates: Mapping[str, Source], base: Source | None = None, *,
              base_name: str = "base", suspect_name: str | None = None, alpha: float = ALPHA, align: str = "auto",
              ci: str = "sandwich", n_boot: int = 200, seed: int = 0, device: torch.device | None = None) -> dict:
    """Per block of `suspect`, the shares of each candidate (and of `base`) in its weights (module docstring).

    `align`: "auto" permutes the suspect's units to line up with the base's (else the first candidate's) when
    they do not line up already, "yes" always, "no" never (force it only on a suspect known to be related: the
    alignment picks the permutation most like the reference). Returns plain data: suspect, models (the
    regressors' names, the base first), alpha, aligned, notes, layers [{layer, sources [the significant ones],
    tested [every regressor: model, layer, share, ci, se, log10_pvalue, log10_pvalue_holm, screen, equal],
    residual, noise, best_single}], shares {name: {mean_share, blocks_as_source, equal}}, kind, parents,
    summary."""
    if not candidates:
        raise TracingError("attribution needs at least one candidate parent")
    if base is not None and base_name in candidates:
        raise TracingError(f"attribution: '{base_name}' is both the base and a candidate; pass it once")
    if align not in ("auto", "yes", "no") or ci not in ("sandwich", "bootstrap"):
        raise TracingError(f"attribution: align is auto, yes or no (got {align}); ci is sandwich or bootstrap "
                           f"(got {ci})")
    models = {**({base_name: base} if base is not None else {}), **candidates}
    check_units(suspect, models)
    notes: list[str] = []
    maps = layer_maps(suspect, models, device)
    aligned = False
    if align == "yes" or (align == "auto" and not lined_up(maps)):
        suspect, maps, aligned = _aligned(suspect, models, maps, align == "yes", notes, device)
    names = list(models)
    fits = []
    for j in range(suspect.spec.n_layers):
        sums = block_sums(suspect, j, [(models[m], maps[m][0][j]) for m in names])
        fits.append({**fit(sums, ci, n_boot, seed + j), "equal": sums["equal"]})
    holm = holm_log10(np.array([f["log10p"] for f in fits]))  # (blocks, regressors)
    layers = []
    for j, f in enumerate(fits):
        tested = [{"model": m, "layer": maps[m][0][j], "share": float(f["share"][c]),
                   "ci": [float(f["lo"][c]), float(f["hi"][c])], "se": float(f["se"][c]),
                   "log10_pvalue": float(f["log10p"][c]), "log10_pvalue_holm": float(holm[j, c]),
                   "screen": maps[m][1][j], "equal": f["equal"][c]} for c, m in enumerate(names)]
        best = int(np.argmin(f["alone"]))
        layers.append({"layer": j, "sources": [t for t in tested if t["log10_pvalue_holm"] <= math.log10(alpha)
                                                and abs(t["share"]) >= MIN_SHARE],
                       "tested": tested, "residual": f["residual"], "noise": f["noise"],
                       "best_single": {"model": names[best], "residual": f["alone"][best]}})
    out = {"suspect": suspect_name or suspect.name, "models": names, "base": base_name if base is not None else None,
           "alpha": alpha, "correction": "holm", "ci_method": ci, "aligned": aligned, "notes": notes,
           "layers": layers}
    out["shares"] = {m: {"mean_share": float(np.mean([lay["tested"][c]["share"] for lay in layers])),
                         "blocks_as_source": sum(any(s["model"] == m for s in lay["sources"]) for lay in layers),
                         "equal": float(np.mean([lay["tested"][c]["equal"] for lay in layers]))}
                     for c, m in enumerate(names)}
    out["kind"], out["parents"] = kind_of(out)
    out["summary"] = summarize(out)
    return out


def gain(res: dict) -> float:
    """Mean over blocks of 1 - residual / (residual of the best single candidate), the residual less what
    rounding to the suspect's dtype explains: what the mix explains that the nearest model alone does not (1 for
    an exact merge; near 0 for a fine-tune of one candidate; 1 - 1/sqrt(k) for a parent fitted by k children)."""
    out = []
    for lay in res["layers"]:
        alone, excess = lay["best_single"]["residual"], max(lay["residual"] ** 2 - lay["noise"] ** 2, 0.0) ** 0.5
        out.append(1 - excess / alone if alone > 0 else 0.0)
    return float(np.mean(out))


def kind_of(res: dict) -> tuple[str, list[str]]:
    """(kind, parents). kind is one of
    "none"         no candidate is a source of any block
    "single"       every block one candidate's (share ~1), in place: a copy or a near copy, no merge
    "passthrough"  every block one candidate's block, from several candidates or moved: a frankenmerge
    "sparse"       TIES / DARE: SPARSE of the values equal to those of a candidate whose share is <= 0 (the base,
                   which trimming and dropping leave in place), and two or more parents with shares >= SPARSE_PARENT
                   (equal values alone do not say which is the merge: the base fitted by its sparsified child has
                   them too, and then one fine-tune takes nearly all the share)
    "task_arithmetic" / "linear"  a dense merge (the base a source, or not): the fit removes at least MERGE_GAIN
                   of what the nearest candidate alone leaves (`gain`; exact merges remove all of it)
    "related"      several significant shares that remove less: least squares between relatives (a fine-tune of
                   one candidate, the middle of a chain, a parent as the mean of its children), no merge; its
                   parent is the nearest candidate. A merge fine-tuned afterwards lands here too.
    Parents of a merge: the models that are a source of at least half the blocks."""
    layers = res["layers"]
    found = [lay for lay in layers if lay["sources"]]
    if not found:
        return "none", []
    counts = {m: v["blocks_as_source"] for m, v in res["shares"].items()}
    if all(len(lay["sources"]) == 1 and abs(lay["sources"][0]["share"] - 1) <= 0.1 for lay in found):
        used = {lay["sources"][0]["model"] for lay in found}
        moved = any(lay["sources"][0]["layer"] != lay["layer"] for lay in found)
        return "passthrough" if len(used) > 1 or moved else "single", sorted(used, key=lambda m: -counts[m])
    parents = [m for m in res["models"] if counts[m] * 2 >= len(layers)]
    shares = res["shares"]
    if any(v["equal"] >= SPARSE and v["mean_share"] <= 0 for v in shares.values()) and \
            sum(shares[m]["mean_share"] >= SPARSE_PARENT for m in parents) >= 2:
        return "sparse", parents
    if gain(res) < MERGE_GAIN or len(parents) < 2:
        nearest = [lay["best_single"]["model"] for lay in layers]
        return "related", [max(set(nearest), key=nearest.count)]
    return ("task_arithmetic" if res["base"] in parents else "linear"), parents


def summarize(res: dict) -> str:
    """One line: what the suspect is made of."""
    kind, parents, shares = res["kind"], res["parents"], res["shares"]
    if kind == "none":
        return f"no candidate's weights found in it ({', '.join(res['models'])} tested)"
    if kind == "single":
        return f"one source: {parents[0]} (share {shares[parents[0]]['mean_share']:.2f}): no merge of the candidates"
    if kind == "related":
        return (f"no merge: nearest {parents[0]}; the other shares remove only {100 * gain(res):.0f}% of what it "
                "leaves (least squares between relatives)")
    if kind == "passthrough":
        spans = []
        for lay in res["layers"]:
            src = lay["sources"][0] if lay["sources"] else None
            spans.append(f"{lay['layer']}<-{src['model']}:{src['layer']}" if src else f"{lay['layer']}<-?")
        return "passthrough (frankenmerge): " + ", ".join(spans)
    how = {"sparse": "sparsified: TIES / DARE", "task_arithmetic": "task arithmetic", "linear": "linear / SLERP"}
    parts = ", ".join(f"{m} ({shares[m]['mean_share']:.2f})" for m in parents)
    if kind == "sparse":
        at = max((m for m in shares if shares[m]["mean_share"] <= 0.5), key=lambda m: shares[m]["equal"])
        how["sparse"] += f", {100 * shares[at]['equal']:.0f}% of values left at {at}'s"
    return f"merge of {parts} ({how[kind]}; mean shares over {len(res['layers'])} blocks)"


# ---------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tracing.attribution", description=__doc__.split("\n")[0])
    p.add_argument("--suspect", required=True, help="the model to explain (path, hub id, .gguf, adapter)")
    p.add_argument("--parents", required=True, help="candidate parents, comma separated")
    p.add_argument("--base", default=None, help="their common base (task arithmetic, TIES, DARE)")
    p.add_argument("--align", default="auto", choices=("auto", "yes", "no"))
    p.add_argument("--alpha", type=float, default=ALPHA)
    p.add_argument("--ci", default="sandwich", choices=("sandwich", "bootstrap"))
    p.add_argument("--out", default=None, help=f"folder for {naming.ATTRIBUTION_JSON} and the figure")
    args = p.parse_args(argv)
    return exit_on_error(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    parents = [x for x in args.parents.split(",") if x]
    res = attribute(open_source(args.suspect, progress=False), {m: open_source(m, progress=False) for m in parents},
                    open_source(args.base, progress=False) if args.base else None,
                    base_name=args.base or "base", suspect_name=args.suspect, alpha=args.alpha, align=args.align,
                    ci=args.ci)
    out = Path(args.out) if args.out else naming.attribution_dir(args.suspect)
    out.mkdir(parents=True, exist_ok=True)
    (out / naming.ATTRIBUTION_JSON).write_text(json.dumps(res, indent=1))
    plots.attribution_bars(res["layers"], str(out / naming.ATTRIBUTION_PNG), title=res["summary"])
    print(res["summary"])
    for lay in res["layers"]:
        cells = ", ".join(f"{s['model']}:{s['layer']} {s['share']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] "
                          f"log10p {s['log10_pvalue']:.1f}" for s in lay["sources"]) or "-"
        print(f"  block {lay['layer']}: {cells}")
    print(f"wrote {out / naming.ATTRIBUTION_JSON}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
