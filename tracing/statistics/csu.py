"""φ_CSU: cosine similarity of MLP up-projection weights, matched by linear assignment (exact under H0).

Per layer i: the rows of the up-projection (one row per MLP neuron, `spec.neuron_rows`, so GPT-2's Conv1D
layout works; gated MLPs use up_proj as in the original code) of both models are compared by cosine
similarity, matched (`--matching`, tracing/matching.py: degenerate rows left out, ties in random order), and
the matching is tested against the identity with a one-sided Spearman correlation. The per-layer log10
p-values are combined with Fisher's method. value = log10_pvalue = the combined log10 p (lower = more related).

csu_all: the same test for every pair of 2-D weights of the same role (e.g. "mlp.up_proj.weight") in any layer
of the base and any layer of the fine-tuned model whose residual axis agrees: depth may differ, and so may
the number of units (a pruned MLP: the narrower matrix's rows are matched into the wider's). The layer map is
match_all's: Holm's correction over every (role, layer, layer) test, layer j of ft mapped to the base layer
with the smallest p when its Holm-adjusted p is below MAPPING_ALPHA; value = log10_pvalue = the smallest
Holm-adjusted log10 p. extras["log10p"] holds, for each role, the (layers_base, layers_ft) matrix of raw
log10 p (None where not comparable), extras["log10_pvalue_matrix"] the best role per layer pair.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from tqdm.auto import tqdm

from tracing import matching
from tracing.arch import RESID, ArchSpec, mlp
from tracing.errors import TracingError
from tracing.sources.base import Source
from tracing.statistics import StatContext, StatResult, register, screen
from tracing.statistics.common import (
    MAPPING_ALPHA,
    dot_and_norms,
    identity_test,
    layer_heatmap,
    layer_map,
    matching_extras,
    selected_layers,
    squared_distance,
)
from tracing.statistics.fits import require_fit, weights_differ
from tracing.statistics.pvalues import fisher_log10p, holm_log10


@torch.no_grad()
def match_rows(rows_a: torch.Tensor, rows_b: torch.Tensor, device: torch.device | None = None,
               method: str = matching.DEFAULT_METHOD, seed: matching.Seed = 0) -> dict:
    """Match rows of (n, d) and (m, d) by cosine similarity and test the matching against the identity:
    the layer's record (rho, log10_pvalue, n_units, excluded_base, excluded_ft, ...; identity_test).
    The cosine product runs on `device` (default: rows_a's)."""
    device = device or rows_a.device
    rows_a, rows_b = rows_a.to(device), rows_b.to(device)
    sim = matching.similarity(rows_a, rows_b)  # (n, m): a matrix, or a LazyCosine for bf16 rows
    record = identity_test(sim, matching.usable(rows_a), matching.usable(rows_b), method, seed)
    if rows_a.shape == rows_b.shape:  # how far B's rows moved from A's, in place (tracing.describe)
        norm_sq = dot_and_norms(rows_a, rows_a)[1]
        record["rel_change"] = (squared_distance(rows_a, rows_b) / norm_sq) ** 0.5 if norm_sq > 0 else None
    return record


def _rows(spec: ArchSpec, key: str, w: torch.Tensor, perm: str | None = None) -> torch.Tensor:
    """`w` with the axis of `perm` (or else its first non-residual axis) first: (n_units, rest)."""
    if perm is None:
        perm = next((p for p in spec.axes[key] if p != RESID), None)
        if perm is None:
            return w.movedim(next(a for a, p in enumerate(spec.axes[key]) if p != RESID), 0)
    return spec.neuron_rows(w, key, perm)


@register("csu", fits=(weights_differ,), higher_is_related=False,
          help="MLP up-projection rows: linear assignment on cosine similarity, Spearman vs identity, "
               "Fisher over layers (log10 p; exact under H0)")
@torch.no_grad()
def csu(ctx: StatContext) -> StatResult:
    src_a, src_b = ctx.source_base, ctx.source_ft
    require_fit(ctx, "csu")
    layers = selected_layers(ctx)

    def test_layer(i: int) -> dict:  # runs in a worker thread (match_rows is no_grad itself)
        key_a, key_b = ctx.spec_base.layers[i].up, ctx.spec_ft.layers[i].up
        rows_a = ctx.spec_base.neuron_rows(src_a.get(key_a), key_a, mlp(i))  # (n_neurons, hidden), read now
        rows_b = ctx.spec_ft.neuron_rows(src_b.get(key_b), key_b, mlp(i))  # (n_neurons, hidden)
        return {"layer": i, **match_rows(rows_a, rows_b, ctx.compute_device, ctx.matching, (ctx.seed, i))}

    key0 = ctx.spec_base.layers[0].up
    n = src_a.shape(key0)[ctx.spec_base.axis(key0, mlp(0))]  # MLP width
    results = matching.map_in_threads(test_layer, layers, item_bytes=3 * n * n * 8,
                                      device=ctx.compute_device or src_a.device)
    per_layer = list(tqdm(results, total=len(layers), desc="csu layers", disable=not ctx.progress))
    combined, n_nan = fisher_log10p([r["log10_pvalue"] for r in per_layer])
    return StatResult(value=float(combined), log10_pvalue=float(combined), per_layer=per_layer,
                      extras={"layers_skipped_nan": n_nan, **matching_extras(ctx.matching, per_layer)})


def _role(spec: ArchSpec, key: str) -> str:
    """What a weight does in its block: "mlp.up", "mlp.gate", "mlp.down", "attn.out" (the same in every family, so
    a Llama's up_proj meets a GPT-2's c_fc), else its key without the layer prefix (e.g. "self_attn.q_proj.weight")."""
    r = spec.layers[spec.layer_of[key]]
    named = {r.up: "mlp.up", r.gate: "mlp.gate", r.down: "mlp.down", r.attn_out: "attn.out"}
    return named.get(key) or spec.local_key(key)


def _keys_by_role(spec: ArchSpec, shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[int, str]]:
    """Role (`_role`) -> {layer: key}, 2-D weights only."""
    out: dict[str, dict[int, str]] = {}
    for key, i in spec.layer_of.items():
        if key in shapes and len(shapes[key]) == 2:
            out.setdefault(_role(spec, key), {})[i] = key
    return out


def _unit_rows(src: Source) -> tuple[dict[str, dict[int, str]], dict[tuple[str, int], tuple[int, ...]]]:
    """(role -> {layer: key}, (role, layer) -> the (n_units, rest) shape of its rows), from headers."""
    shapes = src.shapes()
    roles = _keys_by_role(src.spec, shapes)
    rows = {(r, i): _rows_shape(src.spec, k, shapes[k]) for r, keys in roles.items() for i, k in keys.items()}
    return roles, rows


def no_shared_roles(a: Source, b: Source) -> str | None:
    """csu_all's fit check: some weight matrix of A and of B with the same role and the same input width."""
    (roles_a, rows_a), (roles_b, rows_b) = _unit_rows(a), _unit_rows(b)
    shared = [r for r in roles_a if r in roles_b]

    def widths(rows: dict, role: str) -> set[tuple[int, ...]]:
        return {shape[1:] for (r, _), shape in rows.items() if r == role}

    if any(widths(rows_a, r) & widths(rows_b, r) for r in shared):
        return None
    why = "share no weight role" if not shared else "have no same-role matrices with the same hidden size"
    return f"{a.spec.model_type} and {b.spec.model_type} {why}"


def _rows_shape(spec: ArchSpec, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `_rows` gives a tensor of `shape` stored under `key`, without reading it."""
    return tuple(_rows(spec, key, torch.empty(shape, device="meta")).shape)


SCREEN_ROLES = ("mlp.up", "attn.out")  # the roles "fast" screens and tests: an MLP's and an attention block's


def _screened_jobs(ctx: StatContext, roles_a: dict, roles_b: dict, jobs: list, layers_a: list[int],
                   layers_b: list[int]) -> list[tuple[str, int, int]]:
    """The candidate (role, base layer, ft layer) pairs among `jobs`: for each screened role and ft layer, the
    base layers whose units it finds best (screen.py); every matrix is read once for the screen."""
    shared = [r for r in SCREEN_ROLES if any(job[0] == r for job in jobs)] or [jobs[0][0]]
    out = []
    for r in shared:
        pairs = {(i, j) for rr, i, j in jobs if rr == r}
        la, lb = sorted({i for i, _ in pairs}), sorted({j for _, j in pairs})
        rows_b = {j: _rows(ctx.spec_ft, roles_b[r][j], ctx.source_ft.get(roles_b[r][j])) for j in lb}
        rows_a = ((i, _rows(ctx.spec_base, roles_a[r][i], ctx.source_base.get(roles_a[r][i]))) for i in la)
        scores = screen.screen_scores(rows_a, rows_b, la, lb, ctx.compute_device)  # (L_A, L_B)
        for a, b in screen.candidates(scores):
            if (la[a], lb[b]) in pairs:
                out.append((r, la[a], lb[b]))
    return out


def _nan_as_none(m: np.ndarray) -> list[list[float | None]]:
    """A matrix as nested lists, None where no test ran (NaN)."""
    return [[None if np.isnan(v) else float(v) for v in row] for row in m]


@register("csu_all", fits=(no_shared_roles,), higher_is_related=False,
          help="csu for every pair of weight matrices of the same role in any two layers (depth and width may "
               "differ: the narrower matrix is matched into the wider), Holm-corrected layer map")
@torch.no_grad()
def csu_all(ctx: StatContext) -> StatResult:
    require_fit(ctx, "csu_all")
    # shapes of the rows (n_units, rest) of each matrix; tensors are read in the worker that compares them
    (roles_a, rows_a), (roles_b, rows_b) = _unit_rows(ctx.source_base), _unit_rows(ctx.source_ft)
    layers_a, layers_b = selected_layers(ctx), list(range(ctx.spec_ft.n_layers))
    roles = [r for r in roles_a if r in roles_b]
    # comparable: same role, same residual (column) axis; the unit (row) axis may differ
    jobs = [(r, i, j) for r in roles for i in layers_a if (r, i) in rows_a for j in layers_b if (r, j) in rows_b
            and rows_a[r, i][1:] == rows_b[r, j][1:]]
    if not jobs:  # only --layers can leave nothing to compare once the fit check holds
        raise TracingError(f"csu_all has nothing to compare in --layers {ctx.layers}: pick other layers")

    family = jobs  # every comparable (role, base layer, ft layer): the Holm family
    if ctx.matching != "exact":  # screen every pair, test the candidates (statistics/screen.py)
        jobs = _screened_jobs(ctx, roles_a, roles_b, jobs, layers_a, layers_b)
        family = [job for job in family if job[0] in {r for r, _, _ in jobs}]

    # jobs run base matrix by base matrix: keep the last few base matrices read (each is compared n_b times)
    read_a = functools.lru_cache(maxsize=matching.default_workers() + 1)(ctx.source_base.get)

    def test_pair(job: tuple[str, int, int]) -> dict:  # runs in a worker thread
        r, i, j = job
        ka, kb = roles_a[r][i], roles_b[r][j]
        return match_rows(_rows(ctx.spec_base, ka, read_a(ka)), _rows(ctx.spec_ft, kb, ctx.source_ft.get(kb)),
                          ctx.compute_device, ctx.matching, (ctx.seed, i, j, at[r]))

    per_role = np.full((len(roles), len(layers_a), len(layers_b)), np.nan)  # raw log10 p; NaN: not tested
    at = {r: k for k, r in enumerate(roles)}
    row_of = {i: a for a, i in enumerate(layers_a)}
    results = matching.map_in_threads(test_pair, sorted(jobs, key=lambda job: (at[job[0]], job[1], job[2])))
    bar = tqdm(results, total=len(jobs), desc="csu_all pairs", disable=not ctx.progress)
    for rec, (r, i, j) in zip(bar, sorted(jobs, key=lambda job: (at[job[0]], job[1], job[2]))):
        per_role[at[r], row_of[i], j] = rec["log10_pvalue"]  # the bar first: zip's last pull closes it
    screened_out = np.zeros_like(per_role, dtype=bool)  # in the family, not tested: p = 1 in Holm's count
    for r, i, j in set(family) - set(jobs):
        screened_out[at[r], row_of[i], j] = True
    tested = ~np.isnan(per_role)
    holm = np.full_like(per_role, np.nan)
    counted = np.where(screened_out, 0.0, per_role)[tested | screened_out]  # log10 p; screened out: p = 1
    holm[tested | screened_out] = holm_log10(counted)  # one family: every (role, layer, layer) pair that counts
    holm[screened_out] = np.nan
    logp, holm_pair = np.fmin.reduce(per_role, axis=0), np.fmin.reduce(holm, axis=0)  # (L_A, L_B): best role
    per_layer, mapping = layer_map(logp, holm_pair, layers_a, layers_b, "csu_all")
    for b, rec in enumerate(per_layer):
        if rec["best_layer_base"] is not None:
            rec["role"] = roles[int(np.nanargmin(per_role[:, row_of[rec["best_layer_base"]], b]))]
    best = float(np.nanmin(holm))
    extras = {"log10p": {r: _nan_as_none(per_role[at[r]]) for r in roles if tested[at[r]].any()},
              "log10_pvalue_matrix": _nan_as_none(logp), "log10_pvalue_holm_matrix": _nan_as_none(holm_pair),
              "layers_base": layers_a, "layers_ft": layers_b, "mapping": mapping, "correction": "holm",
              "alpha": MAPPING_ALPHA, "n_pairs": len(family), "n_tested": len(jobs),
              "pairs_skipped_nan": int(len(jobs) - tested.sum())}
    if (path := layer_heatmap(ctx, "csu_all", logp, layers_a, layers_b, mapping)) is not None:
        extras["heatmap"] = path
    return StatResult(value=best, log10_pvalue=best, per_layer=per_layer, extras=extras)
