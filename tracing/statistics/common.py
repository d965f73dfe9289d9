"""Helpers every statistic may use, so that no statistic imports another.

    check_same_shapes(ctx.source_base, ctx.source_ft, "csu")   # keys and shapes, from headers
    layers = selected_layers(ctx)                        # --layers, validated against the base model
    for key, pieces in paired_weights(ctx):              # every corresponding weight once, read from the sources
        for w_base, w_ft in pieces: ...                  # in pieces of rows (big embeddings), on ctx.compute_device
    layer = identity_test(sim, ok_a, ok_b, ctx.matching, seed=(ctx.seed, i))   # the core of csu / csh / csu_all
    layer = agreement_test(similarities, ok_a, ok_b, ctx.matching, seed)         # the core of match / match_all
    per_layer, mapping = layer_map(logp, holm_log10(logp), layers_a, layers_b, "match_all")  # localized testing

Derived models often add tokens to the vocabulary, so by default the vocabulary axis of the embedding and
the LM head may differ (weight statistics compare the shared rows); statistics registered with
`same_vocab=True` (mode, jsd) need identical shapes there too.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from tracing import matching, naming, plots
from tracing.errors import TracingError
from tracing.statistics import StatContext
from tracing.statistics.fits import vocab_keys
from tracing.statistics.pvalues import perm_pair_spearman

MAPPING_ALPHA = 0.05  # family-wise level of an inferred layer mapping (Holm)


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


CHUNK_ELEMS = 1 << 24  # elements per piece of a weight read in pieces (128 MiB in float64)


def row_pieces(shape: tuple[int, ...], n_rows: int | None = None) -> list[slice | None]:
    """Slices of rows (axis 0) of at most CHUNK_ELEMS elements covering the first `n_rows` rows (default all;
    [None]: all rows fit in one piece, read the whole tensor)."""
    per_row = max(1, math.prod(shape[1:]))
    if n_rows is None and shape[0] * per_row <= CHUNK_ELEMS:
        return [None]
    n_rows = shape[0] if n_rows is None else n_rows
    step = max(1, CHUNK_ELEMS // per_row)
    return [slice(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]


def paired_weights(ctx: StatContext) -> Iterator[tuple[str, Iterator[tuple[torch.Tensor, torch.Tensor]]]]:
    """Yield (key, pieces) for every weight once, in spec order (a tied LM head skipped); `pieces` yields
    (w_base, w_ft) pairs of row slices of at most CHUNK_ELEMS elements, on ctx.compute_device. Vocab keys are
    cut to the shared rows. The next piece is read in a background thread while this one is used (reading
    overlaps the arithmetic); at most three pieces of each model are in memory. Consume each key's pieces
    before asking for the next key."""
    a, b = ctx.source_base, ctx.source_ft
    shapes_a, shapes_b = a.shapes(), b.shapes()
    vocab = set(vocab_keys(ctx.spec_base))
    tied = ctx.spec_base.tied and ctx.spec_ft.tied
    jobs = []  # (key, rows)
    for key in ctx.spec_base.axes:
        if key in shapes_a and key in shapes_b and not (tied and key == ctx.spec_base.lm_head):
            n = min(shapes_a[key][0], shapes_b[key][0]) if key in vocab else None  # shared vocabulary rows
            jobs += [(key, rows) for rows in row_pieces(shapes_a[key], n)]

    def read(job: tuple[str, slice | None]) -> tuple[torch.Tensor, torch.Tensor]:  # in a reader thread
        wa = a.get(*job)
        dev = ctx.compute_device or wa.device
        return wa.to(dev), b.get(*job).to(dev)

    pieces = matching.map_in_threads(read, jobs, workers=2)  # one read ahead of the one in use
    for key, group in itertools.groupby(zip(jobs, pieces), key=lambda job_piece: job_piece[0][0]):
        yield key, (piece for _, piece in group)


# Elements per step of an elementwise sum on the CPU: the temporaries stay in the cache, and an op this small
# runs on one thread (torch's grain size), which on a busy shared CPU is 10x faster than waiting on a pool.
CACHE_BLOCK = 1 << 15


def _blocks(a: torch.Tensor, b: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Flat float32 blocks of a and b (cache-sized on a CPU, whole on a GPU); views where already float32."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    step = CACHE_BLOCK if a.device.type == "cpu" else max(1, fa.numel())
    for s in range(0, fa.numel(), step):
        yield fa[s:s + step].float(), fb[s:s + step].float()


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ (a - b)², differences in float32 (exact for close values), sums in float64."""
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for x, y in _blocks(a, b):
        total += (x - y).square().sum(dtype=torch.float64)  # never in place: x may be the model's own tensor
    return float(total)


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """‖b - a‖ / ‖a‖ (None where a is all zeros) in one pass: squares and differences in float32 (exact for close
    bf16 values), sums in float64."""
    sums = torch.zeros(2, dtype=torch.float64, device=a.device)
    for x, y in _blocks(a, b):
        sums[0] += x.square().sum(dtype=torch.float64)
        sums[1] += (x - y).square().sum(dtype=torch.float64)
    norm_sq, dist_sq = sums.tolist()
    return (dist_sq / norm_sq) ** 0.5 if norm_sq > 0 else None


def dot_and_norms(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(Σ ab, Σ a², Σ b²), products in float32, sums in float64."""
    sums = torch.zeros(3, dtype=torch.float64, device=a.device)
    for x, y in _blocks(a, b):
        sums[0] += (x * y).sum(dtype=torch.float64)
        sums[1] += x.square().sum(dtype=torch.float64)
        sums[2] += y.square().sum(dtype=torch.float64)
    dot, sq_a, sq_b = sums.tolist()
    return dot, sq_a, sq_b


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
    excluded_ft, solver, lap_seconds (time in matching), matched_cos (the mean similarity of the matched pairs: which
    of several matrices at the p-value floor -log10 n! is closest, e.g. which expert of an upcycled MoE)."""
    t0 = time.perf_counter()
    first: list = []  # the greedy result: when immediate, the exact matching of the same matrix is the same

    def test(solver: str) -> tuple:
        if first and first[0][-1].immediate:
            return first[0]
        pairs = matching.pair_units(sim, ok_a, ok_b, solver, seed)
        first.append(_identity(pairs))
        return first[-1]

    (rho, log10p, n, pairs), solver = matching.screened(method, test)
    rec = _layer_record(rho, log10p, n, pairs, solver, time.perf_counter() - t0)
    pa, pb = (torch.from_numpy(x).to(sim.device) for x in (pairs.a, pairs.b))
    rec["matched_cos"] = math.nan if pairs.skipped else float(sim[pa, pb].double().mean())
    return rec


def _identity(pairs: matching.Pairs) -> tuple:
    """(rho, log10 p, n, pairs) of the matched pairs against the identity."""
    if pairs.skipped:
        return math.nan, math.nan, 0, pairs
    return (*perm_pair_spearman(pairs.a, pairs.b), len(pairs.a), pairs)


def agreement_test(similarities: Callable[[str], Iterable[torch.Tensor]], ok_a: torch.Tensor | None,
                   ok_b: torch.Tensor | None, method: str, seed: matching.Seed) -> dict:
    """φ_MATCH for one layer pair: do the matchings from gate and from up activations agree?

    `similarities(solver)` gives the (width_A, width_B) gate and up similarity matrices that solver works on, in
    that order (an iterator makes the second only once the first is matched: one alive at a time)
    (match: cosines for the greedy screen, -squared distances, the original's cost, for the exact one);
    ok_a, ok_b: usable units (in both projections). The narrower side's units are matched into the wider's
    once per projection (ties broken in independent random orders) and Spearman between the two partner
    vectors tests their agreement. Returns the layer's record like identity_test."""
    seeds = (*np.atleast_1d(seed).tolist(), 0), (*np.atleast_1d(seed).tolist(), 1)
    t0 = time.perf_counter()

    def test(solver: str) -> tuple:
        found = []
        for s, sd in zip(similarities(solver), seeds):
            found.append(matching.pair_units(s, ok_a, ok_b, solver, sd))
            del s  # before the next matrix is made
        gate, up = found
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
