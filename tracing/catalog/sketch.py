"""The fixed maps a fingerprint is made with: the random basis of each hidden size, the anchor tokens, and the
inputs an MLP sees (docs/catalog.md has the math).

    s = Settings()                              # sketch_dims 32, anchors 48, sample_rows 512, seed 0
    G = basis(576, s)                           # (576, 32): the same for every model of hidden size 576
    strings, ids = anchor_ids(tokenizer, s)     # the first `anchors` of ANCHORS that the vocabulary has
    e_hat = anchor_inputs(emb_rows, spec)       # (T, hidden): anchor embeddings as a norm layer would see them
    g = mlp_gain(src, layer)                    # (hidden,): the gain of the norm feeding the MLP (ones if none)

A catalogue keeps one `Settings` (index.json); every fingerprint in it, and every suspect compared with it, is
made with those settings, so two sketches of one hidden size share their basis.
"""

from __future__ import annotations

import string
import zlib
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from tracing.arch import ArchSpec
from tracing.errors import TracingError
from tracing.sources.base import Source


@dataclass(frozen=True)
class Settings:
    """How fingerprints are made (one set per catalogue)."""

    sketch_dims: int = 32  # k: dimensions of the random basis of the residual stream
    anchors: int = 48  # T: anchor tokens kept (at most)
    sample_rows: int = 512  # S: MLP units kept per layer (the largest by gain-folded norm)
    seed: int = 0  # of the random basis

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < (0 if f.name == "seed" else 1):
                raise TracingError(f"fingerprint setting {f.name} must be a positive integer, got {value!r}")
        if self.anchors < MIN_ANCHORS:
            raise TracingError(f"fingerprint setting anchors must be at least {MIN_ANCHORS}, got {self.anchors}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Settings:
        if not isinstance(d, dict) or set(d) - {f.name for f in fields(cls)}:
            raise TracingError(f"{where}: fingerprint settings must be a mapping of "
                               f"{', '.join(f.name for f in fields(cls))}, got {d!r}")
        return cls(**d)


MIN_ANCHORS = 16  # anchors two models must share for the anchored test
# Anchor strings, most widespread first, in canonical form (`canonical`): letters, digits, punctuation, then
# frequent English words with a leading space. Byte-level BPE (GPT-2, Llama 3, Qwen) and SentencePiece (Llama 2,
# Mistral, Gemma) vocabularies hold most of them as single tokens.
_WORDS = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not",
          "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you")
ANCHORS: tuple[str, ...] = (*string.ascii_lowercase, *string.ascii_uppercase, *string.digits,
                            *".,;:!?'\"()-", *(f" {w}" for w in _WORDS), *(f" {c}" for c in string.ascii_lowercase))
_SPACES = {"Ġ": " ", "▁": " ", "Ċ": "\n"}  # byte-level BPE and SentencePiece spellings of space and newline


def canonical(token: str) -> str:
    """A vocabulary entry as text: 'Ġthe' (byte-level BPE) and '▁the' (SentencePiece) both read ' the'."""
    for mark, text in _SPACES.items():
        token = token.replace(mark, text)
    return token


def anchor_ids(tokenizer: Any, settings: Settings) -> tuple[list[str], list[int]]:
    """(anchor strings, their token ids): the first `settings.anchors` strings of ANCHORS the tokenizer holds as
    one token (the lowest id where several entries read the same). ([], []) without a tokenizer."""
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return [], []
    by_text: dict[str, int] = {}
    for tok, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        by_text.setdefault(canonical(tok), int(i))
    found = [s for s in ANCHORS if s in by_text][:settings.anchors]
    return found, [by_text[s] for s in found]


def basis(hidden: int, settings: Settings) -> torch.Tensor:
    """The random basis of the residual stream of width `hidden`: (hidden, k) standard Gaussian, float32, drawn
    from a seed of (settings.seed, hidden) (zlib.crc32: the same on every machine and Python)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"model-tracing sketch {settings.seed} {hidden}".encode()))
    return torch.randn(hidden, settings.sketch_dims, generator=g, dtype=torch.float32)


def anchor_inputs(rows: torch.Tensor, spec: ArchSpec) -> torch.Tensor:
    """Embedding rows (T, hidden) as the model's norms see them, up to the gain: scaled to norm 1 (RMSNorm), after
    removing their mean (LayerNorm). A rotation or permutation of the residual stream maps them as it maps the
    weights, so products with gain-folded weights do not change."""
    x = rows.float()
    if spec.norm in ("layer", "layer_nonparam"):
        x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def mlp_gain(src: Source, layer: int) -> torch.Tensor | None:
    """The gain (hidden,) of the norm whose output feeds layer `layer`'s MLP (Gemma's 1 + w), or None where the
    MLP reads the residual stream without one (OLMo's non-parametric norms, OLMo-2's post-norms)."""
    spec = src.spec
    key = spec.layers[layer].pre_mlp_norm
    if key is None or key not in src.shapes():
        return None
    g = src.get(key).float()
    return g + 1.0 if spec.norm == "rms_1p" else g
