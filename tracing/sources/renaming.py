"""Checkpoint key -> model key, as `from_pretrained` renames them (transformers' own conversion mapping).

    model_keys = key_map(config, spec, file_keys)   # {"lm_head.weight": "embed_out.weight", ...} for a Pythia file

Checkpoints do not always store a model's state-dict names: Pythia stores `embed_out.weight` for `lm_head`,
the original GPT-2 files lack the `transformer.` prefix, old files say `LayerNorm.gamma`. transformers renames
them on load from a weightless model's key list; sources do the same, so that an ArchSpec key reads the tensor
`from_pretrained` would have put there. A checkpoint that already holds every key of the spec is read as it
is, without importing that machinery (and transformers' modeling code, ~190 MiB of memory).

Mixture-of-experts checkpoints store one tensor per expert (Mixtral's `block_sparse_moe.experts.{e}.w1/w3/w2`,
Qwen-MoE's and OLMoE's `mlp.experts.{e}.gate_proj/up_proj/down_proj`; transformers 5 saves them so too), which
transformers stacks on load (experts on axis 0, gate and up concatenated into `gate_up_proj`). Such a model key maps
to a `Stacked`: the checkpoint keys of each expert and part, so that a source reads one expert by reading only its
tensors. Keys that need any other conversion are reported as `Unconvertible`; the caller then loads the model whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import transformers

from tracing.arch import ArchSpec
from tracing.errors import TracingError


class Unconvertible(Exception):
    """A checkpoint key that transformers converts by merging or splitting tensors in a way sources do not stream."""


@dataclass(frozen=True)
class Stacked:
    """A model tensor stored as one checkpoint tensor per expert and part: parts[j][e] is the key of part j (e.g.
    gate, up) of expert e. The model tensor stacks the experts on axis 0 and concatenates the parts on axis 1."""

    parts: tuple[tuple[str, ...], ...]

    @property
    def keys(self) -> list[str]:
        return [k for part in self.parts for k in part]


def skeleton(config: Any) -> torch.nn.Module:
    """A weightless (meta-device) causal LM of `config`: its parameter names, no memory."""
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _stacking(converter) -> bool:
    """Whether a WeightConverter only stacks per-expert tensors (and concatenates its parts on axis 1)."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    return ops in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)])


def _expert_index(pattern: str, key: str) -> int:
    """The expert number a per-expert source pattern (".experts.*.w1.weight") matched in `key`."""
    m = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
    return int(m.group(1))


def key_map(config: Any, spec: ArchSpec, file_keys: list[str]) -> dict[str, str | Stacked]:
    """model key -> checkpoint key (or the per-expert keys it is stacked from) for every checkpoint key that names a
    model tensor (others are left out). Raises TracingError for a stacked tensor with an expert missing."""
    keys = set(file_keys)
    optional = {spec.lm_head} if spec.tied else set()
    if all(k in keys or k in optional for k in spec.axes):  # stored under the model's names: nothing to rename
        return {k: k for k in spec.axes if k in keys}
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    model = skeleton(config)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    out: dict[str, str | Stacked] = {}
    stacks: dict[str, dict[int, dict[int, str]]] = {}  # model key -> part -> expert -> checkpoint key
    for key in file_keys:
        new, converted = rename_source_key(key, renamings, converters, base_model_prefix=model.base_model_prefix,
                                           meta_state_dict=meta)
        if converted is not None:
            conv = next(c for c in converters if converted in c.source_patterns)
            if not _stacking(conv) or "*" not in converted:
                raise Unconvertible(f"{key} (transformers converts it with {converted})")
            part = stacks.setdefault(new, {}).setdefault(conv.source_patterns.index(converted), {})
            part[_expert_index(converted, key)] = key
        elif new in meta:
            out.setdefault(new, key)
    for new, parts in stacks.items():
        n = meta[new].shape[0] if new in meta else max(len(p) for p in parts.values())
        for j in range(max(parts) + 1):
            missing = [e for e in range(n) if e not in parts.get(j, {})]
            if missing:
                raise TracingError(f"{new} is stacked from one tensor per expert, and the checkpoint lacks expert "
                                   f"{missing[0]}'s{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
                                   "download or save the checkpoint again")
        out[new] = Stacked(tuple(tuple(parts[j][e] for e in range(n)) for j in sorted(parts)))
    return out
