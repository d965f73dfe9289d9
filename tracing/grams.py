"""Streaming sufficient statistics of two models' MLP activations, for neuron matching in one pass per model.

    for lg in layer_grams(base, ft, spec_a, spec_b, blocks, projs=("gate", "up"), counter=c):
        cost = lg.sq_dist("gate")   # (width_A, width_B) float64, on the CPU
        ok_a, ok_b = lg.usable("gate", "up")   # (width_A,), (width_B,) units usable in both projections
        sim = lg.screen_cosine("gate")  # for the greedy screen; lg.cosine("gate"): (width_A, width_B) float64
    c["forward_passes"]             # passes per model (1 unless chunked)

Both models run batch by batch in lockstep over the same token blocks; hooks on the MLP input projections
(gate_proj / up_proj outputs, pre-activation; c_fc / dense_h_to_4h for GPT-2/NeoX) accumulate per layer the Gram
matrix G = X_Aᵀ X_B (width_A, width_B), the squared column norms of X_A and X_B, and each unit's smallest and
largest value (degenerate units: tracing.matching.usable_from_range); products of bf16 activations (a model run in
bf16) on a CPU run on its bf16 units with float32 accumulation (tracing.cosines.bf16_products). Memory is
O(layers · width²), independent of the number of tokens. While the tokens are fewer than the units, each layer keeps
its activations instead, O(layers · tokens · width), and its sums are made when it is first used; on a CPU with bf16
units, a related layer's matching then needs no Gram matrix at all (LayerGram.screen_cosine). When what is kept
would exceed the budget (`--memory_budget`; default: half the free memory of the models' device, RAM on a CPU) the
layers are processed in chunks, one more pass per chunk. MoE layers: tracing.moments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from tracing.activations import Hooks, check_blocks, check_layers, module_width, projection_modules
from tracing.arch import ArchSpec
from tracing.cosines import LazyCosine, bf16_products, cpu_has_bf16
from tracing.devices import model_device
from tracing.errors import TracingError
from tracing.matching import euclid_similarity, free_memory, usable_from_range

BUDGET_FRACTION = 0.5  # of the free device memory (RAM on a CPU) that accumulators may take by default


def accumulator_budget(device: torch.device, override: int | None = None) -> int:
    """Bytes the Gram accumulators of one pass may take: `override` (--memory_budget), else BUDGET_FRACTION of
    the free memory of `device` (RAM for a CPU), which leaves the rest to the matchings that follow."""
    return int(override) if override is not None else int(BUDGET_FRACTION * free_memory(device))


class LayerGram:
    """Streaming sufficient statistics of one layer for cosine / Euclidean neuron matching (CPU tensors), made when
    first asked for: in the worker thread that tests the layer, not in the thread that runs the models.

    gram[proj]: (width_A, width_B) float64, the sum over tokens of a_i b_j; sq_base[proj] (width_A,) and
    sq_ft[proj] (width_B,): sums of squares; range_base[proj], range_ft[proj]: each unit's (smallest, largest)
    value (float64)."""

    def __init__(self, layer: int, n_tokens: int, parts: dict[str, _Part]):
        self.layer, self.n_tokens = layer, n_tokens
        self._parts = parts  # proj -> its sums, or the activations they are made from

    gram = property(lambda self: {p: part.gram().double() for p, part in self._parts.items()})
    sq_base = property(lambda self: {p: part.moments()[0] for p, part in self._parts.items()})
    sq_ft = property(lambda self: {p: part.moments()[1] for p, part in self._parts.items()})
    range_base = property(lambda self: {p: part.moments()[2] for p, part in self._parts.items()})
    range_ft = property(lambda self: {p: part.moments()[3] for p, part in self._parts.items()})

    def usable(self, *projs: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Units of A (width_A,) and B (width_B,) that are finite and not constant in every one of `projs`."""
        ok_a = torch.stack([usable_from_range(*self._parts[p].moments()[2]) for p in projs]).all(dim=0)
        ok_b = torch.stack([usable_from_range(*self._parts[p].moments()[3]) for p in projs]).all(dim=0)
        return ok_a, ok_b

    def cosine(self, proj: str) -> torch.Tensor:
        """Cosine similarity of every neuron of A with every neuron of B over the tokens: (width_A, width_B)."""
        sq_a, sq_b = self._parts[proj].moments()[:2]
        na, nb = sq_a.sqrt().clamp_min(1e-30), sq_b.sqrt().clamp_min(1e-30)
        return torch.div(self._parts[proj].gram(), na[:, None]).div_(nb[None, :])  # float64 (exact upcast of the sums)

    def screen_cosine(self, proj: str) -> torch.Tensor | LazyCosine:
        """cosine(proj), or where the layer kept bf16 activations on a CPU with bf16 units, a LazyCosine of them
        whose exact() is cosine(proj): where its certificate finds every unit's strict, distinct best partner (a
        related layer) those are the pairs matching.pair_units finds in cosine(proj), with no Gram matrix made;
        elsewhere pair_units matches on cosine(proj) itself (tracing.cosines)."""
        part = self._parts[proj]
        if part.acts is None or not all(t.dtype == torch.bfloat16 and t.is_cpu for t in part.acts) \
                or not cpu_has_bf16():
            return self.cosine(proj)
        x, y = part.acts  # (tokens, width_A), (tokens, width_B): a unit's activations are a column
        inv_a, inv_b = (sq.sqrt().clamp_min(1e-30).reciprocal().float() for sq in part.moments()[:2])  # cosine's norms
        return LazyCosine(x.T, y.T, inv_a, inv_b, exact=lambda: self.cosine(proj))

    def euclid(self, proj: str) -> torch.Tensor:
        """-|a_i - b_j|² / 2 (width_A, width_B) float64: tracing.matching.euclid_similarity, the original's cost."""
        sq_a, sq_b = self._parts[proj].moments()[:2]
        return euclid_similarity(self._parts[proj].gram(), sq_a, sq_b)

    def sq_dist(self, proj: str) -> torch.Tensor:
        """Squared Euclidean distance between activation vectors: (width_A, width_B), -2 euclid(proj)."""
        return self.euclid(proj).mul_(-2).clamp_min_(0)


class _Part:
    """One projection of one layer: its sums moved to the CPU when first read, or, where the activations were kept
    (`acts`: (x (tokens, width_A), y (tokens, width_B)) on the models' device), made from them when first read:
    moments() (sq_a, sq_b, range_a, range_b) float64 and gram() (width_A, width_B) as accumulated (acc_dtype; from
    activations, made at each call and not kept)."""

    def __init__(self, acc_dtype: torch.dtype, sums: tuple | None = None, acts: tuple | None = None):
        self.acc_dtype, self._sums, self.acts = acc_dtype, sums, acts
        self._moments: tuple | None = None
        self._gram: torch.Tensor | None = None

    def moments(self) -> tuple:
        if self._moments is None:
            if self._sums is not None:
                sq_a, sq_b, range_a, range_b = self._sums[1:]
            else:
                x, y = self.acts
                sq_a, sq_b, range_a, range_b = _square_sums(x), _square_sums(y), _range(x), _range(y)
            self._moments = (_cpu64(sq_a), _cpu64(sq_b), *(tuple(map(_cpu64, r)) for r in (range_a, range_b)))
        return self._moments

    def gram(self) -> torch.Tensor:
        if self._sums is None:  # made again if asked again: a matching needs it once, and it is the largest part
            return _product(*self.acts, self.acc_dtype).cpu()
        if self._gram is None:
            self._gram = self._sums[0].cpu()
        return self._gram


def _square_sums(x: torch.Tensor) -> torch.Tensor:
    """Σ_t x_t² of each column of x (tokens, width): (width,) float64, summed in float32."""
    return x.to(torch.float32, copy=True).square_().sum(0).double()  # a float32 copy, squared in place


def _range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(smallest, largest) value of each column of x (tokens, width), as stored."""
    return x.amin(dim=0), x.amax(dim=0)


def _product(x: torch.Tensor, y: torch.Tensor, acc_dtype: torch.dtype, out: torch.Tensor | None = None) \
        -> torch.Tensor:
    """x.T @ y (width_A, width_B) in acc_dtype for x (tokens, width_A), y (tokens, width_B), added into `out` when
    given. bf16 activations on a CPU: products on the bf16 units (exact inputs), float32 accumulation."""
    y = y.to(x.device)
    exact_bf16 = x.dtype == y.dtype == torch.bfloat16 and acc_dtype == torch.float32 and x.is_cpu
    xt, y = x.T.to(acc_dtype), y.to(acc_dtype)  # (width_A, tokens), (tokens, width_B)
    with bf16_products() if exact_bf16 else contextlib.nullcontext():
        return xt @ y if out is None else out.addmm_(xt, y)


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
        _add(self.sq_a, key, _square_sums(x))
        _extend_range(self.range_a, key, x)

    def add_b(self, key, y: torch.Tensor) -> None:  # y: (tokens, width_B)
        _extend_range(self.range_b, key, y)
        self.gram[key] = _product(self.held.pop(key), y, self.acc_dtype, self.gram.get(key))
        _add(self.sq_b, key, _square_sums(y))

    def take(self, key) -> _Part:
        """The key's sums, taken out (moved to the CPU when first read)."""
        return _Part(self.acc_dtype, sums=tuple(d.pop(key) for d in (self.gram, self.sq_a, self.sq_b, self.range_a,
                                                                        self.range_b)))


def _extend_range(ranges: dict, key, x: torch.Tensor) -> None:
    """ranges[key] = (smallest, largest) value of each column of x (tokens, width) so far."""
    lo, hi = _range(x)
    if key in ranges:
        lo, hi = torch.minimum(ranges[key][0], lo), torch.maximum(ranges[key][1], hi)
    ranges[key] = (lo, hi)


class _Tokens:
    """Each key's activations of every batch, kept as they are, and summed when the layer is first used: fewer bytes
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

    def take(self, key) -> _Part:
        a, b = self.a.pop(key), self.b.pop(key)
        return _Part(self.acc_dtype, acts=tuple(torch.cat(x) if len(x) > 1 else x[0] for x in (a, b)))


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
