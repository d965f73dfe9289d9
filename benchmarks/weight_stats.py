"""Benchmark of the weight statistics (csu, and csu after --permute --align), CPU, offline.

    python benchmarks/weight_stats.py                         # SmolLM2-135M shape, derived and independent
    python benchmarks/weight_stats.py --shape llama7b --layers 2 --pairs derived   # Llama-2-7B-sized layers
    python benchmarks/weight_stats.py --shape llama7b --layers 2 --markdown docs/generated/weight_stats_7b.md

Random-init Llama models: base; derived = base + Gaussian noise of 1% of each weight's std (a stand-in for
fine-tuning); independent = another initialisation. For each pair: csu on the pair as is, then the
derived/independent model's hidden units randomly permuted (`--permute`), aligned back (`--align`) and
csu again. Each pair runs in a fresh process; printed: wall times, peak RSS over the models' own memory
(VmHWM, reset after the models are built), the combined log10 p, and the worker threads used for the
per-layer linear assignments. Each configuration runs with --matching fast and exact (`--matching`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import bench_common

SHAPES = {  # vocab kept small for llama7b: the embedding is not what csu or the MLP alignment cost
    "smollm": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, vocab_size=49152),
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=8000),
}


def run_one(shape: str, layers: int | None, pair: str, device: str = "cpu", method: str = "fast") -> dict:
    import torch
    import transformers

    from tracing import matching
    from tracing.align import align_weights
    from tracing.arch import get_spec
    from tracing.perm import apply_perm, random_perm
    from tracing.statistics import StatContext, get_stat

    cfg = dict(SHAPES[shape])
    cfg["num_hidden_layers"] = layers or cfg["num_hidden_layers"]
    config = transformers.LlamaConfig(**cfg)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).float().eval()
    torch.manual_seed(1)
    other = transformers.LlamaForCausalLM(config).float().eval()
    if pair == "derived":
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p, q in zip(other.parameters(), base.parameters()):
                p.copy_(q + 0.01 * q.std() * torch.randn(q.shape, generator=g))
    base, other = base.to(device), other.to(device)
    spec = get_spec(config)
    csu = get_stat("csu").fn
    bench_common.reset_peak_rss()  # peak RSS from here on
    rss_models = bench_common.rss_mib("VmRSS")

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, round(time.perf_counter() - t0, 2)

    ctx = StatContext(base=base, ft=other, spec_base=spec, spec_ft=spec, progress=False, matching=method)
    plain, t_plain = timed(lambda: csu(ctx))
    apply_perm(other, spec, random_perm(spec, other.state_dict(), seed=3))
    permuted, t_permuted = timed(lambda: csu(ctx))
    perm, t_align = timed(lambda: align_weights(base, other, spec, progress=False, method=method))
    apply_perm(other, spec, perm)
    aligned, t_aligned = timed(lambda: csu(ctx))
    return {"shape": shape, "layers": cfg["num_hidden_layers"], "pair": pair, "matching": method,
            "mlp": f"{cfg['intermediate_size']}x{cfg['hidden_size']}",
            "csu_s": t_plain, "csu_log10p": plain.log10_pvalue,
            "permuted_csu_s": t_permuted, "permuted_csu_log10p": permuted.log10_pvalue,
            "align_s": t_align, "aligned_csu_s": t_aligned, "aligned_csu_log10p": aligned.log10_pvalue,
            "rss_models_mib": rss_models, "peak_rss_mib": bench_common.rss_mib("VmHWM"),
            "assignment_threads": matching.default_workers(), "torch_threads": torch.get_num_threads(),
            "device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm")
    ap.add_argument("--layers", type=int, default=None, help="number of layers (default: the shape's)")
    ap.add_argument("--pairs", nargs="+", choices=["derived", "independent"], default=["derived", "independent"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:n] (models move there after being built)")
    ap.add_argument("--matching", nargs="+", choices=["fast", "exact"], default=["fast", "exact"])
    ap.add_argument("--markdown", help="write the table here (README embeds docs/generated/<name>.md)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process mode
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.shape, args.layers, args.pairs[0], args.device, args.matching[0])), flush=True)
        return
    head = bench_common.header()
    print(head, flush=True)
    t0 = time.perf_counter()
    rows = []
    for pair, method in ((p, m) for p in args.pairs for m in args.matching):
        cmd = [sys.executable, os.path.abspath(__file__), "--one", "--shape", args.shape, "--pairs", pair,
               "--device", args.device, "--matching", method]
        cmd += ["--layers", str(args.layers)] if args.layers else []
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        rows.append(row)
        print(f"{row['shape']} x{row['layers']} {row['pair']:11s} {method:5s} csu {row['csu_s']:6.2f}s "
              f"(log10 p {row['csu_log10p']:.1f}) | permuted {row['permuted_csu_s']:6.2f}s "
              f"({row['permuted_csu_log10p']:.1f}) | align {row['align_s']:6.2f}s | aligned csu "
              f"{row['aligned_csu_s']:6.2f}s ({row['aligned_csu_log10p']:.1f}) | peak RSS {row['peak_rss_mib']} MiB "
              f"(models {row['rss_models_mib']} MiB)", flush=True)
    lines = ["| shape | device | pair | --matching | csu | csu, ft permuted | `--align` | csu after align | "
             "peak RSS (models) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} x {r['layers']} layers ({r['mlp']}) | {r['device']} | {r['pair']} | "
                     f"{r['matching']} | {r['csu_s']:.2f} s ({r['csu_log10p']:.1f}) | "
                     f"{r['permuted_csu_s']:.2f} s ({r['permuted_csu_log10p']:.1f}) | {r['align_s']:.2f} s | "
                     f"{r['aligned_csu_s']:.2f} s ({r['aligned_csu_log10p']:.1f}) | {r['peak_rss_mib']} MiB "
                     f"({r['rss_models_mib']}) |")
    bench_common.publish(lines, head, t0, args.markdown)


if __name__ == "__main__":
    main()
