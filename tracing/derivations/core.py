"""What every recipe shares: the `Derived` value, its ground truth, the registry, and model surgery that is
generic over the ArchSpec (blocks moved between models, hidden units kept along a named axis, sizes changed).

    @recipe("layer-prune")
    def layer_prune(base, tok, ids, *, drop=None) -> Derived: ...

    model = stack({"base": base}, [["base", 0], ["base", 2]], outside="base")   # blocks 0 and 2 of base
    truth("layer-prune", base, model, parents=["base"], layer_map=[["base", 0], ["base", 2]])
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from tracing.arch import RESID, ArchSpec, get_spec, mlp
from tracing.errors import TracingError
from tracing.perm import perm_sizes

BASE = "base"  # the tested base's name in every truth: a derivation is derived iff its weights descend from it

Model = transformers.PreTrainedModel
LayerMap = list[list]  # [[root model name, its layer] per derived layer]


@dataclass
class Derived:
    """One derived model: its weights in memory, its tokenizer, what was done (plain data), and for file forms
    (an adapter directory, a .gguf file) how to write it: `writer(out_dir, base_dir) -> path main.py takes`."""

    kind: str
    model: Model  # file forms: the values the written file loads as
    tokenizer: Any
    truth: dict
    writer: Callable[[Path, str | None], Path] | None = None
    parents: dict[str, Model] = field(default_factory=dict)  # intermediate models built on the way (not saved)


@dataclass(frozen=True)
class Recipe:
    kind: str
    fn: Callable[..., Derived]
    derived: bool  # False for the nulls: not derived from the tested base
    refusal: Callable[[Any], str | None]  # config -> why this kind makes no sense for it (None: it does)
    summary: str


KINDS: dict[str, Recipe] = {}


def recipe(kind: str, *, derived: bool = True,
           refusal: Callable[[Any], str | None] | None = None) -> Callable[[Callable[..., Derived]], Callable]:
    """Register a recipe `fn(base, tok, ids, **options) -> Derived` under `kind`; calling it on a family the kind
    makes no sense for raises a TracingError saying why."""
    check = refusal or (lambda cfg: None)

    def wrap(fn: Callable[..., Derived]) -> Callable[..., Derived]:
        @functools.wraps(fn)
        def run(base: Model, *args, **kw) -> Derived:
            why = check(base.config)
            if why:
                raise TracingError(f"{kind} is not possible for {base.config.model_type}: {why}")
            return fn(base, *args, **kw)

        KINDS[kind] = Recipe(kind, run, derived, check, (fn.__doc__ or "").strip().split("\n")[0])
        return run
    return wrap


def get_recipe(kind: str) -> Recipe:
    if kind not in KINDS:
        near = difflib.get_close_matches(kind, list(KINDS), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise TracingError(f"unknown derivation kind '{kind}'{hint}; choose from {', '.join(KINDS)}")
    return KINDS[kind]


# ---------------------------------------------------------------------- ground truth
def widths(model: Model) -> dict[str, int]:
    """Layers, residual width, MLP width (layer 0), attention heads and vocabulary of `model`."""
    spec = get_spec(model.config)
    sd = model.state_dict()
    sizes = perm_sizes(spec, {k: v.shape for k, v in sd.items()})
    return {"layers": spec.n_layers, "hidden": sizes[RESID], "mlp": sizes[mlp(0)],
            "heads": int(model.config.num_attention_heads), "vocab": int(sd[spec.embed].shape[0])}


TRUTH_FIELDS = ("kind", "derived", "parents", "lineage", "layer_map", "widths", "kept", "vocab", "shares", "merge",
                "embed_from", "permuted", "rotated", "quant", "adapter", "training", "damage")


def truth(kind: str, base: Model, model: Model, *, parents: list[str], layer_map: LayerMap,
          derived: bool = True, **done: Any) -> dict:
    """The ground truth of one derivation as plain data (JSON round-trips it unchanged). Every field is present:

    derived     whether its weights descend from the tested base ("base")
    parents     the models its weights were taken from; `lineage` says how each parent other than "base" was made
    layer_map   per derived block, [root model, block of that root] (roots: "base", "independent-<seed>"; a merge
                names its first parent's root, `shares` names every parent)
    widths      {layers, hidden, mlp, heads, vocab}: [derived, base] each; `kept`: indices kept by width pruning
    vocab       "same" | "extended" | "replaced";  shares: per derived block {parent: weight} for merges
    merge       the merge method and its parameters;  embed_from: the parent of the tensors outside the blocks
    permuted, rotated, quant {bits, format, group_size}, adapter {rank, alpha, targets, merged},
    training    {steps, lr, seed, data} of the last training;  damage {kind, frac} for damaged nulls
    """
    unknown = sorted(set(done) - set(TRUTH_FIELDS))
    if unknown:
        raise ValueError(f"unknown truth fields {unknown}; fields: {TRUTH_FIELDS}")
    mine, theirs = widths(model), widths(base)
    out = {"kind": kind, "derived": derived, "parents": list(parents), "lineage": {}, "layer_map": layer_map,
           "widths": {k: [mine[k], theirs[k]] for k in mine}, "kept": None, "vocab": "same", "shares": None,
           "merge": None, "embed_from": parents[0], "permuted": False, "rotated": False, "quant": None,
           "adapter": None, "training": None, "damage": None}
    out.update(done)
    if json.loads(json.dumps(out)) != out:
        raise TypeError(f"the truth of {kind} is not plain data (use lists, str, int, float, bool, None)")
    return out


def same_layers(model: Model, root: str = BASE) -> LayerMap:
    """The layer map of a derivation that keeps every block in place."""
    return [[root, i] for i in range(get_spec(model.config).n_layers)]


def trained(steps: int, lr: float, seed: int, data: str = "given") -> dict | None:
    return {"steps": steps, "lr": lr, "seed": seed, "data": data} if steps else None


# ---------------------------------------------------------------------- surgery
def sized_config(cfg: Any, *, layers: Sequence[int] | None = None, hidden: int | None = None,
                 mlp_width: int | None = None, heads: int | None = None, vocab: int | None = None) -> Any:
    """A copy of `cfg` with new sizes; `layers`: the source block of each new block (per-layer types follow)."""
    cfg = copy.deepcopy(cfg)
    if layers is not None:
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = [cfg.layer_types[i] for i in layers]
        cfg.num_hidden_layers = len(layers)
    if hidden is not None:
        if len(get_spec(cfg).layers[0].attn_in) == 3:  # separate q/k/v: attention width is heads x head_dim
            cfg.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cfg.hidden_size = hidden
    if heads is not None:
        cfg.num_attention_heads = heads
    if mlp_width is not None:
        setattr(cfg, "n_inner" if hasattr(cfg, "n_inner") else "intermediate_size", mlp_width)
    if vocab is not None:
        cfg.vocab_size = vocab
    return cfg


def build(cfg: Any, state: dict[str, torch.Tensor], like: Model) -> Model:
    """A model of config `cfg` holding exactly `state` (every key; `like` gives the dtype), in eval mode."""
    with torch.random.fork_rng():  # the throw-away random init leaves the caller's random stream alone
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model = model.to(like.dtype).eval()
    model.load_state_dict(state, strict=True)
    return model


def stack(models: dict[str, Model], layer_map: LayerMap, outside: str) -> Model:
    """Block d of the result is block layer_map[d][1] of models[layer_map[d][0]] (same architecture); every tensor
    outside the blocks (embeddings, final norm, head) comes from models[outside]. Values are copied exactly."""
    specs = {name: get_spec(m.config) for name, m in models.items()}
    cfg = sized_config(models[outside].config, layers=[layer for _, layer in layer_map])
    new = get_spec(cfg)
    state = {k: v for k, v in models[outside].state_dict().items() if k not in specs[outside].layer_of}
    sds = {name: m.state_dict() for name, m in models.items()}
    for d, (name, layer) in enumerate(layer_map):
        spec = specs[name]
        for k, v in sds[name].items():
            if spec.layer_of.get(k) == layer:
                state[f"{new.layers[d].prefix}.{spec.local_key(k)}"] = v
    return build(cfg, state, models[outside])


def keep_units(state: dict[str, torch.Tensor], spec: ArchSpec, name: str, index: torch.Tensor) -> None:
    """Keep only the units `index` of the hidden dimension `name` ("resid", "mlp.{i}") in every tensor of
    `state` with an axis it acts on, in place of the dict's entries."""
    for key in spec.keys_for(name):
        if key in state:
            state[key] = state[key].index_select(spec.axis(key, name), index)


def module_of(model: Model, key: str) -> torch.nn.Module:
    """The module holding the parameter `key` (e.g. the MLP down projection of one block)."""
    return model.get_submodule(key.rsplit(".", 1)[0])
