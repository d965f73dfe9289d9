"""Family trees from pairwise evidence (plain data in, plain data out): which models are related (families),
which pairs are parent and child (edges), which way each edge points, and the lineage-tree YAML of it.

    forest = build_forest(names, pairs, merges)
    forest["families"][k]   # {"root", "members", "edges": [{"parent", "child", "distance", "direction", "why"}]}
    text = to_yaml(forest)  # what `python -m tracing.aggregate --truth` reads (tracing/lineage.py)
    score_edges(forest, {child: [parents]})   # edges and directions right, against a truth

`pairs`: one dict per unordered pair {"a", "b", "related" (bool), "distance" (float or None), "direction"
(> 0: a is b's parent, < 0: b is a's), "why", "label" (short, for the figure)}; `merges`: {model: {"parents":
[...], "shares": {...}}} for the models merge attribution found to be merges (several parents).

Families are the connected components of the related pairs. Inside a family the models that are not merges are
joined by a minimum spanning tree over the distances (a parent is nearer to its child than to its grandchild or
to its other children, when training moves each child in its own direction); the tree is then rooted at the
member that makes the edges' directions agree most (sum of the directions of the edges oriented away from it;
ties: the member with the smallest total distance), so a few edges with evidence from shapes (vocabulary,
pruning, up-scaling) fix the root and the weak votes decide only what those leave open. Each merge is then
attached below every one of its parents; in the YAML (one parent per model) it sits below the parent with the
largest share, the others named in a comment.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

FAR = 1e6  # distance of a related pair whose distance could not be measured (used only if nothing else joins)


def families(names: Sequence[str], pairs: Sequence[dict]) -> list[list[str]]:
    """Connected components of the related pairs, each in the order of `names`; singletons included."""
    parent = {n: n for n in names}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        if p["related"]:
            parent[find(p["a"])] = find(p["b"])
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(find(n), []).append(n)
    return list(groups.values())


def spanning_tree(members: Sequence[str], dist: Mapping[frozenset, float]) -> list[tuple[str, str]]:
    """Prim's minimum spanning tree over `members` (undirected edges; a missing distance counts as FAR)."""
    if len(members) < 2:
        return []
    inside, edges = {members[0]}, []
    while len(inside) < len(members):
        u, v = min(((u, v) for u in inside for v in members if v not in inside),
                   key=lambda e: (dist.get(frozenset(e), FAR), sorted(e)))
        edges.append((u, v))
        inside.add(v)
    return edges


def _orient(root: str, edges: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The undirected tree `edges` as (parent, child) pairs pointing away from `root`."""
    adj: dict[str, list[str]] = {}
    for u, v in edges:
        adj.setdefault(u, []).append(v)
        adj.setdefault(v, []).append(u)
    out, stack, seen = [], [root], {root}
    while stack:
        u = stack.pop()
        for v in adj.get(u, []):
            if v not in seen:
                seen.add(v)
                out.append((u, v))
                stack.append(v)
    return out


def choose_root(members: Sequence[str], edges: Sequence[tuple[str, str]], direction: Mapping[tuple[str, str], float],
                dist: Mapping[frozenset, float]) -> str:
    """The member whose orientation of `edges` agrees most with the directions (ties: smallest total distance)."""
    def agreement(r: str) -> float:
        return sum(direction.get((p, c), 0.0) for p, c in _orient(r, edges))

    def spread(r: str) -> float:
        return sum(dist.get(frozenset((r, m)), FAR) for m in members if m != r)

    return max(members, key=lambda r: (round(agreement(r), 9), -spread(r)))


def build_forest(names: Sequence[str], pairs: Sequence[dict], merges: Mapping[str, dict] | None = None) -> dict:
    """The families and their directed trees (module docstring) as plain data."""
    merges = dict(merges or {})
    dist = {frozenset((p["a"], p["b"])): (FAR if p.get("distance") is None else p["distance"]) for p in pairs}
    direction: dict[tuple[str, str], float] = {}
    why: dict[tuple[str, str], tuple[str, str]] = {}
    for p in pairs:
        d = float(p.get("direction") or 0.0)
        direction[p["a"], p["b"]], direction[p["b"], p["a"]] = d, -d
        why[p["a"], p["b"]] = why[p["b"], p["a"]] = (p.get("why", ""), p.get("label", ""))
    out = []
    for members in families(names, pairs):
        plain = [m for m in members if m not in merges] or members[:1]
        tree = spanning_tree(plain, dist)
        root = choose_root(plain, tree, direction, dist)
        edges = [{"parent": u, "child": v, "distance": dist.get(frozenset((u, v))), "direction": direction.get((u, v)),
                  "why": why.get((u, v), ("", ""))[0], "label": why.get((u, v), ("", ""))[1], "merge": False}
                 for u, v in _orient(root, tree)]
        for m in members:
            if m in merges and m not in plain:
                shares = merges[m].get("shares", {})
                for par in merges[m]["parents"]:
                    if par in members:
                        edges.append({"parent": par, "child": m, "distance": dist.get(frozenset((par, m))),
                                      "direction": None, "why": f"merge share {shares.get(par, math.nan):.2f}",
                                      "label": f"{shares.get(par, math.nan):.2f}", "merge": True,
                                      "share": shares.get(par)})
        out.append({"root": root, "members": list(members), "edges": edges})
    return {"families": out, "merges": merges}


def _main_parent(edges: Sequence[dict], child: str) -> tuple[str | None, list[str]]:
    """(the parent a model sits below in the YAML, its other parents): the largest share for a merge."""
    ins = [e for e in edges if e["child"] == child]
    if not ins:
        return None, []
    best = max(ins, key=lambda e: e.get("share") if e.get("share") is not None else math.inf)
    return best["parent"], [e["parent"] for e in ins if e is not best]


def _emit(node: str, depth: int, kids: Mapping[str, list[str]], extra: Mapping[str, list[str]],
          lines: list[str]) -> None:
    pad = "  " * depth
    note = f"  # also merged from: {', '.join(extra[node])}" if extra.get(node) else ""
    lines.append(f"{pad}- {_quote(node)}{':' if kids.get(node) else ''}{note}")
    for k in kids.get(node, []):
        _emit(k, depth + 1, kids, extra, lines)


def to_yaml(forest: dict) -> str:
    """The lineage-tree YAML (tracing/lineage.py): one root per family, children below their parent."""
    lines: list[str] = []
    for fam in forest["families"]:
        kids: dict[str, list[str]] = {}
        extra: dict[str, list[str]] = {}
        for m in fam["members"]:
            main, others = _main_parent(fam["edges"], m)
            if main is not None:
                kids.setdefault(main, []).append(m)
                extra[m] = others
        _emit(fam["root"], 0, kids, extra, lines)
    return "\n".join(lines) + "\n"


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def score_edges(forest: dict, truth: Mapping[str, Sequence[str]]) -> dict:
    """Against `truth` ({child: its parents}, roots absent): edges found with the right pair of models (either
    way), with the right direction too, and how many true edges there are."""
    true_pairs = {frozenset((c, p)): (p, c) for c, ps in truth.items() for p in ps}
    found = [(e["parent"], e["child"]) for fam in forest["families"] for e in fam["edges"]]
    right = [e for e in found if frozenset(e) in true_pairs]
    return {"edges_true": len(true_pairs), "edges_found": len(found), "edges_right": len(right),
            "directions_right": sum(true_pairs[frozenset(e)] == e for e in right)}
