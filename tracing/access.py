"""Reaching a checkpoint safely: names classified without loading anything, hub failures turned into one-line
errors that name the fix, and the token scrubbed from every log line and error. `tracing.checkpoints.resolve`
builds on these to resolve a name once into a `Checkpoint`.

    loc = locate("org/model@v1.0")     # Location("hub", "org/model", "v1.0")
    loc = locate("/ckpt/lora")         # Location("adapter", "/ckpt/lora")
    read_config(loc, name, token=None, trust_remote_code=False)   # its transformers config, failures as one line
    with guard(token, progress=False):  # loading code: no token in logs or exceptions, quiet progress bars
        ...
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.utils as hub_utils
import transformers
from huggingface_hub import errors as he
from safetensors import SafetensorError
from transformers.utils import cached_file

from tracing.errors import TracingError
from tracing.hub import fix, offline_reason

ADAPTER_CONFIG = "adapter_config.json"


# ---------------------------------------------------------------------- where the checkpoint lives
@dataclass(frozen=True)
class Location:
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


def not_found(name: str) -> TracingError:
    """`name` is no local checkpoint and cannot be had from the hub; the fix depends on why (hub.fix)."""
    reason = offline_reason()
    where = "a hub repository" if reason is None else "in the Hugging Face cache"
    return TracingError(f"{name} is neither a local directory, a .gguf file nor {where}; {fix(reason)}")


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def locate(name: str, revision: str | None = None) -> Location:
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
            return Location("adapter", str(path))
        if (path / "config.json").is_file():
            return Location("dir", str(path))
        if (ggufs := sorted(path.glob("*.gguf"))):
            if len(ggufs) > 1:
                raise TracingError(f"{path} holds several .gguf files: pass the one to load, e.g. {ggufs[0]}")
            return Location("gguf", str(path), gguf_file=ggufs[0].name)
        raise TracingError(f"{path} has no config.json, adapter_config.json or .gguf file: "
                           f"save the model with save_pretrained or pass the right directory")
    if path.is_file():
        if path.suffix == ".gguf":
            return Location("gguf", str(path.parent), gguf_file=path.name)
        raise TracingError(f"{path} is a file but not a .gguf file: pass its directory (with config.json)")
    if base.endswith(".gguf") and base.count("/") >= 2 and not base.startswith(("/", ".", "~")):
        org, repo, file = base.split("/", 2)  # org/repo/file.gguf: a GGUF file inside a hub repo
        offline_reason()  # without a network the hub client goes offline now: cached files only, no retries
        return Location("gguf", f"{org}/{repo}", rev, gguf_file=file)
    if _looks_local(base) or base.endswith(".gguf"):
        raise TracingError(f"{name} is neither a local directory nor a .gguf file (no such path): pass an "
                           f"existing path, or a hub id as org/name")
    offline_reason()
    return Location("hub", base, rev)


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
def guard(token: str | None, progress: bool) -> Iterator[None]:
    """Scrub the token from log records and exceptions; silence library progress bars if asked."""
    handlers = [h for lg in (logging.getLogger(), logging.getLogger("transformers"),
                             logging.getLogger("huggingface_hub")) for h in lg.handlers]
    filt = _Scrub(token) if token else None
    for h in handlers if filt else ():
        h.addFilter(filt)
    bars_on = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:  # the GGUF dequantization bar: tracing.models.gguf_name_maps_cached
        transformers.utils.logging.disable_progress_bar()
        hub_utils.disable_progress_bars()
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
        if not progress and bars_on:
            transformers.utils.logging.enable_progress_bar()
            hub_utils.enable_progress_bars()


def hub_error(exc: BaseException, src: Location, name: str, token: str | None) -> TracingError | None:
    """Translate a hub/transformers loading failure into a one-line TracingError (None: not ours)."""
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
        return not_found(name)
    if "trust_remote_code" in str(exc):
        return TracingError(f"{name} ships its own model code: pass --trust_remote_code if you trust it")
    return None


def corrupt_error(exc: BaseException, name: str, file: str = "a JSON file") -> TracingError | None:
    """A checkpoint file that exists but cannot be parsed (invalid JSON `file`, truncated or corrupt weights)
    as a one-line TracingError naming the file and the fix (None: not that kind of failure)."""
    chain = list(_chain(exc))
    text = " ".join(str(x).splitlines()[0] for x in chain if str(x))
    if any(isinstance(x, json.JSONDecodeError) for x in chain) or "not a valid JSON file" in text:
        detail = next((str(x) for x in chain if isinstance(x, json.JSONDecodeError)), "invalid JSON")
        return TracingError(f"{name}: {file} is not valid JSON ({detail}): repair it or save the checkpoint again")
    if any(isinstance(x, (SafetensorError, pickle.UnpicklingError, EOFError)) for x in chain) \
            or "PytorchStreamReader" in text or "header" in text and "safetensors" in text.lower():
        first = text.split(" (", 1)[0][:160]
        return TracingError(f"{name}: a weight file is truncated or corrupt ({first}): download or save the "
                            f"checkpoint again")
    return None


# ---------------------------------------------------------------------- configs
def read_config(src: Location, name: str, *, token, trust_remote_code: bool):
    """The transformers config of `src` (a GGUF file: from its metadata); failures as one-line TracingErrors."""
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
    """adapter_config.json of a local adapter dir or a hub repository ({} when a hub repository has none)."""
    if src.kind == "adapter":
        try:
            return json.loads((Path(src.path) / ADAPTER_CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise corrupt_error(e, name, ADAPTER_CONFIG) from None
    try:
        f = cached_file(src.path, ADAPTER_CONFIG, revision=src.revision, token=token,
                        _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)  # offline: the config read decides
    except OSError as e:
        raise (hub_error(e, src, name, token) or not_found(name)) from None
    try:
        return json.loads(Path(f).read_text()) if f else {}
    except json.JSONDecodeError as e:
        raise corrupt_error(e, name, ADAPTER_CONFIG) from None
