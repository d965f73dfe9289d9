"""What identify says about each candidate: its planned tests and their combined p-value, Holm over the candidates,
the derivation line, and the suspect's layers attributed to catalogued layers.

    c = Candidate(entry, fp, planned=3)          # planned: the tests that may run on it (fixed before any runs)
    c.results["fingerprint csu"] = TestResult(...); c.exact = {...}
    c.log10_raw                                  # log10 min(1, K * min p) over the tests that ran (Bonferroni)
    adjust(candidates)                           # Holm over the candidates compared: c.log10_holm, c.related
    layers = layer_sources(suspect_fp, candidates)   # [{"layer", "sources": [{"model", "layer", "share"}]}]

`layer_sources` is the one place that builds the JSON's "layers": a merge attribution extends it (several sources
per layer with their shares) without touching the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tracing.catalog.compare import TestResult, embedding_cosine, same_strings
from tracing.catalog.fingerprint import Fingerprint
from tracing.describe import describe
from tracing.statistics.auto import ALPHA, STOP_LOG10P
from tracing.statistics.pvalues import holm_log10

EXACT = "auto (exact, from the files)"


@dataclass
class Candidate:
    """One catalogued model compared with the suspect."""

    entry: dict  # its index entry
    fp: Fingerprint
    planned: int  # K: fingerprint tests that fit + the exact test when it can run (fixed before any test runs)
    misfits: dict[str, str] = field(default_factory=dict)  # test -> why it cannot compare them
    screens: dict[str, np.ndarray] = field(default_factory=dict)  # test -> (L_c, L_s) screen values
    results: dict[str, TestResult] = field(default_factory=dict)
    exact: dict | None = None  # the exact test's summary, when it ran
    log10_holm: float = 0.0
    related: bool = False

    @property
    def name(self) -> str:
        return self.entry["name"]

    def screen_score(self, test: str) -> float:
        s = self.screens.get(test)
        return float(np.nanmax(s)) if s is not None and not np.isnan(s).all() else -math.inf

    def tests(self) -> list[tuple[str, float]]:
        """(test, log10 p) of every test that ran."""
        out = [(t, r.log10_pvalue) for t, r in self.results.items()]
        if self.exact is not None and self.exact.get("log10_pvalue") is not None:
            out.append((EXACT, self.exact["log10_pvalue"]))
        return out

    @property
    def log10_raw(self) -> float:
        """Bonferroni over the K planned tests: log10 min(1, K * min p) over those that ran (0 when none did)."""
        ps = [p for _, p in self.tests() if not math.isnan(p)]
        return min(0.0, math.log10(max(self.planned, 1)) + min(ps)) if ps else 0.0

    @property
    def decisive(self) -> bool:
        return self.log10_raw <= STOP_LOG10P

    @property
    def decided_by(self) -> str | None:
        tests = self.tests()
        return min(tests, key=lambda tp: tp[1])[0] if tests else None


def adjust(candidates: list[Candidate]) -> None:
    """Holm over every candidate compared (one family): log10_holm, and related when it is at most log10 ALPHA."""
    if not candidates:
        return
    adjusted = holm_log10(np.array([c.log10_raw for c in candidates]))
    for c, p in zip(candidates, adjusted):
        c.log10_holm = float(p)
        c.related = c.log10_holm <= math.log10(ALPHA)


def derivation(c: Candidate, suspect: Fingerprint, adapter_rank: int | None = None) -> str | None:
    """The derivation line (tracing.describe) of a related candidate: the exact test's own when it decided, else
    from the fingerprints (layer map, widths, vocabulary, units re-based, weight change of the kept units)."""
    if not c.related:
        return None
    by = c.decided_by
    if by == EXACT:
        return c.exact.get("derivation")
    res = c.results[by]
    a, b = c.fp.meta, suspect.meta
    ev = {"related": True, "decided_by": by, "log10_pvalue": c.log10_holm, "layers": (a["layers"], b["layers"]),
          "layer_map": res.mapping, "mlp_width": (a["mlp"][0], b["mlp"][0]), "hidden": (a["hidden"], b["hidden"]),
          "vocab": {"base": a["vocab"], "ft": b["vocab"], "same_strings": same_strings(c.fp, suspect),
                    "embedding_cosine": embedding_cosine(c.fp, suspect) if by == "fingerprint csu" else None},
          "weight_change": res.rel_change, "adapter_rank": adapter_rank}
    return describe(ev)


def _mapping(c: Candidate) -> tuple[list[int | None], list[float | None]] | None:
    """The deciding test's layer map and each mapped layer's log10 p (the exact test: auto's map, no p)."""
    by = c.decided_by
    if by == EXACT:
        mapping = (c.exact.get("evidence") or {}).get("layer_map")
        return (list(mapping), [None] * len(mapping)) if mapping else None
    res = c.results.get(by)
    if res is None:
        return None
    ps = [r.get("log10_pvalue") if r else None for r in (res.per_layer or [None] * len(res.mapping))]
    return res.mapping, ps


def layer_sources(suspect: Fingerprint, candidates: list[Candidate]) -> list[dict]:
    """For each layer of the suspect, where it comes from: the related candidate whose deciding test maps it with
    the smallest p, and that candidate's layer (share 1.0); no source when no related candidate maps it."""
    maps = [(c, m) for c in candidates if c.related and (m := _mapping(c)) is not None]
    out = []
    for j in range(suspect.n_layers):
        best = None
        for c, (mapping, ps) in maps:
            if j < len(mapping) and mapping[j] is not None:
                p = ps[j] if ps[j] is not None else 0.0
                if best is None or p < best[0]:
                    best = (p, c, mapping[j], ps[j])
        sources = [] if best is None else [{"model": best[1].name, "layer": int(best[2]), "share": 1.0,
                                            "log10_pvalue": best[3]}]
        out.append({"layer": j, "sources": sources})
    return out


def candidate_record(c: Candidate, suspect: Fingerprint, adapter_rank: int | None) -> dict:
    """A candidate as the JSON shows it."""
    tests = [{"test": t, "log10_pvalue": r.log10_pvalue, "layer_pairs_tested": r.n_tested, "layer_pairs": r.n_pairs,
              "mapping": r.mapping, "seconds": r.seconds} for t, r in c.results.items()]
    if c.exact is not None:
        tests.append({"test": EXACT, **c.exact})
    return {"model": c.name, "content_hash": c.entry["content_hash"], "model_type": c.entry["model_type"],
            "log10_pvalue": c.log10_holm, "log10_pvalue_uncorrected": c.log10_raw, "related": c.related,
            "planned_tests": c.planned, "decided_by": c.decided_by if c.related else None,
            "derivation": derivation(c, suspect, adapter_rank), "confirmed": c.exact is not None,
            "screen": {t: s if math.isfinite(s := c.screen_score(t)) else None for t in c.screens}, "tests": tests,
            "not_compared": dict(c.misfits)}
