"""Training shared by the recipes: healing and fine-tuning (zoo.finetune: deterministic at any thread count),
models trained from scratch (bases and independent nulls), token ids of other data or another tokenizer.

    base = pretrain(zoo.tiny_config("llama", vocab_size=len(tok), layers=4), ids, seed=0)
    other = independent(base, ids, seed=1)        # same family, same data and batch order, another init
    ids2 = retokenize(tok, ids, new_tok)          # the same text in another tokenizer's ids
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import transformers

from tracing import zoo
from tracing.derivations.core import Model

PRETRAIN_STEPS, PRETRAIN_LR = 200, 1e-3  # bases and independent nulls: trained from scratch alike
HEAL_STEPS, HEAL_LR = 50, 5e-4  # healing after surgery


def train(model: Model, ids: torch.Tensor, steps: int, lr: float, seed: int) -> Model:
    """`model` trained in place for `steps` Adam steps on random blocks of `ids` (steps=0: untouched)."""
    if steps <= 0:
        return model.eval()
    block = min(64, len(ids) // 4)
    return zoo.finetune(model, ids, steps=steps, lr=lr, block_size=block, seed=seed)


def tuned(base: Model, ids: torch.Tensor, steps: int, lr: float, seed: int) -> Model:
    """A trained copy of `base` (the base is left as it was)."""
    return train(copy.deepcopy(base), ids, steps, lr, seed)


def pretrain(config: Any, ids: torch.Tensor, seed: int = 0, steps: int = PRETRAIN_STEPS, lr: float = PRETRAIN_LR,
             data_seed: int = 0) -> Model:
    """A model of `config` initialised from `seed` and trained from scratch on `ids` (batches drawn with
    `data_seed`): the zoo's bases, and its independent nulls when only `seed` differs."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config))
    return train(model.float(), ids, steps, lr, data_seed)


def independent(base: Model, ids: torch.Tensor, seed: int, steps: int = PRETRAIN_STEPS,
                lr: float = PRETRAIN_LR, data_seed: int = 0) -> Model:
    """A model of the base's family and shape trained from another initialisation (`seed`) on `ids`: with the
    base's own data, steps and batch seed it differs from the base only in its random init."""
    return pretrain(base.config, ids, seed=seed, steps=steps, lr=lr, data_seed=data_seed)


def independent_name(seed: int) -> str:
    return f"independent-{seed}"


def text_of(tok: Any, ids: torch.Tensor) -> str:
    return tok.decode(ids.tolist())


def retokenize(tok: Any, ids: torch.Tensor, new_tok: Any) -> torch.Tensor:
    """The text of `ids` (in `tok`) as ids of `new_tok` (1-D)."""
    return torch.tensor(new_tok(text_of(tok, ids))["input_ids"])


def other_ids(tok: Any, n_tokens: int, seed: int) -> torch.Tensor:
    """About `n_tokens` ids of other text: another sample of the zoo's grammar (seed 10000 + seed)."""
    text = zoo.synthetic_text(max(64, n_tokens // 8), seed=10_000 + seed)
    return torch.tensor(tok(text)["input_ids"][:n_tokens])
