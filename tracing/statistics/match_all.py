"""Localized testing: φ_MATCH for every layer of A against every layer of B (depth and MLP width may differ).

match_all: one forward pass per model keeps a bounded, seeded, uniform sample of token positions
(`--max_tokens`, default 2048) of the gate_proj and up_proj outputs of every layer; every layer pair (i, j)
is then tested from that sample: the narrower layer's neurons are matched into the wider's once from gate
and once from up activations (as in match: `--matching`, exact = rectangular assignment on squared
Euclidean distance, float64; units constant or non-finite over the sample left out), and the Spearman
correlation between the two index vectors gives log10 p[i, j].

match_all_drift_free (alias match_all_df): the same test with B's activations computed from A's inputs:
layer j of B reads the MLP input of layer i of A, so no forward pass of B is needed and nothing drifts
when B lost layers (each of B's layers in its own forward pass sees a residual stream that removed or
changed layers before it have moved). Needs equal hidden sizes and B's residual stream in A's basis (a
residual-permuted B needs --align; a rotated B is not supported). It uses every token: one pass of A
streams Σ_i = X_iᵀX_i per layer (X_i: the MLP inputs with a column of ones), and any two linear maps
W'_1, W'_2 of them have Gram matrix W'_1 Σ_i W'_2ᵀ, so the matching costs come from weights and Σ_i alone.

Multiple testing: Holm's step-down correction over all L_A·L_B tests (family-wise error rate). Layer j
of B is mapped to the layer i of A with the smallest p[i, j] when its Holm-adjusted p is below
MAPPING_ALPHA; otherwise it is unmapped (None). The statistic's own log10 p is the smallest Holm-adjusted
value: the test of "some layer of B comes from some layer of A".
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from tracing.activations import check_blocks, check_layers, mlp_input_covariances, sample_activations, sample_positions
from tracing.arch import ArchSpec, mlp
from tracing.matching import euclid_similarity, map_in_threads, usable
from tracing.statistics import StatContext, StatResult, register, screen
from tracing.statistics.common import MAPPING_ALPHA, agreement_test, layer_heatmap, layer_map, matching_extras
from tracing.statistics.fits import hidden_differs, require_fit, ungated, vocab_disagrees
from tracing.statistics.pvalues import holm_log10

DEFAULT_MAX_TOKENS = 2048


class _Layer:
    """Sampled activations of one layer (S, width) float32, their squared norms (float64) and usable units."""

    def __init__(self, acts: dict, layer: int, device: torch.device):
        self.x = {p: acts[p, layer].to(device) for p in ("gate", "up")}  # products and screen run there
        self.sq = {p: x.double().square().sum(0) for p, x in self.x.items()}  # (width,)
        self.ok = usable(self.x["gate"].T) & usable(self.x["up"].T)  # (width,)


def _agreement(gram: dict, sq_a: dict, sq_b: dict, ok_a, ok_b, method: str, seed: tuple) -> dict:
    """agreement_test on a layer pair from its Gram matrices (width_a, width_b) and squared activation norms
    per projection: cosines for the greedy screen, -squared distances for the exact matching."""
    def similarities(solver: str) -> tuple[torch.Tensor, torch.Tensor]:
        if solver == "greedy":
            return tuple(gram[p] / sq_a[p].sqrt().clamp_min(1e-30).to(gram[p].dtype)[:, None]
                         / sq_b[p].sqrt().clamp_min(1e-30).to(gram[p].dtype)[None, :] for p in ("gate", "up"))
        return tuple(euclid_similarity(gram[p], sq_a[p], sq_b[p]) for p in ("gate", "up"))

    return agreement_test(similarities, ok_a, ok_b, method, seed)


def _pair(a: _Layer, b: _Layer, method: str, seed: tuple) -> dict:
    """match between a layer of A and a layer of B from their sampled activations: agreement_test's record."""
    if b.ok.numel() < a.ok.numel():  # the narrower layer's units as rows: the faster orientation to match
        a, b = b, a
    dtype = torch.float64 if method == "exact" else torch.float32  # exact: the original's float64 products
    gram = {p: a.x[p].T.to(dtype) @ b.x[p].to(dtype) for p in ("gate", "up")}  # (width_a, width_b)
    return _agreement(gram, a.sq, b.sq, a.ok, b.ok, method, seed)


def _all_pairs(ctx: StatContext, stat: str, row_test, layers_a: list[int], layers_b: list[int],
               item_bytes: int, device: torch.device, tested: set[tuple[int, int]] | None = None) -> dict:
    """row_test(i) -> test(j) -> agreement_test's record: one base layer i at a time (what it prepares is
    held for one row only), its pairs with every ft layer (or the `tested` (row, column) positions only) in
    worker threads; then the Holm map over every pair, a pair not tested counting as p = 1."""
    logp = np.full((len(layers_a), len(layers_b)), np.nan)  # NaN: not tested, or no usable units
    rho = np.full_like(logp, np.nan)
    records = []
    for a, i in enumerate(tqdm(layers_a, desc=f"{stat} base layers", disable=not ctx.progress)):
        cols = [b for b in range(len(layers_b)) if tested is None or (a, b) in tested]
        tests = map_in_threads(row_test(i), [layers_b[b] for b in cols], item_bytes=item_bytes, device=device)
        for b, rec in zip(cols, tests):
            rho[a, b], logp[a, b] = rec["rho"], rec["log10_pvalue"]
            records.append(rec)
    holm = holm_log10(logp)  # NaN counts as p = 1: an untested pair stays in the family
    per_layer, mapping = layer_map(logp, holm, layers_a, layers_b, stat)
    extras = {"log10_pvalue_matrix": logp.tolist(), "rho_matrix": rho.tolist(),
              "log10_pvalue_holm_matrix": holm.tolist(), "layers_base": layers_a, "layers_ft": layers_b,
              "mapping": mapping, "correction": "holm", "alpha": MAPPING_ALPHA, "n_pairs": int(logp.size),
              "n_tested": len(records),
              **matching_extras(ctx.matching, records)}
    if (path := layer_heatmap(ctx, stat, logp, layers_a, layers_b, mapping)) is not None:
        extras["heatmap"] = path
    return {"per_layer": per_layer, "extras": extras, "best": float(holm.min())}


@register("match_all", needs_data=True, fits=(ungated, vocab_disagrees), scalar=False,
          help="localized testing: match every layer of A against every layer of B, Holm-corrected layer map")
def match_all(ctx: StatContext) -> StatResult:
    require_fit(ctx, "match_all")
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
    la, lb = {i: _Layer(acts_a, i, dev) for i in layers_a}, {j: _Layer(acts_b, j, dev) for j in layers_b}
    wa, wb = la[layers_a[0]].ok.numel(), lb[0].ok.numel()
    tested = None  # "exact": every pair; "fast": the pairs whose up activations find each other (screen.py)
    if ctx.matching != "exact":
        scores = screen.screen_scores(((i, la[i].x["up"].T) for i in layers_a), {j: lb[j].x["up"].T for j in layers_b},
                                      layers_a, layers_b, dev)  # units' activation vectors over the sampled tokens
        tested = screen.candidates(scores)
    out = _all_pairs(ctx, "match_all", lambda i: lambda j: _pair(la[i], lb[j], ctx.matching, (ctx.seed, i, j)),
                     layers_a, layers_b, item_bytes=6 * wa * wb * 8, device=dev, tested=tested)
    out["extras"].update(forward_passes={"base": passes_a["forward_passes"], "ft": passes_b["forward_passes"]},
                         n_tokens_sampled=int(len(positions)))
    return StatResult(value=out["best"], log10_pvalue=out["best"], per_layer=out["per_layer"], extras=out["extras"])


def _rows_with_bias(model: torch.nn.Module, spec: ArchSpec, layer: int, proj: str,
                    device: torch.device) -> torch.Tensor:
    """[W | b] of layer's gate or up projection: (width, hidden + 1) float32 on `device` (b = 0 without bias)."""
    roles = spec.layers[layer]
    key, module = (roles.gate, roles.gate_module) if proj == "gate" else (roles.up, roles.up_module)
    w = spec.neuron_rows(model.get_parameter(key), key, mlp(layer)).detach()  # (width, hidden)
    bias = getattr(model.get_submodule(module), "bias", None)
    b = torch.zeros(len(w)) if bias is None else bias.detach()
    return torch.cat([w.to(device, torch.float32), b.to(device, torch.float32)[:, None]], dim=1)


@register("match_all_drift_free", aliases=("match_all_df",), needs_data=True, fits=(ungated, hidden_differs),
          scalar=False,
          help="match_all on A's MLP inputs: layer j of B reads A's layer-i inputs (no forward pass of B, no "
               "depth drift); same hidden size and residual basis")
@torch.no_grad()
def match_all_drift_free(ctx: StatContext) -> StatResult:
    stat = "match_all_drift_free"
    require_fit(ctx, stat)
    blocks = check_blocks(ctx.blocks)
    layers_a = check_layers(ctx.layers, ctx.spec_base.n_layers)
    layers_b = list(range(ctx.spec_ft.n_layers))
    counter: dict = {}
    cov = mlp_input_covariances(ctx.base, ctx.spec_base, blocks, layers=layers_a, batch_size=ctx.batch_size,
                                counter=counter, progress=ctx.progress)  # layer -> (hidden + 1, hidden + 1)
    dev = ctx.compute_device or next(ctx.base.parameters()).device  # products in float32 there

    def row(i: int):
        cov_i = cov[i].to(dev, torch.float32)  # Σ_i (hidden + 1, hidden + 1)
        a_side = {}  # proj -> (W'_A Σ_i (width_A, hidden + 1), squared activation norms (width_A,))
        ok_a = torch.ones(1, dtype=torch.bool, device=dev)
        for p in ("gate", "up"):
            w = _rows_with_bias(ctx.base, ctx.spec_base, i, p, dev)
            m = w @ cov_i
            a_side[p] = (m, (m * w).sum(1))
            ok_a = ok_a & usable(w[:, :-1])  # a unit without input weights is constant over the tokens

        def test(j: int) -> dict:
            gram, sq_b, ok_b = {}, {}, torch.ones(1, dtype=torch.bool, device=dev)
            for p in ("gate", "up"):
                w = _rows_with_bias(ctx.ft, ctx.spec_ft, j, p, dev)  # (width_B, hidden + 1)
                gram[p], sq_b[p] = a_side[p][0] @ w.T, ((w @ cov_i) * w).sum(1)  # (width_A, width_B), (width_B,)
                ok_b = ok_b & usable(w[:, :-1])
            return _agreement(gram, {p: a_side[p][1] for p in a_side}, sq_b, ok_a, ok_b, ctx.matching, (ctx.seed, i, j))
        return test

    widths = [m.get_parameter(s.layers[0].up).shape[s.axis(s.layers[0].up, mlp(0))]
              for m, s in ((ctx.base, ctx.spec_base), (ctx.ft, ctx.spec_ft))]
    out = _all_pairs(ctx, stat, row, layers_a, layers_b, item_bytes=6 * widths[0] * widths[1] * 8, device=dev)
    out["extras"].update(forward_passes={"base": counter["forward_passes"], "ft": 0},
                         n_tokens=counter["n_tokens"])
    return StatResult(value=out["best"], log10_pvalue=out["best"], per_layer=out["per_layer"], extras=out["extras"])
