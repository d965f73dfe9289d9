"""The same main.py runs from this checkout and from another one (e.g. before a refactor), on a 135M-shaped pair.

    python benchmarks/checkout_compare.py --baseline /tmp/old-checkout
    python benchmarks/checkout_compare.py --baseline /tmp/old-checkout --markdown docs/generated/checkout_compare.md

Builds a random-init Llama pair of the SmolLM2-135M shape (30 layers, hidden 576, MLP 1536, vocab 49152, tied
embeddings; float32 safetensors, 0.54 GB each): base, and derived = base + noise of 1% of each weight's std
(with --gguf also derived as a float32 GGUF file, compared with base by l2 streamed and loaded).
Each row runs `python main.py` in a fresh process from each checkout in turn, `--repeats` times, alternating,
and reports medians of the process's wall time and of the record's load_s, stat_s and peak_rss_mib (VmHWM,
reset when the run starts: imports not included). This checkout hashes each checkpoint's files for its record
(`tracing.checkpoints`): "first sight" runs get an empty digest cache, the other runs a cache already holding
both checkpoints' digests. Both checkouts give the same log10 p (checked). About 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import ROOT, publish, save_base_and_derived, start

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
             tie_word_embeddings=True, num_hidden_layers=30)
EVAL = ["--eval", "--dataset", "random", "--block_size", "64", "--max_blocks", "4"]
RUNS = {"csu (streamed)": ["--stat", "csu"],
        "csu --align (streamed)": ["--stat", "csu", "--align"],
        "csu --eval (loaded)": ["--stat", "csu", *EVAL]}
GGUF_RUNS = {"vs GGUF: l2 (streamed)": ["--stat", "l2"], "vs GGUF: l2 --eval (loaded)": ["--stat", "l2", *EVAL]}


def build(folder: Path, gguf: bool) -> tuple[str, str, str | None]:
    """base, derived (and with `gguf` derived as a float32 .gguf file) in `folder`."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).float()
    save_base_and_derived(model, folder)
    if not gguf:
        return str(folder / "base"), str(folder / "derived"), None
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from gguf_files import write_gguf

    from tracing import zoo

    write_gguf(model, zoo.build_tokenizer(zoo.synthetic_text(300, seed=0), vocab_size=128), folder / "derived.gguf")
    return str(folder / "base"), str(folder / "derived"), str(folder / "derived.gguf")


def run(checkout: Path, base: str, ft: str, extra: list[str], save: Path, cache: str) -> dict:
    cmd = [sys.executable, str(checkout / "main.py"), "--base_model_id", base, "--ft_model_id", ft, "--save",
           str(save / "record.pkl"), "--no_progress", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=checkout,
                          env=os.environ | {"MODEL_TRACING_CACHE": cache})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{checkout}: {' '.join(extra)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    rec = json.loads((save / "record.json").read_text())
    return {"wall_s": wall, "load_s": rec["load_s"], "stat_s": rec["stat_s"], "peak_rss_mib": rec["peak_rss_mib"],
            "log10_pvalue": rec["log10_pvalue"], "data_s": rec.get("data_s") or 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="the other checkout (a folder with main.py)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to build the models (default: a temporary folder)")
    ap.add_argument("--gguf", action="store_true", help="also base vs derived as a GGUF file (two more rows)")
    ap.add_argument("--markdown", default=None)
    args, head, t0 = start(ap)
    checkouts = {"baseline": Path(args.baseline).resolve(), "this": Path(ROOT)}
    lines = ["| run | checkout | wall (process) | load_s | stat_s | data_s | peak RSS | log10 p |",
             "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        base, ft, gguf = build(Path(tmp), args.gguf)
        warm = tempfile.mkdtemp(dir=tmp)
        runs = {label: (ft, extra) for label, extra in RUNS.items()} | \
            ({label: (gguf, extra) for label, extra in GGUF_RUNS.items()} if gguf else {})
        for other in {other for other, _ in runs.values()}:  # untimed: the page cache holds the files, the
            for checkout in checkouts.values():              # digest cache their hashes
                run(checkout, base, other, ["--stat", "l2"], Path(tmp), warm)
        for label, (other, extra) in runs.items():
            results: dict[str, list[dict]] = {"baseline": [], "this": [], "this, first sight": []}
            for _ in range(args.repeats):
                for who, checkout in checkouts.items():
                    results[who].append(run(checkout, base, other, extra, Path(tmp), warm))
                results["this, first sight"].append(run(checkouts["this"], base, other, extra, Path(tmp),
                                                        tempfile.mkdtemp(dir=tmp)))
            ps = {r["log10_pvalue"] for rs in results.values() for r in rs}  # l2 has none: {None}
            assert len(ps) == 1, f"{label}: the checkouts disagree: {ps}"
            for who, rs in results.items():
                med = {k: statistics.median(r[k] for r in rs) if k != "log10_pvalue" else rs[0][k] for k in rs[0]}
                lines.append(f"| {label} | {who} | {med['wall_s']:.2f} s | {med['load_s']:.2f} s | "
                             f"{med['stat_s']:.2f} s | {med['data_s']:.2f} s | {med['peak_rss_mib']:.0f} MiB | "
                             f"{'-' if med['log10_pvalue'] is None else round(med['log10_pvalue'], 1)} |")
                print(lines[-1], f"(walls {[round(r['wall_s'], 2) for r in rs]})", flush=True)
    publish(lines, head + f"; medians of {args.repeats} runs each", t0, args.markdown)


if __name__ == "__main__":
    main()
