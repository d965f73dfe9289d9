"""Peak memory of weight statistics streamed from disk vs loaded models, at two depths (CPU, offline).

    python benchmarks/streaming.py                                   # SmolLM2-135M shape at 8 and 32 layers
    python benchmarks/streaming.py --markdown docs/generated/streaming.md

Builds a random-init Llama pair with the SmolLM2-135M shape (hidden 576, MLP 1536, 9/3 heads, vocab 49152,
tied embeddings; 135M parameters at 30 layers) at each depth, saved as float32 safetensors: base, and
derived = base + noise of 1% of each weight's std. Each configuration runs in a fresh process:
- streamed: `python main.py --stat csu [--align]` (tensors read from the files one layer at a time);
- loaded: both models loaded whole with `load_model` (float32, as before streaming), then the same statistic.
Peak RSS is the process's VmHWM, reset when the run starts (it includes the ~300 MiB of imports). About
2 minutes on 2 cores; the models (1.7 GB at 32 layers) are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench_common import save_base_and_derived

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
             tie_word_embeddings=True)
STATS = {"csu": [], "csu --align": ["--align"]}


def build(folder: Path, layers: int) -> tuple[str, str]:
    """Base and derived checkpoints (float32 safetensors) of `layers` layers in `folder`."""
    import torch
    import transformers

    config = transformers.LlamaConfig(num_hidden_layers=layers, **SHAPE)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    save_base_and_derived(model, folder)
    return str(folder / "base"), str(folder / "derived")


def run_loaded(base: str, ft: str, align: bool) -> dict:
    """Child process: load both models whole, then the statistic (the path weight statistics took before)."""
    from tracing.align import align_weights
    from tracing.devices import peak_memory_mib, reset_peak_memory, return_freed_memory
    from tracing.models import load_model
    from tracing.perm import apply_perm
    from tracing.statistics import StatContext, get_stat

    return_freed_memory()
    reset_peak_memory()
    t0 = time.perf_counter()
    a, _ = load_model(base, device="cpu", progress=False)
    b, _ = load_model(ft, device="cpu", progress=False)
    load_s = time.perf_counter() - t0
    ctx = StatContext(base=a, ft=b, progress=False)
    res = get_stat("csu").fn(ctx)
    if align:
        apply_perm(b, ctx.spec_ft, align_weights(a, b, ctx.spec_base, progress=False))
        res = get_stat("csu").fn(ctx)
    return {"load_s": load_s, "stat_s": time.perf_counter() - t0 - load_s, "peak_rss_mib": peak_memory_mib()[0],
            "log10_pvalue": res.log10_pvalue}


def run_streamed(base: str, ft: str, extra: list[str], save: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "main.py"), "--base_model_id", base, "--ft_model_id", ft, "--stat", "csu",
           "--save", str(save / "record.pkl"), "--no_progress", *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    rec = json.loads((save / "record.json").read_text())
    p = rec["aligned_log10_pvalue"] if extra else rec["log10_pvalue"]
    return {k: rec[k] for k in ("load_s", "stat_s", "peak_rss_mib")} | {"log10_pvalue": p}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 32], help="depths to build (default 8 32)")
    ap.add_argument("--modes", nargs="+", choices=["streamed", "loaded"], default=["streamed", "loaded"])
    ap.add_argument("--dir", default=None, help="where to build the models (default: a temporary folder)")
    ap.add_argument("--markdown", default=None, help="also write the table here (e.g. docs/generated/streaming.md)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # BASE FT ALIGN: one loaded run
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_loaded(args.child[0], args.child[1], args.child[2] == "1")), flush=True)
        return
    started = datetime.now(timezone.utc)
    head = (f"`{shlex.join(['python', 'benchmarks/streaming.py', *sys.argv[1:]])}` on {started:%Y-%m-%d %H:%M} UTC, "
            f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(head, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for layers in args.layers:
            folder = Path(tmp) / f"x{layers}"
            base, ft = build(folder, layers)
            for stat, extra in STATS.items():
                for mode in args.modes:
                    if mode == "loaded":
                        cmd = [sys.executable, __file__, "--child", base, ft, "1" if extra else "0"]
                        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                        r = json.loads(out.strip().splitlines()[-1])
                    else:
                        r = run_streamed(base, ft, extra, folder)
                    rows.append(dict(layers=layers, stat=stat, mode=mode, **r))
                    print(f"{layers:3d} layers  {stat:12s} {mode:9s} peak RSS {r['peak_rss_mib']:6.0f} MiB  "
                          f"load {r['load_s']:5.2f} s  statistic {r['stat_s']:6.2f} s  "
                          f"log10 p {r['log10_pvalue']:.1f}", flush=True)
            subprocess.run(["rm", "-rf", str(folder)], check=True)
    lines = ["| layers | statistic | weights | peak RSS | load | statistic time | log10 p |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layers']} | `{r['stat']}` | {r['mode']} | {r['peak_rss_mib']:.0f} MiB | "
                     f"{r['load_s']:.2f} s | {r['stat_s']:.2f} s | {r['log10_pvalue']:.1f} |")
    table = "\n".join(lines) + f"\n\n{head}; took {(datetime.now(timezone.utc) - started).seconds} s.\n"
    print(table)
    if args.markdown:
        from tracing.docs import write_markdown

        print(f"wrote {write_markdown(args.markdown, table)}")


if __name__ == "__main__":
    main()
