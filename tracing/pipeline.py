"""One pair, start to finish: load -> (permute/rotate ft) -> statistic -> (align -> statistic) -> (eval) -> save.

Every run writes one result record (tracing/results.py), also when it fails: status "failed" with the
error, then a non-zero exit. Data is loaded only when the statistic or --eval needs it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from datetime import datetime, timezone

import torch

from tracing.errors import TracingError
from tracing.statistics import StatContext, StatInfo, StatResult, get_stat


def compute(info: StatInfo, ctx: StatContext, num_perm: int) -> StatResult:
    """The statistic itself, or its PERMTEST p-value when --num_perm T > 0."""
    if num_perm > 0:
        from tracing.statistics.permtest import permtest
        return permtest(info, ctx, num_perm, seed=ctx.seed, progress=ctx.progress)
    return info.fn(ctx)


def placement(args: argparse.Namespace, info: StatInfo) -> tuple[str | torch.device, torch.device | None]:
    """(device the models load on, device for the statistic's matrix products or None).

    A weight-only run on a GPU (no data, --eval, --report or --rotate) keeps both models in CPU memory in
    the GPU dtype and sends one weight matrix at a time to the GPU: a pair of 70B models needs no GPU
    that holds them. Everything else runs where the models are.
    """
    from tracing.models import resolve_device

    if args.device_map or info.needs_data or args.eval or args.report or args.rotate:
        return args.device, None
    dev = resolve_device(args.device)
    return ("cpu", dev) if dev.type == "cuda" else (args.device, None)


def _load_pair(args: argparse.Namespace, device: str | torch.device):
    from tracing.models import load_model, resolve_device, resolve_dtype

    dtype = resolve_dtype(args.dtype, resolve_device(args.device))  # the GPU's dtype also when kept on the CPU
    kw = dict(dtype=dtype, device=device, device_map=args.device_map,
              trust_remote_code=args.trust_remote_code, token=args.token or os.environ.get("HF_TOKEN"),
              adapter_base=args.adapter_base, progress=not args.no_progress)
    base, tok_base = load_model(args.base_model_id, **kw)
    ft, tok_ft = load_model(args.ft_model_id, **kw)
    return base, tok_base, ft, tok_ft


def _blocks(args: argparse.Namespace, tokenizer, vocab_size: int) -> torch.Tensor:
    from tracing.data import load_blocks

    return load_blocks(args.dataset, tokenizer, args.block_size, max_blocks=args.max_blocks, seed=args.seed,
                       vocab_size=vocab_size, model_ids=(args.base_model_id, args.ft_model_id),
                       generated_dir=args.generated_dir, progress=not args.no_progress)


def _fill(record: dict, prefix: str, res: StatResult) -> None:
    from tracing.results import to_plain

    record[f"{prefix}value"] = to_plain(res.value)
    record[f"{prefix}log10_pvalue"] = to_plain(res.log10_pvalue)
    record[f"{prefix}per_layer"] = to_plain(res.per_layer)
    record[f"{prefix}extras"] = to_plain(res.extras)


def execute(args: argparse.Namespace, record: dict) -> None:
    """Fill `record` in place; raises on failure (the caller records the error)."""
    from tracing.arch import get_spec
    from tracing.perm import apply_perm, random_perm

    info = get_stat(args.stat)
    load_on, compute_device = placement(args, info)
    if compute_device is not None:
        record["compute_device"] = str(compute_device)
    base, tok_base, ft, tok_ft = _load_pair(args, load_on)
    spec_base, spec_ft = get_spec(base.config), get_spec(ft.config)
    if info.same_shape or args.align:
        from tracing.statistics.shapes import check_same_shapes
        check_same_shapes(spec_base, base.state_dict(), spec_ft, ft.state_dict(), info.name)
    if args.permute:
        apply_perm(ft, spec_ft, random_perm(spec_ft, ft.state_dict(), seed=args.seed))
    if args.rotate:
        from tracing.transforms import rotate_residual
        rotate_residual(ft, spec_ft, seed=args.seed + 1)
        spec_ft = get_spec(ft.config)  # rotation unties embeddings

    blocks = None
    if info.needs_data or args.eval:
        vocab = min(base.get_input_embeddings().num_embeddings, ft.get_input_embeddings().num_embeddings)
        blocks = _blocks(args, tok_base, vocab)
        record["n_blocks"], record["block_size"] = int(blocks.shape[0]), int(blocks.shape[1])

    ctx = StatContext(base=base, ft=ft, spec_base=spec_base, spec_ft=spec_ft, blocks=blocks,
                      batch_size=args.batch_size, alpha=args.alpha, alphas=args.alphas, attn=args.attn,
                      emb=args.emb, layers=args.layers, max_tokens=args.max_tokens, seed=args.seed,
                      tokenizer_base=tok_base, tokenizer_ft=tok_ft, out_dir=args.report or args.out_dir,
                      progress=not args.no_progress, compute_device=compute_device)
    _fill(record, "", compute(info, ctx, args.num_perm))
    if args.align:
        from tracing.align import align_weights
        apply_perm(ft, spec_ft, align_weights(base, ft, spec_base, progress=ctx.progress, device=compute_device))
        aligned = info.fn(ctx)
        if args.num_perm:  # alignment chose the ft permutation most like base: ft is no longer exchangeable
            aligned.extras["permtest"] = "not run: PERMTEST is not valid after --align"
            print("note: --num_perm applies to the non-aligned statistic only; PERMTEST is not valid after "
                  "--align (alignment picks the permutation of ft that looks most like base)", file=sys.stderr)
        _fill(record, "aligned_", aligned)

    if args.eval:
        from tracing.evaluate import mean_loss, perplexity
        for name, model in (("base", base), ("ft", ft)):
            loss = mean_loss(model, blocks, batch_size=args.batch_size, progress=ctx.progress)
            record[f"{name}_loss"], record[f"{name}_ppl"] = loss, perplexity(loss)

    if args.report:
        from tracing.report import read_prompts, write_report
        record["report"] = write_report(
            base, ft, tok_base, tok_ft, spec_base, args.report,
            prompts=read_prompts(args.prompts) if args.prompts else None, focus_token=args.report_token,
            compare=tuple(args.compare.split("=", 1)) if args.compare else None,
            targets=[t for t in args.targets.split(",") if t] if args.targets else None,
            top_k=args.top_k, progress=ctx.progress)


def summary(record: dict) -> str:
    """A few human lines for the terminal."""
    def fmt(v):
        return "-" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)
    lines = [f"{record['stat']}: {record['base_model_id']} vs {record['ft_model_id']}  [{record['status']}]"]
    lines.append(f"  non-aligned  value={fmt(record.get('value'))}  log10 p={fmt(record.get('log10_pvalue'))}")
    if record.get("aligned_value") is not None:
        lines.append(f"  aligned      value={fmt(record.get('aligned_value'))}  "
                     f"log10 p={fmt(record.get('aligned_log10_pvalue'))}")
    if record.get("base_loss") is not None:
        lines.append(f"  loss base={fmt(record['base_loss'])} (ppl {fmt(record['base_ppl'])})  "
                     f"ft={fmt(record['ft_loss'])} (ppl {fmt(record['ft_ppl'])})")
    return "\n".join(lines)


def run_pair(args: argparse.Namespace) -> int:
    """Run one pair and write its record (ok or failed). Returns the exit code."""
    from tracing.cli import result_path
    from tracing.results import new_record, save_record

    t0 = time.perf_counter()
    path = result_path(args.save, args.base_model_id, args.ft_model_id, args.stat)
    args.out_dir = str(path.parent)
    record = new_record({k: v for k, v in vars(args).items() if k != "out_dir"})
    record.update(stat=get_stat(args.stat).name, base_model_id=args.base_model_id,
                  ft_model_id=args.ft_model_id, error=None, value=None, log10_pvalue=None,
                  aligned_value=None, aligned_log10_pvalue=None, base_loss=None, ft_loss=None,
                  base_ppl=None, ft_ppl=None)
    code = 0
    try:
        execute(args, record)
        record["status"] = "ok"
    except TracingError as e:
        record.update(status="failed", error=str(e))
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except Exception as e:  # unexpected: keep the traceback in the record, one line on the terminal
        record.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        print(f"error: {type(e).__name__}: {e} (traceback saved in {path})", file=sys.stderr)
        code = 1
    record["wall_time_s"] = time.perf_counter() - t0
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    save_record(record, path)
    if code == 0:
        print(summary(record))
    print(f"saved {path}")
    return code
