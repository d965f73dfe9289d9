"""The weight tests on two fingerprints, without the weights: a screen of every layer pair, then the exact test on
the pairs it ranks first, a Holm-corrected layer map (docs/catalog.md has the math).

    why = misfit("fingerprint csu", cand, suspect)        # None: the test can compare them
    scores = screen("fingerprint csu", cand, suspect)     # (L_c, L_s) how well each suspect layer finds itself
    res = run("fingerprint csu", cand, suspect, scores)   # res.log10_pvalue, res.mapping, res.logp

"fingerprint csu": csu's identity test (tracing.statistics.common.identity_test) on the kept units' up rows in the
shared random basis: exact under H0 (the sketch is the same linear map on every row, the kept units are chosen by
norm, not by index). Needs the same hidden size and residual basis.
"fingerprint match": csu --align's and match's agreement test (common.agreement_test): units matched once by their
anchored gate rows (down columns) and once by their anchored up rows; related models agree. Blind to a permuted or
rotated residual stream, to permuted MLP units and to a pruned hidden size; needs shared anchor tokens whose
embeddings the suspect kept. Its null is match's (the two matchings of an independent model are unrelated).

A test's p-value: the layer pairs form one family of m = L_c x L_s tests; pairs the screen does not reach count as
p = 1. Holm's adjusted p-values only grow when any input grows, so leaving pairs out keeps the level whatever chose
them. The test's log10 p is the smallest Holm-adjusted one: log10 min(1, m * min p).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from tracing import matching
from tracing.catalog.fingerprint import Fingerprint
from tracing.catalog.sketch import MIN_ANCHORS
from tracing.statistics import screen as layer_screen
from tracing.statistics.common import MAPPING_ALPHA, agreement_test, identity_test, layer_map
from tracing.statistics.pvalues import holm_log10

TESTS = ("fingerprint csu", "fingerprint match")
SCREEN_ROWS_CANDIDATE = 128  # a candidate layer's units the screen compares against (the largest sketches)
PATIENCE = 3  # a test stops after this many layer pairs in a row, best screens first, find nothing


@dataclass
class TestResult:
    """One fingerprint test of one candidate against the suspect."""

    test: str
    log10_pvalue: float  # log10 min(1, m * min p) over the tested layer pairs (0.0: nothing found)
    logp: np.ndarray  # (L_c, L_s) raw log10 p, NaN where not tested
    mapping: list[int | None]  # suspect layer -> candidate layer (Holm-adjusted p < MAPPING_ALPHA), or None
    per_layer: list[dict] = field(default_factory=list)  # layer_map's records, one per suspect layer
    n_pairs: int = 0  # the family: every comparable layer pair
    n_tested: int = 0
    seconds: float = 0.0
    rel_change: float | None = None  # "fingerprint csu": ‖B - A‖ / ‖A‖ of units kept in place (sketched)


def shared_anchors(a: Fingerprint, b: Fingerprint) -> tuple[list[int], list[int]]:
    """Column indices into each side's anchored sketches for the anchor strings both have."""
    pos_b = {s: j for j, s in enumerate(b.meta["anchors"])}
    pairs = [(i, pos_b[s]) for i, s in enumerate(a.meta["anchors"]) if s in pos_b]
    return [i for i, _ in pairs], [j for _, j in pairs]


def misfit(test: str, a: Fingerprint, b: Fingerprint) -> str | None:
    """Why `test` cannot compare these fingerprints (None: it can)."""
    if a.meta["settings"] != b.meta["settings"]:
        return "they were made with different fingerprint settings"
    if test == "fingerprint csu":
        if a.meta["hidden"] != b.meta["hidden"]:
            return f"their hidden sizes differ ({a.meta['hidden']} vs {b.meta['hidden']}): no shared basis"
        return None
    for fp in (a, b):
        if not fp.has("in"):
            return f"{fp.name} has no anchored sketches ({fp.meta['why_no_anchors']})"
    if a.meta["gated"] != b.meta["gated"]:
        return "one MLP is gated and the other is not"
    n = len(shared_anchors(a, b)[0])
    return None if n >= MIN_ANCHORS else f"they share {n} anchor tokens (at least {MIN_ANCHORS} needed)"


def _rows(fp: Fingerprint, test: str, layer: int, cols: list[int] | None) -> torch.Tensor:
    """What the screen compares: the up sketch (csu) or the anchored up rows on the shared anchors (match)."""
    return fp.rows("csu", layer) if test == "fingerprint csu" else fp.rows("in", layer)[:, cols]


def screen(test: str, a: Fingerprint, b: Fingerprint, device: torch.device | None = None) -> np.ndarray:
    """(L_a, L_b) screen values (statistics/screen.py): for each layer pair, the median over b's 32 largest
    sketched units of each one's best cosine among a's SCREEN_ROWS_CANDIDATE largest."""
    cols_a, cols_b = shared_anchors(a, b) if test == "fingerprint match" else (None, None)

    def largest(rows: torch.Tensor) -> torch.Tensor:
        return rows.index_select(0, rows.norm(dim=1).topk(min(SCREEN_ROWS_CANDIDATE, len(rows))).indices)

    rows_a = ((i, largest(_rows(a, test, i, cols_a))) for i in range(a.n_layers))
    rows_b = {j: _rows(b, test, j, cols_b) for j in range(b.n_layers)}
    return layer_screen.screen_scores(rows_a, rows_b, list(range(a.n_layers)), list(range(b.n_layers)), device)


def _pair_test(test: str, a: Fingerprint, b: Fingerprint, i: int, j: int, cols: tuple, method: str,
               seed: int, device: torch.device | None) -> float:
    """Raw log10 p of layer pair (i, j) (NaN when too few usable units)."""
    if test == "fingerprint csu":
        ra, rb = a.rows("csu", i).to(device), b.rows("csu", j).to(device)
        rec = identity_test(matching.cosine_matrix(ra, rb), matching.usable(ra), matching.usable(rb), method,
                            (seed, i, j))
        return rec["log10_pvalue"]
    ca, cb = cols
    ua, ub = a.rows("in", i)[:, ca].to(device), b.rows("in", j)[:, cb].to(device)
    ma, mb = a.rows("mate", i)[:, ca].to(device), b.rows("mate", j)[:, cb].to(device)
    sims = (matching.cosine_matrix(ma, mb), matching.cosine_matrix(ua, ub))
    ok_a = matching.usable(ua) & matching.usable(ma)
    ok_b = matching.usable(ub) & matching.usable(mb)
    return agreement_test(lambda solver: sims, ok_a, ok_b, method, (seed, i, j))["log10_pvalue"]


def run(test: str, a: Fingerprint, b: Fingerprint, scores: np.ndarray, *, method: str = matching.DEFAULT_METHOD,
        seed: int = 0, patience: int = PATIENCE, device: torch.device | None = None) -> TestResult:
    """`test` of candidate `a` against suspect `b`: each suspect layer against its best-screening candidate layer,
    suspect layers by their best screen first, until `patience` pairs in a row find nothing (module docstring)."""
    t0 = time.perf_counter()
    la, lb = a.n_layers, b.n_layers
    m = la * lb
    cols = shared_anchors(a, b) if test == "fingerprint match" else (None, None)
    logp = np.full((la, lb), np.nan)
    filled = np.where(np.isnan(scores), -np.inf, scores)
    order = sorted(range(lb), key=lambda j: -filled[:, j].max())
    hit_at = math.log10(MAPPING_ALPHA / m)  # a pair that would map its layer on its own (Bonferroni)
    misses = 0
    for j in order:
        i = int(np.argmax(filled[:, j]))
        logp[i, j] = p = _pair_test(test, a, b, i, j, cols, method, seed, device)
        misses = 0 if p <= hit_at else misses + 1
        if misses >= patience:
            break
    tested = ~np.isnan(logp)
    best = float(np.nanmin(logp)) if tested.any() else 0.0
    out = TestResult(test, min(0.0, math.log10(m) + best), logp, [None] * lb, n_pairs=m, n_tested=int(tested.sum()))
    if tested.any():
        out.per_layer, out.mapping = layer_map(logp, holm_log10(logp), list(range(la)), list(range(lb)), test)
    if test == "fingerprint csu":
        out.rel_change = rel_change(a, b, out.mapping)
    out.seconds = time.perf_counter() - t0
    return out


def rel_change(a: Fingerprint, b: Fingerprint, mapping: list[int | None]) -> float | None:
    """‖B - A‖ / ‖A‖ over the kept units both have at the same index in mapped layers of the same width, in the
    basis (a Johnson-Lindenstrauss estimate of the up rows' relative change; float16 sketches resolve about 1e-3;
    exactly 0 when the rows are equal)."""
    num = den = 0.0
    for j, i in enumerate(mapping):
        if i is None or a.meta["mlp"][i] != b.meta["mlp"][j]:
            continue
        ua, ub = a.units(i), b.units(j)
        common, ia, ib = np.intersect1d(ua.numpy(), ub.numpy(), return_indices=True)
        if len(common) == 0:
            continue
        ra, rb = a.rows("csu", i)[torch.from_numpy(ia)].double(), b.rows("csu", j)[torch.from_numpy(ib)].double()
        num += float((ra - rb).square().sum())
        den += float(ra.square().sum())
    return math.sqrt(num / den) if den > 0 else None


def embedding_cosine(a: Fingerprint, b: Fingerprint) -> float | None:
    """Mean cosine of the shared anchors' embedding rows in the basis (same hidden size and residual basis), or
    None: below describe.NEW_EMBEDDINGS the suspect's embeddings were re-initialised."""
    ea, eb = a.emb(), b.emb()
    if ea is None or eb is None or a.meta["hidden"] != b.meta["hidden"]:
        return None
    ca, cb = shared_anchors(a, b)
    if not ca:
        return None
    return float(torch.nn.functional.cosine_similarity(ea[ca], eb[cb], dim=1).mean())


def same_strings(a: Fingerprint, b: Fingerprint) -> bool:
    """Whether the two vocabularies give the shared anchor strings the same ids (a tokenizer kept or extended)."""
    ids_b = dict(zip(b.meta["anchors"], b.meta["anchor_ids"]))
    return all(ids_b.get(s, i) == i for s, i in zip(a.meta["anchors"], a.meta["anchor_ids"]))
