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

import json
import logging
import os
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import cached_file

from tracing.arch import get_spec
from tracing.checkpoints import Location, corrupt_error, guard, hub_error, locate, not_found
from tracing.devices import resolve_device, resolve_dtype
from tracing.errors import TracingError

log = logging.getLogger(__name__)


def _read_config(src: Location, name: str, *, token, trust_remote_code: bool):
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


def _read_adapter_config(src: Location, name: str, token) -> dict:
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


def _load_tokenizer(where: str, *, revision=None, token=None, trust_remote_code=False, gguf_file=None,
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


def _from_pretrained(src: Location, config, *, dtype, device, device_map, token, trust_remote_code):
    kw = dict(config=config, revision=src.revision, token=token, trust_remote_code=trust_remote_code,
              dtype=dtype)
    if src.gguf_file:
        kw["gguf_file"] = src.gguf_file
    if device_map is not None:
        kw["device_map"] = device_map  # accelerate places (and shards) the weights itself
    elif device.type != "cpu":
        kw["device_map"] = {"": str(device)}  # load straight onto the device, not via a CPU copy
    return transformers.AutoModelForCausalLM.from_pretrained(src.path, **kw)


# ---------------------------------------------------------------------- the entry point
def load_model(name: str, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "auto",
               device_map: str | dict | None = None, trust_remote_code: bool = False, token: str | None = None,
               adapter_base: str | None = None, revision: str | None = None,
               progress: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """(model in eval mode, tokenizer or None) for a hub id[@revision], local dir, PEFT adapter or .gguf.

    Raises TracingError (one line naming the fix) for a missing model, an unreachable adapter base,
    a gated repository without access, or an architecture tracing.arch does not support.
    """
    token = token or os.environ.get("HF_TOKEN") or None
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if device_map not in (None, "auto") and not isinstance(device_map, dict):
        raise TracingError(f"unknown --device_map '{device_map}': use auto (or leave it out)")
    with guard(token, progress):
        src = locate(name, revision)
        common = dict(token=token, trust_remote_code=trust_remote_code)
        adapter = _read_adapter_config(src, name, token) if src.kind in ("adapter", "hub") else {}
        if adapter:
            return _load_adapter(name, src, adapter, adapter_base, dtype=torch_dtype, device=dev,
                                 device_map=device_map, progress=progress, **common)
        config = _read_config(src, name, **common)
        get_spec(config)  # unsupported architecture: fail before any weights are fetched
        try:
            model = _from_pretrained(src, config, dtype=torch_dtype, device=dev, device_map=device_map, **common)
        except Exception as e:  # hub failures and damaged files become one line; anything else stays a bug
            err = hub_error(e, src, name, token) if isinstance(e, (OSError, ValueError)) else None
            raise (err or corrupt_error(e, name) or e) from None
        tok = _load_tokenizer(src.path, revision=src.revision, gguf_file=src.gguf_file, **common)
    log.info("loaded %s (%s, %s, %s)", name, config.model_type, torch_dtype, dev)
    return model.eval(), tok


def _load_adapter(name: str, src: Location, adapter: dict, adapter_base: str | None, *, dtype, device,
                  device_map, token, trust_remote_code, progress):
    """Load the adapter's base (recorded path, else `adapter_base`), apply the adapter, merge it."""
    import peft

    recorded = adapter.get("base_model_name_or_path")
    base_src, base_name = None, None
    for candidate in (recorded, adapter_base):
        if not candidate:
            continue
        try:
            s = locate(candidate)
            if s.kind == "hub":  # reachable means: its config can be read (no weights fetched yet)
                _read_config(s, candidate, token=token, trust_remote_code=trust_remote_code)
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
    base, base_tok = load_model(base_name, dtype=dtype, device=device, device_map=device_map,
                                trust_remote_code=trust_remote_code, token=token, progress=progress)
    try:
        merged = peft.PeftModel.from_pretrained(base, src.path, revision=src.revision, token=token)
        merged = merged.merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        err = hub_error(e, src, name, token)
        if err is not None:
            raise err from None
        raise TracingError(f"adapter {name} does not fit base {base_name} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}): pass the matching base with --adapter_base PATH") \
            from None
    tok = _load_tokenizer(src.path, revision=src.revision, token=token, trust_remote_code=trust_remote_code,
                          quiet=True)
    if tok is None:
        tok = base_tok
    log.info("merged adapter %s into %s", name, base_name)
    return merged.eval(), tok
