"""Reading the routed experts of an MoE block from a source, one expert at a time, and comparing whole experts.

    rows = expert_rows(src, 3, e=5, proj="up")        # (n_neurons, hidden): expert 5's up rows, only its bytes read
    sig = expert_signatures(src, 3, proj="gate", resid=p)   # (n_experts, hidden * k): one per expert
    experts_mismatch(base_src, ft_src)                 # why expert e cannot meet expert e (None: it can)

An expert's neurons may come in any order (each expert's neurons are a symmetry of its own), so experts are compared
by a signature that does not depend on that order: a sketch of the Gram matrix Wᵀ W (hidden, hidden) of one of its
projections W (n_neurons, hidden), Wᵀ (W R) for a fixed Gaussian R (hidden, k). Signatures live in the residual
basis (`resid` re-indexes ft's into base's), so experts of two models are matched by cosine similarity of their
signatures, as neurons are by their rows.
"""

from __future__ import annotations

import torch

from tracing.arch import ArchSpec, per_expert
from tracing.errors import TracingError
from tracing.sources.base import Source

SKETCH_COLUMNS = 64  # k: columns of the Gram sketch (each signature has hidden * k entries)


def expert_rows(src: Source, layer: int, e: int, proj: str, device: torch.device | None = None) -> torch.Tensor:
    """Rows (n_neurons, hidden) of projection `proj` ("gate", "up", "down": its columns) of expert e of `layer`,
    reading only that expert's slice of the stacked tensor."""
    spec = src.spec
    key = spec.layers[layer].moe.key_of(proj)
    t = src.get(key, slice(e, e + 1))[0]  # (2 I, hidden), (hidden, I), ...: one expert
    rows = spec.expert_rows(key, t, layer, proj)
    return rows if device is None else rows.to(device)


def n_experts(spec: ArchSpec, layer: int) -> int:
    return spec.layers[layer].moe.n_experts


@torch.no_grad()
def expert_signatures(src: Source, layer: int, proj: str, resid: torch.Tensor | None = None,
                      device: torch.device | None = None, seed: int = 0) -> torch.Tensor:
    """(n_experts, hidden * k) float32: each expert's Gram sketch Wᵀ (W R) of projection `proj`, its residual axis
    re-indexed by `resid` when given (ft into base's basis), invariant to the order of the expert's neurons."""
    hidden = src.shape(src.spec.embed)[1]  # (vocab, hidden)
    k = min(SKETCH_COLUMNS, hidden)
    r = torch.randn(hidden, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = []
    for e in range(n_experts(src.spec, layer)):
        w = expert_rows(src, layer, e, proj, device).double()  # (n_neurons, hidden)
        if resid is not None:
            w = w.index_select(1, resid.to(w.device))
        out.append((w.T @ (w @ r.to(w.device))).reshape(-1).float())  # (hidden * k,)
    return torch.stack(out)


def expert_shapes(src: Source) -> dict[int, tuple[int, int]]:
    """MoE layer -> (experts, neurons per expert), from the headers."""
    spec, out = src.spec, {}
    for i in spec.moe_layers:
        key, name = spec.layers[i].moe.key_of("up"), per_expert(i)
        shape = src.shape(key)
        out[i] = (shape[0], spec.n_units(key, name, shape[spec.axes[key].index(name)]))
    return out


def experts_mismatch(a: Source, b: Source) -> str | None:
    """Why expert e of one model cannot be compared with expert e of the other (None: it can): other MoE layers,
    or other expert counts or widths."""
    ea, eb = expert_shapes(a), expert_shapes(b)
    if set(ea) != set(eb):
        return f"it compares the experts of layer i with those of layer i, and the models have MoE layers " \
               f"{sorted(ea)} vs {sorted(eb)}"
    for i in ea:
        if ea[i] != eb[i]:
            return (f"layer {i} has {ea[i][0]} experts of {ea[i][1]} neurons in base and {eb[i][0]} of {eb[i][1]} in "
                    "the fine-tuned model (mismatched expert counts)")
    return None


def check_same_experts(a: Source, b: Source, what: str) -> None:
    """`experts_mismatch` as a one-line TracingError naming the statistic that compares every expert with every."""
    why = experts_mismatch(a, b)
    if why:
        raise TracingError(f"{what}: {why}; use --stat csu_all, which compares every expert with every expert")
