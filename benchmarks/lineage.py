"""The lineage scoreboard: every derivation kind of tracing/derivations on trained bases of several families, every
statistic and `auto` on each (base, derived) pair; detection per kind, AUC and TPR@1%FPR over all kinds,
false positives on the nulls, wall time and peak RSS per pair, and whether auto's derivation line names the kind.

    python benchmarks/lineage.py --markdown docs/generated/lineage.md          # ~30 min on 2 cores, zoo cached
    python benchmarks/lineage.py --families llama --stats auto,csu --kinds finetune,permute,independent

The zoo is built once under --zoo (default results/lineage/zoo: a base per family, 4 blocks, trained 200 steps on
text the project generates, and one checkpoint per kind, each with its truth.json) and reused while the recipes'
code and the library versions are unchanged. Every run is main.py's pipeline in this process (run_pair), records
under --zoo/records. Writes docs/generated/lineage.csv (one row per pair and statistic) and lineage_roc.png.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import time
from pathlib import Path

from bench_common import ROOT, publish, start

sys.path.insert(0, ROOT)

STATS = ("auto", "csu", "csu --align", "csu_all", "csh", "match", "match_all", "match_all_drift_free", "l2",
         "cos", "emb", "jsd", "mode")
FAMILIES = ("llama", "qwen2", "gpt_neox")
SHAPE = dict(hidden=64, layers=4, intermediate=192, heads=4, kv_heads=2)
# what auto's derivation line must say for each kind (a merge of two fine-tunes of the base cannot be told from a
# fine-tune without the fine-tunes themselves: the catalogue's merge attribution can; here "fine-tuned" is right)
EXPECT = {"finetune": "fine-tuned", "finetune-long": "fine-tuned", "lora": "fine-tuned", "lora-adapter": "LoRA",
          "vocab-extend": "vocabulary extended", "tokenizer-transplant": "tokenizer replaced",
          "depth-upscale": "depth up-scaled", "layer-prune": "layers kept", "layer-prune-healed": "layers kept",
          "width-prune-mlp": "MLP", "width-prune-mlp-healed": "MLP", "width-prune-hidden": "hidden size",
          "merge-linear": "fine-tuned", "merge-slerp": "fine-tuned", "merge-task-arithmetic": "fine-tuned",
          "merge-ties": "fine-tuned", "merge-dare": "fine-tuned", "passthrough": "not from base",
          "quant-int8": "8-bit", "quant-int4": "4-bit", "quant-gguf-q8_0": "8-bit", "quant-gguf-q4_0": "4-bit",
          "permute": "permuted", "rotate": "re-based"}


def build_key() -> str:
    """What decides the zoo's bits: the recipes' code, the shape, and the libraries that train."""
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256()
    for path in sorted((Path(ROOT) / "tracing" / "derivations").glob("*.py")):
        h.update(path.read_bytes())
    h.update(json.dumps([SHAPE, torch.__version__, transformers.__version__, tokenizers.__version__]).encode())
    return h.hexdigest()[:16]


def build(zoo: Path, family: str, kinds: list[str]) -> dict[str, dict]:
    """The family's base and one checkpoint per kind under zoo/family (reused when built by the same code):
    kind -> {"path", "truth"} or {"refused": why}."""
    import torch

    from tracing import derivations
    from tracing import zoo as tiny
    from tracing.errors import TracingError

    root = zoo / family
    key_file = root / "build.json"
    built = json.loads(key_file.read_text()) if key_file.exists() else {}
    if built.get("key") != build_key():
        built = {"key": build_key(), "kinds": {}}
    tok = tiny.build_tokenizer(tiny.synthetic_text(3000, seed=0), vocab_size=512)
    ids = torch.tensor(tok(tiny.synthetic_text(4000, seed=1))["input_ids"])
    base_dir = root / "base"
    if not (base_dir / "config.json").exists() or not built["kinds"]:
        base = derivations.pretrain(tiny.tiny_config(family, vocab_size=len(tok), **SHAPE), ids, seed=0)
        base.save_pretrained(base_dir)
        tok.save_pretrained(base_dir)
        (zoo / "text.txt").write_text(tiny.synthetic_text(800, seed=11))  # held-out text for data statistics
    else:
        import transformers
        base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).float().eval()
    for kind in kinds:
        if kind in built["kinds"]:
            continue
        t0 = time.perf_counter()
        try:
            d = derivations.derive(kind, base, tok, ids)
            path = derivations.save(d, root / kind, base_dir=base_dir)
            built["kinds"][kind] = {"path": str(path), "truth": d.truth, "build_s": time.perf_counter() - t0}
        except TracingError as e:
            built["kinds"][kind] = {"refused": str(e)}
        key_file.write_text(json.dumps(built, indent=1))
        print(f"  {family}/{kind}: {built['kinds'][kind].get('refused') or f'{time.perf_counter() - t0:.1f} s'}",
              flush=True)
    return {k: v for k, v in built["kinds"].items() if k in kinds}


def run(zoo: Path, base_dir: Path, ft: str, stat: str) -> dict:
    """One statistic on one pair through the pipeline: the record's numbers, or why it did not run."""
    from tracing.config import RunConfig
    from tracing.errors import TracingError
    from tracing.pipeline import run_pair

    name, *flags = stat.split()
    cfg = RunConfig(base_model_id=str(base_dir), ft_model_id=ft, stat=name, align="--align" in flags, device="cpu",
                    dataset=str(zoo / "text.txt"), block_size=64, max_blocks=8, save=str(zoo / "records"),
                    no_progress=True, threads=1)
    try:
        rec = run_pair(cfg)
    except TracingError as e:  # refused before anything ran: the statistic does not fit the pair
        return {"status": "n/a", "error": str(e), "log10_pvalue": None, "value": None}
    p = rec["aligned_log10_pvalue"] if "--align" in flags else rec["log10_pvalue"]
    value = rec["aligned_value"] if "--align" in flags else rec["value"]
    out = {"status": rec["status"], "log10_pvalue": p, "value": value, "wall_s": rec["wall_time_s"],
           "peak_rss_mib": rec["peak_rss_mib"], "error": rec.get("error")}
    if name == "auto" and rec["status"] == "ok":
        out["derivation"] = rec["extras"]["derivation"]
        out["tests"] = " ".join(f"{t['test']}:{t['log10_pvalue']:.1f}" for t in rec["extras"]["tests"])
    return out


def related_score(stat: str, r: dict) -> float | None:
    from tracing.statistics import get_stat

    if r["status"] != "ok":
        return None
    if r["log10_pvalue"] is not None:
        return -r["log10_pvalue"]
    if r["value"] is None:
        return None
    return r["value"] if get_stat(stat.split()[0]).higher_is_related else -r["value"]


def auc_tpr(pos: list[float], neg: list[float]) -> tuple[float | None, float | None]:
    """AUC (ties count half) and the TPR at 1% FPR: positives scoring above every score that at most 1% of the
    negatives reach (with fewer than 100 negatives: above the largest)."""
    if not pos or not neg:
        return None, None
    auc = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    cut = sorted(neg)[max(0, math.ceil(0.99 * len(neg)) - 1)]
    return auc, sum(p > cut for p in pos) / len(pos)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=str(Path(ROOT) / "results" / "lineage"))
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--kinds", default=None, help="comma-separated (default: every kind)")
    ap.add_argument("--stats", default=",".join(STATS))
    ap.add_argument("--markdown", default=None)
    args, head, t0 = start(ap)
    import torch

    from tracing import plots
    from tracing.derivations import KINDS

    torch.set_num_threads(1)
    zoo = Path(args.zoo)
    kinds = args.kinds.split(",") if args.kinds else list(KINDS)
    stats = args.stats.split(",")
    rows = []
    for family in args.families.split(","):
        print(f"building {family}", flush=True)
        for kind, item in build(zoo, family, kinds).items():
            if "refused" in item:
                continue
            for stat in stats:
                r = run(zoo, zoo / family / "base", item["path"], stat)
                r.update(family=family, kind=kind, stat=stat, derived=item["truth"]["derived"])
                rows.append(r)
                shown = r["log10_pvalue"] if r["log10_pvalue"] is not None else r.get("value")
                print(f"  {family:9} {kind:24} {stat:22} {r['status']:6} {shown if shown is None else f'{shown:.4g}'}"
                      f"  {r.get('derivation', '')}", flush=True)
    out_dir = Path(args.markdown).parent if args.markdown else zoo
    with open(out_dir / "lineage.csv", "w", newline="") as f:
        keys = ["family", "kind", "derived", "stat", "status", "log10_pvalue", "value", "wall_s", "peak_rss_mib",
                "derivation", "tests", "error"]
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = tables(rows, stats, kinds)
    curves = {}
    for stat in stats:
        pos = [s for r in rows if r["stat"] == stat and r["derived"] and (s := related_score(stat, r)) is not None]
        neg = [s for r in rows if r["stat"] == stat and not r["derived"] and (s := related_score(stat, r)) is not None]
        if pos and neg:
            curves[stat] = (pos, neg)
    plots.roc_curves(curves, str(out_dir / "lineage_roc.png"))
    lines.append("\n![ROC curves of every statistic over all kinds](lineage_roc.png)")
    publish(lines, head, t0, args.markdown)
    return 0


def tables(rows: list[dict], stats: list[str], kinds: list[str]) -> list[str]:
    """The summary table (per statistic) and the per-kind table (log10 p, worst family)."""
    lines = ["| statistic | AUC | TPR@1%FPR | derived kinds detected (log10 p < -6) | nulls called related "
             "(p <= 0.01) | runs that did not fit | median wall / pair | max peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for stat in stats:
        rs = [r for r in rows if r["stat"] == stat]
        pos = [s for r in rs if r["derived"] and (s := related_score(stat, r)) is not None]
        neg = [s for r in rs if not r["derived"] and (s := related_score(stat, r)) is not None]
        auc, tpr = auc_tpr(pos, neg)
        det = [r for r in rs if r["derived"]]
        hit = sum(1 for r in det if r["log10_pvalue"] is not None and r["log10_pvalue"] < -6)
        nulls = [r for r in rs if not r["derived"] and r["log10_pvalue"] is not None]
        fp = sum(1 for r in nulls if r["log10_pvalue"] <= -2)
        na = sum(1 for r in rs if r["status"] != "ok")
        walls = sorted(r["wall_s"] for r in rs if r.get("wall_s") is not None)
        rss = max((round(r["peak_rss_mib"]) for r in rs if r.get("peak_rss_mib")), default=None)
        has_p = any(r["log10_pvalue"] is not None for r in rs)
        lines.append(f"| `{stat}` | {'-' if auc is None else f'{auc:.3f}'} | {'-' if tpr is None else f'{tpr:.3f}'} "
                     f"| {f'{hit}/{len(det)}' if has_p else 'no p-value'} | {f'{fp}/{len(nulls)}' if has_p else '-'} "
                     f"| {na} | {walls[len(walls) // 2]:.2f} s | {rss} MiB |" if walls else f"| `{stat}` | - | - | - "
                     f"| - | {na} | - | - |")
    lines += ["", "log10 p per kind (the largest over the families, i.e. the weakest detection; `n/a`: the "
              "statistic does not fit the pair; values for statistics without p-values are not shown); auto's "
              "derivation line, and whether it names the kind:", ""]
    shown = [s for s in stats if any(r["stat"] == s and r["log10_pvalue"] is not None for r in rows)]
    lines += ["| kind | derived | " + " | ".join(f"`{s}`" for s in shown) + " | auto's derivation line (first family) "
              "| line right |", "|---|---|" + "---|" * len(shown) + "---|---|"]
    for kind in kinds:
        rk = [r for r in rows if r["kind"] == kind]
        if not rk:
            continue
        cells = []
        for s in shown:
            ps = [r["log10_pvalue"] for r in rk
                  if r["stat"] == s and r["status"] == "ok" and r["log10_pvalue"] is not None]
            cells.append(f"{max(ps):.1f}" if ps else "n/a")
        autos = [r for r in rk if r["stat"] == "auto" and r.get("derivation")]
        line = autos[0]["derivation"] if autos else "-"
        want = EXPECT.get(kind, "unrelated")
        right = all(want in r["derivation"] for r in autos) if autos else False
        lines.append(f"| {kind} | {'yes' if rk[0]['derived'] else 'no (null)'} | " + " | ".join(cells)
                     + f" | {line} | {'yes' if right else 'no'} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
