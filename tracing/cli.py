"""Command line of `main.py`: the flags of the original tool plus ours, parsed into a `RunConfig`.

    python main.py --base_model_id A --ft_model_id B --stat csu --align
    tracing.cli.main(["--base_model_id", "A", "--ft_model_id", "B"])   # the same, in-process
    parse_run_flags(["--stat", "l2", "--align"])                       # {'stat': 'l2', 'align': True}

Flag defaults are RunConfig's: the parser only records the flags that were given. Start-up is kept light:
parsing, `--help` and flag errors import no torch; the pipeline is imported once a run starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from tracing import __version__
from tracing.config import FIELDS, RunConfig, parse_alphas, parse_keys, parse_layers
from tracing.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, TracingError, exit_on_error
from tracing.results import outcome_path


def _type(parse):
    """An argparse type from a TracingError-raising parser (argparse shows its message)."""
    def convert(text: str):
        try:
            return parse(text)
        except TracingError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


class _Parser(argparse.ArgumentParser):
    def add(self, group, name: str, help: str, **kw) -> None:
        """A flag named after its RunConfig field, showing that field's default in --help."""
        default = FIELDS[name].default
        if default is not dataclasses.MISSING and default is not None and default is not False:
            help = f"{help} (default: {default})"
        group.add_argument(f"--{name}", help=help, **kw)


def build_parser() -> argparse.ArgumentParser:
    """main.py's flags; a parsed Namespace holds only the flags given (defaults are RunConfig's)."""
    p = _Parser(prog="main.py", description="Test whether ft_model was derived from base_model (one pair).",
                argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("models")
    p.add(g, "base_model_id", "hub id[@revision], local dir, PEFT adapter dir or .gguf file")
    p.add(g, "ft_model_id", "the model whose origin is tested (same forms)")
    p.add(g, "adapter_base", "base model for a PEFT adapter whose recorded base is unreachable")
    g.add_argument("--token", help="Hugging Face token (default: $HF_TOKEN); never stored")
    p.add(g, "dtype", "float32|bfloat16|float16 (default: bf16 on GPU; on CPU bf16 if both checkpoints are stored "
          "in bf16, else fp32)")
    p.add(g, "device", "auto|cpu|cuda|cuda:N")
    p.add(g, "device_map", "'auto' shards big models over all GPUs (accelerate)")
    p.add(g, "trust_remote_code", "run model code from the checkpoint", action="store_true")
    p.add(g, "allow_keys", "weights that may be missing from or unexpected in a checkpoint (names or glob "
          "patterns, comma-separated, e.g. lm_head.weight); any other is an error", type=_type(parse_keys))

    g = p.add_argument_group("statistic")
    p.add(g, "stat", "statistic name (see README); unknown names list the valid ones")
    p.add(g, "permute", "randomly permute ft's hidden units first", action="store_true")
    p.add(g, "rotate", "randomly rotate ft's residual stream first (RMSNorm models)", action="store_true")
    p.add(g, "align", "also compute the statistic after aligning ft to base", action="store_true")
    p.add(g, "num_perm", "wrap the statistic in PERMTEST with T permutations", type=int)
    p.add(g, "alpha", "mode: interpolation weight of ft", type=float)
    p.add(g, "alphas", "mode: a curve, e.g. 0,0.25,0.5,0.75,1", type=_type(parse_alphas))
    p.add(g, "attn", "mode: also interpolate attention", action="store_true")
    p.add(g, "emb", "mode: also interpolate embeddings", action="store_true")
    p.add(g, "layers", "restrict per-layer statistics, e.g. 0,2,5-7", type=_type(parse_layers))
    p.add(g, "max_tokens", "activation statistics: token sample size", type=int)
    p.add(g, "matching", "neuron matching: fast (greedy; exact assignment where it finds 1e-10 < p < 0.01) or "
          "exact (the paper's assignment everywhere)")
    p.add(g, "memory_budget", "activation accumulators' memory, e.g. 8GiB (default: half the free GPU memory / "
          "RAM)")

    g = p.add_argument_group("data")
    p.add(g, "dataset", "wikitext | random | generated | a local .txt/.jsonl/.parquet file")
    g.add_argument("--dataset_id", dest="dataset", help="alias of --dataset (the original tool's name)")
    p.add(g, "block_size", "tokens per block", type=int)
    p.add(g, "batch_size", "blocks per forward pass", type=int)
    p.add(g, "max_blocks", "use at most this many blocks", type=int)
    p.add(g, "generated_dir", "where generate.py wrote texts")
    p.add(g, "eval", "report base and ft loss and perplexity", action="store_true")

    g = p.add_argument_group("fine-tuning diff report")
    p.add(g, "report", "write DIR/report.md and figures", metavar="DIR")
    p.add(g, "prompts", "file with one prompt per line")
    p.add(g, "report_token", "token position to follow, e.g. foo")
    p.add(g, "compare", "'foo=Paris': ft state for foo vs base state for Paris")
    p.add(g, "targets", "continuations to score, e.g. 'English,French'")
    p.add(g, "top_k", "top next tokens shown", type=int)

    g = p.add_argument_group("output")
    p.add(g, "save", "directory for the result (or a .p/.pkl file path)")
    p.add(g, "seed", "seeds permutations, rotations, random data", type=int)
    p.add(g, "no_progress", "no progress bars", action="store_true")
    p.add(g, "threads", "torch threads and assignment workers (default: the CPUs this process may use: "
          "its affinity, at most $SLURM_CPUS_PER_TASK in a Slurm job)", type=int)
    g.add_argument("--demo", action="store_true", help="build small models offline and print verdicts")
    p.add_argument("--version", action="version", version=f"model-tracing {__version__}")
    return p


def parse_run_flags(argv: list[str]) -> dict:
    """The main.py flags given in `argv` as {field: value}; a bad flag is a TracingError, never SystemExit.

    Unknown flags are named, their values never shown (they may be secrets)."""
    parser = build_parser()
    parser.exit_on_error = False
    try:
        args, unknown = parser.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit) as e:
        raise TracingError(f"bad main.py flags: {e}; see python main.py --help") from None
    if unknown:
        flags = [a.split("=", 1)[0] for a in unknown if a.startswith("-")]
        raise TracingError(f"unknown flag(s) {' '.join(flags) or '(a stray value)'}: see python main.py --help")
    return vars(args)


def main(argv: list[str] | None = None) -> int:
    """Run one pair (or the demo). Returns the process exit code: 0 ok, 2 bad input, 1 other failure."""
    flags = vars(build_parser().parse_args(argv))
    token = flags.pop("token", None) or os.environ.get("HF_TOKEN") or None
    if flags.pop("demo", False):
        from tracing.demo import run_demo  # start-up: torch is imported once a run starts, never for --help
        return exit_on_error(lambda: run_demo(progress=not flags.get("no_progress", False)))

    def run() -> int:
        cfg = RunConfig.from_dict(flags, "main.py")
        from tracing.devices import threads
        from tracing.pipeline import check, run_pair, summary
        check(cfg)  # nothing is written for an error found here
        with threads(cfg.threads):
            record = run_pair(cfg, token)
        path = outcome_path(cfg.result_path(), record["status"])
        for note in record["notes"]:
            print(f"note: {note}", file=sys.stderr)
        if record["status"] == "ok":
            print(summary(record))
        elif record["error_kind"] == "internal":
            print(f"error: {record['error']} (traceback saved in {path})", file=sys.stderr)
        else:
            print(f"error: {record['error']}", file=sys.stderr)
        print(f"saved {path}")
        if record["status"] == "ok":
            return EXIT_OK
        return EXIT_FAILED if record["error_kind"] == "internal" else EXIT_BAD_INPUT

    return exit_on_error(run)
