"""Benchmark of the activation statistics (match, csh) on a model with the SmolLM2-135M shape, CPU, offline.

    python benchmarks/activation_stats.py                # match and csh on 512 and 2048 tokens
    python benchmarks/activation_stats.py --n_layers 4   # quick smoke run on a shallower model

A random-init Llama (hidden 576, MLP 1536, 30 layers, 9 heads, 3 KV heads, vocab 49152) is the base; the
derived model is base + small Gaussian noise, then a random rotation of its residual stream (so weight
statistics such as csu fail, and only activation statistics can see the relation). Every configuration runs
in a fresh subprocess; after the two models are built, the kernel's peak-RSS counter (VmHWM) is reset
through /proc/self/clear_refs, so "peak RSS" is the peak of the statistic itself with both models loaded.
Reported: wall time of the statistic, forward passes per model, peak RSS, RSS with the models loaded,
seconds spent in linear assignment, and the combined log10 p.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                    tie_word_embeddings=True, rms_norm_eps=1e-5)
BLOCK_SIZE = 128


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def build_pair(n_layers: int, seed: int = 0, independent: bool = False):
    """Random-init base with the SmolLM2-135M shape and a derived copy (noise, then residual rotation),
    or with `independent` a second model from another random initialisation."""
    import torch
    import transformers

    from tracing.arch import get_spec
    from tracing.transforms import rotate_residual

    cfg = transformers.LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": n_layers})
    torch.manual_seed(seed)
    base = transformers.LlamaForCausalLM(cfg).float().eval()
    if independent:
        torch.manual_seed(seed + 100)
        return base, transformers.LlamaForCausalLM(cfg).float().eval()
    derived = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in derived.parameters():
            p.add_(0.01 * p.std() * torch.randn(p.shape, generator=g))
    rotate_residual(derived, get_spec(derived.config), seed=seed + 2)
    return base, derived


def run_one(stat: str, n_blocks: int, n_layers: int, batch_size: int, independent: bool = False,
            device: str = "cpu") -> dict:
    """Build the pair, then time one statistic (meant to run in a fresh process)."""
    import gc

    import torch

    from tracing.arch import get_spec
    from tracing.statistics import StatContext, get_stat

    base, derived = (m.to(device) for m in build_pair(n_layers, independent=independent))
    blocks = torch.randint(0, SMOLLM2_135M["vocab_size"], (n_blocks, BLOCK_SIZE),
                           generator=torch.Generator().manual_seed(0))  # (n_blocks, T)
    ctx = StatContext(base=base, ft=derived, spec_base=get_spec(base.config), spec_ft=get_spec(derived.config),
                      blocks=blocks, batch_size=batch_size, progress=False)
    info = get_stat(stat)
    gc.collect()
    rss_models = _rss_kib("VmRSS")
    reset = _reset_peak_rss()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = info.fn(ctx)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")  # since the reset, or since start when the kernel refused the reset
    return {"stat": stat, "pair": "independent" if independent else "derived", "tokens": int(blocks.numel()),
            "layers": n_layers, "wall_s": round(wall, 2),
            "forward_passes_per_model": res.extras["forward_passes"],
            "lap_s": round(res.extras["lap_seconds"], 2),
            "rss_models_mib": round(rss_models / 1024), "peak_rss_mib": round(peak / 1024),
            "peak_reset": reset, "log10_pvalue": res.log10_pvalue, "threads": torch.get_num_threads(),
            "device": device, "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stats", nargs="+", default=["match", "csh"])
    ap.add_argument("--n_blocks", nargs="+", type=int, default=[4, 16], help="blocks of 128 tokens")
    ap.add_argument("--n_layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    ap.add_argument("--batch_size", type=int, default=4, help="blocks per forward pass")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--independent", action="store_true", help="an independent pair instead of a derived one")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:n] (models move there after being built)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process mode
    args = ap.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.stats[0], args.n_blocks[0], args.n_layers, args.batch_size,
                                 args.independent, args.device)), flush=True)
        return
    rows = []
    for stat in args.stats:
        for nb in args.n_blocks:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", "--stats", stat, "--n_blocks", str(nb),
                   "--n_layers", str(args.n_layers), "--batch_size", str(args.batch_size)]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            cmd += ["--independent"] if args.independent else []
            cmd += ["--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(f"{row['stat']:6s} {row['pair']} tokens={row['tokens']:5d} wall={row['wall_s']:6.2f}s "
                  f"passes/model={row['forward_passes_per_model']} lap={row['lap_s']:5.2f}s "
                  f"peak_rss={row['peak_rss_mib']} MiB (models loaded: {row['rss_models_mib']} MiB) "
                  f"log10p={row['log10_pvalue']:.1f}"
                  + (f" peak_gpu={row['peak_gpu_mib']} MiB" if row["peak_gpu_mib"] is not None else ""), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
