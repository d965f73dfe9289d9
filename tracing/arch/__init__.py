"""Architecture specs: one declarative description per model family, and the registry keyed by `model_type`.

Every weight-space operation (permute, rotate, align, interpolate, per-layer statistics) is generic over an
`ArchSpec` (tracing/arch/spec.py). For each state-dict key the spec holds a tuple with one entry per tensor axis,
naming the permutation that acts on that axis ("resid" for the residual stream, "mlp.{i}" for the MLP neurons
of layer i, "experts.{i}" and "mlp.{i}.{e}" for the routed experts of an MoE layer) or None. nn.Linear stores
(out, in); GPT-2's Conv1D stores (in, out), so its entries read the other way round.

    spec = get_spec(model.config)
    spec.axes["model.layers.0.mlp.up_proj.weight"]   # ("mlp.0", "resid")
    spec.layers[0].up                                 # "model.layers.0.mlp.up_proj.weight"
    spec.layer_of["model.layers.0.mlp.up_proj.weight"] # 0   (keys outside the blocks are absent)
    spec.group_of["model.layers.0.mlp.up_proj.weight"] # "mlp"  (mlp / attn / norm / emb)
    spec.layers[1].moe.router                         # an MoE block: "model.layers.1.mlp.gate.weight"

Dense families live in tracing/arch/dense.py, mixtures of experts in tracing/arch/moe.py. A new architecture is
one function there plus one line in `_FAMILIES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from tracing.arch.dense import gemma, gpt2, gpt_neox, llama, olmo, olmo2
from tracing.arch.moe import deepseek_v3, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe
from tracing.arch.spec import (
    GROUPS,
    PROJECTIONS,
    RESID,
    ArchSpec,
    Axes,
    ExpertRoles,
    Fused,
    LayerRoles,
    NormKind,
    UnsupportedArchitecture,
    expert_mlp,
    expert_of,
    experts,
    experts_layer,
    mlp,
    per_expert,
)

__all__ = ["GROUPS", "PROJECTIONS", "RESID", "SUPPORTED_MODEL_TYPES", "ArchSpec", "Axes", "ExpertRoles", "Fused",
           "LayerRoles", "NormKind", "UnsupportedArchitecture", "check_covers", "expert_mlp", "expert_of", "experts",
           "experts_layer", "get_spec", "mlp", "per_expert"]

# family name -> (builder, model_types it covers)
_FAMILIES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "llama": (llama, ("llama", "mistral", "qwen2", "qwen3")),
    "olmo": (olmo, ("olmo",)),
    "olmo2": (olmo2, ("olmo2",)),
    "gemma": (gemma, ("gemma", "gemma2", "gemma3", "gemma3_text")),
    "gpt_neox": (gpt_neox, ("gpt_neox",)),
    "gpt2": (gpt2, ("gpt2",)),
    "mixtral": (mixtral, ("mixtral",)),
    "qwen2_moe": (qwen2_moe, ("qwen2_moe",)),
    "qwen3_moe": (qwen3_moe, ("qwen3_moe",)),
    "olmoe": (olmoe, ("olmoe",)),
    "deepseek_v3": (deepseek_v3, ("deepseek_v3",)),
    "gpt_oss": (gpt_oss, ("gpt_oss",)),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for _, types in _FAMILIES.values() for t in types)


def get_spec(config) -> ArchSpec:
    """ArchSpec for a transformers config (or anything with `model_type` and its size fields)."""
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3" and hasattr(config, "text_config"):
        config = config.text_config  # multimodal wrapper: trace the language model
        model_type = config.model_type
    for family, (builder, types) in _FAMILIES.items():
        if model_type in types:
            spec = builder(config)
            return dataclasses.replace(spec, family=family)
    raise UnsupportedArchitecture(
        f"unsupported architecture '{model_type}'; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")


def check_covers(spec: ArchSpec, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise if the spec and the state dict disagree on keys or on tensor ranks."""
    missing = [k for k in state_dict if k not in spec.axes]
    stale = [k for k in spec.axes if k not in state_dict]
    bad_rank = [k for k, ax in spec.axes.items() if k in state_dict and state_dict[k].dim() != len(ax)]
    if missing or stale or bad_rank:
        raise AssertionError(f"spec/{spec.model_type} mismatch: not covered {missing[:5]}, "
                             f"absent from model {stale[:5]}, wrong rank {bad_rank[:5]}")
