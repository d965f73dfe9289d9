"""Derivation recipes for mixtures of experts: pure functions model(s) -> derived model (inputs are never modified).

    moe = upcycle(dense, n_experts=4, noise=0.01)          # a Llama/Mistral -> Mixtral, Qwen2/3 -> Qwen2/3-MoE
    tuned = zoo.finetune(copy.deepcopy(moe), ids)           # fine-tuning works on any zoo model, MoE included
    shuffled = permute_experts(moe, seed=1)                 # the same function, experts and their neurons reordered
    partial = reinit_experts(moe, which=[2, 3], seed=7)     # a partial upcycle: experts 2 and 3 re-initialised
    fresh = reinit_experts(moe, seed=7)                     # every expert and router new, attention etc. kept
    broken = damage_experts(moe, "zero", which=[1])         # degenerate experts: zeroed, or copies of another

Sparse upcycling (Komatsuzaki et al. 2023) copies a dense model's MLP into every expert of an MoE with the same
attention, norms and embeddings; the router starts random. Qwen1.5-MoE was built so from Qwen-1.8B. The lineage zoo
and the tests draw on these recipes; each returns a new model in eval mode, float32 like the zoo's.
"""

from __future__ import annotations

import copy

import torch
import transformers

from tracing import zoo
from tracing.arch import ArchSpec, expert_mlp, experts, get_spec, per_expert
from tracing.perm import apply_perm, random_perm

UPCYCLE_TO = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
_COMMON = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "hidden_act", "rope_parameters",
           "bos_token_id", "eos_token_id", "pad_token_id", "head_dim", "attention_bias")


def moe_config(dense: transformers.PretrainedConfig, n_experts: int) -> transformers.PretrainedConfig:
    """The config of the MoE a dense config upcycles into: same attention and sizes, `n_experts` experts as wide as
    the dense MLP (and a shared expert as wide, where the family has one)."""
    target = UPCYCLE_TO.get(dense.model_type)
    if target is None:
        raise ValueError(f"cannot upcycle {dense.model_type}: supported {', '.join(UPCYCLE_TO)}")
    kw = {k: getattr(dense, k) for k in _COMMON if getattr(dense, k, None) is not None}
    kw.update(zoo.moe_options(target, n_experts, dense.intermediate_size, dense.hidden_size,
                              dense.num_attention_heads))
    kw.setdefault("intermediate_size", dense.intermediate_size)
    return transformers.AutoConfig.for_model(target, **kw)


def _new(config, seed: int, dtype: torch.dtype) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()


def _stacked_rows(spec: ArchSpec, key: str, proj: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """One expert's slice of stacked `key` (holding projection `proj`, or fused ones) from its projections' rows
    (n_neurons, hidden) each."""
    f = spec.fused.get(key)
    if f is not None and f.interleaved:
        raise ValueError(f"{spec.model_type} interleaves its fused projections: not an upcycling target")
    rows = parts[proj] if f is None else torch.cat([parts[p] for p in f.parts])  # halves: gate rows, then up rows
    return rows if spec.axes[key].index(per_expert(spec.layer_of[key])) == 1 else rows.T  # down: (hidden, I)


def _expert_keys(spec: ArchSpec, i: int) -> list[str]:
    """The stacked expert tensors of MoE layer i (router and its bias left out)."""
    roles = spec.layers[i].moe
    return [k for k in spec.axes if spec.layer_of.get(k) == i and spec.axes[k][0] == experts(i)
            and k not in (roles.router, *roles.router_extra)]


@torch.no_grad()
def upcycle(dense: transformers.PreTrainedModel, n_experts: int, noise: float = 0.0,
            seed: int = 0) -> transformers.PreTrainedModel:
    """Sparse upcycling: an MoE whose every expert (and shared expert) is a copy of the dense MLP of its layer, plus
    Gaussian noise of `noise` times each weight's std, drawn per expert; attention, norms, embeddings copied; the
    router random. `seed` draws the router and the noise: two upcycles with the same seed share them (related by
    construction), so independent upcycles need different seeds."""
    dense_spec = get_spec(dense.config)
    moe = _new(moe_config(dense.config, n_experts), seed, next(dense.parameters()).dtype)
    spec, sd = get_spec(moe.config), dense.state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    params = dict(moe.named_parameters())
    for key, p in params.items():
        if key in sd:  # attention, norms, embeddings; a shared expert is the dense MLP of its layer under its name
            p.copy_(sd[key])
    for i, roles in enumerate(spec.layers):
        d = dense_spec.layers[i]
        mlp = {"gate": sd[d.gate], "up": sd[d.up], "down": sd[d.down].T}  # rows (n_neurons, hidden) each
        if roles.up is not None:  # shared expert
            for proj, key in (("gate", roles.gate), ("up", roles.up), ("down", roles.down)):
                params[key].copy_(sd[getattr(d, proj)])
        for e in range(n_experts):
            parts = {p: w + noise * w.std() * torch.randn(w.shape, generator=g) for p, w in mlp.items()}
            for proj in ("up", "down"):
                key = roles.moe.key_of(proj)
                params[key][e].copy_(_stacked_rows(spec, key, proj, parts))
    return moe


def permute_experts(moe: transformers.PreTrainedModel, seed: int = 0,
                    neurons: bool = True) -> transformers.PreTrainedModel:
    """The same function with every MoE layer's experts (and, with `neurons`, each expert's neurons) reordered."""
    spec = get_spec(moe.config)
    names = [n for i in spec.moe_layers for n in [experts(i)] +
             ([expert_mlp(i, e) for e in range(spec.layers[i].moe.n_experts)] if neurons else [])]
    out = copy.deepcopy(moe)
    apply_perm(out, spec, random_perm(spec, out.state_dict(), seed, names=names))
    return out


@torch.no_grad()
def reinit_experts(moe: transformers.PreTrainedModel, which: list[int] | None = None, seed: int = 1,
                   router: bool | None = None) -> transformers.PreTrainedModel:
    """`moe` with the routed experts `which` of every MoE layer (default: all) taken from a fresh initialisation of
    the same config (seed `seed`); the router too when every expert is new (or `router=True`). Attention, norms,
    embeddings and any shared expert are kept: a partial upcycle, or an MoE re-initialised behind kept attention."""
    spec, out = get_spec(moe.config), copy.deepcopy(moe)
    fresh = _new(moe.config, seed, next(moe.parameters()).dtype)
    new, params = fresh.state_dict(), dict(out.named_parameters())
    for i in spec.moe_layers:
        roles = spec.layers[i].moe
        chosen = list(range(roles.n_experts)) if which is None else which
        for key in _expert_keys(spec, i):
            params[key][chosen] = new[key][chosen]
        if router if router is not None else which is None:
            for key in (roles.router, *roles.router_extra):
                if key in params:
                    params[key].copy_(new[key])
    return out


@torch.no_grad()
def damage_experts(moe: transformers.PreTrainedModel, kind: str, which: list[int],
                   source: int = 0) -> transformers.PreTrainedModel:
    """A copy of `moe` with the routed experts `which` of every MoE layer damaged: "zero" (all their weights 0: no
    usable unit) or "duplicate" (each an exact copy of expert `source`: identical units in several experts)."""
    if kind not in ("zero", "duplicate"):
        raise ValueError(f"unknown expert damage '{kind}'; choose from zero, duplicate")
    spec, out = get_spec(moe.config), copy.deepcopy(moe)
    params = dict(out.named_parameters())
    for i in spec.moe_layers:
        for key in _expert_keys(spec, i):
            params[key][which] = 0.0 if kind == "zero" else params[key][source].clone()
    return out
