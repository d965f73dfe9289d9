"""Weight-space transforms, generic over the ArchSpec: residual rotation (in place or as a view), interpolation.

    Q = rotate_residual(model, spec, seed=1)        # same function, residual basis rotated by Q
    view = RotatedSource(src, seed=1)               # the same rotation applied to each tensor as it is read
    saved = interpolate_(base, ft, 0.5, spec, groups=("mlp",))
    ...                                              # evaluate the interpolated base
    restore_(base, saved)                            # base is bit-for-bit what it was

Rotation convention: the new residual stream is x' = Q x (column vectors). Every tensor axis named "resid"
in the spec holds vectors that live in the residual space (embedding rows, reader rows, writer columns,
writer biases), and each such vector v becomes Q v. A reader after a norm sees norm(x) = g * x / rms(x);
rms is rotation-invariant, so folding g into the reader (W -> W diag(g), then g := 1) and rotating gives
W diag(g) Q^T Q x / rms(x) = the original output. LayerNorm (mean-centering) and norms with gains on
block outputs do not commute with Q: those families carry `spec.rotate_refusal`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from tracing.arch import RESID, ArchSpec, get_spec
from tracing.errors import TracingError
from tracing.sources.base import ModuleSource, Source, View

_CHUNK = 8192  # rows per float64 matmul, bounds memory on big embeddings


# --------------------------------------------------------------------------- rotation
def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix (n, n), float64 on CPU: QR of a seeded Gaussian, signs fixed."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    signs = torch.where(torch.diagonal(r) >= 0, 1.0, -1.0).to(torch.float64)
    return q * signs  # scale columns: unique Q for a given Gaussian draw


def untie_embeddings(model: torch.nn.Module) -> bool:
    """Give a tied lm_head its own Parameter (config.tie_word_embeddings=False). Returns whether it was tied."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or out.weight is not inp.weight:
        return False
    out.weight = torch.nn.Parameter(out.weight.detach().clone(), requires_grad=out.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text_cfg is not None and text_cfg is not model.config:
        text_cfg.tie_word_embeddings = False
    return True


def _norm_readers(spec: ArchSpec) -> dict[str, tuple[str, ...]]:
    """norm weight key -> the keys that read its output."""
    readers: dict[str, tuple[str, ...]] = {}
    for roles in spec.layers:
        if roles.pre_attn_norm:
            readers[roles.pre_attn_norm] = roles.attn_in
        if roles.pre_mlp_norm:
            readers[roles.pre_mlp_norm] = tuple(k for k in (roles.gate, roles.up) if k)
    if spec.final_norm and spec.lm_head:
        readers[spec.final_norm] = (spec.lm_head,)
    return readers


def check_rotatable(spec: ArchSpec) -> None:
    """A TracingError unless rotating the residual stream keeps the function of a `spec` model."""
    if spec.rotate_refusal:
        raise TracingError(f"--rotate is not function-preserving for {spec.model_type}: {spec.rotate_refusal}")
    if spec.norm not in ("rms", "rms_1p"):
        raise TracingError(f"--rotate is not function-preserving for {spec.model_type} ({spec.norm} norms): "
                           "use --permute instead")


class RotatedSource(View):
    """`inner` with its residual stream rotated by Q = random_orthogonal(hidden, seed), as each tensor is read.

    The function-preserving rotation of `rotate_residual`, as a view: norm gains folded into their readers
    (and read as identity), every residual vector v read as Q v, the LM head untied (`spec.tied` False).
    Computed in float64 per chunk of rows; tensors come back in float32 (or `dtype`, or float64 if stored so).
    """

    def __init__(self, inner: Source, seed: int, dtype: torch.dtype | None = None):
        spec = inner.spec
        check_rotatable(spec)
        super().__init__(inner, dataclasses.replace(spec, tied=False))
        self.out_dtype = dtype
        readers = _norm_readers(spec)
        missing = [k for k in readers if k not in inner.shapes()]
        if missing:
            raise TracingError(f"cannot rotate {spec.model_type}: norm weights {missing[:3]} not found in the model; "
                               "use --permute instead")
        self.norms = {k: (0.0 if spec.norm == "rms_1p" else 1.0) for k in readers}  # value of a folded gain
        self.gains: dict[str, torch.Tensor] = {}  # reader key -> gain (hidden,), float64
        for norm_key, keys in readers.items():
            g = inner.get(norm_key).to("cpu", torch.float64, copy=True)  # a copy: rotate_residual overwrites it
            g = g + 1.0 if spec.norm == "rms_1p" else g
            self.gains.update({k: g for k in keys})
        hidden = inner.shape(spec.embed)[spec.axis(spec.embed, RESID)]
        self.q = random_orthogonal(hidden, seed)  # (hidden, hidden) float64: new residual = Q @ old

    def dtype(self, key: str) -> torch.dtype:
        return self._out(self.inner.dtype(key)) if key in self.norms or self.spec.axis(key, RESID) is not None \
            else self.inner.dtype(key)

    def _out(self, stored: torch.dtype) -> torch.dtype:
        return self.out_dtype or (torch.float64 if stored == torch.float64 else torch.float32)

    def _read(self, key: str, rows: slice | None) -> torch.Tensor:
        a = self.spec.axis(key, RESID)
        if key in self.norms:
            t = self.inner.get(key, rows)
            return torch.full(t.shape, self.norms[key], dtype=self._out(t.dtype), device=t.device)
        if a is None:
            return self.inner.get(key, rows)
        whole = rows is not None and a == 0  # rotating axis 0 mixes every row: read them all
        t = self.inner.get(key, None if whole else rows)
        out = torch.empty(t.shape, dtype=self._out(t.dtype), device=t.device)
        src, dst = t.movedim(a, -1), out.movedim(a, -1)  # (..., hidden): each row a vector of the residual space
        src2, dst2 = (src, dst) if src.dim() == 2 else (src.reshape(-1, src.shape[-1]), dst.view(-1, dst.shape[-1]))
        qt = self.q.T.contiguous().to(t.device)
        g = self.gains.get(key)
        g = None if g is None else g.to(t.device)
        for s in range(0, src2.shape[0], _CHUNK):
            block = src2[s:s + _CHUNK].double()  # (chunk, hidden)
            if g is not None:
                block = block * g
            dst2[s:s + _CHUNK].copy_(block @ qt)  # v -> Q v, row form v^T Q^T
        return out[rows] if whole else out


@torch.no_grad()
def rotate_residual(model: torch.nn.Module, spec: ArchSpec, seed: int) -> torch.Tensor:
    """Rotate `model`'s residual stream by a random orthogonal Q, in place, keeping its function.

    Norm gains are folded into the weights that read the normed stream, then set to identity (1 for
    RMSNorm, 0 for Gemma's (1 + w) norms). A tied lm_head is untied first (folding the final-norm gain
    breaks the tie): call `get_spec(model.config)` again afterwards. Returns Q (hidden, hidden), float64 CPU,
    with new residual = Q @ old residual. The values are those `RotatedSource` reads.
    """
    check_rotatable(spec)
    params = dict(model.named_parameters())
    missing = [k for k in _norm_readers(spec) if k not in params]
    if missing:
        raise TracingError(f"cannot rotate {spec.model_type}: norm weights {missing[:3]} not found in the model; "
                           "use --permute instead")
    untie_embeddings(model)
    dtype = next(model.parameters()).dtype  # rounded once, from float64 straight to the parameters' dtype
    view = RotatedSource(ModuleSource(model, get_spec(model.config)), seed, dtype=dtype)
    for key, t in model.named_parameters():  # each tensor's rotation reads only itself (gains were copied)
        if key in view.norms or spec.axis(key, RESID) is not None:
            t.copy_(view.get(key))
    return view.q


# --------------------------------------------------------------------------- interpolation
def check_alpha(alpha: float) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise TracingError(f"--alpha must be in [0, 1], got {alpha}: 0 is the base model, 1 the fine-tuned one")


@torch.no_grad()
def interpolate_(target: torch.nn.Module, other: torch.nn.Module, alpha: float, spec: ArchSpec,
                 groups: Iterable[str] = ("mlp",)) -> dict[str, torch.Tensor]:
    """target := (1 - alpha) * target + alpha * other on the chosen groups, in place.

    Returns the original tensors of the touched parameters (on CPU) for `restore_`. Tied parameters are
    interpolated once. `other` may live on another device; nothing is deep-copied.
    """
    check_alpha(alpha)
    keys = set(spec.keys_in(tuple(groups)))
    mine = dict(target.named_parameters())
    theirs = dict(other.named_parameters())
    theirs_sd = None
    pairs = []  # (key, target tensor, other tensor): all checked before anything is modified
    for key, t in mine.items():
        if key not in keys:
            continue
        o = theirs.get(key)
        if o is None:  # e.g. a tied lm_head on one side only: fall back to the full state dict
            theirs_sd = other.state_dict() if theirs_sd is None else theirs_sd
            o = theirs_sd.get(key)
        if o is None:
            raise TracingError(f"cannot interpolate: {key} is missing from the fine-tuned model; "
                               "mode needs two models of the same architecture (try --stat match)")
        if o.shape != t.shape:
            raise TracingError(f"cannot interpolate {key}: shapes {tuple(t.shape)} vs {tuple(o.shape)}; "
                               "mode needs equal shapes (try --stat match)")
        pairs.append((key, t, o))
    saved: dict[str, torch.Tensor] = {}
    for key, t, o in pairs:
        saved[key] = t.detach().to("cpu", copy=True)
        t.lerp_(o.detach().to(t.device, t.dtype), float(alpha))  # exact at alpha = 0 and alpha = 1
    return saved


@torch.no_grad()
def restore_(target: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Undo `interpolate_`: copy the saved tensors back, exactly."""
    params = dict(target.named_parameters())
    for key, t in saved.items():
        params[key].copy_(t)
