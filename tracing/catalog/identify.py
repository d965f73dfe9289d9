"""identify: which catalogued model, if any, is a suspect built on? One read of the suspect, every catalogued
fingerprint of its architecture family compared, one p-value per candidate corrected for their number (Holm).

    result = identify("DIR", "org/suspect")          # plain data: what `--json FILE` writes
    result["candidates"][0]["model"], result["related"], result["layers"]

1. The suspect is resolved and read once: its fingerprint, made with the catalogue's settings. The candidates are
   the catalogued models of its family (arch.py); none is a one-line error.
2. Plan, before any test runs: per candidate the fingerprint tests that fit (compare.misfit) and, with confirm > 0
   and its files at hand (a local path that exists, or a hub id), the exact test: K tests, Bonferroni over them.
3. Screen every layer pair of every candidate for each fingerprint test (compare.screen).
4. Each fingerprint test visits the candidates by their best screen, skipping those already decided (combined
   log10 p <= -6), and stops after PATIENCE candidates in a row without evidence (combined p > 0.01). A test that
   does not reach a candidate counts as p = 1 there.
5. Holm over the candidates compared.
6. The fingerprint is not decisive, and the exact test `auto` runs from the files (pipeline.run_pair, a full
   pair run, which reads the candidate and the suspect again), for at most `confirm` candidates, best first:
   every candidate whose Holm-adjusted p is significant but not decisive (-6 < log10 p <= log10 0.01); and when no
   candidate is decisive, the best candidates whatever their p. Its p joins the candidate's planned tests; Holm
   again. Related: Holm-adjusted p <= 0.01. No related candidate: "no catalogued base".
7. Two or more related candidates with their files at hand: merge attribution (catalog/merge.py), which reads the
   suspect and them again; a merge's per-block shares are the JSON's `layers`.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from tracing import matching
from tracing.catalog.compare import PATIENCE, TESTS, misfit, run, screen
from tracing.catalog.fingerprint import build
from tracing.catalog.merge import attribute_related
from tracing.catalog.store import Catalog
from tracing.catalog.verdict import Candidate, adjust, candidate_record, layer_sources
from tracing.checkpoints import resolve
from tracing.config import RunConfig
from tracing.errors import TracingError
from tracing.pipeline import run_pair
from tracing.sources import open_source
from tracing.statistics.auto import ALPHA, STOP_LOG10P

CONFIRM = 2  # candidates the exact test may confirm per query
NO_BASE = "no catalogued base"


def reachable(location: str) -> bool:
    """Whether the exact test can open a catalogued model: a local path that exists, or a hub id."""
    return os.path.exists(location) or not location.startswith(("/", ".", "~"))


def _candidates(cat: Catalog, family: str, suspect: str, model_type: str) -> list[dict]:
    same = [e for e in cat.entries if e["family"] == family]
    if not same:
        held = Counter(e["family"] for e in cat.entries)
        raise TracingError(f"no catalogued model is of the {family} family of {suspect} ({model_type}); catalogue "
                           f"{cat.root} holds {', '.join(f'{f} ({n})' for f, n in sorted(held.items()))}: add a "
                           f"base of its family first")
    return same


def confirm_pair(location: str, suspect: str, save: Path, device: str, options: dict | None = None) -> dict:
    """`auto` on (catalogued model, suspect) through main.py's pipeline (`options`: more of RunConfig's fields,
    e.g. max_blocks): its combined log10 p, verdict, derivation line and evidence; a refusal or failure as
    {"log10_pvalue": None, "error": ...}."""
    t0 = time.perf_counter()
    cfg = RunConfig(**{"device": device, **(options or {}), "base_model_id": location, "ft_model_id": suspect,
                       "stat": "auto", "save": str(save), "no_progress": True})
    try:
        rec = run_pair(cfg)
    except TracingError as e:
        return {"log10_pvalue": None, "error": str(e), "seconds": time.perf_counter() - t0}
    if rec["status"] != "ok":
        return {"log10_pvalue": None, "error": rec.get("error"), "seconds": time.perf_counter() - t0}
    ex = rec["extras"]
    return {"log10_pvalue": rec["log10_pvalue"], "related": ex["related"], "derivation": ex["derivation"],
            "evidence": ex.get("evidence"), "steps": [t["test"] for t in ex["tests"]],
            "seconds": time.perf_counter() - t0}


def _to_confirm(cands: list[Candidate], confirm: int) -> list[Candidate]:
    """Step 6 of the module docstring."""
    at_hand = [c for c in cands if c.planned > len(TESTS) - len(c.misfits) and c.exact is None]
    best = sorted(at_hand, key=lambda c: (c.log10_raw, -max(c.screen_score(t) for t in TESTS)))
    grey = [c for c in best if STOP_LOG10P < c.log10_holm <= math.log10(ALPHA)]
    if not any(c.log10_holm <= STOP_LOG10P for c in cands):
        grey += [c for c in best if c not in grey]
    return grey[:confirm]


@torch.no_grad()
def identify(root: str | Path, suspect: str, *, confirm: int = CONFIRM, device: str = "cpu",
             save: str | Path | None = None, method: str = matching.DEFAULT_METHOD, seed: int = 0,
             exact_options: dict | None = None) -> dict:
    """The query (module docstring): plain data with suspect, candidates (best first), related, verdict, layers.
    `exact_options`: RunConfig fields for the exact test (default: main.py's defaults for auto)."""
    t0 = time.perf_counter()
    if confirm < 0:
        raise TracingError(f"--confirm takes a number of candidates (0 or more), got {confirm}")
    cat = Catalog.open(root)
    cat.require_models()
    ckpt = resolve(suspect, progress=False)
    entries = _candidates(cat, ckpt.spec.family, suspect, ckpt.spec.model_type)
    src = open_source(ckpt, progress=False)
    try:
        fp_s = build(src, cat.settings, name=suspect)
        read_bytes = src.read_bytes
    finally:
        src.close()
    seconds = {"fingerprint": time.perf_counter() - t0}
    t = time.perf_counter()
    cands = []
    for e in entries:
        fp = cat.load(e)
        misfits = {test: why for test in TESTS if (why := misfit(test, fp, fp_s))}
        planned = len(TESTS) - len(misfits) + (1 if confirm > 0 and reachable(e["location"]) else 0)
        cands.append(Candidate(e, fp, planned, misfits))
    seconds["load"], t = time.perf_counter() - t, time.perf_counter()
    dev = torch.device(device)
    for c in cands:
        c.screens = {test: screen(test, c.fp, fp_s, dev) for test in TESTS if test not in c.misfits}
    seconds["screen"], t = time.perf_counter() - t, time.perf_counter()
    for test in TESTS:
        misses = 0
        for c in sorted((c for c in cands if test in c.screens), key=lambda c: -c.screen_score(test)):
            if c.decisive:
                continue
            c.results[test] = run(test, c.fp, fp_s, c.screens[test], method=method, seed=seed, device=dev)
            misses = 0 if c.log10_raw <= math.log10(ALPHA) else misses + 1
            if misses >= PATIENCE:
                break
    adjust(cands)
    seconds["tests"], t = time.perf_counter() - t, time.perf_counter()
    chosen = _to_confirm(cands, confirm)
    if chosen:
        with tempfile.TemporaryDirectory(prefix="catalog-confirm-") as tmp:
            for c in chosen:
                c.exact = confirm_pair(c.entry["location"], suspect, Path(save or tmp), device, exact_options)
        adjust(cands)
    seconds["confirm"], t = time.perf_counter() - t, time.perf_counter()
    best = sorted((c for c in cands if c.related and reachable(c.entry["location"])), key=lambda c: c.log10_holm)
    merge = attribute_related(ckpt, [(c.name, c.entry["location"]) for c in best], dev)
    seconds["attribution"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    return _result(cat, fp_s, ckpt, cands, read_bytes, seconds, merge)


def _result(cat: Catalog, fp_s, ckpt, cands: list[Candidate], read_bytes: int, seconds: dict,
            merge: dict | None) -> dict:
    rank = sorted(cands, key=lambda c: (c.log10_holm, c.log10_raw, -max(c.screen_score(t) for t in TESTS)))
    rank_of = {id(c): k for k, c in enumerate(rank)}
    cands = sorted(cands, key=lambda c: rank_of[id(c)])
    adapter_rank = ckpt.adapter.get("r") if ckpt.adapter else None
    related = [c.name for c in cands if c.related]
    m = fp_s.meta
    others = [{"model": e["name"], "model_type": e["model_type"], "why": f"another architecture family ({e['family']})"}
              for e in cat.entries if e["family"] != m["family"]]
    return {"suspect": {"name": m["name"], "model_type": m["model_type"], "family": m["family"],
                        "layers": m["layers"], "hidden": m["hidden"], "mlp": m["mlp"][0], "vocab": m["vocab"],
                        "read_bytes": read_bytes, "fingerprint_bytes": fp_s.nbytes},
            "catalog": str(cat.root), "settings": cat.settings.to_dict(), "compared": len(cands),
            "candidates": [candidate_record(c, fp_s, adapter_rank) for c in cands], "not_compared": others,
            "related": related, "verdict": ("related: " + ", ".join(related)) if related else NO_BASE,
            "layers": merge["layers"] if merge and merge.get("merge") else layer_sources(fp_s, cands),
            "merge": merge,
            "correction": f"Bonferroni over each candidate's planned tests, Holm over the {len(cands)} candidates",
            "alpha": ALPHA, "seconds": seconds}
