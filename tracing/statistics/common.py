"""Helpers every statistic may use, so that no statistic imports another.

    check_same_shapes(spec_base, base.state_dict(), spec_ft, ft.state_dict(), "csu")
    layers = selected_layers(ctx)                        # --layers, validated against the base model
    for key, w_base, w_ft in paired_weights(ctx): ...    # every corresponding weight once
    layer = identity_test(sim, ok_a, ok_b, ctx.matching, seed=(ctx.seed, i))   # the core of csu / csh / csu_all
    layer = agreement_test(similarities, ok_a, ok_b, ctx.matching, seed)         # the core of match / match_all
    per_layer, mapping = layer_map(logp, holm_log10(logp), layers_a, layers_b, "match_all")  # localized testing

Derived models often add tokens to the vocabulary, so by default the vocabulary axis of the embedding and
the LM head may differ (weight statistics compare the shared rows); statistics registered with
`same_vocab=True` (mode, jsd) need identical shapes there too.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from tracing import matching, naming, plots
from tracing.arch import ArchSpec
from tracing.errors import TracingError
from tracing.statistics import StatContext
from tracing.statistics.pvalues import perm_pair_spearman

MAPPING_ALPHA = 0.05  # family-wise level of an inferred layer mapping (Holm)
NO_GATE = ("{stat} needs a gated MLP (gate_proj and up_proj), which {model_type} does not have; "
           "use csh or csu instead")


def vocab_keys(spec: ArchSpec) -> tuple[str, ...]:
    """Keys whose first axis is the vocabulary (token embedding, LM head)."""
    return tuple(k for k in (spec.embed, spec.lm_head) if k)


def check_same_shapes(spec_a: ArchSpec, sd_a: dict[str, torch.Tensor], spec_b: ArchSpec,
                      sd_b: dict[str, torch.Tensor], stat_name: str = "this statistic",
                      vocab_ok: bool = True) -> None:
    """Raise TracingError unless both models have the same keys and shapes (vocab size may differ if vocab_ok)."""
    diffs: list[str] = []
    if spec_a.n_layers != spec_b.n_layers:
        diffs.append(f"{spec_a.n_layers} vs {spec_b.n_layers} layers")
    only_a = sorted(set(sd_a) - set(sd_b))
    only_b = sorted(set(sd_b) - set(sd_a))
    if only_a:
        diffs.append(f"{len(only_a)} weights only in base, e.g. {only_a[0]}")
    if only_b:
        diffs.append(f"{len(only_b)} weights only in fine-tuned, e.g. {only_b[0]}")
    skip_vocab = set(vocab_keys(spec_a)) if vocab_ok else set()
    for key in sorted(set(sd_a) & set(sd_b)):
        sa, sb = tuple(sd_a[key].shape), tuple(sd_b[key].shape)
        if sa == sb or (key in skip_vocab and sa[1:] == sb[1:]):
            continue
        diffs.append(f"{key} {sa} vs {sb}")
    if diffs:
        shown = "; ".join(diffs[:2]) + (f"; and {len(diffs) - 2} more" if len(diffs) > 2 else "")
        raise TracingError(f"base and fine-tuned shapes differ ({shown}): use match_all, which handles "
                           f"different depth and width (or csu_all for equal-shaped matrices); "
                           f"{stat_name} compares corresponding weights")


def check_gated(ctx: StatContext, stat: str) -> None:
    """match and match_all compare gate with up activations: both models need a gated MLP."""
    for spec in (ctx.spec_base, ctx.spec_ft):
        if not spec.gated:
            raise TracingError(NO_GATE.format(stat=stat, model_type=spec.model_type))


def selected_layers(ctx: StatContext) -> list[int]:
    """ctx.layers (validated) or every layer of the base model."""
    n = ctx.spec_base.n_layers
    if ctx.layers is None:
        return list(range(n))
    if not ctx.layers:
        raise TracingError(f"--layers is empty: give layer indices between 0 and {n - 1} (or leave it out)")
    bad = [i for i in ctx.layers if not 0 <= i < n]
    if bad:
        raise TracingError(f"--layers {bad} out of range: the base model has layers 0..{n - 1}")
    return sorted(set(int(i) for i in ctx.layers))


def paired_weights(ctx: StatContext) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield (key, w_base, w_ft) for every weight once (tied LM head skipped), vocab keys cut to shared rows.

    Tensors are views of the models' own storage (no copies); w_ft is on w_base's device.
    """
    sd_a, sd_b = ctx.base.state_dict(), ctx.ft.state_dict()
    vocab = set(vocab_keys(ctx.spec_base))
    tied = ctx.spec_base.tied and ctx.spec_ft.tied
    for key, a in sd_a.items():
        if key not in sd_b or (tied and key == ctx.spec_base.lm_head):
            continue
        b = sd_b[key].to(a.device)
        if key in vocab:
            v = min(a.shape[0], b.shape[0])
            a, b = a[:v], b[:v]  # (shared_vocab, hidden)
        yield key, a, b


def layer_map(logp: np.ndarray, holm: np.ndarray, layers_base: list[int], layers_ft: list[int],
              stat: str) -> tuple[list[dict], list[int | None]]:
    """The layer mapping of localized testing from (L_base, L_ft) matrices of raw and Holm-adjusted log10 p
    (NaN: pair not tested): layer j of ft maps to the base layer i with the smallest p[i, j] when its
    Holm-adjusted p is below MAPPING_ALPHA, else to None. Returns (per ft layer records, mapping)."""
    if np.isnan(logp).all():
        raise TracingError(f"{stat} has no p-value for any of the {logp.size} layer pairs (no comparable or only "
                           "degenerate layers): check the models and --layers")
    per_layer, mapping = [], []
    for b, j in enumerate(layers_ft):
        col = logp[:, b]  # (L_base,)
        if np.isnan(col).all():
            per_layer.append({"layer_ft": j, "layer_base": None, "best_layer_base": None, "log10_pvalue": None,
                              "log10_pvalue_holm": None})
            mapping.append(None)
            continue
        a = int(np.nanargmin(col))
        hit = bool(holm[a, b] < math.log10(MAPPING_ALPHA))
        mapping.append(layers_base[a] if hit else None)
        per_layer.append({"layer_ft": j, "layer_base": mapping[-1], "best_layer_base": layers_base[a],
                          "log10_pvalue": float(col[a]), "log10_pvalue_holm": float(holm[a, b])})
    return per_layer, mapping


def layer_heatmap(ctx: StatContext, stat: str, logp: np.ndarray, layers_base: list[int], layers_ft: list[int],
                  mapping: list[int | None]) -> str | None:
    """The (L_base, L_ft) log10 p heatmap of a localized test in ctx.out_dir (None without one): its path."""
    if not ctx.out_dir:
        return None
    name = naming.heatmap_name(getattr(ctx.base, "name_or_path", ""), getattr(ctx.ft, "name_or_path", ""), stat)
    os.makedirs(ctx.out_dir, exist_ok=True)
    return plots.match_all_heatmap(logp, os.path.join(ctx.out_dir, name), layers_base=layers_base,
                                   layers_ft=layers_ft, mapping=mapping, stat=stat)


def _layer_record(rho: float, log10p: float, n: int, pairs: matching.Pairs, solver: str, seconds: float) -> dict:
    return {"rho": float(rho), "log10_pvalue": float(log10p), "n_units": int(n),
            "excluded_base": int(pairs.excluded_a), "excluded_ft": int(pairs.excluded_b), "solver": solver,
            "lap_seconds": seconds}


def identity_test(sim: torch.Tensor, ok_a: torch.Tensor | None, ok_b: torch.Tensor | None, method: str,
                  seed: matching.Seed) -> dict:
    """φ_CSU / φ_CSH for one layer: match A's units (rows of sim (n, m)) and B's (columns), test the matched
    pairs against the identity with a one-sided Spearman correlation (`--matching` method; degenerate units
    left out). Returns the layer's record: rho, log10_pvalue (NaN when skipped), n_units, excluded_base,
    excluded_ft, solver, lap_seconds (time in matching)."""
    t0 = time.perf_counter()
    first: list = []  # the greedy result: when immediate, the exact matching of the same matrix is the same

    def test(solver: str) -> tuple:
        if first and first[0][-1].immediate:
            return first[0]
        pairs = matching.pair_units(sim, ok_a, ok_b, solver, seed)
        first.append(_identity(pairs))
        return first[-1]

    (rho, log10p, n, pairs), solver = matching.screened(method, test)
    return _layer_record(rho, log10p, n, pairs, solver, time.perf_counter() - t0)


def _identity(pairs: matching.Pairs) -> tuple:
    """(rho, log10 p, n, pairs) of the matched pairs against the identity."""
    if pairs.skipped:
        return math.nan, math.nan, 0, pairs
    return (*perm_pair_spearman(pairs.a, pairs.b), len(pairs.a), pairs)


def agreement_test(similarities: Callable[[str], tuple[torch.Tensor, torch.Tensor]], ok_a: torch.Tensor | None,
                   ok_b: torch.Tensor | None, method: str, seed: matching.Seed) -> dict:
    """φ_MATCH for one layer pair: do the matchings from gate and from up activations agree?

    `similarities(solver)` gives the (width_A, width_B) gate and up similarity matrices that solver works on
    (match: cosines for the greedy screen, -squared distances, the original's cost, for the exact one);
    ok_a, ok_b: usable units (in both projections). The narrower side's units are matched into the wider's
    once per projection (ties broken in independent random orders) and Spearman between the two partner
    vectors tests their agreement. Returns the layer's record like identity_test."""
    seeds = (*np.atleast_1d(seed).tolist(), 0), (*np.atleast_1d(seed).tolist(), 1)
    t0 = time.perf_counter()

    def test(solver: str) -> tuple:
        gate, up = (matching.pair_units(s, ok_a, ok_b, solver, sd) for s, sd in zip(similarities(solver), seeds))
        pg, pu = gate.partner(), up.partner()
        common = sorted(set(pg) & set(pu)) if gate.b_complete == up.b_complete else []
        if len(common) < matching.MIN_UNITS:
            return math.nan, math.nan, 0, gate
        x, y = np.array([pg[k] for k in common]), np.array([pu[k] for k in common])  # (n,) partners
        return (*perm_pair_spearman(x, y), len(common), gate)

    (rho, log10p, n, pairs), solver = matching.screened(method, test)
    return _layer_record(rho, log10p, n, pairs, solver, time.perf_counter() - t0)


def matching_extras(method: str, per_layer: list[dict]) -> dict:
    """What every matching statistic records about its matching: the method, units left out, layers skipped."""
    return {"matching": method,
            "units_excluded": {"base": sum(r.get("excluded_base", 0) for r in per_layer),
                               "ft": sum(r.get("excluded_ft", 0) for r in per_layer)},
            "layers_skipped_degenerate": sum(1 for r in per_layer if r.get("n_units", 1) == 0),
            "lap_seconds": sum(r.get("lap_seconds", 0.0) for r in per_layer)}
