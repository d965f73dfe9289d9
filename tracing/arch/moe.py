"""ArchSpecs of the mixture-of-experts families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, gpt-oss.

Their attention and norms are Llama-like (`_llama_like`); each MoE block is an `MlpBlock` of stacked expert tensors
as transformers 5 stores them (experts on axis 0):

    mlp.gate.weight              (E, hidden)        ("experts.{i}", "resid")        the router, one row per expert
    mlp.experts.gate_up_proj     (E, 2 I, hidden)   ("experts.{i}", "mlp.{i}.*", "resid")   gate rows, then up rows
    mlp.experts.down_proj        (E, hidden, I)     ("experts.{i}", "resid", "mlp.{i}.*")
    mlp.shared_expert.*_proj     a dense gated MLP  ("mlp.{i}", ...)                Qwen2-MoE, DeepSeek-V3

gpt-oss stores its experts the other way round ((E, hidden, 2 I), gate and up interleaved) with biases, and routes
through `mlp.router` (with a bias). DeepSeek-V3 keeps its first `first_k_dense_replace` blocks dense, scores experts
with a correction bias, and routes within groups of experts (`ExpertRoles.n_groups`); its attention is MLA.
Older checkpoints store one tensor per expert (`experts.{e}.w1`, `experts.{e}.gate_proj`): sources read them as
these stacked keys (tracing/sources/renaming.py).
"""

from __future__ import annotations

from tracing.arch.dense import MlpBlock, _llama_like, gated_mlp
from tracing.arch.spec import RESID, ArchSpec, Axes, ExpertRoles, Fused, experts, per_expert


def moe_block(i: int, module: str, n_experts: int, width: int, *, router: str = "gate",
              router_extra: tuple[str, ...] = (), hidden_first: bool = False, biases: bool = False,
              shared: tuple[str, int] | None = None, shared_gate: bool = False, n_groups: int = 1) -> MlpBlock:
    """One MoE block under `module`: router `module.{router}.weight`, fused `experts.gate_up_proj` and
    `experts.down_proj` ((E, 2I, H) and (E, H, I); `hidden_first`: (E, H, 2I) interleaved and (E, I, H), gpt-oss),
    optionally expert biases, a shared expert `(name, width)` and its sigmoid gate."""
    e, u = experts(i), per_expert(i)
    r = f"{module}.{router}"
    gate_up, down = f"{module}.experts.gate_up_proj", f"{module}.experts.down_proj"
    axes: dict[str, Axes] = {f"{r}.weight": (e, RESID), **{f"{r}.{x}": (e,) for x in router_extra},
                             gate_up: (e, RESID, u) if hidden_first else (e, u, RESID),
                             down: (e, u, RESID) if hidden_first else (e, RESID, u)}
    fused = {gate_up: Fused(("gate", "up"), interleaved=hidden_first)}
    if biases:
        axes[f"{gate_up}_bias"] = (e, u)
        axes[f"{down}_bias"] = (e, RESID)
        fused[f"{gate_up}_bias"] = fused[gate_up]
    roles = ExpertRoles(n_experts=n_experts, router=f"{r}.weight", down=down, gate_up=gate_up,
                        router_extra=tuple(f"{r}.{x}" for x in router_extra), n_groups=n_groups)
    block = MlpBlock(axes=axes, up=None, down=None, moe=roles, fused=fused, widths={e: n_experts, u: width})
    if shared:
        dense = gated_mlp(i, f"{module}.{shared[0]}", shared[1])
        block.axes.update(dense.axes)
        block.widths.update(dense.widths)
        block.up, block.down, block.gate = dense.up, dense.down, dense.gate
    if shared_gate:
        block.shared_gate = f"{module}.shared_expert_gate.weight"
        block.axes[block.shared_gate] = (None, RESID)
    return block


def mixtral(cfg) -> ArchSpec:
    return _llama_like(cfg, mlp_block=lambda i, m: moe_block(i, m, cfg.num_local_experts, cfg.intermediate_size))


def _qwen_sparse(cfg, i: int) -> bool:
    """Whether Qwen2/3-MoE's block i is an MoE block (the others are dense MLPs)."""
    return i not in (cfg.mlp_only_layers or []) and cfg.num_experts > 0 and (i + 1) % cfg.decoder_sparse_step == 0


def qwen2_moe(cfg) -> ArchSpec:
    def block(i: int, m: str) -> MlpBlock:
        if not _qwen_sparse(cfg, i):
            return gated_mlp(i, m, cfg.intermediate_size)
        return moe_block(i, m, cfg.num_experts, cfg.moe_intermediate_size,
                         shared=("shared_expert", cfg.shared_expert_intermediate_size), shared_gate=True)
    return _llama_like(cfg, qkv_bias=True, mlp_block=block)


def qwen3_moe(cfg) -> ArchSpec:
    def block(i: int, m: str) -> MlpBlock:
        if not _qwen_sparse(cfg, i):
            return gated_mlp(i, m, cfg.intermediate_size)
        return moe_block(i, m, cfg.num_experts, cfg.moe_intermediate_size)
    return _llama_like(cfg, qkv_bias=bool(getattr(cfg, "attention_bias", False)), extra_attn=("q_norm", "k_norm"),
                       mlp_block=block)


def olmoe(cfg) -> ArchSpec:
    # OLMoE: pre-norm blocks like Llama, q_norm / k_norm over the full projection widths
    return _llama_like(cfg, qkv_bias=bool(getattr(cfg, "attention_bias", False)), extra_attn=("q_norm", "k_norm"),
                       mlp_block=lambda i, m: moe_block(i, m, cfg.num_experts, cfg.intermediate_size))


def deepseek_v3(cfg) -> ArchSpec:
    def block(i: int, m: str) -> MlpBlock:
        if i < cfg.first_k_dense_replace:
            return gated_mlp(i, m, cfg.intermediate_size)
        return moe_block(i, m, cfg.n_routed_experts, cfg.moe_intermediate_size,
                         router_extra=("e_score_correction_bias",), n_groups=cfg.n_group,
                         shared=("shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts))

    def mla(p: str) -> tuple[dict[str, Axes], tuple[str, ...]]:  # multi-head latent attention
        a = f"{p}.self_attn"
        if cfg.q_lora_rank is None:
            axes: dict[str, Axes] = {f"{a}.q_proj.weight": (None, RESID)}
            reads = (f"{a}.q_proj.weight",)
        else:
            axes = {f"{a}.q_a_proj.weight": (None, RESID), f"{a}.q_a_layernorm.weight": (None,),
                    f"{a}.q_b_proj.weight": (None, None)}
            reads = (f"{a}.q_a_proj.weight",)
        axes.update({f"{a}.kv_a_proj_with_mqa.weight": (None, RESID), f"{a}.kv_a_layernorm.weight": (None,),
                     f"{a}.kv_b_proj.weight": (None, None)})
        return axes, (*reads, f"{a}.kv_a_proj_with_mqa.weight")
    return _llama_like(cfg, mlp_block=block, attention=mla)


def gpt_oss(cfg) -> ArchSpec:
    # attention with biases, an output bias and one sink logit per head; experts hidden-first with biases
    return _llama_like(cfg, qkv_bias=True, attn_extra={"sinks": (None,), "o_proj.bias": (RESID,)},
                       mlp_block=lambda i, m: moe_block(i, m, cfg.num_local_experts, cfg.intermediate_size,
                                                        router="router", router_extra=("bias",), hidden_first=True,
                                                        biases=True))
