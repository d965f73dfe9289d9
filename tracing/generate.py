"""Sample texts from models into `<save>/<safe_name(model_id)>_gentext.json` (read by --dataset generated).

    python generate.py --model_id results/demo/base --n 32 --max_new_tokens 64 --save results/generated
    python generate.py --config config/demo.yaml --save results/generated

Schema: {"model_id": str, "seed": int, "max_new_tokens": int, "texts": [str, ...]}. Seeded, batched,
written atomically; an existing file is kept unless --force.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tracing.errors import TracingError, exit_on_error
from tracing.model_lists import load_config
from tracing.models import load_model
from tracing.naming import GENERATED_DIR, generated_path
from tracing.results import atomic_write, check_writable


@torch.no_grad()
def sample_texts(model: torch.nn.Module, tokenizer: Any, n: int, max_new_tokens: int, seed: int = 0,
                 batch_size: int = 8, temperature: float = 1.0, progress: bool = True) -> list[str]:
    """n unconditional samples (each starts from the BOS token, or token 0 without one), decoded."""
    device = next(model.parameters()).device
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = torch.Generator(device="cpu").manual_seed(seed)
    texts: list[str] = []
    for lo in tqdm(range(0, n, batch_size), desc="generate", disable=not progress):
        b = min(batch_size, n - lo)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        ids = torch.full((b, 1), start, dtype=torch.long, device=device)  # (B, 1)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                             top_k=0, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             pad_token_id=pad)  # (B, 1 + T)
        texts += tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
    return texts


def write_texts(path: Path, model_id: str, seed: int, max_new_tokens: int, texts: list[str]) -> Path:
    """Write the texts file atomically (a failed write leaves neither a partial file nor a temp file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"model_id": model_id, "seed": seed, "max_new_tokens": max_new_tokens, "texts": texts})
    atomic_write(path, data.encode("utf-8"))
    return path


def generate_for(model_id: str, save: str | Path, n: int = 32, max_new_tokens: int = 64, seed: int = 0,
                 batch_size: int = 8, force: bool = False, dtype: str | None = None, device: str = "auto",
                 progress: bool = True) -> tuple[Path, bool]:
    """Write one model's texts; returns (path, written) — written False when the file existed already."""
    path = generated_path(save, model_id)
    if path.exists() and not force:
        return path, False
    if n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise TracingError("--n, --max_new_tokens and --batch_size must be positive")
    model, tokenizer = load_model(model_id, dtype=dtype, device=device, token=os.environ.get("HF_TOKEN"))
    if tokenizer is None:
        raise TracingError(f"{model_id} has no tokenizer, so no text can be sampled from it: save its tokenizer "
                           f"next to the model (tokenizer.save_pretrained)")
    model.eval()
    texts = sample_texts(model, tokenizer, n, max_new_tokens, seed=seed, batch_size=batch_size, progress=progress)
    return write_texts(path, model_id, seed, max_new_tokens, texts), True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model_id", action="append", help="model to sample from (repeatable)")
    src.add_argument("--config", help="model-list YAML (config/*.yaml): every model in it")
    p.add_argument("--save", default=str(GENERATED_DIR))
    p.add_argument("--n", type=int, default=32, help="number of texts per model")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true", help="regenerate existing files")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)

    def run() -> int:
        check_writable(args.save, "--save")  # before any model is loaded
        if args.config:
            pairs = load_config(args.config).pairs
            ids = list(dict.fromkeys(m for pair in pairs for m in (pair.base, pair.ft)))
        else:
            ids = args.model_id
        for mid in ids:
            path, written = generate_for(mid, args.save, args.n, args.max_new_tokens, args.seed, args.batch_size,
                                         args.force, args.dtype, args.device, progress=not args.no_progress)
            print(f"{'wrote' if written else 'exists, skipped'} {path}", flush=True)
        return 0

    return exit_on_error(run)
