"""Streaming sufficient statistics of two models' MLP activations, for neuron matching in one pass per model.

    for lg in layer_grams(base, ft, spec_a, spec_b, blocks, projs=("gate", "up"), counter=c):
        cost = lg.sq_dist("gate")   # (width_A, width_B) float64, on the CPU
        ok_a, ok_b = lg.usable("gate", "up")   # (width_A,), (width_B,) units usable in both projections
    c["forward_passes"]             # passes per model (1 unless chunked)
    for m in input_moments(base, ft, spec_a, spec_b, blocks):   # MLP inputs' moments (any linear unit, experts)
        cos, ok_a, ok_b = m.compare(w_base, w_ft)               # units u = W x of the two models over the tokens

Both models run batch by batch in lockstep over the same token blocks; hooks on the MLP input projections
(gate_proj / up_proj outputs, pre-activation; c_fc / dense_h_to_4h for GPT-2/NeoX) accumulate per layer the Gram
matrix G = X_Aᵀ X_B (width_A, width_B), the squared column norms of X_A and X_B, and each unit's smallest and
largest value (degenerate units: tracing.matching.usable_from_range); products of bf16 activations (a model run in
bf16) on a CPU run on its bf16 units with float32 accumulation (tracing.cosines.bf16_products). Memory is
O(layers · width²), independent of the number of tokens (while the tokens are fewer than the units, each layer keeps its
activations instead, O(layers · tokens · width), and its sums are made when it is first used); when what is kept
would exceed the budget (`--memory_budget`; default: half the free memory of the models' device, RAM on a CPU) the
layers are processed in chunks, one more pass per chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tracing.activations import Hooks, check_blocks, check_layers, module_width, projection_modules
from tracing.arch import ArchSpec
from tracing.cosines import bf16_products
from tracing.devices import model_device
from tracing.errors import TracingError
from tracing.matching import euclid_similarity, free_memory, usable_from_range

BUDGET_FRACTION = 0.5  # of the free device memory (RAM on a CPU) that accumulators may take by default


def accumulator_budget(device: torch.device, override: int | None = None) -> int:
    """Bytes the Gram accumulators of one pass may take: `override` (--memory_budget), else BUDGET_FRACTION of
    the free memory of `device` (RAM for a CPU), which leaves the rest to the matchings that follow."""
    return int(override) if override is not None else int(BUDGET_FRACTION * free_memory(device))


class LayerGram:
    """Streaming sufficient statistics of one layer for cosine / Euclidean neuron matching (CPU tensors, float64),
    made when first asked for: in the worker thread that tests the layer, not in the thread that runs the models.

    gram[proj]: (width_A, width_B), the sum over tokens of a_i b_j; sq_base[proj] (width_A,) and sq_ft[proj]
    (width_B,): sums of squares; range_base[proj], range_ft[proj]: each unit's (smallest, largest) value."""

    def __init__(self, layer: int, n_tokens: int, make: dict[str, Callable[[], tuple]]):
        self.layer, self.n_tokens = layer, n_tokens
        self._make = make  # proj -> () -> (gram, sq_base, sq_ft, range_base, range_ft)
        self._sums: dict[str, tuple] | None = None

    def _field(self, k: int) -> dict:
        if self._sums is None:  # not functools.cached_property: its lock (one per class before 3.12) stalls workers
            self._sums = {p: make() for p, make in self._make.items()}
            self._make = {}  # what they were made from is freed
        return {p: s[k] for p, s in self._sums.items()}

    gram = property(lambda self: {p: g.double() for p, g in self._field(0).items()})  # kept in acc_dtype
    sq_base = property(lambda self: self._field(1))
    sq_ft = property(lambda self: self._field(2))
    range_base = property(lambda self: self._field(3))
    range_ft = property(lambda self: self._field(4))

    def usable(self, *projs: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Units of A (width_A,) and B (width_B,) that are finite and not constant in every one of `projs`."""
        ok_a = torch.stack([usable_from_range(*self.range_base[p]) for p in projs]).all(dim=0)
        ok_b = torch.stack([usable_from_range(*self.range_ft[p]) for p in projs]).all(dim=0)
        return ok_a, ok_b

    def cosine(self, proj: str) -> torch.Tensor:
        """Cosine similarity of every neuron of A with every neuron of B over the tokens: (width_A, width_B)."""
        na = self.sq_base[proj].sqrt().clamp_min(1e-30)
        nb = self.sq_ft[proj].sqrt().clamp_min(1e-30)
        return torch.div(self._field(0)[proj], na[:, None]).div_(nb[None, :])  # float64 (exact upcast of the sums)

    def euclid(self, proj: str) -> torch.Tensor:
        """-|a_i - b_j|² / 2 (width_A, width_B) float64: tracing.matching.euclid_similarity, the original's cost."""
        return euclid_similarity(self._field(0)[proj], self.sq_base[proj], self.sq_ft[proj])

    def sq_dist(self, proj: str) -> torch.Tensor:
        """Squared Euclidean distance between activation vectors: (width_A, width_B)."""
        d = self.sq_base[proj][:, None] + self.sq_ft[proj][None, :] - 2 * self.gram[proj]
        return d.clamp_min(0)


def _extend_range(ranges: dict, key, x: torch.Tensor) -> None:
    """ranges[key] = (smallest, largest) value of each column of x (tokens, width) so far."""
    lo, hi = x.amin(dim=0), x.amax(dim=0)
    if key in ranges:
        lo, hi = torch.minimum(ranges[key][0], lo), torch.maximum(ranges[key][1], hi)
    ranges[key] = (lo, hi)


def _cpu64(t: torch.Tensor) -> torch.Tensor:
    """A float64 CPU copy (a yielded layer frees its device memory)."""
    return t.cpu().double()


class _Sums:
    """Running sums over batches for each (proj, layer) key: the Gram matrix (acc_dtype), the squared column norms
    (float64) and the range of each unit; A's activations are held only until B's of the same batch arrive."""

    def __init__(self, acc_dtype: torch.dtype):
        self.acc_dtype = acc_dtype
        self.gram: dict = {}  # key -> (width_A, width_B)
        self.sq_a: dict = {}  # key -> (width_A,)
        self.sq_b: dict = {}
        self.range_a: dict = {}  # key -> (smallest, largest) value of each unit
        self.range_b: dict = {}
        self.held: dict = {}  # A's activations of the current batch

    def add_a(self, key, x: torch.Tensor) -> None:  # x: (tokens, width_A)
        self.held[key] = x
        _add(self.sq_a, key, x.float().square().sum(0).double())  # per-batch sum in float32
        _extend_range(self.range_a, key, x)

    def add_b(self, key, y: torch.Tensor) -> None:  # y: (tokens, width_B)
        x = self.held.pop(key)
        y = y.to(x.device)
        _extend_range(self.range_b, key, y)  # as stored (the same smallest and largest values as a float copy's)
        exact_bf16 = x.dtype == y.dtype == torch.bfloat16 and self.acc_dtype == torch.float32 and x.is_cpu
        xt, y = x.T.to(self.acc_dtype), y.to(self.acc_dtype)  # (width_A, tokens), (tokens, width_B)
        with bf16_products() if exact_bf16 else contextlib.nullcontext():  # bf16 activations: exact inputs
            if key in self.gram:
                self.gram[key].addmm_(xt, y)
            else:
                self.gram[key] = xt @ y
        _add(self.sq_b, key, y.float().square().sum(0).double())

    def take(self, key) -> Callable[[], tuple]:
        """The key's sums, taken out: a call moves (gram, sq_a, sq_b, range_a, range_b) to the CPU, the Gram matrix
        as accumulated (LayerGram converts it when read), the others in float64."""
        sums = (self.gram.pop(key), self.sq_a.pop(key), self.sq_b.pop(key), self.range_a.pop(key),
                self.range_b.pop(key))
        return lambda: (sums[0].cpu(), *map(_cpu64, sums[1:3]), *(tuple(map(_cpu64, r)) for r in sums[3:]))


class _Tokens:
    """Each key's activations of every batch, kept as they are, and summed when the layer is finished: fewer bytes
    than a Gram matrix while the tokens are fewer than the units (one Gram matrix alive at a time, not one per
    layer, and no (width_A, width_B) accumulator touched during the passes)."""

    def __init__(self, acc_dtype: torch.dtype):
        self.acc_dtype = acc_dtype
        self.a: dict = {}  # key -> [(tokens, width_A) per batch]
        self.b: dict = {}

    def add_a(self, key, x: torch.Tensor) -> None:  # x: (tokens, width_A)
        self.a.setdefault(key, []).append(x)

    def add_b(self, key, y: torch.Tensor) -> None:  # y: (tokens, width_B)
        self.b.setdefault(key, []).append(y)

    def take(self, key) -> Callable[[], tuple]:
        a, b = self.a.pop(key), self.b.pop(key)

        def make() -> tuple:
            sums = _Sums(self.acc_dtype)  # all tokens as one batch
            sums.add_a(key, torch.cat(a) if len(a) > 1 else a[0])
            sums.add_b(key, torch.cat(b) if len(b) > 1 else b[0])
            return sums.take(key)()
        return make


def _add(sums: dict, key, value: torch.Tensor) -> None:
    sums[key] = value if key not in sums else sums[key].add_(value)


@torch.no_grad()
def layer_grams(base: torch.nn.Module, ft: torch.nn.Module, spec_base: ArchSpec, spec_ft: ArchSpec,
                blocks: torch.Tensor, *, projs: Sequence[str] = ("gate", "up"),
                layers: Sequence[int] | None = None, batch_size: int = 1,
                budget_bytes: int | None = None, acc_dtype: torch.dtype = torch.float32,
                counter: dict | None = None, progress: bool = True) -> Iterator[LayerGram]:
    """Yield one `LayerGram` per layer (same layer index in both models), running the models in lockstep.

    Each chunk of layers costs one forward pass per model over `blocks` (chunks: accumulator_budget);
    `counter["forward_passes"]` (passes per model), `counter["chunks"]`, `counter["budget_bytes"]`,
    `counter["kept"]` ("sums", or "activations" when the tokens take fewer bytes than the Gram matrices) and
    `counter["layer_bytes"]` (what one layer keeps) are updated when given. What is kept lives on the models'
    device; each layer moves to the CPU when it is first used (in the thread that uses it).
    """
    blocks = check_blocks(blocks)
    if spec_base.n_layers != spec_ft.n_layers:
        raise TracingError(f"the models have different depths ({spec_base.n_layers} vs {spec_ft.n_layers} "
                           "layers); use match_all, which compares every layer pair")
    layers = check_layers(layers, spec_base.n_layers)
    dev = model_device(base)
    names_a = {(p, i): n for i in layers for p, n in projection_modules(spec_base, i, projs).items()}
    names_b = {(p, i): n for i in layers for p, n in projection_modules(spec_ft, i, projs).items()}
    widths = {k: (module_width(base, names_a[k]), module_width(ft, names_b[k])) for k in names_a}
    acc_size, tokens = torch.empty((), dtype=acc_dtype).element_size(), int(blocks.numel())
    act_size = max(p.element_size() for m in (base, ft) for p in m.parameters() if p.is_floating_point())

    def layer_bytes(layer: int, keep_tokens: bool) -> int:
        return sum(tokens * (wa + wb) * act_size if keep_tokens else (wa * wb + wa + wb) * acc_size
                   for (p, i), (wa, wb) in widths.items() if i == layer)

    keep_tokens = sum(layer_bytes(i, True) for i in layers) < sum(layer_bytes(i, False) for i in layers)
    per_layer = max(layer_bytes(i, keep_tokens) for i in layers)
    budget = accumulator_budget(dev, budget_bytes)
    per_chunk = max(1, budget // max(per_layer, 1))
    chunks = [layers[k:k + per_chunk] for k in range(0, len(layers), per_chunk)]
    if counter is not None:
        counter.update(forward_passes=0, chunks=len(chunks), n_tokens=tokens, budget_bytes=budget,
                       kept="activations" if keep_tokens else "sums", layer_bytes=per_layer)

    for chunk in chunks:
        keys = [k for k in names_a if k[1] in chunk]
        kept = _Tokens(acc_dtype) if keep_tokens else _Sums(acc_dtype)

        def both(key, x):  # base and ft are the same module: one pass serves both sides
            kept.add_a(key, x)
            kept.add_b(key, x)

        if ft is base:
            runs = [(base, Hooks(base, {k: names_a[k] for k in keys}, both))]
        else:
            runs = [(base, Hooks(base, {k: names_a[k] for k in keys}, kept.add_a)),
                    (ft, Hooks(ft, {k: names_b[k] for k in keys}, kept.add_b))]
        try:
            batches = range(0, len(blocks), batch_size)
            for s in tqdm(batches, desc=f"activations layers {chunk[0]}-{chunk[-1]}", disable=not progress):
                ids = blocks[s:s + batch_size]  # (B, T)
                for model, hooks in runs:  # lockstep: A then B on the same batch
                    hooks.run(model, ids)
        finally:
            for _, hooks in runs:
                hooks.remove()
        if counter is not None:
            counter["forward_passes"] += 1
        for i in chunk:
            yield LayerGram(i, tokens, {p: kept.take((p, i)) for p in projs if (p, i) in widths})


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
