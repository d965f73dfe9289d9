"""Tensor sources: the one way weight statistics read weights, one tensor at a time, never a whole model.

    src = open_source("/ckpt/llama")            # safetensors dir (sharded or not), .gguf, LoRA dir, hub id[@rev]
    src = open_source(ckpt)                     # ... or a resolved tracing.checkpoints.Checkpoint
    src.keys(), src.shape(key), src.dtype(key)  # from headers, no tensor data read
    w = src.get("model.layers.0.mlp.up_proj.weight")   # one tensor, CPU, stored dtype
    src = ModuleSource(model)                   # a loaded model (data statistics, tests)
    src = open_files(ckpt)                      # the streaming source, or None where only loading can read it

Forms (the same names `load_model` takes): a local directory with safetensors (`SafetensorsSource`), a .gguf
file (`GGUFSource`), a PEFT LoRA adapter directory over its base (`LoraSource`), a hub id (only config,
tokenizer, index and shards are downloaded, then read like a local directory). A checkpoint these cannot
stream (PyTorch .bin weights only, or an adapter with DoRA and the like) is loaded with `load_model` and
served as a `ModuleSource`, with a log line saying so. Bad checkpoints (missing or truncated shards, an index
naming an absent file, a GGUF tensor type that cannot be dequantized, an adapter for other modules) are one-line
TracingErrors when the source opens, before any statistic runs.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from tracing.access import guard
from tracing.checkpoints import Checkpoint, has_safetensors, load_tokenizer, resolve
from tracing.devices import resolve_dtype
from tracing.models import load_model
from tracing.sources import hub
from tracing.sources.base import ModuleSource, Source, as_source
from tracing.sources.gguf_file import GGUFSource
from tracing.sources.lora import LoraSource, Unsupported
from tracing.sources.renaming import Unconvertible
from tracing.sources.safetensors_files import SafetensorsSource

__all__ = ["GGUFSource", "LoraSource", "ModuleSource", "SafetensorsSource", "Source", "as_source", "open_source",
           "open_files", "leaves"]
log = logging.getLogger(__name__)


def open_source(model: Checkpoint | str, *, dtype: str | torch.dtype | None = None, token: str | None = None,
                adapter_base: str | None = None, trust_remote_code: bool = False, revision: str | None = None,
                progress: bool = True, allow_keys: Sequence[str] = (), notes: list | None = None) -> Source:
    """A source for a Checkpoint, or a name: hub id[@revision], local directory, PEFT adapter directory or .gguf
    file (resolved with `revision` and `adapter_base`).

    `dtype`: cast every tensor read to it (None: as stored). Raises TracingError (one line naming the fix)
    for a missing or broken checkpoint, an unreachable adapter base, an unsupported architecture, or weights
    that are not what the config says (as `load_model`: `allow_keys` lets named missing / unexpected ones
    through, each noted in `notes`; allowed missing ones are left out of the source).
    """
    token = token or os.environ.get("HF_TOKEN") or None
    cast = resolve_dtype(dtype, "cpu") if dtype is not None else None
    common = dict(token=token, trust_remote_code=trust_remote_code)
    checks = dict(allow_keys=allow_keys, notes=notes)
    with guard(token, progress):
        ckpt = model if isinstance(model, Checkpoint) else \
            resolve(model, revision=revision, adapter_base=adapter_base, progress=progress, **common)
        source = open_files(ckpt, dtype=cast, **common, **checks)
        if source is None:
            loaded, tok = load_model(ckpt, dtype=cast, device="cpu", progress=progress, **common, **checks)
            source = ModuleSource(loaded, tokenizer=tok, name=ckpt.name)
        return source


def open_files(ckpt: Checkpoint, *, dtype: torch.dtype | None = None, token: str | None = None,
               trust_remote_code: bool = False, allow_keys: Sequence[str] = (), notes: list | None = None,
               ) -> Source | None:
    """The streaming source of `ckpt` (its headers read and checked), or None when its weights can only be read
    by loading the model (PyTorch .bin weights only, keys transformers converts, an adapter feature LoraSource
    does not compute), with a log line saying why. A hub checkpoint's files are downloaded here."""
    common = dict(token=token, trust_remote_code=trust_remote_code)
    checks = dict(allow_keys=allow_keys, notes=notes)
    folder = Path(ckpt.path)
    if ckpt.kind == "hub":
        fetched = hub.fetch(ckpt.location, ckpt.name, token)
        if fetched is None:
            log.info("%s has no safetensors weights: loading it whole", ckpt.name)
            return None
        folder = fetched
    if ckpt.adapter is not None:
        return _adapter(ckpt, folder, dtype, **common, **checks)
    if ckpt.kind == "gguf":
        local = folder / ckpt.gguf_file
        path = local if local.is_file() else hub.fetch_file(ckpt.location, ckpt.name, ckpt.gguf_file, token)
        source: Source = GGUFSource(path, ckpt.config, name=ckpt.name, dtype=dtype, **checks)
    elif not has_safetensors(folder):
        log.warning("%s has no safetensors weights: loading it whole (re-save it with save_pretrained "
                    "to stream it)", ckpt.name)
        return None
    else:
        try:
            source = SafetensorsSource(folder, ckpt.config, name=ckpt.name, dtype=dtype, **checks)
        except Unconvertible as why:
            log.warning("%s stores %s: loading it whole", ckpt.name, why)
            return None
    source.tokenizer_from(functools.partial(load_tokenizer, ckpt, quiet=True, **common))
    return source


def _adapter(ckpt: Checkpoint, folder: Path, cast, *, token, trust_remote_code, allow_keys, notes) -> Source | None:
    common = dict(token=token, trust_remote_code=trust_remote_code)
    checks = dict(allow_keys=allow_keys, notes=notes)
    base = open_files(ckpt.base, **common, **checks)
    if base is None:  # a base that only loading reads: peft merges the adapter into the loaded base
        return None
    try:
        source: Source = LoraSource(folder, base, ckpt.adapter, name=ckpt.name, dtype=cast, **checks)
    except Unsupported as why:
        log.warning("adapter %s uses %s, which is not streamed: merging it into its base through peft", ckpt.name,
                    why)
        base.close()
        return None
    source.tokenizer_from(functools.partial(load_tokenizer, ckpt, quiet=True, **common))
    return source


def leaves(source: Source) -> list[Source]:
    """The sources that read files under `source` (through views and adapters): where read time is spent."""
    inner = [getattr(source, a) for a in ("inner", "base") if isinstance(getattr(source, a, None), Source)]
    return [x for s in inner for x in leaves(s)] if inner else [source]
