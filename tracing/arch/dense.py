"""ArchSpecs of the dense families: Llama-like (Llama, Mistral, Qwen2/3, OLMo, OLMo-2, Gemma 1/2/3), GPT-NeoX, GPT-2.

`_llama_like` builds everything but the MLP of each block, which comes from an `MlpBlock` builder: `gated_mlp` here,
the mixture-of-experts blocks in tracing/arch/moe.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tracing.arch.spec import RESID, ArchSpec, Axes, ExpertRoles, Fused, LayerRoles, NormKind, mlp


@dataclass
class MlpBlock:
    """The MLP of one block: its keys' axes and the roles LayerRoles records (plus fused keys, config widths)."""

    axes: dict[str, Axes]
    up: str | None
    down: str | None
    gate: str | None = None
    moe: ExpertRoles | None = None
    shared_gate: str | None = None
    fused: dict[str, Fused] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)


def gated_mlp(i: int, module: str, width: int | None = None, name: str | None = None) -> MlpBlock:
    """gate_proj / up_proj / down_proj under `module`, neurons permuted by `name` (default "mlp.{i}")."""
    name = name or mlp(i)
    gate, up, down = (f"{module}.{p}_proj.weight" for p in ("gate", "up", "down"))
    return MlpBlock(axes={gate: (name, RESID), up: (name, RESID), down: (RESID, name)}, up=up, down=down, gate=gate,
                    widths={name: width} if width else {})


def _llama_like(cfg, prefix: str = "model", *, norms=("input_layernorm", "post_attention_layernorm"),
                attn_norms=(), post_norms=(), extra_attn: tuple[str, ...] = (),
                qkv_bias: bool = False, norm: NormKind = "rms",
                mlp_block: Callable[[int, str], MlpBlock] | None = None,
                attention: Callable[[str], tuple[dict[str, Axes], tuple[str, ...]]] | None = None,
                attn_extra: dict[str, Axes] | None = None) -> ArchSpec:
    """Llama, Mistral, Qwen2/3, OLMo, OLMo-2, Gemma 1/2/3 (gated MLP, RMSNorm or LayerNorm); with `mlp_block`,
    the MoE families built on them; `attention(block prefix)` -> (axes, attn_in) replaces q/k/v (DeepSeek's MLA);
    `attn_extra`: more attention keys (suffix under self_attn -> axes)."""
    n = cfg.num_hidden_layers
    mlp_block = mlp_block or (lambda i, module: gated_mlp(i, module))
    axes: dict[str, Axes] = {f"{prefix}.embed_tokens.weight": (None, RESID)}
    layers = []
    fused: dict[str, Fused] = {}
    widths: dict[str, int] = {}
    for i in range(n):
        p = f"{prefix}.layers.{i}"
        if attention is None:
            for proj in ("q_proj", "k_proj", "v_proj"):
                axes[f"{p}.self_attn.{proj}.weight"] = (None, RESID)
                if qkv_bias:
                    axes[f"{p}.self_attn.{proj}.bias"] = (None,)
            attn_in = tuple(f"{p}.self_attn.{x}_proj.weight" for x in "qkv")
        else:
            attn_axes, attn_in = attention(p)
            axes.update(attn_axes)
        axes[f"{p}.self_attn.o_proj.weight"] = (RESID, None)
        for extra in extra_attn:  # q_norm / k_norm act on head or projection space, not resid
            axes[f"{p}.self_attn.{extra}.weight"] = (None,)
        for suffix, ax in (attn_extra or {}).items():
            axes[f"{p}.self_attn.{suffix}"] = ax
        block = mlp_block(i, f"{p}.mlp")
        axes.update(block.axes)
        fused.update(block.fused)
        widths.update(block.widths)
        for nm in (*norms, *post_norms):
            axes[f"{p}.{nm}.weight"] = (RESID,)
        attn_norm, mlp_norm = (f"{p}.{norms[0]}.weight", f"{p}.{norms[1]}.weight") if norms else (None, None)
        layers.append(LayerRoles(
            prefix=p, mlp_module=f"{p}.mlp", attn_module=f"{p}.self_attn", up=block.up, down=block.down,
            gate=block.gate, pre_mlp_norm=mlp_norm, pre_attn_norm=attn_norm, attn_in=attn_in,
            attn_out=f"{p}.self_attn.o_proj.weight", moe=block.moe, shared_gate=block.shared_gate))
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
                    norm=norm, rotate_refusal=refusal, fused=fused, widths=widths)
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


