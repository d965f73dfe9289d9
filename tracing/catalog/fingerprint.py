"""A fingerprint: what one streaming read of a checkpoint keeps so that the weight tests can later be screened and
computed without its weights (docs/catalog.md: what each part preserves and which p-value it supports).

    fp = build(open_source("org/model"), Settings(), name="org/model", content_hash=ckpt.content_hash)
    fp.rows("csu", 3)          # (S, k) layer 3's sampled MLP up rows in the random basis of the residual stream
    fp.rows("in", 3)           # (S, T) the same units' gain-folded up rows times the anchor tokens' embeddings
    fp.rows("mate", 3)         # (S, T) ... their gate rows (gated MLPs) or down columns (GPT-2, Pythia)
    fp.units(3)                # (S,) which units of the layer were kept (ascending)
    data = to_bytes(fp); fp = from_bytes(data, "where")   # one safetensors file, the metadata in its header

Per layer it keeps the S = `sample_rows` usable units with the largest gain-folded up-row norm (all of them in
smaller layers), in ascending unit order, and three sketches of each: "csu" (up row @ basis), "in" and "mate"
(anchored: up and gate rows, the norm's gain folded in, times the normalised embeddings of the anchor tokens; for
ungated MLPs the down column instead of the gate row). Also the anchor tokens' embeddings in the basis ("emb"),
and the shapes. Sketches are stored as float16 scaled to [-1, 1] per array (its scale in the metadata).
Tensors are read one at a time through the source (an MLP matrix at a time: memory is one layer's, never the
model's); the embedding only at the anchor rows.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import safetensors
import safetensors.torch
import torch

from tracing.arch import mlp
from tracing.catalog.sketch import MIN_ANCHORS, Settings, anchor_ids, anchor_inputs, basis, mlp_gain
from tracing.errors import TracingError
from tracing.matching import usable
from tracing.sources.base import Source

SCHEMA = 1  # of a fingerprint file; a reader refuses a newer one
KINDS = ("csu", "in", "mate")  # the sketches kept per layer


@dataclass
class Fingerprint:
    """Plain metadata (JSON) and named tensors; see the module docstring."""

    meta: dict
    arrays: dict[str, torch.Tensor]

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def n_layers(self) -> int:
        return self.meta["layers"]

    def has(self, kind: str) -> bool:
        return f"{kind}.0" in self.arrays

    def rows(self, kind: str, layer: int) -> torch.Tensor:
        """Layer `layer`'s sketch `kind` (KINDS), float32, at its stored scale: (S, k) or (S, T)."""
        key = f"{kind}.{layer}"
        return self.arrays[key].float() * self.meta["scales"][key]

    def units(self, layer: int) -> torch.Tensor:
        """(S,) int64: the kept units of the layer, ascending (their index in the checkpoint)."""
        return self.arrays[f"idx.{layer}"].long()

    def emb(self) -> torch.Tensor | None:
        """(T, k) the anchor tokens' embedding rows in the basis (None without anchors)."""
        return self.arrays["emb"].float() * self.meta["scales"]["emb"] if "emb" in self.arrays else None

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (the file adds its header and metadata)."""
        return sum(t.numel() * t.element_size() for t in self.arrays.values())


def sample_units(norms: torch.Tensor, ok: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The `k` usable units (ok) with the largest `norms` (n,), ties in a seeded random order (never index
    order), returned in ascending index order: (min(k, usable),) int64."""
    candidates = ok.nonzero()[:, 0]
    if len(candidates) > k:
        shuffled = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))]
        order = torch.sort(norms[shuffled], descending=True, stable=True).indices[:k]
        candidates = shuffled[order]
    return candidates.sort().values


def _pack(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """float16 in [-1, 1] and the scale that gives x back."""
    scale = float(x.abs().max()) if x.numel() else 1.0
    scale = scale if scale > 0 and scale == scale else 1.0
    return (x / scale).to(torch.float16).contiguous(), scale


@torch.no_grad()
def build(src: Source, settings: Settings, *, name: str, content_hash: str | None = None,
          weight_bytes: int | None = None, extra: dict | None = None) -> Fingerprint:
    """The fingerprint of the checkpoint behind `src` (module docstring), read tensor by tensor."""
    t0 = time.perf_counter()
    spec = src.spec
    if any(layer.moe is not None for layer in spec.layers):
        raise TracingError(f"{name} is a mixture of experts ({spec.model_type}): fingerprints sketch dense MLP units "
                           f"only; compare it pair by pair (python main.py --base_model_id BASE --ft_model_id {name})")
    vocab, hidden = src.shape(spec.embed)  # (vocab, hidden)
    g_basis = basis(hidden, settings)  # (hidden, k)
    arrays: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}

    def put(key: str, x: torch.Tensor) -> None:
        arrays[key], scales[key] = _pack(x)

    strings, ids = anchor_ids(src.tokenizer, settings)
    kept = [(s, i) for s, i in zip(strings, ids) if i < vocab]
    why_no_anchors = None if len(kept) >= MIN_ANCHORS else (
        "no tokenizer" if src.tokenizer is None else f"only {len(kept)} of the anchor tokens are in its vocabulary")
    e_hat = None
    if why_no_anchors is None:
        emb = torch.cat([src.get(spec.embed, slice(i, i + 1)).float() for _, i in kept])  # (T, hidden)
        put("emb", emb @ g_basis)
        e_hat = anchor_inputs(emb, spec)  # (T, hidden)
    widths, sampled = [], []
    for i, roles in enumerate(spec.layers):
        up = spec.neuron_rows(src.get(roles.up).float(), roles.up, mlp(i))  # (n, hidden)
        mate_key = roles.gate or roles.down
        mate = spec.neuron_rows(src.get(mate_key).float(), mate_key, mlp(i))  # (n, hidden)
        gain = mlp_gain(src, i)  # (hidden,) or None
        up_g = up if gain is None else up * gain
        keep = sample_units(up_g.norm(dim=1), usable(up) & usable(mate), settings.sample_rows,
                            seed=settings.seed * 100_003 + i)  # (S,)
        widths.append(int(up.shape[0]))
        sampled.append(int(len(keep)))
        arrays[f"idx.{i}"] = keep.to(torch.int32)
        put(f"csu.{i}", up[keep] @ g_basis)  # (S, k)
        if e_hat is not None:
            mate_g = mate if gain is None or roles.gate is None else mate * gain  # a down column is no input
            put(f"in.{i}", up_g[keep] @ e_hat.T)  # (S, T)
            put(f"mate.{i}", mate_g[keep] @ e_hat.T)  # (S, T)
        del up, mate, up_g
    meta = {"schema": SCHEMA, "name": name, "content_hash": content_hash, "model_type": spec.model_type,
            "family": spec.family, "layers": spec.n_layers, "hidden": int(hidden), "mlp": widths, "vocab": int(vocab),
            "gated": spec.gated, "norm": spec.norm, "tied": spec.tied, "sampled": sampled,
            "anchors": [s for s, _ in kept] if e_hat is not None else [],
            "anchor_ids": [i for _, i in kept] if e_hat is not None else [], "why_no_anchors": why_no_anchors,
            "settings": settings.to_dict(), "scales": scales, "weight_bytes": weight_bytes,
            "seconds": time.perf_counter() - t0, **(extra or {})}
    return Fingerprint(meta, arrays)


# ---------------------------------------------------------------------- one file
def to_bytes(fp: Fingerprint) -> bytes:
    """One safetensors file: the arrays, and the metadata as JSON in its header (key "fingerprint")."""
    return safetensors.torch.save(fp.arrays, metadata={"fingerprint": json.dumps(fp.meta, sort_keys=True)})


def from_bytes(data: bytes, where: str) -> Fingerprint:
    """The fingerprint in `data` (a file's bytes); a TracingError naming `where` when it is not one, or was
    written by a newer version."""
    try:
        arrays = safetensors.torch.load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"]["fingerprint"])
    except (safetensors.SafetensorError, ValueError, KeyError, TypeError) as e:
        raise TracingError(f"{where} is not a readable fingerprint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'truncated'})") from None
    check_schema(meta.get("schema"), SCHEMA, where, "fingerprint")
    return Fingerprint(meta, arrays)


def check_schema(schema: Any, current: int, where: str, what: str) -> None:
    """A newer (or missing) schema number as a one-line error naming the fix."""
    if not isinstance(schema, int):
        raise TracingError(f"{where} has no {what} schema number: it is not a model-tracing {what}")
    if schema > current:
        raise TracingError(f"{where} was written by a newer model-tracing ({what} schema {schema}; this version "
                           f"reads {current}): upgrade model-tracing (pip install -U model-tracing)")
