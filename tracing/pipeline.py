"""One pair, start to finish: resolve and open both checkpoints -> check what configs and headers tell -> (token
blocks) -> (load the models) -> (permute / rotate ft) -> statistic -> (align -> statistic) -> (eval) -> (report)
-> record.

    record = run_pair(RunConfig(base_model_id="A", ft_model_id="B", stat="csu", align=True))
    record["status"], record["log10_pvalue"], record["aligned_log10_pvalue"]

A run works on one `OpenedPair` (tracing/pair.py): each name resolved once into a Checkpoint, both checkpoints'
files opened once (headers checked), --permute, --rotate and --align as the pair's methods. A weight statistic
without --eval or --report *streams*: no model is loaded, tensors are read from the files one (or one layer's)
at a time, through views for the transforms, and sent to the compute device (`--device`: the GPU when there is
one). A statistic that runs the models (or --eval, --report) loads them once; then every statistic reads the
models' tensors and the transforms change the loaded ft in place. Token blocks are made with base's tokenizer
before any model is loaded, and only when the statistic or --eval needs them.

Bad input found before any model is loaded or tensor read (`prepare`: names, configs, headers, shapes, block
size, dataset) is a TracingError and writes nothing. From there on every run writes one result record
(tracing/results.py) and returns it, also when it fails: status "failed" with the one-line error, and
`error_kind` "input" (bad input, a TracingError) or "internal" (a bug or a crash, with the traceback in the
record).
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from datetime import datetime, timezone

import torch

from tracing.checkpoints import Checkpoint, hash_files, resolve
from tracing.config import RunConfig
from tracing.data import load_blocks
from tracing.devices import peak_memory_mib, reset_peak_memory, resolve_device, resolve_dtype, return_freed_memory
from tracing.errors import TracingError
from tracing.evaluate import mean_loss, perplexity
from tracing.models import fit_block_size
from tracing.pair import OpenedPair, OpenOptions
from tracing.report import read_prompts, write_report
from tracing.results import check_writable, checkpoint_identities, finite_only, new_record, save_outcome, to_plain
from tracing.statistics import StatContext, StatInfo, StatResult, get_stat
from tracing.statistics.fits import check_fits
from tracing.statistics.permtest import permtest
from tracing.transforms import check_rotatable


def check(cfg: RunConfig) -> StatInfo:
    """What can be checked before any model is loaded (the statistic's name and flags); returns the statistic."""
    info = get_stat(cfg.stat)
    if info.composite and cfg.align:
        raise TracingError(f"{info.name} aligns by itself where it helps (csu --align is one of its tests): "
                           "drop --align")
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
    return not (info.loads_models or cfg.eval or cfg.report)


def resolve_pair(cfg: RunConfig, token: str | None) -> tuple[Checkpoint, Checkpoint]:
    """Both checkpoints of the run, each name resolved once (the same name twice: one Checkpoint)."""
    kw = dict(token=token, trust_remote_code=cfg.trust_remote_code, adapter_base=cfg.adapter_base,
              progress=not cfg.no_progress)
    base = resolve(cfg.base_model_id, **kw)
    return base, base if cfg.ft_model_id == cfg.base_model_id else resolve(cfg.ft_model_id, **kw)


def open_pair(cfg: RunConfig, token: str | None, notes: list) -> OpenedPair:
    """Both checkpoints resolved and opened (configs, architectures, headers checked); no model loaded."""
    base, ft = resolve_pair(cfg, token)
    # --dtype; else bf16 on a GPU; on a CPU bf16 where both are stored in bf16 and it has bf16 units (no weight
    # rounded: benchmarks/cpu_dtype.py), else float32
    dtype = resolve_dtype(cfg.dtype, resolve_device(cfg.device), [base.stored_dtype, ft.stored_dtype])
    opts = OpenOptions(dtype=dtype, device=cfg.device,
                       device_map=cfg.device_map, stream_dtype=resolve_dtype(cfg.dtype, "cpu") if cfg.dtype else None,
                       trust_remote_code=cfg.trust_remote_code, progress=not cfg.no_progress,
                       allow_keys=cfg.allow_keys or (), notes=notes, token=token)
    return OpenedPair.open(base, ft, opts)


def check_inputs(cfg: RunConfig, info: StatInfo, pair: OpenedPair) -> None:
    """What configs and headers tell before any model is loaded: whether the statistic fits the pair (where both
    checkpoints stream), whether ft can be rotated, and whether --block_size fits both contexts."""
    if cfg.rotate:  # the flag the user gave first: it cannot apply to this model whatever the statistic
        check_rotatable(pair.checkpoints[1].spec)
    if pair.headers_known:
        check_fits(info, pair.source_base, pair.source_ft, align=cfg.align)
    if info.needs_data or cfg.eval:
        block_size(cfg, pair)


def block_size(cfg: RunConfig, pair: OpenedPair) -> tuple[int, str | None]:
    """Tokens per block (models.fit_block_size: --block_size, or 512 cut to the shorter context) and the note
    saying it was cut."""
    base, ft = pair.checkpoints
    return fit_block_size(cfg.block_size, {"base": base.config, "fine-tuned": ft.config})


def dataset(cfg: RunConfig, info: StatInfo) -> str:
    """--dataset, or the statistic's default: WikiText-103, and random token blocks for auto (which must run
    offline on any pair; its activation test needs no real text to see a derivative)."""
    return cfg.dataset or ("random" if info.name == "auto" else "wikitext")


def load_data(cfg: RunConfig, info: StatInfo, pair: OpenedPair, notes: list | None = None) -> torch.Tensor | None:
    """The token blocks, if the statistic or --eval needs them (base's tokenizer; no model loaded)."""
    if not (info.needs_data or cfg.eval):
        return None
    return blocks_for(cfg, info, pair, notes)


def blocks_for(cfg: RunConfig, info: StatInfo, pair: OpenedPair, notes: list | None = None) -> torch.Tensor:
    """The token blocks of this run (also what a composite statistic loads when one of its tests needs them)."""
    size, note = block_size(cfg, pair)
    if note and notes is not None:
        notes.append(note)
    return load_blocks(dataset(cfg, info), pair.tokenizer_base, size, max_blocks=cfg.max_blocks, seed=cfg.seed,
                       vocab_size=min(pair.vocab_sizes()), model_ids=(cfg.base_model_id, cfg.ft_model_id),
                       generated_dir=cfg.generated_dir, progress=not cfg.no_progress)


def _fill(record: dict, prefix: str, res: StatResult) -> None:
    record[f"{prefix}value"] = to_plain(res.value)
    record[f"{prefix}log10_pvalue"] = to_plain(res.log10_pvalue)
    record[f"{prefix}per_layer"] = to_plain(res.per_layer)
    record[f"{prefix}extras"] = to_plain(res.extras)


def execute(cfg: RunConfig, info: StatInfo, pair: OpenedPair, blocks: torch.Tensor | None, record: dict) -> None:
    """The run on an opened pair: fill `record` in place; raises on failure (the caller records the error).

    One path: the models are loaded only when a statistic, --eval or --report runs them (then weight statistics
    read the models' tensors); otherwise tensors stream from the files. --permute, --rotate and --align are the
    pair's methods (views over the files, or the loaded ft changed in place)."""
    record["streamed"] = streams(cfg, info)
    t0 = time.perf_counter()
    if not record["streamed"]:
        pair.load()
    record["load_s"] = (record["load_s"] or 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    if not pair.headers_known:  # shapes known only now
        check_fits(info, pair.source_base, pair.source_ft, align=cfg.align)
    if cfg.permute:
        pair = pair.permute(cfg.seed)
    if cfg.rotate:
        pair = pair.rotate(cfg.seed + 1)
    compute_device = None if pair.loaded else resolve_device(cfg.device)
    if compute_device is not None:
        record["compute_device"] = str(compute_device)
    ctx = StatContext.for_pair(cfg, pair, blocks=blocks, out_dir=cfg.report or str(cfg.result_path().parent),
                               load_blocks=lambda: blocks_for(cfg, info, pair, record["notes"]),
                               compute_device=compute_device)
    res = compute(info, ctx, cfg.num_perm)
    _fill(record, "", res)  # also when it is no number: a failed record shows what was computed
    res.require_number(info.name)
    if cfg.align:
        pair = pair.align(cfg.matching, cfg.seed, progress=ctx.progress, device=compute_device)
        aligned = info.fn(ctx.on(pair))
        if cfg.num_perm:  # alignment chose the ft permutation most like base: ft is no longer exchangeable
            aligned.extras["permtest"] = "not run: PERMTEST is not valid after --align"
            record["notes"].append("--num_perm applies to the non-aligned statistic only; PERMTEST is not valid "
                                   "after --align (alignment picks the permutation of ft that looks most like base)")
        _fill(record, "aligned_", aligned)
        aligned.require_number(f"{info.name} after --align")
    record["stat_s"] = time.perf_counter() - t0
    if not pair.loaded:
        read_s, read_bytes = pair.read_stats()
        record["read_s"], record["read_gib"] = read_s, read_bytes / 2 ** 30  # summed over the threads that read

    if cfg.eval:
        for name, model in (("base", pair.base), ("ft", pair.ft)):
            loss = mean_loss(model, blocks, batch_size=cfg.batch_size, progress=ctx.progress)
            record[f"{name}_loss"], record[f"{name}_ppl"] = loss, perplexity(loss)

    if cfg.report:
        record["report"] = write_report(
            pair.base, pair.ft, pair.tokenizer_base, pair.tokenizer_ft, pair.spec_base, cfg.report,
            prompts=read_prompts(cfg.prompts) if cfg.prompts else None, focus_token=cfg.report_token,
            compare=tuple(cfg.compare.split("=", 1)) if cfg.compare else None,
            targets=[t for t in cfg.targets.split(",") if t] if cfg.targets else None,
            top_k=cfg.top_k, progress=ctx.progress)


def run_pair(cfg: RunConfig, token: str | None = None) -> dict:
    """Run one pair, write its record (ok or failed) and return it. `token`: default $HF_TOKEN, never stored.

    Bad input found before any model is loaded or any tensor read (an unknown name, an unsupported architecture,
    a checkpoint broken in its config or headers, shapes that differ, a --block_size longer than a context, a
    dataset that cannot be read) is a TracingError raised here, and nothing is written. Once the run reads
    weights, every outcome is a record at cfg.result_path() (a failed run beside an ok record there, never over
    it); a --save that cannot take a file is a TracingError before anything is opened."""
    t0 = time.perf_counter()
    path = cfg.result_path()
    check_writable(path.parent)
    info = check(cfg)
    token = token or os.environ.get("HF_TOKEN") or None
    record = new_record(cfg.to_dict())
    record.update(stat=info.name, base_model_id=cfg.base_model_id, ft_model_id=cfg.ft_model_id,
                  key=cfg.result_key(), key_flags=cfg.key_flags(), threads=torch.get_num_threads(),
                  command=cfg.command_line(), error=None, error_kind=None, value=None, log10_pvalue=None,
                  aligned_value=None, aligned_log10_pvalue=None, base_loss=None, ft_loss=None, base_ppl=None,
                  ft_ppl=None, notes=[], streamed=None, load_s=None, data_s=None, stat_s=None, checkpoints=None)
    return_freed_memory()
    reset_peak_memory()
    pair = blocks = identities = None
    try:
        pair, blocks = prepare(cfg, info, token, record)
        identities = _Background(_identities, pair)  # hashing overlaps the run
    except TracingError:
        raise  # bad input, nothing loaded yet: no record (the caller prints the line, exit 2)
    except Exception as e:  # a bug or a crash: kept in a record with its traceback
        _failed(record, e)
    if record["error"] is None:
        try:
            execute(cfg, info, pair, blocks, record)
            record["status"] = "ok"
        except TracingError as e:
            record.update(status="failed", error=str(e), error_kind="input")
        except Exception as e:  # unexpected: keep the traceback in the record
            _failed(record, e)
    if identities is not None:
        try:
            record["checkpoints"] = identities.result()
        except Exception as e:  # the run's outcome stands without them
            record["notes"].append(f"the checkpoints' identities could not be recorded: {type(e).__name__}: {e}")
    record["wall_time_s"] = time.perf_counter() - t0
    record["peak_rss_mib"], record["peak_gpu_mib"] = peak_memory_mib()
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = finite_only(record)  # what is saved: NaN / inf as None, listed under "nonfinite"
    save_outcome(record, path)
    return record


def prepare(cfg: RunConfig, info: StatInfo, token: str | None, record: dict) -> tuple[OpenedPair, torch.Tensor | None]:
    """Everything before any model is loaded or tensor read: the opened pair (configs and headers checked), the
    checks of `check_inputs`, the token blocks. Fills load_s (opening), data_s and the blocks' shape in `record`."""
    t0 = time.perf_counter()
    pair = open_pair(cfg, token, record["notes"])
    record["dtype"] = str(pair.dtype).removeprefix("torch.")
    check_inputs(cfg, info, pair)
    record["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    blocks = load_data(cfg, info, pair, record["notes"])
    record["data_s"] = time.perf_counter() - t0
    if blocks is not None:
        record["n_blocks"], record["block_size"] = int(blocks.shape[0]), int(blocks.shape[1])
    return pair, blocks


def _identities(pair: OpenedPair) -> dict:
    hash_files(list(pair.checkpoints))  # both checkpoints' files at once, in parallel threads
    return checkpoint_identities(*pair.checkpoints)


class _Background:
    """fn(*args) in a daemon thread, so that it overlaps the run and a Ctrl-C never waits for it."""

    def __init__(self, fn, *args):
        self._out: list = []

        def target() -> None:
            try:
                self._out.append(fn(*args))
            except Exception as e:  # handed to the caller by result()
                self._out.append(e)
        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()

    def result(self):
        """fn's return value; its exception is raised here."""
        self._thread.join()
        if isinstance(self._out[0], Exception):
            raise self._out[0]
        return self._out[0]


def _failed(record: dict, e: Exception) -> None:
    record.update(status="failed", error=f"{type(e).__name__}: {e}", error_kind="internal",
                  traceback=traceback.format_exc())


def summary(record: dict) -> str:
    """A few human lines for the terminal."""
    def fmt(v):
        return "-" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)
    lines = [f"{record['stat']}: {record['base_model_id']} vs {record['ft_model_id']}  [{record['status']}]"]
    extras = record.get("extras") or {}
    if "derivation" in extras:  # auto: each test, the combined p, the derivation line
        for t in extras["tests"]:
            mark = "  <- decides" if t["test"] == extras["decided_by"] else ""
            lines.append(f"  {t['test']:<12} log10 p={fmt(t['log10_pvalue'])}  ({t['seconds']:.1f} s){mark}")
        lines.append(f"  combined     log10 p={fmt(record.get('log10_pvalue'))}  (Bonferroni over "
                     f"{len(extras['plan'])} planned tests: {', '.join(extras['plan'])})")
        lines.append(f"  {extras['derivation']}")
        return "\n".join(lines)
    lines.append(f"  non-aligned  value={fmt(record.get('value'))}  log10 p={fmt(record.get('log10_pvalue'))}")
    if record.get("aligned_value") is not None:
        lines.append(f"  aligned      value={fmt(record.get('aligned_value'))}  "
                     f"log10 p={fmt(record.get('aligned_log10_pvalue'))}")
    if record.get("base_loss") is not None:
        lines.append(f"  loss base={fmt(record['base_loss'])} (ppl {fmt(record['base_ppl'])})  "
                     f"ft={fmt(record['ft_loss'])} (ppl {fmt(record['ft_ppl'])})")
    return "\n".join(lines)
