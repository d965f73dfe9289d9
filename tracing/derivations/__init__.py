"""Derivation recipes: small deterministic functions that derive a model from a base the ways released models are
made (fine-tunes, LoRA, vocabulary and tokenizer changes, depth and width surgery, mergekit merges, quantization,
symmetries) or are not (the nulls), each with its ground truth as plain data; `save` writes any of them as a
checkpoint `python main.py` loads.

    tok = zoo.build_tokenizer(zoo.synthetic_text(3000, seed=0))
    ids = torch.tensor(tok(zoo.synthetic_text(1500, seed=1))["input_ids"])
    base = pretrain(zoo.tiny_config("llama", vocab_size=len(tok), layers=4), ids, seed=0)
    d = derive("depth-upscale", base, tok, ids)       # d.model, d.tokenizer, d.truth (kind, parents, layer_map, ...)
    path = save(d, Path("zoo/llama/depth-upscale"))  # main.py --base_model_id zoo/llama/base --ft_model_id PATH
    KINDS["rotate"].refusal(base.config)              # None, or why the kind makes no sense for this family

Every recipe takes (base, tokenizer, token ids, **options) and leaves the base untouched; options with `steps`
train (steps=0: the surgery alone). Recipes are generic over the ArchSpec; a kind that makes no sense for a
family (rotate on LayerNorm models, GGUF files transformers cannot read back) raises a TracingError saying so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tracing.checkpoints import guard
from tracing.derivations import layers, merges, nulls, quant, tuning, width
from tracing.derivations.core import BASE, KINDS, TRUTH_FIELDS, Derived, Recipe, get_recipe
from tracing.derivations.train import independent, pretrain

__all__ = ["BASE", "KINDS", "TRUTH_FIELDS", "Derived", "Recipe", "derive", "independent", "pretrain", "save",
           "layers", "merges", "nulls", "quant", "tuning", "width"]

TRUTH_FILE = "truth.json"
ORDER = ("finetune", "finetune-long", "lora", "lora-adapter", "vocab-extend", "tokenizer-transplant",
         "depth-upscale", "layer-prune", "layer-prune-healed", "width-prune-mlp", "width-prune-mlp-healed",
         "width-prune-hidden", "merge-linear", "merge-slerp", "merge-task-arithmetic", "merge-ties", "merge-dare",
         "passthrough", "quant-int8", "quant-int4", "quant-gguf-q8_0", "quant-gguf-q4_0", "permute", "rotate",
         "independent", "independent-other-data", "damaged-zeroed", "damaged-duplicated", "damaged-constant",
         "merge-of-independents")
assert set(ORDER) == set(KINDS), sorted(set(ORDER) ^ set(KINDS))
KINDS.update({kind: KINDS.pop(kind) for kind in ORDER})  # registered module by module; listed in this order


def derive(kind: str, base: Any, tok: Any, ids: torch.Tensor, **options: Any) -> Derived:
    """Run the recipe `kind` (a name of KINDS) on `base`."""
    return get_recipe(kind).fn(base, tok, ids, **options)


def save(derived: Derived, out_dir: str | Path, base_dir: str | Path | None = None) -> Path:
    """Write `derived` under `out_dir` as a checkpoint main.py loads, with its truth in truth.json beside it;
    returns the path to pass as --ft_model_id: the directory (save_pretrained and tokenizer, or a PEFT adapter
    naming `base_dir`, the directory its base was saved in) or the .gguf file inside it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with guard(None, progress=False):
        if derived.writer is not None:
            path = derived.writer(out, None if base_dir is None else str(base_dir))
        else:
            derived.model.save_pretrained(out)
            derived.tokenizer.save_pretrained(out)
            path = out
    (out / TRUTH_FILE).write_text(json.dumps(derived.truth, indent=1))
    return path
