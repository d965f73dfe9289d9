"""One GPU, one call: CUDA against CPU on every statistic, then Llama-2-7B-shaped pairs at full size.

    python benchmarks/gpu_7b.py --dir /tmp --deadline 480 --out results/gpu     # on a machine with a GPU
    python benchmarks/gpu_7b.py --render docs/generated/gpu_7b.json --markdown docs/generated/gpu_7b.md

1. Parity: the demo models (tracing/demo.py, built on the CPU), every statistic of the registry on the derived
   and the independent pair, `--device cpu` and `--device cuda`, both float32: log10 p (or the value) side by
   side, so a CUDA-only bug shows as a different verdict.
2. At scale: base, derived (base + 1% noise) and an independent model of the Llama-2-7B shape (32 layers,
   bf16, sharded safetensors, random init drawn on the GPU), then `python main.py` in a fresh process per run:
   csu (fast and exact matching) on the independent and the derived pair, `csu --permute --align`, l2, and
   `match` on 16,384 tokens (`--dataset random`, 32 blocks of 512) on both pairs, with forward passes counted.
Every row is written to `<out>/gpu_7b.json` as soon as it is measured; runs that would pass `--deadline`
(seconds from the start) are left out and say so. Random-init models: the activation statistics' cost on
trained models is measured on the CPU (benchmarks/activation_stats.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import stream_7b  # the 7B pair builder (benchmarks/ is on sys.path when this runs)

ROOT = stream_7b.ROOT
RUNS_7B = [  # (label, pair, flags)
    ("csu", "independent", ["--stat", "csu"]),
    ("csu --matching exact", "independent", ["--stat", "csu", "--matching", "exact"]),
    ("csu", "derived", ["--stat", "csu"]),
    ("csu --permute --align", "derived", ["--stat", "csu", "--permute", "--align"]),
    ("l2", "derived", ["--stat", "l2"]),
    ("match, 16,384 tokens", "derived", ["--stat", "match", "--dataset", "random", "--block_size", "512",
                                         "--max_blocks", "32", "--batch_size", "8"]),
    ("match, 16,384 tokens", "independent", ["--stat", "match", "--dataset", "random", "--block_size", "512",
                                             "--max_blocks", "32", "--batch_size", "8"]),
    ("csu --permute --align --matching exact", "derived", ["--stat", "csu", "--permute", "--align",
                                                           "--matching", "exact"]),
]


def parity(out: Path, deadline: float) -> list[dict]:
    """Every statistic on the demo pairs, CPU and CUDA, float32."""
    from tracing.config import RunConfig
    from tracing.demo import ensure_demo_models
    from tracing.pipeline import run_pair
    from tracing.statistics import all_stats

    root = ensure_demo_models(out / "demo", progress=False)
    rows = []
    for pair in ("derived", "independent"):
        for name, info in all_stats().items():
            row = {"part": "parity", "stat": name, "pair": pair}
            for device in ("cpu", "cuda"):
                if time.time() > deadline:
                    return rows
                data = dict(dataset=str(root / "text.txt"), block_size=64, max_blocks=8, batch_size=8)
                cfg = RunConfig(base_model_id=str(root / "base"), ft_model_id=str(root / pair), stat=name,
                                device=device, dtype="float32", no_progress=True, save=str(out / "records"),
                                **(data if info.needs_data else {}))
                t0 = time.perf_counter()
                rec = run_pair(cfg)
                row[device] = {"s": round(time.perf_counter() - t0, 2), "status": rec["status"],
                               "log10p": rec.get("log10_pvalue"), "value": rec.get("value"),
                               "error": rec.get("error")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def at_scale(folder: Path, out: Path, deadline: float, saved: dict, layers: int) -> None:
    import torch

    rows = saved["rows"]
    t0 = time.perf_counter()
    stream_7b.build(folder, layers, device="cuda" if torch.cuda.is_available() else "cpu", independent=True)
    rows.append({"part": "build", "s": round(time.perf_counter() - t0, 1),
                 "disk_free_gib": round(shutil.disk_usage(folder).free / 2 ** 30, 1)})
    print(json.dumps(rows[-1]), flush=True)
    for label, pair, flags in RUNS_7B:
        left = deadline - time.time()
        if left < 30:
            rows.append({"part": "7b", "run": label, "pair": pair, "skipped": "deadline"})
            continue
        save = out / "runs" / f"{len(rows)}"
        save.mkdir(parents=True)
        cmd = [sys.executable, str(ROOT / "main.py"), "--base_model_id", str(folder / "base"), "--ft_model_id",
               str(folder / pair), *flags, "--save", str(save / "record.pkl"), "--no_progress"]
        t1 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left - 10)
        except subprocess.TimeoutExpired:
            rows.append({"part": "7b", "run": label, "pair": pair, "skipped": f"killed at the deadline ({left:.0f} s)"})
            continue
        row = {"part": "7b", "run": label, "pair": pair, "process_s": round(time.perf_counter() - t1, 1)}
        if proc.returncode != 0 or not (save / "record.json").is_file():
            row["error"] = (proc.stderr or proc.stdout)[-600:]
        else:
            rec = json.loads((save / "record.json").read_text())
            keys = ("status", "wall_time_s", "load_s", "stat_s", "read_s", "read_gib", "peak_rss_mib", "peak_gpu_mib",
                    "log10_pvalue", "aligned_log10_pvalue", "value", "device", "matching")
            row.update({k: rec.get(k) for k in keys})
            extras = rec.get("extras") or {}
            row.update({k: extras.get(k) for k in ("forward_passes", "n_tokens", "chunks") if k in extras})
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "gpu_7b.json").write_text(json.dumps(saved, indent=1))


def render(saved: dict) -> str:
    """The two tables README embeds."""
    lines = [saved["head"], "", "| statistic | pair | CPU log10 p (value) | CUDA log10 p (value) | CPU s | CUDA s |",
             "|---|---|---|---|---|---|"]

    def cell(r: dict) -> str:
        if r["status"] != "ok":
            return f"failed: {str(r['error'])[:60]}"
        p, v = r["log10p"], r["value"]
        return (f"{p:.2f}" if p is not None else "-") + (f" ({v:.4g})" if isinstance(v, float) else "")

    for r in saved["rows"]:
        if r["part"] == "parity" and "error" in r:
            lines.append(f"| parity stopped: {r['error'][:100]} | | | | | |")
        elif r["part"] == "parity" and "cuda" in r:
            lines.append(f"| `{r['stat']}` | {r['pair']} | {cell(r['cpu'])} | {cell(r['cuda'])} | {r['cpu']['s']} | "
                         f"{r['cuda']['s']} |")
    built = [r for r in saved["rows"] if r["part"] == "build"]
    if built:
        lines += ["", f"Three 7B-shaped models ({saved['layers']} layers, bf16) built and saved in {built[0]['s']} s."]
    lines += ["", "| run | pair | wall (process) | load | peak GPU | peak RSS | result |",
              "|---|---|---|---|---|---|---|"]
    for r in saved["rows"]:
        if r["part"] != "7b":
            continue
        if "skipped" in r or "error" in r:
            lines.append(f"| `{r['run']}` | {r['pair']} | {r.get('skipped') or 'failed: ' + r['error'][-80:]} "
                         f"| | | | |")
            continue
        res = (f"log10 p {r['log10_pvalue']:.1f}" if r["log10_pvalue"] is not None else f"value {r['value']:.4g}")
        if r.get("aligned_log10_pvalue") is not None:
            res += f" permuted, {r['aligned_log10_pvalue']:.1f} aligned"
        if r.get("forward_passes") is not None:
            res += f"; {r['forward_passes']} forward pass(es) per model over {r['n_tokens']} tokens"
        lines.append(f"| `{r['run']}` | {r['pair']} | {r['wall_time_s']:.1f} s ({r['process_s']:.1f} s) | "
                     f"{r['load_s']:.1f} s | {r['peak_gpu_mib'] or 0:.0f} MiB | {r['peak_rss_mib']:.0f} MiB | {res} |")
    return "\n".join(lines) + f"\n\n{saved['device']}; took {saved['took']:.0f} s.\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where to build the 7B models (~41 GB; default: $TMPDIR)")
    ap.add_argument("--out", default="results/gpu", help="where rows and records go")
    ap.add_argument("--deadline", type=float, default=480, help="seconds from the start; later runs are skipped")
    ap.add_argument("--layers", type=int, default=32, help="layers of the 7B-shaped models")
    ap.add_argument("--render", default=None, metavar="JSON", help="only rewrite --markdown from a saved .json")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    if args.render:
        table = render(json.loads(Path(args.render).read_text()))
        print(table)
        if args.markdown:
            from tracing.docs import write_markdown

            print(f"wrote {write_markdown(args.markdown, table)}")
        return
    import torch

    start = time.time()
    deadline = start + args.deadline
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = (f"{torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2 ** 30:.0f} GiB"
           if torch.cuda.is_available() else "no GPU")
    saved = {"head": stream_7b.shlex.join(["python", "benchmarks/gpu_7b.py", *sys.argv[1:]]) + " on "
             + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "device": f"{gpu}, torch {torch.__version__}, {stream_7b.os.cpu_count()} CPU cores",
             "layers": args.layers, "rows": []}
    print(saved["head"], saved["device"], flush=True)
    folder = Path(args.dir or tempfile.gettempdir()) / "gpu7b"
    shutil.rmtree(folder, ignore_errors=True)
    try:
        try:
            saved["rows"] += parity(out, start + min(args.deadline / 4, 150))
        except Exception as e:  # the 7B part still runs; the error is reported
            saved["rows"].append({"part": "parity", "error": repr(e)[-600:]})
        at_scale(folder, out, deadline, saved, args.layers)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        saved["took"] = time.time() - start
        (out / "gpu_7b.json").write_text(json.dumps(saved, indent=1))
    print(render(saved))


if __name__ == "__main__":
    main()
