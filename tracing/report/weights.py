"""Weight change between a base model and its fine-tuned copy, per parameter group and layer.

    diff = weight_diff(base, ft, spec)  # base, ft: tensor sources or loaded models
    diff["rel_change"][i][j]   # ‖ΔW‖/‖W‖ of module diff["modules"][j] in layer i (None if absent)
    diff["eff_rank"][i][j]     # smallest k whose top-k singular values of ΔW hold `rank_energy` of Σσ²

A merged LoRA of rank r shows up as effective rank ≤ r in exactly the modules it touched; identical
weights give relative change 0 and effective rank 0. Part of the fine-tuning diff report (tracing/report.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from tracing.arch import ArchSpec
from tracing.errors import TracingError
from tracing.sources.base import Source, as_source


def effective_rank(delta: torch.Tensor, energy: float = 0.9) -> int:
    """Smallest k such that the top-k singular values of `delta` (2-D) hold `energy` of Σσ²; 0 if delta == 0."""
    def part(start: int, stop: int, axis: int) -> torch.Tensor:
        return delta.narrow(axis, start, min(stop, delta.shape[axis]) - start)
    return _rank_from_energies(_sq_singular_values(part, tuple(delta.shape))[0], energy)


def _rank_from_energies(e: torch.Tensor, energy: float) -> int:
    """e: σ² in descending order (float64)."""
    total = e.sum()
    if total <= 0:
        return 0
    frac = torch.cumsum(e, 0) / total
    k = int((frac < energy * (1 - 1e-12)).sum())  # tolerance: a fraction of exactly `energy` counts as reached
    return min(k + 1, len(e))


CHUNK = 8192  # rows (or columns) of ΔW per step of the Gram accumulation


def _sq_singular_values(part: Callable[[int, int, int], torch.Tensor],
                        shape: tuple[int, int]) -> tuple[torch.Tensor, float]:
    """(σ² descending, ‖·‖_F²) of an (m, n) matrix, from the eigenvalues and trace of its (min, min) Gram matrix.

    `part(start, stop, axis)` returns a slice of the matrix along `axis`; the Gram matrix is accumulated
    in float64 over CHUNK slices of the longer axis, so e.g. the ΔW of a large-vocabulary embedding never
    exists in float64 all at once. The energies equal svdvals(ΔW)**2 up to rounding.
    """
    m, n = shape
    tall = m >= n
    gram = None
    for s in range(0, m if tall else n, CHUNK):
        d = part(s, s + CHUNK, 0 if tall else 1).to(torch.float64)  # (chunk, n) or (m, chunk)
        g = d.T @ d if tall else d @ d.T  # (n, n) or (m, m)
        gram = g if gram is None else gram + g
    return torch.linalg.eigvalsh(gram).clamp_min(0).flip(0), float(gram.diagonal().sum())


def _short_names(spec: ArchSpec, i: int) -> dict[str, str]:
    """Module path (without .weight/.bias) -> role label for layer i: q/k/v/o, gate/up/down, norms."""
    r = spec.layers[i]
    names: dict[str, str] = {}
    for j, key in enumerate(r.attn_in):  # separate q/k/v, or one fused qkv projection
        names[key.rsplit(".", 1)[0]] = "qkv" if len(r.attn_in) == 1 else "qkv"[j]
    if r.attn_out:
        names[r.attn_out.rsplit(".", 1)[0]] = "o"
    shared = "shared_" if r.moe is not None else ""  # an MoE block's dense MLP is its shared expert
    for proj, key in (("gate", r.gate), ("up", r.up), ("down", r.down)):
        if key:
            names[key.rsplit(".", 1)[0]] = shared + proj
    if r.moe is not None:  # stacked experts keep their own labels (experts.gate_up_proj, experts.down_proj)
        names[r.moe.router.rsplit(".", 1)[0]] = "router"
    if r.pre_attn_norm:
        names[r.pre_attn_norm.rsplit(".", 1)[0]] = "attn_norm"
    if r.pre_mlp_norm:
        names[r.pre_mlp_norm.rsplit(".", 1)[0]] = "mlp_norm"
    return names


def _role(spec: ArchSpec, key: str) -> tuple[int | None, str]:
    """(layer index or None for global weights, module label) of a state-dict key."""
    module, param = key.rsplit(".", 1)
    suffix = "" if param == "weight" else f".{param}"
    i = spec.layer_of.get(key)
    if i is not None:
        local = spec.local_key(key).rsplit(".", 1)[0]  # e.g. "mlp.up_proj"
        return i, _short_names(spec, i).get(module, local.rsplit(".", 1)[-1]) + suffix
    if key == spec.embed:
        return None, "embed" + suffix
    if key in spec.extra_embeds:
        return None, "pos_embed" + suffix
    if key == spec.lm_head:
        return None, "lm_head" + suffix
    if key == spec.final_norm or (spec.final_norm and module == spec.final_norm.rsplit(".", 1)[0]):
        return None, "final_norm" + suffix
    return None, module + suffix


def _delta_part(base: Source, ft: Source, key: str, start: int = 0, stop: int | None = None,
                axis: int = 0) -> torch.Tensor:
    """A slice of ΔW = W_ft - W_base along `axis`, float64, on the base weight's device (rows read as slices)."""
    n = base.shape(key)[axis]
    stop = n if stop is None else min(stop, n)
    if axis == 0:
        w, w_ft = base.get(key, slice(start, stop)), ft.get(key, slice(start, stop))
    else:  # columns: read whole (the stored dtype), cut, then widen
        w, w_ft = base.get(key).narrow(axis, start, stop - start), ft.get(key).narrow(axis, start, stop - start)
    return w_ft.to(w.device, torch.float64) - w.to(torch.float64)


def _norm(src: Source, key: str) -> float:
    """‖W‖ in float64, read in pieces of rows."""
    n = src.shape(key)[0]
    sq = sum(float(torch.linalg.vector_norm(src.get(key, slice(s, s + CHUNK)), dtype=torch.float64) ** 2)
             for s in range(0, n, CHUNK))
    return sq ** 0.5


@torch.no_grad()
def weight_diff(base: Source | torch.nn.Module, ft: Source | torch.nn.Module, spec: ArchSpec, *,
                rank_energy: float = 0.9, progress: bool = True) -> dict:
    """Relative change and effective rank of ΔW = W_ft - W_base for every weight in `spec.axes` (plain data).
    `base`, `ft`: tensor sources (or loaded models), read one weight (or one slice of rows) at a time."""
    if not 0 < rank_energy <= 1:
        raise TracingError(f"rank_energy must be in (0, 1], got {rank_energy}; e.g. use 0.9")
    base, ft = as_source(base, spec), as_source(ft)
    sd_b, sd_f = base.shapes(), ft.shapes()
    keys = [k for k in spec.axes if k in sd_b]
    if spec.tied and spec.lm_head in keys and spec.embed in keys:
        keys.remove(spec.lm_head)  # the same tensor as the embedding
    missing = [k for k in keys if k not in sd_f]
    bad = [k for k in keys if k in sd_f and sd_f[k] != sd_b[k]]
    if missing or bad:
        what = f"missing {missing[:3]}" if missing else \
            f"{bad[0]} is {tuple(sd_b[bad[0]])} in base but {tuple(sd_f[bad[0]])} in ft"
        raise TracingError(f"the weight-change report needs two models of the same architecture and shape "
                           f"({what}); compare such pairs with --stat match instead")
    per_key = []
    for key in tqdm(keys, desc="report: weight change", disable=not progress):
        shape = tuple(sd_b[key])
        delta = functools.partial(_delta_part, base, ft, key)
        norm_w = _norm(base, key)
        if len(shape) == 2:
            e, frob2 = _sq_singular_values(delta, shape)  # σ² of ΔW, descending; ‖ΔW‖²
            norm_d, rank = frob2 ** 0.5, _rank_from_energies(e, rank_energy)
        else:
            norm_d, rank = float(delta().norm()), None
        layer, module = _role(spec, key)
        per_key.append(dict(
            key=key, layer=layer, module=module, shape=list(shape),
            rel_change=norm_d / norm_w if norm_w > 0 else (0.0 if norm_d == 0 else None),  # None: W was 0
            abs_change=norm_d, eff_rank=rank, max_rank=min(shape) if len(shape) == 2 else None))
    return _grid(per_key, spec.n_layers, rank_energy)


def _grid(per_key: list[dict], n_layers: int, rank_energy: float) -> dict:
    """Arrange per-key records into layer × module matrices (None where a layer has no such module)."""
    order = ["q", "k", "v", "qkv", "o", "gate", "up", "down", "attn_norm", "mlp_norm"]
    seen = [r["module"] for r in per_key if r["layer"] is not None]
    def place(m: str) -> tuple:  # known roles first, a bias right after its weight
        stem = m.split(".")[0]
        return (order.index(stem) if stem in order else len(order), stem, m != stem)
    modules = sorted(set(seen), key=place)
    col = {m: j for j, m in enumerate(modules)}
    rel = [[None] * len(modules) for _ in range(n_layers)]
    rank = [[None] * len(modules) for _ in range(n_layers)]
    absolute = [[None] * len(modules) for _ in range(n_layers)]
    for r in per_key:
        if r["layer"] is not None:
            rel[r["layer"]][col[r["module"]]] = r["rel_change"]  # None also where W was all zeros
            rank[r["layer"]][col[r["module"]]] = r["eff_rank"]
            absolute[r["layer"]][col[r["module"]]] = r["abs_change"]
    return dict(rank_energy=rank_energy, modules=modules, layers=list(range(n_layers)), rel_change=rel,
                eff_rank=rank, abs_change=absolute, per_key=per_key,
                globals=[r for r in per_key if r["layer"] is None])
