"""What each derivation recipe costs to build at the zoo's tiny shape, per family (tracing/derivations).

    python benchmarks/derivations.py                                          # 4 families, ~3 min on 2 cores
    python benchmarks/derivations.py --markdown docs/generated/derivations.md  # also write the table
    python benchmarks/derivations.py --families llama --layers 8               # a quick look, deeper bases

A base per family (hidden 64, MLP 128, or 256 for gpt2 so that its GGUF files load back, `--layers` blocks,
vocabulary 512) is trained from scratch as the zoo trains its bases (`pretrain`: 200 Adam steps); every kind
then runs with its default options (its own fine-tunes, independent models and healing included) and is saved
with `save`. Printed per kind and family: seconds to derive (save excluded), the peak RSS increase over the
RSS before (MiB, VmHWM reset before each kind), and "refused" where the kind makes no sense for the family.
Training runs on one thread (zoo.finetune is deterministic that way), so these are single-core times.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import bench_common

FAMILIES = ("llama", "qwen2", "gpt_neox", "gpt2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--markdown", default=None)
    args, head, t0 = bench_common.start(ap)

    import torch

    from tracing import zoo
    from tracing.derivations import KINDS, derive, pretrain, save
    from tracing.errors import TracingError

    torch.set_num_threads(1)
    tok = zoo.build_tokenizer(zoo.synthetic_text(3000, seed=0), vocab_size=512)
    ids = torch.tensor(tok(zoo.synthetic_text(1500, seed=1))["input_ids"])
    families = args.families.split(",")
    cells: dict[str, dict[str, str]] = {kind: {} for kind in ["(base: pretrain)", *KINDS]}
    totals = dict.fromkeys(families, 0.0)
    with tempfile.TemporaryDirectory() as root:
        for family in families:
            shape = dict(intermediate=256, max_positions=1024) if family == "gpt2" else {}
            t = time.perf_counter()
            base = pretrain(zoo.tiny_config(family, vocab_size=len(tok), layers=args.layers, **shape), ids)
            cells["(base: pretrain)"][family] = f"{time.perf_counter() - t:.2f}"
            base_dir = Path(root) / family / "base"
            base.save_pretrained(base_dir)
            tok.save_pretrained(base_dir)
            for kind in KINDS:
                bench_common.reset_peak_rss()
                before = bench_common.rss_mib("VmRSS")
                t = time.perf_counter()
                try:
                    d = derive(kind, base, tok, ids)
                except TracingError:
                    cells[kind][family] = "refused"
                    continue
                seconds = time.perf_counter() - t
                totals[family] += seconds
                peak = max(0, bench_common.rss_mib("VmHWM") - before)
                save(d, Path(root) / family / kind, base_dir=base_dir)
                cells[kind][family] = f"{seconds:.2f} s, +{peak} MiB"
                print(f"{family} {kind}: {cells[kind][family]}", flush=True)
    lines = [f"Cost to build each derivation kind (defaults; bases of {args.layers} blocks, hidden 64, vocabulary "
             f"512; seconds on one thread, peak RSS increase):", "",
             "| kind | derived | " + " | ".join(families) + " |", "|---|---|" + "---|" * len(families)]
    for kind, row in cells.items():
        derived = "" if kind not in KINDS else "yes" if KINDS[kind].derived else "null"
        lines.append(f"| {kind} | {derived} | " + " | ".join(row.get(f, "") for f in families) + " |")
    lines.append("| **all kinds** | | " + " | ".join(f"{totals[f]:.0f} s" for f in families) + " |")
    bench_common.publish(lines, head, t0, args.markdown)


if __name__ == "__main__":
    main()
