"""Merge attribution inside `identify`: when two or more catalogued candidates are related to the suspect and their
files are at hand, how the suspect's blocks combine them (tracing/attribution.py: per-block least-squares shares
with intervals, each tested against zero, Holm over every (block, candidate) test; frankenmerges: each block's
source model and block).

    merge = attribute_related(ckpt, [(name, location), ...])   # None: fewer than two related candidates at hand
    merge["kind"], merge["summary"], merge["layers"]              # layers: identify's JSON `layers` when a merge

This reads the suspect's weights and the candidates' again (the fingerprints hold sampled units, not whole blocks),
so it runs only where the fingerprints found two or more related candidates: a merge, or relatives of one another.
Only a merge (linear / SLERP, task arithmetic, TIES / DARE, or a passthrough of two or more models) replaces the
fingerprints' layer map; "related" (least squares between relatives, e.g. a base and its fine-tune both in the
catalogue) keeps it.
"""

from __future__ import annotations

import contextlib

import torch

from tracing.attribution import attribute
from tracing.checkpoints import Checkpoint
from tracing.errors import TracingError
from tracing.sources import open_source

MAX_PARENTS = 4  # related candidates attributed, best first
MERGE_KINDS = ("linear", "task_arithmetic", "sparse", "passthrough")


def attribute_related(suspect: Checkpoint, related: list[tuple[str, str]],
                      device: torch.device | None = None) -> dict | None:
    """The attribution of the suspect to its related candidates ((name, location), best first; at most
    MAX_PARENTS): kind, parents, summary, shares, merge (whether it replaces the layer map), layers
    [{layer, sources [{model, layer, share, ci, log10_pvalue (Holm)}]}]; {"error": why} when the candidates'
    blocks do not line up with the suspect's; None with fewer than two candidates."""
    related = related[:MAX_PARENTS]
    if len(related) < 2:
        return None
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(contextlib.closing(open_source(suspect, progress=False)))
        parents = {name: stack.enter_context(contextlib.closing(open_source(loc, progress=False)))
                   for name, loc in related}
        try:
            res = attribute(src, parents, suspect_name=suspect.name, device=device)
        except TracingError as e:
            return {"error": str(e)}
    merge = res["kind"] in MERGE_KINDS and len(res["parents"]) >= 2
    layers = [{"layer": lay["layer"],
               "sources": [{"model": s["model"], "layer": s["layer"], "share": s["share"], "ci": s["ci"],
                            "log10_pvalue": s["log10_pvalue_holm"]} for s in lay["sources"]]}
              for lay in res["layers"]]
    return {"kind": res["kind"], "merge": merge, "parents": res["parents"], "summary": res["summary"],
            "shares": res["shares"], "aligned": res["aligned"], "layers": layers}
