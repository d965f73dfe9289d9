"""Family trees of N models: which are related, and who is whose parent (several parents for a merge).

    python -m tracing.trees --models a,b,c,d --out results/trees      # or --models models.yaml (a list of ids)
    # -> out/tree.yaml (the lineage tree `python -m tracing.aggregate --truth` reads), tree.json, tree.png,
    #    out/records/ (one `auto` record per pair: `python -m tracing.aggregate out/records --truth ...` scores them)

    forest = build_trees({name: location, ...}, out)   # what `python -m tracing.catalog tree` calls

Steps: (1) every pair gets a log10 p from the pipeline (`--evidence auto`, the default test; `weights`: csu_all
where it fits, else auto: weights only, no activations); (2) pairs whose p, Bonferroni-corrected over all pairs,
is at most --alpha are related, and families are the connected components (a false link would join two
families, so the whole forest keeps the family-wise level); (3) inside each family every pair gets its kinship
(tracing/kinship.py: distance, and direction from shapes or the weak vote); (4) each member whose blocks line up
with two or more others is attributed to its nearest ones (tracing/attribution.py) and is a merge when the
attribution calls it one (linear, task arithmetic, sparsified) with two or more positive shares; (5) the forest
(tracing/forest.py): a minimum spanning tree per family, rooted where the directions agree most, merges below
each parent. Merges are leaves: a model derived from a merge joins the tree at its nearest non-merge relative.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from tracing import naming, plots
from tracing.attribution import attribute
from tracing.checkpoints import resolve
from tracing.config import RunConfig
from tracing.errors import TracingError, exit_on_error
from tracing.forest import build_forest, families, to_yaml
from tracing.kinship import WEAK, kinship, profile
from tracing.model_lists import read_yaml
from tracing.pipeline import run_pair
from tracing.results import load_record
from tracing.shares import block_keys
from tracing.sources import Source, open_source
from tracing.statistics import get_stat

ALPHA = 0.01  # family-wise level of the relations (Bonferroni over the pairs)
MERGE_CANDIDATES = 4  # nearest relatives a member is attributed to
MERGE_KINDS = ("linear", "task_arithmetic", "sparse")


def pair_tests(sources: Mapping[str, Source], out: Path, evidence: str = "auto", progress: bool = False,
               locations: Mapping[str, str] | None = None) -> dict[frozenset, dict]:
    """The relation test of every pair of the models (name -> source: the headers decide the test) through the
    pipeline, records under out/records (an ok record of the same two checkpoints, by content hash, is read, not
    recomputed): pair -> {"stat", "log10_pvalue" (None where no test fits), "wall_s", "derivation"}. `locations`:
    name -> what the pipeline opens (default: the name itself)."""
    found: dict[frozenset, dict] = {}
    where = {m: (locations or {}).get(m, m) for m in sources}
    hashes = {m: resolve(where[m]).content_hash for m in sources}
    for a, b in itertools.combinations(sources, 2):
        stat = "auto"
        if evidence == "weights" and get_stat("csu_all").misfit(sources[a], sources[b]) is None:
            stat = "csu_all"
        cfg = RunConfig(base_model_id=where[a], ft_model_id=where[b], stat=stat, save=str(out / "records"),
                        no_progress=True)
        path = cfg.result_path()
        rec = load_record(path) if path.exists() else {}
        try:
            if rec.get("status") != "ok" or _hashes(rec) != (hashes[a], hashes[b]):
                rec = run_pair(cfg)
        except TracingError as e:  # refused before anything ran: no test compares these two
            rec = {"status": "n/a", "error": str(e)}
        ok = rec.get("status") == "ok"
        found[frozenset((a, b))] = {"stat": stat, "log10_pvalue": rec.get("log10_pvalue") if ok else None,
                                    "wall_s": rec.get("wall_time_s"),
                                    "derivation": (rec.get("extras") or {}).get("derivation")}
        if progress:
            p = found[frozenset((a, b))]["log10_pvalue"]
            print(f"  {a} vs {b}: {stat} log10 p {'-' if p is None else f'{p:.2f}'}", flush=True)
    return found


def _hashes(rec: dict) -> tuple:
    ids = rec.get("checkpoints") or {}
    return tuple((ids.get(side) or {}).get("content_hash") for side in ("base", "ft"))


def _lines_up(a: Source, b: Source) -> bool:
    """Same depth and the same block shapes: what mergekit's linear, SLERP, task arithmetic, TIES, DARE merge."""
    ka, kb = block_keys(a, 0), block_keys(b, 0)
    return a.spec.n_layers == b.spec.n_layers and ka.keys() == kb.keys() and \
        all(a.shape(ka[k]) == b.shape(kb[k]) for k in ka)


def _distance(k: dict) -> float:
    return math.inf if k["distance"] is None else k["distance"]


def find_merges(members: Sequence[str], sources: Mapping[str, Source], kin: Mapping[frozenset, dict]) -> dict:
    """{member: {"parents", "shares", "base", "summary"}} for the members attribution calls merges."""
    out = {}
    for m in members:
        others = [o for o in members if o != m and _lines_up(sources[m], sources[o])]
        if len(others) < 2:
            continue
        near = sorted(others, key=lambda o: _distance(kin[frozenset((m, o))]))[:MERGE_CANDIDATES]
        res = attribute(sources[m], {o: sources[o] for o in near}, suspect_name=m)
        shares = {o: v["mean_share"] for o, v in res["shares"].items()}
        parents = [o for o in res["parents"] if shares[o] > 0]
        if res["kind"] in MERGE_KINDS and len(parents) >= 2:
            out[m] = {"parents": parents, "shares": shares, "kind": res["kind"], "summary": res["summary"],
                      "base": [o for o in res["parents"] if shares[o] <= 0]}
    return out


def infer_forest(sources: Mapping[str, Source], log10p: Mapping[frozenset, float | None], *, alpha: float = ALPHA,
                 signal: str = "norm", merges: bool = True, n_tests: int | None = None) -> dict:
    """The families and trees of the models in `sources` (name -> tensor source) from `log10p` (frozenset of two
    names -> the log10 p of the relation test, None or absent: not related). `n_tests`: the number of pairs the
    Bonferroni correction counts (default: every pair of `sources`). Returns build_forest's dict plus "pairs"
    (every pair's p, verdict and, inside a family, kinship) and the settings."""
    names = list(sources)
    n_tests = n_tests or max(1, len(names) * (len(names) - 1) // 2)
    cut = math.log10(alpha) - math.log10(n_tests)
    pairs = []
    for a, b in itertools.combinations(names, 2):
        p = log10p.get(frozenset((a, b)))
        pairs.append({"a": a, "b": b, "log10_pvalue": p, "related": p is not None and p <= cut})
    groups = [g for g in families(names, pairs) if len(g) > 1]
    profiles = {m: {**profile(sources[m]), "name": m} for g in groups for m in g}  # named as in `sources`
    kin: dict[frozenset, dict] = {}
    for g in groups:
        for a, b in itertools.combinations(g, 2):
            kin[frozenset((a, b))] = kinship(profiles[a], profiles[b], signal)
    for p in pairs:
        k = kin.get(frozenset((p["a"], p["b"])))
        if k is not None:  # kinship's direction is from its first model to its second
            sign = 1.0 if k["a"] == p["a"] else -1.0
            p.update(distance=k["distance"], direction=sign * k["direction"], why=k["why"], label=k["label"],
                     votes=k["votes"])
    found = {m: v for g in groups for m, v in find_merges(g, sources, kin).items()} if merges else {}
    forest = build_forest(names, pairs, found)
    forest.update(pairs=pairs, alpha=alpha, correction=f"bonferroni over {n_tests} pairs", signal=signal)
    return forest


def write_forest(forest: dict, out: Path) -> dict[str, str]:
    """tree.yaml, tree.json and tree.png in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"yaml": out / naming.TREE_YAML, "json": out / naming.TREE_JSON, "png": out / naming.TREE_PNG}
    paths["yaml"].write_text(to_yaml(forest))
    paths["json"].write_text(json.dumps(forest, indent=1, default=str))
    plots.family_trees(forest["families"], str(paths["png"]))
    return {k: str(v) for k, v in paths.items()}


def model_names(spec: str) -> list[str]:
    """--models: comma-separated ids, or a YAML file holding a list of ids."""
    if spec.endswith((".yaml", ".yml")):
        doc = read_yaml(Path(spec), "model list")
        if not isinstance(doc, list) or not all(isinstance(x, str) for x in doc):
            raise TracingError(f"{spec}: a model list is a YAML list of model ids")
        names = doc
    else:
        names = [x for x in spec.split(",") if x]
    if len(names) < 2 or len(set(names)) != len(names):
        raise TracingError(f"--models needs two or more distinct model ids (got {names})")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tracing.trees", description=__doc__.split("\n")[0])
    p.add_argument("--models", required=True, help="comma-separated model ids, or a YAML list of them")
    p.add_argument("--out", default=str(naming.TREES_DIR))
    p.add_argument("--evidence", default="auto", choices=("auto", "weights"))
    p.add_argument("--alpha", type=float, default=ALPHA)
    p.add_argument("--signal", default="norm", choices=WEAK, help="direction of same-shape edges")
    p.add_argument("--no_merges", action="store_true", help="skip merge attribution")
    args = p.parse_args(argv)
    return exit_on_error(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    names = model_names(args.models)
    build_trees({m: m for m in names}, Path(args.out), args.evidence, args.alpha, args.signal, not args.no_merges)
    return 0


def build_trees(locations: Mapping[str, str], out: Path, evidence: str = "auto", alpha: float = ALPHA,
                signal: str = "norm", merges: bool = True) -> dict:
    """Every pair of the models (name -> what the pipeline opens) tested, the forest inferred, written to `out`
    and printed (what `python -m tracing.trees` and `python -m tracing.catalog tree` do). Returns the forest."""
    sources = {m: open_source(loc, progress=False) for m, loc in locations.items()}
    tests = pair_tests(sources, out, evidence, progress=True, locations=locations)
    log10p = {k: v["log10_pvalue"] for k, v in tests.items()}
    forest = infer_forest(sources, log10p, alpha=alpha, signal=signal, merges=merges)
    paths = write_forest(forest, out)
    for fam in forest["families"]:
        print(f"family of {fam['root']} ({len(fam['members'])} models)")
        for e in fam["edges"]:
            print(f"  {e['parent']} -> {e['child']}  ({e['why']})")
    print("\n".join(f"wrote {v}" for v in paths.values()))
    return forest


if __name__ == "__main__":
    raise SystemExit(main())
