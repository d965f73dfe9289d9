"""No false "related" on damaged models (issue 11): the null holds when one side is pruned, sparsified,
quantized or has dead neurons, and derived models with the same damage are still detected.

Over 40 independent pairs of random-init tiny Llamas per damage, for csu, csu --align, match and csh (with
the default --matching): the count of p < 0.05 lies in the central 99% range of Binomial(40, 0.05) and no
p-value is below 1e-4. Counts go to the pytest summary. benchmarks/calibration.py runs >= 100 pairs.
"""

import copy
import math

import pytest
import scipy.stats
import torch

from tracing import zoo
from tracing.align import align_weights
from tracing.arch import get_spec
from tracing.perm import apply_perm, random_perm
from tracing.statistics import StatContext, get_stat

N_PAIRS = 40
DAMAGES = [("none", 0.0), ("pruned", 0.25), ("pruned", 0.5), ("sparse", 0.5), ("int8", 0.0), ("int4", 0.0),
           ("dead", 0.2)]
STATS = ("csu", "csu --align", "match", "csh")
SHAPE = dict(vocab_size=256, hidden=48, layers=2, intermediate=96, heads=4, kv_heads=2)


def damaged(model, kind: str, frac: float):
    return model if kind == "none" else zoo.damage(copy.deepcopy(model), kind, frac)


def log10p(stat: str, base, ft, blocks) -> float:
    """One statistic on a pair, as main.py runs it (--align: ft aligned to base first, on a copy)."""
    spec = get_spec(base.config)
    if stat.endswith("--align"):
        ft = copy.deepcopy(ft)
        apply_perm(ft, spec, align_weights(base, ft, spec, progress=False))
    ctx = StatContext(base=base, ft=ft, spec_base=spec, spec_ft=spec, blocks=blocks, batch_size=4, progress=False)
    return get_stat(stat.split()[0]).fn(ctx).log10_pvalue


@pytest.fixture(scope="module")
def blocks() -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(0))  # (4, 32)


@pytest.fixture(scope="module")
def null_log10p(blocks) -> dict:
    """(damage, frac, stat) -> log10 p over N_PAIRS independent pairs, ft damaged."""
    out: dict = {}
    for k in range(N_PAIRS):
        base = zoo.tiny_model("llama", seed=5000 + 2 * k, **SHAPE)
        other = zoo.tiny_model("llama", seed=5001 + 2 * k, **SHAPE)
        for kind, frac in DAMAGES:
            ft = damaged(other, kind, frac)
            for stat in STATS:
                out.setdefault((kind, frac, stat), []).append(log10p(stat, base, ft, blocks))
    return out


@pytest.mark.parametrize("kind,frac", DAMAGES)
def test_independent_damaged_models_are_not_called_related(null_log10p, kind, frac, summary_lines):
    hi = int(scipy.stats.binom.ppf(0.995, N_PAIRS, 0.05))  # central 99% range of the count: 0..hi
    for stat in STATS:
        lps = null_log10p[kind, frac, stat]
        assert not any(math.isnan(v) for v in lps), (stat, "a damaged layer left too few units")
        hits, hits01 = sum(v < math.log10(0.05) for v in lps), sum(v < -2 for v in lps)
        summary_lines.append(f"null, ft {kind}{f' {frac:.0%}' if frac else ''}, {stat}: {hits}/{N_PAIRS} p < 0.05 "
                             f"(Binomial(40, 0.05) 99% range 0-{hi}), {hits01}/{N_PAIRS} p < 0.01, "
                             f"smallest log10 p {min(lps):.2f}")
        assert hits <= hi, (stat, lps)
        assert min(lps) > -4, (stat, min(lps))  # no p below 1e-4


@pytest.mark.parametrize("kind,frac", [d for d in DAMAGES if d[0] != "none"])
def test_derived_models_with_the_same_damage_are_still_detected(tokenizer, text_ids, kind, frac):
    base = zoo.tiny_model("llama", seed=0, vocab_size=len(tokenizer))
    derived = damaged(zoo.finetune(copy.deepcopy(base), text_ids, steps=3, block_size=32), kind, frac)
    blocks = text_ids[:4 * 32].reshape(4, 32)
    permuted = copy.deepcopy(derived)
    spec = get_spec(permuted.config)
    apply_perm(permuted, spec, random_perm(spec, permuted.state_dict(), seed=3))
    for stat, ft in (("csu", derived), ("match", derived), ("csh", derived), ("csu --align", permuted),
                     ("match", permuted)):
        assert log10p(stat, base, ft, blocks) < -6, (kind, stat)
