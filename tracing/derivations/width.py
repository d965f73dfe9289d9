"""Width pruning by activation importance on calibration text (Minitron-style), generic over the ArchSpec:
MLP neurons (every tensor with an axis named "mlp.{i}"), or residual channels (every axis named "resid":
embeddings, norms, every weight that reads or writes the residual stream).

    d = width_prune_mlp(base, tok, ids, keep=0.75)      # no healing: kept neurons bit for bit (truth "kept")
    d = width_prune_hidden(base, tok, ids, keep=0.75)   # then healed

Importance: an MLP neuron's mean |input to the down projection|; a residual channel's mean |residual stream|
over every block boundary; an attention head's mean L2 norm of its output (families whose attention width is
tied to the hidden size, GPT-2 and GPT-NeoX, lose whole heads with the channels).
"""

from __future__ import annotations

from typing import Any

import torch

from tracing.arch import RESID, ArchSpec, get_spec, mlp
from tracing.derivations.core import (
    BASE,
    Derived,
    Model,
    build,
    keep_units,
    module_of,
    recipe,
    same_layers,
    sized_config,
    trained,
    truth,
)
from tracing.derivations.train import HEAL_LR, HEAL_STEPS, train

CALIBRATION_BLOCKS, CALIBRATION_LEN = 8, 64


# fused q/k/v families: (kept heads, heads, head size) -> kept indices of the fused q/k/v output axis
def _neox_qkv(kept: torch.Tensor, n_heads: int, hs: int) -> torch.Tensor:
    return torch.cat([h * 3 * hs + torch.arange(3 * hs) for h in kept.tolist()])  # (head, q|k|v, dim)


def _gpt2_qkv(kept: torch.Tensor, n_heads: int, hs: int) -> torch.Tensor:
    return torch.cat([p * n_heads * hs + h * hs + torch.arange(hs) for p in range(3) for h in kept.tolist()])


_FUSED_QKV = {"gpt_neox": _neox_qkv, "gpt2": _gpt2_qkv}


def _fused(spec: ArchSpec) -> bool:
    return len(spec.layers[0].attn_in) == 1


def hidden_refusal(config: Any) -> str | None:
    spec = get_spec(config)
    if _fused(spec) and config.model_type not in _FUSED_QKV:
        return (f"its fused q/k/v projection ties the attention width to the hidden size, and heads can be cut "
                f"only for {', '.join(_FUSED_QKV)}")
    return None


@torch.no_grad()
def importance(model: Model, ids: torch.Tensor, *, heads: bool = False) -> dict[str, Any]:
    """Mean activation magnitudes on the first CALIBRATION_BLOCKS blocks of `ids`: "mlp" [(width,) per block],
    "resid" (hidden,), and with `heads` "heads" [(n_heads,) per block]."""
    spec = get_spec(model.config)
    n = min(CALIBRATION_BLOCKS, len(ids) // CALIBRATION_LEN)
    batch = ids[:n * CALIBRATION_LEN].view(n, CALIBRATION_LEN)  # (B, T)
    n_heads = model.config.num_attention_heads
    found: dict[str, list] = {"mlp": [None] * spec.n_layers, "heads": [None] * spec.n_layers}

    def keep(kind: str, i: int, fn):
        def hook(module, inputs):
            found[kind][i] = fn(inputs[0].float())
        return hook

    handles = []
    for i, roles in enumerate(spec.layers):
        handles.append(module_of(model, roles.down).register_forward_pre_hook(
            keep("mlp", i, lambda x: x.abs().mean(dim=(0, 1)))))  # (width,)
        if heads:
            handles.append(module_of(model, roles.attn_out).register_forward_pre_hook(
                keep("heads", i, lambda x: x.unflatten(-1, (n_heads, -1)).norm(dim=-1).mean(dim=(0, 1)))))
    try:
        out = model(input_ids=batch, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    found["resid"] = torch.stack([h.float().abs().mean(dim=(0, 1)) for h in out.hidden_states]).sum(0)  # (hidden,)
    return found


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (ties: the lower index)."""
    return torch.sort(torch.argsort(-scores, stable=True)[:k]).values


def _mlp_pruned(kind: str, base: Model, tok: Any, ids: torch.Tensor, keep: float, steps: int, lr: float,
                seed: int) -> Derived:
    spec = get_spec(base.config)
    scores = importance(base, ids)["mlp"]
    width = max(1, round(keep * len(scores[0])))
    state = dict(base.state_dict())
    kept = []
    for i in range(spec.n_layers):
        index = _top(scores[i], width)
        keep_units(state, spec, mlp(i), index)
        kept.append(index.tolist())
    model = train(build(sized_config(base.config, mlp_width=width), state, base), ids, steps, lr, seed)
    return Derived(kind, model, tok, truth(kind, base, model, parents=[BASE], layer_map=same_layers(model),
                                           kept={"mlp": kept}, training=trained(steps, lr, seed)))


@recipe("width-prune-mlp")
def width_prune_mlp(base: Model, tok: Any, ids: torch.Tensor, *, keep: float = 0.75) -> Derived:
    """MLP neurons dropped by activation importance (the same count in every block), no healing."""
    return _mlp_pruned("width-prune-mlp", base, tok, ids, keep, 0, 0.0, 0)


@recipe("width-prune-mlp-healed")
def width_prune_mlp_healed(base: Model, tok: Any, ids: torch.Tensor, *, keep: float = 0.75,
                           steps: int = HEAL_STEPS, lr: float = HEAL_LR, seed: int = 1) -> Derived:
    """The same MLP neurons dropped, then healed by training."""
    return _mlp_pruned("width-prune-mlp-healed", base, tok, ids, keep, steps, lr, seed)


@recipe("width-prune-hidden", refusal=hidden_refusal)
def width_prune_hidden(base: Model, tok: Any, ids: torch.Tensor, *, keep: float = 0.75, steps: int = HEAL_STEPS,
                       lr: float = HEAL_LR, seed: int = 1) -> Derived:
    """Minitron-style: residual channels dropped by importance in every tensor with a "resid" axis (with whole
    attention heads where the attention width is the hidden size), then healed by training."""
    spec = get_spec(base.config)
    fused = _fused(spec)
    scores = importance(base, ids, heads=fused)
    hidden, n_heads = len(scores["resid"]), base.config.num_attention_heads
    head_size = hidden // n_heads
    heads = max(1, round(keep * n_heads)) if fused else n_heads
    width = heads * head_size if fused else max(1, round(keep * hidden))
    state = dict(base.state_dict())
    channels = _top(scores["resid"], width)
    keep_units(state, spec, RESID, channels)
    kept: dict[str, Any] = {"hidden": channels.tolist()}
    if fused:
        kept["heads"] = []
        for i, roles in enumerate(spec.layers):
            chosen = _top(scores["heads"][i], heads)
            kept["heads"].append(chosen.tolist())
            qkv = _FUSED_QKV[base.config.model_type](chosen, n_heads, head_size)
            per_head = torch.cat([h * head_size + torch.arange(head_size) for h in chosen.tolist()])
            for key, index in ((roles.attn_in[0], qkv), (roles.attn_out, per_head)):
                axis = spec.axes[key].index(None)  # the attention-side axis
                state[key] = state[key].index_select(axis, index)
            bias = roles.attn_in[0].removesuffix("weight") + "bias"
            if bias in state:
                state[bias] = state[bias].index_select(0, qkv)
    mlp_width = len(scores["mlp"][0])
    cfg = sized_config(base.config, hidden=width, heads=heads if fused else None, mlp_width=mlp_width)
    model = train(build(cfg, state, base), ids, steps, lr, seed)
    return Derived("width-prune-hidden", model, tok,
                   truth("width-prune-hidden", base, model, parents=[BASE], layer_map=same_layers(model),
                         kept=kept, training=trained(steps, lr, seed)))
