"""The weight matrices whose rows are units (neurons, experts), and their roles: what csu and csu_all match.

    for m in block_matrices(spec, src.shapes()):      # every 2-D block weight, each expert's projections, routers
        rows = m.read(src)                            # (n_units, rest): one expert's slice read, not the stack
    ups = up_matrices(spec, layer=3)                  # csu: the dense MLP's up rows, each expert's, the router's

A dense weight is one matrix; its rows are the units of its first permuted non-residual axis (an MLP's neurons,
an attention projection's outputs). A stacked expert tensor is one matrix per expert and projection (a fused
gate_up_proj gives a gate and an up matrix per expert). The router is one matrix whose rows are the experts.
`role` says what a matrix may be compared with, the same in every family: "mlp.up", "mlp.gate", "mlp.down" for the
projections of every MLP (a dense block's, and an MoE block's routed and shared experts: an expert meets the dense
MLP of a model it may have been upcycled from, a Llama's up_proj a GPT-2's c_fc), "attn.out" for the attention's
output projection, else the key's local key ("self_attn.q_proj.weight", "mlp.gate.weight" for a router).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracing.arch import RESID, ArchSpec
from tracing.moe import expert_rows
from tracing.sources.base import Source

KINDS = ("mlp", "shared", "expert", "router", "attn", "norm", "emb")  # dense MLP, shared expert, routed expert, ...


def mlp_role(proj: str) -> str:
    """The role of an MLP projection ("up" -> "mlp.up"), dense or expert, in every family."""
    return f"mlp.{proj}"


@dataclass(frozen=True)
class Matrix:
    """One matrix of unit rows: a dense 2-D weight, one projection of one routed expert, or a router."""

    role: str  # what it may be compared with (module docstring)
    layer: int
    key: str  # the stored tensor
    kind: str  # one of KINDS
    expert: int | None = None  # routed experts: the index along the stacked axis
    proj: str | None = None  # MLP projections: "gate", "up", "down"

    @property
    def unit(self) -> str:
        """A short label of what the rows belong to: "mlp", "shared", "expert 5", "router", "attn"."""
        return f"expert {self.expert}" if self.kind == "expert" else self.kind

    def read(self, src: Source, spec: ArchSpec | None = None) -> torch.Tensor:
        """The rows (n_units, rest), read from `src` (for an expert, only its slice of the stacked tensor)."""
        spec = spec or src.spec
        if self.kind == "expert":
            return expert_rows(src, self.layer, self.expert, self.proj)
        return dense_rows(spec, self.key, src.get(self.key))

    def rows_shape(self, spec: ArchSpec, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        """The shape `read` gives, from the headers."""
        if self.kind == "expert":
            t = torch.empty(shapes[self.key][1:], device="meta")
            return tuple(spec.expert_rows(self.key, t, self.layer, self.proj).shape)
        return tuple(dense_rows(spec, self.key, torch.empty(shapes[self.key], device="meta")).shape)


def dense_rows(spec: ArchSpec, key: str, w: torch.Tensor, perm: str | None = None) -> torch.Tensor:
    """`w` with the axis of `perm` (or else its first non-residual axis) first: (n_units, rest)."""
    if perm is None:
        perm = next((p for p in spec.axes[key] if p != RESID), None)
        if perm is None:
            return w.movedim(next(a for a, p in enumerate(spec.axes[key]) if p != RESID), 0)
    return spec.neuron_rows(w, key, perm)


def _mlp_projections(spec: ArchSpec, i: int) -> dict[str, str]:
    """key -> projection of the layer's dense MLP (or shared expert)."""
    r = spec.layers[i]
    return {k: p for k, p in ((r.gate, "gate"), (r.up, "up"), (r.down, "down")) if k}


def layer_matrices(spec: ArchSpec, i: int, shapes: dict[str, tuple[int, ...]]) -> list[Matrix]:
    """Every unit matrix of block i present in `shapes`: 2-D weights (1-row ones left out), routers, experts."""
    roles, out = spec.layers[i], []
    dense = _mlp_projections(spec, i)
    stacked = {} if roles.moe is None else {roles.moe.key_of(p): p for p in ("gate", "up", "down")
                                            if p != "gate" or roles.moe.gated}
    for key in (k for k, j in spec.layer_of.items() if j == i and k in shapes):
        if key in stacked:
            parts = spec.fused[key].parts if key in spec.fused else (stacked[key],)
            out += [Matrix(mlp_role(p), i, key, "expert", e, p) for e in range(shapes[key][0]) for p in parts]
        elif roles.moe is not None and key == roles.moe.router:
            out.append(Matrix(spec.local_key(key), i, key, "router"))
        elif len(shapes[key]) == 2 and (key in dense or shapes[key][0] > 1):
            if key in dense:
                out.append(Matrix(mlp_role(dense[key]), i, key, "shared" if roles.moe else "mlp", proj=dense[key]))
            else:
                role = "attn.out" if key == roles.attn_out else spec.local_key(key)
                out.append(Matrix(role, i, key, spec.group_of[key]))
    return out


def block_matrices(spec: ArchSpec, shapes: dict[str, tuple[int, ...]]) -> list[Matrix]:
    """Every unit matrix of every block (csu_all's candidates), in spec order."""
    return [m for i in range(spec.n_layers) for m in layer_matrices(spec, i, shapes)]


def up_matrices(spec: ArchSpec, i: int) -> list[Matrix]:
    """What csu tests in block i: the dense MLP's (or shared expert's) up rows, each routed expert's up rows and the
    router's rows (is each expert where it was?)."""
    roles, out = spec.layers[i], []
    if roles.up is not None:
        out.append(Matrix(mlp_role("up"), i, roles.up, "shared" if roles.moe else "mlp", proj="up"))
    if roles.moe is not None:
        key = roles.moe.key_of("up")
        out += [Matrix(mlp_role("up"), i, key, "expert", e, "up") for e in range(roles.moe.n_experts)]
        out.append(Matrix(spec.local_key(roles.moe.router), i, roles.moe.router, "router"))
    return out

