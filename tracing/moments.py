"""Second moments of two models' MLP inputs over the same tokens, in one forward pass per model: enough to compare
any linear units of those inputs (every expert of an MoE layer, a router, a dense MLP) without hooking them.

    for m in input_moments(base, ft, spec_a, spec_b, blocks):   # MLP inputs' moments (any linear unit, experts)
        cos, ok_a, ok_b = m.compare(w_base, w_ft)               # units u = W x of the two models over the tokens
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tracing.activations import Hooks, check_blocks, check_layers
from tracing.arch import ArchSpec
from tracing.errors import TracingError


@dataclass
class InputMoments:
    """Second moments of one layer's MLP inputs (what the router, the experts and a dense MLP read) in two models on
    the same tokens, with a column of ones appended (so means come out too): enough to compare any linear units of
    those inputs, e.g. every expert's up projection over every token, without hooking them. CPU float64."""

    layer: int
    base: torch.Tensor  # (hidden_A + 1, hidden_A + 1): Σ x̃ x̃ᵀ over tokens, x̃ = [x, 1]
    ft: torch.Tensor  # (hidden_B + 1, hidden_B + 1)
    cross: torch.Tensor  # (hidden_A + 1, hidden_B + 1): Σ x̃_A x̃_Bᵀ
    n_tokens: int

    def compare(self, w_base: torch.Tensor, w_ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For units u = W x (rows of w_base (n, hidden_A), w_ft (m, hidden_B); no bias): the cosine similarity of
        every unit pair over the tokens (n, m), and the units of each side that vary (not constant, finite)."""
        wa, wb = (torch.cat([w.double(), w.new_zeros(len(w), 1, dtype=torch.float64)], 1) for w in (w_base, w_ft))
        gram = wa @ self.cross @ wb.T  # (n, m): Σ_t u_i(t) v_j(t)
        sq_a, sq_b = ((w @ s * w).sum(1) for w, s in ((wa, self.base), (wb, self.ft)))  # Σ_t u_i(t)²
        cos = gram / (sq_a.sqrt().clamp_min(1e-30)[:, None] * sq_b.sqrt().clamp_min(1e-30)[None, :])
        return cos, self._varies(wa, self.base, sq_a), self._varies(wb, self.ft, sq_b)

    def _varies(self, w: torch.Tensor, s: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        mean = w @ s[:, -1] / self.n_tokens  # (n,): the ones column's products are the sums of the inputs
        var = sq / self.n_tokens - mean.square()
        return torch.isfinite(var) & (var > FLAT_VAR * sq / self.n_tokens)


FLAT_VAR = 1e-10  # a unit whose variance over the tokens is below this fraction of its mean square is constant


@torch.no_grad()
def input_moments(base: torch.nn.Module, ft: torch.nn.Module, spec_base: ArchSpec, spec_ft: ArchSpec,
                  blocks: torch.Tensor, *, layers: Sequence[int] | None = None, batch_size: int = 1,
                  counter: dict | None = None, progress: bool = True) -> Iterator[InputMoments]:
    """One forward pass per model, in lockstep: `InputMoments` of every layer's MLP input (the MLP module's input,
    hooked), 3 (hidden + 1)² float64 per layer, independent of the number of tokens."""
    blocks = check_blocks(blocks)
    if spec_base.n_layers != spec_ft.n_layers:
        raise TracingError(f"the models have different depths ({spec_base.n_layers} vs {spec_ft.n_layers} "
                           "layers); use csu_all or match_all, which compare every layer pair")
    layers = check_layers(layers, spec_base.n_layers)
    sums: dict = {}  # (side, layer) -> Σ; "held" keeps base's inputs of the current batch
    held: dict = {}

    def ones(x: torch.Tensor) -> torch.Tensor:  # (tokens, hidden + 1) float64
        return torch.cat([x.double(), x.new_ones(len(x), 1, dtype=torch.float64)], 1)

    def add(key, value: torch.Tensor) -> None:
        sums[key] = value if key not in sums else sums[key] + value

    def keep_a(key, x):
        held[key] = ones(x)
        add(("base", key[1]), held[key].T @ held[key])

    def accumulate_b(key, y):
        y = ones(y).to(held[key].device)
        add(("ft", key[1]), y.T @ y)
        add(("cross", key[1]), held.pop(key).T @ y)

    names_a = {("in", i): spec_base.layers[i].mlp_module for i in layers}
    names_b = {("in", i): spec_ft.layers[i].mlp_module for i in layers}
    def both(key, x):  # base and ft are the same module: one pass serves both sides
        keep_a(key, x)
        accumulate_b(key, x)

    runs = [(base, Hooks(base, names_a, both, inputs=True))] if ft is base else \
        [(base, Hooks(base, names_a, keep_a, inputs=True)), (ft, Hooks(ft, names_b, accumulate_b, inputs=True))]
    try:
        for s in tqdm(range(0, len(blocks), batch_size), desc="MLP inputs", disable=not progress):
            for model, hooks in runs:  # lockstep: A then B on the same batch (ft may be base itself)
                hooks.run(model, blocks[s:s + batch_size])
    finally:
        for _, hooks in runs:
            hooks.remove()
    if counter is not None:
        counter.update(forward_passes=1, n_tokens=int(blocks.numel()))
    for i in layers:
        yield InputMoments(i, sums[("base", i)].cpu(), sums[("ft", i)].cpu(), sums[("cross", i)].cpu(),
                           int(blocks.numel()))
