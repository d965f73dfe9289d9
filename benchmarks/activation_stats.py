"""Benchmark of the activation statistics (match, csh, match_all) on models with the SmolLM2-135M shape, CPU.

    python benchmarks/activation_stats.py                # every row, both --matching methods (~25 min, 2 cores)
    python benchmarks/activation_stats.py --quick        # without the slow exact rows (~5 min)
    python benchmarks/activation_stats.py --n_layers 4   # smoke run on shallower models
    python benchmarks/activation_stats.py --markdown docs/generated/activation_stats.md

Models (Llama, hidden 576, MLP 1536, 30 layers, 9/3 heads, vocab 49152), built offline:
- derived: a random-init base and base + 1% noise, then a random rotation of its residual stream;
- independent: two random initialisations (the easy unrelated case: exact assignment is fast on them);
- unrelated, trained-like: two random initialisations given heavy-tailed neuron and residual gains
  (bench_common.heavy_tailed), the structure that makes exact assignment ~10x slower, as between a trained
  model and an unrelated one (benchmarks/matching.py measures that on real trained models);
- pruned: the trained-like base against its pruned derivative, every third layer removed and a third of
  the MLP neurons (smallest norms) dropped, no healing: 30 x 20 layers, MLP 1536 -> 1024 (match_all).
Random tokens in blocks of 128, 4 blocks per forward pass. Every row runs in a fresh process; peak RSS is
VmHWM reset after both models are built (the statistic's own peak on top of the models).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import bench_common

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                    tie_word_embeddings=True, rms_norm_eps=1e-5)
BLOCK_SIZE = 128
# (statistic, pair, blocks of 128 tokens, --matching); "slow" rows are left out by --quick
ROWS = [("match", "derived", 4, "fast"), ("match", "derived", 4, "exact"), ("match", "derived", 16, "fast"),
        ("csh", "derived", 4, "fast"),
        ("match", "independent", 4, "fast"), ("match", "independent", 4, "exact"),
        ("match", "trained-like", 4, "fast"), ("match", "trained-like", 4, "exact"),
        ("csh", "trained-like", 4, "fast"), ("csh", "trained-like", 4, "exact"),
        ("match_all", "pruned", 4, "fast"), ("match_all", "pruned", 4, "exact")]
SLOW = {("match", "trained-like", 4, "exact"), ("match_all", "pruned", 4, "exact")}


def build_pair(pair: str, n_layers: int):
    """(base, ft) for one kind of pair (module docstring)."""
    import torch
    import transformers

    from tracing import zoo
    from tracing.arch import get_spec
    from tracing.transforms import rotate_residual

    cfg = transformers.LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": n_layers})
    model = lambda seed: (torch.manual_seed(seed), transformers.LlamaForCausalLM(cfg).float().eval())[1]
    base = model(0)
    if pair == "independent":
        return base, model(100)
    if pair in ("trained-like", "pruned"):
        base = bench_common.heavy_tailed(base, seed=1)
        if pair == "trained-like":
            return base, bench_common.heavy_tailed(model(100), seed=101)
        return base, zoo.prune(base, [i for i in range(n_layers) if i % 3 != 2], 2 / 3)
    derived = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in derived.parameters():
            p.add_(0.01 * p.std() * torch.randn(p.shape, generator=g))
    rotate_residual(derived, get_spec(derived.config), seed=2)
    return base, derived


def run_one(stat: str, pair: str, n_blocks: int, matching: str, n_layers: int, batch_size: int,
            device: str = "cpu") -> dict:
    """Build the pair, then time one statistic (meant to run in a fresh process)."""
    import gc

    import torch

    from tracing.arch import get_spec
    from tracing.statistics import StatContext, get_stat

    base, ft = (m.to(device) for m in build_pair(pair, n_layers))
    blocks = torch.randint(0, SMOLLM2_135M["vocab_size"], (n_blocks, BLOCK_SIZE),
                           generator=torch.Generator().manual_seed(0))  # (n_blocks, T)
    ctx = StatContext(base=base, ft=ft, spec_base=get_spec(base.config), spec_ft=get_spec(ft.config),
                      blocks=blocks, batch_size=batch_size, progress=False, matching=matching)
    gc.collect()
    rss_models = bench_common.rss_mib("VmRSS")
    bench_common.reset_peak_rss()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = get_stat(stat).fn(ctx)
    if cuda:
        torch.cuda.synchronize()
    passes = res.extras["forward_passes"]
    solvers = [r.get("solver") for r in res.per_layer] if stat != "match_all" else []
    return {"stat": stat, "pair": pair, "tokens": int(blocks.numel()), "matching": matching,
            "layers": f"{base.config.num_hidden_layers}x{ft.config.num_hidden_layers}",
            "wall_s": round(time.perf_counter() - t0, 2), "lap_s": round(res.extras["lap_seconds"], 2),
            "passes": passes if isinstance(passes, int) else passes["base"],
            "exact_layers": sum(s == "greedy+lap" for s in solvers) if matching == "fast" else None,
            "rss_models_mib": rss_models, "peak_rss_mib": bench_common.rss_mib("VmHWM"),
            "log10_pvalue": res.log10_pvalue, "threads": torch.get_num_threads(), "device": device,
            "mapped": sum(m is not None for m in res.extras.get("mapping", [])) if stat == "match_all" else None,
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None}


def table(rows: list[dict], head: str) -> str:
    lines = ["| statistic | pair | tokens | --matching | wall time | time in matching (threads summed) | "
             "forward passes / model | peak RSS (models loaded) | log10 p |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = f" ({r['exact_layers']} layers exact)" if r["exact_layers"] else ""
        note += f", {r['mapped']} of {r['layers'].split('x')[1]} ft layers mapped" if r["mapped"] is not None else ""
        lines.append(f"| `{r['stat']}` | {r['pair']} ({r['layers']}) | {r['tokens']} | {r['matching']} | "
                     f"{r['wall_s']:.1f} s | {r['lap_s']:.1f} s{note} | {r['passes']} | "
                     f"{r['peak_rss_mib']} MiB ({r['rss_models_mib']} MiB) | {r['log10_pvalue']:.1f} |")
    return "\n".join(lines) + f"\n\n{head}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="leave out the slow exact rows")
    ap.add_argument("--n_layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    ap.add_argument("--batch_size", type=int, default=4, help="blocks per forward pass")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:n] (models move there after being built)")
    ap.add_argument("--markdown", help="write the table here (README embeds docs/generated/activation_stats.md)")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # child process: stat pair n_blocks matching
    args = ap.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.one:
        stat, pair, n_blocks, matching = args.one
        print(json.dumps(run_one(stat, pair, int(n_blocks), matching, args.n_layers, args.batch_size, args.device)))
        return
    head = bench_common.header()
    print(head, flush=True)
    t0 = time.perf_counter()
    rows = []
    for stat, pair, n_blocks, matching in ROWS:
        if args.quick and (stat, pair, n_blocks, matching) in SLOW:
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--one", stat, pair, str(n_blocks), matching,
               "--n_layers", str(args.n_layers), "--batch_size", str(args.batch_size), "--device", args.device]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(table(rows[-1:], "").splitlines()[-3], flush=True)
    text = table(rows, f"{head}; took {time.perf_counter() - t0:.0f} s.")
    print("\n" + text)
    if args.markdown:
        from tracing.docs import write_markdown

        print(f"wrote {write_markdown(args.markdown, text)}")


if __name__ == "__main__":
    main()
