"""A folder of result records, read by content: every result once, wherever its file is.

    for path, record in read_records("results/llama7b")[0]: ...   # aggregate, launch.py --status
    record_key(record)                                             # (base, ft, stat, result key)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tracing.config import FIELDS, RunConfig
from tracing.errors import TracingError
from tracing.naming import RECORD_SUFFIXES, SUBMITIT_SUBDIR
from tracing.results import load_record


def result_files(folder: str | Path) -> list[Path]:
    """Record files under `folder` (any depth), submitit's job folders excepted (their pickles are not records)."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.suffix in RECORD_SUFFIXES and p.is_file()] if folder.is_dir() else []
    return sorted(p for p in files if SUBMITIT_SUBDIR not in p.relative_to(folder).parts)


def record_key(rec: dict) -> tuple[str, str, str, str] | None:
    """What a record is the result of, read from its content: (base, ft, stat as given, result key). Records
    written before the key was stored get it recomputed from their options; None when even that fails."""
    args = rec.get("args") if isinstance(rec.get("args"), dict) else {}
    key = rec.get("key")
    if not key:
        try:
            key = RunConfig.from_dict({k: v for k, v in args.items() if k in FIELDS}).result_key()
        except (TracingError, TypeError):
            return None
    return str(args.get("base_model_id")), str(args.get("ft_model_id")), str(args.get("stat")), str(key)


def read_records(folder: str | Path) -> tuple[list[tuple[Path, dict]], list[str], int]:
    """Every result under `folder` once, whatever file it is in: ([(path, record)], problem lines, superseded).

    Records of the same result (record_key: a copied folder, a failed rerun beside an ok record) count once:
    an ok record wins over a failed one, then the newest. `superseded` counts the others."""
    best: dict[Any, tuple[Path, dict]] = {}
    problems: list[str] = []
    files = result_files(folder)
    for path in files:
        try:
            rec = load_record(path)
        except TracingError as e:
            problems.append(str(e))
            continue
        key = record_key(rec) or path
        old = best.get(key)
        rank = (rec.get("status") == "ok", str(rec.get("finished") or ""))
        if old is None or rank > (old[1].get("status") == "ok", str(old[1].get("finished") or "")):
            best[key] = (path, rec)
    return sorted(best.values(), key=lambda pr: str(pr[0])), problems, len(files) - len(problems) - len(best)
