"""φ_CSU: cosine similarity of MLP up-projection weights, matched by linear assignment (exact under H0).

Per layer i: the rows of the up-projection (one row per MLP neuron, `spec.neuron_rows`, so GPT-2's Conv1D
layout works; gated MLPs use up_proj as in the original code) of both models are compared by cosine
similarity, matched (`--matching`, tracing/matching.py: degenerate rows left out, ties in random order), and
the matching is tested against the identity with a one-sided Spearman correlation. The per-layer log10
p-values are combined with Fisher's method. value = log10_pvalue = the combined log10 p (lower = more related).

csu_all: the same test for every pair of equal-shaped 2-D weights of the same role in any layer of the base
and any layer of the fine-tuned model (different depths allowed), as in the original; extras["log10p"]
holds, for each role, the (layers_base, layers_ft) matrix of log10 p (None where shapes differ).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from tracing import matching
from tracing.arch import RESID, ArchSpec, mlp
from tracing.statistics import StatContext, StatResult, register
from tracing.statistics.common import check_same_shapes, identity_test, matching_extras, selected_layers
from tracing.statistics.pvalues import fisher_log10p


@torch.no_grad()
def match_rows(rows_a: torch.Tensor, rows_b: torch.Tensor, device: torch.device | None = None,
               method: str = matching.DEFAULT_METHOD, seed: matching.Seed = 0) -> dict:
    """Match rows of (n, d) and (m, d) by cosine similarity and test the matching against the identity:
    the layer's record (rho, log10_pvalue, n_units, excluded_base, excluded_ft, ...; identity_test).
    The cosine product runs on `device` (default: rows_a's)."""
    device = device or rows_a.device
    rows_a, rows_b = rows_a.to(device), rows_b.to(device)
    sim = matching.cosine_matrix(rows_a, rows_b)  # (n, m)
    return identity_test(sim, matching.usable(rows_a), matching.usable(rows_b), method, seed)


def _rows(spec: ArchSpec, key: str, w: torch.Tensor, perm: str | None = None) -> torch.Tensor:
    """`w` with the axis of `perm` (or else its first non-residual axis) first: (n_units, rest)."""
    if perm is None:
        perm = next((p for p in spec.axes[key] if p != RESID), None)
        if perm is None:
            return w.movedim(next(a for a, p in enumerate(spec.axes[key]) if p != RESID), 0)
    return spec.neuron_rows(w, key, perm)


@register("csu", higher_is_related=False,
          help="MLP up-projection rows: linear assignment on cosine similarity, Spearman vs identity, "
               "Fisher over layers (log10 p; exact under H0)")
@torch.no_grad()
def csu(ctx: StatContext) -> StatResult:
    sd_a, sd_b = ctx.base.state_dict(), ctx.ft.state_dict()  # views, no copies
    check_same_shapes(ctx.spec_base, sd_a, ctx.spec_ft, sd_b, "csu")
    layers = selected_layers(ctx)

    def test_layer(i: int) -> dict:  # runs in a worker thread (match_rows is no_grad itself)
        key_a, key_b = ctx.spec_base.layers[i].up, ctx.spec_ft.layers[i].up
        rows_a = ctx.spec_base.neuron_rows(sd_a[key_a], key_a, mlp(i))  # (n_neurons, hidden)
        rows_b = ctx.spec_ft.neuron_rows(sd_b[key_b], key_b, mlp(i))  # (n_neurons, hidden)
        return {"layer": i, **match_rows(rows_a, rows_b, ctx.compute_device, ctx.matching, (ctx.seed, i))}

    key0 = ctx.spec_base.layers[0].up
    n = ctx.spec_base.neuron_rows(sd_a[key0], key0, mlp(0)).shape[0]  # MLP width
    results = matching.map_in_threads(test_layer, layers, item_bytes=3 * n * n * 8,
                                      device=ctx.compute_device or sd_a[key0].device)
    per_layer = list(tqdm(results, total=len(layers), desc="csu layers", disable=not ctx.progress))
    combined, n_nan = fisher_log10p([r["log10_pvalue"] for r in per_layer])
    return StatResult(value=float(combined), log10_pvalue=float(combined), per_layer=per_layer,
                      extras={"layers_skipped_nan": n_nan, **matching_extras(ctx.matching, per_layer)})


def _keys_by_role(spec: ArchSpec, sd: dict[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """Role (key without its layer prefix, e.g. "mlp.up_proj.weight") -> {layer: key}, 2-D weights only."""
    out: dict[str, dict[int, str]] = {}
    for key, i in spec.layer_of.items():
        if key in sd and sd[key].dim() == 2:
            out.setdefault(spec.local_key(key), {})[i] = key
    return out


@register("csu_all", same_shape=False, higher_is_related=False,
          help="csu over every pair of equal-shaped weight matrices of the same role in any two layers "
               "(different depths allowed); Fisher over all pairs")
@torch.no_grad()
def csu_all(ctx: StatContext) -> StatResult:
    sd_a, sd_b = ctx.base.state_dict(), ctx.ft.state_dict()
    roles_a, roles_b = _keys_by_role(ctx.spec_base, sd_a), _keys_by_role(ctx.spec_ft, sd_b)
    layers_a = selected_layers(ctx)
    n_b = ctx.spec_ft.n_layers
    jobs = [(role, i, j) for role in roles_a if role in roles_b for i in layers_a if i in roles_a[role]
            for j in range(n_b) if j in roles_b[role]
            and sd_a[roles_a[role][i]].shape == sd_b[roles_b[role][j]].shape]
    matrices = {role: [[None] * n_b for _ in layers_a] for role in {r for r, _, _ in jobs}}
    row_of = {i: r for r, i in enumerate(layers_a)}
    best = {i: (0.0, None, None) for i in layers_a}  # layer -> (min log10 p, ft layer, role)

    def test_pair(job: tuple[str, int, int]) -> dict:  # runs in a worker thread
        role, i, j = job
        ka, kb = roles_a[role][i], roles_b[role][j]
        return match_rows(_rows(ctx.spec_base, ka, sd_a[ka]), _rows(ctx.spec_ft, kb, sd_b[kb]), ctx.compute_device,
                          ctx.matching, (ctx.seed, i, j, sorted(roles_a).index(role)))

    records = list(tqdm(matching.map_in_threads(test_pair, jobs), total=len(jobs), desc="csu_all pairs",
                        disable=not ctx.progress))
    for (role, i, j), lp in zip(jobs, (r["log10_pvalue"] for r in records)):
        matrices[role][row_of[i]][j] = None if math.isnan(lp) else float(lp)
        if not math.isnan(lp) and lp < best[i][0]:
            best[i] = (float(lp), j, role)
    combined, n_nan = fisher_log10p([v for m in matrices.values() for row in m for v in row if v is not None])
    per_layer = [{"layer": i, "best_ft_layer": j, "role": role, "log10_pvalue": lp}
                 for i, (lp, j, role) in best.items()]
    return StatResult(value=float(combined), log10_pvalue=float(combined), per_layer=per_layer,
                      extras={"log10p": matrices, "layers_base": layers_a, "n_pairs": len(jobs),
                              "pairs_skipped_nan": n_nan, **matching_extras(ctx.matching, records)})
