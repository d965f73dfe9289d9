"""The ArchSpec data types: one declarative description of an architecture, and the names of its permutations.

For each state-dict key the spec holds a tuple with one entry per tensor axis, naming the permutation that acts
on that axis or None:

    "resid"          the residual stream
    "mlp.{i}"        the neurons of layer i's dense MLP (a dense layer's MLP, or an MoE layer's shared expert)
    "experts.{i}"    the routed experts of layer i (the stacked expert axis, always axis 0, and the router's rows)
    "mlp.{i}.*"      the neurons of each routed expert of layer i: for the slice at index e of the experts axis,
                     the permutation "mlp.{i}.{e}" acts on this axis

A permutation of the experts moves whole experts (new slot e = old expert p[e]); "mlp.{i}.{e}" then permutes the
neurons of the expert in slot e, so a Perm {"experts.3": p, "mlp.3.0": q0, ...} is applied axis by axis in order.
A fused tensor (`spec.fused[key]`) holds several projections of the same neurons on one axis (transformers 5's
`gate_up_proj`: gate rows, then up rows; gpt-oss: gate and up interleaved); its unit permutation is expanded to
every part (`unit_index`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from tracing.errors import TracingError

Axes = tuple  # tuple[str | None, ...], one entry per tensor axis
NormKind = Literal["rms", "rms_1p", "layer", "layer_nonparam"]
GROUPS = ("mlp", "attn", "norm", "emb")  # parameter groups: what group_of maps every key to
PROJECTIONS = ("gate", "up", "down")  # the MLP projections a fused tensor may hold

RESID = "resid"
_EXPERT_NEURONS = re.compile(r"mlp\.(\d+)\.(\d+)$")
_EXPERTS = re.compile(r"experts\.(\d+)$")


def mlp(i: int) -> str:
    """Name of the permutation acting on layer i's dense MLP neurons (or its MoE layer's shared expert)."""
    return f"mlp.{i}"


def experts(i: int) -> str:
    """Name of the permutation acting on layer i's routed experts (stacked expert axis, router rows)."""
    return f"experts.{i}"


def expert_mlp(i: int, e: int) -> str:
    """Name of the permutation acting on the neurons of the expert in slot e of layer i."""
    return f"mlp.{i}.{e}"


def per_expert(i: int) -> str:
    """The axis entry of a stacked tensor's neuron axis: "mlp.{i}.{e}" for the expert at index e."""
    return f"mlp.{i}.*"


def expert_of(name: str) -> tuple[int, int] | None:
    """(layer, slot) of an expert-neuron permutation name "mlp.{i}.{e}", else None."""
    m = _EXPERT_NEURONS.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def experts_layer(name: str) -> int | None:
    """The layer of an expert permutation name "experts.{i}", else None."""
    m = _EXPERTS.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Fused:
    """Several projections of the same units on one axis: `parts` in order, as halves or interleaved."""

    parts: tuple[str, ...] = ("gate", "up")
    interleaved: bool = False

    def index(self, p: torch.Tensor, n: int) -> torch.Tensor:
        """Index along the fused axis (len(parts) * n) that applies the unit permutation p (n,) to every part."""
        k = len(self.parts)
        if self.interleaved:  # [g0, u0, g1, u1, ...]
            return (p[:, None] * k + torch.arange(k, device=p.device)).reshape(-1)
        return torch.cat([p + j * n for j in range(k)])

    def part(self, rows: torch.Tensor, proj: str) -> torch.Tensor:
        """The rows of projection `proj` from rows (len(parts) * n, ...) of the fused axis: (n, ...)."""
        j, k = self.parts.index(proj), len(self.parts)
        return rows[j::k] if self.interleaved else rows.chunk(k)[j]


@dataclass(frozen=True)
class ExpertRoles:
    """The routed experts of one MoE block: stacked tensors, experts on axis 0.

    `gate_up` is a fused (E, 2I, H)-like tensor (`spec.fused` says how); otherwise `gate` / `up` are stacked
    separately. `router` has one row per expert. `n_groups` > 1: group-limited routing (DeepSeek-V3) over contiguous
    blocks of experts, so only permutations that keep the blocks are symmetries."""

    n_experts: int
    router: str  # (E, hidden): expert e's routing logit is row e
    down: str  # stacked output projections
    gate_up: str | None = None  # fused gate and up
    gate: str | None = None
    up: str | None = None
    router_extra: tuple[str, ...] = ()  # router bias, DeepSeek's e_score_correction_bias: (E,)
    n_groups: int = 1

    def key_of(self, proj: str) -> str:
        """The stacked key holding projection `proj` ("gate", "up", "down")."""
        if proj == "down":
            return self.down
        key = self.gate_up or (self.gate if proj == "gate" else self.up)
        if key is None:
            raise TracingError(f"these experts have no {proj} projection")
        return key

    @property
    def gated(self) -> bool:
        return self.gate_up is not None or self.gate is not None


@dataclass(frozen=True)
class LayerRoles:
    """One transformer block: its module paths and the keys the statistics need (weights as stored).

    up / gate / down name the block's dense MLP: a dense block's MLP, or an MoE block's shared expert; None in an
    MoE block without one. `moe` describes the routed experts of an MoE block (None in a dense block)."""

    prefix: str  # the block's module path, e.g. "model.layers.3"; every key of the block starts with it + "."
    mlp_module: str  # e.g. "model.layers.3.mlp": every MLP parameter lives under it (router and experts too)
    attn_module: str  # e.g. "model.layers.3.self_attn"
    up: str | None  # MLP input projection without activation (up_proj / c_fc / dense_h_to_4h)
    down: str | None  # MLP output projection
    gate: str | None = None  # gate_proj for gated MLPs, None otherwise
    pre_mlp_norm: str | None = None  # norm whose output feeds gate/up (None: non-parametric)
    pre_attn_norm: str | None = None  # norm whose output feeds q/k/v
    attn_in: tuple[str, ...] = ()  # q/k/v (or fused qkv) weights, read the residual stream
    attn_out: str = ""  # o_proj / dense / c_proj weight, writes the residual stream
    moe: ExpertRoles | None = None
    shared_gate: str | None = None  # (1, hidden): the shared expert's sigmoid gate (Qwen2-MoE)

    @property
    def up_module(self) -> str | None:
        return self.up.rsplit(".", 1)[0] if self.up else None

    @property
    def gate_module(self) -> str | None:
        return self.gate.rsplit(".", 1)[0] if self.gate else None

    @property
    def mlp_in(self) -> tuple[str, ...]:
        """Every weight that reads the pre-MLP norm's output: gate/up, router, stacked experts, shared gate."""
        dense = (self.gate, self.up, self.shared_gate)
        routed = () if self.moe is None else (self.moe.router, self.moe.gate_up, self.moe.gate, self.moe.up)
        return tuple(k for k in (*dense, *routed) if k)


class UnsupportedArchitecture(TracingError):
    pass


@dataclass(frozen=True)
class ArchSpec:
    family: str  # registry name, e.g. "llama"
    model_type: str  # config.model_type it was built for
    n_layers: int
    axes: dict[str, Axes]  # concrete state-dict key -> permutation name per axis
    layers: list[LayerRoles]
    embed: str  # token embedding (vocab, hidden)
    lm_head: str | None  # output projection (vocab, hidden); None if absent from state dict
    tied: bool  # lm_head shares storage with the embedding
    final_norm: str | None
    norm: NormKind
    conv1d: bool = False  # GPT-2 layout: weights stored (in, out)
    rotate_refusal: str | None = None  # why an orthogonal rotation is not function-preserving
    extra_embeds: tuple[str, ...] = field(default=())  # e.g. GPT-2 position embedding
    fused: dict[str, Fused] = field(default_factory=dict)  # key -> the projections its unit axis holds
    widths: dict[str, int] = field(default_factory=dict)  # axis name -> its size per the config (MoE families)
    layer_of: dict[str, int] = field(init=False, repr=False)  # key -> its block's index (keys in blocks only)
    group_of: dict[str, str] = field(init=False, repr=False)  # key -> "mlp" | "attn" | "norm" | "emb"

    def __post_init__(self) -> None:
        """Derive layer_of and group_of from the blocks' module paths (the only place that reads key strings)."""
        layer_of: dict[str, int] = {}
        group_of: dict[str, str] = {}
        starts = [(f"{r.prefix}.", f"{r.mlp_module}.", f"{r.attn_module}.", i) for i, r in enumerate(self.layers)]
        for key, ax in self.axes.items():
            group_of[key] = "emb"  # outside every block: embeddings, final norm, lm_head
            for block, mlp_mod, attn_mod, i in starts:
                if key.startswith(block):
                    layer_of[key] = i
                    group_of[key] = "mlp" if key.startswith(mlp_mod) else "attn" if key.startswith(attn_mod) \
                        else "norm"
                    break
            per = [a for a, name in enumerate(ax) if name is not None and name.endswith(".*")]
            assert not per or (ax[0] or "").startswith("experts."), f"{key}: expert neurons without an experts axis"
        object.__setattr__(self, "layer_of", layer_of)
        object.__setattr__(self, "group_of", group_of)

    # ------------------------------------------------------------------ helpers
    def axis(self, key: str, perm: str) -> int | None:
        """Index of the axis of `key` that `perm` acts on ("mlp.{i}.{e}": the stacked neuron axis), or None."""
        ax = self.axes[key]
        at = expert_of(perm)
        name = per_expert(at[0]) if at else perm
        return ax.index(name) if name in ax else None

    def keys_for(self, perm: str) -> list[str]:
        """Every key with an axis acted on by `perm`."""
        return [k for k in self.axes if self.axis(k, perm) is not None]

    def perm_names(self) -> list[str]:
        """Every permutation name, per-expert neuron axes expanded to "mlp.{i}.{e}" for each expert."""
        names = set()
        for ax in self.axes.values():
            for p in ax:
                if p is None:
                    continue
                if p.endswith(".*"):
                    i = int(p.split(".")[1])
                    names |= {expert_mlp(i, e) for e in range(self.layers[i].moe.n_experts)}
                else:
                    names.add(p)
        return sorted(names, key=lambda p: (p != RESID, len(p), p))

    def local_key(self, key: str) -> str:
        """`key` relative to its block, e.g. "mlp.up_proj.weight" (the same role in every layer); else `key`."""
        i = self.layer_of.get(key)
        return key if i is None else key[len(self.layers[i].prefix) + 1:]

    def keys_in(self, groups: tuple[str, ...] | list[str]) -> list[str]:
        """The keys in the chosen parameter groups (GROUPS), in spec order."""
        bad = [g for g in groups if g not in GROUPS]
        if bad:
            raise TracingError(f"unknown parameter group(s) {bad}; choose from {', '.join(GROUPS)}")
        return [k for k in self.axes if self.group_of[k] in groups]

    def neuron_rows(self, tensor: torch.Tensor, key: str, perm: str) -> torch.Tensor:
        """View `tensor` (stored under `key`) with the `perm` axis first: (n_perm, rest...)."""
        a = self.axis(key, perm)
        if a is None:
            raise KeyError(f"{key} has no axis permuted by {perm}")
        return tensor.movedim(a, 0)

    def unit_index(self, key: str, name: str, p: torch.Tensor) -> torch.Tensor:
        """The index along `key`'s axis named `name` that applies the permutation p: on the MLP-neuron axis of a
        fused key, p applied to every part; elsewhere p itself."""
        f = self.fused.get(key) if name.startswith("mlp.") else None
        return p if f is None else f.index(p, len(p))

    def n_units(self, key: str, name: str, size: int) -> int:
        """Units on `key`'s axis named `name` of `size` entries (a fused axis holds each unit once per part)."""
        f = self.fused.get(key) if name.startswith("mlp.") else None
        return size if f is None else size // len(f.parts)

    def expert_rows(self, key: str, tensor: torch.Tensor, layer: int, proj: str) -> torch.Tensor:
        """Rows (n_neurons, hidden) of projection `proj` of one expert, from `tensor`: the expert's slice of the
        stacked `key` (axis 0 dropped). "down" gives the columns of the output projection as rows."""
        a = self.axes[key].index(per_expert(layer)) - 1
        rows = tensor.movedim(a, 0)  # (units [x parts], hidden)
        f = self.fused.get(key)
        return rows if f is None else f.part(rows, proj)

    @property
    def gated(self) -> bool:
        r = self.layers[-1]
        return r.gate is not None if r.moe is None else r.moe.gated

    @property
    def is_moe(self) -> bool:
        return any(r.moe is not None for r in self.layers)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, r in enumerate(self.layers) if r.moe is not None]
