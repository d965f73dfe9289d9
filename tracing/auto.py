"""`--stat auto`: the tests that fit the pair, in a sensible order, one valid combined p-value, the derivation named.

    outcome = run_auto(cfg, pair, context, blocks)   # context(pair, blocks) -> StatContext; blocks() -> token blocks
    outcome.log10_pvalue, outcome.tests, outcome.derivation

The plan is fixed from the pair's shapes before any test runs (`plan`): same shapes -> csu (weights in place),
csu after --align (permuted hidden units), match (activations: rotated or otherwise re-based residual stream;
gated MLPs); other depths or widths -> csu_all (weights, layer map; same hidden size), match_all (activations,
layer map; gated). Tests run in that order and stop once the combined p is decisive (log10 p <= STOP_LOG10P):
activations are read only when the weights have not settled it.

Validity: with K the number of planned tests (known before any runs) the combined p is min(1, K * min p) over the
tests that ran (Bonferroni). Under H0 every test's p is valid, so P(K * min over all K tests <= a) <= a; stopping
early only leaves out tests whose p could have been smaller, so the reported value is never below the full
Bonferroni value: still valid, never a cherry-picked minimum.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tracing.config import RunConfig
from tracing.describe import describe
from tracing.errors import TracingError
from tracing.statistics import StatContext, StatResult, get_stat
from tracing.statistics.fits import advice, hidden_size, mlp_units, vocab_disagrees

STOP_LOG10P = -6.0  # the combined p that settles a pair: no further test runs
ALPHA = 0.01  # verdict threshold: related when the combined p is at most this
LAYER_ALPHA = 0.05  # a layer is called "from base" when its p, Bonferroni over the layers, is below this


@dataclass(frozen=True)
class Step:
    """One planned test: a statistic, on the pair as opened or after --align."""

    name: str  # as shown: "csu", "csu --align", "match", ...
    stat: str
    align: bool = False

    @property
    def needs_data(self) -> bool:
        return get_stat(self.stat).needs_data


def plan(a, b) -> list[Step]:
    """The tests for this pair of sources, from shapes and configs only (statistics/fits.py)."""
    fits = {name: get_stat(name).misfit(a, b) is None for name in ("csu", "match", "csu_all", "match_all")}
    if fits["csu"]:
        steps = [Step("csu", "csu"), Step("csu --align", "csu", align=True)]
        return steps + ([Step("match", "match")] if fits["match"] else [])
    steps = [Step(n, n) for n in ("csu_all", "match_all") if fits[n]]
    if not steps:
        raise TracingError(f"auto: none of its tests (csu, csu_all, match, match_all) fits this pair: "
                           f"{get_stat('csu_all').misfit(a, b)}; {advice(a, b)}")
    return steps


def combined_log10p(log10ps: list[float], k: int) -> float:
    """Bonferroni over the k planned tests: log10 min(1, k * min p) (NaN p-values count as p = 1)."""
    finite = [p for p in log10ps if p is not None and not math.isnan(p)]
    return min(0.0, math.log10(k) + min(finite)) if finite else 0.0


@dataclass
class AutoOutcome:
    log10_pvalue: float
    related: bool
    tests: list[dict]  # {"test", "stat", "log10_pvalue", "seconds"} in the order they ran
    plan: list[str]
    decided_by: str | None
    derivation: str
    evidence: dict = field(default_factory=dict)
    results: dict[str, StatResult] = field(default_factory=dict)  # each test's own result


def run_auto(cfg: RunConfig, pair, context: Callable, blocks: Callable[[], torch.Tensor]) -> AutoOutcome:
    """Run the plan on an opened pair (tracing/pair.py). `context(pair, blocks or None)` builds a StatContext;
    `blocks()` loads the token blocks, called only if an activation test runs."""
    steps = plan(pair.source_base, pair.source_ft)
    tests, results = [], {}
    aligned = None
    for step in steps:
        t0 = time.perf_counter()
        on = pair
        if step.align:
            aligned = aligned or pair.align(cfg.matching, cfg.seed, progress=not cfg.no_progress)
            on = aligned
        data = None
        if step.needs_data:
            data = blocks()
            on.load()
        res = get_stat(step.stat).fn(context(on, data))
        results[step.name] = res
        tests.append({"test": step.name, "stat": step.stat, "log10_pvalue": res.log10_pvalue,
                      "seconds": time.perf_counter() - t0})
        if combined_log10p([t["log10_pvalue"] for t in tests], len(steps)) <= STOP_LOG10P:
            break
    combined = combined_log10p([t["log10_pvalue"] for t in tests], len(steps))
    related = combined <= math.log10(ALPHA)
    decided = min(tests, key=lambda t: t["log10_pvalue"] if t["log10_pvalue"] is not None
                  and not math.isnan(t["log10_pvalue"]) else math.inf)["test"] if related else None
    ev = evidence(pair if decided != "csu --align" else aligned, results, decided)
    ev.update(related=related, decided_by=decided, log10_pvalue=combined, tests=tests)
    return AutoOutcome(combined, related, tests, [s.name for s in steps], decided, describe(ev), ev, results)


# ---------------------------------------------------------------------------------------------- evidence
def _layer_map(res: StatResult) -> list[int | None] | None:
    """Layer j of B -> the layer of A it comes from: a localized test's map, or for a same-depth test the layers
    whose own p (Bonferroni over the layers) is below LAYER_ALPHA."""
    if "mapping" in res.extras:
        return list(res.extras["mapping"])
    layers = [r for r in res.per_layer if isinstance(r, dict) and "layer" in r]
    if not layers:
        return None
    cut = math.log10(LAYER_ALPHA / len(layers))
    return [r["layer"] if r.get("log10_pvalue") is not None and r["log10_pvalue"] <= cut else None for r in layers]


def _weight_change(res: StatResult) -> float | None:
    changes = [r["rel_change"] for r in res.per_layer if isinstance(r, dict) and r.get("rel_change") is not None]
    return sum(changes) / len(changes) if changes else None


def quant_bits(w: torch.Tensor) -> int | None:
    """4 or 8 when every block of 32 values of `w` (n, d) takes at most 2^bits - 1 levels of one step (an absmax
    round trip per row or per block of 32: int8/int4, GGUF Q8_0/Q4_0), else None."""
    w = w.detach().float().reshape(-1)
    if w.numel() < 32 * 16:
        return None
    blocks = w[: w.numel() // 32 * 32].reshape(-1, 32)  # (n_blocks, 32)
    for bits in (4, 8):
        levels = 2 ** (bits - 1)  # symmetric: -levels .. levels - 1 (or -(levels-1) .. levels-1)
        for scale in (blocks.abs().amax(1, keepdim=True) / (levels - 1), blocks.abs().amax(1, keepdim=True) / levels):
            q = blocks / scale.clamp_min(1e-30)
            if float(((q - q.round()).abs() < 1e-3).float().mean()) > 0.999:
                return bits
    return None


def evidence(pair, results: dict[str, StatResult], decided: str | None) -> dict:
    """What the tests already computed, plus shapes, vocabularies and a look at B's values (tracing.describe)."""
    a, b = pair.source_base, pair.source_ft
    ev: dict = {"layers": (a.spec.n_layers, b.spec.n_layers), "mlp_width": (mlp_units(a), mlp_units(b)),
                "hidden": (hidden_size(a), hidden_size(b))}
    vocab = {"base": a.shape(a.spec.embed)[0], "ft": b.shape(b.spec.embed)[0],
             "same_strings": vocab_disagrees(a, b) is None}
    ev["vocab"] = vocab
    if decided is not None:
        res = results[decided]
        ev["layer_map"] = _layer_map(res)
        ev["weight_change"] = _weight_change(res)
        if ev["hidden"][0] == ev["hidden"][1]:
            vocab["embedding_cosine"] = get_stat("emb").fn(StatContext(source_base=a, source_ft=b,
                                                                       progress=False)).value
        key = b.spec.layers[0].up
        ev["quant_bits"] = quant_bits(b.get(key))
    ckpt = pair.checkpoints[1]
    if getattr(ckpt, "kind", None) == "adapter":
        ev["adapter_rank"] = getattr(ckpt, "adapter_rank", None)
    return ev
