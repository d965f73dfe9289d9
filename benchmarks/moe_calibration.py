"""Calibration of the MoE statistics under H0: how often independent MoE pairs (and MoE vs dense) get p < 0.05, 0.01.

    python benchmarks/moe_calibration.py                          # 40 pairs (csu_all: 20), ~30 min on 2 busy cores
    python benchmarks/moe_calibration.py --pairs 20 --all_pairs 10    # a quick look
    python benchmarks/moe_calibration.py --markdown docs/generated/moe_calibration.md

Pairs, offline, tiny Mixtrals (hidden 64, 2 layers, 16 experts of 64 neurons: the router test runs, >= 10 experts):
- random: two random initialisations;
- upcycled: each side upcycled (tracing/recipes.py, noise 1%, its own router seed) from its own random dense Llama,
  then fine-tuned on the project's text in its own data order (experts that are near-copies of one MLP on both
  sides: the case that makes the tests of a layer's experts dependent);
- damaged: random pairs with experts 1-15 of every block zeroed, or copies of expert 0, on both sides;
- dense vs MoE: an independent dense Llama against an upcycled MoE (csu_all, both directions).
Statistics: csu, csu --align, csh (4 blocks of 64 tokens), csu_all. A valid p-value has P(p < a) <= a: the table
shows the observed fractions with 95% Clopper-Pearson intervals and the smallest p.
"""

from __future__ import annotations

import argparse
import math

import bench_common
from calibration import clopper_pearson

SHAPE = dict(hidden=64, layers=2, intermediate=64, heads=4, kv_heads=2, n_experts=16, vocab_size=512)


def main() -> None:
    import torch

    from tracing import recipes, zoo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--all_pairs", type=int, default=20, help="pairs for csu_all (every expert against every expert)")
    ap.add_argument("--markdown", default=None)
    args, head, t0 = bench_common.start(ap)
    tok = zoo.build_tokenizer(zoo.synthetic_text(3000, seed=0), vocab_size=512)
    text = torch.tensor(tok(zoo.synthetic_text(1500, seed=1))["input_ids"])
    blocks = text[:4 * 64].reshape(4, 64)
    dense_shape = {k: v for k, v in SHAPE.items() if k != "n_experts"}
    results: dict[str, list[float]] = {}

    def record(name: str, stat: str, base, ft) -> None:
        res = bench_common.log10p(stat, base, ft, blocks)
        results.setdefault(f"{name} | `{stat}`", []).append(res.log10_pvalue)

    for k in range(args.pairs):
        a, b = (zoo.tiny_model("mixtral", seed=10_000 + 2 * k + j, **SHAPE) for j in (0, 1))
        dense = [zoo.tiny_model("llama", seed=20_000 + 2 * k + j, **dense_shape) for j in (0, 1)]
        up = [zoo.finetune(recipes.upcycle(d, 16, noise=0.01, seed=2 * k + j), text, steps=3, block_size=32, seed=j)
              for j, d in enumerate(dense)]  # each side its own router and noise (a shared seed would relate them)
        damaged = {kind: [recipes.damage_experts(m, kind, list(range(1, 16))) for m in (a, b)]
                   for kind in ("zero", "duplicate")}
        pairs = {"random": (a, b), "upcycled": tuple(up), **{f"experts {k}": p for k, p in damaged.items()}}
        for name, (x, y) in pairs.items():
            for stat in ("csu", "csu --align", "csh"):
                record(name, stat, x, y)
            if k < args.all_pairs:
                record(name, "csu_all", x, y)
        if k < args.all_pairs:
            record("dense vs MoE", "csu_all", dense[0], up[1])
            record("MoE vs dense", "csu_all", up[0], dense[1])
        print(f"pair {k + 1}/{args.pairs}", flush=True)

    lines = [f"Independent pairs of tiny Mixtrals ({SHAPE['n_experts']} experts of {SHAPE['intermediate']} neurons, "
             f"hidden {SHAPE['hidden']}, {SHAPE['layers']} layers); `csu_all` on the first {args.all_pairs}:\n",
             "| pairs | statistic | n | p < 0.05 (95% CI) | p < 0.01 (95% CI) | smallest log10 p |",
             "|---|---|---|---|---|---|"]
    for key, lps in results.items():
        cells = []
        for a in (0.05, 0.01):
            hits = sum(v < math.log10(a) for v in lps)
            lo, hi = clopper_pearson(hits, len(lps))
            cells.append(f"{hits / len(lps):.2f} ({lo:.2f}-{hi:.2f}){'' if lo <= a else ' **high**'}")
        lines.append(f"| {key} | {len(lps)} | {cells[0]} | {cells[1]} | {min(lps):.2f} |")
    bench_common.publish(lines, head, t0, args.markdown)


if __name__ == "__main__":
    main()
