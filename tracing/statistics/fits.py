"""Which pairs a statistic fits: checks on headers and configs, asked before anything is loaded or computed.

    info.misfit(a, b)                 # why `info` cannot run on sources a, b (None: it can), from @register(fits=...)
    check_fits(info, a, b, align)     # ... as a TracingError that names what does run on the pair
    require_fit(ctx, "csu")           # the same at the top of a statistic (when it is called directly)

Each check returns a reason or None; a refusal always ends in `advice`: the statistics whose checks hold, so
following a suggestion never leads to another refusal.
"""

from __future__ import annotations

from tracing.arch import mlp
from tracing.errors import TracingError
from tracing.sources.base import Source
from tracing.statistics import StatContext, StatInfo, get_stat, runnable


def vocab_keys(spec) -> tuple[str, ...]:
    """Keys whose first axis is the vocabulary (token embedding, LM head)."""
    return tuple(k for k in (spec.embed, spec.lm_head) if k)


def shape_differences(a: Source, b: Source, vocab_ok: bool = True) -> list[str]:
    """How the two sources' keys and shapes differ (the vocabulary axis may differ if vocab_ok)."""
    spec_a, spec_b = a.spec, b.spec
    sd_a, sd_b = a.shapes(), b.shapes()
    diffs: list[str] = []
    if spec_a.model_type != spec_b.model_type and spec_a.family != spec_b.family:
        diffs.append(f"{spec_a.model_type} vs {spec_b.model_type}")
    if spec_a.n_layers != spec_b.n_layers:
        diffs.append(f"{spec_a.n_layers} vs {spec_b.n_layers} layers")
    # a weight of both architectures that one checkpoint lacks was let through by --allow_keys: not a difference
    only_a = sorted(k for k in set(sd_a) - set(sd_b) if k not in spec_b.axes)
    only_b = sorted(k for k in set(sd_b) - set(sd_a) if k not in spec_a.axes)
    if only_a:
        diffs.append(f"{len(only_a)} weights only in base, e.g. {only_a[0]}")
    if only_b:
        diffs.append(f"{len(only_b)} weights only in fine-tuned, e.g. {only_b[0]}")
    skip_vocab = set(vocab_keys(spec_a)) if vocab_ok else set()
    for key in sorted(set(sd_a) & set(sd_b)):
        sa, sb = tuple(sd_a[key]), tuple(sd_b[key])
        if sa == sb or (key in skip_vocab and sa[1:] == sb[1:]):
            continue
        diffs.append(f"{key} {sa} vs {sb}")
    return diffs


def _shown(diffs: list[str]) -> str:
    return "; ".join(diffs[:2]) + (f"; and {len(diffs) - 2} more" if len(diffs) > 2 else "")


def weights_differ(a: Source, b: Source) -> str | None:
    """Fit check: corresponding weights of the same shapes (vocabularies may differ: shared rows compared)."""
    diffs = shape_differences(a, b)
    return f"their shapes differ ({_shown(diffs)})" if diffs else None


def weights_or_vocab_differ(a: Source, b: Source) -> str | None:
    """Fit check: the same shapes, vocabulary included (a statistic that mixes or compares whole output layers)."""
    diffs = shape_differences(a, b, vocab_ok=False)
    return f"their shapes differ ({_shown(diffs)})" if diffs else None


def mlp_units(src: Source, layer: int = 0) -> int:
    """MLP neurons of one layer, from the up projection's shape."""
    key = src.spec.layers[layer].up
    return src.shape(key)[src.spec.axis(key, mlp(layer))]


def hidden_size(src: Source) -> int:
    return src.shape(src.spec.embed)[1]  # (vocab, hidden)


def mlps_differ(a: Source, b: Source) -> str | None:
    """Fit check: the same depth and MLP width (activation statistics that compare layer i with layer i)."""
    shape_a, shape_b = (a.spec.n_layers, mlp_units(a)), (b.spec.n_layers, mlp_units(b))
    if shape_a != shape_b:
        return (f"it compares layer i with layer i, and the models have {shape_a[0]} layers x {shape_a[1]} MLP "
                f"neurons vs {shape_b[0]} x {shape_b[1]}")
    return None


def hidden_differs(a: Source, b: Source) -> str | None:
    """Fit check: the same hidden size."""
    ha, hb = hidden_size(a), hidden_size(b)
    return f"their hidden sizes differ ({ha} vs {hb})" if ha != hb else None


def ungated(a: Source, b: Source) -> str | None:
    """Fit check: both MLPs gated (gate and up projections: match compares their matchings)."""
    plain = [s.spec.model_type for s in (a, b) if not s.spec.gated]
    return f"it needs gated MLPs (gate_proj and up_proj), which {plain[0]} does not have" if plain else None


def vocab_disagrees(a: Source, b: Source) -> str | None:
    """jsd's fit check: both tokenizers give the same token string for every shared id they both define (without
    a tokenizer, ids are taken to agree)."""
    tok_a, tok_b = a.tokenizer, b.tokenizer
    if tok_a is None or tok_b is None or tok_a is tok_b:
        return None
    n_shared = min(a.shape(a.spec.embed)[0], b.shape(b.spec.embed)[0])
    inv_a = {i: t for t, i in tok_a.get_vocab().items() if i < n_shared}
    inv_b = {i: t for t, i in tok_b.get_vocab().items() if i < n_shared}
    common = sorted(set(inv_a) & set(inv_b))
    bad = [i for i in common if inv_a[i] != inv_b[i]]
    if bad:
        i = bad[0]
        return (f"the tokenizers disagree on {len(bad)} of {len(common)} shared token ids (e.g. id {i}: "
                f"{inv_a[i]!r} vs {inv_b[i]!r}), so the next-token distributions are not comparable")
    return None


def advice(a: Source, b: Source) -> str:
    """What to run instead, for an error about this pair: only statistics whose checks hold on it."""
    ok = runnable(a, b)
    if ok:
        return f"statistics that run on this pair: {', '.join(ok)}"
    return "no statistic of this tool compares these two models"


def check_fits(info: StatInfo, a: Source, b: Source, align: bool = False) -> None:
    """A TracingError naming why `info` (with --align: alignment too) cannot run on this pair, and what can."""
    why = info.misfit(a, b)
    if why is None and align and (why := weights_differ(a, b)):
        why = f"--align pairs every hidden unit and MLP neuron one to one, and {why}"
    if why:
        raise TracingError(f"{info.name}{' --align' if align else ''} cannot run on this pair: {why}; "
                           f"{advice(a, b)}")


def require_fit(ctx: StatContext, stat: str) -> None:
    """What a statistic checks first when called directly (the pipeline checks before loading anything)."""
    check_fits(get_stat(stat), ctx.source_base, ctx.source_ft)


def check_same_shapes(a: Source, b: Source, stat_name: str = "this statistic", vocab_ok: bool = True) -> None:
    """Raise TracingError unless both sources have the same keys and shapes (vocab size may differ if vocab_ok)."""
    diffs = shape_differences(a, b, vocab_ok)
    if diffs:
        raise TracingError(f"base and fine-tuned shapes differ ({_shown(diffs)}): {stat_name} compares "
                           f"corresponding weights; {advice(a, b)}")
