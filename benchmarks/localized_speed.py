"""Localized testing at the cost of a pairwise test, on SmolLM2-135M-shaped models (30 layers, hidden 576, MLP 1536):

    python benchmarks/localized_speed.py --markdown docs/generated/localized_speed.md     # ~10 min on 2 cores

Models (random init given the heavy-tailed unit norms of a trained model, bench_common.heavy_tailed, so exact
assignment costs what it costs on trained weights; saved as safetensors under --dir, bf16): base; `upscaled` =
SOLAR-style 44 layers (base layers 0-21 then 8-29, each weight + 1% noise); `pruned` = every third layer dropped
and a third of each kept MLP pruned (tracing.zoo.prune, no healing); `rotated` = base's residual stream rotated
(function-preserving); `derived` = base + 1% noise. Each statistic runs as `python main.py` in a fresh process;
printed: the statistic's own time (the record's stat_s), the whole process, how many layers the map gets right.
Targets (issue 20): csu_all on the up-scaled pair <= 3x csu on the same-depth pair; match_all on the pruned pair
<= 4x match on the rotated pair; maps unchanged (the last row: match_all testing every layer pair, no screen).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_common import ROOT, heavy_tailed, publish, start

SHAPE = dict(vocab_size=8192, hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, max_positions=512)
UPSCALE = [*range(0, 22), *range(8, 30)]
KEPT = [i for i in range(30) if i % 3 != 2]


def build(folder: Path) -> None:
    import copy

    import torch
    import transformers

    from tracing import zoo
    from tracing.arch import get_spec
    from tracing.transforms import rotate_residual

    if (folder / "done").exists():
        return
    torch.manual_seed(0)
    tok = zoo.build_tokenizer(zoo.synthetic_text(3000, seed=0), vocab_size=512)
    base = heavy_tailed(zoo.tiny_model("llama", seed=0, **SHAPE), seed=0)

    def noisy(model):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * p.std() * torch.randn_like(p))
        return model

    cfg = copy.deepcopy(base.config)
    cfg.num_hidden_layers = len(UPSCALE)
    up = transformers.AutoModelForCausalLM.from_config(cfg)
    sd = {k: v for k, v in base.state_dict().items() if ".layers." not in k}
    for new, old in enumerate(UPSCALE):
        sd.update({f"model.layers.{new}.{k}": v.clone() for k, v in base.model.layers[old].state_dict().items()})
    up.load_state_dict(sd)
    rotated = copy.deepcopy(base)
    rotate_residual(rotated, get_spec(rotated.config), seed=1)
    models = {"base": base, "derived": noisy(copy.deepcopy(base)), "upscaled": noisy(up),
              "pruned": zoo.prune(base, KEPT, keep_frac=2 / 3), "rotated": rotated}
    for name, model in models.items():
        model.to(torch.bfloat16).save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    (folder / "done").write_text("ok")


def run(folder: Path, ft: str, stat: str) -> dict:
    """One `python main.py` process: its record's numbers and the process wall time. `stat` may carry flags."""
    save = folder / "records"
    argv = [sys.executable, os.path.join(ROOT, "main.py"), "--base_model_id", str(folder / "base"), "--ft_model_id",
            str(folder / ft), "--stat", *stat.split(), "--save", str(save), "--no_progress", "--dataset", "random",
            "--block_size", "128", "--max_blocks", "4"]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{stat} on {ft} failed: {proc.stderr[-1500:]}")
    path = proc.stdout.strip().splitlines()[-1].split("saved ", 1)[1]
    rec = json.loads(Path(path).with_suffix(".json").read_text())
    return {"stat_s": rec["stat_s"], "wall": wall, "log10_pvalue": rec["log10_pvalue"],
            "mapping": rec["extras"].get("mapping"), "n_tested": rec["extras"].get("n_tested"),
            "n_pairs": rec["extras"].get("n_pairs"), "peak_rss_mib": rec["peak_rss_mib"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/localized_speed")
    ap.add_argument("--markdown", default=None)
    args, head, t0 = start(ap)
    folder = Path(args.dir)
    build(folder)
    truth = {"upscaled": UPSCALE, "pruned": KEPT}
    runs = [("derived", "csu", None), ("upscaled", "csu_all", "csu"), ("rotated", "match", None),
            ("pruned", "match_all", "match"), ("pruned", "match_all --matching exact", "match")]  # exact: every pair
    out = {}
    lines = ["| pair | statistic | statistic time | whole process | layer pairs tested | layers mapped right | "
             "log10 p | peak RSS | ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for ft, stat, against in runs:
        r = out[stat] = run(folder, ft, stat)
        right = "-"
        if ft in truth and r["mapping"]:
            right = f"{sum(m == t for m, t in zip(r['mapping'], truth[ft]))}/{len(truth[ft])}"
        ratio = f"{r['stat_s'] / out[against]['stat_s']:.1f}x `{against}`" if against else "-"
        tested = f"{r['n_tested']}/{r['n_pairs']}" if r["n_pairs"] else "-"
        lines.append(f"| base vs {ft} | `{stat}` | {r['stat_s']:.1f} s | {r['wall']:.1f} s | {tested} | {right} | "
                     f"{r['log10_pvalue']:.1f} | {r['peak_rss_mib']:.0f} MiB | {ratio} |")
        print(lines[-1], flush=True)
    publish(lines, head, t0, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
