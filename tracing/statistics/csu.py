"""φ_CSU: cosine similarity of MLP up-projection weights, matched by linear assignment (exact under H0).

Per layer i: the rows of the up-projection (one row per MLP neuron, `spec.neuron_rows`, so GPT-2's Conv1D
layout works; gated MLPs use up_proj as in the original code) of both models are compared by cosine
similarity, matched (`--matching`, tracing/matching.py: degenerate rows left out, ties in random order), and
the matching is tested against the identity with a one-sided Spearman correlation. The per-layer log10
p-values are combined with Fisher's method. value = log10_pvalue = the combined log10 p (lower = more related).
An MoE layer (tracing/units.py) gives one test per routed expert (expert e of base against expert e of ft), one on
the router's rows (the experts are its units: are they in the same order? run when a layer has >= 10 experts) and
one on the shared expert. Each is exact under H0, but they are not independent: an upcycle starts every expert (and
the shared one) as a copy of one MLP, so the experts of a layer share their neuron order, and Fisher's method over
them finds independently upcycled models related (measured: benchmarks/moe_calibration.py). A layer's tests are
therefore combined by Bonferroni (valid under any dependence), and the layers by Fisher as for dense models; each
MoE layer's record lists its tests.

csu_all: the same test for every pair of 2-D weights of the same role (e.g. "mlp.up"; tracing/units.py) in any layer
of the base and any layer of the fine-tuned model whose residual axis agrees: depth may differ, and so may
the number of units (a pruned MLP: the narrower matrix's rows are matched into the wider's). The layer map is
match_all's: Holm's correction over every (role, layer, layer) test, layer j of ft mapped to the base layer
with the smallest p when its Holm-adjusted p is below MAPPING_ALPHA; value = log10_pvalue = the smallest
Holm-adjusted log10 p. extras["log10p"] holds, for each role, the (layers_base, layers_ft) matrix of raw
log10 p (None where not comparable), extras["log10_pvalue_matrix"] the best role per layer pair.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from tracing import matching
from tracing.errors import TracingError
from tracing.sources.base import Source
from tracing.statistics import StatContext, StatResult, register, screen
from tracing.statistics.common import (
    MAPPING_ALPHA,
    identity_test,
    layer_heatmap,
    layer_map,
    matching_extras,
    relative_change,
    selected_layers,
)
from tracing.statistics.experts import expert_map, expert_summary, group_verdicts, moe_side, verdict_line
from tracing.statistics.fits import experts_differ, require_fit, weights_differ
from tracing.statistics.pvalues import bonferroni_log10p, fisher_log10p, holm_log10
from tracing.units import Matrix, block_matrices, up_matrices


@torch.no_grad()
def match_rows(rows_a: torch.Tensor, rows_b: torch.Tensor, device: torch.device | None = None,
               method: str = matching.DEFAULT_METHOD, seed: matching.Seed = 0) -> dict:
    """Match rows of (n, d) and (m, d) by cosine similarity and test the matching against the identity:
    the layer's record (rho, log10_pvalue, n_units, excluded_base, excluded_ft, ...; identity_test), and
    rel_change, ‖B - A‖ / ‖A‖, where the shapes agree and the layer's p < 0.01.
    The cosine product runs on `device` (default: rows_a's)."""
    device = device or rows_a.device
    rows_a, rows_b = rows_a.to(device), rows_b.to(device)
    sim = matching.similarity(rows_a, rows_b)  # (n, m): a matrix, or a LazyCosine for bf16 rows
    record = identity_test(sim, matching.usable(rows_a), matching.usable(rows_b), method, seed)
    if rows_a.shape == rows_b.shape and record["log10_pvalue"] < matching.SCREEN_LOG10P:
        # how far B's rows moved from A's, in place (tracing.describe); not between unrelated rows (p >= 0.01)
        record["rel_change"] = relative_change(rows_a, rows_b)
    return record



@register("csu", fits=(experts_differ, weights_differ),
          help="MLP up-projection rows (each expert's and the router's in MoE layers): linear assignment on cosine "
               "similarity, Spearman vs identity, Fisher over layers (Bonferroni over an MoE layer's experts; "
               "log10 p; exact under H0)")
@torch.no_grad()
def csu(ctx: StatContext) -> StatResult:
    src_a, src_b = ctx.source_base, ctx.source_ft
    require_fit(ctx, "csu")
    layers = selected_layers(ctx)
    # (layer, base matrix, ft matrix): the dense MLP's (or shared expert's) up rows, each expert's, the router's
    jobs = [(i, ma, mb) for i in layers for ma, mb in zip(up_matrices(ctx.spec_base, i), up_matrices(ctx.spec_ft, i))
            if ma.kind != "router" or ctx.spec_base.layers[i].moe.n_experts >= matching.MIN_UNITS]

    def read(job: tuple[int, Matrix, Matrix]) -> tuple[int, Matrix, torch.Tensor, torch.Tensor]:  # reading thread
        i, ma, mb = job
        return i, ma, ma.read(src_a), mb.read(src_b)

    def test(item: tuple[int, Matrix, torch.Tensor, torch.Tensor]) -> dict:  # worker thread (match_rows: no_grad)
        i, ma, rows_a, rows_b = item
        seed = (ctx.seed, i) if ma.kind in ("mlp", "shared") else (ctx.seed, i, 1 + (ma.expert or 0)) \
            if ma.kind == "expert" else (ctx.seed, i, 0)
        return match_rows(rows_a, rows_b, ctx.compute_device, ctx.matching, seed)

    n = max(ma.rows_shape(ctx.spec_base, src_a.shapes())[0] for _, ma, _ in jobs)  # the widest matrix's units
    results = matching.map_in_threads(test, matching.read_ahead(read, jobs), item_bytes=3 * n * n * 8,
                                      device=ctx.compute_device or src_a.device)
    tests = list(tqdm(results, total=len(jobs), desc="csu matrices", disable=not ctx.progress))
    per_layer = [_layer_record(i, [(ma, r) for (j, ma, _), r in zip(jobs, tests) if j == i]) for i in layers]
    combined, _ = fisher_log10p([r["log10_pvalue"] for r in per_layer])
    extras = {"layers_skipped_nan": sum(math.isnan(r["log10_pvalue"]) for r in per_layer),
              **matching_extras(ctx.matching, tests)}
    if ctx.spec_base.is_moe:  # a layer's tests by Bonferroni, layers by Fisher
        routers = sum(ma.kind == "router" for _, ma, _ in jobs)
        extras.update(n_tests=len(tests), tests_skipped_nan=sum(math.isnan(r["log10_pvalue"]) for r in tests),
                      layer_combination="bonferroni", router_tests=routers or
                      f"none: fewer than {matching.MIN_UNITS} experts per layer (the router's rows are its units)")
    return StatResult(value=float(combined), log10_pvalue=float(combined), per_layer=per_layer, extras=extras)


def _layer_record(i: int, tests: list[tuple[Matrix, dict]]) -> dict:
    """A dense layer's record is its one test's; an MoE layer's holds its tests (each expert, the router, the shared
    expert) and their Bonferroni combination (dependent tests: module docstring)."""
    if len(tests) == 1 and tests[0][0].kind == "mlp":
        return {"layer": i, **tests[0][1]}
    rec: dict = {"layer": i, "log10_pvalue": bonferroni_log10p([r["log10_pvalue"] for _, r in tests]),
                 "n_tests": len(tests),
                 "experts": [{"expert": m.expert, **r} for m, r in tests if m.kind == "expert"]}
    rec.update({m.kind: r for m, r in tests if m.kind in ("router", "shared")})
    moved = [r["rel_change"] for m, r in tests if m.kind != "router" and r.get("rel_change") is not None]
    rec["rel_change"] = sum(moved) / len(moved) if moved else None  # the experts' mean (tracing.describe)
    return rec


def _nan_as_none(m: np.ndarray) -> list[list[float | None]]:
    """A matrix as nested lists, None where no test ran (NaN)."""
    return [[None if np.isnan(v) else float(v) for v in row] for row in m]


def _seed(seed: int, ma: Matrix, mb: Matrix, role: int) -> tuple[int, ...]:
    """The tie-breaking seed of one csu_all test (dense pairs: the seed they always had)."""
    units = tuple(1 + m.expert if m.kind == "expert" else 0 for m in (ma, mb))
    return (seed, ma.layer, mb.layer, role) + (units if any(units) else ())


def _comparable(a: Source, b: Source, layers_a: list[int] | None = None) -> tuple[list, list, dict, dict, list]:
    """(A's matrices, B's, their row shapes, the roles both have) from headers (A's only in `layers_a`)."""
    mats_a = [m for m in block_matrices(a.spec, a.shapes()) if layers_a is None or m.layer in layers_a]
    mats_b = block_matrices(b.spec, b.shapes())
    rows_a = {m: m.rows_shape(a.spec, a.shapes()) for m in mats_a}
    rows_b = {m: m.rows_shape(b.spec, b.shapes()) for m in mats_b}
    roles = list(dict.fromkeys(m.role for m in mats_a if any(m.role == n.role for n in mats_b)))
    return mats_a, mats_b, rows_a, rows_b, roles


def no_shared_roles(a: Source, b: Source) -> str | None:
    """csu_all's fit check: some weight matrix of A and of B with the same role and the same input width."""
    _, _, rows_a, rows_b, roles = _comparable(a, b)
    if any(ra[1:] == rb[1:] for ma, ra in rows_a.items() if ma.role in roles
           for mb, rb in rows_b.items() if mb.role == ma.role):
        return None
    why = "share no weight role" if not roles else "have no same-role matrices with the same hidden size"
    return f"{a.spec.model_type} and {b.spec.model_type} {why}"


SCREEN_ROLES = ("mlp.up", "attn.out")  # the roles "fast" screens and tests: an MLP's (or expert's), an attention's


def _screened_jobs(ctx: StatContext, jobs: list[tuple[Matrix, Matrix]]) -> tuple[list, list]:
    """The candidate pairs among `jobs`, (best, runner-up): for each screened role and ft matrix (a layer's, or one
    expert's), the base matrix whose units it finds best, then the second best (screen.py); when only base is an
    MoE, for each of its matrices (each expert) the ft matrices it is found best in (all among the best, so that
    every expert gets its candidates). Every matrix is read once for the screen, and only the few screened rows of
    each ft matrix are kept. (The screen is blind to unit order on both sides, so picking by row or by column keeps
    the tested p-values exact: screen.py.)"""
    per_base = moe_side(ctx.spec_base, ctx.spec_ft) == "base"
    shared = [r for r in SCREEN_ROLES if any(ma.role == r for ma, _ in jobs)] or [jobs[0][0].role]
    best, runner_up = [], []
    for r in shared:
        pairs = {(ma, mb) for ma, mb in jobs if ma.role == r}
        la = list(dict.fromkeys(ma for ma, _ in jobs if ma.role == r))
        lb = list(dict.fromkeys(mb for ma, mb in jobs if ma.role == r))
        rows_b = {mb: screen.screened_rows(mb.read(ctx.source_ft)) for mb in lb}  # (<= SCREEN_ROWS, d) each
        rows_a = ((ma, ma.read(ctx.source_base)) for ma in la)
        scores = screen.screen_scores(rows_a, rows_b, la, lb, ctx.compute_device)  # (len(la), len(lb))
        if per_base:
            top = {(a, b) for b, a in screen.candidates(scores.T)}
            best += [(la[a], lb[b]) for a, b in top if (la[a], lb[b]) in pairs]
            continue
        first = screen.candidates(scores, 1)
        best += [(la[a], lb[b]) for a, b in first if (la[a], lb[b]) in pairs]
        runner_up += [(la[a], lb[b]) for a, b in screen.candidates(scores) - first if (la[a], lb[b]) in pairs]
    return best, runner_up


@register("csu_all", fits=(no_shared_roles,),
          help="csu for every pair of weight matrices of the same role in any two layers (depth and width may "
               "differ: the narrower matrix is matched into the wider; every expert of an MoE against every MLP or "
               "expert of the other model), Holm-corrected layer and expert map")
@torch.no_grad()
def csu_all(ctx: StatContext) -> StatResult:
    require_fit(ctx, "csu_all")
    layers_a, layers_b = selected_layers(ctx), list(range(ctx.spec_ft.n_layers))
    # matrices and the shapes of their rows (n_units, rest); tensors are read in the worker that compares them
    mats_a, mats_b, rows_a, rows_b, roles = _comparable(ctx.source_base, ctx.source_ft, layers_a)
    at = {r: k for k, r in enumerate(roles)}
    # comparable: same role, same residual (column) axis; the unit (row) axis may differ
    jobs = [(ma, mb) for r in roles for ma in mats_a if ma.role == r for mb in mats_b
            if mb.role == r and rows_a[ma][1:] == rows_b[mb][1:]]
    if not jobs:  # only --layers can leave nothing to compare once the fit check holds
        raise TracingError(f"csu_all has nothing to compare in --layers {ctx.layers}: pick other layers")

    family, runner_up = jobs, []  # family: every comparable pair of matrices, the Holm family
    if ctx.matching != "exact":  # screen every pair, test the candidates (statistics/screen.py)
        jobs, runner_up = _screened_jobs(ctx, jobs)
        family = [job for job in family if job[0].role in {ma.role for ma, _ in jobs}]
    pos_a, pos_b = {m: k for k, m in enumerate(mats_a)}, {m: k for k, m in enumerate(mats_b)}

    def order(js: list) -> list:
        return sorted(js, key=lambda job: (at[job[0].role], pos_a[job[0]], pos_b[job[1]]))

    # jobs run base matrix by base matrix: keep the last few base matrices read (each is compared n_b times)
    read_a = functools.lru_cache(maxsize=matching.default_workers() + 1)(lambda m: m.read(ctx.source_base))

    def test_pair(job: tuple[Matrix, Matrix]) -> dict:  # runs in a worker thread
        ma, mb = job
        return match_rows(read_a(ma), mb.read(ctx.source_ft), ctx.compute_device, ctx.matching,
                          _seed(ctx.seed, ma, mb, at[ma.role]))

    def run(js: list) -> list[dict]:
        bar = tqdm(matching.map_in_threads(test_pair, js), total=len(js), desc="csu_all pairs",
                   disable=not ctx.progress or not js)
        return list(bar)  # the bar first: its last pull lets it reach 100% and close

    jobs = order(jobs)
    recs = run(jobs)
    settled = {mb for (_, mb), rec in zip(jobs, recs) if rec["log10_pvalue"] <= screen.DECISIVE_LOG10P}
    runner_up = order([job for job in runner_up if job[1] not in settled])  # screen.py: the level holds
    jobs, recs = jobs + runner_up, recs + run(runner_up)
    raw = np.array([rec["log10_pvalue"] for rec in recs])
    tested = ~np.isnan(raw)
    holm = np.full_like(raw, np.nan)
    # one family: every comparable pair that gave a p, and those screened out counted as p = 1
    holm[tested] = holm_log10(np.concatenate([raw[tested], np.zeros(len(family) - len(jobs))]))[:tested.sum()]
    per_role = np.full((len(roles), len(layers_a), len(layers_b)), np.nan)  # raw log10 p, best unit pair; NaN: none
    holm_role = np.full_like(per_role, np.nan)
    row_of = {i: a for a, i in enumerate(layers_a)}
    for (ma, mb), p, h in zip(jobs, raw, holm):
        cell = (at[ma.role], row_of[ma.layer], mb.layer)
        per_role[cell], holm_role[cell] = np.fmin(per_role[cell], p), np.fmin(holm_role[cell], h)
    logp, holm_pair = np.fmin.reduce(per_role, axis=0), np.fmin.reduce(holm_role, axis=0)  # (L_A, L_B): best role
    per_layer, mapping = layer_map(logp, holm_pair, layers_a, layers_b, "csu_all")
    for b, rec in enumerate(per_layer):
        if rec["best_layer_base"] is not None:
            rec["role"] = roles[int(np.nanargmin(per_role[:, row_of[rec["best_layer_base"]], b]))]
    best = float(np.nanmin(holm))
    extras = {"log10p": {r: _nan_as_none(per_role[at[r]]) for r in roles if not np.isnan(per_role[at[r]]).all()},
              "log10_pvalue_matrix": _nan_as_none(logp), "log10_pvalue_holm_matrix": _nan_as_none(holm_pair),
              "layers_base": layers_a, "layers_ft": layers_b, "mapping": mapping, "correction": "holm",
              "alpha": MAPPING_ALPHA, "n_pairs": len(family), "n_tested": len(jobs),
              "pairs_skipped_nan": int(len(jobs) - tested.sum())}
    tests = [(ma, mb, float(p), float(h), rec["matched_cos"]) for (ma, mb), p, h, rec in zip(jobs, raw, holm, recs)]
    side = moe_side(ctx.spec_base, ctx.spec_ft)
    extras["groups"] = group_verdicts(tests, side)
    experts = expert_map(tests, side) if side else []
    if side:  # which expert came from where, and which look independently initialised
        extras.update(moe_side=side, experts=experts, expert_summary=expert_summary(experts))
    extras["verdict"] = verdict_line(extras["groups"], experts)
    if (path := layer_heatmap(ctx, "csu_all", logp, layers_a, layers_b, mapping)) is not None:
        extras["heatmap"] = path
    return StatResult(value=best, log10_pvalue=best, per_layer=per_layer, extras=extras)
