"""Localized testing: φ_MATCH for every layer of A against every layer of B (depth and MLP width may differ).

One forward pass per model keeps a bounded, seeded, uniform sample of token positions (`--max_tokens`,
default 2048) of the gate_proj and up_proj outputs of every layer; every layer pair (i, j) is then
tested from that sample: B's neurons are matched into A's (rectangular linear assignment on squared
Euclidean distance, float64) once from gate and once from up activations, and the Spearman correlation
between the two index vectors gives log10 p[i, j].

Multiple testing: Holm's step-down correction over all L_A·L_B tests (family-wise error rate). Layer j
of B is mapped to the layer i of A with the smallest p[i, j] when its Holm-adjusted p is below
MAPPING_ALPHA; otherwise it is unmapped (None). The statistic's own log10 p is the smallest Holm-adjusted
value: the test of "some layer of B comes from some layer of A".
"""

from __future__ import annotations

import math
import os

import numpy as np
from tqdm.auto import tqdm

from tracing import plots
from tracing.activations import check_blocks, check_layers, sample_activations, sample_positions
from tracing.matching import euclid_similarity, map_in_threads
from tracing.naming import heatmap_name
from tracing.statistics import StatContext, StatResult, register
from tracing.statistics.common import check_gated, two_matchings_agree

DEFAULT_MAX_TOKENS = 2048
MAPPING_ALPHA = 0.05  # family-wise level of the inferred layer mapping (Holm)


def holm_log10(log10ps: np.ndarray) -> np.ndarray:
    """Holm-adjusted log10 p-values (same shape), computed in log space; NaN counts as p = 1."""
    flat = np.nan_to_num(np.asarray(log10ps, np.float64).ravel(), nan=0.0)
    m = len(flat)
    order = np.argsort(flat, kind="stable")
    adj = flat[order] + np.log10(m - np.arange(m))  # (m - k) p_(k), k = 0..m-1
    adj = np.minimum(np.maximum.accumulate(adj), 0.0)
    out = np.empty(m)
    out[order] = adj
    return out.reshape(np.shape(log10ps))


def _pair(xa: dict, xb: dict, i: int, j: int) -> tuple[float, float, float]:
    """match between layer i of A and layer j of B from sampled activations (S, width), float64."""
    a_g, a_u, b_g, b_u = xa["gate", i], xa["up", i], xb["gate", j], xb["up", j]
    if b_g.shape[1] > a_g.shape[1]:  # always match the narrower model into the wider one
        a_g, a_u, b_g, b_u = b_g, b_u, a_g, a_u
    return two_matchings_agree(euclid_similarity(a_g.T @ b_g, a_g.square().sum(0), b_g.square().sum(0)),
                               euclid_similarity(a_u.T @ b_u, a_u.square().sum(0), b_u.square().sum(0)))


@register("match_all", needs_data=True, same_shape=False, scalar=False,
          help="localized testing: match every layer of A against every layer of B, Holm-corrected layer map")
def match_all(ctx: StatContext) -> StatResult:
    check_gated(ctx, "match_all")
    blocks = check_blocks(ctx.blocks)
    layers_a = check_layers(ctx.layers, ctx.spec_base.n_layers)
    layers_b = list(range(ctx.spec_ft.n_layers))
    max_tokens = ctx.max_tokens or DEFAULT_MAX_TOKENS
    positions = sample_positions(blocks.numel(), max_tokens, ctx.seed)
    passes_a: dict = {}
    passes_b: dict = {}
    acts_a = sample_activations(ctx.base, ctx.spec_base, blocks, layers=layers_a, positions=positions,
                                batch_size=ctx.batch_size, counter=passes_a, progress=ctx.progress)
    acts_b = sample_activations(ctx.ft, ctx.spec_ft, blocks, layers=layers_b, positions=positions,
                                batch_size=ctx.batch_size, counter=passes_b, progress=ctx.progress)

    acts_a = {k: v.double() for k, v in acts_a.items()}  # (S, width) float64
    acts_b = {k: v.double() for k, v in acts_b.items()}
    logp = np.zeros((len(layers_a), len(layers_b)))
    rho = np.zeros_like(logp)
    lap_s = 0.0
    pairs = [(a, b) for a in range(len(layers_a)) for b in range(len(layers_b))]
    results = map_in_threads(lambda ab: _pair(acts_a, acts_b, layers_a[ab[0]], layers_b[ab[1]]), pairs)
    bar = tqdm(results, total=len(pairs), desc="match_all layer pairs", disable=not ctx.progress)
    for (r, lp, dt), (a, b) in zip(bar, pairs):  # the bar first: zip's last pull lets it reach 100% and close
        rho[a, b], logp[a, b] = r, lp
        lap_s += dt
    holm = holm_log10(logp)

    per_layer, mapping = [], []
    for b, j in enumerate(layers_b):
        a = int(np.nanargmin(np.nan_to_num(logp[:, b], nan=0.0)))
        hit = bool(holm[a, b] < math.log10(MAPPING_ALPHA))
        mapping.append(layers_a[a] if hit else None)
        per_layer.append({"layer_ft": j, "layer_base": layers_a[a] if hit else None,
                          "best_layer_base": layers_a[a], "log10_pvalue": float(logp[a, b]),
                          "log10_pvalue_holm": float(holm[a, b])})
    best = float(holm.min())
    extras = {"log10_pvalue_matrix": logp.tolist(), "rho_matrix": rho.tolist(),
              "log10_pvalue_holm_matrix": holm.tolist(), "layers_base": layers_a, "layers_ft": layers_b,
              "mapping": mapping, "correction": "holm", "alpha": MAPPING_ALPHA,
              "forward_passes": {"base": passes_a["forward_passes"], "ft": passes_b["forward_passes"]},
              "n_tokens_sampled": int(len(positions)), "lap_seconds": lap_s}
    if ctx.out_dir:
        name = heatmap_name(getattr(ctx.base, "name_or_path", ""), getattr(ctx.ft, "name_or_path", ""))
        os.makedirs(ctx.out_dir, exist_ok=True)
        extras["heatmap"] = plots.match_all_heatmap(logp, os.path.join(ctx.out_dir, name), layers_base=layers_a,
                                                    layers_ft=layers_b, mapping=mapping)
    return StatResult(value=best, log10_pvalue=best, per_layer=per_layer, extras=extras)
