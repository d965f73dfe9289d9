"""Language-modelling loss and perplexity over token blocks.

    loss = mean_loss(model, blocks, batch_size=8)   # blocks: (n_blocks, block_size) token ids
    print(loss, perplexity(loss))

The loss is the token-weighted mean next-token cross-entropy (nats) over every block: each block of T
tokens contributes T - 1 predictions. Logits are cast to float32 before the loss, so bf16 models are safe.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tracing.devices import model_device
from tracing.errors import TracingError


@torch.no_grad()
def mean_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 1, progress: bool = True) -> float:
    """Token-weighted mean cross-entropy of `model` on `blocks` (n, T), in nats."""
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise TracingError(f"need token blocks of shape (n_blocks, block_size >= 2), got {tuple(blocks.shape)}; "
                           "use a longer dataset or a larger --block_size")
    if batch_size < 1:
        raise TracingError(f"--batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for s in tqdm(range(0, blocks.shape[0], batch_size), desc="loss", disable=not progress):
            ids = blocks[s:s + batch_size].to(device)  # (B, T)
            logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
            targets = ids[:, 1:].to(logits.device)  # (B, T-1)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     reduction="sum").item()
            count += targets.numel()
    finally:
        model.train(was_training)
    return total / count


def perplexity(loss: float) -> float:
    """exp(loss); inf where that overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
