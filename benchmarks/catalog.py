"""The catalogue benchmark: identify's verdicts against the pair runs' (auto) on the derivation zoo, a query against
50 catalogued 135M-shaped models against one csu pair run, the catalogue's size against the models', the calibration
of the fingerprint tests under the null, and the projection to 10,000 catalogued 7B models.

    python benchmarks/catalog.py --build                       # untimed: zoo, catalogues, pair runs (cached)
    flock -x /work/cpu.lock python benchmarks/catalog.py --markdown docs/generated/catalog.md    # the timed part

Zoo (under --work, default results/catalog_bench): 10 catalogued models of four families, trained 200 steps on
the project's text (tracing.derivations.pretrain; 4 blocks, hidden 64, MLP 192): llama-0/1/2, qwen2-3/4, gpt2-5/6,
gpt_neox-7/8 and llama-0-chat (finetune-long of llama-0), each seed once. llama-1 and llama-2 are the recipes'
own independent models of seeds 1 and 2, so the passthrough suspect takes its upper blocks from llama-1 and the
merge of independents (seeds 1, 2) merges two catalogued models. Suspects: derivation recipes of llama-0, qwen2-3,
gpt2-5 and gpt_neox-7, and nulls of seeds 11.. (not catalogued). A suspect's truth: the catalogued models it shares a
random initialisation with. Pair runs: auto on (candidate, suspect) through main.py's pipeline for every catalogued
model of the suspect's family (cached, run under the shared lock: their times are not comparable).

Scale: 50 Llamas with the SmolLM2-135M shape (30 layers, hidden 576, MLP 1536, vocab 49152, tied embeddings),
random initialisations (no trained 135M model can be downloaded here), bf16 safetensors (269 MB each), added one
by one and deleted after their fingerprint was taken except the one the suspect is derived from (its weights plus
1% noise). Timed: `python -m tracing.catalog identify` and `python main.py --stat csu` as fresh processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_common import ROOT, publish, start

sys.path.insert(0, ROOT)

SHAPE = dict(hidden=64, layers=4, intermediate=192, heads=4, kv_heads=2)
# name -> (family, seed): every seed once (one seed gives one initialisation whatever the model type: a qwen2 of
# seed 0 shares the llama of seed 0's initial MLP weights, and the tests rightly call them related)
CATALOGUE = {"llama-0": ("llama", 0), "llama-1": ("llama", 1), "llama-2": ("llama", 2), "qwen2-3": ("qwen2", 3),
             "qwen2-4": ("qwen2", 4), "gpt2-5": ("gpt2", 5), "gpt2-6": ("gpt2", 6), "gpt_neox-7": ("gpt_neox", 7),
             "gpt_neox-8": ("gpt_neox", 8)}  # + llama-0-chat
LLAMA_KINDS = ("finetune", "lora", "lora-adapter", "depth-upscale", "layer-prune", "layer-prune-healed",
               "width-prune-mlp", "width-prune-mlp-healed", "width-prune-hidden", "vocab-extend",
               "tokenizer-transplant", "merge-linear", "merge-ties", "passthrough", "quant-int8", "permute", "rotate")
OTHER = {"qwen2-3": ("finetune", "depth-upscale"), "gpt2-5": ("finetune", "width-prune-mlp", "permute"),
         "gpt_neox-7": ("vocab-extend", "permute")}
NULLS = {"independent": 11, "independent-other-data": 12, "damaged-zeroed": 13, "damaged-duplicated": 14,
         "merge-of-independents": 15}
N_SCALE, PARENT = 50, 17
SMOLLM = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
              num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)


# ---------------------------------------------------------------------- the zoo
def build_zoo(work: Path) -> dict:
    """Catalogue the zoo and save the suspects (cached in work/zoo.json)."""
    import torch

    from tracing import zoo as tiny
    from tracing.catalog import add_models
    from tracing.derivations import derive, pretrain, save

    done = work / "zoo.json"
    if done.exists():
        return json.loads(done.read_text())
    torch.set_num_threads(1)
    tok = tiny.build_tokenizer(tiny.synthetic_text(3000, seed=0), vocab_size=512)
    ids = torch.tensor(tok(tiny.synthetic_text(4000, seed=1))["input_ids"])
    models, paths = {}, {}
    for name, (family, seed) in CATALOGUE.items():
        models[name] = pretrain(tiny.tiny_config(family, vocab_size=len(tok), **SHAPE), ids, seed=seed)
        print(f"  trained {name}", flush=True)
    models["llama-0-chat"] = derive("finetune-long", models["llama-0"], tok, ids).model
    for name, model in models.items():
        model.save_pretrained(work / "models" / name)
        tok.save_pretrained(work / "models" / name)
        paths[name] = str(work / "models" / name)
    add_models(work / "zoo-catalogue", [(paths[n], n) for n in models])
    suspects = {}
    jobs = [(f"llama-0/{k}", "llama-0", k, {}) for k in LLAMA_KINDS]
    jobs += [(f"{base}/{k}", base, k, {}) for base, kinds in OTHER.items() for k in kinds]
    jobs += [(f"llama-0/{k}", "llama-0", k, {"seed": s}) for k, s in NULLS.items()]
    jobs += [("llama-0/merge-of-catalogued", "llama-0", "merge-of-independents", {"seed": 1})]
    jobs += [(f"{b}/independent", b, "independent", {"seed": 11}) for b in ("gpt2-5", "gpt_neox-7")]
    for name, base, kind, options in jobs:
        d = derive(kind, models[base], tok, ids, **options)
        path = save(d, work / "suspects" / name, base_dir=paths[base])
        truth = {n for n in models if _root(n) in roots_of(d.truth, base)}
        suspects[name] = {"path": str(path), "kind": kind, "derived": d.truth["derived"], "truth": sorted(truth),
                          "family": models[base].config.model_type}
        print(f"  saved {name}", flush=True)
    out = {"paths": paths, "suspects": suspects}
    done.write_text(json.dumps(out, indent=1))
    return out


def _root(name: str) -> str:
    """The random initialisation a catalogued model starts from (itself, but for the chat model)."""
    return "llama-0" if name == "llama-0-chat" else name


def roots_of(truth: dict, base: str) -> set[str]:
    """The catalogued initialisations a derived model's weights descend from: its base if derived, and the
    recipes' independent models of seed s (named independent-s), which are the catalogued <family>-s."""
    named = {r for r, _ in truth["layer_map"]} | {p for p in truth["lineage"] if p.startswith("independent-")}
    roots = {base} if truth["derived"] else set()
    prefix = base.rsplit("-", 1)[0]
    return roots | {f"{prefix}-{r.split('-')[1]}" for r in named if r.startswith("independent-")}


def family_of(name: str) -> str:
    """The architecture family of a catalogued model ("gpt2-5") or a suspect ("gpt2-5/width-prune-mlp")."""
    model = name.split("/")[0]
    return "llama" if model.startswith(("llama", "qwen2")) else model.rsplit("-", 1)[0]


def pair_runs(work: Path, z: dict) -> dict:
    """auto on (candidate, suspect) for every catalogued model of the suspect's family (cached)."""
    from tracing.config import RunConfig
    from tracing.pipeline import run_pair

    cache = work / "pair_runs.json"
    runs = json.loads(cache.read_text()) if cache.exists() else {}
    for s, info in z["suspects"].items():
        fam = family_of(s)
        for cand in (c for c in z["paths"] if family_of(c) == fam):
            key = f"{cand} | {s}"
            if key in runs:
                continue
            cfg = RunConfig(base_model_id=z["paths"][cand], ft_model_id=info["path"], stat="auto", device="cpu",
                            save=str(work / "records"), no_progress=True, threads=1)
            rec = run_pair(cfg)
            runs[key] = {"related": rec["extras"]["related"], "log10_pvalue": rec["log10_pvalue"],
                         "derivation": rec["extras"]["derivation"], "wall_s": rec["wall_time_s"]}
            cache.write_text(json.dumps(runs, indent=1))
            print(f"  auto {key}: {runs[key]['log10_pvalue']:.1f} {runs[key]['derivation']}", flush=True)
    return runs


def zoo_table(work: Path, z: dict, runs: dict) -> list[str]:
    import torch

    from tracing.catalog import identify

    torch.set_num_threads(1)
    identify(work / "zoo-catalogue", z["suspects"]["llama-0/finetune"]["path"], confirm=0)  # imports, caches
    lines = ["| suspect | truth | identify: related (log10 p) | pair runs: related | equal | identify's derivation "
             "line | merge attribution | exact tests | identify | pair runs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    agree = 0
    for s, info in z["suspects"].items():
        t0 = time.perf_counter()
        r = identify(work / "zoo-catalogue", info["path"])
        wall = time.perf_counter() - t0
        found = {c["model"]: c for c in r["candidates"]}
        by_pairs = sorted(c for c in found if runs[f"{c} | {s}"]["related"])
        mine = sorted(c for c, x in found.items() if x["related"])
        agree += mine == by_pairs
        shown = ", ".join(f"{c} ({found[c]['log10_pvalue']:.0f})" for c in mine) or "none"
        line = next((found[c]["derivation"] for c in mine), "-")
        merge = r["merge"]["summary"] if r["merge"] and r["merge"].get("merge") else "-"
        pairs_s = sum(runs[f"{c} | {s}"]["wall_s"] for c in found)
        lines.append(f"| {s} | {', '.join(info['truth']) or 'none'} | {shown} | {', '.join(by_pairs) or 'none'} | "
                     f"{'yes' if mine == by_pairs else '**no**'} | {line} | {merge} | "
                     f"{sum(c['confirmed'] for c in r['candidates'])} | {wall:.1f} s | "
                     f"{pairs_s:.1f} s ({len(found)}) |")
        print(lines[-1], flush=True)
    lines.insert(0, f"identify's verdicts equal the pair runs' for {agree} of {len(z['suspects'])} suspects "
                    "(every catalogued model of the suspect's family; other families are not compared).\n")
    return lines


# ---------------------------------------------------------------------- the calibration under the null
def calibration() -> list[str]:
    """Raw layer-pair p-values of both fingerprint tests between independent random initialisations."""
    import numpy as np
    import torch

    from tracing import zoo as tiny
    from tracing.catalog import Settings, build
    from tracing.catalog.compare import _pair_test, shared_anchors
    from tracing.sources.base import ModuleSource

    tok = tiny.build_tokenizer(tiny.synthetic_text(3000, seed=0), vocab_size=512)
    lines = ["| kept units | test | null layer pairs | p <= 0.05 | p <= 0.01 | smallest log10 p |",
             "|---|---|---|---|---|---|"]
    for width, settings in ((192, Settings()), (384, Settings(sample_rows=96))):
        fps = [build(ModuleSource(tiny.tiny_model("llama", seed=s, vocab_size=len(tok), layers=2,
                                                  intermediate=width), tokenizer=tok), settings, name=str(s))
               for s in range(30)]
        for test in ("fingerprint csu", "fingerprint match"):
            ps = []
            for a in range(0, 30, 2):
                for b in range(1, 30, 2):
                    cols = shared_anchors(fps[a], fps[b]) if test.endswith("match") else (None, None)
                    ps += [_pair_test(test, fps[a], fps[b], i, i, cols, "fast", 0, None) for i in range(2)]
            p = 10 ** np.array(ps)
            kept = f"all {width}" if settings.sample_rows >= width else f"{settings.sample_rows} of {width}"
            lines.append(f"| {kept} | {test} | {len(p)} | {(p <= 0.05).mean():.3f} | {(p <= 0.01).mean():.3f} | "
                         f"{np.log10(p.min()):.2f} |")
    torch.set_num_threads(1)
    return lines


# ---------------------------------------------------------------------- 50 catalogued 135M-shaped models
def build_scale(work: Path, n: int) -> dict:
    """`n` random-init SmolLM2-135M-shaped Llamas (bf16) catalogued one by one, each deleted after its add but the
    parent; the suspects: the parent + 1% noise, and one more independent initialisation (cached)."""
    import torch
    import transformers

    from tracing import zoo as tiny
    from tracing.catalog import Catalog, add_models

    done = work / "scale.json"
    if done.exists():
        return json.loads(done.read_text())
    cat_dir, models = work / "scale-catalogue", work / "scale-models"
    tok = tiny.build_tokenizer(tiny.synthetic_text(3000, seed=0), vocab_size=512)  # gives the anchors' ids
    cfg = transformers.LlamaConfig(**SMOLLM)

    def make(seed: int, path: Path, noise_of=None):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg) if noise_of is None else noise_of
        if noise_of is not None:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_((0.01 * p.float().std() * torch.randn(p.shape)).to(p.dtype))
        model.to(torch.bfloat16).save_pretrained(path)
        tok.save_pretrained(path)
        return model

    adds, out = [], {}
    have = {e["name"] for e in Catalog.open(cat_dir).entries} if (cat_dir / "index.json").exists() else set()
    for i in range(n):
        name, path = f"smol-{i:02d}", models / f"smol-{i:02d}"
        if name in have and (i != PARENT or path.exists()):
            continue
        model = make(1000 + i, path)
        t0 = time.perf_counter()
        add_models(cat_dir, [(str(path), name)])
        adds.append({"name": name, "add_s": time.perf_counter() - t0})
        if i == PARENT:
            make(0, models / "suspect-derived", noise_of=model)
        else:
            shutil.rmtree(path)
        del model
    make(5000, models / "suspect-independent")
    out.update(parent=str(models / f"smol-{PARENT:02d}"), derived=str(models / "suspect-derived"),
               independent=str(models / "suspect-independent"), catalogue=str(cat_dir), adds=adds)
    done.write_text(json.dumps(out, indent=1))
    return out


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return time.perf_counter() - t0, p.stdout


def scale_table(work: Path, sc: dict, repeats: int) -> tuple[list[str], dict]:
    """Fresh processes: identify against the catalogue vs one csu pair run (median of `repeats`)."""
    from tracing.catalog import Catalog

    py = sys.executable
    q = work / "query.json"
    ident = [py, "-m", "tracing.catalog", "identify", "--catalog", sc["catalogue"], sc["derived"], "--json", str(q)]
    csu = [py, "main.py", "--base_model_id", sc["parent"], "--ft_model_id", sc["derived"], "--stat", "csu",
           "--device", "cpu", "--save", str(work / "records-scale"), "--no_progress"]
    walls: dict[str, list[float]] = {"identify": [], "csu": []}
    for _ in range(repeats):
        walls["identify"].append(timed(ident)[0])
        walls["csu"].append(timed(csu)[0])
    res = json.loads(q.read_text())
    med = {k: sorted(v)[len(v) // 2] for k, v in walls.items()}
    null_q = work / "query-null.json"
    null_wall = timed([*ident[:6], sc["independent"], "--json", str(null_q), "--confirm", "0"])[0]
    null = json.loads(null_q.read_text())
    csu_null = timed([*csu[:5], sc["independent"], *csu[6:]])[0]
    cat = Catalog.open(sc["catalogue"])
    fp_bytes = [e["fingerprint_bytes"] for e in cat.entries]
    weight_bytes = [e["weight_bytes"] for e in cat.entries]
    on_disk = sum(f.stat().st_size for f in Path(sc["catalogue"]).rglob("*") if f.is_file())
    top = res["candidates"][0]
    s = res["seconds"]
    lines = [f"| what | {len(cat.entries)} catalogued 135M-shaped models |", "|---|---|",
             f"| `identify` (fresh process, median of {repeats}) | **{med['identify']:.1f} s** |",
             f"| one `csu` pair run, related (fresh `python main.py`, median of {repeats}) | **{med['csu']:.1f} s** |",
             f"| ratio (target <= 2) | **{med['identify'] / med['csu']:.2f}** |",
             f"| `identify` inside: suspect's fingerprint / loading {res['compared']} fingerprints / screens / "
             f"tests / exact tests | {s['fingerprint']:.2f} s / {s['load']:.2f} s / {s['screen']:.2f} s / "
             f"{s['tests']:.2f} s / {s['confirm']:.2f} s |",
             f"| answer | {res['verdict']}: {top['model']} log10 p {top['log10_pvalue']:.1f} ({top['decided_by']}), "
             f"{top['derivation']} |",
             f"| candidates the fingerprint tests reached | {sum(bool(c['tests']) for c in res['candidates'])} of "
             f"{res['compared']} |",
             f"| `identify` of an independent model, `--confirm 0` (fresh process) | {null_wall:.1f} s: "
             f"{null['verdict']} (smallest log10 p {min(c['log10_pvalue'] for c in null['candidates']):.2f}) |",
             f"| `csu` pair run on that independent model (fresh process) | {csu_null:.1f} s |",
             f"| catalogue on disk | {on_disk / 2**20:.1f} MiB for {sum(weight_bytes) / 2**30:.1f} GiB of weights: "
             f"**{100 * on_disk / sum(weight_bytes):.2f}%** (target <= 2%) |",
             f"| one fingerprint | {fp_bytes[0] / 2**20:.2f} MiB, {100 * fp_bytes[0] / weight_bytes[0]:.2f}% of "
             f"its {weight_bytes[0] / 2**20:.0f} MiB checkpoint |",
             f"| `add` of one model (hash + one streaming read + write), median over {len(sc['adds'])} | "
             f"{sorted(a['add_s'] for a in sc['adds'])[len(sc['adds']) // 2]:.2f} s |"]
    per = {"identify_s": med["identify"], "csu_s": med["csu"], "seconds": s, "compared": res["compared"],
           "reached": sum(bool(c["tests"]) for c in res["candidates"]), "fp_bytes": fp_bytes[0],
           "weight_bytes": weight_bytes[0], "on_disk": on_disk, "n": len(cat.entries)}
    return lines, per


# ---------------------------------------------------------------------- 10,000 catalogued 7B models
LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000, tie_word_embeddings=False)
READ_GIB_S = 5.4 / 8.5  # cold read rate of this machine's disk (docs/generated/streaming_7b.md: 5.4 GiB in 8.5 s)
GPU_TFLOPS = 32 * 2 * 11008 ** 2 * 4096 / (8.5 - 5.7) / 1e12  # H100: csu's 32 products in 8.5 s - 5.7 s of load


def projection(per: dict) -> list[str]:
    """A 7B-shaped fingerprint measured (2 blocks of Llama-2-7B's shape, random init, in memory), the rest scaled
    from the 135M query."""
    import torch
    import transformers

    from tracing import zoo as tiny
    from tracing.catalog import Settings, build
    from tracing.catalog.fingerprint import to_bytes
    from tracing.sources.base import ModuleSource

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(num_hidden_layers=2, **LLAMA7B))
    tok = tiny.build_tokenizer(tiny.synthetic_text(3000, seed=0), vocab_size=512)
    t0 = time.perf_counter()
    fp = build(ModuleSource(model, tokenizer=tok), Settings(), name="7b-2-layers")
    compute_per_layer = (time.perf_counter() - t0) / 2
    del model
    file_2 = len(to_bytes(fp))
    layer_bytes = sum(t.numel() * t.element_size() for k, t in fp.arrays.items() if k.endswith(".0"))
    fp_7b = file_2 + 30 * layer_bytes + 28 * 40  # 30 more layers (and their scales in the header)
    weights_7b = 6.74e9 * 2  # bf16
    n = 10_000
    screen_per = per["seconds"]["screen"] / per["compared"] * (32 * 32) / (30 * 30)  # layer pairs scale
    load_per = per["seconds"]["load"] / per["compared"] * fp_7b / per["fp_bytes"]
    tests = per["seconds"]["tests"] * (32 * 32) / (30 * 30)  # the few candidates reached, as in the 135M query
    read_suspect = 2 * 32 * 11008 * 4096 * 2 / 2**30 / READ_GIB_S  # up and gate of the suspect, bf16
    cold = n * fp_7b / 2**30 / READ_GIB_S
    screen_flops = 32 * 32 * 32 * 128 * (32 + 48) * 2  # suspect layers x 32 units x candidate layers x 128 x (k + T)
    cpu = read_suspect + 32 * compute_per_layer + n * (load_per + screen_per) + tests
    gpu = read_suspect + n * load_per + n * screen_flops / (GPU_TFLOPS * 1e12) + tests
    return [
        "| quantity | measured / projected |", "|---|---|",
        f"| fingerprint of a 7B model (32 layers; measured on 2 layers of its shape) | {fp_7b / 2**20:.2f} MiB = "
        f"{100 * fp_7b / weights_7b:.3f}% of its {weights_7b / 2**30:.1f} GiB (bf16) |",
        f"| 10,000 catalogued 7B models on disk | {n * fp_7b / 2**30:.1f} GiB (the models: "
        f"{n * weights_7b / 2**40:.0f} TiB) |",
        f"| fingerprinting a 7B model: read (up + gate, {2 * 32 * 11008 * 4096 * 2 / 2**30:.1f} GiB at "
        f"{READ_GIB_S:.2f} GiB/s cold) + compute ({compute_per_layer:.2f} s per layer, measured) | "
        f"{read_suspect + 32 * compute_per_layer:.0f} s |",
        f"| per catalogued candidate: load + screen (135M query's per-candidate times, x (32/30)^2 layer pairs, "
        f"loading x size) | {1000 * (load_per + screen_per):.1f} ms ({1000 * load_per:.1f} + "
        f"{1000 * screen_per:.1f}) |",
        f"| fingerprint tests of the candidates reached ({per['reached']} in the 135M query) | {tests:.1f} s |",
        f"| **one query against 10,000 x 7B on this CPU** (fingerprints in the page cache) | **{cpu / 60:.1f} min** |",
        f"| ... reading 10,000 fingerprints cold from this disk instead | + {cold / 60:.1f} min |",
        f"| **one query with the screens on one GPU** ({screen_flops * n / 1e12:.1f} TFLOP at {GPU_TFLOPS:.0f} "
        f"TFLOP/s, what csu's products reached on the H100 in docs/performance.md; loading and tests as on this "
        f"CPU) | **{gpu / 60:.1f} min** |",
        f"| the same question as pair runs: 10,000 x one `csu` of a 7B pair on one GPU (8.5 s related, 22.5 s "
        f"independent: docs/performance.md) | {10_000 * 22.5 / 3600:.0f} h |",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path(ROOT) / "results" / "catalog_bench"))
    ap.add_argument("--build", action="store_true", help="build (and cache) the zoo, catalogues and pair runs only")
    ap.add_argument("--models", type=int, default=N_SCALE, help="catalogued 135M-shaped models")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", default=None)
    args, head, t0 = start(ap)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    z = build_zoo(work)
    runs = pair_runs(work, z)
    sc = build_scale(work, args.models)
    if args.build:
        return 0
    lines = ["### identify on the zoo", ""] + zoo_table(work, z, runs)
    scale, per = scale_table(work, sc, args.repeats)
    lines += ["", "### One query against 50 catalogued 135M-shaped models", ""] + scale
    lines += ["", "### Calibration of the fingerprint tests under the null (independent random initialisations, "
              "raw layer-pair p-values)", ""] + calibration()
    lines += ["", "### Projected: 10,000 catalogued 7B models", ""] + projection(per)
    publish(lines, head, t0, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
