"""Checkpoint key -> model key, as `from_pretrained` renames them (transformers' own conversion mapping).

    model_keys = key_map(config, spec, file_keys)   # {"lm_head.weight": "embed_out.weight", ...} for a Pythia file

Checkpoints do not always store a model's state-dict names: Pythia stores `embed_out.weight` for `lm_head`,
the original GPT-2 files lack the `transformer.` prefix, old files say `LayerNorm.gamma`. transformers renames
them on load from a weightless model's key list; sources do the same, so that an ArchSpec key reads the tensor
`from_pretrained` would have put there. A checkpoint that already holds every key of the spec is read as it
is, without importing that machinery (and transformers' modeling code, ~190 MiB of memory). Keys that need
more than a rename (merged or split tensors, e.g. stacked MoE experts) are reported as `Unconvertible`; the
caller then loads the model whole.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from tracing.arch import ArchSpec


class Unconvertible(Exception):
    """A checkpoint key that transformers converts by merging or splitting tensors."""


def skeleton(config: Any) -> torch.nn.Module:
    """A weightless (meta-device) causal LM of `config`: its parameter names, no memory."""
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def key_map(config: Any, spec: ArchSpec, file_keys: list[str]) -> dict[str, str]:
    """model key -> checkpoint key for every checkpoint key that names a model tensor (others are left out)."""
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
    out: dict[str, str] = {}
    for key in file_keys:
        new, converted = rename_source_key(key, renamings, converters, base_model_prefix=model.base_model_prefix,
                                           meta_state_dict=meta)
        if converted is not None:
            raise Unconvertible(f"{key} (transformers converts it with {converted})")
        if new in meta:
            out.setdefault(new, key)
    return out
