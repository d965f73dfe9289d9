"""One pair, start to finish: open/load -> (permute/rotate ft) -> statistic -> (align -> statistic) -> (eval)
-> (report) -> record.

    record = run_pair(RunConfig(base_model_id="A", ft_model_id="B", stat="csu", align=True))
    record["status"], record["log10_pvalue"], record["aligned_log10_pvalue"]

A weight statistic without --eval or --report *streams*: both checkpoints are opened as tensor sources
(tracing/sources), --permute, --rotate and --align are views over them, and tensors are read one (or one
layer's) at a time and sent to the compute device (`--device`: the GPU when there is one); no model is
loaded. Everything else loads both models (`load_model`), transforms them in place and reads their weights
through the same sources. Every run writes one result record (tracing/results.py) and returns it, also when
it fails: status "failed" with the one-line error, and `error_kind` "input" (bad input, a TracingError) or
"internal" (a bug or a crash, with the traceback in the record). Data is loaded only when the statistic or
--eval needs it.
"""

from __future__ import annotations

import os
import time
import traceback
from datetime import datetime, timezone

import torch

from tracing.align import align_weights
from tracing.arch import get_spec
from tracing.config import RunConfig
from tracing.data import load_blocks
from tracing.devices import peak_memory_mib, reset_peak_memory, resolve_device, resolve_dtype, return_freed_memory
from tracing.errors import TracingError
from tracing.evaluate import mean_loss, perplexity
from tracing.models import fit_block_size, load_model, stored_dtype
from tracing.perm import apply_perm, permuted, random_perm
from tracing.report import read_prompts, write_report
from tracing.results import check_writable, finite_only, new_record, save_outcome, to_plain
from tracing.sources import ModuleSource, Source, leaves, open_source
from tracing.statistics import StatContext, StatInfo, StatResult, get_stat
from tracing.statistics.fits import check_fits
from tracing.statistics.permtest import permtest
from tracing.transforms import RotatedSource, rotate_residual


def check(cfg: RunConfig) -> StatInfo:
    """What can be checked before any model is loaded (the statistic's name and flags); returns the statistic."""
    info = get_stat(cfg.stat)
    if cfg.num_perm and not info.scalar:
        raise TracingError(f"--num_perm needs a scalar statistic and '{info.name}' is not one: "
                           "drop --num_perm or pick e.g. l2, cos, emb, csu, mode")
    return info


def compute(info: StatInfo, ctx: StatContext, num_perm: int) -> StatResult:
    """The statistic itself, or its PERMTEST p-value when --num_perm T > 0."""
    if num_perm > 0:
        return permtest(info, ctx, num_perm, seed=ctx.seed, progress=ctx.progress)
    return info.fn(ctx)


def streams(cfg: RunConfig, info: StatInfo) -> bool:
    """Whether the run reads weights straight from the checkpoints (no model loaded): a weight statistic,
    without --eval or --report (those run the models)."""
    return not (info.needs_data or cfg.eval or cfg.report)


def _open_pair(cfg: RunConfig, token: str | None, notes: list) -> tuple[Source, Source]:
    kw = dict(dtype=cfg.dtype, token=token, adapter_base=cfg.adapter_base, trust_remote_code=cfg.trust_remote_code,
              progress=not cfg.no_progress, allow_keys=cfg.allow_keys or (), notes=notes)
    return open_source(cfg.base_model_id, **kw), open_source(cfg.ft_model_id, **kw)


def _load_pair(cfg: RunConfig, token: str | None, notes: list, record: dict):
    device = resolve_device(cfg.device)
    stored = () if cfg.dtype or device.type == "cuda" else [  # the CPU default follows the checkpoints
        stored_dtype(name, token=token, trust_remote_code=cfg.trust_remote_code)
        for name in (cfg.base_model_id, cfg.ft_model_id)]
    dtype = resolve_dtype(cfg.dtype, device, stored)
    record["dtype"] = str(dtype).removeprefix("torch.")
    kw = dict(dtype=dtype, device=cfg.device, device_map=cfg.device_map, trust_remote_code=cfg.trust_remote_code,
              token=token, adapter_base=cfg.adapter_base, progress=not cfg.no_progress,
              allow_keys=cfg.allow_keys or (), notes=notes)
    base, tok_base = load_model(cfg.base_model_id, **kw)
    ft, tok_ft = load_model(cfg.ft_model_id, **kw)
    return base, tok_base, ft, tok_ft


def _fill(record: dict, prefix: str, res: StatResult) -> None:
    record[f"{prefix}value"] = to_plain(res.value)
    record[f"{prefix}log10_pvalue"] = to_plain(res.log10_pvalue)
    record[f"{prefix}per_layer"] = to_plain(res.per_layer)
    record[f"{prefix}extras"] = to_plain(res.extras)


def execute(cfg: RunConfig, record: dict, token: str | None = None) -> None:
    """Fill `record` in place; raises on failure (the caller records the error)."""
    info = check(cfg)
    streamed = record["streamed"] = streams(cfg, info)
    t0 = time.perf_counter()
    base = ft = tok_base = tok_ft = compute_device = None
    if streamed:
        src_base, src_ft = _open_pair(cfg, token, record["notes"])
        compute_device = resolve_device(cfg.device)
        record["compute_device"] = str(compute_device)
    else:
        base, tok_base, ft, tok_ft = _load_pair(cfg, token, record["notes"], record)
        src_base, src_ft = ModuleSource(base, tokenizer=tok_base), ModuleSource(ft, tokenizer=tok_ft)
    record["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    check_fits(info, src_base, src_ft, align=cfg.align)
    if cfg.permute:
        perm = random_perm(src_ft.spec, src_ft.shapes(), seed=cfg.seed)
        if streamed:
            src_ft = permuted(src_ft, perm)
        else:
            apply_perm(ft, src_ft.spec, perm)  # in place: the model's source reads the permuted weights
    if cfg.rotate:
        if streamed:
            src_ft = RotatedSource(src_ft, seed=cfg.seed + 1)
        else:
            rotate_residual(ft, src_ft.spec, seed=cfg.seed + 1)
            src_ft = ModuleSource(ft, get_spec(ft.config), tokenizer=tok_ft)  # rotation unties embeddings

    blocks = None
    if info.needs_data or cfg.eval:
        block_size, note = fit_block_size(cfg.block_size, {"base": base, "fine-tuned": ft})
        if note:
            record["notes"].append(note)
        vocab = min(base.get_input_embeddings().num_embeddings, ft.get_input_embeddings().num_embeddings)
        blocks = load_blocks(cfg.dataset, tok_base, block_size, max_blocks=cfg.max_blocks, seed=cfg.seed,
                             vocab_size=vocab, model_ids=(cfg.base_model_id, cfg.ft_model_id),
                             generated_dir=cfg.generated_dir, progress=not cfg.no_progress)
        record["n_blocks"], record["block_size"] = int(blocks.shape[0]), int(blocks.shape[1])

    out_dir = cfg.report or str(cfg.result_path().parent)
    ctx = StatContext.for_run(cfg, base=base, ft=ft, spec_base=src_base.spec, spec_ft=src_ft.spec,
                              source_base=src_base, source_ft=src_ft, blocks=blocks, tokenizer_base=tok_base,
                              tokenizer_ft=tok_ft, out_dir=out_dir, compute_device=compute_device)
    res = compute(info, ctx, cfg.num_perm)
    _fill(record, "", res)  # also when it is no number: a failed record shows what was computed
    res.require_number(info.name)
    if cfg.align:
        perm = align_weights(src_base, src_ft, src_base.spec, progress=ctx.progress, device=compute_device,
                             method=cfg.matching, seed=cfg.seed)
        if streamed:
            ctx.source_ft = permuted(src_ft, perm)
        else:
            apply_perm(ft, src_ft.spec, perm)
        aligned = info.fn(ctx)
        if cfg.num_perm:  # alignment chose the ft permutation most like base: ft is no longer exchangeable
            aligned.extras["permtest"] = "not run: PERMTEST is not valid after --align"
            record["notes"].append("--num_perm applies to the non-aligned statistic only; PERMTEST is not valid "
                                   "after --align (alignment picks the permutation of ft that looks most like base)")
        _fill(record, "aligned_", aligned)
        aligned.require_number(f"{info.name} after --align")
    record["stat_s"] = time.perf_counter() - t0
    if streamed:
        files = [*leaves(src_base), *leaves(src_ft)]
        record["read_s"] = sum(s.read_s for s in files)  # summed over the threads that read
        record["read_gib"] = sum(s.read_bytes for s in files) / 2 ** 30

    if cfg.eval:
        for name, model in (("base", base), ("ft", ft)):
            loss = mean_loss(model, blocks, batch_size=cfg.batch_size, progress=ctx.progress)
            record[f"{name}_loss"], record[f"{name}_ppl"] = loss, perplexity(loss)

    if cfg.report:
        record["report"] = write_report(
            base, ft, tok_base, tok_ft, src_base.spec, cfg.report,
            prompts=read_prompts(cfg.prompts) if cfg.prompts else None, focus_token=cfg.report_token,
            compare=tuple(cfg.compare.split("=", 1)) if cfg.compare else None,
            targets=[t for t in cfg.targets.split(",") if t] if cfg.targets else None,
            top_k=cfg.top_k, progress=ctx.progress)


def run_pair(cfg: RunConfig, token: str | None = None) -> dict:
    """Run one pair, write its record (ok or failed) and return it. `token`: default $HF_TOKEN, never stored.

    The record goes to cfg.result_path() (a failed run beside an ok record there, never over it); a --save
    that cannot take a file is a TracingError before any model is loaded."""
    t0 = time.perf_counter()
    path = cfg.result_path()
    check_writable(path.parent)
    record = new_record(cfg.to_dict())
    record.update(stat=get_stat(cfg.stat).name, base_model_id=cfg.base_model_id, ft_model_id=cfg.ft_model_id,
                  key=cfg.result_key(), key_flags=cfg.key_flags(), threads=torch.get_num_threads(),
                  command=cfg.command_line(), error=None, error_kind=None, value=None, log10_pvalue=None,
                  aligned_value=None, aligned_log10_pvalue=None, base_loss=None, ft_loss=None, base_ppl=None,
                  ft_ppl=None, notes=[], streamed=None, load_s=None, stat_s=None)
    return_freed_memory()
    reset_peak_memory()
    try:
        execute(cfg, record, token or os.environ.get("HF_TOKEN") or None)
        record["status"] = "ok"
    except TracingError as e:
        record.update(status="failed", error=str(e), error_kind="input")
    except Exception as e:  # unexpected: keep the traceback in the record
        record.update(status="failed", error=f"{type(e).__name__}: {e}", error_kind="internal",
                      traceback=traceback.format_exc())
    record["wall_time_s"] = time.perf_counter() - t0
    record["peak_rss_mib"], record["peak_gpu_mib"] = peak_memory_mib()
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = finite_only(record)  # what is saved: NaN / inf as None, listed under "nonfinite"
    save_outcome(record, path)
    return record


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
