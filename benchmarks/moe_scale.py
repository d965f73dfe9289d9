"""An OLMoE-1B-7B-shaped bf16 pair streamed with `csu` in bounded RAM; per-expert costs, and a DeepSeek-V3 projection.

    python benchmarks/moe_scale.py --dir /work/tmp-moe --markdown docs/generated/moe_scale.md   # ~28 GB, ~15 min
    python benchmarks/moe_scale.py --dir /work/tmp-moe --layers 1 --lock ''   # a quick check (~2.3 GB, 1 min)

Builds base (random init, std 0.02, norms 1) and derived (base + noise of 1% of each weight's std) with the shape of
OLMoE-1B-7B (hidden 2048, 16 layers, 64 experts of 1024 neurons, 16 heads, vocab 50304, untied head; 6.9B
parameters), bf16, stored as the released checkpoint is: one tensor per expert and projection
(`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`), 2 GiB shards with an index, never a whole model in memory
(~28 GB on disk, deleted afterwards). Then, with the page cache of both checkpoints dropped (cold reads):
- the read floor: every tensor csu reads (each expert's gate and up: the model's fused `gate_up_proj`), read once;
- `python main.py --stat csu` in a fresh process: wall time, read volume, peak RSS (its record);
and the per-expert costs (time, bytes read, memory) scaled to a DeepSeek-V3-sized pair (671B parameters, 61 layers:
58 MoE layers of 256 experts of 2048 neurons x hidden 7168, one shared expert, 3 dense layers of 18432).
The timed sections take `--lock` exclusively (the shared machine's benchmark lock); building holds it shared (so
do not wrap the script in flock yourself).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from bench_common import ROOT, publish, start
from safetensors import safe_open
from stream_7b import _flush, drop_cache

SHAPE = dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=50304, tie_word_embeddings=False, max_position_embeddings=4096)
SHARD_BYTES = 2 << 30
# DeepSeek-V3: 61 layers (the first 3 dense, MLP 18432), 256 routed experts of 2048 and 1 shared, hidden 7168
DSV3 = dict(layers=61, dense=3, experts=256, width=2048, hidden=7168, dense_width=18432, params=671e9)


@contextmanager
def locked(path: str | None, exclusive: bool):
    """Hold the shared machine's benchmark lock (exclusive for timed sections); nothing without a path."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tensors(layers: int):
    """(key, shape) of an OLMoE checkpoint as released (per-expert tensors), in save order."""
    h, m, v, n = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"], SHAPE["num_experts"]
    yield "model.embed_tokens.weight", (v, h)
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj in "qkvo":
            yield f"{p}.self_attn.{proj}_proj.weight", (h, h)
        yield f"{p}.self_attn.q_norm.weight", (h,)
        yield f"{p}.self_attn.k_norm.weight", (h,)
        yield f"{p}.mlp.gate.weight", (n, h)
        for e in range(n):
            yield f"{p}.mlp.experts.{e}.gate_proj.weight", (m, h)
            yield f"{p}.mlp.experts.{e}.up_proj.weight", (m, h)
            yield f"{p}.mlp.experts.{e}.down_proj.weight", (h, m)
        yield f"{p}.input_layernorm.weight", (h,)
        yield f"{p}.post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def build(folder: Path, layers: int) -> tuple[Path, Path]:
    """Write base and derived as sharded bf16 safetensors with an OlmoeConfig; one shard of each in memory."""
    import transformers

    config = transformers.OlmoeConfig(num_hidden_layers=layers, **SHAPE)
    dirs = (folder / "base", folder / "derived")
    for d in dirs:
        d.mkdir(parents=True)
        config.save_pretrained(d)
    g = torch.Generator().manual_seed(0)
    shards: list[tuple[dict, dict]] = [({}, {})]
    size = 0
    for key, shape in tensors(layers):
        base = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g).mul_(0.02)
        noise = torch.randn(shape, generator=g).mul_(0.01 * float(base.std()) if len(shape) > 1 else 0.01)
        for part, t in zip(shards[-1], (base, base + noise)):
            part[key] = t.bfloat16()
        size += 2 * math.prod(shape)
        if size >= SHARD_BYTES:
            _flush(shards, dirs, final=False)
            shards.append(({}, {}))
            size = 0
    _flush(shards, dirs, final=True)
    return dirs


def read_floor(dirs: tuple[Path, Path], layers: int) -> tuple[float, float]:
    """(seconds, GiB) to read every expert's gate and up tensors of both checkpoints once, cold."""
    drop_cache(*dirs)
    keys = [f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight" for i in range(layers)
            for e in range(SHAPE["num_experts"]) for p in ("gate", "up")]
    t0, total = time.perf_counter(), 0
    for d in dirs:
        where = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        for key in keys:
            with safe_open(str(d / where[key]), "pt") as f:
                total += f.get_tensor(key).clone().numel() * 2
    return time.perf_counter() - t0, total / 2 ** 30


def run_main(dirs: tuple[Path, Path], save: Path, *flags: str) -> dict:
    drop_cache(*dirs)
    cmd = [sys.executable, str(Path(ROOT) / "main.py"), "--base_model_id", str(dirs[0]), "--ft_model_id",
           str(dirs[1]), "--stat", "csu", *flags, "--save", str(save / "record.pkl"), "--no_progress"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    rec = json.loads((save / "record.json").read_text())
    rec["process_s"] = time.perf_counter() - t0  # with Python's start and imports
    return rec


def project(rec: dict, floor_s: float, floor_gib: float, layers: int) -> list[str]:
    """Per-expert costs of this run, scaled to a DeepSeek-V3-sized pair (markdown lines): bytes from the shapes (each
    routed expert's gate and up, each shared expert's and dense layer's up, both models, bf16) at this disk's cold
    rate; arithmetic (cosine product and matching) by n² d per matrix; memory by the per-worker n x n similarity."""
    n, m, h = SHAPE["num_experts"], SHAPE["intermediate_size"], SHAPE["hidden_size"]
    per_expert_s = rec["stat_s"] / (layers * n)
    gib_per_expert = rec["read_gib"] / (layers * n)  # both models, gate and up (bf16)
    d = DSV3
    moe_layers = d["layers"] - d["dense"]
    routed = moe_layers * d["experts"]
    read = 2 * 2 * d["hidden"] * (routed * 2 * d["width"] + moe_layers * d["width"] + d["dense"] * d["dense_width"])
    read /= 2 ** 30
    per = d["width"] ** 2 * d["hidden"] / (m ** 2 * h)  # an expert of DeepSeek-V3 vs one of OLMoE
    per_dense = d["dense_width"] ** 2 * d["hidden"] / (m ** 2 * h)
    hours = per_expert_s * ((routed + moe_layers) * per + d["dense"] * per_dense) / 3600
    worker_mib = (d["dense_width"] ** 2 - m ** 2) * 12 / 2 ** 20  # per worker: float32 similarity, float64 copy
    return [
        f"\nPer expert (both models): {per_expert_s * 1e3:.0f} ms of the statistic, {gib_per_expert * 1024:.1f} MiB "
        "read (gate and up: the model's fused gate_up_proj), one expert of each model in memory at a time.\n",
        f"Projected for a DeepSeek-V3-sized pair ({d['params'] / 1e9:.0f}B parameters, {moe_layers} MoE layers x "
        f"{d['experts']} experts of {d['width']} x {d['hidden']} and one shared expert each, {d['dense']} dense layers "
        f"of {d['dense_width']}) from these per-expert costs (same machine and workers; bf16 weights):\n",
        "| run | tests | reads | read floor at this disk's cold rate | statistic's arithmetic | peak RSS |",
        "|---|---|---|---|---|---|",
        f"| `csu` | {routed} experts, {moe_layers} routers and shared experts, {d['dense']} dense | {read:.0f} GiB | "
        f"{read * floor_s / floor_gib / 60:.0f} min | {hours:.1f} h on these cores | "
        f"{(rec['peak_rss_mib'] + 2 * worker_mib) / 1024:.1f} GiB |",
        "\nDerived pairs match at once (every neuron's best partner distinct); an unrelated pair needs the greedy "
        "rounds too (benchmarks/matching.py). The released DeepSeek-V3 stores FP8 weights with per-block scales "
        "(`weight_scale_inv`), which sources do not dequantize yet: the projection is for a bf16 copy.\n"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/work/tmp-moe", help="where to build the pair (deleted afterwards)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--lock", default="/work/cpu.lock", help="the benchmark lock ('' for none)")
    ap.add_argument("--keep", action="store_true", help="keep the built pair (and reuse one found in --dir)")
    ap.add_argument("--markdown", default=None)
    args, head, t0 = start(ap)
    folder = Path(args.dir)
    need = 2 * sum(2 * math.prod(s) for _, s in tensors(args.layers)) / 2 ** 30
    try:
        if not (args.keep and (folder / "derived" / "model.safetensors.index.json").is_file()):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            free = shutil.disk_usage(folder).free / 2 ** 30
            if free < need + 5:
                sys.exit(f"{folder}: {free:.0f} GiB free, the pair needs {need:.0f} GiB (+5 spare)")
            with locked(args.lock, exclusive=False):
                t = time.perf_counter()
                dirs = build(folder, args.layers)
                print(f"built the pair ({need:.1f} GiB) in {time.perf_counter() - t:.0f} s", flush=True)
        dirs = (folder / "base", folder / "derived")
        with locked(args.lock, exclusive=True):
            floor_s, floor_gib = read_floor(dirs, args.layers)
            rec = run_main(dirs, folder)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"csu: wall {rec['wall_time_s']:.1f} s, read {rec['read_gib']:.1f} GiB, peak RSS {rec['peak_rss_mib']:.0f} "
          f"MiB, log10 p {rec['log10_pvalue']:.1f}; read floor {floor_s:.1f} s for {floor_gib:.1f} GiB", flush=True)
    n_tests = rec["extras"]["n_tests"]
    lines = [f"OLMoE-1B-7B-shaped pair ({args.layers} layers x {SHAPE['num_experts']} experts of "
             f"{SHAPE['intermediate_size']} x {SHAPE['hidden_size']}, bf16, {need:.0f} GiB on disk in the released "
             "per-expert layout), base vs derived (1% noise), page cache dropped:\n",
             "| run | wall (process) | load | read floor, cold | wall / floor | read in the run | peak RSS | tests | "
             "result |", "|---|---|---|---|---|---|---|---|---|",
             f"| `csu` | {rec['wall_time_s']:.1f} s ({rec['process_s']:.1f} s) | {rec['load_s']:.2f} s | "
             f"{floor_s:.1f} s for {floor_gib:.1f} GiB | {rec['wall_time_s'] / floor_s:.1f} | {rec['read_gib']:.1f} GiB"
             f" | {rec['peak_rss_mib']:.0f} MiB | {n_tests} ({args.layers * SHAPE['num_experts']} experts, "
             f"{args.layers} routers) | log10 p {rec['log10_pvalue']:.1f} |"]
    lines += project(rec, floor_s, floor_gib, args.layers)
    publish(lines, head, t0, args.markdown)


if __name__ == "__main__":
    main()
