"""bf16 against float32 on the CPU: do the activation statistics keep their p-values and verdicts?

    python benchmarks/cpu_dtype.py                      # ~6 min on 2 cores (demo models built if missing)
    python benchmarks/cpu_dtype.py --skip_135m          # ~3 min
    python benchmarks/cpu_dtype.py --markdown docs/generated/cpu_dtype.md

Every row runs one pair through the single-pair pipeline (`tracing.pipeline.run_pair`) twice, with
`--dtype float32` and with `--dtype bfloat16` (the models loaded, and run, in that dtype), and shows both
log10 p-values and whether the verdict at p <= 0.01 is the same (jsd has no p-value: its value). The CPU
default (`--dtype` unset) is bfloat16 where both checkpoints are stored in bfloat16, else float32. Pairs:
- demo: `python main.py --demo`'s models (results/demo: trained tiny Llamas, stored in float32), base against
  its fine-tuned and permuted derivative and against the independent model, on the demo's held-out text;
- zoo: tiny random-init models of three families (tracing.zoo; llama, qwen2, gpt2), base against base
  fine-tuned 30 steps and against another initialisation, each pair saved in float32 and in bfloat16 (the
  stored dtype of most published checkpoints);
- 135M: Llamas with SmolLM2-135M's shape, random init, stored in bfloat16: base against its rotated copy and
  against another initialisation (4 blocks of 128 random tokens, as benchmarks/laptop.py).
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
from pathlib import Path

import bench_common

STATS_GATED = ("csh", "match", "match_all", "jsd", "mode")
STATS_UNGATED = ("csh", "jsd", "mode")
ALPHA = 0.01


def zoo_pairs(root: Path) -> list[tuple[str, str, str, dict]]:
    """(label, base dir, ft dir, data options) for the zoo pairs, saved under root."""
    import torch

    from tracing import zoo

    tok = zoo.build_tokenizer(zoo.synthetic_text(3000, seed=0), vocab_size=512)
    ids = torch.tensor(tok(zoo.synthetic_text(3000, seed=0))["input_ids"])
    (root / "text.txt").write_text(zoo.synthetic_text(800, seed=99))
    data = dict(dataset=str(root / "text.txt"), block_size=64, max_blocks=8, batch_size=8)
    out = []
    for family in ("llama", "qwen2", "gpt2"):
        base = zoo.tiny_model(family, seed=0, vocab_size=len(tok))
        derived = zoo.finetune(copy.deepcopy(base), ids, steps=30, lr=1e-3)
        models = {"base": base, "derived": derived, "independent": zoo.tiny_model(family, seed=1, vocab_size=len(tok))}
        for stored in ("float32", "bfloat16"):
            for name, model in models.items():
                d = root / f"{family}-{stored}" / name
                copy.deepcopy(model).to(getattr(torch, stored)).save_pretrained(d)
                tok.save_pretrained(d)
            for ft in ("derived", "independent"):
                out.append((f"zoo {family} (stored {stored}) vs {ft}", str(root / f"{family}-{stored}" / "base"),
                            str(root / f"{family}-{stored}" / ft), data))
    return out


def pairs_135m(root: Path) -> list[tuple[str, str, str, dict]]:
    import laptop

    dirs = laptop.build_135m(root / "135m")
    data = dict(dataset="random", block_size=128, max_blocks=4, batch_size=4)
    return [("135M (stored bfloat16) vs rotated", str(dirs["base"]), str(dirs["rotated"]), data),
            ("135M (stored bfloat16) vs independent", str(dirs["base"]), str(dirs["independent"]), data)]


def demo_pairs() -> list[tuple[str, str, str, dict]]:
    from tracing.demo import ensure_demo_models

    root = ensure_demo_models(progress=False)
    data = dict(dataset=str(root / "text.txt"), block_size=64, max_blocks=8, batch_size=8)
    return [(f"demo (stored float32) vs {ft}", str(root / "base"), str(root / ft), data)
            for ft in ("derived", "independent")]


def run(base: str, ft: str, stat: str, dtype: str, data: dict, out: Path) -> tuple[float | None, float]:
    """(log10 p (None for jsd, which has none), value) of one run of the pipeline."""
    from tracing.config import RunConfig
    from tracing.pipeline import run_pair

    extra = dict(num_perm=19) if stat == "mode" else {}
    cfg = RunConfig(base_model_id=base, ft_model_id=ft, stat=stat, dtype=dtype, device="cpu", save=str(out),
                    no_progress=True, **data, **extra)
    rec = run_pair(cfg)
    if rec["status"] != "ok":
        raise RuntimeError(f"{stat} {base} vs {ft} ({dtype}) failed: {rec['error']}")
    p = rec["log10_pvalue"]
    return None if p is None else float(p), float(rec["value"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", help="write the table here")
    ap.add_argument("--skip_135m", action="store_true", help="leave out the 135M-shaped pairs (~2 min)")
    args, head, t0 = bench_common.start(ap)

    from tracing.arch import get_spec
    from tracing.checkpoints import locate
    from tracing.models import read_config

    lines = ["| pair | statistic | log10 p, float32 | log10 p, bfloat16 | same verdict (p <= 0.01) |",
             "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pairs = demo_pairs() + zoo_pairs(root) + ([] if args.skip_135m else pairs_135m(root))
        for label, base, ft, data in pairs:
            gated = get_spec(read_config(locate(base, None), base, token=None, trust_remote_code=False)).gated
            stats = ("csh", "match") if label.startswith("135M") else STATS_GATED if gated else STATS_UNGATED
            for stat in stats:
                (p32, v32), (p16, v16) = (run(base, ft, stat, dt, data, root / "results")
                                          for dt in ("float32", "bfloat16"))
                if p32 is None:  # jsd: a divergence, no p-value
                    cells = f"value {v32:.4g} | value {v16:.4g} | no p-value"
                else:
                    same = (p32 <= math.log10(ALPHA)) == (p16 <= math.log10(ALPHA))
                    cells = f"{p32:.2f} | {p16:.2f} | {'yes' if same else '**no**'}"
                lines.append(f"| {label} | `{stat}` | {cells} |")
                print(lines[-1], flush=True)
    bench_common.publish(lines, head, t0, args.markdown)


if __name__ == "__main__":
    main()
