"""Calibration of every matching statistic under H0: how often independent pairs get p < 0.05 and p < 0.01.

    python benchmarks/calibration.py                                   # 100 pairs of each kind (~5 min, 2 cores)
    python benchmarks/calibration.py --pairs 20 --trained_pairs 0      # a quick look
    python benchmarks/calibration.py --markdown docs/generated/calibration.md

Pairs of tiny Llamas (hidden 64, MLP 128, 2 layers, vocab 512), offline:
- random: two random initialisations (seeds 2k, 2k+1);
- trained: two models trained from their own random initialisation for --steps steps on the project's text,
  each in its own data order (the realistic null: both learn the same text);
- damaged: a random pair whose ft side is pruned (50% of MLP neurons zeroed), sparsified (50% of every
  weight), quantized (int4 round trip) or has 20% dead neurons (tracing.zoo.damage).
Statistics: csu, csu --align, csu_all, csh, match, match_all (activation statistics on 4 blocks of 64
tokens of held-out text), each with --matching fast and exact (damaged pairs: the default only). A valid
p-value has P(p < a) <= a: the table shows the observed fractions with 95% Clopper-Pearson intervals,
"ok" when the interval reaches down to a, and the smallest p.
"""

from __future__ import annotations

import argparse
import math

import bench_common

STATS = ("csu", "csu --align", "csu_all", "csh", "match", "match_all")
DAMAGED_STATS = ("csu", "csu --align", "csh", "match")
DAMAGES = (("pruned", 0.5), ("sparse", 0.5), ("int4", 0.0), ("dead", 0.2))
SHAPE = dict(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    import scipy.stats

    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(scipy.stats.beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(scipy.stats.beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def summarize(lps: list[float]) -> dict:
    n, valid = len(lps), [v for v in lps if not math.isnan(v)]
    out = {"n": n, "nan": n - len(valid), "min": min(valid) if valid else math.nan}
    for alpha in (0.05, 0.01):
        k = sum(v < math.log10(alpha) for v in valid)
        lo, hi = clopper_pearson(k, n)
        out[alpha] = (k, lo, hi, lo <= alpha)
    return out


def row(kind: str, stat: str, method: str, s: dict) -> str:
    cells = []
    for alpha in (0.05, 0.01):
        k, lo, hi, ok = s[alpha]
        cells.append(f"{k}/{s['n']} = {k / s['n']:.3f} [{lo:.3f}, {hi:.3f}] {'ok' if ok else '**too many**'}")
    return f"| {kind} | `{stat}` | {method} | {' | '.join(cells)} | {s['min']:.2f} | {s['nan']} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=100, help="random-init and damaged pairs")
    ap.add_argument("--trained_pairs", type=int, default=100, help="independently trained pairs (0: none)")
    ap.add_argument("--steps", type=int, default=60, help="training steps of each model of a trained pair")
    ap.add_argument("--markdown", help="write the table here (README embeds docs/generated/calibration.md)")
    args, head, t0 = bench_common.start(ap)

    import torch

    from tracing import zoo

    torch.set_num_threads(1)
    tok = zoo.build_tokenizer(zoo.synthetic_text(3000, seed=0), vocab_size=512)
    ids = torch.tensor(tok(zoo.synthetic_text(3000, seed=1))["input_ids"])
    blocks = torch.tensor(tok(zoo.synthetic_text(400, seed=2))["input_ids"])[:4 * 64].reshape(4, 64)
    shape = dict(vocab_size=len(tok), **SHAPE)
    results: dict = {}

    def run(kind: str, base, ft, stats, methods) -> None:
        for stat in stats:
            for method in methods:
                res = bench_common.log10p(stat, base, ft, blocks, matching=method, batch_size=4)
                results.setdefault((kind, stat, method), []).append(res.log10_pvalue)

    for k in range(args.pairs):
        base, other = (zoo.tiny_model("llama", seed=2 * k + s, **shape) for s in (0, 1))
        run("random", base, other, STATS, ("fast", "exact"))
        for name, frac in DAMAGES:
            ft = zoo.damage(zoo.tiny_model("llama", seed=2 * k + 1, **shape), name, frac)
            run(f"ft {name}" + (f" {frac:.0%}" if frac else ""), base, ft, DAMAGED_STATS, ("fast",))
        print(f"random and damaged pairs: {k + 1}/{args.pairs}", end="\r", flush=True)
    for k in range(args.trained_pairs):
        base, other = (zoo.finetune(zoo.tiny_model("llama", seed=10_000 + 2 * k + s, **shape), ids, steps=args.steps,
                                    lr=3e-3, seed=10_000 + 2 * k + s) for s in (0, 1))
        run(f"trained {args.steps} steps", base, other, STATS, ("fast", "exact"))
        print(f"trained pairs: {k + 1}/{args.trained_pairs}  ", end="\r", flush=True)

    lines = ["| pairs | statistic | --matching | p < 0.05: fraction [95% CI] | p < 0.01: fraction [95% CI] | "
             "smallest log10 p | no p-value |", "|---|---|---|---|---|---|---|"]
    lines += [row(kind, stat, method, summarize(lps)) for (kind, stat, method), lps in results.items()]
    bench_common.publish(lines, head, t0, args.markdown)


if __name__ == "__main__":
    main()
