"""PERMTEST: the exact permutation test around any scalar statistic (Zhu et al. 2025, --num_perm T).

Under H0 (independent initialisations) and permutation-equivariant training, permuting the hidden units of
the fine-tuned model gives an exchangeable copy, so p = (1 + #{t : phi(A, pi_t B) at least as extreme as
phi(A, B)}) / (T + 1) is exact for any statistic phi. For a weight statistic each permuted ft is a view over
ft's source (`permuted`: tensors permuted as they are read, nothing materialized); for a data statistic the
loaded ft is permuted in place and restored exactly.
"""

from __future__ import annotations

import dataclasses

from tqdm.auto import tqdm

from tracing.errors import TracingError
from tracing.perm import apply_perm, invert, permuted, random_perm
from tracing.statistics import StatContext, StatInfo, StatResult
from tracing.statistics.pvalues import permtest_log10p


def perm_seed(seed: int, t: int) -> int:
    """Deterministic seed of the t-th permutation (never Python's randomised hash())."""
    return (seed * 1000003 + t) % (2 ** 63)


def permtest(info: StatInfo, ctx: StatContext, num_perm: int, seed: int = 0, progress: bool = True) -> StatResult:
    """Observed statistic on (base, ft) plus its PERMTEST log10 p over `num_perm` random permutations of ft."""
    if not info.scalar:
        raise TracingError(f"--num_perm needs a scalar statistic and '{info.name}' is not one: "
                           "drop --num_perm or pick e.g. l2, cos, emb, csu, mode")
    if num_perm < 1:
        raise TracingError(f"--num_perm must be a positive number of permutations, got {num_perm}")
    observed = info.fn(ctx)
    inner = dataclasses.replace(ctx, progress=False)
    null: list[float] = []
    shapes = ctx.source_ft.shapes()
    for t in tqdm(range(num_perm), desc=f"PERMTEST {info.name}", disable=not progress):
        perm = random_perm(ctx.spec_ft, shapes, seed=perm_seed(seed, t))
        if not info.needs_data:
            null.append(float(info.fn(dataclasses.replace(inner, source_ft=permuted(ctx.source_ft, perm))).value))
            continue
        apply_perm(ctx.ft, ctx.spec_ft, perm)
        try:
            null.append(float(info.fn(inner).value))
        finally:
            apply_perm(ctx.ft, ctx.spec_ft, invert(perm))  # gathers only: restores ft bit for bit
    log10p = permtest_log10p(float(observed.value), null, info.higher_is_related)
    return StatResult(value=float(observed.value), log10_pvalue=log10p, per_layer=observed.per_layer,
                      extras={**observed.extras, "num_perm": num_perm, "null": null,
                              "inner_log10_pvalue": observed.log10_pvalue})
