"""Statistics registry. Each statistic is one module that registers a function `ctx -> StatResult`.

    @register("csu", help="...", needs_data=False)
    def csu(ctx: StatContext) -> StatResult: ...

    get_stat("mc").name   # "mode" (aliases resolve to the canonical name)
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tracing.arch import ArchSpec
from tracing.choices import LOWER_IS_RELATED
from tracing.config import FIELDS, RunConfig
from tracing.errors import TracingError
from tracing.matching import DEFAULT_METHOD
from tracing.pair import OpenedPair
from tracing.sources.base import ModuleSource, Source


@dataclass
class StatResult:
    value: float  # the statistic (for p-value statistics: the combined log10 p, or the raw statistic)
    log10_pvalue: float | None  # None when the statistic has no p-value
    per_layer: list = field(default_factory=list)  # plain floats / dicts, one per layer
    extras: dict = field(default_factory=dict)  # plain data only

    def to_dict(self) -> dict:
        return asdict(self)

    def require_number(self, stat: str) -> StatResult:
        """self, unless the statistic computed no number (NaN / inf value or p-value): then a TracingError
        with the reason in one line. No verdict without a number: such a run is failed, never ok."""
        numbers = [self.value] + ([] if self.log10_pvalue is None else [self.log10_pvalue])
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers):
            return self
        layer_ps = [r["log10_pvalue"] for r in self.per_layer if isinstance(r, dict) and "log10_pvalue" in r]
        if not self.per_layer:
            why = "nothing was compared"
        elif layer_ps and not any(isinstance(v, (int, float)) and math.isfinite(v) for v in layer_ps):
            why = f"all {len(layer_ps)} layers gave no p-value (constant, all-zero or non-finite weights or inputs)"
        else:
            why = f"its value is {self.value}" + ("" if self.log10_pvalue is None else
                                                  f" and its log10 p {self.log10_pvalue}")
        raise TracingError(f"{stat} computed no number: {why}; check the models for NaN or degenerate weights, "
                           "or pick other --layers")


@dataclass
class StatContext:
    """Everything a statistic may use. Weight statistics read tensors from `source_base` / `source_ft` one at a
    time; data statistics run the loaded models `base` / `ft` (on their device, in eval mode), which are None
    when a run streams its weights. Given only models, the sources are the models' own (`ModuleSource`).

    The options (batch_size .. seed) are RunConfig's fields of the same names: `for_run` copies them.
    """

    base: torch.nn.Module | None = None
    ft: torch.nn.Module | None = None
    spec_base: ArchSpec | None = None  # default: the source's
    spec_ft: ArchSpec | None = None
    source_base: Source | None = None  # default: ModuleSource(base)
    source_ft: Source | None = None
    blocks: torch.Tensor | None = None  # (n_blocks, block_size) token ids, when needs_data
    batch_size: int = 1
    alpha: float = 0.5  # mode: interpolation weight of ft
    alphas: Sequence[float] | None = None  # mode: a whole curve
    attn: bool = False  # mode: also interpolate attention
    emb: bool = False  # mode: also interpolate embeddings
    layers: Sequence[int] | None = None  # restrict per-layer statistics to these layers
    max_tokens: int | None = None  # activation statistics: token budget
    matching: str = DEFAULT_METHOD  # neuron matching method (tracing.matching.METHODS)
    memory_budget: int | None = None  # bytes for activation accumulators (None: from free memory)
    seed: int = 0
    tokenizer_base: Any = None
    tokenizer_ft: Any = None
    out_dir: str | None = None  # where a statistic may write figures
    progress: bool = True
    # weight statistics: where tensors go, one at a time, for their products (None: where the source returns them)
    compute_device: torch.device | None = None
    # the opened pair the sources come from (tracing/pair.py): what a composite statistic (auto) aligns or loads
    pair: OpenedPair | None = None
    load_blocks: Callable[[], torch.Tensor] | None = None  # the run's token blocks, made when first needed
    # Values that permuting ft's hidden units cannot change (e.g. the endpoint losses of mode), so that
    # PERMTEST's inner calls, which share this dict, compute them once.
    cache: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source_base is None and self.base is not None:
            self.source_base = ModuleSource(self.base, self.spec_base, tokenizer=self.tokenizer_base)
        if self.source_ft is None and self.ft is not None:
            self.source_ft = ModuleSource(self.ft, self.spec_ft, tokenizer=self.tokenizer_ft)
        if self.source_base is None or self.source_ft is None:
            raise ValueError("a StatContext needs the two models or the two sources")
        self.spec_base = self.spec_base or self.source_base.spec
        self.spec_ft = self.spec_ft or self.source_ft.spec

    @classmethod
    def for_run(cls, cfg: RunConfig, **runtime: Any) -> StatContext:
        """A context for one run: the options from `cfg`, the models and everything else from `runtime`."""
        options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if f.name in FIELDS}
        return cls(**options, progress=not cfg.no_progress, **runtime)

    @classmethod
    def for_pair(cls, cfg: RunConfig, pair: OpenedPair, info: StatInfo | None = None, **runtime: Any) -> StatContext:
        """A context for one run on an opened pair: the options from `cfg`; the sources, specs and (once the pair
        is loaded) models and tokenizers from `pair`; blocks and the rest from `runtime`. Given the statistic
        `info`, a pair it runs the models of is loaded first (once: `pair.load()`)."""
        if info is not None and info.needs_data and not pair.loaded:
            pair.load()
        return cls.for_run(cfg, **_from_pair(pair), **runtime)

    def on(self, pair: OpenedPair) -> StatContext:
        """This context on another pair of the same run (e.g. ft aligned): same options, blocks and cache."""
        return dataclasses.replace(self, **_from_pair(pair))


def _from_pair(pair: OpenedPair) -> dict[str, Any]:
    return dict(pair=pair, base=pair.base, ft=pair.ft, source_base=pair.source_base, source_ft=pair.source_ft,
                spec_base=pair.spec_base, spec_ft=pair.spec_ft,
                tokenizer_base=pair.tokenizer_base if pair.loaded else None,
                tokenizer_ft=pair.tokenizer_ft if pair.loaded else None)


Misfit = Callable[[Source, Source], "str | None"]  # why a statistic cannot run on a pair of sources (None: it can)


@dataclass(frozen=True)
class StatInfo:
    name: str
    fn: Callable[[StatContext], StatResult]
    help: str
    aliases: tuple[str, ...] = ()
    needs_data: bool = False  # needs ctx.blocks (and the models loaded, unless composite)
    fits: tuple[Misfit, ...] = ()  # what the pair must satisfy, asked of headers and configs before anything runs
    scalar: bool = True  # `value` can be wrapped in PERMTEST (--num_perm)
    higher_is_related: bool = True  # direction of `value` for PERMTEST (choices.LOWER_IS_RELATED)
    composite: bool = False  # runs other statistics on ctx.pair, loading the models itself if one needs them

    @property
    def loads_models(self) -> bool:
        """Whether the models must be loaded before it runs (a composite statistic loads them itself)."""
        return self.needs_data and not self.composite

    def misfit(self, a: Source, b: Source) -> str | None:
        """Why this statistic cannot run on the pair (the first reason), None when it can."""
        return next((why for check in self.fits if (why := check(a, b))), None)


_REGISTRY: dict[str, StatInfo] = {}
_ALIASES: dict[str, str] = {}
_MODULES = ("auto", "l2", "cos", "emb", "csu", "mode", "csh", "match", "match_all", "jsd")


def register(name: str, *, help: str, aliases: tuple[str, ...] = (), needs_data: bool = False,
             fits: tuple[Misfit, ...] = (), scalar: bool = True, composite: bool = False):
    def deco(fn):
        _REGISTRY[name] = StatInfo(name, fn, help, aliases, needs_data, tuple(fits), scalar,
                                   name not in LOWER_IS_RELATED, composite)
        for a in aliases:
            _ALIASES[a] = name
        return fn
    return deco


def _load_all() -> None:
    for m in _MODULES:
        try:
            importlib.import_module(f"tracing.statistics.{m}")
        except ModuleNotFoundError as e:
            if e.name != f"tracing.statistics.{m}":
                raise


def all_stats() -> dict[str, StatInfo]:
    _load_all()
    return dict(_REGISTRY)


def runnable(a: Source, b: Source) -> list[str]:
    """The statistics that run on this pair (their `fits` hold), in registry order."""
    return [name for name, info in all_stats().items() if info.misfit(a, b) is None]


def get_stat(name: str) -> StatInfo:
    _load_all()
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        valid = sorted([*_REGISTRY, *_ALIASES])
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise TracingError(f"unknown statistic '{name}'{hint}; valid: {', '.join(valid)}")
    return _REGISTRY[name]
