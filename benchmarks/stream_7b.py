"""A Llama-2-7B-shaped bf16 pair streamed from sharded safetensors on a small machine: time, read floor, peak RSS.

    python benchmarks/stream_7b.py --dir /data/tmp                    # builds ~27 GB there, deletes it after
    python benchmarks/stream_7b.py --dir /data/tmp --layers 4 --runs csu l2     # a quick check
    python benchmarks/stream_7b.py --dir /data/tmp --markdown docs/generated/streaming_7b.md

Builds base (random init, std 0.02, norms 1) and derived (base + noise of 1% of each weight's std) with the
Llama-2-7B shape (hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32000, untied head), bf16, written shard by
shard (1 GiB shards + index), never holding a whole model. Then, for each run (default: `csu`, `l2`,
`csu --permute --align`), with the page cache of both checkpoints dropped first (posix_fadvise DONTNEED, so
reads are cold):
- the read floor: every tensor the run reads, read once through safe_open into memory, cold;
- the run itself: `python main.py ... --stat ...` in a fresh process (its record: wall, load_s, stat_s, read_s,
  peak RSS);
and for csu the compute floor: one layer's cosine product and matching on tensors already in memory, x layers.
Takes about 45 minutes on 2 busy cores (5 to build, most of the rest in `csu --permute --align`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             vocab_size=32000, tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=4096)
RUNS = {"csu": ["--stat", "csu"], "l2": ["--stat", "l2"], "csu --permute --align": ["--stat", "csu", "--permute",
                                                                                    "--align"]}
SHARD_BYTES = 1 << 30


# ---------------------------------------------------------------------- the pair, shard by shard
def _tensors(config):
    """(key, shape) of a Llama checkpoint in save order."""
    h, m, v = config.hidden_size, config.intermediate_size, config.vocab_size
    yield "model.embed_tokens.weight", (v, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        for proj in "qkvo":
            yield f"{p}.self_attn.{proj}_proj.weight", (h, h)
        yield f"{p}.mlp.gate_proj.weight", (m, h)
        yield f"{p}.mlp.up_proj.weight", (m, h)
        yield f"{p}.mlp.down_proj.weight", (h, m)
        yield f"{p}.input_layernorm.weight", (h,)
        yield f"{p}.post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def build(folder: Path, layers: int, device: str = "cpu", independent: bool = False) -> tuple[Path, ...]:
    """Write base and derived (and with `independent`, a third model of its own seed) as sharded bf16
    safetensors; one shard of each in memory at a time. `device` draws the random numbers there (cuda: fast)."""
    import transformers

    config = transformers.LlamaConfig(num_hidden_layers=layers, **SHAPE)
    dirs = tuple(folder / name for name in ("base", "derived", "independent")[:3 if independent else 2])
    for d in dirs:
        d.mkdir(parents=True)
        config.save_pretrained(d)
    g, g_other = torch.Generator(device).manual_seed(0), torch.Generator(device).manual_seed(1)
    shards: list[tuple[dict, ...]] = [tuple({} for _ in dirs)]
    size = 0
    for key, shape in _tensors(config):
        if len(shape) == 1:
            base = torch.ones(shape, device=device)
        else:
            base = torch.randn(shape, generator=g, device=device).mul_(0.02)
        noise = torch.randn(shape, generator=g, device=device)
        made = [base, base + noise.mul_(0.01 * float(base.std()) if len(shape) > 1 else 0.01)]
        if independent:
            made.append(base.clone() if len(shape) == 1 else
                        torch.randn(shape, generator=g_other, device=device).mul_(0.02))
        for part, t in zip(shards[-1], made):
            part[key] = t.bfloat16().cpu()
        size += 2 * math.prod(shape)
        if size >= SHARD_BYTES:
            _flush(shards, dirs, final=False)
            shards.append(tuple({} for _ in dirs))
            size = 0
    _flush(shards, dirs, final=True)
    return dirs


def _flush(shards: list, dirs: tuple[Path, ...], final: bool) -> None:
    n = len(shards)
    for d, part in zip(dirs, shards[-1]):
        name = f"model-{n:05d}.safetensors"
        save_file(part, str(d / name), metadata={"format": "pt"})
        part.clear()  # the shard's tensors are on disk: free them
        if final:  # name the shards as save_pretrained does, and write the index
            weight_map = {}
            for i in range(1, n + 1):
                old, new = d / f"model-{i:05d}.safetensors", d / f"model-{i:05d}-of-{n:05d}.safetensors"
                old.rename(new)
                with safe_open(str(new), "pt") as f:
                    weight_map.update({k: new.name for k in f.keys()})
            (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def drop_cache(*dirs: Path) -> None:
    """Evict the checkpoint files from the page cache (written data synced first): later reads come from disk."""
    for d in dirs:
        for f in d.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------- floors
def needed(run: str, layers: int) -> list[str]:
    """The keys a run reads (each once)."""
    ups = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(layers)]
    if run == "l2":
        import transformers

        return [k for k, _ in _tensors(transformers.LlamaConfig(num_hidden_layers=layers, **SHAPE))]
    if run == "csu":
        return ups
    return ["model.embed_tokens.weight", *ups, *[f"model.layers.{i}.mlp.gate_proj.weight" for i in range(layers)]]


def read_floor(dirs: tuple[Path, Path], keys: list[str]) -> tuple[float, float]:
    """(seconds, GiB) to read `keys` of both checkpoints once through safe_open, cold."""
    drop_cache(*dirs)
    t0, total = time.perf_counter(), 0
    for d in dirs:
        where = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        for key in keys:
            with safe_open(str(d / where[key]), "pt") as f:
                t = f.get_tensor(key)  # a view of the file mapping: copying it reads the bytes
                total += t.clone().numel() * t.element_size()
    return time.perf_counter() - t0, total / 2 ** 30


def csu_compute_floor(dirs: tuple[Path, Path], layers: int) -> float:
    """csu's products and matching for one layer on tensors already in memory, x layers (seconds)."""
    from tracing.statistics.csu import match_rows

    key = "model.layers.0.mlp.up_proj.weight"
    rows = []
    for d in dirs:
        where = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(str(d / where[key]), "pt") as f:
            rows.append(f.get_tensor(key).clone())
    t0 = time.perf_counter()
    match_rows(rows[0], rows[1])
    return (time.perf_counter() - t0) * layers


def run_main(dirs: tuple[Path, Path], flags: list[str], save: Path) -> dict:
    drop_cache(*dirs)
    cmd = [sys.executable, str(ROOT / "main.py"), "--base_model_id", str(dirs[0]), "--ft_model_id", str(dirs[1]),
           *flags, "--save", str(save / "record.pkl"), "--no_progress"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    rec = json.loads((save / "record.json").read_text())
    rec["process_s"] = time.perf_counter() - t0  # with Python's start and imports
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where to build the pair (~27 GB free needed; default: $TMPDIR)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=list(RUNS))
    ap.add_argument("--keep", action="store_true", help="keep the built pair (and reuse one in --dir/stream7b)")
    ap.add_argument("--markdown", default=None, help="also write the table here (and the numbers as .json beside)")
    ap.add_argument("--render", default=None, metavar="JSON", help="only rewrite --markdown from a saved .json")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        table = render(saved["rows"], f"{saved['head']}; {saved['layers']} layers; took {saved['took']} s.",
                       saved["layers"])
        print(table)
        if args.markdown:
            from tracing.docs import write_markdown

            print(f"wrote {write_markdown(args.markdown, table)}")
        return
    started = datetime.now(timezone.utc)
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
    head = (f"`{shlex.join(['python', 'benchmarks/stream_7b.py', *sys.argv[1:]])}` on {started:%Y-%m-%d %H:%M} "
            f"UTC, {platform.machine()}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, "
            f"load average {os.getloadavg()[0]:.1f}")
    print(head, flush=True)
    folder = Path(args.dir or tempfile.gettempdir()) / "stream7b"
    try:
        if not (args.keep and (folder / "derived" / "model.safetensors.index.json").is_file()):
            shutil.rmtree(folder, ignore_errors=True)
            t0 = time.perf_counter()
            build(folder, args.layers)
            print(f"built the pair in {time.perf_counter() - t0:.0f} s", flush=True)
        dirs = (folder / "base", folder / "derived")
        rows = []
        for run in args.runs:
            floor_s, gib = read_floor(dirs, needed(run, args.layers))
            rec = run_main(dirs, RUNS[run], folder)
            compute = csu_compute_floor(dirs, args.layers) if run == "csu" else None
            p = rec["aligned_log10_pvalue"] if "--align" in run else rec["log10_pvalue"]
            rows.append(dict(run=run, floor_s=floor_s, gib=gib, compute=compute, p=p, value=rec["value"],
                             p_before_align=rec["log10_pvalue"] if "--align" in run else None,
                             **{k: rec[k] for k in ("wall_time_s", "process_s", "load_s", "stat_s", "read_s",
                                                    "read_gib", "peak_rss_mib")}))
            r = rows[-1]
            print(f"{run:22s} wall {r['wall_time_s']:7.1f} s (process {r['process_s']:.1f} s, "
                  f"load {r['load_s']:.1f} s) | read floor {floor_s:6.1f} s for {gib:.1f} GiB "
                  f"(ratio {r['wall_time_s'] / floor_s:.1f})"
                  f" | read in run {r['read_gib']:.1f} GiB | peak RSS {r['peak_rss_mib']:.0f} MiB"
                  + (f" | csu compute floor {compute:.0f} s" if compute else ""), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    took = (datetime.now(timezone.utc) - started).seconds
    table = render(rows, f"{head}; {args.layers} layers; took {took} s.", args.layers)
    print(table)
    if args.markdown:
        from tracing.docs import write_markdown

        print(f"wrote {write_markdown(args.markdown, table)}")
        Path(args.markdown).with_suffix(".json").write_text(json.dumps({"head": head, "layers": args.layers,
                                                                        "took": took, "rows": rows}, indent=1))


def render(rows: list[dict], footer: str, layers: int) -> str:
    """The measured table, then the 70B projection scaled from it."""
    lines = ["| run | wall (process) | load | read floor, cold | wall / floor | read in the run | peak RSS | "
             "result |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        result = f"log10 p {r['p']:.1f}" if r["p"] is not None else f"l2 {r['value']:.1f}"
        if r.get("p_before_align") is not None:
            result = f"log10 p {r['p_before_align']:.1f} permuted, {r['p']:.1f} aligned"
        extra = f"; compute floor {r['compute']:.0f} s" if r["compute"] else ""
        lines.append(f"| `{r['run']}` | {r['wall_time_s']:.1f} s ({r['process_s']:.1f} s) | {r['load_s']:.2f} s | "
                     f"{r['floor_s']:.1f} s for {r['gib']:.1f} GiB{extra} | {r['wall_time_s'] / r['floor_s']:.1f} | "
                     f"{r['read_gib']:.1f} GiB | {r['peak_rss_mib']:.0f} MiB | {result} |")
    return "\n".join(lines) + f"\n\n{footer}\n" + project_70b(rows, layers)


# Llama-2-70B: 80 layers, hidden 8192, MLP 28672, vocab 32000, 8 key/value heads
B70 = dict(layers=80, hidden=8192, mlp=28672, vocab=32000, kv=1024)


def _params(layers: int, hidden: int, mlp: int, vocab: int, kv: int) -> int:
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp + 2 * hidden  # q o, k v, MLP, norms
    return 2 * vocab * hidden + hidden + layers * per_layer


def project_70b(rows: list[dict], layers: int) -> str:
    """Per-layer costs of this run scaled to a Llama-2-70B pair: bytes read (csu: the up projections; l2: every
    weight) at this run's cold read rate, csu's products by n²·d (28672² x 8192 over 11008² x 4096), l2's
    arithmetic by the parameter count, and the peak by the per-worker n x n similarity (float32) and its float64
    copy. Markdown, after the measured table."""
    by = {r["run"]: r for r in rows}
    h, m = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    p7 = _params(layers, h, m, SHAPE["vocab_size"], h)
    p70 = _params(**B70)
    out = [f"\nProjected for a Llama-2-70B pair ({p70 / 1e9:.0f}B parameters, 80 layers, MLP 28672 x 8192) "
           f"from the per-layer costs above (same machine, same 2 assignment workers):\n",
           "| run | reads | read floor at this disk's cold rate | statistic's arithmetic | peak RSS |",
           "|---|---|---|---|---|"]
    per_worker = (B70["mlp"] ** 2 - m ** 2) * 12 / 2 ** 20  # MiB more per worker: float32 sim + float64 copy
    if "csu" in by:
        r = by["csu"]
        gib = 2 * B70["layers"] * B70["mlp"] * B70["hidden"] * 2 / 2 ** 30
        flops = (B70["mlp"] ** 2 * B70["hidden"]) / (m ** 2 * h) * B70["layers"] / layers
        out.append(f"| `csu` | {gib:.0f} GiB | {gib * r['floor_s'] / r['gib'] / 60:.1f} min | "
                   f"{(r['compute'] or r['stat_s']) * flops / 3600:.1f} h on these 2 cores | "
                   f"{(r['peak_rss_mib'] + 2 * per_worker) / 1024:.0f} GiB |")
    if "l2" in by:
        r = by["l2"]
        gib = 2 * p70 * 2 / 2 ** 30
        out.append(f"| `l2` | {gib:.0f} GiB | {gib * r['floor_s'] / r['gib'] / 60:.1f} min | "
                   f"{r['stat_s'] * p70 / p7 / 60:.0f} min (reads overlapped) | {r['peak_rss_mib'] / 1024:.1f} GiB |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
