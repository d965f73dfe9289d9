"""Architecture specs: one declarative description per model family.

Every weight-space operation (permute, rotate, align, interpolate, per-layer statistics) is generic
over an `ArchSpec`. For each state-dict key the spec holds a tuple with one entry per tensor axis,
naming the permutation that acts on that axis ("resid" for the residual stream, "mlp.{i}" for the
MLP neurons of layer i) or None. nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out), so its
entries read the other way round.

    spec = get_spec(model.config)
    spec.axes["model.layers.0.mlp.up_proj.weight"]   # ("mlp.0", "resid")
    spec.layers[0].up                                 # "model.layers.0.mlp.up_proj.weight"
    spec.layer_of["model.layers.0.mlp.up_proj.weight"] # 0   (keys outside the blocks are absent)
    spec.group_of["model.layers.0.mlp.up_proj.weight"] # "mlp"  (mlp / attn / norm / emb)

A new architecture is one function below plus one line in `_FAMILIES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from tracing.errors import TracingError

Axes = tuple  # tuple[str | None, ...], one entry per tensor axis
NormKind = Literal["rms", "rms_1p", "layer", "layer_nonparam"]
GROUPS = ("mlp", "attn", "norm", "emb")  # parameter groups: what group_of maps every key to

RESID = "resid"


def mlp(i: int) -> str:
    """Name of the permutation acting on layer i's MLP neurons."""
    return f"mlp.{i}"


@dataclass(frozen=True)
class LayerRoles:
    """One transformer block: its module paths and the keys the statistics need (weights as stored)."""

    prefix: str  # the block's module path, e.g. "model.layers.3"; every key of the block starts with it + "."
    mlp_module: str  # e.g. "model.layers.3.mlp": every MLP parameter lives under it
    attn_module: str  # e.g. "model.layers.3.self_attn"
    up: str  # MLP input projection without activation (up_proj / c_fc / dense_h_to_4h)
    down: str  # MLP output projection
    gate: str | None = None  # gate_proj for gated MLPs, None otherwise
    pre_mlp_norm: str | None = None  # norm whose output feeds gate/up (None: non-parametric)
    pre_attn_norm: str | None = None  # norm whose output feeds q/k/v
    attn_in: tuple[str, ...] = ()  # q/k/v (or fused qkv) weights, read the residual stream
    attn_out: str = ""  # o_proj / dense / c_proj weight, writes the residual stream

    @property
    def up_module(self) -> str:
        return self.up.rsplit(".", 1)[0]

    @property
    def gate_module(self) -> str | None:
        return self.gate.rsplit(".", 1)[0] if self.gate else None


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
    layer_of: dict[str, int] = field(init=False, repr=False)  # key -> its block's index (keys in blocks only)
    group_of: dict[str, str] = field(init=False, repr=False)  # key -> "mlp" | "attn" | "norm" | "emb"

    def __post_init__(self) -> None:
        """Derive layer_of and group_of from the blocks' module paths (the only place that reads key strings)."""
        layer_of: dict[str, int] = {}
        group_of: dict[str, str] = {}
        starts = [(f"{r.prefix}.", f"{r.mlp_module}.", f"{r.attn_module}.", i) for i, r in enumerate(self.layers)]
        for key in self.axes:
            group_of[key] = "emb"  # outside every block: embeddings, final norm, lm_head
            for block, mlp_mod, attn_mod, i in starts:
                if key.startswith(block):
                    layer_of[key] = i
                    group_of[key] = "mlp" if key.startswith(mlp_mod) else "attn" if key.startswith(attn_mod) \
                        else "norm"
                    break
        object.__setattr__(self, "layer_of", layer_of)
        object.__setattr__(self, "group_of", group_of)

    # ------------------------------------------------------------------ helpers
    def axis(self, key: str, perm: str) -> int | None:
        """Index of the axis of `key` that `perm` acts on, or None."""
        ax = self.axes[key]
        return ax.index(perm) if perm in ax else None

    def keys_for(self, perm: str) -> list[str]:
        """Every key with an axis acted on by `perm`."""
        return [k for k, ax in self.axes.items() if perm in ax]

    def perm_names(self) -> list[str]:
        names = {p for ax in self.axes.values() for p in ax if p is not None}
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

    @property
    def gated(self) -> bool:
        return self.layers[0].gate is not None


class UnsupportedArchitecture(TracingError):
    pass


# ---------------------------------------------------------------------- families
def _llama_like(cfg, prefix: str = "model", *, norms=("input_layernorm", "post_attention_layernorm"),
                attn_norms=(), post_norms=(), extra_attn: tuple[str, ...] = (),
                qkv_bias: bool = False, norm: NormKind = "rms") -> ArchSpec:
    """Llama, Mistral, Qwen2/3, OLMo, OLMo-2, Gemma 1/2/3 (gated MLP, RMSNorm or LayerNorm)."""
    n = cfg.num_hidden_layers
    axes: dict[str, Axes] = {f"{prefix}.embed_tokens.weight": (None, RESID)}
    layers = []
    for i in range(n):
        p = f"{prefix}.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            axes[f"{p}.self_attn.{proj}.weight"] = (None, RESID)
            if qkv_bias:
                axes[f"{p}.self_attn.{proj}.bias"] = (None,)
        axes[f"{p}.self_attn.o_proj.weight"] = (RESID, None)
        for extra in extra_attn:  # q_norm / k_norm act on head or projection space, not resid
            axes[f"{p}.self_attn.{extra}.weight"] = (None,)
        axes[f"{p}.mlp.gate_proj.weight"] = (mlp(i), RESID)
        axes[f"{p}.mlp.up_proj.weight"] = (mlp(i), RESID)
        axes[f"{p}.mlp.down_proj.weight"] = (RESID, mlp(i))
        for nm in (*norms, *post_norms):
            axes[f"{p}.{nm}.weight"] = (RESID,)
        attn_norm, mlp_norm = (f"{p}.{norms[0]}.weight", f"{p}.{norms[1]}.weight") if norms else (None, None)
        layers.append(LayerRoles(
            prefix=p, mlp_module=f"{p}.mlp", attn_module=f"{p}.self_attn",
            up=f"{p}.mlp.up_proj.weight", down=f"{p}.mlp.down_proj.weight",
            gate=f"{p}.mlp.gate_proj.weight", pre_mlp_norm=mlp_norm, pre_attn_norm=attn_norm,
            attn_in=tuple(f"{p}.self_attn.{x}_proj.weight" for x in "qkv"),
            attn_out=f"{p}.self_attn.o_proj.weight"))
    final_norm = f"{prefix}.norm.weight" if norm != "layer_nonparam" else None
    if final_norm:
        axes[final_norm] = (RESID,)
    axes["lm_head.weight"] = (None, RESID)
    refusal = None
    if norm in ("layer", "layer_nonparam"):
        refusal = (f"{cfg.model_type} uses LayerNorm, whose mean-centering does not commute with a "
                   "rotation of the residual stream; use --permute instead")
    elif post_norms:
        refusal = (f"{cfg.model_type} applies norms with gains to block outputs before they join the "
                   f"residual stream ({', '.join(post_norms)}); those gains cannot be folded into a "
                   "rotation; use --permute instead")
    return ArchSpec(family="", model_type=cfg.model_type, n_layers=n, axes=axes, layers=layers,
                    embed=f"{prefix}.embed_tokens.weight", lm_head="lm_head.weight",
                    tied=bool(getattr(cfg, "tie_word_embeddings", False)), final_norm=final_norm,
                    norm=norm, rotate_refusal=refusal)


def llama(cfg) -> ArchSpec:
    qkv_bias = bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2"
    extra = ("q_norm", "k_norm") if cfg.model_type == "qwen3" else ()
    return _llama_like(cfg, qkv_bias=qkv_bias, extra_attn=extra)


def olmo(cfg) -> ArchSpec:
    # OLMo-1: non-parametric LayerNorm everywhere (no norm weights in the state dict)
    return _llama_like(cfg, norms=(), norm="layer_nonparam",
                       qkv_bias=bool(getattr(cfg, "attention_bias", False)))


def olmo2(cfg) -> ArchSpec:
    # OLMo-2: post-norms on block outputs, q_norm/k_norm over the full projection width
    return _llama_like(cfg, norms=(), post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
                       extra_attn=("q_norm", "k_norm"),
                       qkv_bias=bool(getattr(cfg, "attention_bias", False)))


def gemma(cfg) -> ArchSpec:
    if cfg.model_type == "gemma":
        return _llama_like(cfg, norm="rms_1p")
    extra = ("q_norm", "k_norm") if cfg.model_type.startswith("gemma3") else ()
    return _llama_like(cfg, norms=("input_layernorm", "pre_feedforward_layernorm"),
                       post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
                       extra_attn=extra, norm="rms_1p",
                       qkv_bias=bool(getattr(cfg, "attention_bias", False)))


def gpt_neox(cfg) -> ArchSpec:
    n = cfg.num_hidden_layers
    axes: dict[str, Axes] = {"gpt_neox.embed_in.weight": (None, RESID)}
    layers = []
    for i in range(n):
        p = f"gpt_neox.layers.{i}"
        for nm in ("input_layernorm", "post_attention_layernorm"):
            axes[f"{p}.{nm}.weight"] = (RESID,)
            axes[f"{p}.{nm}.bias"] = (RESID,)
        axes[f"{p}.attention.query_key_value.weight"] = (None, RESID)
        axes[f"{p}.attention.query_key_value.bias"] = (None,)
        axes[f"{p}.attention.dense.weight"] = (RESID, None)
        axes[f"{p}.attention.dense.bias"] = (RESID,)
        axes[f"{p}.mlp.dense_h_to_4h.weight"] = (mlp(i), RESID)
        axes[f"{p}.mlp.dense_h_to_4h.bias"] = (mlp(i),)
        axes[f"{p}.mlp.dense_4h_to_h.weight"] = (RESID, mlp(i))
        axes[f"{p}.mlp.dense_4h_to_h.bias"] = (RESID,)
        layers.append(LayerRoles(
            prefix=p, mlp_module=f"{p}.mlp", attn_module=f"{p}.attention",
            up=f"{p}.mlp.dense_h_to_4h.weight", down=f"{p}.mlp.dense_4h_to_h.weight",
            pre_mlp_norm=f"{p}.post_attention_layernorm.weight",
            pre_attn_norm=f"{p}.input_layernorm.weight",
            attn_in=(f"{p}.attention.query_key_value.weight",), attn_out=f"{p}.attention.dense.weight"))
    axes["gpt_neox.final_layer_norm.weight"] = (RESID,)
    axes["gpt_neox.final_layer_norm.bias"] = (RESID,)
    axes["lm_head.weight"] = (None, RESID)
    return ArchSpec(family="", model_type=cfg.model_type, n_layers=n, axes=axes, layers=layers,
                    embed="gpt_neox.embed_in.weight",
                    lm_head="lm_head.weight",
                    tied=bool(getattr(cfg, "tie_word_embeddings", False)),
                    final_norm="gpt_neox.final_layer_norm.weight", norm="layer",
                    rotate_refusal="gpt_neox uses LayerNorm, whose mean-centering does not commute with "
                                   "a rotation of the residual stream; use --permute instead")


def gpt2(cfg) -> ArchSpec:
    # Conv1D stores (in, out): the axes read the other way round from nn.Linear.
    n = cfg.n_layer
    axes: dict[str, Axes] = {"transformer.wte.weight": (None, RESID), "transformer.wpe.weight": (None, RESID)}
    layers = []
    for i in range(n):
        p = f"transformer.h.{i}"
        for nm in ("ln_1", "ln_2"):
            axes[f"{p}.{nm}.weight"] = (RESID,)
            axes[f"{p}.{nm}.bias"] = (RESID,)
        axes[f"{p}.attn.c_attn.weight"] = (RESID, None)
        axes[f"{p}.attn.c_attn.bias"] = (None,)
        axes[f"{p}.attn.c_proj.weight"] = (None, RESID)
        axes[f"{p}.attn.c_proj.bias"] = (RESID,)
        axes[f"{p}.mlp.c_fc.weight"] = (RESID, mlp(i))
        axes[f"{p}.mlp.c_fc.bias"] = (mlp(i),)
        axes[f"{p}.mlp.c_proj.weight"] = (mlp(i), RESID)
        axes[f"{p}.mlp.c_proj.bias"] = (RESID,)
        layers.append(LayerRoles(
            prefix=p, mlp_module=f"{p}.mlp", attn_module=f"{p}.attn",
            up=f"{p}.mlp.c_fc.weight", down=f"{p}.mlp.c_proj.weight",
            pre_mlp_norm=f"{p}.ln_2.weight", pre_attn_norm=f"{p}.ln_1.weight",
            attn_in=(f"{p}.attn.c_attn.weight",), attn_out=f"{p}.attn.c_proj.weight"))
    axes["transformer.ln_f.weight"] = (RESID,)
    axes["transformer.ln_f.bias"] = (RESID,)
    axes["lm_head.weight"] = (None, RESID)
    return ArchSpec(family="", model_type=cfg.model_type, n_layers=n, axes=axes, layers=layers,
                    embed="transformer.wte.weight", lm_head="lm_head.weight",
                    tied=bool(getattr(cfg, "tie_word_embeddings", True)),
                    final_norm="transformer.ln_f.weight", norm="layer", conv1d=True,
                    extra_embeds=("transformer.wpe.weight",),
                    rotate_refusal="gpt2 uses LayerNorm, whose mean-centering does not commute with a "
                                   "rotation of the residual stream; use --permute instead")


# family name -> (builder, model_types it covers)
_FAMILIES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "llama": (llama, ("llama", "mistral", "qwen2", "qwen3")),
    "olmo": (olmo, ("olmo",)),
    "olmo2": (olmo2, ("olmo2",)),
    "gemma": (gemma, ("gemma", "gemma2", "gemma3", "gemma3_text")),
    "gpt_neox": (gpt_neox, ("gpt_neox",)),
    "gpt2": (gpt2, ("gpt2",)),
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
