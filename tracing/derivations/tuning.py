"""Derivations by training: full fine-tunes, LoRA (merged, or as an adapter directory over the base), vocabulary
extension and tokenizer transplant. Every one trains with `train` (deterministic at any thread count).

    d = finetune(base, tok, ids)                  # 30 steps at lr 1e-4
    d = lora_adapter(base, tok, ids, rank=4)      # save(d, out, base_dir=...) writes a PEFT adapter directory
    d = vocab_extend(base, tok, ids, new_tokens=64, steps=0)   # old rows kept exactly before training
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer

from tracing import zoo
from tracing.arch import get_spec
from tracing.derivations.core import BASE, Derived, Model, recipe, same_layers, trained, truth
from tracing.derivations.train import HEAL_LR, other_ids, retokenize, text_of, train, tuned
from tracing.errors import TracingError


@recipe("finetune")
def finetune(base: Model, tok: Any, ids: torch.Tensor, *, steps: int = 30, lr: float = 1e-4,
             seed: int = 1) -> Derived:
    """Full fine-tune, short and at a small learning rate."""
    model = tuned(base, ids, steps, lr, seed)
    return Derived("finetune", model, tok, truth("finetune", base, model, parents=[BASE],
                                                  layer_map=same_layers(model), training=trained(steps, lr, seed)))


@recipe("finetune-long")
def finetune_long(base: Model, tok: Any, ids: torch.Tensor, *, steps: int = 300, lr: float = 3e-3,
                  seed: int = 1) -> Derived:
    """Full fine-tune, many steps at a high learning rate."""
    model = tuned(base, ids, steps, lr, seed)
    return Derived("finetune-long", model, tok, truth("finetune-long", base, model, parents=[BASE],
                                                       layer_map=same_layers(model),
                                                       training=trained(steps, lr, seed)))


# ---------------------------------------------------------------------- LoRA
def lora_targets(config: Any) -> list[str]:
    """The names of every linear module of a block (attention in/out, MLP in/out), as peft matches them."""
    roles = get_spec(config).layers[0]
    keys = [*roles.attn_in, roles.attn_out, roles.up, roles.down, *([roles.gate] if roles.gate else [])]
    return sorted({k.rsplit(".", 2)[-2] for k in keys})


def _trained_lora(base: Model, ids: torch.Tensor, rank: int, alpha: int, steps: int, lr: float, seed: int):
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(base.config)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                     fan_in_fan_out=get_spec(base.config).conv1d)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # peft draws lora_A at random (B starts at zero)
        peft_model = get_peft_model(copy.deepcopy(base), cfg)
    train(peft_model, ids, steps, lr, seed)
    return peft_model, {"rank": rank, "alpha": alpha, "targets": targets}


@recipe("lora")
def lora(base: Model, tok: Any, ids: torch.Tensor, *, rank: int = 8, alpha: int = 16, steps: int = 50,
         lr: float = 1e-3, seed: int = 1) -> Derived:
    """A rank-r LoRA on every linear module of the blocks, trained, then merged into the weights."""
    peft_model, adapter = _trained_lora(base, ids, rank, alpha, steps, lr, seed)
    model = peft_model.merge_and_unload().eval().requires_grad_(True)  # peft froze the base: a recipe may train it
    return Derived("lora", model, tok, truth("lora", base, model, parents=[BASE], layer_map=same_layers(model),
                                              adapter={**adapter, "merged": True},
                                              training=trained(steps, lr, seed)))


@recipe("lora-adapter")
def lora_adapter(base: Model, tok: Any, ids: torch.Tensor, *, rank: int = 8, alpha: int = 16, steps: int = 50,
                 lr: float = 1e-3, seed: int = 1) -> Derived:
    """The same LoRA saved as a PEFT adapter directory whose adapter_config.json names the base's directory."""
    peft_model, adapter = _trained_lora(base, ids, rank, alpha, steps, lr, seed)
    model = copy.deepcopy(peft_model).merge_and_unload().eval().requires_grad_(True)

    def write(out: Path, base_dir: str | None) -> Path:
        if base_dir is None:
            raise TracingError("lora-adapter is saved over its base: pass base_dir=, the directory the base "
                               "was saved in (its adapter_config.json names it)")
        peft_model.peft_config["default"].base_model_name_or_path = str(Path(base_dir).resolve())
        peft_model.save_pretrained(out)
        tok.save_pretrained(out)
        return out

    return Derived("lora-adapter", model, tok, truth("lora-adapter", base, model, parents=[BASE],
                                                      layer_map=same_layers(model),
                                                      adapter={**adapter, "merged": False},
                                                      training=trained(steps, lr, seed)), writer=write)


# ---------------------------------------------------------------------- vocabulary
def new_words(tok: Any, text: str, n: int) -> list[str]:
    """The `n` most frequent words and word pairs of `text` (with their leading space) that `tok` splits."""
    words = re.findall(r" ?[A-Za-z0-9]+", text)
    counts = Counter(words + [a + b for a, b in zip(words, words[1:])])
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    out = [w for w in ranked if len(tok(w)["input_ids"]) > 1][:n]
    if len(out) < n:
        raise TracingError(f"vocab-extend: the training text has only {len(out)} words the tokenizer splits; "
                           f"ask for new_tokens={len(out)} or fewer, or pass more text")
    return out


@recipe("vocab-extend")
def vocab_extend(base: Model, tok: Any, ids: torch.Tensor, *, new_tokens: int = 64, steps: int = 50,
                 lr: float = 1e-3, seed: int = 1) -> Derived:
    """+N tokens (frequent words the tokenizer splits) added; embeddings and head resized, new rows drawn around
    the old mean (transformers' mean resizing); then trained on the text in the new tokenizer."""
    new_tok = copy.deepcopy(tok)
    new_tok.add_tokens(new_words(tok, text_of(tok, ids), new_tokens))
    model = copy.deepcopy(base)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.resize_token_embeddings(len(new_tok), mean_resizing=True)
    train(model, retokenize(tok, ids, new_tok), steps, lr, seed)
    return Derived("vocab-extend", model, new_tok, truth("vocab-extend", base, model, parents=[BASE],
                                                          layer_map=same_layers(model), vocab="extended",
                                                          training=trained(steps, lr, seed, "retokenized")))


def shuffled_tokenizer(text: str, vocab_size: int, seed: int) -> Any:
    """A BPE tokenizer trained on `text` whose non-special token ids are shuffled: a different tokenizer, not
    a re-ordering of the base's (special tokens keep their ids, so the config's pad/bos/eos ids stay right)."""
    fresh = zoo.build_tokenizer(text, vocab_size=vocab_size)
    spec = json.loads(fresh.backend_tokenizer.to_str())
    special = {t["content"] for t in spec["added_tokens"]}
    vocab = spec["model"]["vocab"]
    free = sorted(i for t, i in vocab.items() if t not in special)
    order = torch.randperm(len(free), generator=torch.Generator().manual_seed(seed)).tolist()
    moved = {old: free[j] for old, j in zip(free, order)}
    spec["model"]["vocab"] = {t: moved.get(i, i) for t, i in vocab.items()}
    backend = Tokenizer.from_str(json.dumps(spec))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **fresh.special_tokens_map)


@recipe("tokenizer-transplant")
def tokenizer_transplant(base: Model, tok: Any, ids: torch.Tensor, *, vocab_size: int | None = None,
                         steps: int = 100, lr: float = HEAL_LR * 2, seed: int = 1) -> Derived:
    """A different tokenizer (trained on other text, its own ids); embeddings and head re-initialised for it
    (normal, the config's initializer_range), then everything trained: the blocks are kept from the base."""
    size = vocab_size or max(300, 3 * len(tok) // 4)
    new_tok = shuffled_tokenizer(text_of(tok, other_ids(tok, len(ids), seed)), size, seed)
    model = copy.deepcopy(base)
    model.resize_token_embeddings(len(new_tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    std = float(getattr(model.config, "initializer_range", 0.02))
    with torch.no_grad():
        tables = (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
        for w in {id(t): t for t in tables}.values():  # a tied head is the embedding: drawn once
            w.copy_(torch.randn(w.shape, generator=g) * std)
    train(model, retokenize(tok, ids, new_tok), steps, lr, seed)
    return Derived("tokenizer-transplant", model, new_tok,
                   truth("tokenizer-transplant", base, model, parents=[BASE], layer_map=same_layers(model),
                         vocab="replaced", training=trained(steps, lr, seed, "retokenized")))
