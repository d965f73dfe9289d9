"""The tensor-source interface, and the source over a loaded model.

    src.keys()                         # the state-dict keys of the ArchSpec, from headers (no tensor data read)
    src.shape(key), src.dtype(key)     # likewise
    w = src.get(key)                   # one tensor, on the CPU, in the stored dtype
    w = src.get(key, rows=slice(0, 4096))   # rows 0..4095 along axis 0 only
    src = ModuleSource(model)          # a loaded nn.Module is a source too (its live parameters, no copies)

A source presents exactly the keys a loaded model's `state_dict()` would have: those of its ArchSpec, with a
tied LM head read as the embedding (as transformers ties it). Tensors returned by `get` are never modified
by their readers (they may be the model's own parameters or a read-only file mapping).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tracing.arch import RESID, ArchSpec, get_spec, mlp
from tracing.errors import TracingError
from tracing.models import check_loading_info


class Source:
    """Keys, shapes and dtypes without reading data; `get(key, rows)` reads one tensor on demand.

    Subclasses implement `_keys`, `shape`, `dtype` and `_read`; `get` adds the tied-head alias, the optional
    cast to `dtype`, and read accounting (`read_s`, `read_bytes`, summed over threads).
    """

    def __init__(self, name: str, config: Any, spec: ArchSpec | None = None, dtype: torch.dtype | None = None):
        self.name = name  # what the user passed, for messages
        self.config = config  # transformers config (for the spec, and what a model would be built from)
        self.spec = spec if spec is not None else get_spec(config)
        self.cast = dtype  # cast every tensor read to this dtype (None: as stored)
        self._tokenizer: Any = None
        self._tokenizer_loader: Callable[[], Any] | None = None
        self.read_s = 0.0
        self.read_bytes = 0
        self._lock = threading.Lock()
        tied = self.spec.tied and self.spec.lm_head is not None
        self.alias: dict[str, str] = {self.spec.lm_head: self.spec.embed} if tied else {}

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer or None, loaded on first use (only `emb` and data statistics need it)."""
        if self._tokenizer_loader is not None:
            self._tokenizer, self._tokenizer_loader = self._tokenizer_loader(), None
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._tokenizer, self._tokenizer_loader = value, None

    def tokenizer_from(self, loader: Callable[[], Any]) -> None:
        """Load the tokenizer with `loader()` when it is first asked for."""
        self._tokenizer_loader = loader

    # ------------------------------------------------------------------ what a subclass provides
    def _keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def _read(self, key: str, rows: slice | None) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ the interface
    @property
    def device(self) -> torch.device:
        """Where `get` returns tensors: the CPU (a loaded model's device for ModuleSource)."""
        return torch.device("cpu")

    def keys(self) -> list[str]:
        return self._keys()

    def __contains__(self, key: str) -> bool:
        return key in self.shapes()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """key -> shape for every key (cached: the keys of a source never change)."""
        if not hasattr(self, "_shapes"):
            self._shapes = {k: tuple(self.shape(k)) for k in self.keys()}
        return self._shapes

    def get(self, key: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor `key` (rows `rows` of axis 0 if given), on the CPU (a model's device for ModuleSource)."""
        if key not in self.shapes():
            raise KeyError(f"{key} is not a weight of {self.name}")
        t0 = time.perf_counter()
        t = self._read(self.alias.get(key, key), rows)
        if self.cast is not None and t.dtype != self.cast:
            t = t.to(self.cast)
        with self._lock:
            self.read_s += time.perf_counter() - t0
            self.read_bytes += t.numel() * t.element_size()
        return t

    def close(self) -> None:
        """Release files or memory held (nothing for most sources)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.spec.model_type}, {len(self.keys())} tensors)"


# buffers old checkpoints carry that transformers drops on load without a word (_keys_to_ignore_on_load_unexpected)
IGNORED_UNEXPECTED = {None: r"rotary_emb\.inv_freq|(^|\.)position_ids$", "gpt2": r"\.(cross)?attn\.(masked_)?bias$",
                      "gpt_neox": r"\.attention\.(masked_)?bias$"}


def check_checkpoint(name: str, spec: ArchSpec, config: Any, shapes: dict[str, tuple[int, ...]],
                     unexpected: list[str], allow_keys: Sequence[str] = (), notes: list | None = None) -> set[str]:
    """A checkpoint must be what its config says, as `load_model` requires (`check_loading_info`): weights of the
    spec missing from `shapes` (a tied LM head may be absent), `unexpected` ones, and weights whose sizes differ
    from the config's (hidden, MLP width, vocabulary) or whose rank differs from the spec's are a TracingError
    naming them; `allow_keys` lets named missing / unexpected ones through (noted). Returns the allowed-missing
    keys (a source leaves them out: nothing random is ever read in their place)."""
    optional = {spec.lm_head} if spec.tied else set()
    missing = [k for k in spec.axes if k not in shapes and k not in optional]
    ignored = re.compile("|".join(p for f, p in IGNORED_UNEXPECTED.items() if f in (None, spec.family)))
    unexpected = [k for k in unexpected if not ignored.search(k)]
    check_loading_info(name, {"missing_keys": missing, "unexpected_keys": unexpected}, allow_keys, notes)
    wrong = []  # (key, shape in the checkpoint, what the config and spec say)
    for key in sorted(k for k in spec.axes if k in shapes):
        axes, shape = spec.axes[key], tuple(shapes[key])
        if len(shape) != len(axes):
            wrong.append((key, shape, f"{len(axes)} dimensions"))
            continue
        sizes = _config_sizes(spec, config, key)
        want = tuple(sizes.get(a) or n for a, n in zip(axes, shape))
        if want != shape:
            wrong.append((key, shape, want))
    if wrong:
        key, got, want = wrong[0]
        raise TracingError(f"{name}: {len(wrong)} weights have other shapes than its config.json says, e.g. {key} "
                           f"{got} in the checkpoint vs {want}: the config does not belong to these weights; "
                           f"fix config.json")
    return set(missing)


def _config_sizes(spec: ArchSpec, config: Any, key: str) -> dict:
    """Axis name -> the size the config gives it (None where it does not say), for `key`."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(cfg, "hidden_size", None)
    mlp_width = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or \
        (4 * hidden if spec.family == "gpt2" and hidden else None)
    sizes: dict = {RESID: hidden, **{mlp(i): mlp_width for i in range(spec.n_layers)}}
    if key in (spec.embed, spec.lm_head):
        sizes[None] = getattr(cfg, "vocab_size", None)  # the vocabulary axis
    return sizes


class ModuleSource(Source):
    """A loaded model as a source: its live state-dict tensors (views, no copies), on the model's device.

    In-place changes to the model (apply_perm, rotate_residual) show through. `tokenizer` may be given.
    """

    def __init__(self, model: torch.nn.Module, spec: ArchSpec | None = None, tokenizer: Any = None,
                 name: str | None = None):
        super().__init__(name or getattr(model, "name_or_path", "") or type(model).__name__, model.config,
                         spec if spec is not None else get_spec(model.config))
        self.model = model
        self.tokenizer = tokenizer
        self.alias = {}  # state_dict() already holds a tied head as the embedding's tensor

    def _sd(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()  # views of the parameters; cheap, and current after in-place changes

    def _keys(self) -> list[str]:
        return list(self._sd())

    @property
    def device(self) -> torch.device:
        return next(iter(self._sd().values())).device

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._sd().items()}  # not cached: the model may be resized

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd()[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._sd()[key].dtype

    def _read(self, key: str, rows: slice | None) -> torch.Tensor:
        try:
            t = self.model.get_parameter(key).detach()  # one lookup, not a whole state_dict() per tensor
        except AttributeError:  # a buffer
            t = self._sd()[key].detach()
        return t if rows is None else t[rows]


class View(Source):
    """A transform read through: `inner`'s keys, device, shapes and dtypes (a subclass changes what differs),
    its tokenizer, and no tied-head alias of its own (the inner source resolves it)."""

    def __init__(self, inner: Source, spec: ArchSpec | None = None):
        super().__init__(inner.name, inner.config, spec if spec is not None else inner.spec)
        self.inner = inner
        self.alias = {}
        self.tokenizer_from(lambda: inner.tokenizer)

    def _keys(self) -> list[str]:
        return self.inner.keys()

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def shape(self, key: str) -> tuple[int, ...]:
        return self.inner.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.inner.dtype(key)

def as_source(x: Source | torch.nn.Module, spec: ArchSpec | None = None) -> Source:
    """`x` itself if it is a source, else the ModuleSource of a loaded model."""
    return x if isinstance(x, Source) else ModuleSource(x, spec)
