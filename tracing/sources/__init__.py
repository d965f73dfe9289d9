"""Tensor sources: the one way weight statistics read weights, one tensor at a time, never a whole model.

    src = open_source("/ckpt/llama")            # safetensors dir (sharded or not), .gguf, LoRA dir, hub id[@rev]
    src.keys(), src.shape(key), src.dtype(key)  # from headers, no tensor data read
    w = src.get("model.layers.0.mlp.up_proj.weight")   # one tensor, CPU, stored dtype
    src = ModuleSource(model)                   # a loaded model (data statistics, tests)

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

from tracing.checkpoints import Location, guard, locate
from tracing.devices import resolve_dtype
from tracing.models import adapter_base_name, load_model, load_tokenizer, read_adapter_config, read_config
from tracing.sources import hub
from tracing.sources.base import ModuleSource, Source, as_source
from tracing.sources.gguf_file import GGUFSource
from tracing.sources.lora import LoraSource, Unsupported
from tracing.sources.renaming import Unconvertible
from tracing.sources.safetensors_files import SafetensorsSource, has_safetensors

__all__ = ["GGUFSource", "LoraSource", "ModuleSource", "SafetensorsSource", "Source", "as_source", "open_source",
           "leaves"]
log = logging.getLogger(__name__)


def open_source(name: str, *, dtype: str | torch.dtype | None = None, token: str | None = None,
                adapter_base: str | None = None, trust_remote_code: bool = False, revision: str | None = None,
                progress: bool = True, allow_keys: Sequence[str] = (), notes: list | None = None) -> Source:
    """A source for a hub id[@revision], local directory, PEFT adapter directory or .gguf file.

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
        src = locate(name, revision)
        if src.kind == "hub":
            folder = hub.fetch(src, name, token)
            if folder is None:
                log.info("%s has no safetensors weights: loading it whole", name)
                return _loaded(name, cast, revision=revision, progress=progress, **common, **checks)
            src = locate(str(folder))
        if src.kind == "adapter":
            return _adapter(name, src, cast, adapter_base, progress=progress, **common, **checks)
        config = read_config(src, name, **common)
        if src.kind == "gguf":
            local = Path(src.path) / src.gguf_file
            path = local if local.is_file() else hub.fetch_file(src, name, src.gguf_file, token)  # org/repo/x.gguf
            source: Source = GGUFSource(path, config, name=name, dtype=cast, **checks)
            source.tokenizer_from(functools.partial(load_tokenizer, src.path, gguf_file=src.gguf_file, quiet=True,
                                                    revision=src.revision, **common))
            return source
        if not has_safetensors(src.path):
            log.warning("%s has no safetensors weights: loading it whole (re-save it with save_pretrained "
                        "to stream it)", name)
            return _loaded(name, cast, progress=progress, **common, **checks)
        try:
            source = SafetensorsSource(src.path, config, name=name, dtype=cast, **checks)
        except Unconvertible as why:
            log.warning("%s stores %s: loading it whole", name, why)
            return _loaded(name, cast, progress=progress, **common, **checks)
        source.tokenizer_from(functools.partial(load_tokenizer, src.path, quiet=True, **common))
        return source


def _adapter(name: str, src: Location, cast, adapter_base, *, token, trust_remote_code, progress, allow_keys,
             notes) -> Source:
    cfg = read_adapter_config(src, name, token)
    base_name = adapter_base_name(name, cfg, adapter_base, token=token, trust_remote_code=trust_remote_code)
    checks = dict(allow_keys=allow_keys, notes=notes)
    base = open_source(base_name, token=token, trust_remote_code=trust_remote_code, progress=progress, **checks)
    try:
        source: Source = LoraSource(src.path, base, cfg, name=name, dtype=cast, **checks)
    except Unsupported as why:
        log.warning("adapter %s uses %s, which is not streamed: merging it into its base through peft", name, why)
        base.close()
        return _loaded(name, cast, adapter_base=adapter_base, progress=progress, token=token,
                       trust_remote_code=trust_remote_code, **checks)
    own = functools.partial(load_tokenizer, src.path, quiet=True, token=token, trust_remote_code=trust_remote_code)
    source.tokenizer_from(lambda: own() or base.tokenizer)
    return source


def _loaded(name: str, cast, **kw) -> Source:
    model, tok = load_model(name, dtype=cast, device="cpu", **kw)
    return ModuleSource(model, tokenizer=tok, name=name)


def leaves(source: Source) -> list[Source]:
    """The sources that read files under `source` (through views and adapters): where read time is spent."""
    inner = [getattr(source, a) for a in ("inner", "base") if isinstance(getattr(source, a, None), Source)]
    return [x for s in inner for x in leaves(s)] if inner else [source]
