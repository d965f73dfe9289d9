"""Linear-assignment solvers on the cost matrices the statistics really meet, not only random ones.

    python benchmarks/matching.py                                 # ~6 min on 2 cores (training included)
    PYTHONPATH=/tmp/lapcands python benchmarks/matching.py        # also lap, lapjv, fastlap (see below)
    python benchmarks/matching.py --markdown docs/generated/matching.md

The reproducer of the slow case: a Llama with the SmolLM2-135M MLP (hidden 576, MLP 1536, 2 layers) trained
--steps steps on the project's text, against a random initialisation of the same shape (a trained model
against an unrelated one), activations of layer 0 on 512 tokens of held-out text: match's exact cost
(-squared distance of gate activations), and the cosine similarity the greedy screen and csh use. Beside it:
the same model against its own fine-tune (related), the trained-like stand-in of benchmarks/activation_stats.py
(heavy-tailed gains on random-init models, full MLP width), a random Gaussian matrix of the same size (what
random-init benchmarks see) and csu's weight cosines at Llama-2-7B size (11008 rows of 4096).

Solvers: scipy (exact, float64: --matching exact), our greedy (tracing.matching, the fast screen), and, when
importable, lap.lapjv (float64), lapjv (src-d; float32 inside), fastlap (lapjv and auction). Install them
outside the project to measure them: `pip install --no-deps --target /tmp/lapcands lap lapjv fastlap`.
On a GPU two more columns: our greedy there, and torch-linear-assignment (its Triton solver; carry the
pure-Python wheel, `pip download --no-deps torch-linear-assignment`). "gap" is how far the solver's total similarity
falls below the optimum, relative to it; "same" the share of units matched as in the optimum.
"""

from __future__ import annotations

import argparse
import copy
import time

import bench_common


def candidates() -> dict:
    """name -> fn(sim (n, n) float64 ndarray) -> cols (n,), for every solver that is importable."""
    import numpy as np
    import torch
    from scipy.optimize import linear_sum_assignment

    from tracing import solvers

    def greedy(s: np.ndarray) -> np.ndarray:
        rows, cols = solvers.greedy(torch.from_numpy(s))
        out = np.empty(s.shape[0], dtype=np.int64)
        out[rows.numpy()] = cols.numpy()
        return out

    f64 = lambda s: s.astype(np.float64)  # what the float64 solvers take
    out = {"scipy (exact)": lambda s: linear_sum_assignment(-f64(s))[1], "greedy (ours)": greedy}
    try:
        import lap
        out["lap.lapjv"] = lambda s: lap.lapjv(f64(s.max() - s))[1]
    except ImportError:
        out["lap.lapjv"] = None
    try:
        import lapjv
        out["lapjv (float32)"] = lambda s: lapjv.lapjv((s.max(axis=1, keepdims=True) - s).astype(np.float32))[0]
    except ImportError:
        out["lapjv (float32)"] = None
    try:
        import fastlap
        out["fastlap lapjv"] = lambda s: np.asarray(fastlap.solve_lap(f64(s), "lapjv", maximize=True)[1])
        out["fastlap auction"] = lambda s: np.asarray(fastlap.solve_lap(f64(s), "auction", maximize=True)[1])
    except ImportError:
        out["fastlap lapjv"] = out["fastlap auction"] = None
    if torch.cuda.is_available():  # on a GPU: our greedy there, and torch-linear-assignment (Triton) if present
        def on_gpu(solve):
            def run(s: np.ndarray) -> np.ndarray:
                cols = solve(torch.from_numpy(s).cuda())
                torch.cuda.synchronize()
                return cols
            return run

        def greedy_gpu(s: torch.Tensor) -> np.ndarray:
            rows, cols = solvers.greedy(s)
            out = np.empty(s.shape[0], dtype=np.int64)
            out[rows.numpy()] = cols.numpy()
            return out

        out["greedy (ours, GPU)"] = on_gpu(greedy_gpu)
        solvers.greedy(torch.rand(64, 64, device="cuda"))  # CUDA's start-up is not the solver's time
        try:
            from torch_linear_assignment import batch_linear_assignment
            out["torch-linear-assignment (GPU)"] = on_gpu(
                lambda s: batch_linear_assignment(-s.float()[None])[0].cpu().numpy())
            out["torch-linear-assignment (GPU)"](np.random.default_rng(0).random((64, 64)))  # Triton compiles
        except ImportError:
            out["torch-linear-assignment (GPU)"] = None
    return out


def cost_matrices(steps: int) -> dict:
    """name -> (similarity (n, n) float64 ndarray, what it stands for)."""
    import numpy as np
    import torch
    import transformers

    from tracing import zoo
    from tracing.arch import get_spec
    from tracing.grams import layer_grams
    from tracing.matching import euclid_similarity

    tok = zoo.build_tokenizer(zoo.synthetic_text(6000, seed=0), vocab_size=512)
    ids = torch.tensor(tok(zoo.synthetic_text(6000, seed=0))["input_ids"])
    blocks = torch.tensor(tok(zoo.synthetic_text(1000, seed=2))["input_ids"])[:8 * 64].reshape(8, 64)  # 512 tokens
    shape = dict(vocab_size=len(tok), hidden=576, layers=2, intermediate=1536, heads=9, kv_heads=3)
    t = time.perf_counter()
    trained = zoo.finetune(zoo.tiny_model("llama", seed=0, **shape), ids, steps=steps, lr=1e-3, batch_size=8)
    print(f"trained the reproducer's model: {steps} steps, {time.perf_counter() - t:.0f} s", flush=True)
    tuned = zoo.finetune(copy.deepcopy(trained), torch.tensor(tok(zoo.synthetic_text(2000, seed=7))["input_ids"]),
                         steps=steps // 2, lr=1e-3, batch_size=8, seed=5)
    cfg = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                                   num_key_value_heads=3, vocab_size=len(tok))
    torch.manual_seed(1)
    like_a = bench_common.heavy_tailed(transformers.LlamaForCausalLM(cfg).eval(), seed=1)
    like_b = bench_common.heavy_tailed(transformers.LlamaForCausalLM(cfg).eval(), seed=2)

    def layer0(a, b):
        lg = next(layer_grams(a, b, get_spec(a.config), get_spec(b.config), blocks, projs=("gate",), progress=False))
        dist = euclid_similarity(lg.gram["gate"], lg.sq_base["gate"], lg.sq_ft["gate"])
        return dist.numpy(), lg.cosine("gate").numpy()

    out = {}
    for name, (a, b) in {"trained vs random init": (trained, zoo.tiny_model("llama", seed=1, **shape)),
                         "trained vs its fine-tune": (trained, tuned),
                         "trained-like vs trained-like": (like_a, like_b)}.items():
        dist, cos = layer0(a, b)
        out[f"{name}, -distance"] = dist
        out[f"{name}, cosine"] = cos
    rng = np.random.default_rng(0)
    out["random Gaussian 1536²"] = rng.standard_normal((1536, 1536))
    a, b = (torch.from_numpy(rng.standard_normal((11008, 4096))).float() for _ in range(2))
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    out["7B csu weights, cosine 11008² (float32, as csu)"] = (a @ b.T).numpy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150, help="training steps of the reproducer's model")
    ap.add_argument("--max_seconds", type=float, default=120.0, help="skip a solver on larger matrices once it "
                    "took longer than this")
    ap.add_argument("--markdown", help="write the table here (README embeds docs/generated/matching.md)")
    args, head, t0 = bench_common.start(ap)

    import numpy as np
    import torch

    torch.set_num_threads(1)  # one assignment per core, as the statistics run them
    solvers = candidates()
    lines = ["| cost matrix | " + " | ".join(solvers) + " |", "|---|" + "---|" * len(solvers)]
    slow: set = set()
    for name, sim in cost_matrices(args.steps).items():
        cells, optimum, opt_cols = [], None, None
        for solver, fn in solvers.items():
            if fn is None:
                cells.append("not installed")
                continue
            if solver in slow and sim.shape[0] > 2000:
                cells.append(f"skipped (> {args.max_seconds:.0f} s)")
                continue
            t = time.perf_counter()
            cols = np.asarray(fn(sim))
            dt = time.perf_counter() - t
            slow |= {solver} if dt > args.max_seconds else set()
            value = float(sim[np.arange(len(cols)), cols].astype(np.float64).sum())
            if optimum is None:  # scipy comes first: the exact optimum
                optimum, opt_cols = value, cols
            gap, same = (optimum - value) / abs(optimum), float((cols == opt_cols).mean())
            cells.append(f"{dt:.2f} s" + ("" if same == 1 else f" (gap {gap:.1e}, same {same:.0%})"))
            print(f"{name:45s} {solver:16s} {cells[-1]}", flush=True)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    bench_common.publish(lines, head, t0, args.markdown)


if __name__ == "__main__":
    main()
