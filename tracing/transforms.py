"""Weight-space transforms, in place and generic over the ArchSpec: residual rotation and interpolation.

    Q = rotate_residual(model, spec, seed=1)        # same function, residual basis rotated by Q
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

from collections.abc import Iterable

import torch

from tracing.arch import RESID, ArchSpec
from tracing.errors import TracingError

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


def _check_rotatable(spec: ArchSpec) -> None:
    if spec.rotate_refusal:
        raise TracingError(f"--rotate is not function-preserving for {spec.model_type}: {spec.rotate_refusal}")
    if spec.norm not in ("rms", "rms_1p"):
        raise TracingError(f"--rotate is not function-preserving for {spec.model_type} ({spec.norm} norms): "
                           "use --permute instead")


@torch.no_grad()
def rotate_residual(model: torch.nn.Module, spec: ArchSpec, seed: int) -> torch.Tensor:
    """Rotate `model`'s residual stream by a random orthogonal Q, in place, keeping its function.

    Norm gains are folded into the weights that read the normed stream, then set to identity (1 for
    RMSNorm, 0 for Gemma's (1 + w) norms). A tied lm_head is untied first (folding the final-norm gain
    breaks the tie): call `get_spec(model.config)` again afterwards. Returns Q (hidden, hidden), float64 CPU,
    with new residual = Q @ old residual.
    """
    _check_rotatable(spec)
    untie_embeddings(model)
    params = dict(model.named_parameters())
    readers = _norm_readers(spec)
    missing = [k for k in readers if k not in params]
    if missing:
        raise TracingError(f"cannot rotate {spec.model_type}: norm weights {missing[:3]} not found in the model; "
                           "use --permute instead")
    gains = {}  # reader key -> gain vector (hidden,), float64
    for norm_key, keys in readers.items():
        g = params[norm_key].detach().double()
        g = g + 1.0 if spec.norm == "rms_1p" else g
        for k in keys:
            gains[k] = g
    hidden = params[spec.embed].shape[spec.axis(spec.embed, RESID)]
    q = random_orthogonal(hidden, seed)
    qt_dev: dict[torch.device, torch.Tensor] = {}
    for key, t in params.items():
        if key in readers:  # the norm weight itself: identity after folding
            t.fill_(0.0 if spec.norm == "rms_1p" else 1.0)
            continue
        a = spec.axis(key, RESID) if key in spec.axes else None
        if a is None:
            continue
        qt = qt_dev.setdefault(t.device, q.T.contiguous().to(t.device))
        g = gains.get(key)
        g = None if g is None else g.to(t.device)
        rows = t.movedim(a, -1)  # (..., hidden) view: each row is one vector in the residual space
        flat = rows if rows.dim() == 2 else rows.unsqueeze(0)
        for s in range(0, flat.shape[0], _CHUNK):
            block = flat[s:s + _CHUNK].double()  # (chunk, hidden)
            if g is not None:
                block = block * g
            flat[s:s + _CHUNK].copy_(block @ qt)  # v -> Q v, row form v^T Q^T
    return q


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
