"""Localized testing: φ_MATCH for every layer of A against every layer of B (depth and MLP width may differ).

One forward pass per model keeps a bounded, seeded, uniform sample of token positions (`--max_tokens`,
default 2048) of the gate_proj and up_proj outputs of every layer; every layer pair (i, j) is then
tested from that sample: the narrower layer's neurons are matched into the wider's once from gate and once
from up activations (as in match: `--matching`, exact = rectangular assignment on squared Euclidean
distance, float64; units constant or non-finite over the sample left out), and the Spearman correlation
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
import torch
from tqdm.auto import tqdm

from tracing import plots
from tracing.activations import check_blocks, check_layers, sample_activations, sample_positions
from tracing.matching import euclid_similarity, map_in_threads, usable
from tracing.naming import heatmap_name
from tracing.statistics import StatContext, StatResult, register
from tracing.statistics.common import agreement_test, check_gated, matching_extras

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


class _Layer:
    """Sampled activations of one layer (S, width) float32, their squared norms (float64) and usable units."""

    def __init__(self, acts: dict, layer: int, device: torch.device):
        self.x = {p: acts[p, layer].to(device) for p in ("gate", "up")}  # products and screen run there
        self.sq = {p: x.double().square().sum(0) for p, x in self.x.items()}  # (width,)
        self.ok = usable(self.x["gate"].T) & usable(self.x["up"].T)  # (width,)


def _pair(a: _Layer, b: _Layer, method: str, seed: tuple) -> dict:
    """match between a layer of A and a layer of B from their sampled activations: agreement_test's record."""
    if b.ok.numel() < a.ok.numel():  # the narrower layer's units as rows: the faster orientation to match
        a, b = b, a
    dtype = torch.float64 if method == "exact" else torch.float32  # exact: the original's float64 products
    gram = {p: a.x[p].T.to(dtype) @ b.x[p].to(dtype) for p in ("gate", "up")}  # (width_a, width_b)

    def similarities(solver: str) -> tuple[torch.Tensor, torch.Tensor]:
        if solver == "greedy":  # cosines
            return tuple(gram[p] / a.sq[p].sqrt().clamp_min(1e-30).to(dtype)[:, None]
                         / b.sq[p].sqrt().clamp_min(1e-30).to(dtype)[None, :] for p in ("gate", "up"))
        return tuple(euclid_similarity(gram[p], a.sq[p], b.sq[p]) for p in ("gate", "up"))

    return agreement_test(similarities, a.ok, b.ok, method, seed)


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

    dev = ctx.compute_device or next(ctx.base.parameters()).device
    la, lb = [_Layer(acts_a, i, dev) for i in layers_a], [_Layer(acts_b, j, dev) for j in layers_b]
    logp = np.zeros((len(layers_a), len(layers_b)))
    rho = np.zeros_like(logp)
    pairs = [(a, b) for a in range(len(layers_a)) for b in range(len(layers_b))]
    wa, wb = la[0].x["up"].shape[1], lb[0].x["up"].shape[1]
    results = map_in_threads(lambda ab: _pair(la[ab[0]], lb[ab[1]], ctx.matching, (ctx.seed, *ab)), pairs,
                             item_bytes=6 * wa * wb * 8, device=dev)
    records = []
    for (a, b), rec in zip(pairs, tqdm(results, total=len(pairs), desc="match_all layer pairs",
                                       disable=not ctx.progress)):
        rho[a, b], logp[a, b] = rec["rho"], rec["log10_pvalue"]
        records.append(rec)
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
              "n_tokens_sampled": int(len(positions)), **matching_extras(ctx.matching, records)}
    if ctx.out_dir:
        name = heatmap_name(getattr(ctx.base, "name_or_path", ""), getattr(ctx.ft, "name_or_path", ""))
        os.makedirs(ctx.out_dir, exist_ok=True)
        extras["heatmap"] = plots.match_all_heatmap(logp, os.path.join(ctx.out_dir, name), layers_base=layers_a,
                                                    layers_ft=layers_b, mapping=mapping)
    return StatResult(value=best, log10_pvalue=best, per_layer=per_layer, extras=extras)
