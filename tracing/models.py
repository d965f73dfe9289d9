"""Load one checkpoint as an eval-mode causal LM plus its tokenizer, whatever form it comes in.

    model, tok = load_model("meta-llama/Llama-2-7b-hf@main")        # hub id, optional @revision
    model, tok = load_model("/ckpt/my-llama")                         # local dir with config.json
    model, tok = load_model("/ckpt/lora", adapter_base="/ckpt/base")  # PEFT adapter, merged into its base
    model, tok = load_model("/ckpt/model.Q8_0.gguf")                  # GGUF file, dequantized

The architecture is checked against tracing.arch from the config alone, so an unsupported model fails
before any weights are downloaded. A Hugging Face token comes from `token` or `HF_TOKEN`; it is only
ever handed to the hub client, and is scrubbed from every exception and log line raised while loading.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from transformers.utils import cached_file

from tracing.arch import get_spec
from tracing.checkpoints import Location, corrupt_error, guard, hub_error, locate, not_found
from tracing.devices import resolve_device, resolve_dtype
from tracing.errors import TracingError

if TYPE_CHECKING:  # for annotations only: importing them loads transformers' modeling code (~130 MiB)
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def read_config(src: Location, name: str, *, token, trust_remote_code: bool):
    kw = dict(revision=src.revision, token=token, trust_remote_code=trust_remote_code)
    if src.gguf_file:
        kw["gguf_file"] = src.gguf_file
    try:
        return transformers.AutoConfig.from_pretrained(src.path, **kw)
    except (OSError, ValueError, KeyError) as e:
        err = hub_error(e, src, name, token) or corrupt_error(e, name, "config.json")
        if err is not None:
            raise err from None
        if src.gguf_file:
            raise TracingError(f"cannot read GGUF file {src.gguf_file}: {str(e).splitlines()[0]} "
                               f"(transformers' GGUF support covers llama/mistral/qwen2/qwen3/gemma/gpt2 "
                               f"files; pass the original checkpoint otherwise)") from None
        raise


def read_adapter_config(src: Location, name: str, token) -> dict:
    if src.kind == "adapter":
        try:
            return json.loads((Path(src.path) / "adapter_config.json").read_text())
        except json.JSONDecodeError as e:
            raise corrupt_error(e, name, "adapter_config.json") from None
    try:
        f = cached_file(src.path, "adapter_config.json", revision=src.revision, token=token,
                        _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)  # offline: the config read decides
    except OSError as e:
        raise (hub_error(e, src, name, token) or not_found(name)) from None
    try:
        return json.loads(Path(f).read_text()) if f else {}
    except json.JSONDecodeError as e:
        raise corrupt_error(e, name, "adapter_config.json") from None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(where: str, *, revision=None, token=None, trust_remote_code=False, gguf_file=None,
                    quiet: bool = False):
    kw = dict(revision=revision, token=token, trust_remote_code=trust_remote_code)
    if gguf_file:
        kw["gguf_file"] = gguf_file
    local = Path(where)
    why = None
    if local.is_dir() and not gguf_file and not any((local / f).is_file() for f in _TOKENIZER_FILES):
        why = "no tokenizer files"
    else:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(where, **kw)
            if len(tok) > 0:  # transformers may build an empty tokenizer from nothing
                return tok
            why = "empty vocabulary"
        except Exception as e:  # a missing tokenizer is not fatal: weight statistics do not need one
            why = type(e).__name__
    if not quiet:
        log.warning("no tokenizer found with %s (%s); statistics that need text will ask for one", where, why)
    return None


def check_loading_info(name: str, info: dict, allow_keys: Sequence[str] = (), notes: list | None = None,
                       config_file: str = "config.json") -> None:
    """A checkpoint must be what its config says: weights missing from it (transformers would initialise them
    at random), unexpected ones (never loaded) or of another shape are a TracingError naming them, unless
    each matches a glob pattern of `allow_keys` (--allow_keys); allowed ones are noted in `notes`."""
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        key, ckpt, model = mismatched[0]
        raise TracingError(f"{name}: {len(mismatched)} weights have other shapes than its config.json says, e.g. "
                           f"{key} {tuple(ckpt)} in the checkpoint vs {tuple(model)}: the config does not belong "
                           f"to these weights; fix config.json")
    kinds = {"missing from the checkpoint (would be randomly initialised)": sorted(info.get("missing_keys") or ()),
             "unexpected (in the checkpoint, never loaded)": sorted(info.get("unexpected_keys") or ())}
    bad = []
    for what, keys in kinds.items():
        refused = [k for k in keys if not any(fnmatch.fnmatchcase(k, p) for p in allow_keys)]
        if refused:
            more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
            bad.append(f"{len(refused)} weights {what}: {', '.join(refused[:3])}{more}")
        if len(refused) < len(keys) and notes is not None:
            allowed = sorted(set(keys) - set(refused))
            notes.append(f"{name}: {len(allowed)} weights {what}, allowed by --allow_keys: {', '.join(allowed[:5])}")
    if bad:
        raise TracingError(f"{name} is not what its {config_file} says: {'; '.join(bad)}; pass the right checkpoint, "
                           f"or --allow_keys with these names (glob patterns) if that is expected")


DEFAULT_BLOCK_SIZE = 512  # tokens per block when --block_size is not given (shortened to fit both contexts)


def context_length(config) -> int | None:
    """The longest input a model of this config (or a model) takes (max_position_embeddings; GPT-2's
    n_positions), None if unknown."""
    config = getattr(config, "config", config)
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def fit_block_size(block_size: int | None, configs: dict[str, Any]) -> tuple[int, str | None]:
    """(tokens per block, a note when the default was shortened) for models of these configs (or models):
    `block_size` as given, or DEFAULT_BLOCK_SIZE cut to the shorter context. A given block longer than a model's
    context is a TracingError naming --block_size."""
    contexts = {who: n for who, c in configs.items() if (n := context_length(c)) is not None}
    if block_size is not None:
        for who, n in contexts.items():
            if block_size > n:
                raise TracingError(f"--block_size {block_size} is longer than the {who} model's context ({n} "
                                   f"positions, max_position_embeddings): pass --block_size {n} or less")
        return block_size, None
    if not contexts or min(contexts.values()) >= DEFAULT_BLOCK_SIZE:
        return DEFAULT_BLOCK_SIZE, None
    who, n = min(contexts.items(), key=lambda kv: kv[1])
    return n, f"blocks of {n} tokens, the {who} model's context (default {DEFAULT_BLOCK_SIZE}; set --block_size)"


def _from_pretrained(src: Location, config, *, dtype, device, device_map, token, trust_remote_code):
    """(model, loading info): shape mismatches are reported in the info (and refused by check_loading_info)."""
    kw = dict(config=config, revision=src.revision, token=token, trust_remote_code=trust_remote_code,
              dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
    if src.gguf_file:
        kw["gguf_file"] = src.gguf_file
    if device_map is not None:
        kw["device_map"] = device_map  # accelerate places (and shards) the weights itself
    elif device.type != "cpu":
        kw["device_map"] = {"": str(device)}  # load straight onto the device, not via a CPU copy
    return transformers.AutoModelForCausalLM.from_pretrained(src.path, **kw)


def stored_dtype(name: str, *, token: str | None = None, trust_remote_code: bool = False) -> torch.dtype | None:
    """The dtype a checkpoint's config says its weights are stored in (None: unknown, an adapter or GGUF file),
    read without loading any weight; for resolve_dtype's CPU default."""
    token = token or os.environ.get("HF_TOKEN") or None
    with guard(token, progress=False):
        src = locate(name, None)
        if src.kind == "adapter" or src.gguf_file:
            return None
        config = read_config(src, name, token=token, trust_remote_code=trust_remote_code)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):  # "bfloat16" in an older config
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else None


# ---------------------------------------------------------------------- the entry point
def load_model(name: str, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "auto",
               device_map: str | dict | None = None, trust_remote_code: bool = False, token: str | None = None,
               adapter_base: str | None = None, revision: str | None = None, progress: bool = True,
               allow_keys: Sequence[str] = (), notes: list | None = None,
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """(model in eval mode, tokenizer or None) for a hub id[@revision], local dir, PEFT adapter or .gguf.

    Raises TracingError (one line naming the fix) for a missing model, an unreachable adapter base,
    a gated repository without access, an architecture tracing.arch does not support, or a checkpoint
    whose weights do not fit its config (missing, unexpected or mis-shaped weights: check_loading_info;
    `allow_keys` glob patterns accept named missing / unexpected ones, each noted in `notes`).
    """
    token = token or os.environ.get("HF_TOKEN") or None
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if device_map not in (None, "auto") and not isinstance(device_map, dict):
        raise TracingError(f"unknown --device_map '{device_map}': use auto (or leave it out)")
    with guard(token, progress):
        src = locate(name, revision)
        common = dict(token=token, trust_remote_code=trust_remote_code)
        adapter = read_adapter_config(src, name, token) if src.kind in ("adapter", "hub") else {}
        if adapter:
            return _load_adapter(name, src, adapter, adapter_base, dtype=torch_dtype, device=dev,
                                 device_map=device_map, progress=progress, allow_keys=allow_keys, notes=notes,
                                 **common)
        config = read_config(src, name, **common)
        get_spec(config)  # unsupported architecture: fail before any weights are fetched
        try:
            model, info = _from_pretrained(src, config, dtype=torch_dtype, device=dev, device_map=device_map,
                                           **common)
        except Exception as e:  # hub failures and damaged files become one line; anything else stays a bug
            err = hub_error(e, src, name, token) if isinstance(e, (OSError, ValueError)) else None
            raise (err or corrupt_error(e, name) or e) from None
        check_loading_info(name, info, allow_keys, notes)
        tok = load_tokenizer(src.path, revision=src.revision, gguf_file=src.gguf_file, **common)
    log.info("loaded %s (%s, %s, %s)", name, config.model_type, torch_dtype, dev)
    return model.eval(), tok


def adapter_base_name(name: str, adapter: dict, adapter_base: str | None, *, token, trust_remote_code) -> str:
    """The base an adapter applies to: its recorded base if reachable, else `adapter_base` (--adapter_base)."""
    recorded = adapter.get("base_model_name_or_path")
    base_src, base_name = None, None
    for candidate in (recorded, adapter_base):
        if not candidate:
            continue
        try:
            s = locate(candidate)
            if s.kind == "hub":  # reachable means: its config can be read (no weights fetched yet)
                read_config(s, candidate, token=token, trust_remote_code=trust_remote_code)
            base_src, base_name = s, candidate
            break
        except TracingError as e:
            if "gated" in str(e):
                raise
            continue
    if base_src is None:
        raise TracingError(f"adapter {name} needs base {recorded or '(none recorded)'} which cannot be found: "
                           f"pass --adapter_base PATH")
    if base_src.kind == "adapter":
        raise TracingError(f"adapter {name}: its base {base_name} is itself an adapter: pass the "
                           f"full base model with --adapter_base PATH")
    if recorded and base_name != recorded:
        log.warning("adapter %s: recorded base %s is not reachable; using %s", name, recorded, base_name)
    return base_name


def _load_adapter(name: str, src: Location, adapter: dict, adapter_base: str | None, *, dtype, device,
                  device_map, token, trust_remote_code, progress, allow_keys, notes):
    """Load the adapter's base (recorded path, else `adapter_base`), apply the adapter, merge it."""
    import peft

    base_name = adapter_base_name(name, adapter, adapter_base, token=token, trust_remote_code=trust_remote_code)
    base, base_tok = load_model(base_name, dtype=dtype, device=device, device_map=device_map,
                                trust_remote_code=trust_remote_code, token=token, progress=progress,
                                allow_keys=allow_keys, notes=notes)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = peft.PeftModel.from_pretrained(base, src.path, revision=src.revision, token=token)
        for w in caught:  # peft only warns when adapter weights are missing (they stay at their init: no-ops)
            text = str(w.message)
            if "missing adapter keys while loading the checkpoint: " in text:
                missing = ast.literal_eval(text.split("checkpoint: ", 1)[1].rstrip("."))
                check_loading_info(f"adapter {name}", {"missing_keys": missing}, allow_keys, notes,
                                   "adapter_config.json")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        merged = merged.merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        err = hub_error(e, src, name, token)
        if err is not None:
            raise err from None
        raise TracingError(f"adapter {name} does not fit base {base_name} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}): pass the matching base with --adapter_base PATH") \
            from None
    tok = load_tokenizer(src.path, revision=src.revision, token=token, trust_remote_code=trust_remote_code,
                          quiet=True)
    if tok is None:
        tok = base_tok
    log.info("merged adapter %s into %s", name, base_name)
    return merged.eval(), tok
