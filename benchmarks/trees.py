"""Family trees on a zoo of three families built by applying tracing/derivations recipes repeatedly (fine-tunes, LoRA,
layer and MLP pruning, depth up-scaling, vocabulary extension, a linear and a TIES merge), two of the families of
the same architecture and shape: are the families right (no unrelated models joined), the edges, their directions,
the merges' parents?

    python benchmarks/trees.py --markdown docs/generated/trees.md       # zoo built once under --zoo, then reused
    python benchmarks/trees.py --evidence weights                       # relation tests on weights only

Every pair runs through the pipeline (`python -m tracing.trees` does the same): records under --zoo/records.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import shutil
import sys
import time
from pathlib import Path

from bench_common import ROOT, publish, start

sys.path.insert(0, ROOT)

SHAPE = dict(hidden=64, layers=4, intermediate=192, heads=4, kv_heads=2)
FT = dict(steps=40, lr=5e-4)
# name, architecture, parents (none: a base trained from scratch with this seed), recipe, options
ZOO = [
    ("A0", "llama", [], "base", {"seed": 0}),
    ("A1", "llama", ["A0"], "finetune", FT),
    ("A2", "llama", ["A1"], "lora", {}),
    ("A3", "llama", ["A0"], "layer-prune", {}),
    ("A4", "llama", ["A3"], "finetune", FT),
    ("A5", "llama", ["A1"], "vocab-extend", {}),
    ("A6", "llama", ["A2"], "finetune", FT),
    ("B0", "qwen2", [], "base", {"seed": 3}),  # seeds differ: the same seed gives llama and qwen2 one init
    ("B1", "qwen2", ["B0"], "depth-upscale", {}),
    ("B2", "qwen2", ["B1"], "finetune", FT),
    ("B3", "qwen2", ["B0"], "width-prune-mlp", {}),
    ("B4", "qwen2", ["B3"], "lora", {}),
    ("B5", "qwen2", ["B0"], "finetune", FT),
    ("B6", "qwen2", ["B0"], "finetune", {"steps": 60, "lr": 1e-3}),
    ("B7", "qwen2", ["B5", "B6"], "merge-ties", {}),
    ("C0", "llama", [], "base", {"seed": 7}),
    ("C1", "llama", ["C0"], "finetune", FT),
    ("C2", "llama", ["C1"], "finetune", FT),
    ("C3", "llama", ["C1"], "lora", {}),
    ("C4", "llama", ["C2", "C3"], "merge-linear", {"weights": (0.6, 0.4)}),
    ("C5", "llama", ["C2"], "vocab-extend", {}),
    ("C6", "llama", ["C1"], "layer-prune-healed", {}),
]


def build_key(rep: int) -> str:
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256(json.dumps([ZOO, SHAPE, FT, rep], default=str).encode())
    for path in sorted((Path(ROOT) / "tracing" / "derivations").glob("*.py")):
        h.update(path.read_bytes())
    h.update(json.dumps([torch.__version__, transformers.__version__, tokenizers.__version__]).encode())
    return h.hexdigest()[:16]


def build(zoo: Path, rep: int) -> dict[str, str]:
    """name -> checkpoint directory, every model of ZOO (rebuilt when the recipes or ZOO change); replicate `rep`
    draws every seed (initialisation, training batches, text) 1000 * rep further on."""
    import torch

    from tracing import derivations
    from tracing import zoo as tiny
    from tracing.derivations.train import retokenize

    key_file = zoo / "build.json"
    if key_file.exists() and json.loads(key_file.read_text()).get("key") == build_key(rep):
        return {name: str(zoo / name) for name, *_ in ZOO}
    tok = tiny.build_tokenizer(tiny.synthetic_text(3000, seed=0), vocab_size=512)
    text = tiny.synthetic_text(4000, seed=1)
    models, toks = {}, {}
    for k, (name, arch, parents, kind, opts) in enumerate(ZOO):
        t0 = time.perf_counter()
        if kind == "base":
            ids = torch.tensor(tok(text)["input_ids"])
            model = derivations.pretrain(tiny.tiny_config(arch, vocab_size=len(tok), **SHAPE), ids,
                                         seed=opts["seed"] + 1000 * rep)
            models[name], toks[name] = model, tok
        else:
            base, ptok = models[parents[0]], toks[parents[0]]
            text_k = tiny.synthetic_text(1500, seed=100 + k + 1000 * rep)
            ids = retokenize(tok, torch.tensor(tok(text_k)["input_ids"]), ptok)
            extra = {"models": tuple(models[p] for p in parents)} if kind.startswith("merge") else \
                {"seed": 10 + k + 1000 * rep} if "seed" in inspect.signature(derivations.KINDS[kind].fn).parameters \
                else {}
            if kind == "merge-ties":  # the merge's base is the fine-tunes' parent
                base = models[ZOO[[n for n, *_ in ZOO].index(parents[0])][2][0]]
            d = derivations.derive(kind, base, ptok, ids, **opts, **extra)
            models[name], toks[name] = d.model.requires_grad_(True), d.tokenizer
        models[name].save_pretrained(zoo / name)
        toks[name].save_pretrained(zoo / name)
        print(f"  built {name} ({kind}) in {time.perf_counter() - t0:.1f} s", flush=True)
    key_file.write_text(json.dumps({"key": build_key(rep)}))
    return {name: str(zoo / name) for name, *_ in ZOO}


def truth() -> tuple[dict[str, list[str]], dict[str, str]]:
    """({child: its parents}, {model: its family's root})."""
    parents = {name: ps for name, _, ps, *_ in ZOO if ps}
    root = {}
    for name, _, ps, *_ in ZOO:
        root[name] = root[ps[0]] if ps else name
    return parents, root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=str(Path(ROOT) / "results" / "trees_bench"))
    ap.add_argument("--evidence", default="auto", choices=("auto", "weights"))
    ap.add_argument("--replicates", type=int, default=2, help="zoos built from other seeds")
    ap.add_argument("--markdown", default=None)
    args, head, t0 = start(ap)
    import torch

    from tracing.sources import open_source
    from tracing.trees import infer_forest, pair_tests, write_forest

    torch.set_num_threads(1)
    lines: list[str] = []
    for rep in range(args.replicates):
        zoo = Path(args.zoo) / f"rep{rep}"
        paths = build(zoo / "models", rep)
        name_of = {p: n for n, p in paths.items()}
        sources = {p: open_source(p, progress=False) for p in paths.values()}
        tests = pair_tests(sources, zoo / args.evidence, args.evidence)
        log10p = {k: v["log10_pvalue"] for k, v in tests.items()}
        walls = sorted(v["wall_s"] for v in tests.values() if v["wall_s"] is not None)
        pair_s = walls[len(walls) // 2] if walls else float("nan")
        rows = []
        for signal in ("norm", "kurtosis"):
            t1 = time.perf_counter()
            forest = infer_forest(sources, log10p, signal=signal)
            rows.append(summarize(forest, name_of, signal, time.perf_counter() - t1))
            if signal == "norm":
                main_forest = rename(forest, name_of)
                figure = write_forest(main_forest, zoo / "forest")["png"]
                if args.markdown and rep == 0:
                    shutil.copy(figure, Path(args.markdown).parent / "trees.png")
        lines += [f"### Replicate {rep} (every seed {1000 * rep} further on)", ""]
        lines += report(rows, main_forest, log10p, name_of, pair_s, args.evidence)
        lines.append("")
    publish(lines, head, t0, args.markdown)
    return 0


def rename(forest: dict, name_of: dict) -> dict:
    """The forest with paths replaced by the zoo's short names."""
    text = json.dumps(forest, default=str)
    for path, name in name_of.items():
        text = text.replace(json.dumps(path), json.dumps(name))
    return json.loads(text)


def summarize(forest: dict, name_of: dict, signal: str, seconds: float) -> dict:
    from tracing.forest import score_edges

    shown = rename(forest, name_of)
    parents, root = truth()
    fams = [sorted(f["members"]) for f in shown["families"]]
    mixed = [f for f in fams if len({root[m] for m in f}) > 1]
    split = len(fams) - len(set(root.values()))
    plain = {c: ps for c, ps in parents.items() if len(ps) == 1}
    score = score_edges({"families": [{"edges": [e for e in f["edges"] if not e["merge"]]}
                                      for f in shown["families"]]}, plain)
    merge_true = {c: sorted(ps) for c, ps in parents.items() if len(ps) > 1}
    merge_found = {m: sorted(v["parents"]) for m, v in shown["merges"].items()}
    return {"signal": signal, "families": fams, "mixed": mixed, "split": split, **score,
            "merges_right": sum(merge_found.get(m) == ps for m, ps in merge_true.items()),
            "merges_true": len(merge_true), "merges_false": sorted(set(merge_found) - set(merge_true)),
            "merge_found": merge_found, "seconds": seconds}


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def report(rows: list[dict], forest: dict, log10p: dict, name_of: dict, pair_s: float, evidence: str) -> list[str]:
    parents, root = truth()
    related = [(name_of[a], name_of[b]) for a, b in (tuple(k) for k in log10p)]
    n_true = sum(root[a] == root[b] for a, b in related)
    cut = forest["correction"]
    called = {frozenset((p["a"], p["b"])) for p in forest["pairs"] if p["related"]}
    tp = sum(1 for a, b in related if root[a] == root[b] and frozenset((a, b)) in called)
    fp = sum(1 for a, b in related if root[a] != root[b] and frozenset((a, b)) in called)
    lines = [f"{len(ZOO)} models in {len(set(root.values()))} families; relation test `{evidence}` on all "
             f"{len(related)} pairs (median {pair_s:.2f} s per pair, the records' wall time), related when p <= 0.01 "
             f"after {cut}: "
             f"{tp}/{n_true} related pairs called related, {fp}/{len(related) - n_true} unrelated pairs called "
             "related.", "",
             "| direction signal (same-shape edges) | families (found / true) | families mixing unrelated models "
             "| tree edges right | directions right (of right edges) | merges: parents right | false merges "
             "| seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['signal']} | {len(r['families'])} / {len(set(root.values()))} | {len(r['mixed'])} "
                     f"| {r['edges_right']}/{r['edges_true']} ({100 * r['edges_right'] / r['edges_true']:.0f}%) "
                     f"| {r['directions_right']}/{r['edges_right']} "
                     f"({100 * r['directions_right'] / max(1, r['edges_right']):.0f}%) "
                     f"| {r['merges_right']}/{r['merges_true']} | {', '.join(r['merges_false']) or 'none'} "
                     f"| {r['seconds']:.1f} |")
    lines += ["", "Edges of the forest (direction signal `norm`), against the truth:", "",
              "| family | parent -> child | truth | evidence | distance |", "|---|---|---|---|---|"]
    for fam in forest["families"]:
        for e in fam["edges"]:
            ok = e["parent"] in parents.get(e["child"], []) or (
                "reversed" if e["child"] in parents.get(e["parent"], []) else "wrong")
            lines.append(f"| {root[fam['root']]} | {e['parent']} -> {e['child']} "
                         f"| {'right' if ok is True else ok} | {e['why']} "
                         f"| {_num(e['distance'])} |")
    lines += ["", "Figure of replicate 0: `trees.png` (written beside this file)."]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
