"""A 2-core laptop, measured: φ_MATCH against the original code at SmolLM2-135M shape, and a 7B-shaped pair.

    python benchmarks/laptop.py --orig /work/orig --dir7b /data/tmp/pair7b       # ~20 min on 2 cores (+ build)
    python benchmarks/laptop.py --skip_7b --repeats 1                           # the 135M part only (~4 min)
    python benchmarks/laptop.py --orig /work/orig --dir7b DIR --markdown docs/generated/laptop.md

(a) φ_MATCH, whole process (Python's start, imports, loading, statistic, result), on the same 4 blocks of 128
random tokens, one batch; SmolLM2-135M-shaped Llamas, random init, stored in bf16 (`build_135m`): base against
its rotated copy (tracing.transforms, --rotate's machinery) and against another initialisation. Ours:
`python main.py --stat match --dataset random ...`. The original: the paper's public code (github.com/
ahmeda14960/model-tracing), its `tracing.statistics.match.statistic` on both models loaded as its main.py
loads them (bf16), called by a small driver (its main.py needs the hub: login, tokenizers, datasets), in a
copy patched for CPU only:

    git clone https://github.com/ahmeda14960/model-tracing /work/orig
    sed -i 's/"cuda"/"cpu"/g' /work/orig/tracing/{utils/utils.py,utils/evaluate.py,statistics/match.py}

Ours runs as a user runs it (progress bars go to stderr, unread). Without --orig only our side is measured,
beside the original's forward passes from its code (2 projections x 2 models per layer). One warm-up of each,
then --repeats runs alternating original and ours; medians. Peak RSS: the process's ru_maxrss (os.wait4).
Passes: ours from the record, the original's counted by forward hooks.

(b) A Llama-2-7B-shaped bf16 pair in --dir7b (built there if missing, as benchmarks/stream_7b.py builds it:
random init, derived = base + 1% noise, independent = another seed; ~40 GB), the page cache of the checkpoints
dropped before each run: `csu` derived and independent, `csu --permute --align` derived, `l2` derived.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                    tie_word_embeddings=True, rms_norm_eps=1e-5)
N_BLOCKS, BLOCK_SIZE = 4, 128
RUNS_7B = {"csu, derived": ("derived", ["--stat", "csu"]), "csu, independent": ("independent", ["--stat", "csu"]),
           "csu --permute --align, derived": ("derived", ["--stat", "csu", "--permute", "--align"]),
           "l2, derived": ("derived", ["--stat", "l2"])}
TARGETS_7B = {"csu, derived": 90, "csu, independent": 90, "csu --permute --align, derived": 180}  # seconds
MAX_RSS_GIB = 4  # csu and csu --permute --align
ORIG_FILES = ("tracing/utils/utils.py", "tracing/utils/evaluate.py", "tracing/statistics/match.py")

# Runs the original's φ_MATCH as its main.py would with --stat match (models in bf16, a DataLoader of dicts),
# on our tokens, in the original's folder (its package is also called `tracing`).
ORIG_DRIVER = r"""
import json, sys
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from tracing.statistics.match import statistic
from tracing.utils.evaluate import prepare_hf_dataloader

base_dir, ft_dir, tokens_path, batch = sys.argv[1:5]
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
ft = AutoModelForCausalLM.from_pretrained(ft_dir, dtype=torch.bfloat16)
passes = {"base": 0, "ft": 0}
for name, model in (("base", base), ("ft", ft)):
    model.register_forward_pre_hook(lambda *a, name=name: passes.__setitem__(name, passes[name] + 1))
tokens = torch.load(tokens_path)
ds = Dataset.from_dict({"input_ids": tokens, "attention_mask": torch.ones(tokens.shape), "labels": tokens})
ds.set_format(type="torch", columns=["input_ids", "attention_mask", "labels"])
pvalues = statistic(base, ft, prepare_hf_dataloader(ds, int(batch)), n_blocks=base.config.num_hidden_layers)
print(json.dumps({"pvalues": [float(p) for p in pvalues], "passes": passes}))
"""


def build_135m(root: Path) -> dict[str, Path]:
    """base, rotated (base with its residual stream rotated: tracing.transforms, --rotate's machinery) and
    independent (another initialisation), SmolLM2-135M-shaped Llamas, random init, saved in bfloat16 (as
    SmolLM2-135M is published); reused when already there."""
    import torch
    import transformers

    from tracing.arch import get_spec
    from tracing.transforms import rotate_residual

    dirs = {name: root / name for name in ("base", "rotated", "independent")}
    if all((d / "config.json").is_file() for d in dirs.values()):
        return dirs
    cfg = transformers.LlamaConfig(**SMOLLM2_135M)
    model = lambda seed: (torch.manual_seed(seed), transformers.LlamaForCausalLM(cfg).eval())[1]
    base = model(0)
    rotated = copy.deepcopy(base)
    rotate_residual(rotated, get_spec(rotated.config), seed=2)
    for name, m in (("base", base), ("rotated", rotated), ("independent", model(100))):
        m.to(torch.bfloat16).save_pretrained(dirs[name])
    return dirs


def save_tokens(path: Path) -> None:
    """The 4 blocks of 128 tokens `main.py --dataset random --seed 0` draws for these models, for the original."""
    import torch

    from tracing.data import random_blocks

    torch.save(random_blocks(SMOLLM2_135M["vocab_size"], BLOCK_SIZE, N_BLOCKS, seed=0), path)


def run_process(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout) of one child process; raises with its stderr if it fails."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... failed ({proc.returncode}): {err.read()[-2000:]}")
        return seconds, usage.ru_maxrss / 1024, out.read()  # ru_maxrss: KiB on Linux


def ours_match(base: Path, ft: Path, save: Path) -> dict:
    cmd = [sys.executable, str(Path(bench_common.ROOT) / "main.py"), "--base_model_id", str(base), "--ft_model_id",
           str(ft), "--stat", "match", "--dataset", "random", "--block_size", str(BLOCK_SIZE), "--max_blocks",
           str(N_BLOCKS), "--batch_size", str(N_BLOCKS), "--seed", "0", "--save", str(save / "ours.pkl")]
    seconds, rss, _ = run_process(cmd)
    rec = json.loads((save / "ours.json").read_text())
    layers = [r["log10_pvalue"] for r in rec["per_layer"]]
    return {"s": seconds, "rss": rss, "passes": rec["extras"]["forward_passes"], "log10p": rec["log10_pvalue"],
            "small": sum(p < -2 for p in layers), "layers": len(layers), "dtype": rec.get("dtype")}


def orig_match(orig: Path, base: Path, ft: Path, tokens: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(orig)}
    seconds, rss, out = run_process([sys.executable, "-c", ORIG_DRIVER, str(base), str(ft), str(tokens),
                                     str(N_BLOCKS)], cwd=orig, env=env)
    res = json.loads(out.strip().splitlines()[-1])
    return {"s": seconds, "rss": rss, "passes": res["passes"]["base"], "small": sum(p < 0.01 for p in res["pvalues"]),
            "layers": len(res["pvalues"])}


def part_135m(root: Path, orig: Path | None, repeats: int) -> list[str]:
    # built in a child: this process stays small (a child's ru_maxrss starts at its parent's RSS at fork)
    subprocess.run([sys.executable, __file__, "--build_135m", str(root)], check=True, capture_output=True)
    dirs, tokens = {name: root / name for name in ("base", "rotated", "independent")}, root / "tokens.pt"
    lines = ["| φ_MATCH, SmolLM2-135M shape, 4 x 128 tokens | original | ours | original / ours |", "|---|---|---|---|"]
    for ft in ("rotated", "independent"):
        runs: dict[str, list[dict]] = {"orig": [], "ours": []}
        for k in range(repeats + 1):  # the first round warms the page cache and Python's bytecode
            if orig:
                runs["orig"].append(orig_match(orig, dirs["base"], dirs[ft], tokens))
            runs["ours"].append(ours_match(dirs["base"], dirs[ft], root))
            print(f"{ft} round {k}: " + ", ".join(f"{who} {r[-1]['s']:.1f} s" for who, r in runs.items() if r),
                  flush=True)
        med = {who: {"s": statistics.median(r["s"] for r in rs[1:]), "rss": max(r["rss"] for r in rs[1:]),
                     **{k: rs[-1][k] for k in rs[-1] if k not in ("s", "rss")}} for who, rs in runs.items() if rs}
        o, u = med.get("orig"), med["ours"]
        mine = (f"{u['s']:.1f} s, {u['passes']} pass per model ({u['dtype']}), {u['rss']:.0f} MiB; log10 p "
                f"{u['log10p']:.1f}, {u['small']}/{u['layers']} layers p < 0.01")
        if o:
            theirs = (f"{o['s']:.1f} s, {o['passes']} passes per model, {o['rss']:.0f} MiB; {o['small']}/"
                      f"{o['layers']} layers p < 0.01")
            ratio = f"**{o['s'] / u['s']:.1f}x** time, {o['rss'] / u['rss']:.2f}x memory"
        else:
            theirs, ratio = f"not run (--orig); {4 * SMOLLM2_135M['num_hidden_layers'] // 2} passes per model", "-"
        lines.append(f"| base vs {ft} | {theirs} | {mine} | {ratio} |")
        print(lines[-1], flush=True)
    return lines


def part_7b(folder: Path) -> list[str]:
    import stream_7b

    if not all((folder / n / "model.safetensors.index.json").is_file() for n in ("base", "derived", "independent")):
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build_7b", str(folder)], check=True)  # a child (see part_135m)
        print(f"built the 7B-shaped models in {time.perf_counter() - t0:.0f} s", flush=True)
    lines = ["| 7B-shaped pair (bf16, 32 layers), cold cache | wall (process) | peak RSS | result | target |",
             "|---|---|---|---|---|"]
    for run, (ft, flags) in RUNS_7B.items():
        stream_7b.drop_cache(folder / "base", folder / ft)
        cmd = [sys.executable, str(Path(bench_common.ROOT) / "main.py"), "--base_model_id", str(folder / "base"),
               "--ft_model_id", str(folder / ft), *flags, "--save", str(folder / "record.pkl")]
        seconds, rss, _ = run_process(cmd)
        rec = json.loads((folder / "record.json").read_text())
        if "--align" in flags:
            result = f"log10 p {rec['log10_pvalue']:.1f} permuted, {rec['aligned_log10_pvalue']:.1f} aligned"
        else:
            result = f"log10 p {rec['log10_pvalue']:.1f}" if rec["log10_pvalue"] is not None else \
                f"l2 {rec['value']:.1f}"
        target = TARGETS_7B.get(run)
        met = "-" if target is None else (f"<= {target} s, <= {MAX_RSS_GIB} GiB: " + (
            "met" if seconds <= target and rss <= MAX_RSS_GIB * 1024 else "**not met**"))
        lines.append(f"| `{run}` | {seconds:.1f} s | {rss:.0f} MiB | {result} | {met} |")
        print(lines[-1], flush=True)
    return lines


def check_orig(orig: Path) -> Path:
    """The original's checkout, patched for CPU (module docstring); else SystemExit naming the fix."""
    missing = [f for f in ORIG_FILES if not (orig / f).is_file()]
    if missing:
        raise SystemExit(f"--orig {orig}: no {missing[0]}; clone github.com/ahmeda14960/model-tracing there")
    unpatched = [f for f in ORIG_FILES if '"cuda"' in (orig / f).read_text()]
    if unpatched:
        raise SystemExit(f"--orig {orig}: {unpatched[0]} still uses cuda; patch the copy for CPU: "
                         f"sed -i 's/\"cuda\"/\"cpu\"/g' " + " ".join(str(orig / f) for f in ORIG_FILES))
    return orig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orig", type=Path, help="the original code's checkout, patched for CPU (module docstring)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each side after the warm-up")
    ap.add_argument("--dir7b", type=Path, help="the 7B-shaped pair's folder (built there if missing, ~40 GB)")
    ap.add_argument("--skip_7b", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the 7B-shaped pair if this run built it")
    ap.add_argument("--markdown", help="write the tables here")
    ap.add_argument("--build_135m", type=Path, help=argparse.SUPPRESS)  # child processes: build, then exit
    ap.add_argument("--build_7b", type=Path, help=argparse.SUPPRESS)
    if "--build_135m" in sys.argv or "--build_7b" in sys.argv:
        args = ap.parse_args()
        if args.build_135m:
            build_135m(args.build_135m)
            save_tokens(args.build_135m / "tokens.pt")
        else:
            import stream_7b

            stream_7b.build(args.build_7b, 32, independent=True)
        return
    args, head, t0 = bench_common.start(ap)
    orig = check_orig(args.orig) if args.orig else None
    if not args.skip_7b and not args.dir7b:
        raise SystemExit("give --dir7b (a folder with ~40 GB free) or --skip_7b")
    with tempfile.TemporaryDirectory() as tmp:
        lines = part_135m(Path(tmp), orig, args.repeats)
    if not args.skip_7b:
        built = not (args.dir7b / "base").exists()
        try:
            lines += [""] + part_7b(args.dir7b)
        finally:
            if built and not args.keep:
                shutil.rmtree(args.dir7b, ignore_errors=True)
    bench_common.publish(lines, head, t0, args.markdown)


if __name__ == "__main__":
    main()
