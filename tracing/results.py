"""Result records: plain-data dicts saved as a pickle plus a JSON twin, written atomically, loaded safely.

    rec = new_record(vars(args)); rec.update(stat="csu", value=..., status="ok")
    save_record(rec, "results/a__vs__b__csu.pkl")      # also writes results/a__vs__b__csu.json
    load_record("results/a__vs__b__csu.pkl")           # restricted unpickler: plain builtins only

A record holds only dict / list / str / int / float / bool / None, so a result file cannot carry code
and the JSON twin is the same content. The keys the pipeline fills are documented in README.md (results).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import platform
import re
import subprocess
import tempfile
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from tracing import __version__
from tracing.errors import TracingError
from tracing.naming import failed_path

SCHEMA = 1
PLAIN_SCALARS = (str, int, float, bool, type(None))

# key names that look like secrets; the harmless ones below contain "token" but are settings
_SECRET = re.compile(r"token|password|passwd|secret|api_?key|credential", re.IGNORECASE)
_HARMLESS = {"max_tokens", "report_token", "max_new_tokens", "num_tokens", "tokenizer", "tokens_per_block"}


@lru_cache(maxsize=1)
def git_info() -> dict:
    """{"commit": sha or None, "dirty": bool or None} of the repository holding the tracing package."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return {"commit": commit.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _is_secret(key: str) -> bool:
    return key.lower() not in _HARMLESS and bool(_SECRET.search(key))


def scrub_args(args: dict) -> dict:
    """Arguments safe to store: secret-looking keys dropped, non-plain values turned into str."""
    out = {}
    for key, value in args.items():
        if _is_secret(str(key)):
            continue
        try:
            out[str(key)] = to_plain(value)
        except TracingError:
            out[str(key)] = str(value)
    return out


def to_plain(obj: Any) -> Any:
    """numpy/torch scalars and 0-d arrays -> float/int/bool, tuples -> lists, Paths -> str, recursively.

    Multi-element tensors/arrays become nested lists. Anything else that is not plain raises TracingError.
    """
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    tolist = getattr(obj, "tolist", None)  # numpy scalars/arrays, torch tensors
    if callable(tolist) and type(obj).__module__.split(".")[0] in ("numpy", "torch"):
        if hasattr(obj, "detach"):
            obj = obj.detach().cpu()
        return to_plain(obj.tolist())
    raise TracingError(f"cannot store a {type(obj).__module__}.{type(obj).__name__} in a result record; "
                       "convert it to plain Python data first")


def _versions() -> dict:
    """The code's own version and the libraries that can move a result's numbers."""
    out = {"model-tracing": __version__, "python": platform.python_version()}
    for dist in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "scipy", "peft", "submitit"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _device() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return f"cuda ({torch.cuda.get_device_name(0)} x{torch.cuda.device_count()})"
    except Exception:  # a broken CUDA setup must not stop a record from being written
        pass
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_record(args: dict) -> dict:
    """A fresh record for one run: arguments (scrubbed), code version, library versions, device, start time."""
    return {"schema": SCHEMA, "args": scrub_args(dict(args)), "git": dict(git_info()),
            "versions": _versions(), "device": _device(), "started": _now(), "status": "running"}


def checkpoint_identities(base: Any, ft: Any) -> dict:
    """The record's "checkpoints" entry: {"base": identity, "ft": identity} of the two
    `tracing.checkpoints.Checkpoint`s (name, kind, model_type, revision, commit, content_hash, an adapter's base)."""
    return {"base": base.identity(), "ft": ft.identity()}


def _check_plain(obj: Any, where: str = "record") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TracingError(f"result record key {where}[{k!r}] is not a str; use to_plain() before saving")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, PLAIN_SCALARS):
        raise TracingError(f"result record {where} is a {type(obj).__module__}.{type(obj).__name__}, not plain "
                           "data; convert it with tracing.results.to_plain() before saving")


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder (fsync, rename): never half-written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite_only(record: dict) -> dict:
    """A copy of `record` in which every NaN / inf float is None, its JSON path and value listed under
    `nonfinite`, e.g. {"per_layer[1].log10_pvalue": "nan"}: strict JSON, and nothing lost.

    Idempotent: a record that is already finite comes back equal (paths found earlier are kept)."""
    found: dict[str, str] = dict(record.get("nonfinite") or {})

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, float) and not math.isfinite(obj):
            found[path] = str(obj)  # "nan", "inf", "-inf"
            return None
        if isinstance(obj, dict):
            return {k: walk(v, f"{path}.{k}" if path else k) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return obj

    out = walk({k: v for k, v in record.items() if k != "nonfinite"}, "")
    if found:
        out["nonfinite"] = found
    return out


def save_record(record: dict, path: str | Path) -> Path:
    """Write `record` to `path` (.pkl, protocol 4) and its JSON twin (.json), each atomically.

    The JSON is written first, the pickle last: the pickle's presence means the run is complete.
    Both hold `finite_only(record)`: strict JSON (no NaN / Infinity), the same content in both files.
    """
    _check_plain(record)
    record = finite_only(record)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=1, allow_nan=False)
    atomic_write(path.with_suffix(".json"), text.encode())
    atomic_write(path, pickle.dumps(record, protocol=4))
    return path


def check_writable(folder: str | Path, flag: str = "--save", create: bool = True) -> Path:
    """Make `folder` (parents too) and prove a file can be written there, before any work is done; with
    `create=False` (a dry run) only check that it could be made: no folder under a regular file, the nearest
    existing folder writable.

    A folder that cannot take a file is a TracingError naming `flag`, so no result is computed and then lost."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise TracingError(f"cannot write to {folder}: {existing} is a file, not a folder; pass {flag} a writable "
                           "folder")
    if not create:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise TracingError(f"cannot write to {existing} (permission denied): pass {flag} a writable folder")
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise TracingError(f"cannot write to {folder} ({e.strerror or type(e).__name__}): pass {flag} a "
                           "writable folder") from None
    return folder


def _holds_ok(path: Path) -> bool:
    try:
        return path.is_file() and load_record(path).get("status") == "ok"
    except TracingError:
        return False


def outcome_path(path: str | Path, status: str) -> Path:
    """Where a run's record belongs: `path`, except that a failed run never replaces an ok record of the
    same configuration: it goes beside it (naming.failed_path), and the ok record stays."""
    path = Path(path)
    return failed_path(path) if status != "ok" and _holds_ok(path) else path


def save_outcome(record: dict, path: str | Path) -> Path:
    """save_record at outcome_path(path, record["status"]); returns the path written."""
    return save_record(record, outcome_path(path, str(record.get("status"))))


class _PlainUnpickler(pickle.Unpickler):
    """Admits no global at all: plain containers and scalars are built by opcodes, not by find_class."""

    def find_class(self, module: str, name: str):
        raise _Refused(f"{module}.{name}")


class _Refused(Exception):
    pass


def load_record(path: str | Path) -> dict:
    """Load a result pickle safely: anything but plain builtins is refused with TracingError, never run.

    Records written before results were strict JSON may hold NaN / inf floats: they load as `finite_only`
    gives them (None, with the paths under `nonfinite`), so every record reads the same way."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TracingError(f"cannot read result {path}: {e.strerror or e}") from None
    try:
        obj = _PlainUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise TracingError(f"refusing to load {path}: it contains {e} (result files hold plain data only)") from None
    except Exception as e:  # truncated / corrupt: EOFError, UnpicklingError, ValueError, ...
        raise TracingError(f"corrupt or truncated result {path} ({type(e).__name__}); delete it and rerun "
                           "the pair") from None
    if not isinstance(obj, dict):
        raise TracingError(f"result {path} holds a {type(obj).__name__}, not a record dict; delete it and rerun")
    try:
        obj = _tuples_to_lists(obj)
        _check_plain(obj)
    except TracingError as e:
        raise TracingError(f"refusing to load {path}: {e}") from None
    except RecursionError:  # a self-referencing or absurdly deep structure: no record looks like that
        raise TracingError(f"refusing to load {path}: it nests too deeply (or refers to itself)") from None
    return finite_only(obj)


def _tuples_to_lists(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _tuples_to_lists(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_tuples_to_lists(v) for v in obj]
    return obj


def error_line(error: Any) -> str | None:
    """The last non-blank line of an error text (a traceback ends with the exception), None when there is none."""
    lines = [ln for ln in str(error).splitlines() if ln.strip()] if error else []
    return lines[-1].strip() if lines else None
