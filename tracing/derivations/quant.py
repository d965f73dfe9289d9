"""Quantization round trips: the weights a quantized release holds, back in float.

    d = quant_int8(base, tok, ids)        # every 2-D block weight: symmetric absmax, one scale per row
    d = quant_int4(base, tok, ids)        # one scale per group of 32 inputs (GPTQ/AWQ-like grouping)
    d = quant_gguf_q4_0(base, tok, ids)   # a .gguf file (save writes it); d.model: what that file loads as

int8/int4 quantize the blocks' matrices (as bitsandbytes, GPTQ and AWQ do: embeddings, head and norms stay in
float); each value moves by at most half its step (scale = absmax / (2^(bits-1) - 1)). GGUF Q8_0/Q4_0 are
llama.cpp's block formats (32 values per scale), written with the `gguf` package for every 2-D tensor whose
rows are a multiple of 32, embeddings and head included (as llama.cpp quantizes them).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from tracing.arch import get_spec
from tracing.derivations.core import BASE, Derived, Model, recipe, same_layers, truth
from tracing.derivations.gguf_writer import gguf_refusal, round_trip, write_gguf
from tracing.errors import TracingError


@torch.no_grad()
def absmax_round_trip(w: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    """w (rows, cols) rounded to `bits`-bit integers and back, one scale per row or per `group` columns."""
    levels = 2 ** (bits - 1) - 1  # 127 for int8, 7 for int4
    rows, cols = w.shape
    g = cols if group is None else group
    if cols % g:
        raise TracingError(f"quantization groups of {g} do not divide rows of {cols} values: pick a group size "
                           f"that divides the model's widths")
    blocks = w.reshape(rows, cols // g, g)  # (rows, groups, group)
    scale = blocks.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / levels
    return ((blocks / scale).round().clamp(-levels, levels) * scale).reshape(rows, cols)


def _int(kind: str, base: Model, tok: Any, bits: int, group: int | None) -> Derived:
    spec = get_spec(base.config)
    model = copy.deepcopy(base)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key in spec.layer_of and p.dim() == 2:  # scales per output row (Conv1D stores (in, out))
                p.copy_(absmax_round_trip(p.T, bits, group).T if spec.conv1d else absmax_round_trip(p, bits, group))
    layout = "per-row" if group is None else f"per-group-{group}"
    quant = {"bits": bits, "format": f"int{bits}-absmax-{layout}", "group_size": group,
             "tensors": "block matrices"}
    return Derived(kind, model, tok, truth(kind, base, model, parents=[BASE], layer_map=same_layers(model),
                                           quant=quant))


@recipe("quant-int8")
def quant_int8(base: Model, tok: Any, ids: torch.Tensor | None = None) -> Derived:
    """int8 round trip of every block matrix, symmetric absmax, one scale per row."""
    return _int("quant-int8", base, tok, 8, None)


@recipe("quant-int4")
def quant_int4(base: Model, tok: Any, ids: torch.Tensor | None = None, *, group: int = 32) -> Derived:
    """int4 round trip of every block matrix, symmetric absmax, one scale per group of `group` inputs."""
    return _int("quant-int4", base, tok, 4, group)


def _gguf(kind: str, base: Model, tok: Any, qtype: str) -> Derived:
    model = copy.deepcopy(base)
    model.load_state_dict(round_trip(base, qtype), strict=True)

    def write(out: Path, base_dir: str | None) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"model.{qtype}.gguf"
        write_gguf(base, tok, path, qtype)
        return path

    bits = {"Q8_0": 8, "Q4_0": 4}[qtype]
    quant = {"bits": bits, "format": f"gguf-{qtype.lower()}", "group_size": 32,
             "tensors": "2-D tensors with rows a multiple of 32"}
    return Derived(kind, model.eval(), tok, truth(kind, base, model, parents=[BASE], layer_map=same_layers(model),
                                                  quant=quant), writer=write)


@recipe("quant-gguf-q8_0", refusal=gguf_refusal)
def quant_gguf_q8_0(base: Model, tok: Any, ids: torch.Tensor | None = None) -> Derived:
    """A llama.cpp Q8_0 .gguf file (8-bit, one scale per 32 values)."""
    return _gguf("quant-gguf-q8_0", base, tok, "Q8_0")


@recipe("quant-gguf-q4_0", refusal=gguf_refusal)
def quant_gguf_q4_0(base: Model, tok: Any, ids: torch.Tensor | None = None) -> Derived:
    """A llama.cpp Q4_0 .gguf file (4-bit, one scale per 32 values)."""
    return _gguf("quant-gguf-q4_0", base, tok, "Q4_0")
