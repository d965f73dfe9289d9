"""MLP activations in one forward pass per model, hooked on every layer at once (the streaming Gram
accumulators of two models in lockstep, built on these hooks, are tracing/grams.py).

    acts = sample_activations(model, spec, blocks, positions=sample_positions(n, 2048, seed))
    acts["gate", 3]                 # (n_positions, width): a bounded, seeded, uniform sample of token positions
    cov = mlp_input_covariances(model, spec, blocks)   # layer -> X'ᵀX' of the MLP inputs (drift-free tests)
    hooks = Hooks(model, {("up", 0): "model.layers.0.mlp.up_proj"}, fn); hooks.run(model, ids); hooks.remove()
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from tracing.arch import ArchSpec
from tracing.devices import model_device
from tracing.errors import TracingError


class _StopForward(Exception):
    """Raised by the last hook of a pass: nothing after the last hooked module is needed."""


def projection_modules(spec: ArchSpec, layer: int, projs: Sequence[str]) -> dict[str, str]:
    """Module names of the MLP input projections `projs` ("gate", "up") of one layer."""
    roles = spec.layers[layer]
    out = {}
    for p in projs:
        name = roles.gate_module if p == "gate" else roles.up_module
        if name is None:
            raise TracingError(f"{spec.model_type} has no gated MLP (no gate_proj); "
                               "use a statistic on up-projections instead: csh, csu")
        out[p] = name
    return out


def check_layers(layers: Sequence[int] | None, n_layers: int, what: str = "--layers") -> list[int]:
    """Validate a layer subset against a model depth; None means every layer."""
    if layers is None:
        return list(range(n_layers))
    layers = list(layers)
    if not layers:
        raise TracingError(f"{what} is empty; give layer indices between 0 and {n_layers - 1}")
    bad = [i for i in layers if not 0 <= int(i) < n_layers]
    if bad:
        raise TracingError(f"{what} {bad} out of range: the model has {n_layers} layers "
                           f"(valid: 0..{n_layers - 1})")
    return sorted({int(i) for i in layers})


def check_blocks(blocks: torch.Tensor | None) -> torch.Tensor:
    """(n_blocks, block_size) token ids; zero tokens is a user error, not an empty result."""
    if blocks is None or blocks.numel() == 0:
        raise TracingError("no tokens collected: the dataset is empty or shorter than one block; "
                           "use a longer dataset, a smaller --block_size or more --n_blocks")
    if blocks.dim() == 1:
        blocks = blocks[None]
    return blocks


def mlp_width(model: torch.nn.Module, spec: ArchSpec, layer: int = 0) -> int:
    """MLP neurons of one layer (the up projection's output width)."""
    return module_width(model, spec.layers[layer].up_module)


def module_width(model: torch.nn.Module, name: str) -> int:
    """Output width of a hooked module (GPT-2's Conv1D has nf)."""
    m = model.get_submodule(name)
    return m.nf if hasattr(m, "nf") else m.out_features  # GPT-2 Conv1D has nf


class Hooks:
    """Forward hooks on named modules; after all `n_expected` hooks fired, the forward pass stops."""

    def __init__(self, model: torch.nn.Module, names: dict[tuple[str, int], str], fn, inputs: bool = False):
        self.calls = 0
        self.n_expected = len(names)
        self.handles = []
        self.inputs = inputs  # hand fn the module's input instead of its output
        for key, name in names.items():
            self.handles.append(model.get_submodule(name).register_forward_hook(self._make(key, fn)))

    def _make(self, key, fn):
        def hook(module, inputs, output):
            x = inputs[0] if self.inputs else output
            fn(key, x.detach().reshape(-1, x.shape[-1]))  # (tokens, width)
            self.calls += 1
            if self.calls == self.n_expected:
                raise _StopForward
        return hook

    def run(self, model: torch.nn.Module, ids: torch.Tensor) -> None:
        self.calls = 0
        try:
            model(input_ids=ids.to(model_device(model)), use_cache=False)
        except _StopForward:
            pass
        if self.calls != self.n_expected:
            raise RuntimeError(f"only {self.calls} of {self.n_expected} activation hooks fired")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def sample_positions(n_tokens: int, max_tokens: int | None, seed: int) -> torch.Tensor:
    """Sorted flat token positions, uniformly sampled without replacement (all when max_tokens is None)."""
    if max_tokens is None or max_tokens >= n_tokens:
        return torch.arange(n_tokens)
    if max_tokens < 1:
        raise TracingError(f"--max_tokens must be positive, got {max_tokens}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_tokens, generator=g)[:max_tokens].sort().values


@torch.no_grad()
def sample_activations(model: torch.nn.Module, spec: ArchSpec, blocks: torch.Tensor, *,
                       projs: Sequence[str] = ("gate", "up"), layers: Sequence[int] | None = None,
                       positions: torch.Tensor | None = None, batch_size: int = 1,
                       counter: dict | None = None, progress: bool = True) -> dict[tuple[str, int], torch.Tensor]:
    """One forward pass over `blocks`; returns (proj, layer) -> activations (n_positions, width) at the given
    flat token `positions` (sorted; default: all tokens)."""
    blocks = check_blocks(blocks)
    layers = check_layers(layers, spec.n_layers)
    T = blocks.shape[1]
    positions = torch.arange(blocks.numel()) if positions is None else positions
    names = {(p, i): n for i in layers for p, n in projection_modules(spec, i, projs).items()}
    parts: dict = {k: [] for k in names}
    current = {"rows": None}

    def keep(key, x):  # x: (B·T, width)
        parts[key].append(x.index_select(0, current["rows"].to(x.device)).float().cpu())

    hooks = Hooks(model, names, keep)
    try:
        for s in tqdm(range(0, len(blocks), batch_size), desc="activations", disable=not progress):
            ids = blocks[s:s + batch_size]  # (B, T)
            lo, hi = s * T, (s + len(ids)) * T
            rows = positions[(positions >= lo) & (positions < hi)] - lo
            if len(rows) == 0:
                continue
            current["rows"] = rows
            hooks.run(model, ids)
    finally:
        hooks.remove()
    if counter is not None:
        counter["forward_passes"] = counter.get("forward_passes", 0) + 1
    return {k: torch.cat(v) for k, v in parts.items()}  # (n_positions, width)


@torch.no_grad()
def mlp_input_covariances(model: torch.nn.Module, spec: ArchSpec, blocks: torch.Tensor, *,
                          layers: Sequence[int] | None = None, batch_size: int = 1, counter: dict | None = None,
                          progress: bool = True) -> dict[int, torch.Tensor]:
    """One forward pass; layer -> Σ = X'ᵀX' (hidden + 1, hidden + 1) float64, where X' is the MLP input of the
    layer (what gate/up read) over every token, with a column of ones appended (so biases fold in).

    Any linear map W' = [W | b] of these inputs has Gram matrices W'_1 Σ W'_2ᵀ: matching on them needs no
    stored activation and no forward pass of the model that owns W'."""
    blocks = check_blocks(blocks)
    layers = check_layers(layers, spec.n_layers)
    cov: dict[int, torch.Tensor] = {}

    def add(key, x):  # x: (tokens, hidden)
        x1 = torch.cat([x.float(), x.new_ones(len(x), 1, dtype=torch.float32)], dim=1)  # (tokens, hidden + 1)
        c = (x1.T @ x1).double().cpu()  # per-batch product in float32
        cov[key[1]] = c if key[1] not in cov else cov[key[1]] + c

    hooks = Hooks(model, {("in", i): spec.layers[i].up_module for i in layers}, add, inputs=True)
    try:
        for s in tqdm(range(0, len(blocks), batch_size), desc="MLP inputs", disable=not progress):
            hooks.run(model, blocks[s:s + batch_size])
    finally:
        hooks.remove()
    if counter is not None:
        counter["forward_passes"] = counter.get("forward_passes", 0) + 1
        counter["n_tokens"] = int(blocks.numel())
    return cov
