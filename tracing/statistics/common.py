"""Helpers every statistic may use, so that no statistic imports another.

    check_same_shapes(spec_base, base.state_dict(), spec_ft, ft.state_dict(), "csu")
    layers = selected_layers(ctx)                        # --layers, validated against the base model
    for key, w_base, w_ft in paired_weights(ctx): ...    # every corresponding weight once
    rho, log10p, seconds = two_matchings_agree(sim_gate, sim_up)   # the core of match / match_all

Derived models often add tokens to the vocabulary, so by default the vocabulary axis of the embedding and
the LM head may differ (weight statistics compare the shared rows); statistics registered with
`same_vocab=True` (mode, jsd) need identical shapes there too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from tracing import matching
from tracing.arch import ArchSpec
from tracing.errors import TracingError
from tracing.statistics import StatContext
from tracing.statistics.pvalues import perm_pair_spearman

NO_GATE = ("{stat} needs a gated MLP (gate_proj and up_proj), which {model_type} does not have; "
           "use csh or csu instead")


def vocab_keys(spec: ArchSpec) -> tuple[str, ...]:
    """Keys whose first axis is the vocabulary (token embedding, LM head)."""
    return tuple(k for k in (spec.embed, spec.lm_head) if k)


def check_same_shapes(spec_a: ArchSpec, sd_a: dict[str, torch.Tensor], spec_b: ArchSpec,
                      sd_b: dict[str, torch.Tensor], stat_name: str = "this statistic",
                      vocab_ok: bool = True) -> None:
    """Raise TracingError unless both models have the same keys and shapes (vocab size may differ if vocab_ok)."""
    diffs: list[str] = []
    if spec_a.n_layers != spec_b.n_layers:
        diffs.append(f"{spec_a.n_layers} vs {spec_b.n_layers} layers")
    only_a = sorted(set(sd_a) - set(sd_b))
    only_b = sorted(set(sd_b) - set(sd_a))
    if only_a:
        diffs.append(f"{len(only_a)} weights only in base, e.g. {only_a[0]}")
    if only_b:
        diffs.append(f"{len(only_b)} weights only in fine-tuned, e.g. {only_b[0]}")
    skip_vocab = set(vocab_keys(spec_a)) if vocab_ok else set()
    for key in sorted(set(sd_a) & set(sd_b)):
        sa, sb = tuple(sd_a[key].shape), tuple(sd_b[key].shape)
        if sa == sb or (key in skip_vocab and sa[1:] == sb[1:]):
            continue
        diffs.append(f"{key} {sa} vs {sb}")
    if diffs:
        shown = "; ".join(diffs[:2]) + (f"; and {len(diffs) - 2} more" if len(diffs) > 2 else "")
        raise TracingError(f"base and fine-tuned shapes differ ({shown}): use match_all, which handles "
                           f"different depth and width (or csu_all for equal-shaped matrices); "
                           f"{stat_name} compares corresponding weights")


def check_gated(ctx: StatContext, stat: str) -> None:
    """match and match_all compare gate with up activations: both models need a gated MLP."""
    for spec in (ctx.spec_base, ctx.spec_ft):
        if not spec.gated:
            raise TracingError(NO_GATE.format(stat=stat, model_type=spec.model_type))


def selected_layers(ctx: StatContext) -> list[int]:
    """ctx.layers (validated) or every layer of the base model."""
    n = ctx.spec_base.n_layers
    if ctx.layers is None:
        return list(range(n))
    bad = [i for i in ctx.layers if not 0 <= i < n]
    if bad:
        raise TracingError(f"--layers {bad} out of range: the base model has layers 0..{n - 1}")
    return sorted(set(int(i) for i in ctx.layers))


def paired_weights(ctx: StatContext) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield (key, w_base, w_ft) for every weight once (tied LM head skipped), vocab keys cut to shared rows.

    Tensors are views of the models' own storage (no copies); w_ft is on w_base's device.
    """
    sd_a, sd_b = ctx.base.state_dict(), ctx.ft.state_dict()
    vocab = set(vocab_keys(ctx.spec_base))
    tied = ctx.spec_base.tied and ctx.spec_ft.tied
    for key, a in sd_a.items():
        if key not in sd_b or (tied and key == ctx.spec_base.lm_head):
            continue
        b = sd_b[key].to(a.device)
        if key in vocab:
            v = min(a.shape[0], b.shape[0])
            a, b = a[:v], b[:v]  # (shared_vocab, hidden)
        yield key, a, b


def two_matchings_agree(sim_gate: torch.Tensor, sim_up: torch.Tensor) -> tuple[float, float, float]:
    """φ_MATCH for one layer pair: (rho, log10 p, seconds in assignment) from the gate and up similarity
    matrices, each (width_A, width_B) with width_B <= width_A. B's units are matched into A's once per
    projection; Spearman between the two index vectors (as ranks) tests that the matchings agree."""
    if sim_gate.shape[1] > sim_gate.shape[0]:
        raise ValueError("match needs width_B <= width_A; swap the models")
    t0 = time.perf_counter()
    g, u = matching.assign(sim_gate), matching.assign(sim_up)
    dt = time.perf_counter() - t0
    rho, log10p = perm_pair_spearman(torch.as_tensor(matching.rank(g)), torch.as_tensor(matching.rank(u)))
    return float(rho), float(log10p), dt
