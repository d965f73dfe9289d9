"""One line saying how B relates to A, from the evidence the tests already computed (no extra reads).

    describe({"related": True, "tests": [...], "layer_map": [0, 1, 1, 2], "layers": (3, 4), ...})
    # 'related: depth up-scaled, 3 -> 4 layers (base layers 0-1, 1-2)'

The evidence is plain data (what `tracing.auto` gathers; keys are optional unless said):
    related         bool: the combined test's verdict (required)
    decided_by      the test whose p-value decided ("csu", "csu --align", "match", "csu_all", ...; the catalogue's
                    "fingerprint csu", "fingerprint match")
    log10_pvalue    the combined log10 p
    layers          (L_A, L_B) depths
    layer_map       for each layer of B, the layer of A it comes from, or None (localized tests)
    mlp_width       (A, B) MLP widths;  hidden (A, B) hidden sizes
    vocab           {"base": n, "ft": n, "shared": k, "same_strings": bool, "embedding_cosine": float | None}
    weight_change   relative change ‖B - A‖ / ‖A‖ of the MLP rows the identity test matched (units in place)
    quant_bits      B's weights take at most 2^bits values per block (a quantization round trip), or None
    adapter_rank    B is a LoRA adapter of this rank over its base, or None
    moe             {"base": bool, "ft": bool, "verdict": str}: which side is a mixture of experts, and csu_all's
                    per-group line (attention, dense MLPs, routed experts mapped to dense layers)
"""

from __future__ import annotations

from typing import Any

SAME_WEIGHTS = 1e-6  # relative change below which B's weights are A's (up to float rounding)
NEW_EMBEDDINGS = 0.3  # shared tokens' embedding cosine below which B's embeddings were re-initialised


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 8, 9] -> '0-2, 8-9'."""
    out, start = [], None
    for k, x in enumerate(xs):
        if start is None:
            start = x
        if k + 1 == len(xs) or xs[k + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


def _runs(mapping: list[int | None]) -> list[list[int]]:
    """Maximal runs of consecutive base layers in a layer map (None breaks a run)."""
    runs: list[list[int]] = []
    for m in mapping:
        if m is not None and runs and runs[-1][-1] + 1 == m:
            runs[-1].append(m)
        elif m is not None:
            runs.append([m])
    return runs


def _layers(ev: dict[str, Any]) -> str | None:
    """What the layer map says: up-scaled, pruned, reordered, partly from A."""
    mapping, (la, lb) = ev.get("layer_map"), ev.get("layers", (None, None))
    if not mapping or la is None:
        return None
    mapped = [m for m in mapping if m is not None]
    if not mapped:
        return None
    unmapped = [j for j, m in enumerate(mapping) if m is None]
    runs = _runs(mapping)
    spans = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)
    if unmapped and len(unmapped) * 4 >= lb:  # a good part of B does not come from A
        return (f"layers {_ranges([j for j, m in enumerate(mapping) if m is not None])} of B from base layers "
                f"{spans}; layers {_ranges(unmapped)} not from base (merged with another model?)")
    if len(set(mapped)) < len(mapped):
        return f"depth up-scaled, {la} -> {lb} layers (base layers {spans})"
    if mapped != sorted(mapped):
        return f"layers reordered (base layers {spans})"
    if lb < la:
        dropped = sorted(set(range(la)) - set(mapped))
        return f"{lb} of {la} layers kept (dropped {_ranges(dropped)})"
    if mapped != list(range(la)) and lb == la:
        return f"layers from base layers {spans}"
    return None


def _widths(ev: dict[str, Any]) -> list[str]:
    out = []
    for what, key in (("MLP", "mlp_width"), ("hidden size", "hidden")):
        a, b = ev.get(key) or (None, None)
        if a is not None and b is not None and a != b:
            out.append(f"{what} {a} -> {b}" + (" (pruned)" if b < a else " (widened)"))
    return out


def _vocab(ev: dict[str, Any]) -> str | None:
    v = ev.get("vocab")
    if not v:
        return None
    cos = v.get("embedding_cosine")
    if not v.get("same_strings", True) or (cos is not None and cos < NEW_EMBEDDINGS):
        return "tokenizer replaced (embeddings re-initialised)"
    if v["ft"] > v["base"]:
        return f"vocabulary extended by {v['ft'] - v['base']} tokens"
    if v["ft"] < v["base"]:
        return f"vocabulary cut by {v['base'] - v['ft']} tokens"
    return None


def _units(ev: dict[str, Any]) -> str | None:
    by = ev.get("decided_by") or ""
    if "--align" in by:
        return "hidden units permuted"
    a, b = ev.get("hidden") or (None, None)
    if by in ("match", "match_all") and a == b:  # (a pruned hidden size needs activations anyway)
        return "residual stream re-based (rotated or permuted: weights do not line up, activations do)"
    if by == "fingerprint match" and a == b:  # tracing.catalog: the anchored sketches line up, the basis does not
        return "hidden units re-based (permuted or rotated: weights do not line up, their anchored sketches do)"
    return None


def _change(ev: dict[str, Any]) -> str | None:
    if ev.get("adapter_rank"):
        return f"LoRA adapter of rank {ev['adapter_rank']}"
    bits = ev.get("quant_bits")
    if bits:
        return f"{bits}-bit quantized"
    change = ev.get("weight_change")
    if change is None:
        return None
    if change < SAME_WEIGHTS:
        return "the same MLP weights"
    return f"fine-tuned (MLP weights changed {100 * change:.1f}%)"


def describe(ev: dict[str, Any]) -> str:
    """The derivation line: 'related: ...' or 'unrelated: ...' (module docstring)."""
    if not ev.get("related"):
        tests = ev.get("tests") or []
        return (f"unrelated: no test found base in it ({len(tests)} test(s), combined log10 p "
                f"{ev.get('log10_pvalue', 0.0):.1f})")
    moe = ev.get("moe")
    if moe and moe["base"] != moe["ft"]:  # a dense model and a mixture of experts: the expert map says it
        what = "upcycled into a mixture of experts" if moe["ft"] else "a dense model made from a mixture of experts"
        return f"related: {what}: {moe['verdict']}"
    parts = [p for p in (_layers(ev), *_widths(ev), _vocab(ev), _units(ev), _change(ev)) if p]
    return "related: " + ("; ".join(parts) if parts else "derived from base")
