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

import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tracing.arch import get_spec
from tracing.errors import TracingError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------- device and dtype
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu', 'cuda', 'cuda:N' (and 'mps') are checked to exist."""
    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TracingError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise TracingError(f"--device {device} asked for a GPU but no CUDA device is visible: "
                               f"use --device cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise TracingError(f"--device {device} does not exist ({n} CUDA device(s) visible): "
                               f"use cuda:0..cuda:{n - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise TracingError(f"--device {device} is not available here: use --device cpu (or auto)")
    elif dev.type != "cpu":
        raise TracingError(f"unsupported device '{device}': use auto, cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """None/'auto' -> bfloat16 on GPU (float16 on GPUs without bf16, before Ampere), float32 on CPU;
    else one of float32/fp32/float16/fp16/bfloat16/bf16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        if torch.device(device).type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise TracingError(f"unknown --dtype '{dtype}': use float32, bfloat16 or float16 "
                           f"(or fp32, bf16, fp16)")
    return _DTYPES[key]


# ---------------------------------------------------------------------- where the checkpoint lives
@dataclass(frozen=True)
class Source:
    """A resolved model name: `path` is a local path or a hub repo id."""

    kind: str  # "dir" | "adapter" | "gguf" | "hub"
    path: str
    revision: str | None = None
    gguf_file: str | None = None  # file name inside `path` for GGUF

    @property
    def local(self) -> bool:
        return self.kind != "hub"


def split_revision(name: str) -> tuple[str, str | None]:
    """'org/model@v1.0' -> ('org/model', 'v1.0'); existing local paths are never split."""
    if os.path.exists(os.path.expanduser(name)) or "@" not in name:
        return name, None
    base, rev = name.rsplit("@", 1)
    if not base or not rev or "/" in rev.replace("refs/pr/", ""):
        raise TracingError(f"cannot parse '{name}' as ID@REVISION: write org/name@branch-tag-or-commit")
    return base, rev


def _not_found(name: str) -> TracingError:
    return TracingError(f"{name} is neither a local directory, a .gguf file nor a reachable hub id "
                        f"(offline? set HF_HUB_OFFLINE=0 or pass a local path)")


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def locate(name: str, revision: str | None = None) -> Source:
    """Classify `name` (local dir, adapter dir, .gguf file, hub id) without loading anything."""
    name = str(name).strip()
    if not name:
        raise TracingError("empty model name: pass a hub id, a local directory or a .gguf file")
    base, rev = split_revision(name)
    if rev and revision and rev != revision:
        raise TracingError(f"'{name}' names revision {rev} but revision={revision} was also given: keep one")
    rev = rev or revision
    path = Path(base).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return Source("adapter", str(path))
        if (path / "config.json").is_file():
            return Source("dir", str(path))
        if (ggufs := sorted(path.glob("*.gguf"))):
            if len(ggufs) > 1:
                raise TracingError(f"{path} holds several .gguf files: pass the one to load, e.g. {ggufs[0]}")
            return Source("gguf", str(path), gguf_file=ggufs[0].name)
        raise TracingError(f"{path} has no config.json, adapter_config.json or .gguf file: "
                           f"save the model with save_pretrained or pass the right directory")
    if path.is_file():
        if path.suffix == ".gguf":
            return Source("gguf", str(path.parent), gguf_file=path.name)
        raise TracingError(f"{path} is a file but not a .gguf file: pass its directory (with config.json)")
    if base.endswith(".gguf") and base.count("/") >= 2 and not base.startswith(("/", ".", "~")):
        org, repo, file = base.split("/", 2)  # org/repo/file.gguf: a GGUF file inside a hub repo
        return Source("gguf", f"{org}/{repo}", rev, gguf_file=file)
    if _looks_local(base) or base.endswith(".gguf"):
        raise _not_found(name)
    return Source("hub", base, rev)


# ---------------------------------------------------------------------- secrets and errors
class _Scrub(logging.Filter):
    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if self.secret in msg:
            record.msg, record.args = msg.replace(self.secret, "***"), ()
        if record.exc_info and not record.exc_text:  # a logged exception: format its traceback once, here
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and self.secret in record.exc_text:
            record.exc_text, record.exc_info = record.exc_text.replace(self.secret, "***"), None
        return True


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


@contextlib.contextmanager
def _guard(token: str | None, progress: bool) -> Iterator[None]:
    """Scrub the token from log records and exceptions; silence library progress bars if asked."""
    import huggingface_hub.utils as hub_utils
    import transformers

    handlers = [h for lg in (logging.getLogger(), logging.getLogger("transformers"),
                             logging.getLogger("huggingface_hub")) for h in lg.handlers]
    filt = _Scrub(token) if token else None
    for h in handlers if filt else ():
        h.addFilter(filt)
    bars_on = transformers.utils.logging.is_progress_bar_enabled()
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if not progress:
        transformers.utils.logging.disable_progress_bar()
        hub_utils.disable_progress_bars()
        if gguf_tqdm is None:  # its GGUF dequantization bar ignores the switch above
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
            gguf_tqdm = gguf_utils.tqdm
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    except BaseException as e:
        if token and any(token in str(x) for x in _chain(e)):
            msg = str(e).replace(token, "***")
            raise (TracingError(msg) if isinstance(e, TracingError) else RuntimeError(msg)) from None
        raise
    finally:
        for h in handlers if filt else ():
            h.removeFilter(filt)
        if not progress:
            gguf_utils.tqdm = gguf_tqdm
            if bars_on:
                transformers.utils.logging.enable_progress_bar()
                hub_utils.enable_progress_bars()


def _hub_error(exc: BaseException, src: Source, name: str, token: str | None) -> TracingError | None:
    """Translate a hub/transformers loading failure into a one-line TracingError (None: not ours)."""
    from huggingface_hub import errors as he

    chain = list(_chain(exc))
    if any(isinstance(x, he.GatedRepoError) for x in chain) or "gated repo" in str(exc).lower():
        if token:
            return TracingError(f"{src.path} is a gated repository and this token has no access: accept its "
                                f"license on huggingface.co/{src.path} with the token's account")
        return TracingError(f"{src.path} is a gated repository: accept its license on huggingface.co and set "
                            f"HF_TOKEN (or pass --token)")
    if any(isinstance(x, he.RevisionNotFoundError) for x in chain) or "valid git identifier" in str(exc):
        return TracingError(f"revision '{src.revision}' does not exist for {src.path}: pass an existing "
                            f"branch, tag or commit after '@'")
    if any(isinstance(x, (he.RepositoryNotFoundError, he.LocalEntryNotFoundError, he.HFValidationError,
                          he.OfflineModeIsEnabled, he.EntryNotFoundError)) for x in chain) \
            or "couldn't connect" in str(exc) or "not a valid model identifier" in str(exc) \
            or "does not appear to have" in str(exc):
        return _not_found(name)
    if "trust_remote_code" in str(exc):
        return TracingError(f"{name} ships its own model code: pass --trust_remote_code if you trust it")
    return None


def _read_config(src: Source, name: str, *, token, trust_remote_code: bool):
    import transformers

    kw = dict(revision=src.revision, token=token, trust_remote_code=trust_remote_code)
    if src.gguf_file:
        kw["gguf_file"] = src.gguf_file
    try:
        return transformers.AutoConfig.from_pretrained(src.path, **kw)
    except (OSError, ValueError, KeyError) as e:
        err = _hub_error(e, src, name, token)
        if err is not None:
            raise err from None
        if src.gguf_file:
            raise TracingError(f"cannot read GGUF file {src.gguf_file}: {str(e).splitlines()[0]} "
                               f"(transformers' GGUF support covers llama/mistral/qwen2/qwen3/gemma/gpt2 "
                               f"files; pass the original checkpoint otherwise)") from None
        raise


def _read_adapter_config(src: Source, name: str, token) -> dict:
    if src.kind == "adapter":
        return json.loads((Path(src.path) / "adapter_config.json").read_text())
    from transformers.utils import cached_file

    try:
        f = cached_file(src.path, "adapter_config.json", revision=src.revision, token=token,
                        _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)  # offline: the config read decides
    except OSError as e:
        raise (_hub_error(e, src, name, token) or _not_found(name)) from None
    return json.loads(Path(f).read_text()) if f else {}


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _load_tokenizer(where: str, *, revision=None, token=None, trust_remote_code=False, gguf_file=None,
                    quiet: bool = False):
    import transformers

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


def _from_pretrained(src: Source, config, *, dtype, device, device_map, token, trust_remote_code):
    import transformers

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
    with _guard(token, progress):
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
        except (OSError, ValueError) as e:
            raise (_hub_error(e, src, name, token) or e) from None
        tok = _load_tokenizer(src.path, revision=src.revision, gguf_file=src.gguf_file, **common)
    log.info("loaded %s (%s, %s, %s)", name, config.model_type, torch_dtype, dev)
    return model.eval(), tok


def _load_adapter(name: str, src: Source, adapter: dict, adapter_base: str | None, *, dtype, device,
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
        err = _hub_error(e, src, name, token)
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
