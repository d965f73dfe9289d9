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

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from tracing.arch import ArchSpec, get_spec
from tracing.errors import TracingError


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


def check_keys(name: str, spec: ArchSpec, present: set[str], ranks: dict[str, int], fix: str) -> None:
    """Raise TracingError unless `present` holds every key of `spec` (a tied LM head may be absent) with
    the spec's rank. `fix` ends the message (e.g. "re-download the checkpoint")."""
    optional = {spec.lm_head} if spec.tied else set()
    missing = [k for k in spec.axes if k not in present and k not in optional]
    if missing:
        raise TracingError(f"{name} lacks {len(missing)} weight(s) its {spec.model_type} config implies, e.g. "
                           f"{missing[0]}: {fix}")
    bad = [k for k in spec.axes if k in ranks and ranks[k] != len(spec.axes[k])]
    if bad:
        raise TracingError(f"{name}: {bad[0]} has {ranks[bad[0]]} dimensions where {spec.model_type} has "
                           f"{len(spec.axes[bad[0]])}: the weights do not match config.json; {fix}")


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

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._sd().items()}  # not cached: the model may be resized

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd()[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._sd()[key].dtype

    def _read(self, key: str, rows: slice | None) -> torch.Tensor:
        t = self._sd()[key].detach()
        return t if rows is None else t[rows]


def as_source(x: Source | torch.nn.Module, spec: ArchSpec | None = None) -> Source:
    """`x` itself if it is a source, else the ModuleSource of a loaded model."""
    return x if isinstance(x, Source) else ModuleSource(x, spec)
