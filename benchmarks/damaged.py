"""Issue 11's table re-run: no false "related" on the demo models when one side is damaged.

    python benchmarks/damaged.py                                  # ~3 min on 2 cores (demo models reused)
    python benchmarks/damaged.py --markdown docs/generated/damaged.md

The demo's models (`python main.py --demo` recipe, built under results/demo/ when missing): base against
- independent, as is;
- independent with 50% of its MLP neurons zeroed at random (gate and up rows, down columns: structured pruning);
- independent with every gate and up weight zero;
- independent with one layer's up-projection NaN;
- derived (base fine-tuned, then permuted) with 50% of its MLP neurons zeroed: must stay detected (by the
  statistics that see through the permutation: csu --align, match, csh --align).
Every cell is a real run of the single-pair pipeline (main.py's run_pair) with `--matching` fast and exact;
"-" is no p-value (nothing usable to test: every layer was left out, and counted).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import bench_common

STATS = (("csu", False), ("csu", True), ("match", False), ("csh", False), ("csh", True))


def variants(root: Path, out: Path) -> dict[str, str]:
    """name -> model directory, the damaged ones saved under `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "base")

    def save(model, name: str) -> str:
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
        return str(out / name)

    def prune(model, seed: int):
        for layer in model.model.layers:
            n = layer.mlp.up_proj.weight.shape[0]
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n // 2]
            layer.mlp.gate_proj.weight[idx] = 0.0
            layer.mlp.up_proj.weight[idx] = 0.0
            layer.mlp.down_proj.weight[:, idx] = 0.0
        return model

    indep = AutoModelForCausalLM.from_pretrained(root / "independent").float()
    derived = AutoModelForCausalLM.from_pretrained(root / "derived").float()
    out_dirs = {"independent": str(root / "independent")}
    with torch.no_grad():
        out_dirs["independent, 50% of MLP neurons zeroed"] = save(prune(copy.deepcopy(indep), 0), "pruned")
        dead = copy.deepcopy(indep)
        for layer in dead.model.layers:
            layer.mlp.gate_proj.weight.zero_()
            layer.mlp.up_proj.weight.zero_()
        out_dirs["independent, gate and up weights all zero"] = save(dead, "zero")
        nan = copy.deepcopy(indep)
        nan.model.layers[1].mlp.up_proj.weight.fill_(float("nan"))
        out_dirs["independent, one NaN layer"] = save(nan, "nan")
        out_dirs["derived, 50% of MLP neurons zeroed"] = save(prune(copy.deepcopy(derived), 1), "derived_pruned")
    return out_dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", help="write the table here (README embeds docs/generated/damaged.md)")
    args, head, t0 = bench_common.start(ap)

    import torch

    from tracing.config import RunConfig
    from tracing.demo import ensure_demo_models
    from tracing.pipeline import run_pair

    torch.set_num_threads(2)
    root = ensure_demo_models(progress=False)
    lines = ["| base vs | statistic | log10 p, fast | log10 p, exact | units left out (ft) | layers skipped |",
             "|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None or v != v else f"{v:.2f}"  # NaN: no p-value
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in variants(root, Path(tmp)).items():
            for stat, align in STATS:
                cells, rec = [], {}
                for method in ("fast", "exact"):
                    cfg = RunConfig(base_model_id=str(root / "base"), ft_model_id=path, stat=stat, align=align,
                                    device="cpu", save=str(Path(tmp) / "results"), no_progress=True,
                                    dataset=str(root / "text.txt"), block_size=64, max_blocks=16, batch_size=8,
                                    matching=method)
                    rec = run_pair(cfg)
                    if rec["status"] != "ok" and "computed no number" not in str(rec["error"]):
                        raise RuntimeError(f"{name} {stat}: {rec['error']}")
                    # a run whose every layer was left out fails with "computed no number": no verdict
                    cells.append(rec["aligned_log10_pvalue"] if align else rec["log10_pvalue"])
                extras = rec.get("aligned_extras" if align else "extras") or {}
                left_out = (extras.get("units_excluded") or {}).get("ft", "-")
                verdict = "" if rec["status"] == "ok" else " (failed run: no verdict)"
                lines.append(f"| {name} | `{stat}{' --align' if align else ''}` | {fmt(cells[0])} | {fmt(cells[1])} | "
                             f"{left_out} | {extras.get('layers_skipped_degenerate', '-')}{verdict} |")
                print(lines[-1], flush=True)
    bench_common.publish(lines, head, t0, args.markdown)


if __name__ == "__main__":
    main()
