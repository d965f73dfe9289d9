"""Hungarian alignment of a fine-tuned model's hidden units to its base, from the weights alone.

    perm = align_weights(base, ft, spec)    # base, ft: tensor sources (or loaded models)
    apply_perm(ft, spec, perm)              # a loaded ft's hidden units now line up with base's
    ft_view = permuted(ft_source, perm)     # ... or the same as a view over a source

1. Residual stream: each hidden unit is a column of the embedding (vocab, hidden); match base and ft
   columns over the shared vocabulary by cosine similarity (linear assignment, float64).
2. Each layer's MLP neurons: the gate rows (gated MLPs) or the output-projection columns (GPT-2/NeoX) of ft,
   re-indexed into base's residual basis by step 1, matched against the same weights of base.
   The up-projection (fc input) is deliberately left out: csu tests it, and a matching chosen to make
   the up rows agree would make csu call independent models related after --align. Matching on one
   weight and testing on another keeps csu --align a test (φ_CSU: gate matching vs up matching).
Each matching is tracing.matching's (`--matching`): degenerate units (zero, constant, non-finite weights) are
left out and placed at random, ties broken in a seeded random order; "fast" matches greedily (related
layers: the optimal assignment, every unit's best partner is distinct), "exact" by optimal assignment.
3. Each MoE layer's routed experts: experts matched by assignment on a signature of their gate weights that does
   not depend on the order of their neurons (tracing/moe.py: a sketch of Wᵀ W, in base's residual basis), then the
   neurons within each matched pair as in step 2 ("experts.{i}", then "mlp.{i}.{e}" for the expert put in slot e).
   The router is left out, like the up rows: csu tests it (are the experts in the same order?).
The result is a `Perm` in the same currency as `random_perm`: applying it to ft aligns it to base.
Weights are read one at a time (the embeddings in chunks of rows), so memory does not grow with the model.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from tqdm.auto import tqdm

from tracing.arch import RESID, ArchSpec, expert_mlp, experts, mlp
from tracing.cosines import bf16_products
from tracing.errors import TracingError
from tracing.matching import (
    DEFAULT_METHOD,
    Seed,
    cosine_matrix,
    map_in_threads,
    pair_units,
    permutation,
    read_ahead,
    similarity,
    usable,
    usable_from_range,
)
from tracing.moe import check_same_experts, expert_rows, expert_signatures, n_experts
from tracing.perm import Perm
from tracing.sources.base import Source, as_source


def _match_rows(a: torch.Tensor, b: torch.Tensor, method: str, seed: Seed) -> torch.Tensor:
    """Permutation p with b[p] matched to a, rows of a (n, d) and b (n, d)."""
    return permutation(similarity(a, b), usable(a), usable(b), method, seed)


def _neuron_rows(spec: ArchSpec, src: Source, key: str, name: str,
                 resid: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Rows (n_neurons, hidden) of `key`, optionally re-indexed along the residual axis by `resid`."""
    t = src.get(key).to(device)
    a = spec.axis(key, RESID)
    if resid is not None and a is not None:
        t = t.index_select(a, resid.to(device))
    return spec.neuron_rows(t, key, name).reshape(t.shape[spec.axis(key, name)], -1)


EMB_CHUNK = 2048  # embedding rows per step of the residual similarity (float64 copies of 2048 x hidden)


def embedding_similarity(base: Source, ft: Source, spec: ArchSpec, vocab: int,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine similarity (hidden, hidden) of the embedding columns (one per hidden unit) of base and ft over the
    first `vocab` rows, float64, accumulated over chunks of rows (float32 products, on the bf16 units for bf16
    embeddings on a CPU, as in `cosine_matrix`); with the usable columns of each side
    (matching.usable_from_range: finite, not constant)."""
    hidden_b, hidden_f = base.shape(spec.embed)[1], ft.shape(spec.embed)[1]
    gram = torch.zeros(hidden_b, hidden_f, dtype=torch.float64, device=device)
    sq_b = torch.zeros(hidden_b, dtype=torch.float64, device=device)
    sq_f = torch.zeros(hidden_f, dtype=torch.float64, device=device)
    lo_b, hi_b, fin_b = sq_b.new_full((hidden_b,), torch.inf), sq_b.new_full((hidden_b,), -torch.inf), True
    lo_f, hi_f, fin_f = sq_f.new_full((hidden_f,), torch.inf), sq_f.new_full((hidden_f,), -torch.inf), True
    for s in range(0, vocab, EMB_CHUNK):
        rows = slice(s, min(s + EMB_CHUNK, vocab))
        a_stored, b_stored = base.get(spec.embed, rows).to(device), ft.get(spec.embed, rows).to(device)
        exact_bf16 = a_stored.dtype == b_stored.dtype == torch.bfloat16 and device.type == "cpu"
        with bf16_products() if exact_bf16 else contextlib.nullcontext():  # bf16 values: exact inputs
            gram += (a_stored.float().T @ b_stored.float()).double()  # (hidden, hidden)
        sq_b += _squares(a_stored)
        sq_f += _squares(b_stored)
        a, b = a_stored, b_stored  # (chunk, hidden): min, max and finiteness as stored (exact)
        lo_b, hi_b, fin_b = torch.fmin(lo_b, a.amin(0)), torch.fmax(hi_b, a.amax(0)), fin_b & a.isfinite().all(0)
        lo_f, hi_f, fin_f = torch.fmin(lo_f, b.amin(0)), torch.fmax(hi_f, b.amax(0)), fin_f & b.isfinite().all(0)
    sim = gram / (sq_b.sqrt().clamp_min(1e-30)[:, None] * sq_f.sqrt().clamp_min(1e-30)[None, :])
    return sim, usable_from_range(lo_b, hi_b) & fin_b, usable_from_range(lo_f, hi_f) & fin_f


def _squares(x: torch.Tensor) -> torch.Tensor:
    """Σ x² over the rows of x (rows, hidden), float64: squares of bf16 values in float32 (exact), others in float64."""
    if x.dtype == torch.bfloat16:
        return x.float().square_().sum(0, dtype=torch.float64)
    return x.double().square_().sum(0)


@torch.no_grad()
def residual_selection(base: Source, ft: Source, spec: ArchSpec, method: str = DEFAULT_METHOD, seed: Seed = 0,
                       device: torch.device | None = None) -> torch.Tensor:
    """For a ft whose residual stream is narrower than base's (hidden-size pruning, Minitron-style): the base channel
    each ft channel came from, (hidden_ft,), matched on the embedding columns over the shared vocabulary (ft's
    channels matched into base's). Channels left unmatched (degenerate) get the remaining base channels in a
    seeded random order. Like `align_weights` it never looks at the MLP weights a statistic then tests."""
    hidden_f = ft.shape(ft.spec.embed)[1]
    vocab = min(base.shape(spec.embed)[0], ft.shape(ft.spec.embed)[0])
    sim, ok_b, ok_f = embedding_similarity(base, ft, spec, vocab, device or base.device)  # (hidden_b, hidden_f)
    pairs = pair_units(sim, ok_b, ok_f, "lap" if method == "exact" else "greedy", seed)
    sel = torch.full((hidden_f,), -1, dtype=torch.long)
    sel[torch.as_tensor(pairs.b)] = torch.as_tensor(pairs.a)
    missing = sel < 0
    free = np.setdiff1d(np.arange(sim.shape[0]), pairs.a)
    sel[missing] = torch.from_numpy(np.random.default_rng(seed).permutation(free)[: int(missing.sum())])
    return sel


@torch.no_grad()
def align_weights(base: Source | torch.nn.Module, ft: Source | torch.nn.Module, spec: ArchSpec,
                  progress: bool = True, device: torch.device | None = None, method: str = DEFAULT_METHOD,
                  seed: int = 0) -> Perm:
    """The permutation of ft's residual stream and MLP neurons that best matches base's weights.
    `device`: where the cosine products run (default: where base's tensors are; weights go there one at a time);
    `method`: --matching; `seed`: the order in which ties fall."""
    base, ft = as_source(base, spec), as_source(ft)
    hidden_b, hidden_f = base.shape(spec.embed)[1], ft.shape(spec.embed)[1]  # (vocab, hidden)
    if hidden_b != hidden_f:
        raise TracingError(f"cannot align: hidden sizes differ ({hidden_b} vs {hidden_f}); "
                           "use --stat match_all, which handles different depth and width")
    check_same_experts(base, ft, "alignment")
    dense = [i for i, roles in enumerate(spec.layers) if roles.up is not None]  # a dense MLP or a shared expert
    keys = {i: spec.layers[i].gate or spec.layers[i].down for i in dense}  # never up: csu tests it (docstring)
    for i, key in keys.items():
        if base.shape(key) != ft.shape(key):
            raise TracingError(f"cannot align layer {i}: MLP shapes differ "
                               f"({tuple(base.shape(key))} vs {tuple(ft.shape(key))}); "
                               "use --stat match_all, which handles different depth and width")
    device = device or base.device
    vocab = min(base.shape(spec.embed)[0], ft.shape(spec.embed)[0])  # the shared vocabulary
    resid = permutation(*embedding_similarity(base, ft, spec, vocab, device), method, (seed, 0, 0))  # (hidden,)

    def read(i: int) -> tuple[int, tuple[torch.Tensor, torch.Tensor] | None]:  # in the reading thread
        if i not in keys:
            return i, None
        return i, (_neuron_rows(spec, base, keys[i], mlp(i), None, device),  # (n_neurons, hidden) each
                   _neuron_rows(spec, ft, keys[i], mlp(i), resid, device))

    def align_layer(item: tuple[int, tuple[torch.Tensor, torch.Tensor] | None]) -> Perm:  # in a worker thread
        i, rows = item
        out: Perm = {}
        if rows is not None:
            out[mlp(i)] = _match_rows(*rows, method, (seed, 1, i))  # (n_neurons,)
        if spec.layers[i].moe is not None:
            out.update(align_experts(base, ft, i, resid, device, method, seed))
        return out

    n = max([base.shape(k)[spec.axis(k, mlp(i))] for i, k in keys.items()] + [1])
    layers = [i for i in range(spec.n_layers) if i in keys or spec.layers[i].moe is not None]
    perm: Perm = {RESID: resid}
    for p in tqdm(map_in_threads(align_layer, read_ahead(read, layers), item_bytes=3 * n * n * 8), total=len(layers),
                  desc="align MLP", disable=not progress):
        perm.update(p)
    return perm


def align_experts(base: Source, ft: Source, layer: int, resid: torch.Tensor, device: torch.device,
                  method: str = DEFAULT_METHOD, seed: int = 0) -> Perm:
    """The expert order of ft's `layer` that matches base's ("experts.{i}"), and each matched expert's neuron
    order ("mlp.{i}.{e}"), from the gate rows (the up rows of a non-gated MLP are never used: csu tests them)."""
    proj = "gate" if base.spec.layers[layer].moe.gated else "down"
    sig_b = expert_signatures(base, layer, proj, None, device, seed)  # (E, hidden * k)
    sig_f = expert_signatures(ft, layer, proj, resid, device, seed)
    order = permutation(cosine_matrix(sig_b, sig_f), usable(sig_b), usable(sig_f), "exact", (seed, 2, layer),
                        min_units=1)  # (E,): ft's expert order[e] goes to slot e
    out: Perm = {experts(layer): order}
    for e in range(n_experts(base.spec, layer)):
        rows_b = expert_rows(base, layer, e, proj, device)  # (n_neurons, hidden)
        rows_f = expert_rows(ft, layer, int(order[e]), proj, device).index_select(1, resid.to(device))
        out[expert_mlp(layer, e)] = _match_rows(rows_b, rows_f, method, (seed, 3, layer, e))
    return out
