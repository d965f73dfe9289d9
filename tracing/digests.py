"""sha256 digests of checkpoint files, cached per file: what `Checkpoint.content_hash` is made of.

    file_digest(Path("model.safetensors"))     # sha256 of the file's bytes (what `sha256sum` prints)
    config_digest(Path("config.json"))         # sha256 of the config, minus the keys that name the saving library
    json_digest({"r": 8})                      # sha256 of JSON data, keys sorted
    file_digests([a, b, c])                    # the same for several files, hashed in parallel threads
    combine("checkpoint", [("config", d0), ("model.safetensors", d1)])   # one digest of named parts

A weight file's digest is the plain sha256 of its bytes: the same as `sha256sum` and as the Hugging Face hub's
LFS object id, so a hub snapshot and a local copy of it hash equal. Hashing reads every byte once (sha256 runs at
about 1 GB/s per core; several files run in parallel threads, hashlib releases the GIL). Results are cached per
file, keyed by its resolved path, size, modification time (ns) and inode, under $MODEL_TRACING_CACHE (default
$XDG_CACHE_HOME/model-tracing or ~/.cache/model-tracing): a checkpoint is hashed once, not once per run. A cache
that cannot be written is skipped (the digest is computed again next time).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

CACHE_ENV = "MODEL_TRACING_CACHE"
VERSION = 1  # part of every digest: a change of definition never meets an old cached value
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")  # who saved it, not what it is
_BLOCK = 8 << 20  # bytes per read


def cache_dir() -> Path:
    """Where digests are cached: $MODEL_TRACING_CACHE, else $XDG_CACHE_HOME/model-tracing (~/.cache/...)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "model-tracing"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_BLOCK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """sha256 (hex) of JSON data, keys sorted: the same for equal content however it was written."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _canonical_config(path: Path) -> str:
    config = json.loads(Path(path).read_text())
    return json_digest({k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS})


def _cached(path: Path, kind: str, compute) -> str:
    """compute(path), or its cached value for this very file (same resolved path, size, mtime, inode)."""
    real = Path(path).resolve()
    st = real.stat()
    stamp = [str(real), st.st_size, st.st_mtime_ns, st.st_ino, VERSION]
    entry = cache_dir() / "digests" / f"{kind}-{hashlib.sha256(str(real).encode()).hexdigest()[:32]}.json"
    try:
        saved = json.loads(entry.read_text())
        if saved.get("stamp") == stamp:
            return saved["sha256"]
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    digest = compute(real)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=entry.parent, suffix=".tmp", delete=False) as f:
            json.dump({"stamp": stamp, "sha256": digest}, f)
        os.replace(f.name, entry)  # concurrent jobs hashing the same file: each entry whole, the last one kept
    except OSError:
        pass  # a read-only cache: hashed again next time
    return digest


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of the file's bytes, cached."""
    return _cached(Path(path), "file", _sha256_file)


def config_digest(path: str | Path) -> str:
    """sha256 (hex) of a config.json's content (keys sorted, VOLATILE_CONFIG_KEYS left out), cached."""
    return _cached(Path(path), "config", _canonical_config)


def file_digests(paths: Sequence[str | Path], workers: int | None = None) -> list[str]:
    """file_digest of each path, in parallel threads (at most `workers`, default the usable CPUs, at most 8)."""
    if len(paths) <= 1:
        return [file_digest(p) for p in paths]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(paths), workers or min(cpus, 8))) as pool:
        return list(pool.map(file_digest, paths))


def combine(kind: str, parts: Iterable[tuple[str, str | None]]) -> str:
    """One sha256 (hex) over named parts, in the given order: (name, digest or None)."""
    h = hashlib.sha256(f"model-tracing {kind} v{VERSION}\n".encode())
    for name, digest in parts:
        h.update(f"{name}\t{digest}\n".encode())
    return h.hexdigest()
