"""Command line of `main.py`: the flags of the original tool plus ours, parsed into a Namespace.

    python main.py --base_model_id A --ft_model_id B --stat csu --align
    tracing.cli.main(["--base_model_id", "A", "--ft_model_id", "B"])   # same, in-process (Slurm jobs)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tracing.errors import TracingError
from tracing.naming import pair_name


def _alphas(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alphas takes comma-separated numbers, got '{text}'") from None


def _layers(text: str) -> list[int]:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]."""
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes indices like '0,2,5-7', got '{text}'") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main.py", description="Test whether ft_model was derived from base_model (one pair).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--base_model_id", help="hub id[@revision], local dir, PEFT adapter dir or .gguf file")
    g.add_argument("--ft_model_id", help="the model whose origin is tested (same forms)")
    g.add_argument("--adapter_base", help="base model for a PEFT adapter whose recorded base is unreachable")
    g.add_argument("--token", default=None, help="Hugging Face token (default: $HF_TOKEN); never stored")
    g.add_argument("--dtype", default=None, help="float32|bfloat16|float16 (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N")
    g.add_argument("--device_map", default=None, help="'auto' shards big models over all GPUs (accelerate)")
    g.add_argument("--trust_remote_code", action="store_true", help="run model code from the checkpoint")

    g = p.add_argument_group("statistic")
    g.add_argument("--stat", default="csu", help="statistic name (see README); unknown names list the valid ones")
    g.add_argument("--permute", action="store_true", help="randomly permute ft's hidden units first")
    g.add_argument("--rotate", action="store_true", help="randomly rotate ft's residual stream first (RMSNorm models)")
    g.add_argument("--align", action="store_true", help="also compute the statistic after aligning ft to base")
    g.add_argument("--num_perm", type=int, default=0, help="wrap the statistic in PERMTEST with T permutations")
    g.add_argument("--alpha", type=float, default=0.5, help="mode: interpolation weight of ft")
    g.add_argument("--alphas", type=_alphas, default=None, help="mode: a curve, e.g. 0,0.25,0.5,0.75,1")
    g.add_argument("--attn", action="store_true", help="mode: also interpolate attention")
    g.add_argument("--emb", action="store_true", help="mode: also interpolate embeddings")
    g.add_argument("--layers", type=_layers, default=None, help="restrict per-layer statistics, e.g. 0,2,5-7")
    g.add_argument("--max_tokens", type=int, default=None, help="activation statistics: token sample size")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", "--dataset_id", dest="dataset", default="wikitext",
                   help="wikitext | random | generated | a local .txt/.jsonl/.parquet file")
    g.add_argument("--block_size", type=int, default=512)
    g.add_argument("--batch_size", type=int, default=1)
    g.add_argument("--max_blocks", type=int, default=None, help="use at most this many blocks")
    g.add_argument("--generated_dir", default="results/generated", help="where generate.py wrote texts")
    g.add_argument("--eval", action="store_true", help="report base and ft loss and perplexity")

    g = p.add_argument_group("fine-tuning diff report")
    g.add_argument("--report", metavar="DIR", default=None, help="write DIR/report.md and figures")
    g.add_argument("--prompts", default=None, help="file with one prompt per line")
    g.add_argument("--report_token", default=None, help="token position to follow, e.g. foo")
    g.add_argument("--compare", default=None, help="'foo=Paris': ft state for foo vs base state for Paris")
    g.add_argument("--targets", default=None, help="continuations to score, e.g. 'English,French'")
    g.add_argument("--top_k", type=int, default=5)

    g = p.add_argument_group("output")
    g.add_argument("--save", default="results", help="directory for the result (or a .p/.pkl file path)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    g.add_argument("--demo", action="store_true", help="build small models offline and print verdicts")
    return p


def result_path(save: str | Path, base: str, ft: str, stat: str) -> Path:
    """`--save` is a directory (file name derived from the pair) or an explicit .p/.pkl path."""
    save = Path(save)
    if save.suffix in (".p", ".pkl", ".pickle"):
        return save
    return save / f"{pair_name(base, ft, stat)}.pkl"


def validate(args: argparse.Namespace) -> None:
    """Checks that need no model; raise TracingError (nothing is written yet)."""
    from tracing.statistics import get_stat

    if not args.base_model_id or not args.ft_model_id:
        raise TracingError("both --base_model_id and --ft_model_id are required (or run --demo)")
    get_stat(args.stat)
    for a in [args.alpha, *(args.alphas or [])]:
        if not 0.0 <= a <= 1.0:
            raise TracingError(f"--alpha/--alphas must lie in [0, 1], got {a}")
    if args.num_perm < 0:
        raise TracingError(f"--num_perm must be >= 0, got {args.num_perm}")
    if args.block_size < 1 or args.batch_size < 1:
        raise TracingError("--block_size and --batch_size must be positive")
    if args.compare and "=" not in args.compare:
        raise TracingError(f"--compare takes 'word=other', got '{args.compare}'")


def main(argv: list[str] | None = None) -> int:
    """Run one pair (or the demo). Returns the process exit code: 0 ok, 2 bad input, 1 other failure."""
    args = build_parser().parse_args(argv)
    if args.demo:
        from tracing.demo import run_demo
        return run_demo(progress=not args.no_progress)
    try:
        validate(args)
    except TracingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from tracing.pipeline import run_pair
    return run_pair(args)
