"""Two checkpoints opened once: their tensor sources, the models loaded at most once, and the transforms of the
fine-tuned side (permute, rotate, align) as methods that return a new pair.

    pair = OpenedPair.open(base_ckpt, ft_ckpt, opts)   # headers read and checked; no model loaded
    pair.source_base, pair.source_ft   # what weight statistics read (views over the files; the models' own
                                       # tensors once the models are loaded)
    pair.load()                        # both models, loaded once, for statistics that need activations
    pair.base, pair.ft                 # the loaded models (None until `load`)
    p = pair.permute(seed)             # a new pair: ft's hidden units permuted
    p = p.rotate(seed + 1)             # ... then its residual stream rotated
    p = p.align("fast", seed)          # ... then aligned to base (the permutation found from the weights)
    pair.tokenizer_base, pair.read_stats()

What is opened is shared by every pair derived from one `open`: each checkpoint's files are opened once, each
model loaded at most once. Transforms are recorded on the pair; they are read through views over the files
(`perm.permuted`, `transforms.RotatedSource`) until the models are loaded, and applied to the loaded ft in place
(`apply_perm`, `rotate_residual`: the same values) when a pair hands out its ft model or source. The loaded ft
holds one pair's transforms at a time: asking another pair for it changes it in place (permutations are undone
exactly), or, after a rotation that pair does not have, loads it again. Use one pair at a time (statistics run
one after another); sources and models taken from an earlier pair show the latest pair's ft.

A checkpoint the sources cannot stream (PyTorch .bin only, an adapter feature LoraSource does not compute) is
read through its loaded model: loaded on the CPU in the stream dtype when only weights are read, or once with
the run's device and dtype by `load`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tracing.align import align_weights
from tracing.arch import ArchSpec, get_spec
from tracing.checkpoints import Checkpoint, load_tokenizer
from tracing.matching import DEFAULT_METHOD
from tracing.models import load_model
from tracing.perm import Perm, apply_perm, invert, permuted, random_perm
from tracing.sources import ModuleSource, Source, leaves, open_files
from tracing.transforms import RotatedSource, check_rotatable, rotate_residual


@dataclass(frozen=True)
class OpenOptions:
    """How checkpoints are read: files cast to `stream_dtype` (None: as stored); models loaded with `dtype` on
    `device` (`device_map`: accelerate's sharding). The token is used, never shown (repr) or stored."""

    dtype: Any = None  # torch dtype of loaded models (None: float32 on CPU, bf16 on GPU)
    device: str | torch.device = "auto"
    device_map: str | dict | None = None
    stream_dtype: torch.dtype | None = None
    trust_remote_code: bool = False
    progress: bool = True
    allow_keys: Sequence[str] = ()
    notes: list | None = None  # where allowed missing / unexpected weights are noted
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, eq=False)
class Transform:
    """One transform of ft: a permutation of its hidden units, or a rotation of its residual stream."""

    perm: Perm | None = None
    rotate_seed: int | None = None


class _Side:
    """One checkpoint of the pair, opened: its file source, its model (loaded at most once), its tokenizer."""

    def __init__(self, ckpt: Checkpoint, opts: OpenOptions):
        self.ckpt, self.opts = ckpt, opts
        self.files = open_files(ckpt, dtype=opts.stream_dtype, token=opts.token,
                                trust_remote_code=opts.trust_remote_code, allow_keys=opts.allow_keys,
                                notes=opts.notes)  # None: only a loaded model reads it
        if self.files is not None:
            self.files.tokenizer_from(lambda: self.tokenizer(quiet=True))
        self.model: torch.nn.Module | None = None
        self.for_run = False  # loaded with the run's device and dtype (else: the stream fallback on the CPU)
        self.applied: tuple[Transform, ...] = ()  # transforms the loaded model holds, in place
        self.module: ModuleSource | None = None
        self.read: list[Source] = [] if self.files is None else [self.files]  # every source that read tensors
        self._tokenizer: Any = None
        self._tokenizer_loaded = False

    def tokenizer(self, quiet: bool = False) -> Any:
        if not self._tokenizer_loaded:
            self._tokenizer = load_tokenizer(self.ckpt, token=self.opts.token, quiet=quiet,
                                             trust_remote_code=self.opts.trust_remote_code)
            self._tokenizer_loaded = True
        return self._tokenizer

    def load(self, for_run: bool) -> torch.nn.Module:
        """The model: loaded once (again only to move from the stream fallback to the run's settings)."""
        if self.model is not None and (self.for_run or not for_run):
            return self.model
        o = self.opts
        kw = dict(dtype=o.dtype, device=o.device, device_map=o.device_map) if for_run else \
            dict(dtype=o.stream_dtype, device="cpu")
        self.model = self.module = None  # free a fallback before loading the run's model
        self.model, _ = load_model(self.ckpt, trust_remote_code=o.trust_remote_code, token=o.token,
                                   progress=o.progress, allow_keys=o.allow_keys, notes=o.notes, tokenizer=False,
                                   **kw)
        self.for_run, self.applied = for_run, ()
        return self.model

    def module_source(self) -> ModuleSource:
        """The loaded model as a source (rebuilt when a rotation has untied its embeddings: a new spec)."""
        spec = get_spec(self.model.config)
        if self.module is None or self.module.model is not self.model or self.module.spec != spec:
            self.module = ModuleSource(self.model, spec, name=self.ckpt.name)
            self.module.tokenizer_from(lambda: self.tokenizer(quiet=True))
            self.read.append(self.module)
        return self.module


class _Opened:
    """What every pair derived from one `open` shares."""

    def __init__(self, base: _Side, ft: _Side):
        self.base, self.ft = base, ft
        self.loaded = False  # `load` was called: the models are the run's


class OpenedPair:
    """Two opened checkpoints and the transforms of ft (module docstring). Build it with `OpenedPair.open`."""

    def __init__(self, opened: _Opened, transforms: tuple[Transform, ...] = ()):
        self._opened = opened
        self.transforms = transforms
        self._view: Source | None = None  # ft's files seen through the transforms (built on first use)

    @classmethod
    def open(cls, base: Checkpoint, ft: Checkpoint, opts: OpenOptions | None = None) -> OpenedPair:
        """Open both checkpoints' files (headers read and checked: a broken checkpoint stops here); no model is
        loaded and no tensor read."""
        opts = opts or OpenOptions()
        return cls(_Opened(_Side(base, opts), _Side(ft, opts)))

    # ------------------------------------------------------------------ what the pair is
    @property
    def checkpoints(self) -> tuple[Checkpoint, Checkpoint]:
        return self._opened.base.ckpt, self._opened.ft.ckpt

    @property
    def dtype(self) -> torch.dtype:
        """The dtype models are loaded in (streamed tensors are read as stored, or cast to --dtype)."""
        return self._opened.base.opts.dtype

    @property
    def loaded(self) -> bool:
        """Whether the models are loaded (`load`): statistics then read their tensors, not the files."""
        return self._opened.loaded

    @property
    def headers_known(self) -> bool:
        """Whether keys and shapes are known without loading a model (both checkpoints stream)."""
        return self._opened.base.files is not None and self._opened.ft.files is not None

    def load(self) -> OpenedPair:
        """Load both models (once; with the run's device and dtype). Returns self."""
        for side in (self._opened.base, self._opened.ft):
            side.load(for_run=True)
        self._opened.loaded = True
        return self

    @property
    def base(self) -> torch.nn.Module | None:
        return self._opened.base.model if self.loaded else None

    @property
    def ft(self) -> torch.nn.Module | None:
        """The loaded ft, holding this pair's transforms (None until `load`)."""
        return self._ft_model() if self.loaded else None

    @property
    def source_base(self) -> Source:
        side = self._opened.base
        if side.files is not None and not self.loaded:
            return side.files
        side.load(for_run=self.loaded)
        return side.module_source()

    @property
    def source_ft(self) -> Source:
        side = self._opened.ft
        if side.files is not None and not self.loaded:
            if self._view is None:
                self._view = side.files
                for t in self.transforms:
                    self._view = permuted(self._view, t.perm) if t.perm is not None else \
                        RotatedSource(self._view, seed=t.rotate_seed)
            return self._view
        self._ft_model()
        return side.module_source()

    @property
    def spec_base(self) -> ArchSpec:
        return self.source_base.spec

    @property
    def spec_ft(self) -> ArchSpec:
        return self.source_ft.spec

    @property
    def tokenizer_base(self) -> Any:
        return self._opened.base.tokenizer()

    @property
    def tokenizer_ft(self) -> Any:
        return self._opened.ft.tokenizer()

    def vocab_sizes(self) -> tuple[int, int]:
        """Rows of each embedding, from the headers where the checkpoint streams (else its config)."""
        def rows(side: _Side) -> int:
            if side.files is not None:
                return side.files.shape(side.files.spec.embed)[0]
            cfg = side.ckpt.config
            return (cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg).vocab_size
        return rows(self._opened.base), rows(self._opened.ft)

    def read_stats(self) -> tuple[float, int]:
        """(seconds, bytes) read by the sources under this pair's two checkpoints, summed over threads."""
        files = {id(s): s for side in (self._opened.base, self._opened.ft) for r in side.read for s in leaves(r)}
        return sum(s.read_s for s in files.values()), sum(s.read_bytes for s in files.values())

    # ------------------------------------------------------------------ transforms of ft
    def permute(self, seed: int) -> OpenedPair:
        """ft's hidden units (residual stream and each MLP) randomly permuted."""
        src = self.source_ft
        return self._then(Transform(perm=random_perm(src.spec, src.shapes(), seed=seed)))

    def rotate(self, seed: int) -> OpenedPair:
        """ft's residual stream rotated by a random orthogonal matrix (function-preserving: RMSNorm families)."""
        check_rotatable(self.source_ft.spec)
        return self._then(Transform(rotate_seed=seed))

    def align(self, method: str = DEFAULT_METHOD, seed: int = 0, progress: bool = True,
              device: torch.device | None = None) -> OpenedPair:
        """ft permuted to line up with base (align.align_weights on the weights as this pair has them)."""
        perm = align_weights(self.source_base, self.source_ft, self.spec_base, progress=progress, device=device,
                             method=method, seed=seed)
        return self._then(Transform(perm=perm))

    def _then(self, t: Transform) -> OpenedPair:
        return OpenedPair(self._opened, (*self.transforms, t))

    @torch.no_grad()
    def _ft_model(self) -> torch.nn.Module:
        """ft's model (loaded if needed), changed in place to hold exactly this pair's transforms."""
        side = self._opened.ft
        model = side.load(for_run=self.loaded)
        n = 0
        while n < min(len(side.applied), len(self.transforms)) and side.applied[n] is self.transforms[n]:
            n += 1
        extra = side.applied[n:]
        if any(t.perm is None for t in extra):  # a rotation this pair does not have: no exact undo
            side.model = None
            model, n = side.load(for_run=self.loaded), 0
        else:
            for t in reversed(extra):  # gathers only: exact
                apply_perm(model, get_spec(model.config), invert(t.perm))
        for t in self.transforms[n:]:
            if t.perm is not None:
                apply_perm(model, get_spec(model.config), t.perm)
            else:
                rotate_residual(model, get_spec(model.config), seed=t.rotate_seed)
        side.applied = self.transforms
        return model

    def __repr__(self) -> str:
        base, ft = self.checkpoints
        done = ", ".join("permute" if t.perm is not None else "rotate" for t in self.transforms)
        return f"OpenedPair({base.name!r}, {ft.name!r}{', ' + done if done else ''}{', loaded' if self.loaded else ''})"
