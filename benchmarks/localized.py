"""Benchmark of localized testing on a pruned model: which layer of B comes from which layer of A?

    python benchmarks/localized.py                                   # 24 layers, hidden 64, trained 200 steps
    python benchmarks/localized.py --markdown docs/generated/localized.md   # also write README's table
    python benchmarks/localized.py --layers 12 --steps 50            # a quick look

A Llama-architecture base (hidden H, MLP 3H, `--layers` L) is trained `--steps` Adam steps on text the project
generates (so it is not a random init); B = the base with every third layer removed and, in each kept layer,
the third of the MLP neurons with the smallest |gate|·|up|·|down| norms pruned (no healing: every kept weight
is the base's); C = an independent model trained the same way from another seed. match_all (activations of
both models), match_all_drift_free (B's weights on A's MLP inputs) and csu_all (weights only) then run on
(A, B) and (A, C), each in a fresh process that loads the saved models; printed: how many kept layers are
mapped to their base layer, how many layers are mapped wrongly, the log10 p of each kept layer, wall time,
forward passes per model and peak RSS (VmHWM, reset after loading).
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

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STATS = ("match_all", "match_all_drift_free", "csu_all")


def _rss_mib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith(field + ":"))


def build(folder: str, layers: int, hidden: int, steps: int, n_blocks: int, block_size: int) -> dict:
    """Train the base and the independent model, prune the base; save all three and the token blocks."""
    import transformers

    from tracing import zoo

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)  # tiny matrices: more threads only spin, above all on a shared machine
    torch.manual_seed(0)
    tok = zoo.build_tokenizer(zoo.synthetic_text(3000, seed=0), vocab_size=512)
    ids = torch.tensor(tok(zoo.synthetic_text(6000, seed=1))["input_ids"])
    shape = dict(vocab_size=len(tok), hidden=hidden, layers=layers, intermediate=3 * hidden, heads=4, kv_heads=2,
                 max_positions=max(256, block_size))
    t0 = time.perf_counter()
    models = {}
    for name, seed in (("base", 0), ("independent", 1)):
        models[name] = zoo.finetune(zoo.tiny_model("llama", seed=seed, **shape), ids, steps=steps, lr=3e-3,
                                    block_size=64, batch_size=8, seed=seed)
    kept = [i for i in range(layers) if i % 3 != 2]  # every third layer removed
    models["pruned"] = zoo.prune(models["base"], kept, keep_frac=2 / 3)
    for name, model in models.items():
        model.save_pretrained(os.path.join(folder, name))
    held_out = torch.tensor(tok(zoo.synthetic_text(2000, seed=2))["input_ids"])[:n_blocks * block_size]
    torch.save(held_out.reshape(n_blocks, block_size), os.path.join(folder, "blocks.pt"))  # (n_blocks, T)
    return {"kept": kept, "train_s": round(time.perf_counter() - t0, 1)}


def run_one(folder: str, stat: str, pair: str, threads: int) -> dict:
    import transformers

    torch.set_num_threads(threads)
    from tracing.arch import get_spec
    from tracing.statistics import StatContext, get_stat

    base = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(folder, "base")).eval()
    other = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(folder, pair)).eval()
    blocks = torch.load(os.path.join(folder, "blocks.pt"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS from here on
    rss_models = _rss_mib("VmRSS")
    ctx = StatContext(base=base, ft=other, spec_base=get_spec(base.config), spec_ft=get_spec(other.config),
                      blocks=blocks, progress=False)
    t0 = time.perf_counter()
    res = get_stat(stat).fn(ctx)
    wall = time.perf_counter() - t0
    passes = res.extras.get("forward_passes", {"base": 0, "ft": 0})
    return {"stat": stat, "pair": pair, "wall_s": round(wall, 2), "log10p": res.log10_pvalue,
            "mapping": res.extras["mapping"], "per_layer_log10p": [r["log10_pvalue"] for r in res.per_layer],
            "passes": f"{passes['base']}/{passes['ft']}", "rss_models_mib": rss_models,
            "peak_rss_mib": _rss_mib("VmHWM"), "tokens": int(blocks.numel())}


def _fmt_p(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def report(rows: list[dict], kept: list[int], meta: str) -> str:
    n_kept = len(kept)
    lines = [meta, "",
             "| statistic | pair | kept layers mapped to their base layer | layers mapped wrongly | log10 p of kept "
             "layers (min / median / max) | statistic log10 p | wall time | forward passes (A/B) | peak RSS (models) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        want = kept if r["pair"] == "pruned" else [None] * len(r["mapping"])
        right = sum(m == w for m, w in zip(r["mapping"], want) if w is not None)
        wrong = sum(m is not None and m != w for m, w in zip(r["mapping"], want))
        ps = sorted(p for p in r["per_layer_log10p"] if p is not None) if r["pair"] == "pruned" else []
        spread = f"{ps[0]:.1f} / {ps[len(ps) // 2]:.1f} / {ps[-1]:.1f}" if ps else "-"
        mapped = f"{right}/{n_kept}" if r["pair"] == "pruned" else "-"
        lines.append(f"| `{r['stat']}` | {r['pair']} | {mapped} | {wrong} | {spread} | {_fmt_p(r['log10p'])} | "
                     f"{r['wall_s']:.1f} s | {r['passes']} | {r['peak_rss_mib']} MiB ({r['rss_models_mib']}) |")
    pruned = [r for r in rows if r["pair"] == "pruned"]
    lines += ["", "log10 p of each layer of the pruned model against its base layer (its best base layer, "
              "mapped or not):", "",
              "| layer of B | base layer | " + " | ".join(f"`{r['stat']}`" for r in pruned) + " |",
              "|---|---|" + "---|" * len(pruned)]
    for j, i in enumerate(kept):
        cells = [_fmt_p(r["per_layer_log10p"][j]) + ("" if r["mapping"][j] == i else " (not mapped)")
                 for r in pruned]
        lines.append(f"| {j} | {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200, help="training steps of the base and independent models")
    ap.add_argument("--blocks", type=int, default=16, help="token blocks (of --block_size) for the activations")
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the statistics (training uses 1)")
    ap.add_argument("--markdown", default=None, help="also write the tables to this markdown file (for README)")
    ap.add_argument("--one", nargs=3, metavar=("FOLDER", "STAT", "PAIR"), help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, threads=args.threads)), flush=True)
        return
    command = shlex.join(["python", "benchmarks/localized.py", *sys.argv[1:]])
    started = datetime.now(timezone.utc)
    print(command, flush=True)
    with tempfile.TemporaryDirectory(prefix="localized-") as folder:
        built = build(folder, args.layers, args.hidden, args.steps, args.blocks, args.block_size)
        print(f"trained and pruned in {built['train_s']} s; kept layers {built['kept']}", flush=True)
        rows = []
        for stat in STATS:
            for pair in ("pruned", "independent"):
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", folder, stat, pair,
                                      "--threads", str(args.threads)], check=True, capture_output=True, text=True)
                rows.append(json.loads(out.stdout.splitlines()[-1]))
                r = rows[-1]
                print(f"{stat:22s} {pair:11s} {r['wall_s']:7.2f} s  log10 p {_fmt_p(r['log10p']):>8s}  "
                      f"mapping {r['mapping']}", flush=True)
    meta = (f"`{command}`: {args.layers} layers, hidden {args.hidden}, MLP {3 * args.hidden}, trained {args.steps} "
            f"steps; B keeps layers {built['kept']} with {2 * args.hidden} MLP neurons each; "
            f"{rows[0]['tokens']} tokens of held-out text. {started:%Y-%m-%d}, {platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} torch threads, load average "
            f"{os.getloadavg()[0]:.1f}.")
    text = report(rows, built["kept"], meta)
    print(text)
    if args.markdown:
        from tracing.docs import write_markdown

        print(f"wrote {write_markdown(args.markdown, text)}")


if __name__ == "__main__":
    main()
