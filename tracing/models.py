"""Load one checkpoint as an eval-mode causal LM plus its tokenizer, whatever form it comes in.

    model, tok = load_model("meta-llama/Llama-2-7b-hf@main")        # hub id, optional @revision
    model, tok = load_model("/ckpt/my-llama")                         # local dir with config.json
    model, tok = load_model("/ckpt/lora", adapter_base="/ckpt/base")  # PEFT adapter, merged into its base
    model, tok = load_model("/ckpt/model.Q8_0.gguf")                  # GGUF file, dequantized

`load_model` takes a `tracing.checkpoints.Checkpoint` too (a name resolved once: located, config read).
The architecture is checked against tracing.arch from the config alone, so an unsupported model fails before
any weights are downloaded. A Hugging Face token comes from `token` or `HF_TOKEN`; it is only ever handed to
the hub client, and is scrubbed from every exception and log line raised while loading.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import functools
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import transformers

from tracing.access import Location, corrupt_error, guard, hub_error
from tracing.checkpoints import Checkpoint, load_tokenizer, resolve
from tracing.devices import resolve_device, resolve_dtype
from tracing.errors import TracingError

if TYPE_CHECKING:  # for annotations only: importing them loads transformers' modeling code (~130 MiB)
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


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


@contextlib.contextmanager
def gguf_name_maps_cached() -> Iterator[None]:
    """While inside: gguf's `get_tensor_name_map(arch, n_blocks)` memoized. transformers' GGUF weight map calls it
    once per submodule (397 times for a 30-layer Llama: 15 s on this CPU, most of a 135M GGUF's load); the maps
    are only read, so one per (arch, n_blocks) serves every call. Also: transformers' GGUF dequantization bar,
    which ignores transformers' own switch, is off while that switch is (access.guard, --no_progress); patched
    here, where GGUF files are read, so that other checkpoints never import the GGUF code (1.2 s)."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as tf_gguf

    real, bar = gguf.get_tensor_name_map, tf_gguf.tqdm
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(real)
    if not transformers.utils.logging.is_progress_bar_enabled():
        tf_gguf.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf.get_tensor_name_map, tf_gguf.tqdm = real, bar


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
    with gguf_name_maps_cached() if src.gguf_file else contextlib.nullcontext():
        return transformers.AutoModelForCausalLM.from_pretrained(src.path, **kw)


# ---------------------------------------------------------------------- the entry point
def load_model(model: Checkpoint | str, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "auto",
               device_map: str | dict | None = None, trust_remote_code: bool = False, token: str | None = None,
               adapter_base: str | None = None, revision: str | None = None, progress: bool = True,
               allow_keys: Sequence[str] = (), notes: list | None = None, tokenizer: bool = True,
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """(model in eval mode, tokenizer or None) for a Checkpoint, or a name: hub id[@revision], local dir, PEFT
    adapter or .gguf (resolved with `revision` and `adapter_base`). `tokenizer=False`: the model only.

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
    common = dict(token=token, trust_remote_code=trust_remote_code)
    with guard(token, progress):
        ckpt = model if isinstance(model, Checkpoint) else \
            resolve(model, revision=revision, adapter_base=adapter_base, progress=progress, **common)
        if ckpt.adapter is not None:
            loaded = _load_adapter(ckpt, dtype=torch_dtype, device=dev, device_map=device_map, progress=progress,
                                   allow_keys=allow_keys, notes=notes, **common)
        else:
            try:
                loaded, info = _from_pretrained(ckpt.location, ckpt.config, dtype=torch_dtype, device=dev,
                                                device_map=device_map, **common)
            except Exception as e:  # hub failures and damaged files become one line; anything else stays a bug
                err = hub_error(e, ckpt.location, ckpt.name, token) if isinstance(e, (OSError, ValueError)) else None
                raise (err or corrupt_error(e, ckpt.name) or e) from None
            check_loading_info(ckpt.name, info, allow_keys, notes)
        tok = load_tokenizer(ckpt, **common) if tokenizer else None
    log.info("loaded %s (%s, %s, %s)", ckpt.name, ckpt.config.model_type, torch_dtype, dev)
    return loaded.eval(), tok


def _load_adapter(ckpt: Checkpoint, *, dtype, device, device_map, token, trust_remote_code, progress, allow_keys,
                  notes):
    """Load the adapter's base (its resolved `ckpt.base`), apply the adapter, merge it."""
    import peft

    base, _ = load_model(ckpt.base, dtype=dtype, device=device, device_map=device_map,
                         trust_remote_code=trust_remote_code, token=token, progress=progress,
                         allow_keys=allow_keys, notes=notes, tokenizer=False)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = peft.PeftModel.from_pretrained(base, ckpt.path, revision=ckpt.revision, token=token)
        for w in caught:  # peft only warns when adapter weights are missing (they stay at their init: no-ops)
            text = str(w.message)
            if "missing adapter keys while loading the checkpoint: " in text:
                missing = ast.literal_eval(text.split("checkpoint: ", 1)[1].rstrip("."))
                check_loading_info(f"adapter {ckpt.name}", {"missing_keys": missing}, allow_keys, notes,
                                   "adapter_config.json")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        merged = merged.merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        err = hub_error(e, ckpt.location, ckpt.name, token)
        if err is not None:
            raise err from None
        raise TracingError(f"adapter {ckpt.name} does not fit base {ckpt.base.name} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}): pass the matching base with --adapter_base PATH") \
            from None
    log.info("merged adapter %s into %s", ckpt.name, ckpt.base.name)
    return merged
