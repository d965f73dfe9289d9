"""Hungarian alignment of a fine-tuned model's hidden units to its base, from the weights alone.

    perm = align_weights(base, ft, spec)
    apply_perm(ft, spec, perm)        # ft's hidden units now line up with base's

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
The result is a `Perm` in the same currency as `random_perm`: applying it to ft aligns it to base.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from tracing.arch import RESID, ArchSpec, mlp
from tracing.errors import TracingError
from tracing.matching import DEFAULT_METHOD, Seed, cosine_matrix, map_in_threads, permutation, usable
from tracing.perm import Perm


def _match_rows(a: torch.Tensor, b: torch.Tensor, method: str, seed: Seed) -> torch.Tensor:
    """Permutation p with b[p] matched to a, rows of a (n, d) and b (n, d)."""
    return permutation(cosine_matrix(a, b), usable(a), usable(b), method, seed)


def _neuron_rows(spec: ArchSpec, sd: dict[str, torch.Tensor], key: str, name: str,
                 resid: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Rows (n_neurons, hidden) of `key`, optionally re-indexed along the residual axis by `resid`."""
    t = sd[key].to(device)
    a = spec.axis(key, RESID)
    if resid is not None and a is not None:
        t = t.index_select(a, resid.to(device))
    return spec.neuron_rows(t, key, name).reshape(t.shape[spec.axis(key, name)], -1)


@torch.no_grad()
def align_weights(base: torch.nn.Module, ft: torch.nn.Module, spec: ArchSpec, progress: bool = True,
                  device: torch.device | None = None, method: str = DEFAULT_METHOD, seed: int = 0) -> Perm:
    """The permutation of ft's residual stream and MLP neurons that best matches base's weights.
    `device`: where the cosine products run (default: base's device; weights move there one at a time);
    `method`: --matching; `seed`: the order in which ties fall."""
    sd_b, sd_f = base.state_dict(), ft.state_dict()
    emb_b, emb_f = sd_b[spec.embed], sd_f[spec.embed]  # (vocab, hidden)
    if emb_b.shape[1] != emb_f.shape[1]:
        raise TracingError(f"cannot align: hidden sizes differ ({emb_b.shape[1]} vs {emb_f.shape[1]}); "
                           "use --stat match_all, which handles different depth and width")
    device = device or emb_b.device
    vocab = min(emb_b.shape[0], emb_f.shape[0])  # the shared vocabulary
    resid = _match_rows(emb_b[:vocab].to(device).T, emb_f[:vocab].to(device).T, method, (seed, 0, 0))  # (hidden,)
    keys = [roles.gate or roles.down for roles in spec.layers]  # never up: csu tests it (module docstring)
    for i, key in enumerate(keys):
        if sd_b[key].shape != sd_f[key].shape:
            raise TracingError(f"cannot align layer {i}: MLP shapes differ "
                               f"({tuple(sd_b[key].shape)} vs {tuple(sd_f[key].shape)}); "
                               "use --stat match_all, which handles different depth and width")

    def align_layer(i: int) -> torch.Tensor:  # runs in a worker thread
        rows_b = _neuron_rows(spec, sd_b, keys[i], mlp(i), None, device)  # (n_neurons, hidden)
        rows_f = _neuron_rows(spec, sd_f, keys[i], mlp(i), resid, device)  # (n_neurons, hidden)
        return _match_rows(rows_b, rows_f, method, (seed, 1, i))  # (n_neurons,)

    n = sd_b[keys[0]].shape[spec.axis(keys[0], mlp(0))]
    mlps = map_in_threads(align_layer, range(len(keys)), item_bytes=3 * n * n * 8)
    perm: Perm = {RESID: resid}
    for i, p in enumerate(tqdm(mlps, total=len(keys), desc="align MLP", disable=not progress)):
        perm[mlp(i)] = p
    return perm
