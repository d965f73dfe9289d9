"""Merge attribution on merges built the way mergekit builds them (tracing/derivations/merges.py): linear 50/50 and
70/30, SLERP, task arithmetic, TIES and DARE of two or three fine-tunes of one trained base, passthrough
frankenmerges of two models; and the nulls (a plain fine-tune, independent models) with the tests' calibration.

    python benchmarks/merges.py --markdown docs/generated/merges.md     # ~3 min on 2 cores
    python benchmarks/merges.py --families llama --figures results/merges

Pass criteria (the issue's): shares within +-0.1 of the truth for linear and task-arithmetic merges (every block,
every parent), the right source model and block for every frankenmerge block, the parents of TIES / DARE found
(the models with positive shares are exactly the merged fine-tunes); a plain fine-tune gets one parent, an
independent model none.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from bench_common import ROOT, publish, start

SHAPE = dict(hidden=64, layers=4, intermediate=192, heads=4, kv_heads=2)
N_INDEPENDENT = 12  # independent models whose (block, regressor) p-values check the calibration


def models(family: str):
    """The base, three fine-tunes of it (each on its own text), tokenizer and ids."""
    import torch

    from tracing import zoo
    from tracing.derivations import pretrain
    from tracing.derivations.train import tuned

    tok = zoo.build_tokenizer(zoo.synthetic_text(3000, seed=0), vocab_size=512)
    ids = torch.tensor(tok(zoo.synthetic_text(4000, seed=1))["input_ids"])
    base = pretrain(zoo.tiny_config(family, vocab_size=len(tok), **SHAPE), ids, seed=0)
    fts = {}
    for k, name in enumerate(("ft-a", "ft-b", "ft-c")):
        text = torch.tensor(tok(zoo.synthetic_text(1500, seed=50 + k))["input_ids"])
        fts[name] = tuned(base, text, 60, 1e-3, seed=k + 1)
    return base, fts, tok, ids


def cases(base, fts, tok, ids) -> list[dict]:
    """(name, suspect model, candidates {name: model}, base model or None, truth) for every merge and null."""
    from tracing.derivations import derive
    from tracing.derivations import merges as mk
    from tracing.derivations.core import stack
    from tracing.derivations.train import independent, tuned

    a, b, c = fts["ft-a"], fts["ft-b"], fts["ft-c"]
    two, three = {"ft-a": a, "ft-b": b}, {"ft-a": a, "ft-b": b, "ft-c": c}
    out = []

    def add(name, model, cands, with_base, truth, kind):
        out.append({"name": name, "model": model, "cands": cands, "base": base if with_base else None,
                    "truth": truth, "kind": kind})

    for w in ((0.5, 0.5), (0.7, 0.3)):
        add(f"linear {w[0]:g}/{w[1]:g}", derive("merge-linear", base, tok, ids, weights=w, models=(a, b)).model, two,
            False, {"ft-a": w[0], "ft-b": w[1]}, "shares")
    add("linear 0.7/0.3, bf16", derive("merge-linear", base, tok, ids, weights=(0.7, 0.3), models=(a, b)).model
        .to(dtype_bf16()), {k: copy.deepcopy(v).to(dtype_bf16()) for k, v in two.items()}, False,
        {"ft-a": 0.7, "ft-b": 0.3}, "shares")
    for t in (0.5, 0.3):
        add(f"slerp t={t:g}", derive("merge-slerp", base, tok, ids, t=t, models=(a, b)).model, two, False,
            {"ft-a": 1 - t, "ft-b": t}, "shares")
    add("task arithmetic (1, 1)", derive("merge-task-arithmetic", base, tok, ids, models=(a, b)).model, two, True,
        {"base": -1.0, "ft-a": 1.0, "ft-b": 1.0}, "shares")
    w3 = (0.6, 0.5, 0.4)
    ta3 = mk.merged((base, a, b, c), lambda k, xs: mk.task_vectors(xs[0], xs[1:], w3, None, False, False))
    add("task arithmetic, 3 parents (0.6, 0.5, 0.4)", ta3, three, True,
        {"base": 1 - sum(w3), "ft-a": 0.6, "ft-b": 0.5, "ft-c": 0.4}, "shares")
    add("TIES density 0.5", derive("merge-ties", base, tok, ids, models=(a, b)).model, two, True,
        {"ft-a": 1.0, "ft-b": 1.0}, "parents")
    ties3 = mk.merged((base, a, b, c), lambda k, xs: mk.task_vectors(
        xs[0], xs[1:], (1, 1, 1), lambda d: mk.magnitude(d, 0.5), True, True))
    add("TIES density 0.5, 3 parents", ties3, three, True, {"ft-a": 1.0, "ft-b": 1.0, "ft-c": 1.0}, "parents")
    add("DARE-TIES density 0.5", derive("merge-dare", base, tok, ids, models=(a, b)).model, two, True,
        {"ft-a": 1.0, "ft-b": 1.0}, "parents")
    import torch
    g = torch.Generator().manual_seed(3)
    dare3 = mk.merged((base, a, b, c), lambda k, xs: mk.task_vectors(
        xs[0], xs[1:], (0.5, 0.5, 0.5), lambda d: mk.bernoulli(d, 0.5, g), False, False))
    add("DARE-linear density 0.5, 3 parents", dare3, three, True, {"ft-a": 0.5, "ft-b": 0.5, "ft-c": 0.5}, "parents")
    other = independent(base, ids, seed=11)
    add("passthrough (blocks 0-1 base, 2-3 other)", derive("passthrough", base, tok, ids, other=other).model,
        {"base": base, "other": other}, False, [["base", 0], ["base", 1], ["other", 2], ["other", 3]], "layers")
    fr = [["other", 3], ["base", 0], ["base", 1], ["other", 1], ["base", 1], ["base", 3]]
    add("frankenmerge, 6 blocks reordered and repeated", stack({"base": base, "other": other}, fr, "base"),
        {"base": base, "other": other}, False, fr, "layers")
    add("null: fine-tune of ft-a", tuned(a, ids, 30, 1e-3, seed=9), two, True, {"ft-a": 1.0}, "single")
    add("null: independent model", other, two, True, {}, "none")
    return out


def dtype_bf16():
    import torch
    return torch.bfloat16


def judge(case: dict, res: dict) -> tuple[bool, str, str]:
    """(pass, the estimate shown, what was checked)."""
    truth, layers = case["truth"], res["layers"]
    if case["kind"] == "shares":
        err = max(abs(t["share"] - truth.get(t["model"], 0.0)) for lay in layers for t in lay["tested"])
        shown = ", ".join(f"{m} {v['mean_share']:+.3f}" for m, v in res["shares"].items())
        return err <= 0.1, shown, f"max |share - truth| {err:.4f} over {len(layers)} blocks"
    if case["kind"] == "parents":
        found = sorted(m for m in res["parents"] if res["shares"][m]["mean_share"] > 0)
        shown = ", ".join(f"{m} {v['mean_share']:+.3f}" for m, v in res["shares"].items())
        return found == sorted(truth) and res["kind"] == "sparse", shown, f"parents {found}, kind {res['kind']}"
    if case["kind"] == "layers":
        got = [[s["model"], s["layer"]] for lay in layers for s in lay["sources"][:1]]
        ok = got == case["truth"] and all(len(lay["sources"]) == 1 for lay in layers)
        return ok, " ".join(f"{m}:{i}" for m, i in got), f"{sum(x == y for x, y in zip(got, case['truth']))}/" \
            f"{len(case['truth'])} blocks: right model and block"
    if case["kind"] == "single":
        ok = res["kind"] in ("single", "related") and res["parents"] == ["ft-a"]
        return ok, f"ft-a {res['shares']['ft-a']['mean_share']:+.3f}", f"kind {res['kind']}, parents {res['parents']}"
    ok = res["kind"] == "none"
    return ok, "-", f"kind {res['kind']}, sources in {sum(bool(lay['sources']) for lay in layers)} blocks"


def calibration(base, fts, ids) -> list[str]:
    """Raw p-values of N_INDEPENDENT independent models' blocks: against (base, ft-a, ft-b), three nearly collinear
    regressors, and against one other independent model each (one regressor)."""
    import numpy as np

    from tracing.attribution import attribute
    from tracing.derivations.train import independent
    from tracing.sources import ModuleSource

    nulls = [ModuleSource(independent(base, ids, seed=100 + s)) for s in range(N_INDEPENDENT)]
    out = []
    for label, cands in (("(base, ft-a, ft-b)", lambda n: {"ft-a": fts["ft-a"], "ft-b": fts["ft-b"]}),
                         ("one other independent model", lambda n: {"other": nulls[(n + 1) % len(nulls)].model})):
        ps, sources = [], 0
        for n, src in enumerate(nulls):
            res = attribute(src, {k: ModuleSource(v) for k, v in cands(n).items()},
                            ModuleSource(base) if "ft-a" in cands(n) else None, align="no")
            ps += [t["log10_pvalue"] for lay in res["layers"] for t in lay["tested"]]
            sources += sum(len(lay["sources"]) for lay in res["layers"])
        ps = np.array(ps)
        cells = ", ".join(f"{int((ps <= np.log10(a)).sum())} at p <= {a:g} (expected {a * len(ps):.1f})"
                          for a in (0.01, 0.05, 0.2))
        out.append(f"| {label} | {len(ps)} | {cells} | 10^{ps.min():.2f} | {sources} |")
    return [f"Calibration under H0: the blocks of {N_INDEPENDENT} independent models (trained from other seeds on "
            "the same text, not aligned), each share tested against zero:", "",
            "| regressors | tests | raw p-values in the tail | smallest p | sources after Holm |",
            "|---|---|---|---|---|", *out]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="llama,qwen2")
    ap.add_argument("--figures", default=None, help="folder for one attribution figure per case")
    ap.add_argument("--markdown", default=None)
    args, head, t0 = start(ap)
    import sys

    import torch

    sys.path.insert(0, ROOT)
    from tracing import plots
    from tracing.attribution import attribute
    from tracing.sources import ModuleSource

    torch.set_num_threads(1)
    lines = ["| family | merge | truth | estimate (mean share over blocks) | checked | pass | kind found | s |",
             "|---|---|---|---|---|---|---|---|"]
    passed = total = 0
    extra = []
    figures = Path(args.figures or (Path(args.markdown).parent if args.markdown else "results/merges"))
    figures.mkdir(parents=True, exist_ok=True)
    for family in args.families.split(","):
        base, fts, tok, ids = models(family)
        for case in cases(base, fts, tok, ids):
            t1 = time.perf_counter()
            res = attribute(ModuleSource(case["model"]), {k: ModuleSource(v) for k, v in case["cands"].items()},
                            ModuleSource(case["base"]) if case["base"] is not None else None,
                            suspect_name=case["name"])
            seconds = time.perf_counter() - t1
            ok, shown, checked = judge(case, res)
            passed, total = passed + ok, total + 1
            truth = case["truth"] if case["kind"] != "layers" else " ".join(f"{m}:{i}" for m, i in case["truth"])
            lines.append(f"| {family} | {case['name']} | {truth} | {shown} | {checked} | {'yes' if ok else 'NO'} "
                         f"| {res['kind']} | {seconds:.2f} |")
            print(lines[-1], flush=True)
            if family == args.families.split(",")[0] and case["name"] in ("task arithmetic (1, 1)", "TIES density 0.5",
                                                                          "frankenmerge, 6 blocks reordered and "
                                                                          "repeated"):
                stem = case["name"].split(" (")[0].split(",")[0].replace(" ", "_").lower()
                plots.attribution_bars(res["layers"], str(figures / f"merges_{stem}.png"), title=res["summary"])
                extra.append(f"- `merges_{stem}.png`: {case['name']}: {res['summary']}")
        if family == args.families.split(",")[0]:
            extra = calibration(base, fts, ids) + ["", f"Figures (one stacked bar per block, written beside this "
                                                       f"file, {family}):"] + extra
    lines += ["", f"{passed}/{total} cases pass.", ""] + extra
    publish(lines, head, t0, args.markdown)
    return 0 if passed == total else 1


if __name__ == "__main__":
    raise SystemExit(main())
