"""What csu_all's tests say about experts and parameter groups (helpers; no statistic of their own).

    side = moe_side(spec_base, spec_ft)           # "ft", "base" or None: whose experts the map describes
    experts = expert_map(tests, side)             # one record per routed expert: where it came from, or nowhere
    groups = group_verdicts(tests, side)          # {"attn": {...}, "expert": {...}, "router": {...}, ...}
    line = verdict_line(groups, experts)          # "attention related (...); routed experts: 2 of 8 related ..."

`tests` are csu_all's (base matrix, ft matrix, raw log10 p, Holm-adjusted log10 p, mean cosine of the matched units)
over one Holm family. An expert is related to the matrix of the other model with its smallest raw p (among equal ones,
e.g. at the floor -log10 n! where the experts of an upcycle all sit, the most similar) when that test's Holm-adjusted
p is below MAPPING_ALPHA (the layer map's rule, tracing/statistics/common.py), else it looks independently
initialised. An expert whose tests all gave no p-value (zeroed, constant: degenerate units) is reported as
degenerate, never as related. A group (attention, dense MLP, shared expert, routed experts, router) is related
when its best test is: so an MoE whose experts were re-initialised but whose attention was kept reads "attention
related, routed experts not", not "unrelated".
"""

from __future__ import annotations

import math
from collections import Counter

from tracing.arch import ArchSpec
from tracing.statistics.common import MAPPING_ALPHA
from tracing.units import Matrix

Test = tuple  # (Matrix of base, Matrix of ft, raw log10 p, Holm-adjusted log10 p, matched_cos); NaN: no p-value
GROUP_NAMES = {"attn": "attention", "mlp": "dense MLP", "shared": "shared expert", "expert": "routed experts",
               "router": "router", "norm": "other block weights"}


def moe_side(spec_base: ArchSpec, spec_ft: ArchSpec) -> str | None:
    """Which model's experts the expert map describes: ft's when it is an MoE, else base's, else None."""
    return "ft" if spec_ft.is_moe else "base" if spec_base.is_moe else None


def _mine(t: Test, side: str) -> Matrix:
    return t[1] if side == "ft" else t[0]


def _theirs(t: Test, side: str) -> Matrix:
    return t[0] if side == "ft" else t[1]


def _related(holm: float) -> bool:
    return bool(holm < math.log10(MAPPING_ALPHA))


def expert_map(tests: list[Test], side: str) -> list[dict]:
    """One record per routed expert of the `side` model: the matrix of the other model it is most related to
    (layer, unit: "mlp", "shared", "expert f") when significant after Holm, with the best test either way."""
    by_expert: dict[tuple[int, int], list[Test]] = {}
    for t in tests:
        m = _mine(t, side)
        if m.kind == "expert":
            by_expert.setdefault((m.layer, m.expert), []).append(t)
    out = []
    for (layer, e), ts in sorted(by_expert.items()):
        scored = [t for t in ts if not math.isnan(t[2])]
        if not scored:
            out.append({"layer": layer, "expert": e, "source_layer": None, "source_unit": None, "degenerate": True,
                        "log10_pvalue": None, "log10_pvalue_holm": None})
            continue
        best = min(scored, key=lambda t: (t[2], -t[4]))  # ties at the p floor: the closest matrix
        other, hit = _theirs(best, side), _related(best[3])
        out.append({"layer": layer, "expert": e, "source_layer": other.layer if hit else None,
                    "source_unit": other.unit if hit else None, "degenerate": False,
                    "best_layer": other.layer, "best_unit": other.unit, "role": best[0].role,
                    "log10_pvalue": float(best[2]), "log10_pvalue_holm": float(best[3])})
    return out


def expert_summary(experts: list[dict]) -> dict:
    """Counts of the expert map: related (with the layers they came from), independent, degenerate."""
    related = [r for r in experts if r["source_layer"] is not None]
    degenerate = sum(r["degenerate"] for r in experts)
    return {"experts": len(experts), "related": len(related), "degenerate": degenerate,
            "independent": len(experts) - len(related) - degenerate,
            "from_layers": {str(k): v for k, v in sorted(Counter(r["source_layer"] for r in related).items())}}


def group_verdicts(tests: list[Test], side: str | None) -> dict[str, dict]:
    """Per kind of matrix of the `side` model (ft's for dense pairs): its best Holm-adjusted log10 p, whether that
    is related, and how many tests gave a p-value."""
    out: dict[str, dict] = {}
    for t in tests:
        kind = _mine(t, side or "ft").kind
        g = out.setdefault(kind, {"log10_pvalue_holm": math.inf, "n_tests": 0})
        if not math.isnan(t[3]):
            g["n_tests"] += 1
            g["log10_pvalue_holm"] = min(g["log10_pvalue_holm"], float(t[3]))
    for g in out.values():
        g["log10_pvalue_holm"] = None if math.isinf(g["log10_pvalue_holm"]) else g["log10_pvalue_holm"]
        g["related"] = g["log10_pvalue_holm"] is not None and _related(g["log10_pvalue_holm"])
    return out


def verdict_line(groups: dict[str, dict], experts: list[dict]) -> str:
    """One line: each group related or not (with its best Holm log10 p), and the routed experts' map."""
    parts = []
    for kind in GROUP_NAMES:
        g = groups.get(kind)
        if g is None or kind == "expert" and experts:
            continue
        if g["log10_pvalue_holm"] is None:
            parts.append(f"{GROUP_NAMES[kind]}: no p-value (degenerate, or too few units)")
            continue
        parts.append(f"{GROUP_NAMES[kind]} {'related' if g['related'] else 'not related'} "
                     f"(Holm log10 p {g['log10_pvalue_holm']:.1f})")
    if experts:
        s = expert_summary(experts)
        layers = ", ".join(s["from_layers"])
        text = f"routed experts: {s['related']} of {s['experts']} related"
        text += f" (to layers {layers})" if layers else ""
        if s["independent"]:
            text += f", {s['independent']} look independently initialised"
        if s["degenerate"]:
            text += f", {s['degenerate']} degenerate (no p-value)"
        parts.append(text)
    return "; ".join(parts)
