"""Benchmark of localized testing on a pruned model: which layer of B comes from which layer of A?

    python benchmarks/localized.py                                   # 24 layers, hidden 64, trained 50 steps
    python benchmarks/localized.py --markdown docs/generated/localized.md   # also write README's table
    python benchmarks/localized.py --blocks 16 2                     # also with 256 tokens
    python benchmarks/localized.py --layers 12 --blocks 4            # a quick look

A Llama-architecture base (hidden H, MLP 3H, `--layers` L) is trained `--steps` Adam steps on text the project
generates (so it is not a random init); B = the base with every third layer removed and, in each kept layer,
the third of the MLP neurons with the smallest |gate|·|up|·|down| norms pruned (no healing: every kept weight
is the base's); C = an independent model trained the same way from another seed. match_all (activations of
both models), match_all_drift_free (B's weights on A's MLP inputs) and csu_all (weights only) then run on
(A, B) and (A, C) on held-out text (`--blocks` blocks of `--block_size` tokens; several values: one run each),
each in a fresh process that loads the saved models; printed: how many kept layers are mapped to their base
layer, how many layers are mapped wrongly, the log10 p of each kept layer, wall time, forward passes per
model and peak RSS (VmHWM, reset after loading).
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
    held_out = torch.tensor(tok(zoo.synthetic_text(4000, seed=2))["input_ids"])[:n_blocks * block_size]
    torch.save(held_out.reshape(n_blocks, block_size), os.path.join(folder, "blocks.pt"))  # (n_blocks, T)
    return {"kept": kept, "train_s": round(time.perf_counter() - t0, 1)}


def run_one(folder: str, stat: str, pair: str, threads: int, n_blocks: int) -> dict:
    import transformers

    torch.set_num_threads(threads)
    from tracing.arch import get_spec
    from tracing.statistics import StatContext, get_stat

    base = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(folder, "base")).eval()
    other = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(folder, pair)).eval()
    blocks = torch.load(os.path.join(folder, "blocks.pt"))[:n_blocks]  # (n_blocks, T)
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


def _capture(model, blocks: torch.Tensor, points: dict, what: str) -> dict:
    """key -> the input (`what` "input") or output of module points[key] for every token: (tokens, width)."""
    got: dict = {}

    def keep(key):
        def hook(module, inputs, output) -> None:  # returns None: the output is left alone
            t = inputs[0] if what == "input" else output
            got[key] = t.reshape(-1, t.shape[-1])
        return hook

    hooks = [module.register_forward_hook(keep(key)) for key, module in points.items()]
    with torch.no_grad():
        model(input_ids=blocks)
    for h in hooks:
        h.remove()
    return got


def _mlp_inputs(model, blocks: torch.Tensor) -> dict[int, torch.Tensor]:
    """layer -> the MLP input (what gate/up read) of every token: (tokens, hidden)."""
    return _capture(model, blocks, {i: layer.mlp.up_proj for i, layer in enumerate(model.model.layers)}, "input")


def input_drift(folder: str, kept: list[int], n_blocks: int) -> list[float]:
    """Depth drift, measured: per kept layer j, the mean cosine (over tokens) between B's MLP input at layer j
    and A's at layer kept[j] on the same text (1.0: no drift)."""
    import transformers

    blocks = torch.load(os.path.join(folder, "blocks.pt"))[:n_blocks]  # (n_blocks, T)
    x = {name: _mlp_inputs(transformers.AutoModelForCausalLM.from_pretrained(os.path.join(folder, name)).eval(),
                           blocks) for name in ("base", "pruned")}
    return [float(torch.nn.functional.cosine_similarity(x["base"][i], x["pruned"][j], dim=1).mean())
            for j, i in enumerate(kept)]



def _projections(model, blocks: torch.Tensor) -> dict:
    """(proj, layer) -> gate_proj / up_proj outputs of every token, float64: (tokens, width)."""
    points = {(p, i): getattr(layer.mlp, f"{p}_proj") for i, layer in enumerate(model.model.layers)
              for p in ("gate", "up")}
    return {k: v.double() for k, v in _capture(model, blocks, points, "output").items()}


def similarity_power(folder: str, kept: list[int], n_blocks: int) -> list[dict]:
    """Per kept layer j (base layer kept[j]): match's log10 p with each similarity (cosine, as the greedy screen
    of --matching fast uses; -squared distance, the original's cost) and each solver (greedy, exact)."""
    import numpy as np
    import transformers

    from tracing.matching import euclid_similarity, pair_units, usable
    from tracing.statistics.pvalues import perm_pair_spearman

    blocks = torch.load(os.path.join(folder, "blocks.pt"))[:n_blocks]  # (n_blocks, T)
    acts = {name: _projections(transformers.AutoModelForCausalLM.from_pretrained(os.path.join(folder, name))
                               .eval(), blocks) for name in ("base", "pruned")}
    rows = []
    for j, i in enumerate(kept):
        xa = {p: acts["base"][p, i] for p in ("gate", "up")}  # (tokens, width_A)
        xb = {p: acts["pruned"][p, j] for p in ("gate", "up")}  # (tokens, width_B)
        ok_a = usable(xa["gate"].T) & usable(xa["up"].T)
        ok_b = usable(xb["gate"].T) & usable(xb["up"].T)
        gram = {p: xa[p].T @ xb[p] for p in xa}  # (width_A, width_B)
        sq_a, sq_b = ({p: x[p].square().sum(0) for p in x} for x in (xa, xb))
        sims = {"cosine": {p: gram[p] / sq_a[p].sqrt()[:, None] / sq_b[p].sqrt()[None, :] for p in gram},
                "-distance": {p: euclid_similarity(gram[p], sq_a[p], sq_b[p]) for p in gram}}
        row = {}
        for name, sim in sims.items():
            for solver in ("greedy", "lap"):
                gate, up = (pair_units(sim[p], ok_a, ok_b, solver, (0, i, j, k)).partner()
                            for k, p in enumerate(("gate", "up")))
                common = sorted(set(gate) & set(up))
                row[name, solver] = perm_pair_spearman(np.array([gate[k] for k in common]),
                                                       np.array([up[k] for k in common]))[1]
        rows.append(row)
    return rows

def _fmt_p(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def report(rows: list[dict], kept: list[int], meta: str, drift: list[float], power: list[dict]) -> str:
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
              "mapped or not), and the depth drift: mean cosine between B's MLP input and A's on the same tokens:",
              "", "| layer of B | base layer | MLP-input cosine | " + " | ".join(f"`{r['stat']}`" for r in pruned)
              + " |", "|---|---|---|" + "---|" * len(pruned)]
    for j, i in enumerate(kept):
        cells = [_fmt_p(r["per_layer_log10p"][j]) + ("" if r["mapping"][j] == i else " (not mapped)")
                 for r in pruned]
        lines.append(f"| {j} | {i} | {drift[j]:.3f} | " + " | ".join(cells) + " |")
    if power:
        lines += ["", "match's log10 p per kept layer with each similarity and solver (`--matching fast` screens with "
                  "greedy on cosines and runs the exact assignment on -squared distances where 1e-10 < that p < 0.01; "
                  "`exact` is the last column):", "",
                  "| layer of B | base layer | cosine, greedy | cosine, exact | -distance, greedy | -distance, exact |",
                  "|---|---|---|---|---|---|"]
        for j, (i, row) in enumerate(zip(kept, power)):
            lines.append(f"| {j} | {i} | " + " | ".join(f"{row[k]:.1f}" for k in (("cosine", "greedy"),
                         ("cosine", "lap"), ("-distance", "greedy"), ("-distance", "lap"))) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50, help="training steps of the base and independent models")
    ap.add_argument("--blocks", type=int, nargs="+", default=[16],
                    help="token blocks (of --block_size) for the activations; several: one run each")
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the statistics (training uses 1)")
    ap.add_argument("--markdown", default=None, help="also write the tables to this markdown file (for README)")
    ap.add_argument("--one", nargs=3, metavar=("FOLDER", "STAT", "PAIR"), help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, threads=args.threads, n_blocks=args.blocks[0])), flush=True)
        return
    command = shlex.join(["python", "benchmarks/localized.py", *sys.argv[1:]])
    started = datetime.now(timezone.utc)
    print(command, flush=True)
    with tempfile.TemporaryDirectory(prefix="localized-") as folder:
        built = build(folder, args.layers, args.hidden, args.steps, max(args.blocks), args.block_size)
        print(f"trained and pruned in {built['train_s']} s; kept layers {built['kept']}", flush=True)
        runs, drift, power = {}, {}, {}  # n_blocks -> rows, per kept layer MLP-input cosine, p per similarity
        for n_blocks in args.blocks:
            drift[n_blocks] = input_drift(folder, built["kept"], n_blocks)
            print(f"depth drift (MLP-input cosine per kept layer): {[round(c, 3) for c in drift[n_blocks]]}")
            power[n_blocks] = similarity_power(folder, built["kept"], n_blocks)
            for stat in STATS:
                for pair in ("pruned", "independent"):
                    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", folder, stat, pair,
                                          "--threads", str(args.threads), "--blocks", str(n_blocks)],
                                         check=True, capture_output=True, text=True)
                    r = json.loads(out.stdout.splitlines()[-1])
                    runs.setdefault(n_blocks, []).append(r)
                    print(f"{r['tokens']:5d} tokens  {stat:22s} {pair:11s} {r['wall_s']:7.2f} s  log10 p "
                          f"{_fmt_p(r['log10p']):>8s}  mapping {r['mapping']}", flush=True)
    meta = (f"`{command}` ({(time.time() - started.timestamp()) / 60:.0f} min): {args.layers} layers, hidden "
            f"{args.hidden}, MLP {3 * args.hidden}, trained {args.steps} steps ({built['train_s']:.0f} s); B keeps "
            f"layers {built['kept']} with {2 * args.hidden} MLP neurons each. {started:%Y-%m-%d}, "
            f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} torch threads, "
            f"load average {os.getloadavg()[0]:.1f}.")
    text = "\n".join(report(rows, built["kept"], f"**{rows[0]['tokens']} tokens of held-out text.**", drift[n],
                            power[n]) for n, rows in runs.items())
    text = meta + "\n\n" + text
    print(text)
    if args.markdown:
        from tracing.docs import write_markdown

        print(f"wrote {write_markdown(args.markdown, text)}")


if __name__ == "__main__":
    main()
