"""Power of --matching fast against exact on hard derived pairs: log10 p side by side (lower = detected).

    python benchmarks/power.py                                  # ~10 min on 2 cores
    python benchmarks/power.py --markdown docs/generated/power.md

A small Llama (hidden 128, MLP 512, 2 layers, vocab 512) trained --steps steps on the project's text is the
base. Derived from it, each made hard to detect in its own way:
- noise s: every weight + Gaussian noise of s times that weight's standard deviation (s = 1, 2, 4);
- fine-tuned N: N more steps (lr 3e-3) on other text;
- pruned 50%: half of the MLP neurons (smallest |gate|·|up|·|down|) removed, a narrower model (match_all),
  after 100 healing steps;
and, for reference, an independent model trained the same way. The derived models are also permuted
(hidden units and MLP neurons), so csu is run after --align and match is blind to it anyway. Activation
statistics use 8 blocks of 64 tokens of held-out text. Times are the statistic's wall time.
"""

from __future__ import annotations

import argparse
import copy
import time

import bench_common

SHAPE = dict(hidden=128, layers=2, intermediate=512, heads=4, kv_heads=2)
STATS = ("csu --align", "csh --align", "match", "match_all")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="training steps of the base (and the independent model)")
    ap.add_argument("--markdown", help="write the table here (README embeds docs/generated/power.md)")
    args, head, t0 = bench_common.start(ap)

    import torch

    from tracing import zoo
    from tracing.arch import get_spec
    from tracing.perm import apply_perm, random_perm

    torch.manual_seed(0)
    tok = zoo.build_tokenizer(zoo.synthetic_text(6000, seed=0), vocab_size=512)
    ids = torch.tensor(tok(zoo.synthetic_text(6000, seed=0))["input_ids"])
    other_text = torch.tensor(tok(zoo.synthetic_text(3000, seed=7))["input_ids"])
    blocks = torch.tensor(tok(zoo.synthetic_text(800, seed=2))["input_ids"])[:8 * 64].reshape(8, 64)
    shape = dict(vocab_size=len(tok), **SHAPE)
    train = lambda m, data, steps, seed: zoo.finetune(m, data, steps=steps, lr=3e-3, batch_size=8, seed=seed)
    base = train(zoo.tiny_model("llama", seed=0, **shape), ids, args.steps, 0)

    def permuted(model):
        spec = get_spec(model.config)
        apply_perm(model, spec, random_perm(spec, model.state_dict(), seed=3))
        return model

    def noisy(scale: float):
        m = copy.deepcopy(base)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
        return m

    pairs = {f"noise {s:g}": lambda s=s: noisy(s) for s in (1, 2, 4)}
    pairs |= {f"fine-tuned {n}": lambda n=n: train(copy.deepcopy(base), other_text, n, 5) for n in (200, 600)}
    pairs["pruned 50%, healed 100"] = lambda: train(zoo.prune(base, [0, 1], 0.5), other_text, 100, 6)
    pairs["independent"] = lambda: train(zoo.tiny_model("llama", seed=1, **shape), ids, args.steps, 1)

    lines = ["| derived pair | statistic | log10 p, fast | log10 p, exact | time fast | time exact |",
             "|---|---|---|---|---|---|"]
    for name, make in pairs.items():
        ft = permuted(make())
        narrower = ft.config.intermediate_size != base.config.intermediate_size
        for stat in STATS:
            if narrower and stat != "match_all":
                continue  # csu, csh and match need equal widths
            cells = []
            for method in ("fast", "exact"):
                t = time.perf_counter()
                res = bench_common.log10p(stat.replace("csh --align", "csh"), base,
                                          _aligned(base, ft, method) if stat == "csh --align" else ft,
                                          blocks, matching=method, batch_size=8)
                cells.append((res.log10_pvalue, time.perf_counter() - t))
            (fast, tf), (exact, te) = cells
            lines.append(f"| {name} | `{stat}` | {fast:.1f} | {exact:.1f} | {tf:.2f} s | {te:.2f} s |")
            print(lines[-1], flush=True)
    bench_common.publish(lines, head, t0, args.markdown)


def _aligned(base, ft, method: str):
    """ft aligned to base (csh is not blind to MLP-neuron permutations: it needs --align like csu)."""
    from tracing.align import align_weights
    from tracing.arch import get_spec
    from tracing.perm import apply_perm

    ft = copy.deepcopy(ft)
    apply_perm(ft, get_spec(ft.config), align_weights(base, ft, get_spec(base.config), progress=False,
                                                      method=method))
    return ft


if __name__ == "__main__":
    main()
