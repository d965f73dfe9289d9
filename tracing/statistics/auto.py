"""`--stat auto` (the default): the tests that fit the pair, in a sensible order, one valid combined p-value, and
the derivation named in one line.

    python main.py --base_model_id A --ft_model_id B            # auto
    res = get_stat("auto").fn(ctx)    # ctx.pair: the opened pair (tracing/pair.py); ctx.blocks: token blocks
    res.log10_pvalue, res.extras["tests"], res.extras["derivation"]

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

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from tracing.align import residual_selection
from tracing.arch import RESID
from tracing.describe import describe
from tracing.errors import TracingError
from tracing.perm import selected
from tracing.sources.base import Source
from tracing.statistics import StatContext, StatResult, get_stat, register
from tracing.statistics.fits import advice, hidden_size, mlp_units, vocab_disagrees

STOP_LOG10P = -6.0  # the combined p that settles a pair: no further test runs
ALPHA = 0.01  # verdict threshold: related when the combined p is at most this
LAYER_ALPHA = 0.05  # a layer is called "from base" when its p, Bonferroni over the layers, is below this


@dataclass(frozen=True)
class Step:
    """One planned test: a statistic, on the pair as opened or after --align."""

    name: str  # as shown: "csu", "csu --align", "match", ...
    stat: str
    align: bool = False  # ft's hidden units lined up with base's first (OpenedPair.align)
    narrow: bool = False  # base cut down to the residual channels ft kept (a narrower ft: hidden-size pruning)

    @property
    def needs_data(self) -> bool:
        return get_stat(self.stat).needs_data


def _plan(a: Source, b: Source) -> list[Step]:
    fits = {name: get_stat(name).misfit(a, b) is None for name in ("csu", "match", "csu_all", "match_all")}
    if fits["csu"]:
        steps = [Step("csu", "csu"), Step("csu --align", "csu", align=True)]
        if fits["match"]:
            return [*steps, Step("match", "match")]
        csh = get_stat("csh").misfit(a, b) is None and a.spec.is_moe  # MoE: csh sees experts, match cannot
        return [*steps, Step("csh", "csh")] if csh else steps
    steps = [Step(n, n) for n in ("csu_all", "match_all") if fits[n]]
    narrower = hidden_size(b) < hidden_size(a) and a.spec.family == b.spec.family
    if narrower and vocab_disagrees(a, b) is None:  # weights compare once base keeps only ft's channels
        steps.insert(0, Step("csu_all --narrow", "csu_all", narrow=True))
    return steps


def no_test_fits(a: Source, b: Source) -> str | None:
    """auto's fit check: at least one of its tests runs on the pair."""
    if _plan(a, b):
        return None
    return f"none of its tests (csu, csu_all, match, match_all) fits: {get_stat('csu_all').misfit(a, b)}"


def plan(a: Source, b: Source) -> list[Step]:
    """The tests for this pair of sources, from shapes and configs only (statistics/fits.py)."""
    steps = _plan(a, b)
    if not steps:
        raise TracingError(f"auto cannot run on this pair: {no_test_fits(a, b)}; {advice(a, b)}")
    return steps


def combined_log10p(log10ps: list[float], k: int) -> float:
    """Bonferroni over the k planned tests: log10 min(1, k * min p) (NaN p-values count as p = 1)."""
    finite = [p for p in log10ps if p is not None and not math.isnan(p)]
    return min(0.0, math.log10(k) + min(finite)) if finite else 0.0


@register("auto", composite=True, scalar=False, fits=(no_test_fits,),
          help="the tests that fit the pair (csu, csu --align, match; csu_all, match_all when shapes differ), "
               "weights first, stopping once one settles it; Bonferroni over the planned tests; the derivation "
               "named")
def auto(ctx: StatContext) -> StatResult:
    if ctx.pair is None:
        raise TracingError("auto runs on an opened pair (tracing.pair.OpenedPair): build the context with "
                           "StatContext.for_pair")
    pair = ctx.pair
    steps = plan(pair.source_base, pair.source_ft)
    tests, results, aligned, blocks = [], {}, None, ctx.blocks
    for step in steps:
        t0 = time.perf_counter()
        on = pair
        if step.align:
            aligned = aligned or pair.align(ctx.matching, ctx.seed, progress=ctx.progress, device=ctx.compute_device)
            on = aligned
        if step.needs_data:
            if blocks is None:
                blocks = ctx.load_blocks()  # made only now: a pair the weights settle needs no data
            on.load()  # once for the run: later statistics read the loaded models
        step_ctx = dataclasses.replace(ctx.on(on), blocks=blocks)
        if step.narrow:
            step_ctx = narrowed(step_ctx)
        res = get_stat(step.stat).fn(step_ctx)
        results[step.name] = res
        tests.append({"test": step.name, "stat": step.stat, "log10_pvalue": res.log10_pvalue,
                      "seconds": time.perf_counter() - t0})
        if combined_log10p([t["log10_pvalue"] for t in tests], len(steps)) <= STOP_LOG10P:
            break
    combined = combined_log10p([t["log10_pvalue"] for t in tests], len(steps))
    related = combined <= math.log10(ALPHA)
    decided = min(tests, key=lambda t: _p(t["log10_pvalue"]))["test"] if related else None
    ev = evidence(aligned if decided == "csu --align" else pair, results, decided)
    ev.update(related=related, decided_by=decided, log10_pvalue=combined, tests=tests)
    deciding = results.get(decided) if decided else None
    extras = {"plan": [s.name for s in steps], "tests": tests, "decided_by": decided, "correction": "bonferroni",
              "derivation": describe(ev), "evidence": {k: v for k, v in ev.items() if k != "tests"},
              "related": related}
    if blocks is not None:  # an activation test ran: the tokens it read
        extras["n_tokens"] = int(blocks.numel())
    return StatResult(value=combined, log10_pvalue=combined,
                      per_layer=deciding.per_layer if deciding is not None else [], extras=extras)


def narrowed(ctx: StatContext) -> StatContext:
    """The context with base cut down to the residual channels ft kept, each matched on the embedding columns
    (align.residual_selection: embeddings only, never the MLP weights csu_all then tests)."""
    sel = residual_selection(ctx.source_base, ctx.source_ft, ctx.spec_base, ctx.matching, ctx.seed,
                             ctx.compute_device)
    view = selected(ctx.source_base, {RESID: sel})
    return dataclasses.replace(ctx, source_base=view, spec_base=view.spec, base=None)


def _p(log10p: float | None) -> float:
    return math.inf if log10p is None or math.isnan(log10p) else log10p


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


def _weight_change(res: StatResult, mapping: list[int | None] | None) -> float | None:
    """Mean relative change of the matched MLP rows over the layers that come from base (others are not A's)."""
    changes = [r["rel_change"] for j, r in enumerate(res.per_layer) if isinstance(r, dict)
               and r.get("rel_change") is not None and (mapping is None or mapping[j] is not None)]
    return sum(changes) / len(changes) if changes else None


def quant_bits(w: torch.Tensor) -> int | None:
    """4 or 8 when `w` (n, d) is an absmax round trip: every row, or every block of 32 values, a whole multiple of
    one step, its largest |value| / (2^(bits-1) - 1) or / 2^(bits-1) (int8/int4 per row or group, GGUF Q8_0 /
    Q4_0), else None."""
    w = w.detach().float()
    if w.numel() < 32 * 16 or w.shape[-1] % 32:
        return None
    for bits in (4, 8):
        levels = 2 ** (bits - 1)
        for groups in (w.reshape(w.shape[0], -1), w.reshape(-1, 32)):  # per row, per block of 32
            top = groups.abs().amax(1, keepdim=True).clamp_min(1e-30)
            for step in (top / (levels - 1), top / levels):
                q = groups / step
                if float(((q - q.round()).abs() < 1e-2).float().mean()) > 0.999:
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
        if "verdict" in res.extras:  # csu_all on a mixture of experts: the per-group line and the expert map
            ev["moe"] = {"base": a.spec.is_moe, "ft": b.spec.is_moe, "verdict": res.extras["verdict"]}
        ev["layer_map"] = _layer_map(res)
        ev["weight_change"] = _weight_change(res, ev["layer_map"] if "mapping" not in res.extras else None)
        if ev["hidden"][0] == ev["hidden"][1] and decided in ("csu", "csu --align", "csu_all"):  # units line up
            vocab["embedding_cosine"] = get_stat("emb").fn(StatContext(source_base=a, source_ft=b,
                                                                       progress=False)).value
        roles = b.spec.layers[0]  # its dense MLP's up rows; an MoE block without one: one expert's
        key, rows = (roles.up, None) if roles.up else (roles.moe.key_of("up"), slice(0, 1))
        ev["quant_bits"] = quant_bits(b.get(key, rows))
    ckpt = pair.checkpoints[1]
    if ckpt.adapter is not None:
        ev["adapter_rank"] = ckpt.adapter.get("r")
    return ev
