"""Shape checks between base and fine-tuned models, shared by every statistic that compares corresponding weights.

    check_same_shapes(spec_base, base.state_dict(), spec_ft, ft.state_dict(), "csu")

Derived models often add tokens to the vocabulary, so by default the vocabulary axis of the embedding and
the LM head may differ (weight statistics compare the shared rows); statistics that compare whole output
distributions or interpolate the models (mode, jsd) need identical shapes everywhere.
"""

from __future__ import annotations

import torch

from tracing.arch import ArchSpec
from tracing.errors import TracingError

_NEEDS_SAME_VOCAB = ("mode", "mc", "jsd")


def vocab_keys(spec: ArchSpec) -> tuple[str, ...]:
    """Keys whose first axis is the vocabulary (token embedding, LM head)."""
    return tuple(k for k in (spec.embed, spec.lm_head) if k)


def check_same_shapes(spec_a: ArchSpec, sd_a: dict[str, torch.Tensor], spec_b: ArchSpec,
                      sd_b: dict[str, torch.Tensor], stat_name: str = "this statistic",
                      vocab_ok: bool | None = None) -> None:
    """Raise TracingError unless both models have the same keys and shapes (vocab size may differ if vocab_ok).

    `vocab_ok=None` allows a different vocabulary size except for statistics that need identical outputs.
    """
    if vocab_ok is None:
        vocab_ok = stat_name not in _NEEDS_SAME_VOCAB
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
